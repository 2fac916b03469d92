"""The kernel: merge_pair on real torch.save files, against the upstream algorithm."""

from __future__ import annotations

import errno
import fcntl
import math
import os
import struct
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dask_merge import (
    FileFormatError,
    MergeError,
    MergeResult,
    MispairedError,
    OutputError,
    merge_pair,
)
from dask_merge import atomic, layouts
from dask_merge.atomic import is_temporary, remove_stale_temporaries
from dask_merge.layouts import read_features
from dask_merge.merge import EXAMPLES
from dask_merge.testing import make_pair, reference_merge, write_nucleotide_file, write_protein_file


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns: NaN compares, and -0.0 differs from 0.0."""
    assert tensor.dtype == torch.float32
    return tensor.contiguous().view(torch.int32)


def assert_matches_reference(nucleotide, protein, output, *, label=None) -> dict:
    merged = torch.load(output)  # plain torch.load: weights_only=True
    expected = reference_merge(nucleotide, protein, label=label)
    assert merged["ids"] == expected["ids"]
    assert merged["data"].dtype == torch.float32
    assert tuple(merged["data"].shape) == tuple(expected["data"].shape)
    assert torch.equal(bits(merged["data"]), bits(expected["data"]))
    assert merged.get("labels") == expected.get("labels")
    return merged


def files_in(folder) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir())


# --- the golden files ------------------------------------------------------------------


def test_golden_pairs_merge_bit_identical(reference_set, tmp_path):
    nucleotide = reference_set / "output_1_DNABERT_S.pt"
    protein = reference_set / "output_1_ESM.pt"
    output = tmp_path / "output_1_merged.pt"
    result = merge_pair(nucleotide, protein, output)
    golden = torch.load(reference_set / "output_1_merged.pt")
    merged = torch.load(output)
    assert merged["ids"] == golden["ids"]
    assert merged["data"].dtype == golden["data"].dtype == torch.float32
    assert torch.equal(merged["data"], golden["data"])
    assert torch.equal(bits(merged["data"]), bits(golden["data"]))
    assert set(merged) == {"ids", "data"}
    assert result.rows == len(golden["ids"]) > 0
    assert (result.nucleotide_width, result.protein_width) == (768, 2560)
    assert result.nucleotide_only == result.protein_only == 0
    assert result.output == str(output)
    # and mmap loading works on our output too
    assert torch.equal(torch.load(output, mmap=True)["data"], golden["data"])


def test_golden_inputs_take_the_fast_path(reference_set):
    assert read_features(reference_set / "output_1_DNABERT_S.pt", "nucleotide").fast
    assert read_features(reference_set / "output_1_ESM.pt", "protein").fast


@pytest.mark.parametrize("block_bytes", [1, 4 * 8 * 3, 4 * 8 * 5 + 1])
def test_any_output_block_size_writes_the_same_file(tmp_path, monkeypatch, block_bytes):
    # Rows are written in blocks (one row; three rows, one short final block; five).
    from dask_merge import merge

    pair = make_pair(tmp_path, "b", rows=11, nucleotide_width=3, protein_width=5)
    whole, blocks = tmp_path / "whole" / "b_merged.pt", tmp_path / "blocks" / "b_merged.pt"
    whole.parent.mkdir(), blocks.parent.mkdir()
    merge_pair(pair.nucleotide, pair.protein, whole)
    monkeypatch.setattr(merge, "BLOCK_BYTES", block_bytes)
    merge_pair(pair.nucleotide, pair.protein, blocks)
    assert whole.read_bytes() == blocks.read_bytes()
    assert_matches_reference(pair.nucleotide, pair.protein, blocks)


def test_golden_pairs_differ_in_protein_order_as_documented(reference_set):
    # test_with_orfs is the fixture that proves the join is by id, not by position.
    nucleotide = torch.load(reference_set / "output_1_DNABERT_S.pt")["nucleotide"]
    protein = torch.load(reference_set / "output_1_ESM.pt")["proteins"]
    assert sorted(nucleotide) == sorted(protein)
    assert (nucleotide != protein) == (reference_set.name == "test_with_orfs")


# --- joins ---------------------------------------------------------------------------


def test_shuffled_protein_order_joins_by_id(tmp_path):
    pair = make_pair(tmp_path, "s", rows=30, nucleotide_width=5, protein_width=3, shuffle=True)
    assert pair.protein_ids != pair.nucleotide_ids
    out = tmp_path / "s_merged.pt"
    merge_pair(pair.nucleotide, pair.protein, out)
    merged = assert_matches_reference(pair.nucleotide, pair.protein, out)
    nucleotide = torch.load(pair.nucleotide)
    protein = torch.load(pair.protein)
    by_id = dict(zip(protein["proteins"], protein["data"]))
    for i, seq_id in enumerate(merged["ids"]):
        row = nucleotide["data"][nucleotide["nucleotide"].index(seq_id)]
        expected = torch.cat((torch.tensor(row["mean_representation"]), by_id[seq_id]))
        assert torch.equal(merged["data"][i], expected)


def test_ids_on_one_side_only_are_dropped_counted_and_named(tmp_path):
    pair = make_pair(tmp_path, "p", rows=10, nucleotide_only=8, protein_only=2,
                     nucleotide_width=4, protein_width=6)
    out = tmp_path / "p_merged.pt"
    result = merge_pair(pair.nucleotide, pair.protein, out)
    assert isinstance(result, MergeResult)
    assert result.rows == 10
    assert result.nucleotide_only == 8
    assert result.protein_only == 2
    assert result.nucleotide_only_examples == tuple(f"p_no_orf_{i}" for i in range(EXAMPLES))
    assert sorted(result.protein_only_examples) == ["p_orphan_orf_0", "p_orphan_orf_1"]
    merged = assert_matches_reference(pair.nucleotide, pair.protein, out)
    # ids are exactly the rows written, in nucleotide order (upstream's bug fixed)
    shared = [i for i in pair.nucleotide_ids if i in set(pair.protein_ids)]
    assert merged["ids"] == shared and merged["data"].shape == (10, 10)


def test_both_files_empty_give_a_valid_empty_output(tmp_path):
    write_nucleotide_file(tmp_path / "e_DNABERT_S.pt", [], [])
    write_protein_file(tmp_path / "e_ESM.pt", [], [])
    out = tmp_path / "e_merged.pt"
    result = merge_pair(tmp_path / "e_DNABERT_S.pt", tmp_path / "e_ESM.pt", out, label="host")
    assert result.rows == 0
    merged = assert_matches_reference(tmp_path / "e_DNABERT_S.pt", tmp_path / "e_ESM.pt", out,
                                      label="host")
    assert merged["ids"] == [] and merged["labels"] == [0]
    assert torch.load(out, mmap=True)["data"].shape == (0, 0)


def test_files_sharing_no_id_are_mispaired(tmp_path):
    a = make_pair(tmp_path, "a", rows=3, nucleotide_width=2, protein_width=2)
    b = make_pair(tmp_path, "b", rows=3, nucleotide_width=2, protein_width=2)
    out = tmp_path / "x_merged.pt"
    with pytest.raises(MispairedError) as info:
        merge_pair(a.nucleotide, b.protein, out)
    assert str(a.nucleotide) in str(info.value) and str(b.protein) in str(info.value)
    # ids from each side show how they differ (another sample, another naming)
    assert repr(a.nucleotide_ids[0]) in str(info.value) and repr(b.protein_ids[0]) in str(info.value)
    assert isinstance(info.value, MergeError)
    assert not out.exists()


def test_one_empty_side_against_ids_is_mispaired(tmp_path):
    pair = make_pair(tmp_path, "a", rows=3, nucleotide_width=2, protein_width=2)
    write_protein_file(tmp_path / "empty_ESM.pt", [], [])
    with pytest.raises(MispairedError, match="share no sequence id"):
        merge_pair(pair.nucleotide, tmp_path / "empty_ESM.pt", tmp_path / "o.pt")


# --- malformed inputs ---------------------------------------------------------------------


def _nucleotide(tmp_path, ids, rows, name="n_DNABERT_S.pt"):
    path = tmp_path / name
    torch.save({"nucleotide": ids, "data": rows}, path)
    return path


def _rows(ids, width=3):
    return [{"label": i, "mean_representation": [float(k) for k in range(width)]} for i in ids]


@pytest.fixture
def good(tmp_path):
    return make_pair(tmp_path, "good", rows=4, nucleotide_width=3, protein_width=2, shuffle=False)


def _expect(error, path, *needles, nucleotide=None, protein=None, good=None, tmp_path=None):
    nucleotide = nucleotide or good.nucleotide
    protein = protein or good.protein
    out = tmp_path / "bad_merged.pt"
    with pytest.raises(error) as info:
        merge_pair(nucleotide, protein, out)
    message = str(info.value)
    assert isinstance(info.value, MergeError)
    assert str(path) in message, message
    for needle in needles:
        assert needle in message, message
    assert not out.exists()
    assert not [n for n in files_in(tmp_path) if is_temporary(n)]
    return message


def test_duplicate_nucleotide_id_names_file_and_id(tmp_path, good):
    ids = good.nucleotide_ids[:3] + [good.nucleotide_ids[1]]
    path = _nucleotide(tmp_path, ids, _rows(ids))
    _expect(FileFormatError, path, repr(good.nucleotide_ids[1]), "twice",
            nucleotide=path, good=good, tmp_path=tmp_path)


def test_duplicate_protein_id_names_file_and_id(tmp_path, good):
    path = tmp_path / "dup_ESM.pt"
    write_protein_file(path, ["good_seq_0_chunk_1R1", "x", "good_seq_0_chunk_1R1"], np.ones((3, 2)))
    _expect(FileFormatError, path, "'good_seq_0_chunk_1R1'", "twice",
            protein=path, good=good, tmp_path=tmp_path)


def test_ragged_nucleotide_widths_name_the_id(tmp_path, good):
    ids = good.nucleotide_ids
    rows = _rows(ids)
    rows[2]["mean_representation"] = rows[2]["mean_representation"][:-1]
    path = _nucleotide(tmp_path, ids, rows)
    _expect(FileFormatError, path, repr(ids[2]), "2 values",
            nucleotide=path, good=good, tmp_path=tmp_path)


def test_ragged_protein_widths_name_the_id(tmp_path, good):
    path = tmp_path / "ragged_ESM.pt"
    ids = good.nucleotide_ids
    torch.save({"proteins": ids, "data": [torch.ones(2), torch.ones(2), torch.ones(5), torch.ones(2)]},
               path)
    _expect(FileFormatError, path, repr(ids[2]), "5 values",
            protein=path, good=good, tmp_path=tmp_path)


@pytest.mark.parametrize("content,needles", [
    ({"nucleotide": ["a"]}, ["'data'"]),
    ({"ids": ["a"]}, ["'nucleotide'"]),
    ({"nucleotide": "a", "data": []}, ["'nucleotide'"]),
    ({"nucleotide": ["a"], "data": {"a": [1.0]}}, ["'data'"]),
    ([1, 2], ["list"]),
    ({"nucleotide": ["a", "b"], "data": _rows(["a"])}, ["2 ids", "1 vectors"]),
    ({"nucleotide": ["a", 7], "data": _rows(["a", "b"])}, ["7", "not an id string"]),
    ({"nucleotide": ["a"], "data": [{"label": "a"}]}, ["'a'", "mean_representation"]),
    ({"nucleotide": ["a"], "data": [[1.0, 2.0]]}, ["'a'", "mean_representation"]),
    ({"nucleotide": ["a", "b"], "data": _rows(["a", "c"])}, ["'b'", "'c'", "disagree"]),
    ({"nucleotide": ["a"], "data": [{"label": "a", "mean_representation": [1, 2]}]},
     ["'a'", "not a list of floats"]),
    ({"nucleotide": ["a"], "data": [{"label": "a", "mean_representation": torch.ones(3)}]},
     ["'a'", "not a list of floats"]),
    ({1: "x", "nucleotide": ["a"]}, ["a dict key of type int"]),  # refused as it is read
], ids=["no_data", "wrong_keys", "ids_not_list", "data_dict", "top_list", "length_mismatch",
        "id_not_str", "no_mean", "row_list", "label_mismatch", "ints", "tensor_row", "int_key"])
def test_wrong_nucleotide_layouts_are_explained(tmp_path, good, content, needles):
    path = tmp_path / "bad_DNABERT_S.pt"
    torch.save(content, path)
    _expect(FileFormatError, path, *needles, nucleotide=path, good=good, tmp_path=tmp_path)


@pytest.mark.parametrize("content,needles", [
    ({"proteins": ["a"]}, ["'data'"]),
    ({"proteins": ["a"], "data": [[1.0, 2.0]]}, ["'a'", "not a 1-D tensor"]),
    ({"proteins": ["a"], "data": [torch.ones(2, 2)]}, ["'a'", "not a 1-D tensor"]),
    ({"proteins": ["a"], "data": [torch.ones(2, dtype=torch.float64)]}, ["'a'", "float64"]),
    ({"proteins": ["a"], "data": [torch.ones(2, dtype=torch.float16)]}, ["'a'", "float16"]),
], ids=["no_data", "list_vector", "2d", "float64", "float16"])
def test_wrong_protein_layouts_are_explained(tmp_path, good, content, needles):
    path = tmp_path / "bad_ESM.pt"
    torch.save(content, path)
    _expect(FileFormatError, path, *needles, protein=path, good=good, tmp_path=tmp_path)


def test_a_merged_file_passed_as_nucleotide_file_is_named_as_such(tmp_path, good):
    merged = tmp_path / "good_merged.pt"
    merge_pair(good.nucleotide, good.protein, merged)
    message = _expect(FileFormatError, merged, "merged feature file", "DNABERT-S",
                      nucleotide=merged, good=good, tmp_path=tmp_path)
    assert "'ids'" in message
    _expect(FileFormatError, merged, "merged feature file", "ESM-2",
            protein=merged, good=good, tmp_path=tmp_path)


def test_swapped_inputs_are_named_as_such(tmp_path, good):
    # The protein side is read first: its message comes first.
    _expect(FileFormatError, good.nucleotide, "ESM-2 protein file", "this is a DNABERT-S nucleotide file",
            nucleotide=good.protein, protein=good.nucleotide, good=good, tmp_path=tmp_path)
    _expect(FileFormatError, good.protein, "DNABERT-S nucleotide file", "this is an ESM-2 protein file",
            nucleotide=good.protein, good=good, tmp_path=tmp_path)


@pytest.mark.parametrize("damage,needle", [
    (lambda raw: b"", "empty"),
    (lambda raw: raw[:-100], "truncated"),
    (lambda raw: raw[: len(raw) // 2], "truncated"),
    (lambda raw: raw[:200], "truncated"),
    (lambda raw: b"id\tvalue\nseq_1\t0.5\n" * 50, "not a torch zip archive"),
    (lambda raw: np.random.default_rng(3).bytes(len(raw)), "not a torch zip archive"),
], ids=["empty", "tail", "half", "head", "text", "random"])
@pytest.mark.parametrize("side", ["nucleotide", "protein"])
def test_unreadable_files_are_format_errors(tmp_path, good, damage, needle, side):
    source = getattr(good, side)
    path = tmp_path / f"damaged_{side}.pt"
    path.write_bytes(damage(source.read_bytes()))
    _expect(FileFormatError, path, needle, good=good, tmp_path=tmp_path, **{side: path})


def test_a_missing_input_is_a_format_error_naming_it(tmp_path, good):
    missing = tmp_path / "nowhere_ESM.pt"
    _expect(FileFormatError, missing, "cannot read", protein=missing, good=good, tmp_path=tmp_path)


# --- labels ----------------------------------------------------------------------------


@pytest.mark.parametrize("label,expected", [("viral", [1]), ("host", [0]), ("Viral", [1]),
                                            (1, [1]), (0, [0]), (7, [7]), (None, None)])
def test_labels_are_stored_and_load_with_plain_torch_load(tmp_path, good, label, expected):
    out = tmp_path / "l_merged.pt"
    merge_pair(good.nucleotide, good.protein, out, label=label)
    merged = torch.load(out)
    assert merged.get("labels") == expected
    assert ("labels" in merged) == (expected is not None)
    assert_matches_reference(good.nucleotide, good.protein, out, label=label if label != "Viral" else "viral")


@pytest.mark.parametrize("label", ["bacterial", 1.5, True, b"1", "1_000", " 7 ", "\u0661",
                                   float("inf")])
def test_an_unknown_label_is_refused_before_reading(tmp_path, good, label):
    # int() would take most of these: 1.5 as 1, True as 1, "\u0661" (Arabic-Indic one) as 1.
    with pytest.raises(ValueError, match="is not 'viral', 'host' or an integer"):
        merge_pair(good.nucleotide, good.protein, tmp_path / "o.pt", label=label)
    assert not (tmp_path / "o.pt").exists()


def test_a_label_given_as_digits_is_stored_as_its_int(tmp_path, good):
    merge_pair(good.nucleotide, good.protein, tmp_path / "o.pt", label="-3")
    assert torch.load(tmp_path / "o.pt")["labels"] == [-3]


# --- atomic writing -------------------------------------------------------------------------


class Boom(Exception):
    pass


def _failing_writer(real, seen, exc):
    """A write_archive that writes half its bytes, checks the final name, then fails."""

    def write_archive(file, obj, *, name="archive"):
        import io

        buffer = io.BytesIO()
        real(buffer, obj, name=name)
        file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        file.flush()
        seen.append(os.fstat(file.fileno()).st_size)
        raise exc

    return write_archive


@pytest.mark.parametrize("exc,error", [
    (OSError(errno.ENOSPC, "No space left on device"), OutputError),
    (Boom("crash mid-write"), Boom),
    (KeyboardInterrupt(), KeyboardInterrupt),
])
def test_a_failed_write_leaves_no_file_and_no_temporary(tmp_path, good, monkeypatch, exc, error):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "good_merged.pt"
    seen = []
    monkeypatch.setattr(layouts, "write_archive", _failing_writer(layouts.write_archive, seen, exc))
    with pytest.raises(error) as info:
        merge_pair(good.nucleotide, good.protein, out)
    assert seen and seen[0] > 0  # the failure came mid-write, with bytes on disk
    if error is OutputError:
        assert str(out) in str(info.value) and "No space left" in str(info.value)
    assert files_in(out_dir) == []


def test_a_failed_rewrite_leaves_the_older_output_untouched(tmp_path, good, monkeypatch):
    out = tmp_path / "good_merged.pt"
    merge_pair(good.nucleotide, good.protein, out, label="viral")
    before = out.read_bytes()
    stat = out.stat()
    seen = []
    monkeypatch.setattr(layouts, "write_archive", _failing_writer(
        layouts.write_archive, seen, OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OutputError):
        merge_pair(good.nucleotide, good.protein, out, label="host")
    assert seen
    assert out.read_bytes() == before
    assert out.stat().st_ino == stat.st_ino
    assert torch.load(out)["labels"] == [1]
    assert not [n for n in files_in(tmp_path) if is_temporary(n)]


def test_a_failed_rename_leaves_the_older_output_untouched(tmp_path, good, monkeypatch):
    out = tmp_path / "good_merged.pt"
    merge_pair(good.nucleotide, good.protein, out, label="viral")
    before = out.read_bytes()

    def replace(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OutputError, match="Permission denied"):
        merge_pair(good.nucleotide, good.protein, out, label="host")
    monkeypatch.undo()
    assert out.read_bytes() == before
    assert not [n for n in files_in(tmp_path) if is_temporary(n)]


def test_the_output_appears_only_when_complete(tmp_path, good, monkeypatch):
    out = tmp_path / "good_merged.pt"
    real = layouts.write_archive
    observed = []

    def write_archive(file, obj, *, name="archive"):
        real(file, obj, name=name)
        observed.append((out.exists(), [n for n in files_in(tmp_path) if is_temporary(n)]))

    monkeypatch.setattr(layouts, "write_archive", write_archive)
    merge_pair(good.nucleotide, good.protein, out)
    (exists, temporaries), = observed
    assert not exists and len(temporaries) == 1 and temporaries[0].startswith(".good_merged.pt")
    assert out.exists() and not [n for n in files_in(tmp_path) if is_temporary(n)]


def test_an_unwritable_output_folder_is_an_output_error(tmp_path, good):
    out = tmp_path / "missing" / "good_merged.pt"
    with pytest.raises(OutputError, match=str(tmp_path / "missing")):
        merge_pair(good.nucleotide, good.protein, out)


@pytest.mark.parametrize("side", ["nucleotide", "protein"])
@pytest.mark.parametrize("how", ["same path", "hard link"])
def test_an_output_that_is_an_input_is_refused_and_the_input_kept(tmp_path, good, side, how):
    # The merge would succeed and silently replace the input with its output.
    target = getattr(good, side)
    before = target.read_bytes()
    output = target if how == "same path" else tmp_path / "linked_merged.pt"
    if how == "hard link":
        os.link(target, output)
    with pytest.raises(OutputError, match=f"{output}: is the input {target}"):
        merge_pair(good.nucleotide, good.protein, output)
    assert target.read_bytes() == before


def test_remove_stale_temporaries(tmp_path):
    def temporary(tag, content=b"partial"):
        path = tmp_path / f".x_{tag}_merged.pt.dask-merge-tmp-{tag.encode().hex():0>32}"
        path.write_bytes(content)
        assert is_temporary(path.name)
        return path

    stale, empty, locked = temporary("stale"), temporary("empty", b""), temporary("locked")
    keeper = tmp_path / "x_merged.pt"
    keeper.write_bytes(b"done")
    with open(locked, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a live writer in this or another process
        removed = remove_stale_temporaries(str(tmp_path))
        assert sorted(removed) == sorted([str(stale), str(empty)])
        assert not stale.exists() and not empty.exists() and locked.exists() and keeper.exists()
    # once the writer is gone, its temporary is stale too; outputs are never touched
    assert remove_stale_temporaries(str(tmp_path)) == [str(locked)]
    assert files_in(tmp_path) == ["x_merged.pt"]
    assert remove_stale_temporaries(str(tmp_path / "gone")) == []


def test_a_writer_whose_new_temporary_is_cleaned_away_starts_again(tmp_path, monkeypatch):
    # A cleaner can find a temporary in the instant between its creation and
    # its lock, and remove it as a dead writer's: the writer must notice.

    real_flock, raced = fcntl.flock, []

    def flock_after_a_cleaner(fd, operation):
        if not raced and operation == fcntl.LOCK_EX:
            raced.extend(remove_stale_temporaries(str(tmp_path)))
        return real_flock(fd, operation)

    monkeypatch.setattr(atomic.fcntl, "flock", flock_after_a_cleaner)
    atomic.atomic_write(str(tmp_path / "a.pt"), lambda f: f.write(b"complete"))
    assert len(raced) == 1 and is_temporary(os.path.basename(raced[0]))
    assert (tmp_path / "a.pt").read_bytes() == b"complete"
    assert files_in(tmp_path) == ["a.pt"]


def test_merge_emits_no_warnings_on_special_values(tmp_path):
    # Overflow to inf and NaN casts are what torch.tensor does silently too;
    # a worker must not spam (or, under -W error, fail) on them.
    snan = struct.unpack(">d", bytes.fromhex("7ff0000000000001"))[0]
    values = [[1e300, -1e300, snan, math.nan, 1e-320, 3.5e38]] * 2
    write_nucleotide_file(tmp_path / "w_DNABERT_S.pt", ["a", "b"], values)
    write_protein_file(tmp_path / "w_ESM.pt", ["b", "a"], [[1.0], [2.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_pair(tmp_path / "w_DNABERT_S.pt", tmp_path / "w_ESM.pt", tmp_path / "w.pt")
    assert_matches_reference(tmp_path / "w_DNABERT_S.pt", tmp_path / "w_ESM.pt", tmp_path / "w.pt")


# --- the fast path (issue 7) ---------------------------------------------------------------

F32_MIN_SUB = 1.401298464324817e-45
SPECIAL = [
    0.0, -0.0, math.nan, -math.nan, math.inf, -math.inf,
    struct.unpack(">d", bytes.fromhex("7ff0000000000001"))[0],  # signalling NaN
    struct.unpack(">d", bytes.fromhex("fff8dead0000beef"))[0],  # NaN with payload
    F32_MIN_SUB, -F32_MIN_SUB, 1.1754942106924411e-38,  # float32 subnormals
    F32_MIN_SUB / 2, F32_MIN_SUB / 2 * (1 + 2**-40),  # ties around the smallest subnormal
    5e-324, -5e-324, 2.225073858507201e-308,  # float64 subnormals
    3.4028234663852886e38, 3.4028235677973362e38, 3.4028235677973366e38, 1e39, -1e300,
    1 + 2**-24, 1 + 3 * 2**-24, 0.1, -2.5e-30, 16777217.0,  # not float32-representable
]


def _special_rows(n, width, seed=0):
    rng = np.random.default_rng(seed)
    return [[SPECIAL[k] for k in rng.integers(0, len(SPECIAL), width)] for _ in range(n)]


def _fast_flags(pair_nucleotide, pair_protein):
    return (read_features(pair_nucleotide, "nucleotide").fast,
            read_features(pair_protein, "protein").fast)


def test_make_pair_files_take_the_fast_path(tmp_path):
    pair = make_pair(tmp_path, "f", rows=50, nucleotide_only=3, protein_only=2)
    assert _fast_flags(pair.nucleotide, pair.protein) == (True, True)
    out = tmp_path / "f_merged.pt"
    merge_pair(pair.nucleotide, pair.protein, out)
    assert_matches_reference(pair.nucleotide, pair.protein, out)


def _edge_case(tmp_path, case):
    n_path, p_path = tmp_path / "c_DNABERT_S.pt", tmp_path / "c_ESM.pt"
    if case == "empty":
        ids, nuc, prot = [], [], []
    elif case == "one_row":
        ids, nuc, prot = ["only"], [[0.25, -0.0, 3.0]], [[1.0, 2.0]]
    elif case == "specials":
        ids = [f"s{i}" for i in range(12)]
        nuc, prot = _special_rows(12, 40), _special_rows(12, 17, seed=1)
    elif case == "huge_ids":
        ids = ["🧬" * 50_000, "x" * 300_000, "ñ" * 70_000 + "\x00", "日本語", "lone \ud800 surrogate"]
        nuc, prot = _special_rows(5, 9, seed=2), _special_rows(5, 3, seed=3)
    elif case == "wide":
        ids = ["a", "b", "c"]
        nuc, prot = _special_rows(3, 800, seed=4), _special_rows(3, 2560, seed=5)
    write_nucleotide_file(n_path, ids, nuc)
    write_protein_file(p_path, ids[::-1], prot[::-1])
    return n_path, p_path


@pytest.mark.parametrize("case", ["empty", "one_row", "specials", "huge_ids", "wide"])
def test_fast_path_edge_cases_are_bit_identical(tmp_path, case):
    n_path, p_path = _edge_case(tmp_path, case)
    assert _fast_flags(n_path, p_path) == (True, True)
    out = tmp_path / "c_merged.pt"
    merge_pair(n_path, p_path, out)
    assert_matches_reference(n_path, p_path, out)


@pytest.mark.parametrize("width", [1, 999, 1000, 1001, 2500])
def test_slow_path_widths_are_bit_identical(tmp_path, width):
    # Width 1 pickles as APPEND, widths over 1000 as several APPENDS batches:
    # not one float run per row, so not the fast path; the result is the same.
    ids = ["a", "b", "c"]
    n_path, p_path = tmp_path / "w_DNABERT_S.pt", tmp_path / "w_ESM.pt"
    write_nucleotide_file(n_path, ids, _special_rows(3, width))
    write_protein_file(p_path, ids[::-1], _special_rows(3, width, seed=9))
    out = tmp_path / "w_merged.pt"
    merge_pair(n_path, p_path, out)
    assert_matches_reference(n_path, p_path, out)
    assert read_features(n_path, "nucleotide").fast == (1 < width <= 1000)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_other_pickle_protocols_are_bit_identical(tmp_path, protocol):
    # Protocol 4+ frames the pickle; a FRAME opcode may split a row's float run.
    rng = np.random.default_rng(protocol)
    ids = [f"id_{i}" for i in range(40)]
    vectors = rng.standard_normal((40, 768)).tolist()
    vectors[5][:len(SPECIAL)] = SPECIAL
    n_path, p_path = tmp_path / "v_DNABERT_S.pt", tmp_path / "v_ESM.pt"
    torch.save({"nucleotide": ids, "data": [{"label": i, "mean_representation": v}
                                            for i, v in zip(ids, vectors)]},
               n_path, pickle_protocol=protocol)
    torch.save({"proteins": ids[::-1], "data": [torch.tensor(v[:100]) for v in vectors[::-1]]},
               p_path, pickle_protocol=protocol)
    out = tmp_path / "v_merged.pt"
    merge_pair(n_path, p_path, out)
    merged = torch.load(out)
    # torch's own safe loader knows no FRAME opcode (protocol 4+), so the
    # reference reads these files, which this test wrote, with the full unpickler.
    nucleotide = torch.load(n_path, weights_only=False)
    protein = torch.load(p_path, weights_only=False)
    by_id = dict(zip(protein["proteins"], protein["data"]))
    expected = torch.stack([
        torch.cat((torch.tensor(row["mean_representation"]), by_id[i]))
        for i, row in zip(nucleotide["nucleotide"], nucleotide["data"])
    ])
    assert merged["ids"] == ids
    assert torch.equal(bits(merged["data"]), bits(expected))
    if protocol >= 4:
        # Framed: a FRAME opcode splits some rows' float runs, the case this test is about.
        assert b"\x95" in n_path.read_bytes()
        assert not read_features(n_path, "nucleotide").fast
    else:
        assert_matches_reference(n_path, p_path, out)
        assert read_features(n_path, "nucleotide").fast


# --- properties: merge_pair == the upstream algorithm ----------------------------------------

id_text = st.one_of(
    st.text(max_size=12),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=6),
    st.text(alphabet="🧬🦠ß漢\u200d\U0010ffff", min_size=1, max_size=8),
    st.text(alphabet="ACGT_", min_size=200, max_size=3000),
)
value = st.one_of(
    st.floats(),
    st.floats(width=32),
    st.sampled_from(SPECIAL),
    st.floats(min_value=-1e-300, max_value=1e-300),
    st.floats(min_value=-1e-36, max_value=1e-36),
)


@st.composite
def pairs(draw):
    ids = draw(st.lists(id_text, unique=True, max_size=10))
    sides = draw(st.lists(st.sampled_from(["both", "both", "nucleotide", "protein"]),
                          min_size=len(ids), max_size=len(ids)))
    nucleotide_ids = draw(st.permutations([i for i, s in zip(ids, sides) if s != "protein"]))
    protein_ids = draw(st.permutations([i for i, s in zip(ids, sides) if s != "nucleotide"]))
    widths = draw(st.tuples(st.sampled_from([1, 2, 3, 7, 64]), st.sampled_from([1, 2, 5, 33])))
    nucleotide = [draw(st.lists(value, min_size=widths[0], max_size=widths[0])) for _ in nucleotide_ids]
    protein = [draw(st.lists(value, min_size=widths[1], max_size=widths[1])) for _ in protein_ids]
    label = draw(st.sampled_from([None, "viral", "host", 3]))
    return nucleotide_ids, nucleotide, protein_ids, protein, label


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.data_too_large])
@given(pairs())
def test_merge_pair_equals_the_reference_merge(case):
    nucleotide_ids, nucleotide, protein_ids, protein, label = case
    with tempfile.TemporaryDirectory() as folder:
        n_path = os.path.join(folder, "h_DNABERT_S.pt")
        p_path = os.path.join(folder, "h_ESM.pt")
        out = os.path.join(folder, "h_merged.pt")
        write_nucleotide_file(n_path, nucleotide_ids, nucleotide)
        write_protein_file(p_path, protein_ids, protein)
        shared = set(nucleotide_ids) & set(protein_ids)
        event("mispaired" if not shared and (nucleotide_ids or protein_ids)
              else f"{min(len(shared), 3)}+ shared rows")
        if not shared and (nucleotide_ids or protein_ids):
            with pytest.raises(MispairedError):
                merge_pair(n_path, p_path, out, label=label)
            assert sorted(os.listdir(folder)) == ["h_DNABERT_S.pt", "h_ESM.pt"]
            return
        result = merge_pair(n_path, p_path, out, label=label)
        merged = assert_matches_reference(n_path, p_path, out, label=label)
        assert result.rows == len(merged["ids"]) == len(shared)
        assert result.nucleotide_only == len(set(nucleotide_ids) - shared)
        assert result.protein_only == len(set(protein_ids) - shared)
        assert set(result.nucleotide_only_examples) <= set(nucleotide_ids) - shared
        assert set(result.protein_only_examples) <= set(protein_ids) - shared
        assert sorted(os.listdir(folder)) == ["h_DNABERT_S.pt", "h_ESM.pt", "h_merged.pt"]


def test_grouped_folder_syncs_sync_each_folder_once_at_the_end(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(atomic, "_fsync_folder", synced.append)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    atomic.atomic_write(str(a / "alone"), lambda f: f.write(b"1"))
    assert synced == [str(a)]  # outside a group: at once
    synced.clear()
    with atomic.grouped_folder_syncs():
        for name in ("x", "y"):
            atomic.atomic_write(str(a / name), lambda f: f.write(b"1"))
        with atomic.grouped_folder_syncs():  # nested: the outer group syncs
            atomic.atomic_write(str(b / "z"), lambda f: f.write(b"1"))
        assert synced == [] and (a / "x").exists() and (b / "z").exists()
    assert synced == [str(a), str(b)]
    synced.clear()
    with pytest.raises(RuntimeError), atomic.grouped_folder_syncs():  # synced on errors too
        atomic.atomic_write(str(a / "w"), lambda f: f.write(b"1"))
        raise RuntimeError
    assert synced == [str(a)]


def test_only_durable_writes_are_fsynced(tmp_path, monkeypatch):
    flushed, synced = [], []
    monkeypatch.setattr(atomic.os, "fsync", flushed.append)
    monkeypatch.setattr(atomic, "_fsync_folder", synced.append)
    atomic.atomic_write(str(tmp_path / "record.json"), lambda f: f.write(b"{}"), durable=False)
    assert flushed == synced == [] and (tmp_path / "record.json").read_bytes() == b"{}"
    atomic.atomic_write(str(tmp_path / "output.pt"), lambda f: f.write(b"data"))
    assert len(flushed) == 1 and synced == [str(tmp_path)]


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise (macOS, Windows)")
def test_big_durable_writes_go_to_the_disk_as_they_are_written(tmp_path, monkeypatch):
    advised = []
    real = atomic.os.posix_fadvise

    def spy(fd, offset, length, advice):
        advised.append((offset, length, advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(atomic.os, "posix_fadvise", spy)
    block = bytes(range(256)) * (1 << 14)  # 4 MiB

    def write(f):  # as zipfile does: a header, the data, then the header again
        f.write(b"H" * 100)
        for _ in range(5):
            f.write(block)
        f.seek(0)
        f.write(b"h" * 100)
        f.seek(0, os.SEEK_END)
        f.write(b"tail")

    atomic.atomic_write(str(tmp_path / "big.pt"), write)
    assert (tmp_path / "big.pt").read_bytes() == b"h" * 100 + block * 5 + b"tail"
    # Each 8 MiB handed on once, in order, none twice; the rest is the fsync's.
    assert advised == [(0, 100 + 2 * len(block), os.POSIX_FADV_DONTNEED),
                       (100 + 2 * len(block), 2 * len(block), os.POSIX_FADV_DONTNEED)]
    advised.clear()
    atomic.atomic_write(str(tmp_path / "record.json"), write, durable=False)
    atomic.atomic_write(str(tmp_path / "small.pt"), lambda f: f.write(block))
    assert advised == []  # not durable, or too small to bother


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fill_gives_each_row_as_torch_tensor_would_in_any_order(tmp_path_factory, data):
    # The fast fill converts stretches of equally spaced rows in one go: any
    # order of rows (runs forwards, backwards, repeats, jumps) gives the rows
    # one by one.
    folder = tmp_path_factory.mktemp("fill")
    pair = make_pair(folder, "p", rows=300, nucleotide_width=4, protein_width=3, seed=5)
    features = read_features(pair.nucleotide, "nucleotide")
    assert features.fast
    rows = data.draw(st.lists(st.integers(0, 299), min_size=1, max_size=60)
                     | st.integers(0, 290).map(lambda i: list(range(i, i + 10)))
                     | st.integers(10, 299).map(lambda i: list(range(i, i - 10, -1))))
    out = np.empty((len(rows), 4), np.float32)
    features.fill(out, rows)
    loaded = torch.load(pair.nucleotide)["data"]
    expected = torch.stack([torch.tensor(loaded[i]["mean_representation"]) for i in rows])
    assert out.tobytes() == expected.numpy().tobytes()
