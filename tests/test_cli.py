"""The dask-merge command: its flags, JSON report and exit codes (a stable contract)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dask_merge.cli import main
from dask_merge.testing import reference_merge

SCRIPTS = Path(__file__).parent / "scripts"


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_results_go_to_stdout_progress_and_warnings_to_stderr(dataset, tmp_path):
    result = invoke("run", "--nucleotide-dir", dataset, "--output-dir", tmp_path / "out",
                    "--scheduler", "sync")
    assert result.exit_code == 0, result.output
    assert "merged 6, skipped 0, failed 0" in result.stdout and "outputs in" in result.stdout
    assert "pairs to merge" in result.stderr and "Completed" in result.stderr
    assert "pairs to merge" not in result.stdout and "Completed" not in result.stdout


def test_report_dash_writes_the_json_alone_to_stdout(dataset, tmp_path):
    result = invoke("run", "--nucleotide-dir", dataset, "--output-dir", tmp_path / "out",
                    "--scheduler", "sync", "--report", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["counts"] == {"merged": 6, "skipped": 0, "failed": 0}
    assert "merged 6, skipped 0, failed 0" in result.stderr and not (tmp_path / "-").exists()


def half_overlapping(dataset, protein_dir):
    """A protein folder whose files hold 4 of the right ids, and 16 of another chunk's."""
    from dask_merge.testing import make_pair

    protein_dir.mkdir()
    for stem in ("output_0", "output_1"):
        right = torch.load(dataset / f"{stem}_ESM.pt")
        nucleotide_ids = set(torch.load(dataset / f"{stem}_DNABERT_S.pt")["nucleotide"])
        kept = [i for i, seq_id in enumerate(right["proteins"]) if seq_id in nucleotide_ids][:4]
        (tmp := protein_dir / "other").mkdir(exist_ok=True)
        wrong = make_pair(tmp, "other", rows=16, nucleotide_width=12,
                          protein_width=20)
        other = torch.load(wrong.protein)
        torch.save({"proteins": [right["proteins"][i] for i in kept] + other["proteins"],
                    "data": [right["data"][i] for i in kept] + other["data"]},
                   protein_dir / f"{stem}_ESM.pt")
        for path in tmp.iterdir():
            path.unlink()


def test_pairs_that_drop_many_ids_are_counted_and_warned_about(dataset, tmp_path):
    half_overlapping(dataset, tmp_path / "esm")
    result = invoke("run", "--nucleotide-dir", dataset, "--protein-dir", tmp_path / "esm",
                    "--output-dir", tmp_path / "out", "--scheduler", "sync", "--no-progress")
    assert result.exit_code == 0, result.output  # merged, as asked, but loudly
    assert "merged 2, skipped 0, failed 0" in result.stdout
    assert "ids dropped: 34 nucleotide ids without a protein vector (worst: output_" in result.stdout
    assert "2 merged pairs drop more than 10% of their nucleotide ids" in result.stderr
    assert "2 merged pairs drop more than 10% of their protein ids" in result.stderr


def test_max_dropped_fails_such_pairs_before_writing_them(dataset, tmp_path):
    half_overlapping(dataset, tmp_path / "esm")
    result = invoke("run", "--nucleotide-dir", dataset, "--protein-dir", tmp_path / "esm",
                    "--output-dir", tmp_path / "out", "--scheduler", "sync", "--no-progress",
                    "--max-dropped", "0.1", "--report", tmp_path / "r.json")
    assert result.exit_code == 1, result.output
    assert "FAILED output_0" in result.stdout and "more than max_dropped=0.1 allows" in result.stdout
    assert not list((tmp_path / "out").glob("*_merged.pt"))
    failed = json.loads((tmp_path / "r.json").read_text())["pairs"][0]
    assert failed["status"] == "failed" and "of its 21 ids" in failed["error"]


def test_folders_given_as_arguments_are_told_to_be_options(dataset, tmp_path):
    result = invoke("run", dataset, tmp_path / "out")
    assert result.exit_code == 2
    assert "folders are given as options, not as arguments" in result.output
    assert "--nucleotide-dir DIR" in result.output


def test_no_pairs_says_what_each_folder_holds(dataset, tmp_path):
    esm = tmp_path / "esm"
    esm.mkdir()
    for protein in dataset.glob("*_ESM.pt"):
        protein.rename(esm / protein.name)
    # The folders swapped: ESM files given as nucleotide folder and the other way round.
    result = invoke("run", "--nucleotide-dir", esm, "--protein-dir", dataset,
                    "--output-dir", tmp_path / "out")
    assert result.exit_code == 2
    assert f"{esm} holds 0 STEM_DNABERT_S.pt, 6 STEM_ESM.pt" in result.output
    assert "were --nucleotide-dir and --protein-dir swapped?" in result.output


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
     "a performance report needs a cluster"),
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
    assert "merged 3, skipped 0, failed 0" in result.stdout
    assert "100% Completed" in result.stderr  # a progress bar, however quick the run
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["scheduler"] == "processes" and report["counts"]["merged"] == 3
    again = invoke("demo", "--dir", tmp_path / "demo")
    assert "merged 0, skipped 3, failed 0" in again.output


def watch_the_fork_server(*args) -> dict:
    """``dask-merge run ARGS`` in a fresh interpreter: what it started (tests/scripts)."""
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "watch_fork_server.py"), "run", "--no-progress", *args],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("extra, seen", [
    ((), {"dask_up": True, "started": True}),
    (("--dry-run",), {"started": False}),  # Dask is not even imported
    (("--scheduler", "sync"), {"dask_up": False, "started": False})])
def test_run_starts_the_pool_before_importing_dask(dataset, tmp_path, extra, seen):
    # Its imports (~0.2 s of one core) overlap those of Dask.
    out = tmp_path / "out"
    found = watch_the_fork_server("--nucleotide-dir", str(dataset), "--output-dir", str(out), *extra)
    assert {k: v for k, v in found.items() if k in ("dask_up", "started")} == seen
    assert found["exit"] == 0
    assert len(list(out.glob("*_merged.pt"))) == (0 if "--dry-run" in extra else 6)


def test_a_rerun_with_nothing_pending_starts_nothing(dataset, tmp_path):
    out = tmp_path / "out"
    assert invoke("run", "--nucleotide-dir", dataset, "--output-dir", out,
                  "--no-progress").exit_code == 0
    found = watch_the_fork_server("--nucleotide-dir", str(dataset), "--output-dir", str(out))
    # No fork server, no pool, no worker; not even Dask imported.
    assert found == {"exit": 0, "started": False, "children": []}
