"""Reliability (issue 6): no fault loses work or leaves a broken file.

Every test here makes a real fault happen to a real run: the whole process
group SIGKILLed, Ctrl-C (SIGINT) to the group or to the parent alone, a
worker process killed while it merges a pair, alone or in a batch (on the
process pool and on a LocalCluster), a full disk (a small tmpfs), a
read-only folder (a read-only tmpfs), inputs or the output folder changed
between planning and merging, and two runs over one output folder at once.  Afterwards, each test checks
the same things:

* every file under a final name (``*_merged.pt``) loads with ``torch.load``
  and equals :func:`dask_merge.testing.reference_merge` of its pair;
* no temporary (``.NAME.dask-merge-tmp-*``) is left, beside the outputs or
  beside the checkpoint records;
* a rerun merges exactly the pairs not yet done.

A worker is killed "mid-pair" deterministically: a fanotify permission mark
on the victim pair's nucleotide file makes the worker that opens it wait for
the test, which learns its pid, kills it, and on the retry either kills again
or lets it read.

Mounts (tmpfs) and fanotify need root; where they are impossible the tests
say why and skip, but on CI (root with CAP_SYS_ADMIN) they run.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import shutil
import signal
import subprocess
import struct
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

import dask_merge
from dask_merge.atomic import is_temporary
from dask_merge.checkpoints import RECORD_FOLDER, checkpoint_state
from dask_merge.testing import make_dataset, make_pair, reference_merge

DISTINCT = 4  # distinct real-size pairs (2000 rows at DNABERT-S / ESM-2 3B widths)
ROWS = 2000
STEMS = 36  # pairs of a run: hard links to the distinct ones, ~4 s on 2 workers

pytestmark = pytest.mark.timeout(180)


# --- data and checks -----------------------------------------------------------------


class Inputs:
    """The real-size pairs, made once per module, and their reference merges."""

    def __init__(self, folder: Path):
        self.base = folder / "base"
        make_dataset(self.base, pairs=DISTINCT, rows=ROWS)
        self._expected: dict[tuple[int, int], dict] = {}

    def linked(self, folder: Path, stems: int = STEMS) -> Path:
        """``stems`` pairs named chunk_K: hard links to the distinct pairs."""
        folder.mkdir(parents=True)
        for k in range(stems):
            for suffix in ("_DNABERT_S.pt", "_ESM.pt"):
                os.link(self.base / f"output_{k % DISTINCT}{suffix}", folder / f"chunk_{k}{suffix}")
        return folder

    def expected(self, nucleotide: Path, protein: Path) -> dict:
        """reference_merge of a pair (computed once per distinct file)."""
        key = (os.stat(nucleotide).st_ino, os.stat(protein).st_ino)
        if key not in self._expected:
            self._expected[key] = reference_merge(nucleotide, protein)
        return self._expected[key]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    return Inputs(tmp_path_factory.mktemp("reliability"))


def temporaries(out: Path) -> list[Path]:
    """Every temporary beside the outputs and beside their checkpoint records."""
    found = []
    for folder in (out, out / RECORD_FOLDER):
        if folder.is_dir():
            found += [folder / n for n in os.listdir(folder) if is_temporary(n)]
    return sorted(found)


def merged_stems(out: Path) -> set[str]:
    return {p.name.removesuffix("_merged.pt") for p in out.glob("*_merged.pt")}


def assert_outputs_correct(out: Path, features: Path, expected=None) -> set[str]:
    """Every final-named output is complete and equals reference_merge of its pair."""
    stems = merged_stems(out)
    for stem in stems:
        merged = torch.load(out / f"{stem}_merged.pt")  # a torn file would not load
        nucleotide, protein = features / f"{stem}_DNABERT_S.pt", features / f"{stem}_ESM.pt"
        want = expected(nucleotide, protein) if expected else reference_merge(nucleotide, protein)
        assert merged["ids"] == want["ids"], stem
        assert torch.equal(merged["data"], want["data"]), stem
    return stems


def cli(*args, **popen) -> subprocess.Popen:
    command = [shutil.which("dask-merge") or "dask-merge", "run", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def wait_for_first_output(process: subprocess.Popen, out: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not list(out.glob("*_merged.pt")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no output appeared"
        time.sleep(0.005)


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def assert_all_gone(processes: list[psutil.Process], timeout: float = 10) -> None:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"stray processes: {[(p.pid, p.cmdline()) for p in alive]}"


def assert_resumes(features: Path, out: Path, inputs: Inputs, *, pairs: int = STEMS) -> None:
    """A rerun merges exactly the pairs without an output, skips the others.

    After it, no temporary is left, not even the empty one of a writer killed
    between creating its temporary and writing its first bytes (see
    test_a_killed_writers_temporary_goes_at_once_a_live_ones_never).
    """
    done = merged_stems(out)
    assert 0 < len(done) < pairs, f"the fault did not land mid-run ({len(done)} of {pairs} done)"
    report = dask_merge.run(features, output_dir=out, scheduler="processes", workers=2,
                            progress=False)
    assert report.counts == {"merged": pairs - len(done), "skipped": len(done), "failed": 0}
    assert {r.name for r in report.records if r.status == "skipped"} == done
    assert merged_stems(out) == {f"chunk_{k}" for k in range(pairs)}
    assert_outputs_correct(out, features, inputs.expected)
    assert temporaries(out) == []


# --- 1. SIGKILL of the whole run ------------------------------------------------------------


def start_a_run(inputs: Inputs, tmp_path: Path, *extra: str
                ) -> tuple[Path, Path, subprocess.Popen, list]:
    """A CLI run on the process pool, in its own session, once its first output is there."""
    features, out = inputs.linked(tmp_path / "features"), tmp_path / "out"
    run = cli("--nucleotide-dir", features, "--output-dir", out, "--scheduler", "processes",
              "--workers", "2", "--no-progress", *extra, start_new_session=True)
    wait_for_first_output(run, out)
    children = descendants(run.pid)
    assert len(children) >= 2, "the pool's workers are not running"
    return features, out, run, children


def test_sigkill_of_the_whole_run_loses_nothing_and_the_rerun_resumes(inputs, tmp_path):
    features, out, run, group = start_a_run(inputs, tmp_path)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait(timeout=10)
    assert run.returncode == -signal.SIGKILL
    assert_all_gone(group)

    # What is under a final name is complete and right; temporaries are never
    # outputs (the rerun skips exactly the final names) and the rerun removes them.
    assert_outputs_correct(out, features, inputs.expected)
    assert_resumes(features, out, inputs)


def test_a_killed_writers_temporary_goes_at_once_a_live_ones_never(inputs, tmp_path):
    """The rerun's clean-up, with real writer processes (atomic_write) on the same folder."""
    features, out = inputs.linked(tmp_path / "features", stems=4), tmp_path / "out"
    out.mkdir()

    def writer(name: str) -> subprocess.Popen:
        # Locks its temporary, writes part of it and waits: a live writer.
        code = (
            "import sys, time\n"
            "from dask_merge.atomic import atomic_write\n"
            "def write(f):\n"
            "    f.write(b'x' * 100_000); f.flush()\n"
            "    print('writing', flush=True); time.sleep(120)\n"
            f"atomic_write({str(out / name)!r}, write)\n"
        )
        process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline() == "writing\n"
        return process

    killed = writer("chunk_0_merged.pt")
    killed.kill()
    killed.wait()
    live = writer("chunk_1_merged.pt")
    # What a writer killed between creating its temporary and writing to it
    # leaves: empty and unlocked.
    dead = out / f".chunk_2_merged.pt.dask-merge-tmp-{'0123' * 8}"
    os.close(os.open(dead, os.O_WRONLY | os.O_CREAT, 0o644))
    try:
        before = temporaries(out)
        assert len(before) == 3 and all(p.name.startswith(".chunk_") for p in before)
        report = dask_merge.run(features, output_dir=out, scheduler="processes", workers=2,
                                progress=False)
        assert report.counts == {"merged": 4, "skipped": 0, "failed": 0}
        assert_outputs_correct(out, features, inputs.expected)
        # The dead writers' temporaries went at once; the live writer's stays.
        left = temporaries(out)
        assert [p.name.split(".dask")[0] for p in left] == [".chunk_1_merged.pt"]
        assert live.poll() is None
    finally:
        live.kill()
        live.wait()
    # Once its writer is dead, the next run removes it too.
    report = dask_merge.run(features, output_dir=out, scheduler="sync", progress=False, force=True)
    assert report.counts["merged"] == 4 and temporaries(out) == []


