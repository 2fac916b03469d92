"""The torch-archive reader and writer, checked against torch itself."""

from __future__ import annotations

import io
import os
import re
import struct
import threading
import zipfile

import numpy as np
import pytest
import torch

from dask_merge import merge_pair
from dask_merge.errors import FileFormatError, UnsafeFileError
from dask_merge.torchfile import (
    ArrayBlocks, FloatRun, ReadBufferPool, TensorRef, TorchArchive, reused_read_buffers, write_archive,
    writer, zipdir,
)
from dask_merge.torchfile.unpickler import Unpickler

DTYPES = [np.float32, np.float64, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_]


def _sample(dtype, shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape) * 100
    if dtype is np.bool_:
        return values > 0
    return values.astype(dtype)


def _write(path, obj, **kwargs) -> None:
    with open(path, "wb") as f:
        write_archive(f, obj, **kwargs)


@pytest.mark.parametrize("mmap", [False, True])
def test_write_archive_round_trip_through_torch_load(tmp_path, mmap):
    arrays = {f"a_{np.dtype(d).name}": _sample(d, (3, 5), seed=i) for i, d in enumerate(DTYPES)}
    obj = {
        "ids": ["plain", "ünïcödé", "🧬" * 3, "x" * 5000, ""],
        "ints": [0, -1, 2**31 - 1, -(2**31), 2**31, -(2**40), 2**62],
        "nested": {"inner": [["a", 1], []], "empty": {}},
        "empty_rows": np.empty((0, 7), np.float32),
        "empty_square": np.empty((0, 0), np.float32),
        "one": np.array([1.5], np.float32),
        "scalar": np.array(2.5, np.float64),
        "wide": np.arange(3 * 1000, dtype=np.float32).reshape(3, 1000),
        **arrays,
    }
    path = tmp_path / "round_trip.pt"
    _write(path, obj, name="round_trip")
    loaded = torch.load(path, mmap=mmap)  # weights_only=True is the default
    assert set(loaded) == set(obj)
    for key, value in obj.items():
        if isinstance(value, np.ndarray):
            got = loaded[key]
            assert isinstance(got, torch.Tensor), key
            assert tuple(got.shape) == value.shape, key
            assert got.numpy().dtype == value.dtype, key
            np.testing.assert_array_equal(got.numpy(), value, err_msg=key)
            assert got.is_contiguous(), key
        else:
            assert loaded[key] == value, key


