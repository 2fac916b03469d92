"""dask_merge.check / dask-merge check: every planted fault is found, naming its file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dask_merge
from dask_merge.testing import make_dataset, make_pair


@pytest.fixture
def folders(tmp_path):
    """Six clean merged files (12 + 20 wide) and their inputs."""
    features, merged = tmp_path / "features", tmp_path / "merged"
    make_dataset(features, pairs=6, rows=30, nucleotide_width=12, protein_width=20)
    dask_merge.run(features, output_dir=merged, scheduler="sync", progress=False)
    return features, merged


def _edit(path, change):
    saved = torch.load(path)
    change(saved)
    stat = os.stat(path)
    torch.save(saved, path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a distinct mtime


def _run_check(*args):
    return subprocess.run([sys.executable, "-m", "dask_merge", "check", "--no-progress", *args],
                          capture_output=True, text=True, timeout=300)


def test_a_clean_folder_has_no_findings(folders):
    features, merged = folders
    report = dask_merge.check(merged, features, scheduler="sync", progress=False)
    assert report.ok and report.findings == []
    assert report.counts["files"] == 6 and report.counts["rows"] == 6 * 30
    assert all(f.compared_rows == 30 and f.nucleotide_width == 12 for f in report.files)
    assert json.loads(report.to_json())["ok"] is True
    assert "no findings" in report._repr_html_()


def test_every_planted_fault_is_found_naming_its_file(folders):
    features, merged = folders
    out = {i: str(merged / f"output_{i}_merged.pt") for i in range(6)}

    def nan_and_inf(x):
        x["data"][3, 2] = float("nan")      # nucleotide half
        x["data"][4, 15] = float("nan")     # protein half
        x["data"][5, 20] = float("-inf")

    _edit(out[0], nan_and_inf)
    _edit(out[1], lambda x: x["data"][7].zero_())
    _edit(out[2], lambda x: x["ids"].__setitem__(8, x["ids"][9]))  # an id twice in one file
    shared = torch.load(out[0])["ids"][0]
    _edit(out[3], lambda x: x["ids"].__setitem__(0, shared))         # an id of output_0 too
    data = open(out[4], "rb").read()
    open(out[4], "wb").write(data[: len(data) // 2])                  # truncated
    make_pair(features, "output_5", rows=30, nucleotide_width=12, protein_width=20, seed=99,
              nucleotide_only=1, protein_only=1)                      # inputs changed since

    report = dask_merge.check(merged, features, scheduler="sync", progress=False)
    by_name = {os.path.basename(f.path): f for f in report.files}
    first = by_name["output_0_merged.pt"]
    assert first.nan == {"total": 2, "nucleotide": 1, "protein": 1}
    assert first.inf == {"total": 1, "nucleotide": 0, "protein": 1}
    assert by_name["output_1_merged.pt"].zero_rows == 1
    assert by_name["output_2_merged.pt"].duplicate_ids == 1
    assert report.shared_ids == {shared: [out[0], out[3]]}
    assert "truncated" in by_name["output_4_merged.pt"].error
    assert "nucleotide input changed" in by_name["output_5_merged.pt"].stale
    assert "differ from the merge" in by_name["output_5_merged.pt"].mismatch
    text = "\n".join(report.findings)
    for i, what in [(0, "2 NaN values (1 nucleotide, 1 protein)"), (0, "1 infinite values"),
                    (1, "1 all-zero rows"), (2, "1 ids appear more than once"),
                    (3, "1 ids also in another file"), (4, "does not load"),
                    (5, "stale: "), (5, "rows compared differ")]:
        assert any(line.count(out[i]) and what in line for line in report.findings), (i, what, text)
    assert not report.ok
    counts = report.counts
    assert (counts["nan"], counts["inf"], counts["zero_rows"], counts["duplicate_ids"],
            counts["shared_ids"], counts["unreadable"], counts["stale"]) == (2, 1, 1, 1, 1, 1, 1)
    # Edited files no longer equal their inputs' merge either: found as such.
    assert {os.path.basename(f.path) for f in report.files if f.mismatch} == {
        f"output_{i}_merged.pt" for i in (0, 1, 2, 3, 5)}


def test_without_inputs_the_standard_split_or_totals(folders, tmp_path):
    _, merged = folders
    _edit(str(merged / "output_0_merged.pt"), lambda x: x["data"][1, 1].fill_(float("nan")))
    report = dask_merge.check(merged, scheduler="sync", progress=False)
    assert report.files[0].nan == {"total": 1, "nucleotide": None, "protein": None}  # 32 wide
    assert report.files[0].mismatch is None and report.files[0].compared_rows is None
    report = dask_merge.check(merged, scheduler="sync", progress=False, nucleotide_width=12)
    assert report.files[0].nan == {"total": 1, "nucleotide": 1, "protein": 0}


def test_a_sampled_check_compares_fewer_rows_and_still_finds_a_changed_input(folders):
    features, merged = folders
    make_pair(features, "output_1", rows=30, nucleotide_width=12, protein_width=20, seed=7,
              nucleotide_only=1, protein_only=1)
    report = dask_merge.check(merged, features, sample_rows=5, scheduler="threads", progress=False)
    assert {f.compared_rows for f in report.files} == {5}
    changed = report.files[1]
    assert changed.stale and changed.mismatch and "of 5 rows compared differ" in changed.mismatch


def test_a_touched_input_with_the_same_content_is_not_a_finding_after_a_full_compare(folders):
    features, merged = folders
    os.utime(features / "output_2_ESM.pt", ns=(1, 2 * 10**18))
    full = dask_merge.check(merged, features, scheduler="sync", progress=False)
    assert full.files[2].stale and full.ok  # every row compared equal: only a timestamp moved
    sampled = dask_merge.check(merged, features, sample_rows=3, scheduler="sync", progress=False)
    assert not sampled.ok and any("stale" in line and "output_2_merged.pt" in line
                                  for line in sampled.findings)


def test_outputs_missing_for_pairs_are_findings(folders):
    features, merged = folders
    os.unlink(merged / "output_3_merged.pt")
    report = dask_merge.check(merged, features, scheduler="sync", progress=False)
    assert report.missing == [str(merged / "output_3_merged.pt")]
    assert any("output_3_merged.pt: missing" in line for line in report.findings)


def test_the_command_exits_0_clean_1_findings_2_usage(folders, tmp_path):
    features, merged = folders
    clean = _run_check("--output-dir", str(merged), "--nucleotide-dir", str(features),
                       "--scheduler", "sync")
    assert clean.returncode == 0, clean.stderr
    assert "no findings" in clean.stdout
    _edit(str(merged / "output_2_merged.pt"), lambda x: x["data"][0, 0].fill_(float("inf")))
    report = tmp_path / "report.json"
    found = _run_check("--output-dir", str(merged), "--report", str(report), "--workers", "2")
    assert found.returncode == 1, found.stderr
    assert "output_2_merged.pt: 1 infinite values" in found.stdout
    saved = json.loads(report.read_text())
    assert saved["ok"] is False and saved["counts"]["inf"] == 1 and len(saved["files"]) == 6
    for args, message in [(["--output-dir", str(tmp_path / "nowhere")], "does not exist"),
                          (["--output-dir", str(features)], "no STEM_merged.pt files"),
                          (["--output-dir", str(merged), "--protein-dir", str(features)],
                           "needs its nucleotide folder"),
                          (["--output-dir", str(merged), "--scheduler", "thread"], "unknown scheduler"),
                          (["--output-dir", str(merged), "--report", str(tmp_path / "no" / "r.json")],
                           "does not exist")]:
        bad = _run_check(*args)
        assert bad.returncode == 2 and message in bad.stderr, (args, bad.stderr)
        assert "Traceback" not in bad.stderr


def test_check_on_a_local_cluster_finds_what_sync_finds(folders):
    features, merged = folders
    _edit(str(merged / "output_4_merged.pt"), lambda x: x["data"][2].zero_())
    report = dask_merge.check(merged, features, scheduler="local", workers=2, progress=False,
                              dashboard_address="127.0.0.1:0")
    assert report.scheduler == "local" and report.dashboard
    assert report.counts["zero_rows"] == 1 and report.counts["mismatched"] == 1
    assert report.findings == dask_merge.check(merged, features, scheduler="sync",
                                               progress=False).findings


def test_bad_options_are_refused_before_any_work(folders):
    _, merged = folders
    for options in ({"sample_rows": -1}, {"nucleotide_width": "12"}, {"workers": 0},
                    {"scheduler": None}):
        with pytest.raises(dask_merge.ConfigurationError):
            dask_merge.check(merged, **options)


# --- the counts of one block (audit._count_block) against plain numpy ---------------------------
#
# The scan proves most rows clean by their sum alone; these pin that the
# counts stay exact for every value that could fool a sum: NaN, +/-Inf, -0.0,
# denormals, finite values whose sum overflows or cancels to zero.

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from dask_merge.audit import _count_block  # noqa: E402

_TRICKY = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45,
           1.1754942e-38, 3.4028235e38, -3.4028235e38, 1e38, -1e38]


def _reference(block, split):
    nan = [int(np.isnan(part).sum()) for part in (block[:, :split], block[:, split:])]
    inf = [int(np.isinf(part).sum()) for part in (block[:, :split], block[:, split:])]
    return nan, inf, np.flatnonzero((block == 0).all(axis=1)).tolist()


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_block_counts_are_those_of_plain_numpy(data):
    rows, width = data.draw(st.integers(0, 12)), data.draw(st.integers(0, 40))
    values = st.sampled_from(_TRICKY) | st.floats(width=32, allow_nan=True, allow_infinity=True)
    # Mostly zeros and a few values, so that all-zero rows and cancelling sums come up.
    block = data.draw(hnp.arrays(np.float32, (rows, width), elements=st.just(0.0) | values))
    if rows and width and data.draw(st.booleans()):  # a row that sums to exactly zero
        row = data.draw(st.integers(0, rows - 1))
        block[row] = 0
        block[row, 0], block[row, -1] = 3.0, -3.0
    split = data.draw(st.integers(0, width))
    nan, inf = np.zeros(2, np.int64), np.zeros(2, np.int64)
    zeros = _count_block(np.ascontiguousarray(block), split, nan, inf).tolist()
    assert (nan.tolist(), inf.tolist(), zeros) == _reference(block, split)


def test_block_counts_in_a_block_too_big_for_one_sum():
    # 10,000 rows of 3,328, as the scan reads them: sums overflow where values are huge.
    block = np.random.default_rng(0).standard_normal((600, 3328)).astype(np.float32)
    block[5] = 3e38                    # finite, but its sum overflows
    block[6, :2] = [1e-45, -1e-45]     # denormals that cancel
    block[6, 2:] = 0
    block[7] = -0.0                    # all zero
    block[8, 100], block[9, 3000], block[10, 767] = np.nan, np.inf, -np.inf
    nan, inf = np.zeros(2, np.int64), np.zeros(2, np.int64)
    zeros = _count_block(block, 768, nan, inf).tolist()
    assert (nan.tolist(), inf.tolist(), zeros) == _reference(block, 768) == ([1, 0], [1, 1], [7])


# --- ids in more than one file, against the plain loop ------------------------------------------

from dask_merge.audit import FileCheck  # noqa: E402
from dask_merge.checks import CheckReport  # noqa: E402


def _plain_shared(files):
    shared, first, lines = {}, {}, {}
    for found in files:
        for seq_id in dict.fromkeys(found.ids):
            where = first.setdefault(seq_id, found.path)
            if where != found.path:
                shared.setdefault(seq_id, [where]).append(found.path)
    for seq_id, paths in shared.items():
        for path in paths[1:]:
            count, examples = lines.setdefault(path, [0, []])
            lines[path][0] += 1
            if len(examples) < 5:
                examples.append(f"{seq_id!r} (also in {paths[0]})")
    return shared, [f"{p}: {n} ids also in another file, e.g. {', '.join(e)}" for p, (n, e) in lines.items()]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from("abcdefghij"), max_size=12), max_size=6))
def test_ids_in_more_than_one_file_are_those_of_the_plain_loop(id_lists):
    files = [FileCheck(f"m/f{i}_merged.pt", rows=len(ids), width=1, ids=ids) for i, ids in enumerate(id_lists)]
    report = CheckReport(files, "m")
    shared, lines = _plain_shared(files)
    assert report.shared_ids == shared and list(report.shared_ids) == list(shared)
    assert [line for line in report.findings if "also in another file" in line] == lines
