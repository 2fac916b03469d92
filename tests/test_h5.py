"""The HDF5 protein source (VirNucPro v2): exactness, the per-process index, bad and hostile files."""

from __future__ import annotations

import importlib
import os
import tracemalloc
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dask_merge import FileFormatError, MispairedError, UnsafeFileError, merge_pair
from dask_merge import h5source
from dask_merge.testing import (
    fork_convert, fork_merged, make_h5_dataset, make_pair, reference_merge, write_embeddings_h5,
)

NARROW = {"nucleotide_width": 8, "protein_width": 48}


@pytest.mark.parametrize("shards, compression, chunks", [
    (0, None, None), (0, "gzip", None), (3, None, None), (3, "gzip", True), (0, None, True),
    (2, "gzip", (20, 20)),  # rows split over chunks, the last one partial
])
def test_merging_from_hdf5_equals_the_forks_convert_then_merge_path(tmp_path, shards, compression,
                                                                     chunks):
    sample = make_h5_dataset(tmp_path / "features", tmp_path / "esm", pairs=3, rows=150,
                             shards=shards, compression=compression, chunks=chunks, **NARROW)
    expected = fork_merged(sample.files, sample.pairs, tmp_path / "fork", label="viral")
    (tmp_path / "merged").mkdir()
    for pair in sample.pairs:
        result = merge_pair(pair.nucleotide, sample.protein,
                            tmp_path / "merged" / f"{pair.stem}_merged.pt", label="viral")
        assert Path(result.output).read_bytes() == expected[pair.stem], pair.stem
        assert (result.rows, result.nucleotide_only, result.protein_only) == (150, 3, 0)
        assert result.nucleotide_only_examples[0] == f"{pair.stem}_no_orf_0"
    merged = torch.load(tmp_path / "merged" / "output_1_merged.pt", weights_only=True)
    assert merged["data"].shape == (150, 56) and merged["labels"] == [1]


def test_the_torch_reference_agrees_on_a_real_size_row(tmp_path):
    """ESM-2's real width, and torch's own merge of the converted file, as a second witness."""
    sample = make_h5_dataset(tmp_path / "f", tmp_path / "e", pairs=1, rows=40, shards=2,
                             compression="gzip", chunks=True)
    pair = sample.pairs[0]
    esm = tmp_path / "esm"
    esm.mkdir()
    fork_convert(sample.files, {pair.stem: pair.protein_ids}, esm)
    result = merge_pair(pair.nucleotide, sample.protein, tmp_path / "m_merged.pt")
    ours = torch.load(result.output, weights_only=True)
    theirs = reference_merge(pair.nucleotide, esm / f"{pair.stem}_ESM.pt")
    assert ours["ids"] == theirs["ids"]
    assert torch.equal(ours["data"], theirs["data"]) and ours["data"].shape == (40, 768 + 2560)


def test_the_id_index_is_built_once_per_process_and_again_for_a_new_file(tmp_path):
    sample = make_h5_dataset(tmp_path / "f", tmp_path / "e", pairs=2, rows=20, **NARROW)
    merge_pair(sample.pairs[0].nucleotide, sample.protein, tmp_path / "a_merged.pt")
    first = h5source._cache["index"]
    merge_pair(sample.pairs[1].nucleotide, sample.protein, tmp_path / "b_merged.pt")
    assert h5source._cache["index"] is first
    # Regenerated in place (no file is held open between pairs): other vectors
    # under the same name make another index, and other rows.
    again = make_h5_dataset(tmp_path / "f2", tmp_path / "e", pairs=2, rows=20, seed=7, **NARROW)
    result = merge_pair(again.pairs[1].nucleotide, again.protein, tmp_path / "c_merged.pt")
    assert h5source._cache["index"] is not first
    for folder in ("esm", "fork"):
        (tmp_path / folder).mkdir()
    fork_convert(again.files, {"output_1": again.pairs[1].protein_ids}, tmp_path / "esm")
    expected = merge_pair(again.pairs[1].nucleotide, tmp_path / "esm" / "output_1_ESM.pt",
                          tmp_path / "fork" / "c_merged.pt")
    assert Path(result.output).read_bytes() == Path(expected.output).read_bytes()


