"""The pool's fork server and its stand-in ``__main__`` (dask_merge._worker_main).

These tests need no torch: they run on every Python the package claims
(.ci/run), since the stand-in leans on CPython's multiprocessing internals.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dask_merge
from conftest import copy_reference_pairs

SCRIPTS = Path(__file__).parent / "scripts"


def test_import_is_light():
    """`import dask_merge` (what a pool worker needs) imports no Dask, distributed or torch."""
    code = "import sys, json, dask_merge; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    modules = json.loads(done.stdout)
    assert not [m for m in modules if m.split(".")[0] in ("dask", "distributed", "torch")]


def test_the_public_api_is_all_there():
    assert set(dask_merge.__all__) <= set(dir(dask_merge))
    assert callable(dask_merge.plan) and callable(dask_merge.run)
    assert dask_merge.Plan.execute and dask_merge.Report and dask_merge.Record
    assert issubclass(dask_merge.ConfigurationError, ValueError)
    with pytest.raises(AttributeError, match="no_such_name"):
        dask_merge.no_such_name  # noqa: B018


def run_and_watch(tmp_path, features, scheduler: str) -> dict:
    """``dask_merge.run`` in a fresh interpreter: what it did and started (tests/scripts)."""
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "run_and_watch.py"), str(features), str(tmp_path / "out"),
         scheduler], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("scheduler", ["sync", "processes"])
def test_a_local_run_never_imports_distributed(tmp_path, scheduler):
    # Given a scheduler by name, dask.compute imports distributed to look for a
    # default client: 0.2 s of every run, in the parent.
    copy_reference_pairs(tmp_path / "features", 2)
    seen = run_and_watch(tmp_path, tmp_path / "features", scheduler)
    assert seen["counts"]["merged"] == 2
    assert "distributed" not in seen["modules"] and "dask" in seen["modules"]


@pytest.mark.parametrize("scheduler, started", [("processes", True), ("sync", False)])
def test_run_starts_the_pool_before_importing_dask(tmp_path, scheduler, started):
    # The fork server's imports (~0.2 s of one core) overlap those of Dask.
    copy_reference_pairs(tmp_path / "features", 2)
    seen = run_and_watch(tmp_path, tmp_path / "features", scheduler)
    assert seen["counts"]["merged"] == 2
    assert (seen["dask_up"], seen["started"]) == (started, started)


def test_a_run_with_nothing_pending_starts_nothing(tmp_path):
    copy_reference_pairs(tmp_path / "features", 2)
    assert run_and_watch(tmp_path, tmp_path / "features", "processes")["counts"]["merged"] == 2
    seen = run_and_watch(tmp_path, tmp_path / "features", "processes")
    assert seen["counts"] == {"merged": 0, "skipped": 2, "failed": 0}
    # No fork server, no pool, no worker; not even Dask imported.
    assert seen["started"] is False and seen["children"] == [] and "dask_up" not in seen
    assert "dask" not in seen["modules"]


def _run_pipeline(tmp_path, script: str, how: str) -> tuple[dict, list[str]]:
    """Run a copy of tests/scripts/``script`` as ``pipeline`` (``how``: by path, or with ``-m``).

    Returns what it printed and the ids of the processes that ran it.
    """
    shutil.copy(SCRIPTS / script, tmp_path / "pipeline.py")
    command = [sys.executable, *(["pipeline.py"] if how == "path" else ["-m", "pipeline"])]
    env = {**os.environ, "FEATURES": str(tmp_path / "features"), "OUT": str(tmp_path / "out"),
           "RAN": str(tmp_path / "ran")}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), (tmp_path / "ran").read_text().split()


@pytest.mark.parametrize("how", ["path", "module"])
def test_pool_workers_never_run_the_parents_script(tmp_path, how):
    # A pipeline script imports torch, has side effects and, written in a
    # hurry, no `if __name__ == "__main__":` guard.  Workers that ran it again
    # (as spawned ones do, and forked ones before Python 3.13) would import
    # torch each and start the run again inside themselves.
    copy_reference_pairs(tmp_path / "features", 3)
    seen, ran = _run_pipeline(tmp_path, "pipeline_unguarded.py", how)
    assert seen["counts"]["merged"] == 3
    assert "torch" not in seen["modules"] and "dask_merge.tasks" in seen["modules"]
    assert len(ran) == 1, f"the script ran in {len(ran)} processes"


@pytest.mark.parametrize("how", ["path", "module"])
def test_the_parents_own_fork_server_pools_still_work(tmp_path, how):
    # The fork server is the interpreter's: a pipeline's own pools of that
    # start method (Python's default from 3.14 on) fork from it after a run.
    # Their workers must run the script as multiprocessing always does (its
    # functions, its top-level set-up) and keep Python's Ctrl-C handler; ours never run it.
    copy_reference_pairs(tmp_path / "features", 2)
    seen, _ = _run_pipeline(tmp_path, "pipeline_own_pools.py", how)
    ran = seen["ran"]  # after the pipeline's first pool
    assert seen["counts"]["merged"] == 2
    assert seen["preloaded"] is True  # the pipeline's preload is added to, not replaced
    # The parent, then its own pool's workers (the one never used may be
    # stopped before it ran the script); none of dask_merge's two.
    assert ran[0] == str(seen["parent"]) and 2 <= len(ran) <= 3, ran
    assert {str(pid) for pid in seen["workers"]} <= set(ran[1:]), (seen, ran)
    assert seen["squares"] == [1, 4, 9] and seen["ctrl_c"] == [True, True]


def test_pool_workers_import_neither_distributed_nor_torch(tmp_path):
    # The processes scheduler's children pay for what they import, once per
    # run: Dask's core and the kernel, not distributed or torch.
    from concurrent.futures import ProcessPoolExecutor

    from dask_merge._worker_main import pool_context
    from dask_merge.tasks import merge_pairs, pool_worker

    copy_reference_pairs(tmp_path / "features", 2)
    pairs = dask_merge.find_pairs(tmp_path / "features", output_dir=tmp_path).pairs
    with ProcessPoolExecutor(1, mp_context=pool_context(), initializer=pool_worker,
                             initargs=(1,)) as pool:  # a worker as the pool executor makes it
        records = pool.submit(merge_pairs, pairs, None).result(timeout=60)
        # Ask the same worker, after a merge, what it has imported.
        modules = pool.submit(eval, "sorted(__import__('sys').modules)").result(timeout=60)
        # A pool worker lives for one run: it keeps its read buffers from task to task.
        kept = pool.submit(eval, "__import__('dask_merge.torchfile').torchfile.worker_read_buffers() is not None")
        assert kept.result(timeout=60) is True
    assert [r.status for r in records] == ["merged", "merged"]
    assert "dask_merge.tasks" in modules and "numpy" in modules
    heavy = [m for m in modules if m.split(".")[0] in ("distributed", "torch", "bokeh", "pandas")]
    assert not heavy, heavy


@pytest.mark.skipif(sys.version_info < (3, 11), reason="PYTHONSAFEPATH is new in 3.11: on 3.10 "
                    "the fork server's imports try the working folder first")
def test_workers_run_the_clients_package_not_one_in_the_working_folder(tmp_path):
    # A `dask_merge` folder where the command runs (a checkout of another
    # version, say) must not be what the workers import.
    cwd = tmp_path / "cwd"
    (cwd / "dask_merge").mkdir(parents=True)
    (cwd / "dask_merge" / "__init__.py").write_text(
        "import os\nopen(os.environ['DECOY_MARK'], 'a').write(f'{os.getpid()}\\n')\n")
    copy_reference_pairs(tmp_path / "features", 2)
    command = [str(Path(sys.executable).parent / "dask-merge"), "run", "--nucleotide-dir",
               str(tmp_path / "features"), "--output-dir", str(tmp_path / "out"),
               "--scheduler", "processes", "--workers", "2", "--no-progress"]
    mark = tmp_path / "decoy-imported"
    done = subprocess.run(command, cwd=cwd, env={**os.environ, "DECOY_MARK": str(mark)},
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert not mark.exists(), f"processes {mark.read_text().split()} imported the decoy"
    assert len(list((tmp_path / "out").glob("*_merged.pt"))) == 2
