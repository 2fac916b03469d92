"""HDF5 rows read a block of the output at a time, straight from the file: exact, bounded, checked."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from dask_merge import FileFormatError, merge_pair
from dask_merge.h5ids import IdTable
from dask_merge.h5read import read_rows_at
from dask_merge.merge import join_pair
from dask_merge.testing import fork_merged, make_h5_dataset, make_pair, write_embeddings_h5

merge = importlib.import_module("dask_merge.merge")
NARROW = {"nucleotide_width": 8, "protein_width": 48}
ROW_BYTES = 4 * (8 + 48)


def _ours(tmp_path: Path, pairs, protein) -> dict[str, bytes]:
    (tmp_path / "merged").mkdir()
    return {p.stem: Path(merge_pair(p.nucleotide, protein,
                                    tmp_path / "merged" / f"{p.stem}_merged.pt").output).read_bytes()
            for p in pairs}


@pytest.mark.parametrize("block_rows", [1, 3, 64, 1000])
@pytest.mark.parametrize("shards, chunks", [(0, (5, 48)), (3, (7, 48)), (2, None)])
def test_blocks_smaller_than_a_chunk_give_the_forks_bytes(tmp_path, monkeypatch, block_rows,
                                                          shards, chunks):
    """Blocks of 1 to all rows; HDF5 chunks of rows that several blocks share; rows of one
    block in several shards (which take 64 rows in turn)."""
    monkeypatch.setattr(merge, "BLOCK_BYTES", block_rows * ROW_BYTES)
    sample = make_h5_dataset(tmp_path / "f", tmp_path / "e", pairs=2, rows=150, shards=shards,
                             chunks=chunks, **NARROW)
    expected = fork_merged(sample.files, sample.pairs, tmp_path / "fork")
    assert _ours(tmp_path, sample.pairs, sample.protein) == expected


def _direct(nucleotide, protein) -> bool:
    """Whether the pair's protein rows are read a block at a time (none held after prepare)."""
    source = join_pair(nucleotide, protein).protein
    return source._vectors is None and source._offsets is not None


def _write(path: Path, ids, vectors: np.ndarray, **options) -> Path:
    with h5py.File(path, "w", **options.pop("file", {})) as f:
        f.create_dataset("sequence_ids", data=ids, dtype=h5py.string_dtype())
        f.create_dataset("embeddings", data=vectors, **options)
    return path


@pytest.mark.parametrize("layout, direct", [
    ({}, True),  # contiguous
    ({"chunks": (3, 48)}, True),
    ({"chunks": (3, 16)}, False),  # chunks that split rows
    ({"chunks": (3, 48), "compression": "gzip"}, False),
    ({"dtype": ">f4"}, False),  # big-endian: HDF5 converts
    ({"file": {"userblock_size": 512}}, False),  # chunk addresses leave it out before HDF5 1.14.4
    ({"file": {"userblock_size": 1024}, "chunks": (4, 48)}, False),
])
def test_every_layout_gives_the_forks_bytes_directly_or_not(tmp_path, monkeypatch, layout, direct):
    monkeypatch.setattr(merge, "BLOCK_BYTES", 4 * ROW_BYTES)
    pair = make_pair(tmp_path, "c", rows=40, **NARROW)
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((len(pair.protein_ids), 48)).astype(np.float32)
    vectors[3, 5] = np.float32("nan")  # a NaN's payload, too, comes through unchanged
    path = _write(tmp_path / "e.h5", pair.protein_ids, vectors.astype(layout.pop("dtype", "<f4")),
                  **layout)
    plain = _write(tmp_path / "plain.h5", pair.protein_ids, vectors, chunks=(5, 48),
                   compression="gzip")
    expected = fork_merged([plain], [pair], tmp_path / "fork")
    assert _ours(tmp_path, [pair], path) == expected
    assert _direct(pair.nucleotide, path) is direct


def test_a_file_changed_between_blocks_is_named_not_read(tmp_path, monkeypatch):
    pair = make_pair(tmp_path, "c", rows=20, **NARROW)
    path = tmp_path / "e.h5"
    write_embeddings_h5(path, pair.protein_ids, np.ones((len(pair.protein_ids), 48)))
    joined = join_pair(pair.nucleotide, path)
    block = np.empty((4, 56), np.float32)
    joined.fill(block, slice(0, 4))
    assert (block[:, 8:] == 1).all()
    write_embeddings_h5(tmp_path / "other.h5", pair.protein_ids, np.full((len(pair.protein_ids), 48), 2))
    os.replace(tmp_path / "other.h5", path)
    with pytest.raises(FileFormatError, match=rf"{path}: changed while being read"):
        joined.fill(block, slice(4, 8))
    path.unlink()
    with pytest.raises(FileFormatError, match=rf"{path}: cannot open"):
        joined.fill(block, slice(4, 8))


def test_rows_are_read_into_their_places_and_a_short_file_is_named(tmp_path):
    path = tmp_path / "rows.bin"
    rows = np.arange(10 * 6, dtype="<f4").reshape(10, 6)
    path.write_bytes(rows.tobytes())
    out = np.zeros((5, 9), np.float32)
    offsets = np.array([7, 2, 3, 4, 9]) * 24  # rows 2-4 follow one another: one read
    fd = os.open(path, os.O_RDONLY)
    try:
        read_rows_at(fd, offsets, out[:, 3:], [0, 1, 2, 3, 4], "rows.bin")
        assert (out[:, 3:] == rows[[7, 2, 3, 4, 9]]).all() and (out[:, :3] == 0).all()
        with pytest.raises(FileFormatError, match=r"rows\.bin: the file ends within the rows "
                           r"from byte 228 on"):  # half a row is there
            read_rows_at(fd, np.array([9 * 24 + 12, 0]), out[:2, 3:], [1, 0], "rows.bin")
    finally:
        os.close(fd)


class _ByLength(IdTable):
    """Ids of one length share a hash: collisions on demand (Python's 64-bit hash has none)."""

    _hash = staticmethod(len)


def test_the_id_table_tells_ids_of_one_hash_apart():
    table = _ByLength.build([["ab", "cd", "x"], ["ef", "yz"]])
    assert [table.get(i) for i in ("ab", "cd", "x", "ef", "yz", "gh", "")] == [0, 1, 2, 3, 4,
                                                                               None, None]
    assert table.duplicate() is None and list(table) == ["ab", "cd", "x", "ef", "yz"]
    assert table[1:4] == ["cd", "x", "ef"] and table[-1] == "yz"
    # Two ids twice, in two hash groups: the earliest second row is named, with its first.
    assert _ByLength.build([["abc", "x", "y"], ["x", "abc"]]).duplicate() == (1, 3)
    assert _ByLength.build([["abc", "x", "abc", "y", "x"]]).duplicate() == (0, 2)
