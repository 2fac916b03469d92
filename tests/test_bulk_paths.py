"""The reader's and merger's bulk paths against their one-by-one paths.

Each bulk path takes the common case (every entry of a zip directory plain,
every id a plain string, rows in file order or shuffled) at numpy or C speed
and hands anything else to the one-by-one code it stands for.  These tests
damage real files and assert that switching a bulk path off never changes
an outcome: the same result, or the same error word for word.
"""

from __future__ import annotations

import io
import os
import re
import struct
import threading
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dask_merge.errors import FileFormatError
from dask_merge.testing import make_pair
from dask_merge.torchfile import TorchArchive, archive, write_archive, zipdir

# --- the zip directory (torchfile.zipdir, torchfile.archive) ----------------------------------


def _zip_outcome(raw: bytes, *, bulk: bool) -> tuple:
    """zip_entries, zip_directory and TorchArchive's records of ``raw``, or their errors."""
    outcomes = []
    with pytest.MonkeyPatch.context() as patch:
        if bulk:  # the test archives are small: take the bulk path from two entries on
            patch.setattr(zipdir, "BULK_ENTRIES", 2)
        else:
            patch.setattr(zipdir, "_plain_directory", lambda *args: None)
            patch.setattr(zipdir, "_data_starts", lambda *args: None)
            patch.setattr(archive, "_plain_records", lambda *args: None)
        for read in (lambda: zipdir.zip_entries(raw),
                     lambda: zipdir.zip_directory(lambda start, size: raw[start : start + size], len(raw)),
                     lambda: TorchArchive(raw, "damaged.pt")._records):
            try:
                found = read()
                outcomes.append(("ok", list(found.items()) if type(found) is dict else found))
            except (ValueError, struct.error, FileFormatError) as err:
                outcomes.append((type(err), str(err)))
    return tuple(outcomes)


class _Files(dict):
    """Files by name, shown by their names alone in hypothesis' reports."""

    def __repr__(self) -> str:
        return f"<files {list(self)}>"


@pytest.fixture(scope="module")
def zip_archives(tmp_path_factory) -> dict[str, bytes]:
    """A 40-row ESM file as torch.save writes it, and archives zipfile makes with odd members."""
    pair = make_pair(tmp_path_factory.mktemp("zip"), "p", rows=40, nucleotide_width=3, protein_width=5)
    found = _Files(esm=open(pair.protein, "rb").read())
    buffer = io.BytesIO()
    write_archive(buffer, {"ids": ["a", "b"], "data": [np.full(3, 0.5, np.float32)] * 2})
    with zipfile.ZipFile(buffer, "a") as z:
        z.writestr("archive/ünï\0cöde", b"x")  # a NUL: the names' separator in bulk
        z.writestr("archive/PK\x01\x02 in a name", b"y")
        commented = zipfile.ZipInfo("archive/with comment")
        commented.comment = b"PK\x01\x02"
        z.writestr(commented, b"z")
        z.comment = b"an archive comment"
    found["odd"] = buffer.getvalue()
    return found


def test_the_bulk_zip_directory_reads_what_the_loop_reads(zip_archives):
    for name, raw in zip_archives.items():
        bulk = _zip_outcome(raw, bulk=True)
        assert bulk == _zip_outcome(raw, bulk=False), name
        assert bulk[0][0] == "ok" and bulk[2][0] == "ok", (name, bulk)
    # The ESM file can take the bulk path; the odd archive, whose names hold a
    # signature and a NUL, takes the loop.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(zipdir, "BULK_ENTRIES", 2)
        assert zipdir._plain_directory(*_directory_of(zip_archives["esm"])) is not None
        assert zipdir._plain_directory(*_directory_of(zip_archives["odd"])) is None


