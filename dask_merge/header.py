"""A merged feature file's header, read without its tensor data; then its rows, read alone.

:func:`read_merged_header` reads a ``STEM_merged.pt`` file's zip central
directory and its ``data.pkl`` record with :func:`os.pread` (a few small
reads at the end and the start of the file) and runs the safe pickle machine
of :mod:`dask_merge.torchfile` on that record only: the ids, the labels, the
shape of the feature matrix and where its bytes lie, not the bytes.  Reading
the header of a 127 MB file costs well under a millisecond.

:func:`read_rows` then reads the matrix's rows, and only them, refusing a
file whose size, mtime or inode changed since its header was read, rather
than return rows of another file under the header's ids.

No Dask here: :mod:`dask_merge.explore` and the checks map these functions.
"""

from __future__ import annotations

import os
import stat
import struct
from typing import NamedTuple

import numpy as np

from .errors import FileFormatError, MergeError
from .torchfile import TensorRef, TorchArchive, short_repr
from .torchfile.archive import archive_records
from .torchfile.zipdir import _LOCAL, data_start, zip_directory

FLOAT32 = np.dtype("<f4")


class Stamp(NamedTuple):
    """What tells a file's content apart without reading it: size, mtime and inode."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, found: os.stat_result) -> Stamp:
        return cls(found.st_size, found.st_mtime_ns, found.st_ino)


class MergedHeader(NamedTuple):
    """A merged file as its header describes it; its rows are still on disk.

    ``offset`` is where row 0 starts in the file; rows are ``width`` float32
    values each, one after the other.
    """

    path: str
    ids: list[str]
    labels: list[int] | None
    rows: int
    width: int
    offset: int
    stamp: Stamp


class _PickleOnly(TorchArchive):
    """An archive of which only ``data.pkl`` and the other small records were read.

    ``buffer`` holds those records; the tensor records (``data/KEY``) were not
    read: their offsets are the file's, their sizes all that checking a
    tensor against its storage needs.
    """

    def __init__(self, buffer: bytes, path: str, records: dict[str, tuple[int, int]]):
        self._given = records
        super().__init__(buffer, path)

    def _index_records(self) -> dict[str, tuple[int, int]]:
        return self._given


def read_merged_header(path: str | os.PathLike[str]) -> MergedHeader:
    """Read a merged file's ids, labels and matrix shape, not its matrix.

    Raises
    ------
    FileFormatError
        Naming the file: not a regular file, truncated, not a torch zip
        archive, not in the merged layout (``ids``, a 2-D float32 ``data``
        of one row per id, optional integer ``labels``).
    UnsafeFileError
        The pickle asks for anything beyond tensors and plain containers.
    """
    path = os.fspath(path)
    try:
        # Non-blocking: opening a FIFO planted under the name would wait forever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise FileFormatError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            raise FileFormatError(f"{path}: not a regular file")
        small, records = _read_records(fd, path, found.st_size)
        archive = _PickleOnly(small, path, records)
        return _merged_layout(path, archive.load(), archive.record_offset, Stamp.of(found))
    except OSError as err:
        raise FileFormatError(f"{path}: cannot read ({err.strerror or err})") from None
    finally:
        os.close(fd)


def _pread(fd: int, size: int, offset: int, path: str) -> bytes:
    """Exactly ``size`` bytes at ``offset``, or an error saying the file is short."""
    data = os.pread(fd, size, offset)
    while len(data) < size:
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            raise FileFormatError(f"{path}: truncated (or shrunk while read): "
                                  f"{size} bytes expected at byte {offset}, {len(data)} found")
        data += more
    return data


def _read_records(fd: int, path: str, size: int) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The small records (``data.pkl``, ``byteorder``, ``version``, ...) in one buffer,
    and every record's (offset, size): in that buffer, or in the file for tensor records."""
    def read(start: int, length: int) -> bytes:
        return _pread(fd, length, start, path)

    def fail(what: str) -> FileFormatError:
        return FileFormatError(f"{path}: {what}")

    try:
        if size == 0:
            raise ValueError("the file is empty")
        members, _ = zip_directory(lambda start, length: os.pread(fd, length, start), size)
        entries = {name: (method, data_start(read(local, _LOCAL.size), 0, local, name), length)
                   for name, (method, local, length) in members.items()}
    except (ValueError, struct.error, UnicodeDecodeError) as err:
        raise fail(f"not a torch zip archive, or truncated ({err}); torch.save writes zip "
                   "archives since torch 1.6") from None
    records = archive_records(entries, size, fail)
    small, buffer = {}, bytearray()
    for name, (start, length) in records.items():
        if not name.startswith("data/"):
            small[name] = len(buffer), length
            buffer += read(start, length)
    return bytes(buffer), records | small


