"""Planning, the checkpoint filter, records, every executor."""

from __future__ import annotations

import os
import pickle
import re
import shutil

import numpy as np
import pytest
import torch

import dask_merge
from dask_merge import Record, Report
from dask_merge.executors import _partitions
from dask_merge.pairs import Pair
from dask_merge.testing import make_dataset, make_pair, reference_merge


def merged_outputs(folder) -> dict[str, dict]:
    return {p.name: torch.load(p) for p in sorted(folder.glob("*_merged.pt"))}


def assert_matches_reference(dataset, output_dir, label=None):
    outputs = merged_outputs(output_dir)
    assert outputs, "no output written"
    for name, merged in outputs.items():
        stem = name.removesuffix("_merged.pt")
        expected = reference_merge(dataset / f"{stem}_DNABERT_S.pt", dataset / f"{stem}_ESM.pt",
                                   label=label)
        assert merged["ids"] == expected["ids"]
        assert torch.equal(merged["data"], expected["data"])
        assert merged.get("labels") == expected.get("labels")


def test_sync_run_merges_every_pair_like_the_reference(dataset, tmp_path):
    report = dask_merge.run(dataset, output_dir=tmp_path / "out", scheduler="sync",
                            label="host", progress=False)
    assert report.counts == {"merged": 6, "skipped": 0, "failed": 0}
    assert [r.name for r in report.records] == [f"output_{i}" for i in range(6)]
    assert all(r.rows == 20 and r.nucleotide_only == 1 and r.protein_only == 1
               for r in report.records)
    assert report.records[0].nucleotide_only_examples == ["output_0_no_orf_0"]
    assert_matches_reference(dataset, tmp_path / "out", label="host")


@pytest.mark.parametrize("scheduler", ["sync", "threads", "processes", "local"])
def test_every_scheduler_gives_identical_outputs(dataset, tmp_path, scheduler):
    reference = tmp_path / "reference"
    dask_merge.run(dataset, output_dir=reference, scheduler="sync", progress=False)
    report = dask_merge.run(dataset, output_dir=tmp_path / scheduler, scheduler=scheduler,
                            workers=2, progress=False, dashboard_address="127.0.0.1:0")
    assert report.ok and report.counts["merged"] == 6
    ours, theirs = merged_outputs(tmp_path / scheduler), merged_outputs(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name]["ids"] == theirs[name]["ids"]
        assert torch.equal(ours[name]["data"], theirs[name]["data"])


def test_rerun_skips_everything_and_skipped_pairs_never_reach_a_worker(dataset, tmp_path):
    out = tmp_path / "out"
    dask_merge.run(dataset, output_dir=out, scheduler="sync", progress=False)
    again = dask_merge.plan(dataset, output_dir=out)
    assert again.pending == [] and len(again.done) == 6
    report = again.execute("processes", progress=False)
    assert report.counts == {"merged": 0, "skipped": 6, "failed": 0}
    assert {r.reason for r in report.records} == {"up to date"}


@pytest.mark.parametrize("force", [False, True])
def test_a_plan_executed_again_skips_what_it_merged_unless_forced(dataset, tmp_path, force):
    # In a notebook, re-running the cell with execute() must resume, not redo.
    job = dask_merge.plan(dataset, output_dir=tmp_path / "out", force=force)
    first = job.execute("sync", progress=False)
    again = job.execute("sync", progress=False)
    assert first.counts["merged"] == len(job.pending) > 0
    if force:
        assert again.counts == first.counts
    else:
        assert again.counts == {"merged": 0, "skipped": len(job.pending), "failed": 0}
        assert {r.reason for r in again.records} == {"up to date"}
        done = dask_merge.plan(dataset, output_dir=tmp_path / "out")
        os.remove(done.done[0][0].output)  # checkpointed when planned, gone since
        assert done.execute("sync", progress=False).counts["merged"] == 1
    assert repr(job).startswith(f"<Plan: {len(job.pending)} pending")  # the plan is unchanged


