"""The ESM-2 side as VirNucPro v2 writes it: one ``embeddings.h5``, or its shards.

Each file holds ``sequence_ids`` (1-D strings) and ``embeddings`` (rows x
width float32), row ``i`` the vector of id ``i``.  A worker process opens the
files read-only and maps ids to rows once (:func:`open_h5` keeps one index per
process, keyed by the files' paths and fingerprints); each pair then reads
only its own rows, a block of its output at a time, straight from where they
lie in the file, or, where the layout does not allow that, all at once in a
few sorted slab reads (:mod:`dask_merge.h5read`).

The files are untrusted.  HDF5 runs no code, but a file can point elsewhere
(external links, external storage, virtual datasets: refused), load filter
plugins (only gzip and shuffle are accepted), or declare absurd sizes: widths,
chunk and id sizes are bounded, and gzip is inflated here with a bound on its
output.  The id index costs memory in proportion to the ids, some 50 bytes
each (:mod:`dask_merge.h5ids`); a pair's rows are the rest.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import h5py
import numpy as np

from .errors import FileFormatError, UnsafeFileError
from .h5ids import IdTable
from .h5read import Embeddings, check_stored_in_file, read_rows_at

IDS, VECTORS = "sequence_ids", "embeddings"
MAX_ID_CHARS = 4096  # a FASTA id; VirNucPro's are under 100
ID_BATCH = 1 << 16  # ids are read this many at a time, and checked as they come


@dataclass(frozen=True)
class _Shard:
    path: str
    start: int  # the global row of its first row
    rows: int


@dataclass(frozen=True)
class _Index:
    """What a worker process keeps of the files between pairs: ids, no open file.

    Files are opened for each read and closed after: a process that holds
    none open lets the user's own h5py code rewrite them.  Each read checks
    that the file is still the one the ids came from (``key``).
    """

    key: tuple
    shards: list[_Shard]
    ids: IdTable
    width: int


_cache: dict[str, _Index] = {}
_cache_lock = threading.Lock()


def _key(paths: Sequence[str]) -> tuple:
    """Paths and fingerprints of the files: a regenerated file is another key."""
    key = []
    for path in paths:
        try:
            found = os.stat(path)
        except OSError as err:
            raise FileFormatError(f"{path}: cannot open ({err.strerror})") from None
        if not stat.S_ISREG(found.st_mode):
            raise FileFormatError(f"{path}: not a regular file, so not an HDF5 file")
        key.append((os.path.abspath(path), found.st_dev, found.st_ino, found.st_size,
                    found.st_mtime_ns))
    return tuple(key)


def open_h5(paths: Sequence[str]) -> H5Source:
    """The HDF5 protein source of ``paths`` (one file, or the shards in order).

    The first call in a process reads and checks every id; later calls with
    the same, unchanged files reuse that index.  Only the last set of files
    is kept.

    Raises
    ------
    FileFormatError
        Naming the file and the dataset at fault: not an HDF5 file (or
        truncated), a dataset missing or of the wrong dtype or rank, row
        counts that differ, an id twice (in one shard or two).
    UnsafeFileError
        A link, storage or filter that would read outside the file or load
        a plugin.
    """
    if not paths:
        raise ValueError("no HDF5 file given")
    key = _key(paths)
    with _cache_lock:
        index = _cache.get("index")
        if index is None or index.key != key:
            _cache.pop("index", None)  # its memory goes before the next is built
            index = _build_index(key, list(paths))
            _cache["index"] = index
    return H5Source(", ".join(paths), index)


def _build_index(key: tuple, paths: list[str]) -> _Index:
    shards: list[_Shard] = []
    widths = {}

    def batches() -> Iterator[list[str]]:
        for path in paths:
            with _open_file(path) as file:
                embeddings = Embeddings(path, file[VECTORS])
                _check_ids_dataset(path, file[IDS], embeddings.rows)
                shards.append(_Shard(path, sum(shard.rows for shard in shards), embeddings.rows))
                widths[path] = embeddings.width
                for batch in _id_batches(path, file[IDS]):
                    yield batch
                    if len(set(batch)) < len(batch):
                        return  # read no further: an id twice, named below

    ids = IdTable.build(batches())
    twice = ids.duplicate()
    if twice is not None:
        raise FileFormatError(f"id {ids[twice[0]]!r} appears twice in {IDS!r}: "
                              f"{_where(shards, twice[0])} and {_where(shards, twice[1])}")
    if len(set(widths.values())) > 1:
        raise FileFormatError(
            f"{', '.join(paths)}: the shards' {VECTORS!r} differ in width "
            f"({', '.join(f'{path}: {width}' for path, width in widths.items())})"
        )
    return _Index(key, shards, ids, widths[paths[0]])


def _open_file(path: str) -> h5py.File:
    try:
        # locking=False: shared file systems (NFS, Lustre) often refuse HDF5's
        # locks, and a read-only reader needs none.
        file = h5py.File(path, "r", locking=False)
    except OSError as err:
        raise FileFormatError(f"{path}: not an HDF5 file, or truncated ({err})") from None
    try:
        for name in (IDS, VECTORS):
            _check_link(path, file, name)
    except BaseException:
        file.close()
        raise
    return file


def _check_link(path: str, file: h5py.File, name: str) -> None:
    link = file.get(name, getlink=True)
    if link is None:
        raise FileFormatError(f"{path}: no dataset {name!r} (found {sorted(file)[:10]})")
    if type(link) is not h5py.HardLink:
        # An external link opens another file; a soft link may too, through one.
        raise UnsafeFileError(f"{path}: {name!r} is a {type(link).__name__}, not a dataset "
                              "stored in the file; refused")
    if not isinstance(file[name], h5py.Dataset):
        raise FileFormatError(f"{path}: {name!r} is a {type(file[name]).__name__}, not a dataset")


def _check_ids_dataset(path: str, ds: h5py.Dataset, rows: int) -> None:
    where = f"{path}: dataset {IDS!r}"
    check_stored_in_file(where, ds)
    info = h5py.check_string_dtype(ds.dtype)
    if info is None or ds.ndim != 1:
        raise FileFormatError(f"{where} must be 1-D strings, found {ds.dtype} of shape {ds.shape}")
    if info.length is not None and info.length > MAX_ID_CHARS:
        raise FileFormatError(f"{where}: strings of {info.length} bytes; ids are at most "
                              f"{MAX_ID_CHARS}")
    if ds.shape[0] != rows:
        raise FileFormatError(f"{where} holds {ds.shape[0]} ids but {VECTORS!r} has {rows} rows")


def _id_batches(path: str, ds: h5py.Dataset):
    """The ids as str, a batch at a time: memory stays that of the ids, however stored."""
    strings = ds.asstr()
    for start in range(0, ds.shape[0], ID_BATCH):
        try:
            batch = strings[start : start + ID_BATCH].tolist()
        except UnicodeDecodeError as err:
            raise FileFormatError(f"{path}: dataset {IDS!r} holds an id that is not UTF-8, "
                                  f"among rows {start}-{start + ID_BATCH - 1} ({err.reason})") from None
        except OSError as err:
            raise FileFormatError(f"{path}: dataset {IDS!r} cannot be read, "
                                  f"corrupt or truncated ({err})") from None
        if batch and max(map(len, batch)) > MAX_ID_CHARS:
            long = next(i for i, s in enumerate(batch) if len(s) > MAX_ID_CHARS)
            raise FileFormatError(f"{path}: dataset {IDS!r}, row {start + long}: an id of "
                                  f"{len(batch[long])} characters; ids are at most {MAX_ID_CHARS}")
        yield batch


def _where(shards: list[_Shard], row: int) -> str:
    shard = next(s for s in reversed(shards) if s.start <= row)
    return f"{shard.path} row {row - shard.start}"


@dataclass
class H5Source:
    """The HDF5 files of the whole data set as one side of a merge.

    :meth:`prepare` finds where the pair's rows lie in the files, and
    :meth:`fill` reads each block's rows from there straight into the
    block: no more rows are held than one block of the output.  Where the
    files' layout does not allow that (filters, chunks that split rows,
    another byte order), :meth:`prepare` reads the pair's rows at once.
    """

    path: str
    _index: _Index = field(repr=False)
    _rows: np.ndarray = field(default=None, repr=False)  # sorted rows :meth:`prepare` was given
    _offsets: np.ndarray = field(default=None, repr=False)  # where each lies in its shard
    _vectors: np.ndarray = field(default=None, repr=False)  # or its vector, read in prepare
    whole_data_set = True

    @property
    def ids(self) -> IdTable:
        return self._index.ids

    @property
    def width(self) -> int:
        return self._index.width

    def positions(self) -> IdTable:
        return self._index.ids

    def prepare(self, rows: Sequence[int]) -> None:
        """Find where ``rows`` lie, shard by shard; or, where that cannot be, read them."""
        wanted = np.unique(np.asarray(rows, np.int64))
        shards = self._index.shards
        cuts = np.searchsorted(wanted, [shard.start for shard in shards[1:]])
        parts = list(zip(shards, self._index.key, np.split(wanted, cuts),
                         np.concatenate([[0], cuts]).tolist()))
        offsets = np.empty(len(wanted), np.int64)
        for shard, key, part, start in parts:
            found = _shard_offsets(shard, key, part - shard.start) if len(part) else part
            if found is None:
                break
            offsets[start : start + len(part)] = found
        else:
            self._rows, self._offsets, self._vectors = wanted, offsets, None
            return
        vectors = np.empty((len(wanted), self.width), np.float32)
        for shard, key, part, start in parts:
            if len(part):
                _read_shard(shard, key, part - shard.start, vectors[start : start + len(part)])
        self._rows, self._offsets, self._vectors = wanted, None, vectors

    def fill(self, out: np.ndarray, rows: Sequence[int]) -> None:
        if not len(rows):
            return
        if self._rows is None:
            raise RuntimeError("H5Source.fill before prepare")
        at = np.searchsorted(self._rows, rows)
        if self._vectors is not None:
            out[...] = self._vectors[at]
            return
        shards = self._index.shards
        shard_of = np.searchsorted([shard.start for shard in shards], self._rows[at], "right") - 1
        for i in np.unique(shard_of).tolist():
            into = np.flatnonzero(shard_of == i)
            _read_at(shards[i], self._index.key[i], self._offsets[at[into]], out, into)


def _opened(shard: _Shard, key: tuple, file: h5py.File) -> Embeddings:
    """The shard's embeddings, refused if the file is no longer the one its ids came from."""
    _check_unchanged(shard, key, os.fstat(file.id.get_vfd_handle()))
    return Embeddings(shard.path, file[VECTORS])