# --- 2. Ctrl-C ------------------------------------------------------------------------------


def interrupt(run: subprocess.Popen, *, group: bool = True) -> str:
    """Ctrl-C a run (its whole process group, as a terminal does, or the parent alone);
    return its stderr once it has exited (it is killed if it has not within 15 s)."""
    if group:
        os.killpg(run.pid, signal.SIGINT)
    else:  # kill -INT PID: the children hear nothing, the parent must stop them
        os.kill(run.pid, signal.SIGINT)
    try:
        return run.communicate(timeout=15)[1]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)


@pytest.mark.parametrize("target", ["group", "parent"])
def test_ctrl_c_stops_everything_cleans_up_and_the_rerun_resumes(inputs, tmp_path, target):
    features, out, run, children = start_a_run(inputs, tmp_path)
    sent = time.monotonic()
    stderr = interrupt(run, group=target == "group")
    took = time.monotonic() - sent
    assert run.returncode == 130, stderr
    assert took < 5, f"took {took:.1f} s to stop"
    assert_all_gone(children)
    assert "Traceback" not in stderr, stderr
    done = merged_stems(out)
    assert "interrupted after" in stderr
    assert f"{len(done)} pairs are done, {STEMS - len(done)} left" in stderr, stderr
    assert temporaries(out) == []
    assert_outputs_correct(out, features, inputs.expected)
    assert_resumes(features, out, inputs)