def test_write_archive_takes_an_array_in_blocks(tmp_path):
    whole = _sample(np.float32, (7, 3))
    blocks = ArrayBlocks(whole.shape, whole.dtype, (whole[i : i + 3] for i in range(0, 7, 3)))
    _write(tmp_path / "whole.pt", {"data": whole}, name="x")
    _write(tmp_path / "blocks.pt", {"data": blocks}, name="x")
    assert (tmp_path / "whole.pt").read_bytes() == (tmp_path / "blocks.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "blocks.pt")["data"], torch.from_numpy(whole))
    short = ArrayBlocks(whole.shape, whole.dtype, iter([whole[:6]]))
    with pytest.raises(ValueError, match="72 bytes given for an array of 84"):
        _write(tmp_path / "short.pt", {"data": short})


def test_small_archives_zipped_in_memory_are_the_same_bytes(tmp_path, monkeypatch):
    obj = {"ids": ["a", "ü"], "data": _sample(np.float32, (2, 300)), "labels": [1, 0]}
    _write(tmp_path / "memory.pt", obj, name="x")
    monkeypatch.setattr(writer, "SMALL_ARCHIVE", 0)  # straight to the file, as large ones go
    _write(tmp_path / "direct.pt", obj, name="x")
    assert (tmp_path / "memory.pt").read_bytes() == (tmp_path / "direct.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "memory.pt")["data"], torch.from_numpy(obj["data"]))


def test_write_archive_storages_are_aligned_for_mmap(tmp_path):
    path = tmp_path / "aligned.pt"
    _write(path, {"a": np.ones(3, np.float32), "b": np.ones(5, np.float64), "ids": ["q" * 7]})
    raw = path.read_bytes()
    archive = TorchArchive(raw, str(path))
    for key in ("0", "1"):
        assert archive.record_offset(key) % 64 == 0


def test_write_archive_reads_back_with_our_reader(tmp_path):
    data = _sample(np.float32, (4, 6))
    buffer = io.BytesIO()
    write_archive(buffer, {"ids": ["a", "b", "c", "d"], "data": data, "labels": [1]})
    archive = TorchArchive(buffer.getvalue(), "<memory>")
    loaded = archive.load()
    assert loaded["ids"] == ["a", "b", "c", "d"]
    assert loaded["labels"] == [1]
    np.testing.assert_array_equal(archive.array(loaded["data"]), data)


def test_write_archive_refuses_what_torch_load_would_refuse():
    for bad in ({"x": 1.5}, {"x": object()}, {"x": True}, {"x": np.zeros(2, np.complex64)}):
        with pytest.raises(TypeError):
            write_archive(io.BytesIO(), bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int64,
                                   torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool])
def test_reader_matches_torch_load_for_dtypes_and_views(tmp_path, dtype):
    base = torch.arange(60).reshape(6, 10)
    base = (base % 2 == 0) if dtype is torch.bool else (base * 3 - 70).to(dtype)
    saved = {
        "contiguous": base,
        "transposed": base.t(),
        "offset_slice": base[2:5, 3:9],
        "strided": base[::2, 1::3],
        "row_of_shared": [base[1], base[4]],
        "empty": base[:0],
        "scalar": base[3, 3].clone(),
    }
    path = tmp_path / "views.pt"
    torch.save(saved, path)
    expected = torch.load(path)
    archive = TorchArchive.open(path)
    loaded = archive.load()
    for key in ("contiguous", "transposed", "offset_slice", "strided", "empty", "scalar"):
        ref = loaded[key]
        assert isinstance(ref, TensorRef), key
        got = archive.array(ref)
        assert got.shape == tuple(expected[key].shape), key
        np.testing.assert_array_equal(got, expected[key].numpy(), err_msg=key)
        assert not got.flags.writeable
    assert loaded["offset_slice"].offset == 2 * 10 + 3
    assert loaded["transposed"].stride == (1, 10)
    # Views of one storage share one record, as in torch.
    rows = loaded["row_of_shared"]
    assert rows[0].storage == rows[1].storage
    for ref, tensor in zip(rows, expected["row_of_shared"]):
        np.testing.assert_array_equal(archive.array(ref), tensor.numpy())


def test_reader_gives_float_runs_for_lists_of_floats(tmp_path):
    values = [0.1 * i for i in range(300)]
    path = tmp_path / "floats.pt"
    torch.save({"v": values, "short": [1.5], "mixed": [1, 2.5, "x"]}, path)
    archive = TorchArchive.open(path)
    loaded = archive.load()
    assert len(loaded["v"]) == 1 and isinstance(loaded["v"][0], FloatRun)
    np.testing.assert_array_equal(archive.floats(loaded["v"][0]), np.array(values))
    assert loaded["short"] == [1.5]
    assert loaded["mixed"] == [1, 2.5, "x"]


def test_float_runs_of_other_lengths_after_a_long_one_read_right(tmp_path):
    # The reader first guesses that a run is as long as the last one.  Guesses
    # that fail (a lone float, floats in a tuple, a shorter run) must change
    # nothing, and each resets the guess: a forged file of lone floats after
    # a long run once cost the long run's length at every float.
    long = [0.5 * i for i in range(5000)]
    content = {"long": long, "tuples": [(1.5, 2.5), (0.25,)] * 3,
               "short": [[3.5, 4.5], [5.5, 6.5, 7.5]], "lone": [8.5], "again": list(long)}
    path = tmp_path / "runs.pt"
    torch.save(content, path)
    archive = TorchArchive.open(path)

    def plain(value):  # a list of floats is read as runs of up to 1,000 (one per APPENDS)
        if isinstance(value, list) and value and all(isinstance(v, FloatRun) for v in value):
            return [x for run in value for x in archive.floats(run).tolist()]
        if isinstance(value, (list, tuple)):
            return type(value)(map(plain, value))
        return value

    assert {key: plain(value) for key, value in archive.load().items()} == content


@pytest.mark.parametrize("make", [
    lambda raw: b"",
    lambda raw: raw[: len(raw) // 2],
    lambda raw: raw[:-30],
    lambda raw: b"just some text\n" * 20,
    lambda raw: np.random.default_rng(1).bytes(4000),
], ids=["empty", "half", "tail_cut", "text", "random"])
def test_reader_rejects_non_archives(tmp_path, make):
    good = tmp_path / "good.pt"
    torch.save({"x": torch.ones(100)}, good)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(make(good.read_bytes()))
    with pytest.raises(FileFormatError, match=str(bad)):
        TorchArchive.open(bad).load()


def test_reader_rejects_compressed_records(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"x": torch.ones(100)}, good)
    bad = tmp_path / "deflated.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    with pytest.raises(FileFormatError, match="compressed"):
        TorchArchive.open(bad)


def test_reader_refuses_big_endian_archives(tmp_path):
    # torch.save records the byte order; a file written on a big-endian
    # machine must not be read as if it were little-endian.
    good = tmp_path / "good.pt"
    torch.save({"x": torch.arange(4, dtype=torch.float32)}, good)
    bad = tmp_path / "big.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            payload = src.read(info.filename)
            if info.filename.endswith("/byteorder"):
                payload = b"big"
            elif "/data/" in info.filename:
                payload = np.frombuffer(payload, "<f4").astype(">f4").tobytes()
            dst.writestr(info.filename, payload)
    # torch itself reads it correctly ...
    assert torch.equal(torch.load(bad)["x"], torch.arange(4, dtype=torch.float32))
    # ... so we must either do the same or refuse it; we refuse, clearly.
    with pytest.raises(FileFormatError, match="big"):
        archive = TorchArchive.open(bad)
        archive.array(archive.load()["x"])


# --- the record fast paths (issue 7) ----------------------------------------------------------
#
# After its first tensor (ESM) or row (DNABERT-S), the reader matches each
# whole record at once instead of stepping through ~30 opcodes.  These tests
# pin that it does so on upstream's files and that it never changes an
# outcome: the same objects, or the same error, as the opcodes one by one.

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dask_merge.testing import make_pair  # noqa: E402


def _load(path_or_archive, *, fast: bool, monkeypatch=None):
    """Load with the record fast paths on, or off (opcodes one by one); count their hits."""
    taken = {"tensor": 0, "row": 0}
    real = {"tensor": Unpickler._tensor_record, "row": Unpickler._row_record}

    def counting(kind):
        def record(self, *args):
            found = real[kind](self, *args) if fast else None
            taken[kind] += len(found[0]) if found else 0
            return found
        return record

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Unpickler, "_tensor_record", counting("tensor"))
        patch.setattr(Unpickler, "_row_record", counting("row"))
        if not fast:
            patch.setattr(Unpickler, "_string_run", _no_string_run)
        source = path_or_archive
        if not isinstance(source, TorchArchive):
            source = TorchArchive.open(source)
        try:
            return source.load(), taken
        except FileFormatError as err:  # UnsafeFileError included
            return (type(err), str(err)), taken