def _check_unchanged(shard: _Shard, key: tuple, found: os.stat_result) -> None:
    """Refuse a file whose inode, size or mtime are no longer those ``key`` (:func:`_key`) saw."""
    now = (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns)
    if now != key[1:]:
        raise FileFormatError(f"{shard.path}: changed while being read (replaced or rewritten "
                              "since its ids were read)")


def _shard_offsets(shard: _Shard, key: tuple, rows: np.ndarray) -> np.ndarray | None:
    with _open_file(shard.path) as file:
        return _opened(shard, key, file).byte_offsets(rows)


def _read_shard(shard: _Shard, key: tuple, rows: np.ndarray, out: np.ndarray) -> None:
    with _open_file(shard.path) as file:
        _opened(shard, key, file).read_rows(rows, out)


def _read_at(shard: _Shard, key: tuple, offsets: np.ndarray, out: np.ndarray,
             into: np.ndarray) -> None:
    """Rows of ``shard`` at ``offsets`` into ``out[into]``, from the file its ids came from."""
    try:
        fd = os.open(shard.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise FileFormatError(f"{shard.path}: cannot open ({err.strerror})") from None
    try:
        _check_unchanged(shard, key, os.fstat(fd))
        read_rows_at(fd, offsets, out, into, f"{shard.path}: dataset {VECTORS!r}")
    finally:
        os.close(fd)