def test_ctrl_c_on_a_forced_run_says_to_rerun_without_force(inputs, tmp_path):
    # The same --force command would merge every pair again, not resume.
    features, out, run, children = start_a_run(inputs, tmp_path, "--force")
    stderr = interrupt(run)
    assert run.returncode == 130, stderr
    done = merged_stems(out)
    assert (f"{len(done)} pairs have an up-to-date output (this run's or older), "
            f"{STEMS - len(done)} do not") in stderr, stderr
    assert "again without --force" in stderr and "Run the same command" not in stderr, stderr
    assert_resumes(features, out, inputs)


def test_ctrl_c_while_the_pool_starts_exits_130_without_a_traceback(tmp_path):
    # The command starts the pool's fork server first, which imports for ~0.2 s.
    # Ctrl-C then used to kill it mid-import (tracebacks, a "Fatal Python
    # error", EOFError) while the command, still planning, exited 1.
    features = _small_dataset(tmp_path / "features")
    run = cli("--nucleotide-dir", features, "--output-dir", tmp_path / "out", "--no-progress",
              start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not any("forkserver" in " ".join(p.cmdline()) for p in descendants(run.pid)):
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.001)
        os.killpg(run.pid, signal.SIGINT)  # the server is importing now
        _, stderr = run.communicate(timeout=30)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 130, stderr
    assert "interrupted after" in stderr and "Run the same command again" in stderr, stderr
    for noise in ("Traceback", "Fatal Python error", "EOFError", "Aborted"):
        assert noise not in stderr, stderr


def test_ctrl_c_to_the_fork_server_as_it_starts_is_held_then_dropped(tmp_path):
    # It ignores SIGINT only after its imports; before, a Ctrl-C killed it.
    code = """if __name__ == "__main__":
        import os, signal
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import forkserver
        from dask_merge._worker_main import pool_context

        context = pool_context()
        os.kill(forkserver._forkserver._forkserver_pid, signal.SIGINT)  # it is starting
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            assert pool.submit(pow, 2, 3).result(timeout=60) == 8
        print("served")
    """
    script = tmp_path / "start.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0 and "served" in done.stdout, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


# --- 3. a worker process killed mid-pair -------------------------------------------------------