@pytest.mark.parametrize("compression, bound", [
    (None, 0.5),  # rows read a block (here 256 KiB) at a time, straight into the output
    ("gzip", 4),  # the pair's rows read at once
])
def test_a_pair_holds_a_block_or_its_own_rows_never_the_whole_matrix(tmp_path, monkeypatch,
                                                                     compression, bound):
    sample = make_h5_dataset(tmp_path / "f", tmp_path / "e", pairs=12, rows=300,
                             nucleotide_width=8, protein_width=2560,  # 37 MB of embeddings
                             compression=compression)
    monkeypatch.setattr(importlib.import_module("dask_merge.merge"), "BLOCK_BYTES", 256 << 10)
    merge_pair(sample.pairs[0].nucleotide, sample.protein, tmp_path / "warm_merged.pt")
    tracemalloc.start()
    try:
        merge_pair(sample.pairs[5].nucleotide, sample.protein, tmp_path / "x_merged.pt")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    one_pair = 300 * 2560 * 4  # 3 MB
    assert peak < bound * one_pair, peak


def test_an_id_in_no_shard_is_dropped_and_counted(tmp_path):
    pair = make_pair(tmp_path, "c", rows=10, nucleotide_only=0, protein_only=0, **NARROW)
    vectors = np.ones((len(pair.protein_ids), 48), np.float32)
    write_embeddings_h5(tmp_path / "s0.h5", pair.protein_ids[:4], vectors[:4])
    write_embeddings_h5(tmp_path / "s1.h5", pair.protein_ids[4:7], vectors[4:7])
    result = merge_pair(pair.nucleotide, [tmp_path / "s0.h5", tmp_path / "s1.h5"],
                        tmp_path / "c_merged.pt")
    assert result.rows == 7 and result.nucleotide_only == 3
    missing = set(pair.protein_ids[7:])
    assert set(result.nucleotide_only_examples) == missing


def test_a_chunk_with_no_id_in_the_hdf5_is_mispaired(tmp_path):
    pair = make_pair(tmp_path, "c", rows=5, **NARROW)
    write_embeddings_h5(tmp_path / "e.h5", ["other_1", "other_2"], np.ones((2, 48)))
    with pytest.raises(MispairedError, match=r"e\.h5 \(2 ids.*share no sequence id"):
        merge_pair(pair.nucleotide, tmp_path / "e.h5", tmp_path / "c_merged.pt")


# --- bad files -------------------------------------------------------------------


@pytest.fixture
def chunk(tmp_path):
    return make_pair(tmp_path, "c", rows=6, **NARROW)


def _h5(path: Path, **datasets) -> Path:
    with h5py.File(path, "w") as f:
        for name, make in datasets.items():
            make(f, name)
    return path


def _ids(values):
    return lambda f, name: f.create_dataset(name, data=values, dtype=h5py.string_dtype())


def _vectors(array, **options):
    return lambda f, name: f.create_dataset(name, data=array, **options)


def _merge(chunk, protein):
    return merge_pair(chunk.nucleotide, protein, Path(chunk.nucleotide).parent / "out_merged.pt")


@pytest.mark.parametrize("datasets, message", [
    ({"embeddings": _vectors(np.ones((6, 48), "f4"))}, r"no dataset 'sequence_ids'"),
    ({"sequence_ids": _ids(["a"])}, r"no dataset 'embeddings'"),
    ({"sequence_ids": _ids(["a", "b"]), "embeddings": _vectors(np.ones((2, 48), "f8"))},
     r"dataset 'embeddings' must be 2-D float32 .*float64"),
    ({"sequence_ids": _ids(["a", "b"]), "embeddings": _vectors(np.ones((2, 4, 12), "f4"))},
     r"dataset 'embeddings' must be 2-D float32 .*shape \(2, 4, 12\)"),
    ({"sequence_ids": _ids(["a", "b"]), "embeddings": _vectors(np.ones(96, "f4"))},
     r"dataset 'embeddings' must be 2-D"),
    ({"sequence_ids": _vectors(np.arange(2)), "embeddings": _vectors(np.ones((2, 48), "f4"))},
     r"dataset 'sequence_ids' must be 1-D strings, found int64"),
    ({"sequence_ids": _ids(["a", "b", "c"]), "embeddings": _vectors(np.ones((2, 48), "f4"))},
     r"dataset 'sequence_ids' holds 3 ids but 'embeddings' has 2 rows"),
    ({"sequence_ids": _ids(["a", "b", "a"]), "embeddings": _vectors(np.ones((3, 48), "f4"))},
     r"id 'a' appears twice in 'sequence_ids': .*e\.h5 row 0 and .*e\.h5 row 2"),
    ({"sequence_ids": _ids(["a"]), "embeddings": _vectors(np.ones((1, 1 << 17), "f4"))},
     r"dataset 'embeddings': width 131072; expected 1 to 65536"),
    ({"sequence_ids": _ids(["a" * 5000]), "embeddings": _vectors(np.ones((1, 48), "f4"))},
     r"dataset 'sequence_ids', row 0: an id of 5000 characters"),
    ({"sequence_ids": _vectors(np.array([b"\xff\xfe"], "S2")),
      "embeddings": _vectors(np.ones((1, 48), "f4"))}, r"'sequence_ids' holds an id that is not UTF-8"),
])
def test_a_bad_dataset_is_named_with_its_file(chunk, tmp_path, datasets, message):
    path = _h5(tmp_path / "e.h5", **datasets)
    with pytest.raises(FileFormatError, match=str(tmp_path / "e.h5").replace(".", r"\.")):
        _merge(chunk, path)
    with pytest.raises(FileFormatError, match=message):
        _merge(chunk, path)
    assert not (tmp_path / "out_merged.pt").exists()


