"""Pairs from anywhere: plan_pairs, the --pairs file, other suffixes, to_bag, to_dataframe."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import dask
import dask.array as da
import pytest
import torch
from click.testing import CliRunner

import dask_merge
from dask_merge import ConfigurationError, Pair, plan_pairs
from dask_merge.cli import main
from dask_merge.checkpoints import record_path
from dask_merge.testing import make_pair, reference_merge


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_merged_like_reference(output: Path, nucleotide: Path, protein: Path, label=None):
    merged = torch.load(output)
    expected = reference_merge(nucleotide, protein, label=label)
    assert merged["ids"] == expected["ids"]
    assert torch.equal(merged["data"], expected["data"])
    assert merged.get("labels") == expected.get("labels")


def small_pair(folder: Path, stem: str, **options):
    folder.mkdir(parents=True, exist_ok=True)
    if "protein_folder" in options:
        options["protein_folder"].mkdir(parents=True, exist_ok=True)
    return make_pair(folder, stem, rows=8, nucleotide_width=4, protein_width=6,
                     nucleotide_only=1, **options)


def renamed(path: Path, name: str) -> Path:
    """``path`` moved to ``name`` in the same folder."""
    return path.rename(path.with_name(name))


# --- naming ------------------------------------------------------------------------


def test_outputs_are_named_after_the_nucleotide_file_and_pairs_after_their_output(tmp_path):
    inputs = tmp_path / "in"
    a = small_pair(inputs, "output_7")  # the VirNucPro names: as in folder mode
    b = small_pair(inputs, "b")
    b_nucleotide = renamed(Path(b.nucleotide), "file_0_DNABERT.pt")  # the fork's test names
    b_protein = renamed(Path(b.protein), "file_0_ESM.pt")
    c = small_pair(inputs, "c")
    own = tmp_path / "elsewhere" / "chunk_c.pt"

    job = plan_pairs(iter([(Path(a.nucleotide), Path(a.protein)),  # any iterable, Paths too
                           [str(b_nucleotide), str(b_protein)],
                           (c.nucleotide, c.protein, own)]),
                     tmp_path / "out", label="viral")
    assert [(p.name, p.output) for p in job.pending] == [
        ("output_7", str(tmp_path / "out" / "output_7_merged.pt")),
        ("file_0_DNABERT", str(tmp_path / "out" / "file_0_DNABERT_merged.pt")),
        ("chunk_c", str(own)),
    ]
    report = job.execute("sync", progress=False)
    assert [(r.name, r.status) for r in report.records] == [
        ("output_7", "merged"), ("file_0_DNABERT", "merged"), ("chunk_c", "merged")]
    for pair in job.pending:
        assert_merged_like_reference(Path(pair.output), Path(pair.nucleotide), Path(pair.protein),
                                     label="viral")


def test_outputs_of_explicit_pairs_only_need_no_output_dir(tmp_path):
    a = small_pair(tmp_path / "in", "a")
    job = plan_pairs([(a.nucleotide, a.protein, tmp_path / "out" / "a.pt")])
    assert job.output_dir == str(tmp_path / "out")  # the one folder the outputs share
    b = small_pair(tmp_path / "in", "b")
    two = plan_pairs([(a.nucleotide, a.protein, tmp_path / "x" / "a.pt"),
                      (b.nucleotide, b.protein, tmp_path / "y" / "b.pt")])
    assert two.output_dir is None and "several folders" in repr(two)
    assert (tmp_path / "x").is_dir() and (tmp_path / "y").is_dir()


def test_pairs_of_a_plan_can_be_planned_again(dataset, tmp_path):
    found = dask_merge.find_pairs(dataset, output_dir=tmp_path / "out")
    assert plan_pairs(found.pairs).pending == found.pairs


# --- configuration errors: before any work --------------------------------------------


def test_two_pairs_writing_one_output_are_refused_naming_both(tmp_path):
    a = small_pair(tmp_path / "run1", "output_0")
    b = small_pair(tmp_path / "run2", "output_0")
    out = tmp_path / "out"
    with pytest.raises(ConfigurationError) as caught:
        plan_pairs([(a.nucleotide, a.protein), (b.nucleotide, b.protein)], out)
    message = str(caught.value)
    assert str(out / "output_0_merged.pt") in message
    assert str(a.nucleotide) in message and str(b.nucleotide) in message
    assert not out.exists()  # nothing made


def test_one_output_through_a_symlinked_folder_is_still_one_output(tmp_path):
    a = small_pair(tmp_path / "in", "a")
    (tmp_path / "out").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "out")
    with pytest.raises(ConfigurationError, match="two pairs write"):
        plan_pairs([(a.nucleotide, a.protein, tmp_path / "out" / "m.pt"),
                    (a.nucleotide, a.protein, tmp_path / "link" / "m.pt")])


@pytest.mark.parametrize("whose", ["its own", "another pair's"])
def test_an_output_that_is_an_input_is_refused(tmp_path, whose):
    a = small_pair(tmp_path, "a")
    b = small_pair(tmp_path, "b")
    target = a.protein if whose == "its own" else b.nucleotide
    before = Path(target).read_bytes()
    with pytest.raises(ConfigurationError) as caught:
        plan_pairs([(a.nucleotide, a.protein, target), (b.nucleotide, b.protein, tmp_path / "b.pt")])
    assert f"the output {target} of ({a.nucleotide}, {a.protein}) is an input" in str(caught.value)
    assert Path(target).read_bytes() == before


@pytest.mark.parametrize("side", ["nucleotide", "protein"])
def test_a_missing_input_is_refused_naming_it(tmp_path, side):
    a = small_pair(tmp_path, "a")
    missing = getattr(a, side)
    os.unlink(missing)
    with pytest.raises(ConfigurationError, match=f"{side} file {missing} cannot be read"):
        plan_pairs([(a.nucleotide, a.protein)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_folder_as_input_is_refused(tmp_path):
    a = small_pair(tmp_path, "a")
    with pytest.raises(ConfigurationError, match=f"protein file {tmp_path} is not a file"):
        plan_pairs([(a.nucleotide, tmp_path)], tmp_path / "out")


def test_a_pair_without_output_needs_an_output_dir(tmp_path):
    a = small_pair(tmp_path, "a")
    with pytest.raises(ConfigurationError,
                       match=f"pair \\({a.nucleotide}, {a.protein}\\) names no output"):
        plan_pairs([(a.nucleotide, a.protein)])


@pytest.mark.parametrize("spec", ["a_DNABERT_S.pt", ("a_DNABERT_S.pt",), ("a", "b", "c", "d"),
                                  ("a_DNABERT_S.pt", 7), ("a_DNABERT_S.pt", "")])
def test_what_is_not_a_pair_is_refused_naming_it(tmp_path, spec):
    with pytest.raises(ConfigurationError, match=r"pair 0: .* (is not|holds something other)"):
        plan_pairs([spec], tmp_path / "out")


def test_no_pairs_and_bad_options_are_refused(tmp_path):
    with pytest.raises(ConfigurationError, match="no pairs given"):
        plan_pairs([], tmp_path)
    a = small_pair(tmp_path, "a")
    with pytest.raises(ConfigurationError, match="label"):
        plan_pairs([(a.nucleotide, a.protein)], tmp_path, label="viruses")
    with pytest.raises(ConfigurationError, match="force must be True or False"):
        plan_pairs([(a.nucleotide, a.protein)], tmp_path, force="yes")


def test_max_dropped_applies_to_explicit_pairs_and_their_bag(tmp_path):
    a = small_pair(tmp_path, "a")  # one of its 9 nucleotide ids has no protein vector
    with pytest.raises(ConfigurationError, match="max_dropped must be a number from 0 to 1"):
        plan_pairs([(a.nucleotide, a.protein)], tmp_path / "out", max_dropped=2)
    strict = plan_pairs([(a.nucleotide, a.protein)], tmp_path / "out", max_dropped=0.05)
    [record] = strict.to_bag().compute(scheduler="sync")
    assert record["status"] == "failed" and "max_dropped=0.05" in record["error"]
    assert not (tmp_path / "out" / "a_merged.pt").exists()
    report = plan_pairs([(a.nucleotide, a.protein)], tmp_path / "out", max_dropped=0.2).execute(
        "sync", progress=False)
    assert report.counts["merged"] == 1


# --- the same pairs as a folder: the same outputs and checkpoints ---------------------


def folder_tuples(folder: Path) -> list[tuple[str, str]]:
    return [(p.nucleotide, p.protein) for p in dask_merge.find_pairs(folder)]


def test_plan_pairs_writes_what_a_folder_run_writes(dataset, tmp_path):
    by_folder, by_pairs = tmp_path / "folder", tmp_path / "pairs"
    folder = dask_merge.run(dataset, output_dir=by_folder, label="host", scheduler="sync",
                            progress=False)
    pairs = plan_pairs(folder_tuples(dataset), by_pairs, label="host").execute(
        "sync", progress=False)
    assert [r.to_dict() | {"output": None, "seconds": None} for r in folder.records] == [
        r.to_dict() | {"output": None, "seconds": None} for r in pairs.records]
    names = sorted(p.name for p in by_folder.glob("*_merged.pt"))
    assert len(names) == 6 and names == sorted(p.name for p in by_pairs.glob("*_merged.pt"))
    for name in names:
        assert (by_folder / name).read_bytes() == (by_pairs / name).read_bytes()
        records = [json.loads(Path(record_path(str(out / name))).read_text())
                   for out in (by_folder, by_pairs)]
        for record in records:
            del record["output"]  # its mtime
        assert records[0] == records[1]


@pytest.mark.parametrize("first", ["folder", "pairs"])
def test_a_folder_run_and_a_plan_pairs_run_skip_each_others_outputs(dataset, tmp_path, first):
    out = tmp_path / "out"
    by_folder = lambda: dask_merge.plan(dataset, output_dir=out, label="viral")  # noqa: E731
    by_pairs = lambda: plan_pairs(folder_tuples(dataset), out, label="viral")  # noqa: E731
    plans = [by_folder, by_pairs] if first == "folder" else [by_pairs, by_folder]
    report = plans[0]().execute("sync", progress=False)
    assert report.counts["merged"] == 6
    again = plans[1]()
    assert again.pending == []
    assert [(p.name, c.reason) for p, c in again.done] == [
        (f"output_{i}", "up to date") for i in range(6)]
    # a change of label is seen across the two ways of planning, too
    relabelled = plan_pairs(folder_tuples(dataset), out, label="host")
    assert [p.name for p in relabelled.pending] == [f"output_{i}" for i in range(6)]


# --- the --pairs file and the suffixes of folder mode ----------------------------------


def test_pairs_file_with_comments_blank_lines_and_paths_relative_to_it(tmp_path, monkeypatch):
    data = tmp_path / "data"
    a = small_pair(data / "dnabert", "file_0")
    b = small_pair(data / "dnabert", "file_1")
    c = small_pair(data / "dnabert", "file_2")
    for pair in (a, b, c):  # the protein files elsewhere, under other names
        (data / "esm").mkdir(exist_ok=True)
        shutil.move(pair.protein, data / "esm" / Path(pair.protein).name.replace("_ESM", "_esm2"))
    listing = data / "lists" / "pairs.tsv"
    listing.parent.mkdir()
    listing.write_text(
        "# nucleotide\tprotein\t[output]\n"
        "\n"
        "../dnabert/file_0_DNABERT_S.pt\t../esm/file_0_esm2.pt\n"
        "   # an indented comment\n"
        f"{data}/dnabert/file_1_DNABERT_S.pt\t../esm/file_1_esm2.pt\n"
        "../dnabert/file_2_DNABERT_S.pt\t../esm/file_2_esm2.pt\t../custom/two.pt\n"
        "   \n")
    monkeypatch.chdir(tmp_path)  # relative to the file, not to here
    out = tmp_path / "out"
    result = invoke("run", "--pairs", listing, "--output-dir", out, "--scheduler", "sync",
                    "--no-progress", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert [(p["name"], p["status"]) for p in report["pairs"]] == [
        ("file_0", "merged"), ("file_1", "merged"), ("two", "merged")]
    assert_merged_like_reference(out / "file_0_merged.pt", Path(a.nucleotide),
                                 data / "esm" / "file_0_esm2.pt")
    assert_merged_like_reference(data / "custom" / "two.pt", Path(c.nucleotide),
                                 data / "esm" / "file_2_esm2.pt")
    again = invoke("run", "--pairs", listing, "--output-dir", out, "--dry-run")
    assert again.exit_code == 0 and again.output.count("checkpointed  ") == 3


@pytest.mark.parametrize("line, found", [
    ("a_DNABERT_S.pt a_ESM.pt", "found 1 field (are the paths separated by spaces, not tabs?)"),
    ("a_DNABERT_S.pt\ta_ESM.pt\tx.pt\ty.pt", "found 4 fields"),
    ("a_DNABERT_S.pt\t\ta_ESM.pt", "found an empty field"),
])
def test_a_malformed_line_is_a_usage_error_naming_its_number(tmp_path, line, found):
    listing = tmp_path / "pairs.tsv"
    listing.write_text(f"# pairs\n\nok_DNABERT_S.pt\tok_ESM.pt\n{line}\n")
    result = invoke("run", "--pairs", listing, "--output-dir", tmp_path / "out")
    assert result.exit_code == 2
    assert f"{listing}, line 4: expected two or three tab-separated paths" in result.output
    assert found in result.output
    assert not (tmp_path / "out").exists()


def test_pairs_file_errors_and_option_conflicts_exit_2(dataset, tmp_path):
    listing = tmp_path / "pairs.tsv"
    listing.write_text("# nothing\n\n")
    result = invoke("run", "--pairs", listing, "--output-dir", tmp_path / "out")
    assert result.exit_code == 2 and f"pairs file {listing} lists no pair" in result.output
    listing.write_text(f"{dataset}/output_0_DNABERT_S.pt\t{dataset}/output_0_ESM.pt\n")
    cases = [
        (["--pairs", listing], "names no output, and no output folder was given"),
        (["--pairs", listing, "--nucleotide-dir", dataset, "--output-dir", tmp_path],
         "give either --nucleotide-dir (folder mode) or --pairs FILE, not both"),
        (["--output-dir", tmp_path], "give either --nucleotide-dir (folder mode) or --pairs FILE"),
        (["--nucleotide-dir", dataset], "Missing option '--output-dir'"),
        (["--pairs", listing, "--output-dir", tmp_path, "--protein-dir", dataset,
          "--protein-suffix", "_x.pt"], "--protein-dir/--protein-h5, --protein-suffix: for folder mode"),
        (["--pairs", tmp_path / "none.tsv", "--output-dir", tmp_path], "does not exist"),
    ]
    for args, message in cases:
        result = invoke("run", *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)


def test_folder_mode_pairs_other_suffixes_and_keeps_the_output_name(tmp_path):
    nucleotides, proteins = tmp_path / "dnabert", tmp_path / "esm"
    pairs = [small_pair(nucleotides, f"file_{i}", protein_folder=proteins) for i in range(2)]
    for pair in pairs:
        renamed(Path(pair.nucleotide), Path(pair.nucleotide).name.replace("_DNABERT_S", "_DNABERT"))
        renamed(Path(pair.protein), Path(pair.protein).name.replace("_ESM", ".esm2"))
    result = invoke("run", "--nucleotide-dir", nucleotides, "--protein-dir", proteins,
                    "--nucleotide-suffix", "_DNABERT.pt", "--protein-suffix", ".esm2.pt",
                    "--output-dir", tmp_path / "out", "--scheduler", "sync", "--no-progress")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").glob("*.pt")) == [
        "file_0_merged.pt", "file_1_merged.pt"]
    assert_merged_like_reference(tmp_path / "out" / "file_1_merged.pt",
                                 nucleotides / "file_1_DNABERT.pt", proteins / "file_1.esm2.pt")
    job = dask_merge.plan(nucleotides, proteins, tmp_path / "out",
                          nucleotide_suffix="_DNABERT.pt", protein_suffix=".esm2.pt")
    assert [p.name for p, _ in job.done] == ["file_0", "file_1"]
    # the default suffixes find none of these files
    none = invoke("run", "--nucleotide-dir", nucleotides, "--protein-dir", proteins,
                  "--output-dir", tmp_path / "out")
    assert none.exit_code == 2 and "no STEM_DNABERT_S.pt in" in none.output


@pytest.mark.parametrize("suffixes, message", [
    (("_x.pt", "_x.pt"), "both '_x.pt': a file would be its own partner"),
    (("", "_ESM.pt"), "nucleotide suffix must be the non-empty end of a file name, not ''"),
    (("_DNABERT_S.pt", "sub/_ESM.pt"), "protein suffix must be the non-empty end"),
])
def test_suffixes_that_cannot_pair_are_refused(dataset, tmp_path, suffixes, message):
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        dask_merge.plan(dataset, output_dir=tmp_path / "out", nucleotide_suffix=suffixes[0],
                        protein_suffix=suffixes[1])


# --- to_bag: composing with the user's own Dask work -----------------------------------


def is_merged(record: dict) -> bool:
    return record["status"] == "merged"


def shared_rows(nucleotide_file: str) -> int:
    """The rows a merge of this pair keeps, counted from the inputs with torch."""
    nucleotide = torch.load(nucleotide_file, weights_only=True)
    return sum(not i.endswith(("_no_orf_0", "_no_orf_1")) for i in nucleotide["nucleotide"])


def test_to_bag_composes_with_delayed_and_array_work_on_the_processes_scheduler(dataset, tmp_path):
    job = dask_merge.plan(dataset, output_dir=tmp_path / "out", label="viral")
    bag = job.to_bag(partition_size=2)
    assert bag.npartitions == 3 and bag.name.startswith("merge-pair-")
    assert not (tmp_path / "out" / "output_0_merged.pt").exists()  # lazy: nothing done yet

    merged_rows = bag.filter(is_merged).pluck("rows").sum()
    expected_rows = dask.delayed(sum)([dask.delayed(shared_rows)(p.nucleotide)
                                       for p in job.pending])
    ones = da.ones((6, 20), chunks=(2, 20)).sum()  # the same 6 x 20 rows, from an array
    records, rows, expected, array_rows = dask.compute(bag, merged_rows, expected_rows, ones,
                                                       scheduler="processes", num_workers=2)
    # in the order of the tasks, which put the costliest first, not the plan's
    assert sorted(r["name"] for r in records) == [f"output_{i}" for i in range(6)]
    assert {r["status"] for r in records} == {"merged"}
    assert set(records[0]) == set(dask_merge.Record("x", "merged").to_dict())
    assert rows == expected == int(array_rows) == 120
    for pair in job.pending:
        assert_merged_like_reference(Path(pair.output), Path(pair.nucleotide),
                                     Path(pair.protein), label="viral")
    # the checkpoints are written as by execute: a new plan skips them all
    assert dask_merge.plan(dataset, output_dir=tmp_path / "out", label="viral").pending == []


@pytest.mark.cluster
def test_to_bag_on_a_local_cluster_runs_merge_pair_tasks(dataset, tmp_path):
    from distributed import Client, LocalCluster

    job = plan_pairs(folder_tuples(dataset), tmp_path / "out")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        future = client.compute(job.to_bag())
        records = future.result()
        prefixes = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes))
    assert "merge-pair" in prefixes
    assert [r["status"] for r in records] == ["merged"] * 6
    for pair in job.pending:
        assert_merged_like_reference(Path(pair.output), Path(pair.nucleotide), Path(pair.protein))


def test_to_bag_of_a_plan_with_nothing_pending_is_empty(dataset, tmp_path):
    dask_merge.run(dataset, output_dir=tmp_path, scheduler="sync", progress=False)
    bag = dask_merge.plan(dataset, output_dir=tmp_path).to_bag()
    assert bag.compute(scheduler="sync") == []
    with pytest.raises(ConfigurationError, match="partition_size must be an int of at least 1"):
        dask_merge.plan(dataset, output_dir=tmp_path).to_bag(partition_size=0)


# --- Report.to_dataframe ---------------------------------------------------------------


def test_report_to_dataframe_has_one_row_per_pair_and_the_json_keys(dataset, tmp_path):
    (dataset / "output_5_ESM.pt").write_bytes(b"not a torch file")
    dask_merge.run(dataset, output_dir=tmp_path, scheduler="sync", progress=False,
                   partition_size=1)
    (tmp_path / "output_0_merged.pt").unlink()
    os.unlink(record_path(str(tmp_path / "output_0_merged.pt")))
    report = dask_merge.run(dataset, output_dir=tmp_path, scheduler="sync", progress=False)
    frame = report.to_dataframe()
    assert list(frame.columns) == list(report.to_dict()["pairs"][0])
    assert len(frame) == 6
    assert frame.set_index("name")["status"].to_dict() == {
        "output_0": "merged", "output_5": "failed",
        **{f"output_{i}": "skipped" for i in range(1, 5)}}
    assert frame.loc[frame.name == "output_0", "rows"].item() == 20
    assert {str(frame[c].dtype) for c in ("rows", "nucleotide_only", "protein_only")} == {"Int64"}
    assert str(dataset / "output_5_ESM.pt") in frame.loc[frame.name == "output_5", "error"].item()
    # the same values as the JSON report's, missing ones as NaN where pandas makes a column numeric
    as_json = frame.astype(object).where(frame.notna(), None).to_dict("records")
    assert as_json == report.to_dict()["pairs"]


def test_report_to_dataframe_without_pandas_says_how_to_get_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas raises ImportError
    report = dask_merge.Report([dask_merge.Record("a", "merged")], [], 1.0, "sync")
    with pytest.raises(ImportError, match="needs pandas, which is not installed: pip install pandas"):
        report.to_dataframe()