class Victim:
    """A pair whose nucleotide input holds every worker that opens it, until the test decides.

    A fanotify permission mark on the file makes each ``open()`` of it wait
    for this test's answer, and tells the opener's pid: the test knows which
    process is mid-pair, kills it there (a real SIGKILL of a real worker), or
    lets it read the file.  It needs CAP_SYS_ADMIN, as the tmpfs tests do.
    """

    _EVENT = struct.Struct("<IBBHQii")  # struct fanotify_event_metadata
    _ALLOW = 0x01

    def __init__(self, features: Path, stem: str):
        self.path = features / f"{stem}_DNABERT_S.pt"
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64,
                                       ctypes.c_int, ctypes.c_char_p]
        # FAN_CLASS_CONTENT | FAN_CLOEXEC; then FAN_MARK_ADD of FAN_OPEN_PERM on the file
        self.fd = libc.fanotify_init(0x4 | 0x1, os.O_RDONLY)
        if self.fd < 0 or libc.fanotify_mark(self.fd, 0x1, 0x10000, -100,
                                              os.fsencode(self.path)) < 0:
            pytest.skip(f"no fanotify permission events here: {os.strerror(ctypes.get_errno())}")
        self.kills = 0

    def _next_opener(self, timeout: float) -> tuple[int, int]:
        """Wait for a process to open the file; return its pid and the event's fd."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            raise AssertionError("no worker opened the victim pair")
        _, _, _, _, _, event_fd, pid = self._EVENT.unpack_from(os.read(self.fd, 4096))
        return pid, event_fd

    def _answer(self, event_fd: int) -> None:
        with contextlib.suppress(OSError):  # the opener may be dead already
            os.write(self.fd, struct.pack("<iI", event_fd, self._ALLOW))
        os.close(event_fd)

    def kill_reader(self, timeout: float = 60) -> None:
        """Kill the next process that opens the file, as it opens it."""
        pid, event_fd = self._next_opener(timeout)
        process = psutil.Process(pid)
        assert process in psutil.Process().children(recursive=True), process
        process.kill()
        # Wait without reaping: the pool (or the nanny) must see the death itself.
        deadline = time.monotonic() + 10
        with contextlib.suppress(psutil.NoSuchProcess):
            while process.status() != psutil.STATUS_ZOMBIE:
                assert time.monotonic() < deadline, "the killed worker lives on"
                time.sleep(0.01)
        self._answer(event_fd)
        self.kills += 1

    def feed_reader(self, timeout: float = 60) -> None:
        """Let the next process that opens the file read it, and every later one."""
        _, event_fd = self._next_opener(timeout)
        self._answer(event_fd)
        self.close()

    def close(self) -> None:
        """Stop holding openers: closing the group allows every waiting open."""
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _execute_in_thread(the_plan, **options):
    result = {}

    def target():
        try:
            result["report"] = the_plan.execute(progress=False, **options)
        except BaseException as err:  # pragma: no cover - shown by the test
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def _small_dataset(folder: Path, pairs: int = 6) -> Path:
    make_dataset(folder, pairs=pairs, rows=300, nucleotide_width=64, protein_width=96)
    return folder


def _lives_with_the_interpreter(process: psutil.Process) -> bool:
    command = " ".join(process.cmdline())
    return "multiprocessing.resource_tracker" in command or "multiprocessing.forkserver" in command


@pytest.mark.parametrize("scheduler", ["processes", "local"])
@pytest.mark.parametrize("kills", [1, 2])
def test_a_worker_killed_mid_pair_is_retried_then_reported(tmp_path, scheduler, kills):
    features, out = _small_dataset(tmp_path / "features"), tmp_path / "out"
    the_plan = dask_merge.plan(features, output_dir=out)
    victim = Victim(features, "output_2")
    before = set(psutil.Process().children(recursive=True))
    thread, result = _execute_in_thread(the_plan, scheduler=scheduler, workers=2, retries=1,
                                        dashboard_address="127.0.0.1:0")
    try:
        for _ in range(kills):
            victim.kill_reader()
        if kills == 1:
            victim.feed_reader()  # the retry gets the real bytes
        thread.join(timeout=60)
        assert not thread.is_alive(), "the run did not finish"
    finally:
        victim.close()
    assert "error" not in result, result.get("error")
    report = result["report"]
    assert victim.kills == kills

    counts = report.counts
    assert sum(counts.values()) == 6 and counts["skipped"] == 0
    by_name = {r.name: r for r in report.records}
    others = {f"output_{i}" for i in range(6)} - {"output_2"}
    assert all(by_name[n].status == "merged" for n in others), report.summary()
    if kills == 1:  # retried once, then merged like the reference
        assert counts == {"merged": 6, "skipped": 0, "failed": 0}, report.summary()
    else:  # killed again on its retry: reported, with why
        assert counts == {"merged": 5, "skipped": 0, "failed": 1}, report.summary()
        error = by_name["output_2"].error
        assert "died while merging" in error and "retried" in error, error
        assert not (out / "output_2_merged.pt").exists()
    assert_outputs_correct(out, features)
    assert temporaries(out) == []
    # the pools and the cluster are gone (multiprocessing's resource tracker and
    # fork server stay for the life of this process: they are not the run's;
    # the pool's workers, the fork server's children, are in this list)
    assert_all_gone([p for p in psutil.Process().children(recursive=True)
                     if p not in before and not _lives_with_the_interpreter(p)])
    # The rerun does exactly what is missing: the victim, if it was given up.
    pending = dask_merge.plan(features, output_dir=out).pending
    assert [p.name for p in pending] == ([] if kills == 1 else ["output_2"])
    again = dask_merge.run(features, output_dir=out, scheduler="sync", progress=False)
    assert again.counts == {"merged": kills - 1, "skipped": 7 - kills, "failed": 0}
    assert_outputs_correct(out, features)


@pytest.mark.parametrize("scheduler", ["processes", "local"])
def test_a_batch_whose_worker_dies_blames_only_the_culprit(tmp_path, scheduler):
    """Three pairs per task: the victim's batch-mates are merged, not failed with it."""
    features, out = _small_dataset(tmp_path / "features"), tmp_path / "out"
    the_plan = dask_merge.plan(features, output_dir=out)
    victim = Victim(features, "output_1")  # between two innocents of its batch
    thread, result = _execute_in_thread(the_plan, scheduler=scheduler, workers=2, retries=1,
                                        partition_size=3, dashboard_address="127.0.0.1:0")
    try:
        while thread.is_alive():  # every reader of the victim dies, to the last retry
            with contextlib.suppress(AssertionError):  # no reader yet: look again
                victim.kill_reader(timeout=0.5)
        thread.join()
    finally:
        victim.close()
    assert "error" not in result, result.get("error")
    report = result["report"]
    assert victim.kills >= 2  # the batch, then the pair alone
    by_name = {r.name: r for r in report.records}
    assert report.counts == {"merged": 5, "skipped": 0, "failed": 1}, report.summary()
    assert by_name["output_1"].status == "failed"
    assert "died while merging" in by_name["output_1"].error
    assert_outputs_correct(out, features)
    assert temporaries(out) == []