def _no_string_run(self, *args) -> None:
    """The string fast path, off: each string and put an opcode of its own."""


def test_upstream_files_take_the_record_fast_paths(reference_set):
    for name, kind in [("output_1_DNABERT_S.pt", "row"), ("output_1_ESM.pt", "tensor")]:
        loaded, taken = _load(reference_set / name, fast=True)
        rows = len(loaded["data"])
        assert rows > 1 and taken[kind] == rows - 1, (name, taken)
        assert loaded == _load(reference_set / name, fast=False)[0]


@pytest.mark.parametrize("rows", [1, 2, 40, 300])  # 40, 300: memo indices cross 255
def test_record_fast_paths_give_what_the_opcodes_give(tmp_path, rows):
    pair = make_pair(tmp_path, "p", rows=rows, nucleotide_width=5, protein_width=7,
                     nucleotide_only=1, protein_only=1)
    for path in (pair.nucleotide, pair.protein):
        fast, taken = _load(path, fast=True)
        assert fast == _load(path, fast=False)[0]
        # Every record after the first, but one whose memo puts straddle
        # index 255 (BINPUT, then LONG_BINPUT): it takes the opcodes.
        assert sum(taken.values()) >= len(fast["data"]) - 2, taken
    torch_loaded = torch.load(pair.protein)
    assert [t.numpy().tolist() for t in torch_loaded["data"]] == [
        TorchArchive.open(pair.protein).array(ref).tolist() for ref in fast["data"]
    ]


