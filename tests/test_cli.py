"""The dask-merge command: its flags, JSON report and exit codes (a stable contract)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from dask_merge.cli import main
from dask_merge.testing import reference_merge


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_run_writes_outputs_report_and_summary(dataset, tmp_path):
    out, report_file = tmp_path / "out", tmp_path / "report.json"
    result = invoke("run", "--nucleotide-dir", dataset, "--output-dir", out, "--scheduler", "sync",
                    "--label", "viral", "--report", report_file, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "merged 6, skipped 0, failed 0" in result.output
    assert str(out) in result.output

    report = json.loads(report_file.read_text())
    assert report["counts"] == {"merged": 6, "skipped": 0, "failed": 0}
    assert isinstance(report["seconds"], float) and report["unpaired"] == []
    first = report["pairs"][0]
    assert {"name", "status", "rows", "error"} <= first.keys()
    assert (first["name"], first["status"], first["rows"], first["error"]) == (
        "output_0", "merged", 20, None)
    merged = torch.load(out / "output_0_merged.pt")
    assert merged["labels"] == [1]
    expected = reference_merge(dataset / "output_0_DNABERT_S.pt", dataset / "output_0_ESM.pt")
    assert torch.equal(merged["data"], expected["data"])


def test_rerun_lists_skipped_pairs_in_the_report(dataset, tmp_path):
    args = ["run", "--nucleotide-dir", dataset, "--output-dir", tmp_path / "out",
            "--scheduler", "sync", "--no-progress", "--report", tmp_path / "r.json"]
    assert invoke(*args).exit_code == 0
    assert invoke(*args).exit_code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["counts"] == {"merged": 0, "skipped": 6, "failed": 0}
    assert [p["status"] for p in report["pairs"]] == ["skipped"] * 6
    assert all(p["rows"] is None and p["error"] is None for p in report["pairs"])


def test_a_failed_pair_exits_1_and_the_summary_names_it(dataset, tmp_path):
    broken = dataset / "output_3_DNABERT_S.pt"
    broken.write_bytes(b"not a torch file")
    result = invoke("run", "--nucleotide-dir", dataset, "--output-dir", tmp_path / "out",
                    "--scheduler", "sync", "--no-progress", "--report", tmp_path / "r.json")
    assert result.exit_code == 1
    assert "FAILED output_3" in result.output and str(broken) in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["counts"] == {"merged": 5, "skipped": 0, "failed": 1}
    assert str(broken) in next(p["error"] for p in report["pairs"] if p["status"] == "failed")


def test_dry_run_prints_the_plan_and_merges_nothing(dataset, tmp_path):
    (dataset / "output_5_ESM.pt").unlink()
    result = invoke("run", "--nucleotide-dir", dataset, "--output-dir", tmp_path / "out",
                    "--dry-run")
    assert result.exit_code == 0
    assert result.output.count("pending") == 5
    assert "no partner" in result.output and "output_5_DNABERT_S.pt" in result.output
    assert not list((tmp_path / "out").glob("*_merged.pt"))


@pytest.mark.parametrize("args, message", [
    (["--nucleotide-dir", "{tmp}/missing", "--output-dir", "{tmp}/out"], "{tmp}/missing"),
    (["--nucleotide-dir", "{tmp}", "--output-dir", "{tmp}/out"], "no pairs found"),
    (["--nucleotide-dir", "{data}", "--output-dir", "{tmp}/out", "--label", "alien"], "'alien'"),
    (["--nucleotide-dir", "{data}", "--output-dir", "{tmp}/out", "--scheduler", "tcp://127.0.0.1:1"],
     "cannot reach a Dask scheduler at tcp://127.0.0.1:1"),
    (["--nucleotide-dir", "{data}", "--output-dir", "{tmp}/out", "--performance-report", "p.html"],
     "--performance-report needs a cluster"),
    (["--nucleotide-dir", "{data}", "--output-dir", "{tmp}/out", "--report", "{tmp}/nowhere/r.json"],
     "cannot write {tmp}/nowhere/r.json: folder {tmp}/nowhere does not exist"),
    (["--nucleotide-dir", "{data}", "--output-dir", "{tmp}/out", "--label", "9" * 30],
     "does not fit in 64 bits"),
    (["--nucleotide-dir", "{data}", "--output-dir", "{tmp}/out", "--label", "9" * 5000],
     "does not fit in 64 bits"),  # int() refuses 4,300 digits, in its own words
    (["--nucleotide-dir", "{data}", "--output-dir", "{tmp}/out", "--scheduler", "bogus"],
     "unknown scheduler 'bogus'"),
    (["--nucleotide-dir", "{data}", "--output-dir", "{tmp}/out", "--scheduler-file", "{tmp}/none.json"],
     "scheduler file {tmp}/none.json does not exist"),  # distributed waited for it forever
    (["--nucleotide-dir", "{data}", "--output-dir", "{tmp}/out", "--scheduler-file", "{tmp}/empty.json"],
     "cannot reach a Dask scheduler at {tmp}/empty.json"),  # was an AssertionError traceback
])
def test_configuration_errors_exit_2_with_one_clear_line(dataset, tmp_path, args, message):
    fill = {"tmp": tmp_path, "data": dataset}
    (tmp_path / "empty.json").write_text("{}")
    result = invoke("run", *[a.format(**fill) for a in args], "--no-progress")
    assert result.exit_code == 2
    assert message.format(**fill) in result.output
    assert "Traceback" not in result.output
    assert not list(tmp_path.glob("out/*_merged.pt"))  # found out before any work


def test_sample_writes_upstream_layouts_that_torch_loads(tmp_path):
    result = invoke("sample", "--dir", tmp_path / "s", "--pairs", 2, "--rows", 7, "--seed", 3,
                    "--nucleotide-width", 5, "--protein-width", 9)
    assert result.exit_code == 0, result.output
    nucleotide = torch.load(tmp_path / "s" / "output_1_DNABERT_S.pt")
    protein = torch.load(tmp_path / "s" / "output_1_ESM.pt")
    assert len(nucleotide["data"][0]["mean_representation"]) == 5
    assert protein["data"][0].shape == (9,) and protein["data"][0].dtype == torch.float32
    assert set(protein["proteins"]) != set(nucleotide["nucleotide"])  # ids on one side only
    shared = [i for i in nucleotide["nucleotide"] if i in set(protein["proteins"])]
    assert shared != [i for i in protein["proteins"] if i in set(shared)]  # another order


def test_module_entry_point_and_console_script_agree(tmp_path):
    by_module = subprocess.run([sys.executable, "-m", "dask_merge", "--help"],
                               capture_output=True, text=True, timeout=60)
    assert by_module.returncode == 0 and "run" in by_module.stdout and "demo" in by_module.stdout


def test_demo_merges_a_sample_on_the_processes_scheduler(tmp_path):
    result = invoke("demo", "--dir", tmp_path / "demo", "--pairs", 3, "--rows", 50)
    assert result.exit_code == 0, result.output
    assert "merged 3, skipped 0, failed 0" in result.output
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["scheduler"] == "processes" and report["counts"]["merged"] == 3
    again = invoke("demo", "--dir", tmp_path / "demo")
    assert "merged 0, skipped 3, failed 0" in again.output


# Run in a fresh interpreter: did the fork server start, and was it up before
# the engine (and with it Dask) was imported?  _forkserver_pid is CPython's.
_WATCH_THE_FORK_SERVER = """
import json, sys
from multiprocessing import forkserver
from dask_merge.cli import main

seen = {}

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "dask_merge.engine":
            seen["up_before_engine"] = forkserver._forkserver._forkserver_pid is not None

sys.meta_path.insert(0, Watch())
try:
    main(sys.argv[1:])
except SystemExit as end:
    seen["exit"] = end.code
seen["started"] = forkserver._forkserver._forkserver_pid is not None
print(json.dumps(seen))
"""


@pytest.mark.parametrize("extra, started", [
    ((), True), (("--dry-run",), False), (("--scheduler", "sync"), False)])
def test_run_starts_the_pool_before_importing_the_engine(dataset, tmp_path, extra, started):
    # Its imports (~0.2 s of one core) overlap the engine's import and the planning.
    done = subprocess.run(
        [sys.executable, "-c", _WATCH_THE_FORK_SERVER, "run", "--nucleotide-dir", str(dataset),
         "--output-dir", str(tmp_path / "out"), "--no-progress", *extra],
        capture_output=True, text=True, timeout=120, check=False)
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"up_before_engine": started, "exit": 0, "started": started}, done.stderr
    assert len(list((tmp_path / "out").glob("*_merged.pt"))) == (0 if "--dry-run" in extra else 6)