# --- 4. a full disk ----------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root and CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_full_disk_fails_the_pairs_that_do_not_fit_and_leaves_no_debris(tmp_path):
    # 8 pairs of ~0.9 MB outputs on a 3 MB tmpfs: a few fit, the rest cannot.
    features = tmp_path / "features"
    make_dataset(features, pairs=8, rows=600, nucleotide_width=128, protein_width=256)
    with tmpfs(tmp_path / "small", "size=3m") as out:
        report = dask_merge.run(features, output_dir=out, scheduler="processes", workers=2,
                                progress=False)
        counts = report.counts
        assert counts["merged"] >= 1 and counts["failed"] >= 1, report.summary()
        assert counts["merged"] + counts["failed"] == 8
        for record in report.failures:
            assert "No space left on device" in record.error, record.error
            assert f"{out}/" in record.error and record.name in record.error, record.error
        # What is under a final name is whole: every merged pair's output,
        # and no other (unless only its checkpoint record did not fit).
        done = assert_outputs_correct(out, features)
        merged = {r.name for r in report.records if r.status == "merged"}
        assert merged <= done
        for name in done - merged:
            assert "/.dask-merge/" in {r.name: r for r in report.records}[name].error
        assert temporaries(out) == []
        # space freed: the rerun merges just the pairs without an output
        subprocess.run(["mount", "-o", "remount,size=64m", str(out)], check=True)
        again = dask_merge.run(features, output_dir=out, scheduler="processes", workers=2,
                               progress=False)
        assert again.counts == {"merged": 8 - len(done), "skipped": len(done), "failed": 0}
        assert len(assert_outputs_correct(out, features)) == 8
        assert temporaries(out) == []


# --- 5. read-only and vanishing folders, changed inputs ---------------------------------------


def test_a_read_only_output_folder_is_a_configuration_error(tmp_path):
    features = _small_dataset(tmp_path / "features", pairs=2)
    with tmpfs(tmp_path / "ro", "ro,size=1m") as out:
        for target in (out, out / "sub"):  # the folder itself, or one to create in it
            run = cli("--nucleotide-dir", features, "--output-dir", target, "--no-progress")
            _, stderr = run.communicate(timeout=60)
            assert run.returncode == 2, stderr
            assert str(target) in stderr and "Traceback" not in stderr, stderr
        assert os.listdir(out) == []


def test_the_output_folder_removed_before_merging_fails_each_pair_clearly(tmp_path):
    features, out = _small_dataset(tmp_path / "features", pairs=3), tmp_path / "out"
    the_plan = dask_merge.plan(features, output_dir=out)
    shutil.rmtree(out)
    report = the_plan.execute(scheduler="processes", workers=2, progress=False)
    assert report.counts == {"merged": 0, "skipped": 0, "failed": 3}
    for record in report.failures:
        assert str(out) in record.error and "No such file or directory" in record.error, record.error
    assert not out.exists()