def test_a_record_whose_memo_get_names_another_global_is_refused_as_by_the_opcodes(tmp_path):
    # Point the second tensor's storage-type get at the OrderedDict global: the
    # record no longer matches torch's, the opcodes run and refuse it.
    pair = make_pair(tmp_path, "p", rows=3, nucleotide_width=5, protein_width=7)
    raw = bytearray(open(pair.protein, "rb").read())
    source = TorchArchive(bytes(raw), pair.protein)
    pickle = bytes(raw[source.pickle_offset : source.pickle_offset + source.pickle_size])
    storage_type_put = pickle.index(b"ctorch\nFloatStorage\n") + len(b"ctorch\nFloatStorage\n")
    odict_put = pickle.index(b"ccollections\nOrderedDict\n") + len(b"ccollections\nOrderedDict\n")
    assert pickle[storage_type_put] == pickle[odict_put] == ord("q")
    type_get = b"h" + pickle[storage_type_put + 1 : storage_type_put + 2]
    second = pickle.index(type_get, odict_put)
    at = source.pickle_offset + second + 1
    raw[at] = pickle[odict_put + 1]
    forged = TorchArchive(bytes(raw), pair.protein)
    (error, message), taken = _load(forged, fast=True)
    assert (error, message) == _load(forged, fast=False)[0]
    assert error is UnsafeFileError and "storage type" in message and taken["tensor"] == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_record_fast_paths_never_change_the_outcome_of_a_damaged_pickle(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("damaged")
    pair = make_pair(folder, "p", rows=6, nucleotide_width=3, protein_width=4, seed=1)
    path = data.draw(st.sampled_from([pair.nucleotide, pair.protein]))
    raw = bytearray(open(path, "rb").read())
    source = TorchArchive(bytes(raw), path)
    for _ in range(data.draw(st.integers(1, 3))):
        # Damage the records after the first, where the fast paths work.
        at = data.draw(st.integers(source.pickle_offset + source.pickle_size // 3,
                                   source.pickle_offset + source.pickle_size - 2))
        raw[at] = data.draw(st.integers(0, 255))
    damaged = TorchArchive(bytes(raw), path)
    outcome = _load(damaged, fast=True)[0]
    assert _same(outcome, _load(damaged, fast=False)[0])
    # Read into a reused buffer, the archive is a view of a bytearray: the same outcome.
    viewed = TorchArchive(memoryview(bytearray(raw + b"spare"))[: len(raw)], path)
    assert _same(_load(viewed, fast=True)[0], outcome)


# --- runs of records (dask_merge.torchfile.runs) --------------------------------------------
#
# After a record read by a fast path, the records that repeat it are taken in
# bulk.  Runs use LONG_BINPUT puts only: files of more than ~250 rows.  Each
# outcome is checked three ways: runs, the one-record fast paths alone, the
# opcodes alone.


def _three_ways(source) -> tuple:
    """The outcome with runs, and the taken counts; asserts the other two ways agree."""
    with_runs, taken = _load(source, fast=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Unpickler, "runs", False)
        assert _same(_load(source, fast=True)[0], with_runs)
    assert _same(_load(source, fast=False)[0], with_runs)
    return with_runs, taken


def _run_calls(monkeypatch) -> dict[str, int]:
    """Count the records that runs take (on top of the one-record paths)."""
    from dask_merge.torchfile import fastpaths, runs

    taken = {"tensor": 0, "row": 0}
    for kind, name in (("tensor", "tensor_run"), ("row", "row_run")):
        real = getattr(runs, name)

        def counting(*args, _real=real, _kind=kind):
            found = _real(*args)
            taken[_kind] += len(found[0])
            return found
        monkeypatch.setattr(fastpaths, name, counting)
    return taken


@pytest.fixture(scope="module")
def long_pair(tmp_path_factory):
    """A 300-row pair: memo indices of its records are past 255 (LONG_BINPUT)."""
    return make_pair(tmp_path_factory.mktemp("long"), "p", rows=300, nucleotide_width=5,
                     protein_width=3, nucleotide_only=2, protein_only=1, seed=3)


def test_runs_take_the_records_after_the_first_and_give_what_the_opcodes_give(long_pair, monkeypatch):
    in_runs = _run_calls(monkeypatch)
    for path, kind in ((long_pair.nucleotide, "row"), (long_pair.protein, "tensor")):
        loaded, taken = _three_ways(TorchArchive.open(path))
        rows = len(loaded["data"])
        assert taken[kind] == rows - 1, (path, taken)
        # All but the first, and those after a batch of APPENDS (1,000 items).
        assert in_runs[kind] == rows - 2, in_runs
    torch_loaded = torch.load(long_pair.protein)
    archive = TorchArchive.open(long_pair.protein)
    assert [t.numpy().tolist() for t in torch_loaded["data"]] == [
        archive.array(ref).tolist() for ref in archive.load()["data"]
    ]


def _merged_file(folder, ids) -> str:
    """A merged file as this package writes it: its ids are strings without memo puts."""
    from dask_merge.layouts import write_merged

    path = str(folder / "m_merged.pt")
    write_merged(path, ids, np.arange(len(ids) * 3, dtype=np.float32).reshape(-1, 3), [1])
    return path


def test_ids_without_memo_puts_are_taken_as_one_string_run(tmp_path, monkeypatch):
    ids = [f"seq_{i}" for i in range(500)] + ["é\u4e2d", "", "x" * 300]
    path = _merged_file(tmp_path, ids)
    pushed = []
    real = Unpickler._string_run

    def counting(self, pos, stack, memo):
        before = len(stack)
        after = real(self, pos, stack, memo)
        pushed.append(len(stack) - before)
        return after

    monkeypatch.setattr(Unpickler, "_string_run", counting)
    loaded, _ = _three_ways(TorchArchive.open(path))
    assert loaded["ids"] == ids == torch.load(path)["ids"]
    assert max(pushed) == len(ids)  # the whole list in one run


@pytest.mark.parametrize("damage", ["every byte", "frame"])
def test_a_string_run_without_puts_never_changes_the_outcome(tmp_path, damage):
    # 40 ids of one size: the last few are taken in bulk (after 32 one by one).
    ids = [f"id{i:03d}" for i in range(40)] + ["x", "yy\u00e9"]
    path = _merged_file(tmp_path, ids)
    raw = open(path, "rb").read()
    start, end = _pickle_span(raw, path)
    first = raw.index(b"X\x05\0\0\0id030", start)
    stop = raw.index(b"e", raw.index("yy\u00e9".encode(), first))
    if damage == "frame":  # a FRAME ending at each byte: between two strings, or in one
        pickle = raw[start:end]
        for boundary in range(first - start, stop - start + 1):
            framed = pickle[:2] + b"\x95" + struct.pack("<Q", boundary - 2) + pickle[2:]
            _three_ways(TorchArchive(_with_pickle(raw, framed), path))
        return
    for at in range(first, stop + 1):
        for value in (raw[at] + 1) % 256, raw[at] ^ 0x80, 0x71, 0x72, 0x58:
            _three_ways(TorchArchive(raw[:at] + bytes([value]) + raw[at + 1 :], path))


def _pickle_span(raw: bytes, path: str) -> tuple[int, int]:
    source = TorchArchive(raw, path)
    return source.pickle_offset, source.pickle_offset + source.pickle_size


# A record in the middle of a run, from its first byte (the rebuilder's get,
# the EMPTY_DICT) to the next record's.
_RECORDS = {"nucleotide": rb"\}r.{4}\(", "protein": rb"j.{4}\(\(j", "ids": rb"X.\0\0\0p_"}


def _middle_record(raw: bytes, path: str, kind: str, where: float) -> tuple[int, int]:
    """Where, in ``raw``, the record ``where`` of the way through the pickle starts and ends.

    A record of ``kind``: a row ('nucleotide'), a tensor ('protein') or an
    id and its memo put ('ids').  Past 0.8, the rows' id gets are
    LONG_BINGETs, which may name an index not in the memo; before, BINGETs.
    """
    start, end = _pickle_span(raw, path)
    starts = [m.start() for m in re.finditer(_RECORDS[kind], raw[start:end], re.DOTALL)]
    middle = int(len(starts) * where)
    return start + starts[middle], start + starts[middle + 1]


@pytest.mark.parametrize("kind, side, where", [
    ("nucleotide", "nucleotide", 0.9), ("protein", "protein", 0.9),
    ("ids", "nucleotide", 0.9), ("ids", "protein", 0.3),  # memo puts: LONG_BINPUT, BINPUT
])
def test_runs_never_change_the_outcome_of_damage_to_any_byte_of_a_record(long_pair, kind, side, where):
    path = getattr(long_pair, side)
    raw = open(path, "rb").read()
    first, stop = _middle_record(raw, path, kind, where)
    for at in range(first, stop):
        for value in (raw[at] + 1) % 256, raw[at] ^ 0x80:
            damaged = raw[:at] + bytes([value]) + raw[at + 1 :]
            _three_ways(TorchArchive(damaged, path))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_runs_never_change_the_outcome_of_a_damaged_pickle(long_pair, data):
    kind = data.draw(st.sampled_from(["nucleotide", "protein", "ids"]))
    path = getattr(long_pair, kind if kind != "ids" else data.draw(st.sampled_from(["nucleotide", "protein"])))
    raw = bytearray(open(path, "rb").read())
    start, end = _pickle_span(bytes(raw), path)
    first, stop = _middle_record(bytes(raw), path, kind, data.draw(st.sampled_from([0.3, 0.9])))
    for _ in range(data.draw(st.integers(1, 3))):
        # Mostly in one record; at times anywhere after the first few.
        at = data.draw(st.integers(first, stop - 1) | st.integers(start + (end - start) // 10, end - 2))
        raw[at] = data.draw(st.integers(0, 255))
    damaged = bytes(raw)
    outcome = _three_ways(TorchArchive(damaged, path))[0]
    viewed = TorchArchive(memoryview(bytearray(damaged + b"spare"))[: len(damaged)], path)
    assert _same(_load(viewed, fast=True)[0], outcome)


def test_a_run_stops_at_a_memo_put_out_of_order_and_the_opcodes_refuse_it(long_pair, monkeypatch):
    in_runs = _run_calls(monkeypatch)
    # The put of a row's list of values, of a tensor's hooks: a third from the end.
    for path, put in ((long_pair.nucleotide, rb"\]r(.{4})\(G"), (long_pair.protein, rb"\)Rr(.{4})")):
        raw = bytearray(open(path, "rb").read())
        start, end = _pickle_span(bytes(raw), path)
        at = start + [m.start(1) for m in re.finditer(put, raw[start:end], re.DOTALL)][-3]
        index = struct.unpack_from("<I", raw, at)[0]
        struct.pack_into("<I", raw, at, index + 1)
        (error, message), _ = _three_ways(TorchArchive(bytes(raw), path))
        assert error is UnsafeFileError and "memo index" in message, message
    assert in_runs["tensor"] > 250 and in_runs["row"] > 250, in_runs


def test_a_run_refuses_a_missing_storage_as_the_opcodes_do(tmp_path, long_pair):
    raw = open(long_pair.protein, "rb").read()
    # Rename storage record 200 (a name in the zip directory and its local header).
    name = b"/data/200"
    assert raw.count(name) == 2
    forged = raw.replace(name, b"/data/X00")
    (error, message), _ = _three_ways(TorchArchive(forged, long_pair.protein))
    assert error is FileFormatError and "storage '200'" in message, message


def _with_pickle(raw: bytes, pickle: bytes) -> bytes:
    """The archive ``raw`` with its data.pkl replaced by ``pickle``."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            data = pickle if info.filename.endswith("/data.pkl") else source.read(info)
            target.writestr(info.filename, data, zipfile.ZIP_STORED)
    return out.getvalue()


@pytest.mark.parametrize("kind", ["nucleotide", "protein", "ids"])
@pytest.mark.parametrize("inside", [0, 1, 2])  # bytes into an opcode: 0 is between two
def test_no_fast_path_reads_across_the_end_of_a_frame(long_pair, kind, inside):
    # A FRAME may end between any two opcodes, and the pickle go on unframed
    # (CPython's unpickler reads on); an opcode that runs across its end is
    # refused.  Fast paths stop at a frame's end as the opcodes would.
    path = getattr(long_pair, kind if kind != "ids" else "protein")
    raw = open(path, "rb").read()
    start, end = _pickle_span(raw, path)
    pickle = raw[start:end]
    first, stop = _middle_record(raw, path, kind, 0.5)
    # An opcode in the record: a MARK, a NEWOBJ or the put after an id
    if kind == "ids":
        boundary = first + 5 + raw[first + 1] - start
    else:
        boundary = raw.index({"nucleotide": b"(", "protein": b"Q"}[kind], first + 8, stop) - start
    if inside:  # in the middle of the next memo put
        boundary = pickle.index(b"r", boundary) + inside
    framed = pickle[:2] + b"\x95" + struct.pack("<Q", boundary - 2) + pickle[2:]
    outcome, _ = _three_ways(TorchArchive(_with_pickle(raw, framed), path))
    if inside:
        assert outcome[0] is FileFormatError and "across the end of its FRAME" in outcome[1], outcome
    else:
        original = TorchArchive.open(path).load()
        assert type(outcome) is dict and outcome.keys() == original.keys()
        assert len(outcome["data"]) == len(original["data"])


def _same(a, b, seen=None) -> bool:
    """``a == b`` for object graphs that may hold cycles (a damaged memo can
    append a list to itself), where ``==`` would recurse without end."""
    if seen is None:
        try:
            return type(a) is type(b) and a == b
        except RecursionError:
            seen = set()
    if type(a) is not type(b):
        return False
    if not isinstance(a, (list, tuple, dict)):
        return a == b
    if (id(a), id(b)) in seen:
        return True
    seen.add((id(a), id(b)))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k], seen) for k in a)
    return len(a) == len(b) and all(_same(x, y, seen) for x, y in zip(a, b))


# --- the zip container ---------------------------------------------------------------------------


def _zipfile_view(raw: bytes) -> dict[str, tuple[int, int, int]]:
    """What zipfile makes of an archive, in zip_entries' terms."""
    entries = {}
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        for info in z.infolist():
            name_length, extra_length = struct.unpack_from("<HH", raw, info.header_offset + 26)
            entries[info.filename] = (info.compress_type, info.header_offset + 30 + name_length
                                      + extra_length, info.file_size)
    return entries


@pytest.mark.parametrize("zip64", [False, True])
def test_zip_directory_reads_like_zipfile(tmp_path, monkeypatch, zip64):
    if zip64:  # every member then gets zip64 sizes and offsets, as in a file over 4 GiB
        monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 16)
        monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 2)
    buffer = io.BytesIO()
    write_archive(buffer, {"ids": ["a", "b"], "data": [_sample(np.float32, (5,), i) for i in range(9)]})
    with zipfile.ZipFile(buffer, "a") as z:
        z.comment = b"a comment, as a zip tool may add"
    raw = buffer.getvalue()
    # the central directory entries carry 0xFFFFFFFF and a zip64 extra field, or not
    central = [m.start() for m in re.finditer(rb"PK\x01\x02", raw)]
    wide = [struct.unpack_from("<L", raw, c + 42)[0] == 0xFFFFFFFF for c in central[1:]]
    assert wide and all(wide) == zip64 and any(wide) == zip64
    assert zipdir.zip_entries(raw) == _zipfile_view(raw)
    loaded = TorchArchive(raw, "mem").load()
    assert [TorchArchive(raw, "mem").array(r).tolist() for r in loaded["data"]][3] == (
        _sample(np.float32, (5,), 3).tolist()
    )


def _zip64_archive(monkeypatch) -> bytearray:
    """A small archive in which every member has zip64 sizes and offsets."""
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 16)
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 2)
    buffer = io.BytesIO()
    write_archive(buffer, {"ids": ["a"], "data": [_sample(np.float32, (5,))]})
    return bytearray(buffer.getvalue())