def test_a_duplicate_id_across_shards_names_both(chunk, tmp_path):
    write_embeddings_h5(tmp_path / "shard_0.h5", ["x", chunk.protein_ids[0]], np.ones((2, 48)))
    write_embeddings_h5(tmp_path / "shard_1.h5", ["y", chunk.protein_ids[0]], np.ones((2, 48)))
    with pytest.raises(FileFormatError, match=rf"id '{chunk.protein_ids[0]}' appears twice in "
                       r"'sequence_ids': .*shard_0\.h5 row 1 and .*shard_1\.h5 row 1"):
        _merge(chunk, [tmp_path / "shard_0.h5", tmp_path / "shard_1.h5"])


def test_shards_of_other_widths_are_refused(chunk, tmp_path):
    write_embeddings_h5(tmp_path / "shard_0.h5", ["x"], np.ones((1, 48)))
    write_embeddings_h5(tmp_path / "shard_1.h5", ["y"], np.ones((1, 40)))
    with pytest.raises(FileFormatError, match=r"shards' 'embeddings' differ in width .*shard_1\.h5: 40"):
        _merge(chunk, [tmp_path / "shard_0.h5", tmp_path / "shard_1.h5"])


@pytest.mark.parametrize("keep", [0, 100, 0.5])
def test_a_truncated_or_foreign_file_is_named(chunk, tmp_path, keep):
    path = tmp_path / "e.h5"
    write_embeddings_h5(path, chunk.protein_ids, np.ones((len(chunk.protein_ids), 48)) * 3,
                        chunks=(2, 48))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep] if keep else b"PK\x03\x04 no hdf5")
    with pytest.raises(FileFormatError, match=rf"{path}: .*(not an HDF5 file, or truncated|corrupt or truncated|past the end)"):
        _merge(chunk, path)


def test_missing_files_and_folders_are_named(chunk, tmp_path):
    with pytest.raises(FileFormatError, match=rf"{tmp_path / 'no.h5'}: cannot open"):
        _merge(chunk, tmp_path / "no.h5")
    (tmp_path / "dir.h5").mkdir()
    with pytest.raises(FileFormatError, match=r"dir\.h5: not a regular file"):
        _merge(chunk, tmp_path / "dir.h5")


# --- hostile files ---------------------------------------------------------------


def test_links_out_of_the_file_are_refused(chunk, tmp_path):
    write_embeddings_h5(tmp_path / "real.h5", chunk.protein_ids, np.ones((7, 48)))
    with h5py.File(tmp_path / "e.h5", "w") as f:
        f["sequence_ids"] = h5py.ExternalLink(str(tmp_path / "real.h5"), "sequence_ids")
        f["embeddings"] = h5py.ExternalLink(str(tmp_path / "real.h5"), "embeddings")
    with pytest.raises(UnsafeFileError, match=r"e\.h5: 'sequence_ids' is a ExternalLink"):
        _merge(chunk, tmp_path / "e.h5")
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f.create_dataset("ids", data=chunk.protein_ids, dtype=h5py.string_dtype())
        f["sequence_ids"] = h5py.SoftLink("/ids")
        f.create_dataset("embeddings", data=np.ones((7, 48), "f4"))
    with pytest.raises(UnsafeFileError, match=r"s\.h5: 'sequence_ids' is a SoftLink"):
        _merge(chunk, tmp_path / "s.h5")