def test_the_output_folder_removed_mid_run_fails_the_rest_clearly(inputs, tmp_path):
    features, out = inputs.linked(tmp_path / "features"), tmp_path / "out"
    report_file = tmp_path / "report.json"
    run = cli("--nucleotide-dir", features, "--output-dir", out, "--scheduler", "processes",
              "--workers", "2", "--no-progress", "--report", report_file)
    wait_for_first_output(run, out)
    moved = tmp_path / "moved"
    os.rename(out, moved)  # as `mv out elsewhere`: atomic, unlike rm -r
    _, stderr = run.communicate(timeout=60)
    assert run.returncode in (0, 1) and "Traceback" not in stderr, stderr
    report = json.loads(report_file.read_text())
    assert sum(report["counts"].values()) == STEMS
    for record in report["pairs"]:
        if record["status"] == "failed":
            assert str(out) in record["error"], record["error"]
    assert report["counts"]["failed"] >= 1, "the folder went after the run was over"
    assert not out.exists()
    # What was written before the move is whole, in the moved folder (with,
    # maybe, the temporaries of writes the move cut short); a run there resumes.
    assert_outputs_correct(moved, features, inputs.expected)
    done = merged_stems(moved)
    again = dask_merge.run(features, output_dir=moved, scheduler="processes", workers=2,
                           progress=False)
    assert again.counts == {"merged": STEMS - len(done), "skipped": len(done), "failed": 0}
    assert len(assert_outputs_correct(moved, features, inputs.expected)) == STEMS
    assert temporaries(moved) == []


def test_inputs_deleted_or_changed_after_planning_fail_only_their_pair(tmp_path):
    features, out = _small_dataset(tmp_path / "features"), tmp_path / "out"
    the_plan = dask_merge.plan(features, output_dir=out)
    deleted = features / "output_1_ESM.pt"
    deleted.unlink()
    truncated = features / "output_3_DNABERT_S.pt"
    truncated.write_bytes(truncated.read_bytes()[:5000])
    # a valid new version of a pair: merged as it is now, and recorded so
    make_pair(features, "output_5", rows=40, nucleotide_width=64, protein_width=96, seed=77)
    report = the_plan.execute(scheduler="processes", workers=2, progress=False)

    by_name = {r.name: r for r in report.records}
    assert report.counts == {"merged": 4, "skipped": 0, "failed": 2}, report.summary()
    assert str(deleted) in by_name["output_1"].error
    assert "No such file or directory" in by_name["output_1"].error
    assert str(truncated) in by_name["output_3"].error
    assert "truncated" in by_name["output_3"].error
    assert merged_stems(out) == {"output_0", "output_2", "output_4", "output_5"}
    assert_outputs_correct(out, features)
    assert by_name["output_5"].rows == 40
    assert temporaries(out) == []
    again = dask_merge.plan(features, output_dir=out)
    assert {p.name for p in again.pending} == {"output_3"}  # output_1 has no pair any more
    assert checkpoint_state(next(p for p, _ in again.done if p.name == "output_5")).reason == "up to date"


# --- 6. two runs at once ------------------------------------------------------------------


def test_two_runs_over_one_output_folder_at_once(inputs, tmp_path):
    stems = 16
    features, out = inputs.linked(tmp_path / "features", stems=stems), tmp_path / "out"
    runs = [cli("--nucleotide-dir", features, "--output-dir", out, "--scheduler", "processes",
                "--workers", "2", "--no-progress", "--report", tmp_path / f"report{i}.json")
            for i in range(2)]
    for run in runs:
        _, stderr = run.communicate(timeout=120)
        assert run.returncode == 0, stderr
    reports = [json.loads((tmp_path / f"report{i}.json").read_text()) for i in range(2)]
    merged_by = [{p["name"] for p in r["pairs"] if p["status"] == "merged"} for r in reports]
    for report in reports:
        assert report["counts"]["failed"] == 0
        assert sum(report["counts"].values()) == stems
    assert merged_by[0] | merged_by[1] == {f"chunk_{k}" for k in range(stems)}
    assert len(assert_outputs_correct(out, features, inputs.expected)) == stems
    assert temporaries(out) == []
    again = dask_merge.plan(features, output_dir=out)
    assert again.pending == [] and len(again.done) == stems