def test_only_large_directories_take_the_bulk_path(tmp_path):
    # Its numpy calls cost more than the loop over the handful of entries of a small pair.
    small = make_pair(tmp_path, "small", rows=10, nucleotide_width=3, protein_width=5)
    large = make_pair(tmp_path, "large", rows=zipdir.BULK_ENTRIES, nucleotide_width=3, protein_width=5)
    for path, bulk in [(small.protein, False), (small.nucleotide, False), (large.protein, True)]:
        raw = open(path, "rb").read()
        assert (zipdir._plain_directory(*_directory_of(raw)) is not None) is bulk, path


def _directory_of(raw: bytes) -> tuple:
    return zipdir._central_directory(lambda start, size: raw[start : start + size], len(raw))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_bulk_zip_directory_never_changes_the_outcome_of_damage(zip_archives, data):
    raw = bytearray(zip_archives[data.draw(st.sampled_from(["esm", "odd"]))])
    directory, _, offset = _directory_of(bytes(raw))
    local_headers = [m.start() for m in re.finditer(rb"PK\x03\x04", raw)][:40]
    for _ in range(data.draw(st.integers(1, 4))):
        # In the central directory (sizes, flags, names), a local header, or the end records.
        at = data.draw(st.integers(offset, len(raw) - 1)
                       | st.sampled_from(local_headers).flatmap(lambda h: st.integers(h, h + 40)))
        raw[at] = data.draw(st.sampled_from([0, 0xFF, 0x2F, 0x50, 0x80]) | st.integers(0, 255))
    damaged = bytes(raw)
    assert _zip_outcome(damaged, bulk=True) == _zip_outcome(damaged, bulk=False)


# --- copying protein rows (layouts.FeatureFile.fill) ------------------------------------------


def _protein_files(folder) -> dict[str, str]:
    """ESM files whose rows lie every which way in their bytes.

    'views': rows that are views at offsets into shared storages, as torch.save
    writes slices; 'unaligned': the same archive rewritten by zipfile, which
    pads nothing, so storages start at any byte.
    """
    torch = pytest.importorskip("torch")
    shared = torch.arange(9 * 7, dtype=torch.float32).reshape(9, 7) / 3
    rows = [shared[i] for i in range(9)] + [torch.tensor([1.5, -2.0, 1e-40, 3.0, 0.0, -0.0, 7.0])]
    views = folder / "views_ESM.pt"
    torch.save({"proteins": [f"p{i}" for i in range(len(rows))], "data": rows}, views)
    unaligned = folder / "unaligned_ESM.pt"
    with zipfile.ZipFile(views) as source, zipfile.ZipFile(unaligned, "w") as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    return {"views": str(views), "unaligned": str(unaligned)}


def test_copied_protein_rows_are_those_read_one_by_one(tmp_path):
    from dataclasses import replace

    from dask_merge.layouts import read_features

    files = _protein_files(tmp_path)
    order = [9, 3, 3, 0, 8, 1, 9, 4]  # shuffled, repeated
    for name, path in files.items():
        features = read_features(path, "protein")
        assert features.fast
        archive_ = features._archive
        starts = [archive_.record_offset(v.storage.key) + 4 * v.offset for v in features._vectors]
        assert (name == "unaligned") == any(start % 4 for start in starts), name
        bulk, one_by_one = (np.full((len(order), 7), np.nan, np.float32) for _ in range(2))
        features.fill(bulk, order)
        replace(features, fast=False).fill(one_by_one, order)
        assert bulk.tobytes() == one_by_one.tobytes(), name
        assert bulk[0].tolist() == [1.5, -2.0, np.float32(1e-40), 3.0, 0.0, -0.0, 7.0]


# --- reading the nucleotide file ahead (merge._read_ahead, torchfile.ReadAhead) -------------


def _read_ahead_from(monkeypatch, size: int) -> None:
    """Merges read each nucleotide file of ``size`` bytes or more in a helper thread."""
    from dask_merge import merge

    monkeypatch.setattr(merge, "READ_AHEAD_BYTES", size)


def _read_ahead_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "dask-merge-read-ahead"]