def test_zip64_offsets_past_the_file_are_a_clear_error(monkeypatch):
    # Offsets of 2**63 and more: struct cannot even take them as a position.
    raw = _zip64_archive(monkeypatch)
    struct.pack_into("<H", raw, raw.rindex(b"PK\x05\x06") + 10, 0xFFFF)  # "see the zip64 record"
    struct.pack_into("<Q", raw, raw.rindex(b"PK\x06\x07") + 8, 2**63)  # which is there
    with pytest.raises(FileFormatError, match="forged.pt: .*the zip64 end record lies outside"):
        TorchArchive(bytes(raw), "forged.pt")

    raw = _zip64_archive(monkeypatch)
    entry = raw.index(b"PK\x01\x02", raw.index(b"PK\x01\x02") + 1)  # the first is at 0
    name_length = struct.unpack_from("<H", raw, entry + 28)[0]
    extra = entry + 46 + name_length
    tag, length = struct.unpack_from("<HH", raw, extra)
    assert tag == 1 and struct.unpack_from("<L", raw, entry + 42)[0] == 0xFFFFFFFF
    struct.pack_into("<Q", raw, extra + 4 + length - 8, 2**63)  # the local header's offset
    with pytest.raises(FileFormatError, match="forged.pt: .*local header outside the file"):
        TorchArchive(bytes(raw), "forged.pt")


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_a_damaged_zip_directory_is_a_clear_error(data):
    buffer = io.BytesIO()
    write_archive(buffer, {"ids": ["a"], "data": [_sample(np.float32, (3,))]})
    raw = bytearray(buffer.getvalue())
    directory = raw.rindex(b"PK\x01\x02", 0, raw.rindex(b"PK\x05\x06"))
    start = data.draw(st.sampled_from([0, directory - 200]))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(start, len(raw) - 1))] = data.draw(st.integers(0, 255))
    outcomes = []
    for buffer in (bytes(raw), memoryview(raw)):  # as read, or in a reused buffer
        try:
            TorchArchive(buffer, "damaged.pt").load()
            outcomes.append(None)
        except FileFormatError as err:
            assert str(err).startswith("damaged.pt: ")
            outcomes.append(str(err))
    assert outcomes[0] == outcomes[1]