def _merged_layout(path: str, obj: object, data_offset, stamp: Stamp) -> MergedHeader:
    """Check the merged layout and say where the rows lie."""
    if type(obj) is not dict or type(obj.get("ids")) is not list or type(obj.get("data")) is not TensorRef:
        keys = sorted(map(str, obj)) if type(obj) is dict else type(obj).__name__
        raise FileFormatError(f"{path}: expected a merged feature file ({{'ids': [...], "
                              f"'data': tensor}}), found {keys}")
    ids, data, labels = obj["ids"], obj["data"], obj.get("labels")
    if {*map(type, ids)} - {str}:
        bad = next(i for i in ids if type(i) is not str)
        raise FileFormatError(f"{path}: 'ids' holds {short_repr(bad)}, not an id string")
    if labels is not None and not (type(labels) is list and {*map(type, labels)} <= {int}):
        raise FileFormatError(f"{path}: 'labels' is {short_repr(labels)}, not a list of ints")
    if data.storage.dtype != FLOAT32 or len(data.shape) != 2:
        raise FileFormatError(f"{path}: 'data' is a {len(data.shape)}-D {data.storage.dtype} "
                              "tensor; merged features are a 2-D float32 matrix")
    rows, width = data.shape
    if rows != len(ids):
        raise FileFormatError(f"{path}: {len(ids)} ids but {rows} rows in 'data'")
    if any(size > 1 and step != expected
           for size, step, expected in zip(data.shape, data.stride, (width, 1))):
        raise FileFormatError(f"{path}: 'data' is stored with strides {data.stride}, "
                              "not row after row; load it with torch.load")
    offset = data_offset(data.storage.key) + data.offset * FLOAT32.itemsize
    return MergedHeader(path, ids, labels, rows, width, offset, stamp)


def read_rows(path: str, offset: int, width: int, stamp: tuple, start: int, stop: int,
              out: np.ndarray | None = None) -> np.ndarray:
    """Rows ``start:stop`` of a merged file whose header said ``offset``, ``width``, ``stamp``.

    Reads those rows' bytes and nothing else, into ``out`` (a C-contiguous
    float32 array of at least that many rows) if given.

    Raises
    ------
    MergeError
        The file changed (size, mtime or inode) since its header was read, or
        cannot be read: its rows might not be the header's any more.
    """
    with RowReader(path, offset, width, stamp) as reader:
        return reader.read(start, stop, out)


class RowReader:
    """A merged file's rows, read block after block through one descriptor.

    Opening checks that the file is the one its header was read from (size,
    mtime, inode); each :meth:`read` checks it again after reading, so rows
    rewritten in place while read are never returned as the header's.
    """

    def __init__(self, path: str, offset: int, width: int, stamp: tuple) -> None:
        self.path, self.offset, self.width, self.stamp = path, offset, width, stamp
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as err:
            raise FileFormatError(f"{path}: cannot read ({err.strerror or err})") from None
        try:
            self._check()
        except BaseException:
            self.close()
            raise

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop``, into ``out`` if given (see :func:`read_rows`)."""
        rows = stop - start
        result = np.empty((rows, self.width), FLOAT32) if out is None else out[:rows]
        view = memoryview(result.reshape(-1)).cast("B")
        first = self.offset + start * self.width * FLOAT32.itemsize
        done = 0
        while done < len(view):
            got = self._io(os.preadv, self.fd, [view[done:]], first + done)
            if not got:
                raise MergeError(f"{self.path}: shorter than its header says: changed since "
                                 "it was opened")
            done += got
        self._check()  # and not rewritten in place while read
        return result

    def _check(self) -> None:
        _same_file(self.path, self._io(os.fstat, self.fd), self.stamp)

    def _io(self, call, *args):
        try:
            return call(*args)
        except OSError as err:
            raise FileFormatError(f"{self.path}: cannot read ({err.strerror or err})") from None

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> RowReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _same_file(path: str, found: os.stat_result, stamp: tuple) -> None:
    now = Stamp.of(found)
    if now != tuple(stamp):
        then = Stamp(*stamp)
        raise MergeError(f"{path}: changed since it was opened (size {then.size} -> {now.size}, "
                         f"mtime_ns {then.mtime_ns} -> {now.mtime_ns}, inode {then.inode} -> "
                         f"{now.inode}); open it again")