def test_external_storage_and_virtual_datasets_are_refused(chunk, tmp_path):
    raw = tmp_path / "raw.bin"
    raw.write_bytes(np.ones((7, 48), "f4").tobytes())
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("sequence_ids", data=chunk.protein_ids, dtype=h5py.string_dtype())
        f.create_dataset("embeddings", (7, 48), "f4", external=[(str(raw), 0, 7 * 48 * 4)])
    with pytest.raises(UnsafeFileError, match=r"x\.h5: dataset 'embeddings' keeps its data in external"):
        _merge(chunk, tmp_path / "x.h5")
    write_embeddings_h5(tmp_path / "real.h5", chunk.protein_ids, np.ones((7, 48)))
    layout = h5py.VirtualLayout((7, 48), "f4")
    layout[:] = h5py.VirtualSource(str(tmp_path / "real.h5"), "embeddings", (7, 48))
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f.create_dataset("sequence_ids", data=chunk.protein_ids, dtype=h5py.string_dtype())
        f.create_virtual_dataset("embeddings", layout)
    with pytest.raises(UnsafeFileError, match=r"v\.h5: dataset 'embeddings' is a virtual dataset"):
        _merge(chunk, tmp_path / "v.h5")


def test_filters_other_than_gzip_and_shuffle_are_refused_unread(chunk, tmp_path):
    path = _h5(tmp_path / "e.h5", sequence_ids=_ids(chunk.protein_ids),
               embeddings=_vectors(np.ones((7, 48), "f4"), compression="lzf"))
    with pytest.raises(UnsafeFileError, match=r"dataset 'embeddings': compressed with filter 32000 "
                       r"\(lzf\); only gzip and shuffle"):
        _merge(chunk, path)


def _with_raw_chunk(path: Path, ids, data: bytes, *, chunks=(4, 64), width=64) -> Path:
    """A gzip dataset whose first chunk is ``data``, written raw."""
    with h5py.File(path, "w") as f:
        f.create_dataset("sequence_ids", data=ids, dtype=h5py.string_dtype())
        ds = f.create_dataset("embeddings", (len(ids), width), "f4", chunks=chunks, compression="gzip")
        ds.id.write_direct_chunk((0, 0), data)
    return path


def test_a_compression_bomb_costs_one_chunk(chunk, tmp_path):
    ids = chunk.protein_ids[:4]
    # 1 KiB stored that would inflate to 1 MiB: stopped at the chunk's own 1 KiB.
    bomb = zlib.compress(bytes(1 << 20), 9)
    assert len(bomb) < 1100
    path = _with_raw_chunk(tmp_path / "bomb.h5", ids, bomb)
    tracemalloc.start()
    try:
        with pytest.raises(FileFormatError, match=r"the chunk at \(0, 0\) inflates to more than its "
                           r"1024 bytes; refused"):
            _merge(chunk, path)
        assert tracemalloc.get_traced_memory()[1] < 4 << 20
    finally:
        tracemalloc.stop()
    # A stored chunk far bigger than the chunk itself is refused before it is read.
    big = _with_raw_chunk(tmp_path / "big.h5", ids, os.urandom(1 << 20))
    with pytest.raises(FileFormatError, match=r"chunk at \(0, 0\) stores 1048576 bytes, more than"):
        _merge(chunk, big)
    broken = _with_raw_chunk(tmp_path / "broken.h5", ids, zlib.compress(bytes(1024))[:-6])
    with pytest.raises(FileFormatError, match=r"chunk at \(0, 0\) is truncated"):
        _merge(chunk, broken)


def test_absurd_chunks_are_refused(chunk, tmp_path):
    with h5py.File(tmp_path / "e.h5", "w") as f:
        f.create_dataset("sequence_ids", data=chunk.protein_ids, dtype=h5py.string_dtype())
        f.create_dataset("embeddings", (7, 10000), "f4", chunks=(7, 1), compression="gzip")
    with pytest.raises(FileFormatError, match=r"chunks of 7 x 1 values; expected 1024 to 16777216"):
        _merge(chunk, tmp_path / "e.h5")
    with h5py.File(tmp_path / "big.h5", "w") as f:
        f.create_dataset("sequence_ids", data=chunk.protein_ids, dtype=h5py.string_dtype())
        f.create_dataset("embeddings", (7, 4096), "f4", chunks=(2048, 4096), maxshape=(None, 4096))
    with pytest.raises(FileFormatError, match=r"chunks of 2048 x 4096 values"):
        _merge(chunk, tmp_path / "big.h5")


def test_an_absurd_row_count_is_refused_before_any_id_is_read(chunk, tmp_path):
    with h5py.File(tmp_path / "e.h5", "w") as f:
        f.create_dataset("sequence_ids", (1 << 40,), h5py.string_dtype(), chunks=(1024,),
                         compression="gzip")
        f.create_dataset("embeddings", (7, 48), "f4")
    with pytest.raises(FileFormatError, match=r"holds 1099511627776 ids but 'embeddings' has 7 rows"):
        _merge(chunk, tmp_path / "e.h5")