def test_merges_read_ahead_write_the_same_bytes_into_the_same_buffers(tmp_path, monkeypatch):
    from dask_merge import merge_pair
    from dask_merge.torchfile import reused_read_buffers

    pairs = [make_pair(tmp_path, f"p{i}", rows=rows, nucleotide_width=6, protein_width=4, seed=i)
             for i, rows in enumerate([20, 3, 40])]
    merged = {}
    for way, size in (("in turn", 1 << 62), ("ahead", 0)):
        _read_ahead_from(monkeypatch, size)
        with reused_read_buffers() as pool:
            for pair in pairs:
                output = tmp_path / way / f"{pair.stem}_merged.pt"
                output.parent.mkdir(exist_ok=True)
                merge_pair(pair.nucleotide, pair.protein, output)
                merged[way, pair.stem] = output.read_bytes()
                nucleotide = open(pair.nucleotide, "rb").read()
                assert bytes(pool.buffers()["nucleotide"][: len(nucleotide)]) == nucleotide
        assert not _read_ahead_threads()
    for pair in pairs:
        assert merged["ahead", pair.stem] == merged["in turn", pair.stem]


@pytest.mark.parametrize("size", [0, 1 << 62], ids=["ahead", "in turn"])
def test_errors_read_ahead_are_those_read_in_turn(tmp_path, monkeypatch, size):
    from dask_merge import merge_pair

    _read_ahead_from(monkeypatch, size)
    pair = make_pair(tmp_path, "p", rows=5, nucleotide_width=3, protein_width=2)
    broken = tmp_path / "broken_ESM.pt"
    broken.write_bytes(open(pair.protein, "rb").read()[:-100])
    cases = [(pair.nucleotide, broken), (broken, pair.protein), (broken, broken),
             (tmp_path / "missing_DNABERT_S.pt", pair.protein)]
    for nucleotide, protein in cases:
        with pytest.raises(FileFormatError) as info:
            merge_pair(nucleotide, protein, tmp_path / "out_merged.pt")
        # The protein file is read first: its error wins when both are bad.
        assert str(info.value).startswith(str(protein if protein == broken else nucleotide))
        assert not _read_ahead_threads() and not (tmp_path / "out_merged.pt").exists()


def test_a_read_ahead_raises_what_a_read_in_turn_raises(tmp_path):
    from dask_merge.torchfile import ReadAhead

    os.mkfifo(tmp_path / "fifo")  # nobody writes: only a blocking open would wait
    unreadable = tmp_path / "unreadable"
    unreadable.write_bytes(b"PK")
    unreadable.chmod(0)
    for path in (tmp_path / "fifo", tmp_path, tmp_path / "missing", unreadable):
        errors = []
        for ahead in (None, ReadAhead(path, slot="nucleotide")):
            with pytest.raises(FileFormatError) as info:
                TorchArchive.open(path, slot="nucleotide", ahead=ahead)
            errors.append(str(info.value))
        assert errors[0] == errors[1] and errors[0].startswith(f"{path}: "), errors
    with pytest.raises(ValueError, match="read ahead"):
        TorchArchive.open(tmp_path / "other", ahead=ReadAhead(tmp_path / "fifo"))


# --- lists of ids (torchfile.runs.string_run) -------------------------------------------------


def _ids_outcome(raw: bytes, way: str):
    """Load ``raw`` with runs ('bulk'), one record at a time ('one by one') or opcodes only."""
    from dask_merge.torchfile.unpickler import Unpickler

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Unpickler, "runs", way == "bulk")
        try:
            return TorchArchive(raw, "ids.pt").load(fast_paths=way != "opcodes")
        except FileFormatError as err:
            return type(err), str(err)