def test_resume_redoes_only_a_deleted_output_and_a_regenerated_input(dataset, tmp_path):
    out = tmp_path / "out"
    dask_merge.run(dataset, output_dir=out, scheduler="sync", progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*_merged.pt")}
    (out / "output_1_merged.pt").unlink()
    make_pair(dataset, "output_4", rows=20, nucleotide_width=12, protein_width=20, seed=99)

    report = dask_merge.run(dataset, output_dir=out, scheduler="sync", progress=False)
    merged = {r.name for r in report.records if r.status == "merged"}
    assert merged == {"output_1", "output_4"}
    assert report.counts["skipped"] == 4
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*_merged.pt")}
    untouched = set(before) - {"output_1_merged.pt", "output_4_merged.pt"}
    assert all(after[name] == before[name] for name in untouched)
    assert_matches_reference(dataset, out)


def test_force_and_a_changed_label_redo_pairs(dataset, tmp_path):
    out = tmp_path / "out"
    dask_merge.run(dataset, output_dir=out, scheduler="sync", progress=False)
    relabelled = dask_merge.plan(dataset, output_dir=out, label="viral")
    assert len(relabelled.pending) == 6
    state = dask_merge.checkpoint_state(relabelled.pending[0], label="viral")
    assert not state.done and "label changed" in state.reason
    assert relabelled.execute("sync", progress=False).counts["merged"] == 6
    assert torch.load(out / "output_0_merged.pt")["labels"] == [1]
    forced = dask_merge.plan(dataset, output_dir=out, label="viral", force=True)
    assert len(forced.pending) == 6


def test_bad_pairs_fail_alone_with_the_kernel_message(tmp_path):
    features = tmp_path / "features"
    make_dataset(features, pairs=8, rows=10, nucleotide_width=4, protein_width=6)
    truncated = features / "output_8_ESM.pt"
    make_pair(features, "output_8", rows=10, nucleotide_width=4, protein_width=6)
    truncated.write_bytes(truncated.read_bytes()[:300])
    make_pair(features, "output_9", rows=5, nucleotide_width=4, protein_width=6)
    other = make_pair(tmp_path, "other", rows=5, nucleotide_width=4, protein_width=6)
    shutil.copy(other.protein, features / "output_9_ESM.pt")  # ids from another chunk

    report = dask_merge.run(features, output_dir=tmp_path / "out", scheduler="processes",
                            workers=2, progress=False)
    assert report.counts == {"merged": 8, "skipped": 0, "failed": 2}
    failed = {r.name: r.error for r in report.failures}
    assert str(truncated) in failed["output_8"]
    assert "share no sequence id" in failed["output_9"]
    assert len(list((tmp_path / "out").glob("*_merged.pt"))) == 8
    assert not (tmp_path / "out" / "output_8_merged.pt").exists()


def _holds_only_small_plain_values(value) -> bool:
    if isinstance(value, (str, int, float, type(None))):
        return True
    if isinstance(value, (list, tuple)):
        return all(_holds_only_small_plain_values(v) for v in value)
    if isinstance(value, dict):
        return all(_holds_only_small_plain_values(v) for v in value.values())
    return False


def test_the_client_receives_small_records_not_tensors(tmp_path):
    features = tmp_path / "features"
    make_dataset(features, pairs=3, rows=300)  # real widths: 3 MB of floats per pair
    report = dask_merge.run(features, output_dir=tmp_path / "out", scheduler="processes",
                            workers=2, progress=False)
    assert report.ok
    for record in report.records:
        assert type(record) is Record
        assert _holds_only_small_plain_values(record.to_dict())
        assert len(pickle.dumps(record)) < 2_000


def test_tiny_pairs_are_batched(tmp_path):
    pair = make_pair(tmp_path, "tiny", rows=2, nucleotide_width=2, protein_width=2)
    tiny = [Pair(f"p{i}", str(pair.nucleotide), str(pair.protein), f"o{i}") for i in range(400)]
    batches = _partitions(tiny, None, workers=2)
    assert len(batches) == 8 and sorted(map(len, batches)) == [50] * 8  # four tasks per worker
    assert sorted(p for part in batches for p in part) == sorted(tiny)
    big = make_pair(tmp_path, "big", rows=2000)  # ~22 MB of input
    pairs = [Pair(f"b{i}", str(big.nucleotide), str(big.protein), f"o{i}") for i in range(40)]
    assert {len(part) for part in _partitions(pairs, None, workers=2)} == {1}
    assert tiny[:7] in _partitions(tiny, 7, workers=2)


def test_the_pool_runs_merge_tasks_and_nothing_else(tmp_path):
    # bag.compute would add a task that ships every record to a worker and
    # back, to join them into a list the engine does not use.
    from dask.callbacks import Callback
    from dask.utils import key_split

    make_dataset(tmp_path / "features", pairs=6, rows=5, nucleotide_width=3, protein_width=4)
    keys = []
    with Callback(posttask=lambda key, result, dsk, state, worker_id: keys.append(key)):
        report = dask_merge.run(tmp_path / "features", output_dir=tmp_path / "out",
                                scheduler="processes", workers=2, progress=False)
    assert report.counts["merged"] == 6
    assert keys and {key_split(key) for key in keys} == {"merge-pair"}, keys  # named for the dashboard


def test_configuration_errors_name_the_path(tmp_path):
    with pytest.raises(dask_merge.ConfigurationError, match="nope"):
        dask_merge.plan(tmp_path / "nope", output_dir=tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(dask_merge.ConfigurationError, match="no pairs found"):
        dask_merge.plan(tmp_path / "empty", output_dir=tmp_path / "out")
    make_pair(tmp_path / "empty", "x", rows=1, nucleotide_width=1, protein_width=1)
    with pytest.raises(dask_merge.ConfigurationError, match="'martian'"):
        dask_merge.plan(tmp_path / "empty", output_dir=tmp_path / "out", label="martian")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(dask_merge.ConfigurationError, match=str(blocker)):
        dask_merge.plan(tmp_path / "empty", output_dir=blocker / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".dask-merge").write_text("a file where the records go")
    with pytest.raises(dask_merge.ConfigurationError, match=r"out/\.dask-merge is not a folder"):
        dask_merge.plan(tmp_path / "empty", output_dir=tmp_path / "out")


@pytest.mark.parametrize("options, message", [
    ({"workers": 0}, "workers must be an int of at least 1 (or None), not 0"),
    ({"workers": -1, "scheduler": "local"}, "not -1"),  # LocalCluster(n_workers=-1) hung
    ({"workers": 2.5}, "not 2.5"),
    ({"workers": "2"}, "not '2'"),
    ({"partition_size": 0}, "partition_size must be an int of at least 1 (or None), not 0"),
    ({"retries": None}, "retries must be an int of at least 0, not None"),
    ({"retries": -1}, "not -1"),
    ({"progress": "no"}, "progress must be True or False, not 'no'"),
    ({"scheduler": None}, "unknown scheduler None"),  # Dask's default cluster, unasked
    ({"scheduler": "thread"}, "unknown scheduler 'thread'"),
    ({"client": "tcp://127.0.0.1:8786"}, "client must be a distributed.Client, not a str"),
])
def test_bad_execute_options_are_refused_before_any_work(tmp_path, options, message):
    make_pair(tmp_path, "p", rows=2, nucleotide_width=2, protein_width=2)
    job = dask_merge.plan(tmp_path, output_dir=tmp_path / "out")
    options = {"scheduler": "sync", "progress": False, **options}
    with pytest.raises(dask_merge.ConfigurationError) as info:
        job.execute(**options)
    assert message in str(info.value)
    assert not list((tmp_path / "out").glob("*_merged.pt"))


@pytest.mark.parametrize("scheduler", ["sync", "local"])
def test_numpy_integers_are_taken_for_counts_and_labels(tmp_path, scheduler):
    # distributed asserts Python ints: retries=np.int64(1) failed every pair on a cluster.
    make_pair(tmp_path, "p", rows=2, nucleotide_width=2, protein_width=2)
    job = dask_merge.plan(tmp_path, output_dir=tmp_path / "out", label=np.int64(3))
    report = job.execute(scheduler, workers=np.int64(1), partition_size=np.int32(1),
                         retries=np.int8(1), progress=False, dashboard_address="127.0.0.1:0")
    assert report.counts["merged"] == 1
    assert torch.load(tmp_path / "out" / "p_merged.pt")["labels"] == [3]


def test_force_must_be_a_bool(tmp_path):
    make_pair(tmp_path, "p", rows=2, nucleotide_width=2, protein_width=2)
    with pytest.raises(dask_merge.ConfigurationError, match="force must be True or False, not 'no'"):
        dask_merge.plan(tmp_path, output_dir=tmp_path / "out", force="no")  # would force


def test_run_refuses_an_unknown_option_before_making_the_output_folder(tmp_path):
    make_pair(tmp_path, "p", rows=2, nucleotide_width=2, protein_width=2)
    with pytest.raises(TypeError, match="unexpected option 'worker'; did you mean 'workers'"):
        dask_merge.run(tmp_path, output_dir=tmp_path / "out", worker=2)
    with pytest.raises(dask_merge.ConfigurationError, match="workers must be"):
        dask_merge.run(tmp_path, output_dir=tmp_path / "out", workers=0)
    assert not (tmp_path / "out").exists()


def test_unpaired_files_are_reported_and_protein_folder_may_differ(tmp_path):
    make_dataset(tmp_path / "nuc", pairs=3, rows=4, nucleotide_width=3, protein_width=5,
                 protein_folder=tmp_path / "prot")
    os.remove(tmp_path / "prot" / "output_1_ESM.pt")
    report = dask_merge.run(tmp_path / "nuc", tmp_path / "prot", tmp_path / "out",
                            scheduler="sync", progress=False)
    assert [r.name for r in report.records] == ["output_0", "output_2"]
    assert report.unpaired == [str(tmp_path / "nuc" / "output_1_DNABERT_S.pt")]
    assert report.to_dict()["unpaired"] == report.unpaired


def test_cleaning_up_temporaries_removes_nothing_else(tmp_path):
    # Outputs next to the inputs: a run removes dead writers' temporaries from
    # that folder.  Names that merely hold the mark are the user's; they once
    # went too, inputs included, and their pair vanished from the report.
    make_pair(tmp_path, "x.dask-merge-tmp-y", rows=3, nucleotide_width=2, protein_width=3)
    notes = tmp_path / "notes.dask-merge-tmp-keep.txt"
    notes.write_text("mine")
    stale = tmp_path / f".x_merged.pt.dask-merge-tmp-{'ab' * 16}"  # a killed writer's
    stale.write_bytes(b"half")
    lookalike = tmp_path / f".y_merged.pt.dask-merge-tmp-{'cd' * 16}"  # but a folder
    lookalike.mkdir()
    report = dask_merge.run(tmp_path, output_dir=tmp_path, scheduler="sync", progress=False)
    assert [(r.name, r.status) for r in report.records] == [("x.dask-merge-tmp-y", "merged")]
    assert (tmp_path / "x.dask-merge-tmp-y_DNABERT_S.pt").exists()
    assert (tmp_path / "x.dask-merge-tmp-y_ESM.pt").exists()
    assert notes.read_text() == "mine" and lookalike.is_dir()
    assert not stale.exists()


def test_long_stems_merge_or_fail_without_leaving_an_output_a_rerun_would_skip(tmp_path):
    # File names hold at most 255 bytes.  A temporary's name adds 49 to its
    # output's: cut short, the 230-byte stem merges.  A record's adds 5: the
    # 242-byte stem (its inputs' names are 255 bytes long) has no room for its
    # record, and its output, without one, would count as made elsewhere: done.
    for stem in ("l" * 230, "m" * 242):
        make_pair(tmp_path, stem, rows=3, nucleotide_width=2, protein_width=3)
    first = dask_merge.run(tmp_path, output_dir=tmp_path / "out", scheduler="sync", progress=False)
    status = {r.name[0]: r.status for r in first.records}
    assert status == {"l": "merged", "m": "failed"}, first.failures
    assert "File name too long" in first.failures[0].error
    assert sorted(p.name[0] for p in (tmp_path / "out").iterdir()) == [".", "l"]  # records, l's output
    again = dask_merge.run(tmp_path, output_dir=tmp_path / "out", scheduler="sync", progress=False)
    assert {r.name[0]: r.status for r in again.records} == {"l": "skipped", "m": "failed"}


def test_a_file_name_that_is_not_utf8_merges_and_is_checkpointed(tmp_path):
    # Linux file names are bytes; Python gives undecodable ones as surrogates,
    # which no archive member name can hold (torch.save cannot write them).
    (tmp_path / "in").mkdir()
    pair = make_pair(tmp_path / "in", "tmp", rows=3, nucleotide_width=2, protein_width=3)
    stem = os.fsdecode(b"sample_\xff")
    for path, suffix in ((pair.nucleotide, "_DNABERT_S.pt"), (pair.protein, "_ESM.pt")):
        os.replace(path, tmp_path / "in" / f"{stem}{suffix}")
    first = dask_merge.run(tmp_path / "in", output_dir=tmp_path / "out", scheduler="sync",
                           progress=False)
    assert first.counts == {"merged": 1, "skipped": 0, "failed": 0}, first.failures
    merged = torch.load(tmp_path / "out" / f"{stem}_merged.pt", weights_only=True)
    want = reference_merge(tmp_path / "in" / f"{stem}_DNABERT_S.pt", tmp_path / "in" / f"{stem}_ESM.pt")
    assert merged["ids"] == want["ids"] and torch.equal(merged["data"], want["data"])
    again = dask_merge.run(tmp_path / "in", output_dir=tmp_path / "out", scheduler="sync",
                           progress=False)
    assert again.counts == {"merged": 0, "skipped": 1, "failed": 0}


def test_plan_and_report_have_short_reprs(tmp_path):
    features = tmp_path / "features"
    make_dataset(features, pairs=4, rows=5, nucleotide_width=3, protein_width=4)
    os.remove(features / "output_3_ESM.pt")
    out = tmp_path / "out"
    dask_merge.run(features, output_dir=out, scheduler="sync", progress=False)
    os.remove(out / "output_0_merged.pt")
    job = dask_merge.plan(features, output_dir=out)
    assert repr(job) == f"<Plan: 1 pending, 2 checkpointed, 1 without a partner -> {out}>"
    report = job.execute("sync", progress=False)
    assert re.fullmatch(r"<Report: merged 1, skipped 2, failed 0 in \d+\.\d s on sync>", repr(report))
    assert "\n" not in repr(job) + repr(report)


def test_html_reprs_are_escaped_valid_utf8_and_bounded(tmp_path):
    make_pair(tmp_path, "p", rows=2, nucleotide_width=2, protein_width=2)
    odd = os.fsdecode(b"<img src=x onerror=alert(1)>\xff")  # a name holds no "/"
    for name in [odd] + [f"lone{i}" for i in range(201)]:
        open(tmp_path / f"{name}_DNABERT_S.pt", "wb").close()
    job = dask_merge.plan(tmp_path, output_dir=tmp_path / "out")
    report = Report([Record("p", "failed", error=f"{odd} is bad")], [], 1.0, "<b>sync</b>")
    for shown in (job._repr_html_(), report._repr_html_()):
        shown.encode("utf-8")  # a lone surrogate would fail here, and in Jupyter
        assert "<img" not in shown and "&lt;img src=x onerror=alert(1)&gt;\\udcff" in shown
    assert "<b>sync</b>" not in report._repr_html_()
    assert job._repr_html_().endswith("<p>... 3 more</p>")  # 1 pending + 202 without a partner