# --- reused read buffers -----------------------------------------------------------------


def test_merges_through_reused_read_buffers_write_the_same_bytes(tmp_path):
    # Inputs that shrink, then outgrow the buffer: each is read where the last one was.
    for folder in ("in", "plain", "reused"):
        (tmp_path / folder).mkdir()
    pairs = [make_pair(tmp_path / "in", f"p{i}", rows=rows, nucleotide_width=8, protein_width=12,
                       seed=i) for i, rows in enumerate([30, 4, 50, 1])]
    for pair in pairs:
        merge_pair(pair.nucleotide, pair.protein, tmp_path / "plain" / f"{pair.stem}.pt")
    buffers = []
    with reused_read_buffers() as pool:
        for pair in pairs:
            merge_pair(pair.nucleotide, pair.protein, tmp_path / "reused" / f"{pair.stem}.pt")
            buffers.append(pool.buffers()["protein"])
    with reused_read_buffers() as other:  # released with the block: the next one is fresh
        assert other is not pool and other.buffers() == {}
    assert buffers[1] is buffers[0] and buffers[2] is not buffers[1]  # kept, then outgrown
    for pair in pairs:
        plain = (tmp_path / "plain" / f"{pair.stem}.pt").read_bytes()
        assert (tmp_path / "reused" / f"{pair.stem}.pt").read_bytes() == plain, pair.stem


def test_an_input_longer_than_its_size_is_read_whole(tmp_path):
    # A file that grows as it is read holds more than fstat said: read on to
    # the end.  A pipe's read end is such a file (its size is 0).
    pair = make_pair(tmp_path, "p", rows=20, nucleotide_width=8, protein_width=12)
    content = open(pair.nucleotide, "rb").read()
    read_end, write_end = os.pipe()

    def feed():
        with open(write_end, "wb") as f:
            f.write(content)

    feeder = threading.Thread(target=feed)
    feeder.start()
    with open(read_end, "rb") as f:
        piped = ReadBufferPool().read(f, "nucleotide")
    feeder.join(timeout=30)
    assert bytes(piped) == content