def _tricky_ids() -> list[str]:
    """1,500 ids (memo puts past 255, three batches of APPENDS) that look like records inside."""
    inner = "X\x05\x00\x00\x00abcde"  # a BINUNICODE record, in an id
    ids = [f"seq_{i}_X" for i in range(1500)]
    ids[300] = inner + "r" + chr(0x2F) + "\x01\x00\x00"  # and its put, of a later index
    ids[400], ids[401] = "with\0nul", "\udcff lone surrogate"
    ids[500] = "ünïcödé 🧬"
    ids[600] = "x" * 70_000  # longer than the first bytes searched
    ids[700] = ""
    return ids


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory) -> bytes:
    torch = pytest.importorskip("torch")
    path = tmp_path_factory.mktemp("ids") / "ids_ESM.pt"
    torch.save({"proteins": _tricky_ids(), "data": [torch.zeros(2)]}, path)
    return open(path, "rb").read()


def test_ids_in_bulk_are_those_read_one_by_one(ids_file, monkeypatch):
    from dask_merge.torchfile import fastpaths, runs

    taken = []
    monkeypatch.setattr(fastpaths, "string_run",
                        lambda *args: taken.append(found := runs.string_run(*args)) or found)
    loaded = _ids_outcome(ids_file, "bulk")
    assert loaded["proteins"] == _tricky_ids()
    assert loaded == _ids_outcome(ids_file, "one by one") == _ids_outcome(ids_file, "opcodes")
    assert sum(len(names) for names, _ in taken) > 1000, [len(names) for names, _ in taken]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_ids_in_bulk_never_change_the_outcome_of_damage(ids_file, data):
    raw = bytearray(ids_file)
    start = raw.index(b"seq_250_X")  # from where the puts are LONG_BINPUTs
    stop = raw.index(b"seq_1499_X") + 20
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(start, stop))
        raw[at] = data.draw(st.sampled_from([0, 0x58, 0x72, 0x80, 0xFF]) | st.integers(0, 255))
    damaged = bytes(raw)
    bulk = _ids_outcome(damaged, "bulk")
    assert bulk == _ids_outcome(damaged, "one by one") == _ids_outcome(damaged, "opcodes")


# --- blocks filled while the last is written (merge._blocks) -----------------------------------


def _fill_threads() -> list:
    return [t for t in threading.enumerate() if t.name.startswith("dask-merge-fill")]


def test_blocks_filled_ahead_write_what_one_block_writes(tmp_path, monkeypatch):
    from dask_merge import merge, merge_pair

    pair = make_pair(tmp_path, "p", rows=50, nucleotide_width=5, protein_width=3, nucleotide_only=2)
    outputs = {}
    for block_rows in (1000, 7, 1):  # one block; 8 blocks, the last short; one block per row
        monkeypatch.setattr(merge, "BLOCK_BYTES", 4 * 8 * block_rows)
        output = tmp_path / str(block_rows) / "p_merged.pt"
        output.parent.mkdir()
        merge_pair(pair.nucleotide, pair.protein, output)
        outputs[block_rows] = output.read_bytes()
    assert outputs[7] == outputs[1000] == outputs[1]
    assert not _fill_threads()


def test_a_write_that_fails_between_blocks_leaves_no_file_and_no_thread(tmp_path, monkeypatch):
    import errno

    from dask_merge import atomic, merge, merge_pair
    from dask_merge.errors import OutputError
    from dask_merge.torchfile import writer

    pair = make_pair(tmp_path, "p", rows=50, nucleotide_width=5, protein_width=3)
    block = 4 * 8 * 7
    monkeypatch.setattr(merge, "BLOCK_BYTES", block)
    monkeypatch.setattr(writer, "SMALL_ARCHIVE", 0)  # written as it comes, not in memory first
    monkeypatch.setattr(atomic, "_CAN_START_WRITEBACK", True)
    blocks = []
    real = atomic._EarlyWriteback.write

    def failing(self, data):
        blocks.append(len(data) == block)
        if sum(blocks) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(atomic._EarlyWriteback, "write", failing)
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match="No space left"):
        merge_pair(pair.nucleotide, pair.protein, tmp_path / "out" / "p_merged.pt")
    assert sum(blocks) == 2 and not _fill_threads() and not any((tmp_path / "out").iterdir())
