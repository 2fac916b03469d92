"""A ``torch.save`` archive, read safely and lazily, without importing torch."""

from __future__ import annotations

import contextlib
import gc
import os
import re
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from itertools import repeat
from operator import add
from typing import BinaryIO

import numpy as np

from ..errors import FileFormatError
from .buffers import whole_reader
from .refs import FloatRun, StorageRef, TensorRef, make_many, short_repr
from .unpickler import Unpickler
from .zipdir import zip_entries

# The version record: torch parses it as an integer (leading blanks and a
# plus sign allowed, anything after the digits ignored) and torch 2.13 reads
# versions 1 to 10; torch.save writes 3.
_VERSION = re.compile(rb"[ \t\n\v\f\r]*\+?([0-9]{1,18})")
_MAX_VERSION = 10


class TorchArchive:
    """A ``torch.save`` archive read into memory, for safe and lazy access.

    Parameters
    ----------
    buffer
        The whole file's bytes (or a view of them).  Use :meth:`open` to read a
        file: it reads it once, whole, so later changes on disk cannot tear a
        read in half (an ``mmap`` could, and would crash the process on a
        shrunk file).
    path
        Where the bytes came from; every error message names it.

    Raises
    ------
    FileFormatError
        The file is empty, truncated, compressed or not a torch zip archive.
    """

    def __init__(self, buffer: bytes | memoryview, path: str):
        self.buffer = buffer
        self.path = path
        self._records = self._index_records()
        self._storages: dict[str, StorageRef] = {}  # see storage_ref
        self.pickle_offset, self.pickle_size = self._record("data.pkl")
        self._check_records()

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, slot: str | None = None,
             ahead: ReadAhead | None = None) -> TorchArchive:
        """Read the archive at ``path``.

        Inside :func:`~dask_merge.torchfile.reused_read_buffers`, into the
        buffer kept for ``slot`` (if given): the archive and its arrays then
        live until the next archive of that slot is opened in this thread.
        ``ahead``: the read of ``path`` already started in a helper thread
        (its errors are raised here, as if read now).
        """
        path = os.fspath(path)
        if ahead is not None and ahead.path != path:
            raise ValueError(f"{ahead.path} was read ahead, not {path}")
        try:
            buffer = ahead.result() if ahead is not None else _read_regular(path, whole_reader(slot))
            return cls(buffer, path)
        except OSError as err:
            raise FileFormatError(f"{path}: cannot read ({err.strerror or err})") from None
        except MemoryError:
            raise FileFormatError(f"{path}: too large to read into memory") from None

    def _fail(self, what: str) -> FileFormatError:
        return FileFormatError(f"{self.path}: {what}")

    def _index_records(self) -> dict[str, tuple[int, int]]:
        """Map each record name (without the archive prefix) to (offset, size)."""
        if not self.buffer:
            raise self._fail("the file is empty, not a torch archive")
        try:
            entries = zip_entries(self.buffer)
        except (ValueError, struct.error, UnicodeDecodeError) as err:
            raise self._fail(
                f"not a torch zip archive, or truncated ({err}); torch.save "
                "writes zip archives since torch 1.6"
            ) from None
        return archive_records(entries, len(self.buffer), self._fail)

    def _check_records(self) -> None:
        """Refuse the small records torch.load refuses, and big-endian storages."""
        # torch.save records sys.byteorder (files without the record are
        # little-endian); storages hold native bytes.  Reading big-endian
        # storages as little-endian would give garbage values silently.
        order = self._small_record("byteorder", b"little")
        if order != b"little":
            raise self._fail(
                f"its storages are in {order[:20].decode('ascii', 'replace')!r} byte order "
                "(saved on a big-endian machine); only little-endian files are supported"
            )
        version = _VERSION.match(self._small_record("version", b""))
        if version is None or not 1 <= int(version[1]) <= _MAX_VERSION:
            raise self._fail(
                f"its version record {self._small_record('version', b'(missing)')[:20]!r} is "
                f"not a file format version from 1 to {_MAX_VERSION}, as torch.load requires"
            )
        start, size = self._records.get(".data/serialization_id", (0, 0))
        try:  # torch.load decodes it (to log it) after unpickling
            str(self.buffer[start : start + size], "utf-8")
        except UnicodeDecodeError:
            raise self._fail("its .data/serialization_id record is not UTF-8") from None
        alignment = self._small_record(".storage_alignment", b"64")
        try:
            int(alignment)
        except ValueError:
            raise self._fail(f"its .storage_alignment record {alignment[:20]!r} is not a number") from None

    def _small_record(self, name: str, missing: bytes) -> bytes:
        """The bytes of a record of a few bytes, or ``missing`` if there is none."""
        if name not in self._records:
            return missing
        start, size = self._records[name]
        return bytes(self.buffer[start : start + min(size, 64)])

    def _record(self, name: str) -> tuple[int, int]:
        try:
            return self._records[name]
        except KeyError:
            raise self._fail(f"the archive has no record {name!r}") from None

    def load(self, *, fast_paths: bool = True) -> object:
        """Unpickle ``data.pkl`` safely; tensors come back as :class:`TensorRef`.

        ``fast_paths=False`` runs every opcode one by one: the same result,
        slower; tests compare the two.
        """
        try:
            with _collector_paused():
                return Unpickler(self, fast_paths=fast_paths).run()
        except MemoryError:
            # Each opcode byte may make an object: a forged pickle of one-byte
            # containers takes ~90 times its size.  Raise after the handler:
            # inside it, the traceback still holds the unpickler's frame and
            # all it built, and even the message could not be made.
            pass
        raise self._fail(f"out of memory unpickling its {self.pickle_size:,}-byte pickle")

    def storage_ref(self, key: object, dtype: np.dtype, numel: object) -> StorageRef:
        """Check a persistent id's storage against the archive's records."""
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise self._fail(f"storage id {short_repr(key)} with {short_repr(numel)} items is malformed")
        known = self._storages.get(key)
        if known is not None:
            # torch keeps the first storage it built for a key, whatever a
            # later reference says; a file that disagrees with itself is forged.
            if known.dtype != dtype or known.numel != numel:
                raise self._fail(
                    f"storage {key!r} is referenced as {known.numel} items of {known.dtype} "
                    f"and as {numel} items of {dtype}"
                )
            return known
        _, size = self._records.get(f"data/{key}", (0, None))
        if size is None:
            raise self._fail(f"the pickle points at storage {key!r}, which the archive does not hold")
        if numel * dtype.itemsize != size:  # torch.load requires the exact size too
            raise self._fail(
                f"storage {key!r} declares {numel} items of {dtype} ({numel * dtype.itemsize} bytes) "
                f"but its record holds {size} bytes"
            )
        ref = self._storages[key] = StorageRef(key, dtype, numel)
        return ref

    def storage_refs(self, keys: list[str], dtype: np.dtype, numel: int) -> list[StorageRef]:
        """:meth:`storage_ref` of each of ``keys`` in turn; checked at once when all are new."""
        known = self._storages
        if numel >= 0 and known.keys().isdisjoint(keys) and len(set(keys)) == len(keys):
            found = list(map(self._records.get, ["data/" + key for key in keys]))
            if None not in found and {size for _, size in found} <= {numel * dtype.itemsize}:
                refs = make_many(StorageRef, keys, repeat(dtype), repeat(numel))
                known.update(zip(keys, refs))
                return refs
        return [self.storage_ref(key, dtype, numel) for key in keys]

    def array(self, ref: TensorRef) -> np.ndarray:
        """The tensor's values as a read-only numpy view of the archive bytes."""
        start, _ = self._records[f"data/{ref.storage.key}"]
        base = np.frombuffer(
            self.buffer, ref.storage.dtype, count=ref.storage.numel, offset=start
        )[ref.offset :]
        itemsize = base.itemsize
        return np.lib.stride_tricks.as_strided(
            base, ref.shape, [s * itemsize for s in ref.stride], writeable=False
        )

    def record_offset(self, key: str) -> int:
        """Where storage ``key``'s bytes start in :attr:`buffer`."""
        return self._records[f"data/{key}"][0]

    def record_offsets(self, keys: list[str]) -> list[int]:
        """:meth:`record_offset` of each of ``keys``, at C speed."""
        return [start for start, _ in map(self._records.__getitem__, map("data/".__add__, keys))]

    def pickled_doubles(self) -> np.ndarray:
        """A read-only view with, at index ``p``, the big-endian double at byte ``p`` of the pickle.

        ``view[run.offset + 1 : run.offset + 1 + 9 * run.count : 9]`` are the
        values of a :class:`FloatRun`; slicing it costs no copy.
        """
        return np.ndarray(
            (max(self.pickle_size - 7, 0),), ">f8", self.buffer, self.pickle_offset, (1,)
        )

    def floats(self, run: FloatRun) -> np.ndarray:
        """The values of a run of pickled floats, as a float64 numpy view."""
        start = self.pickle_offset + run.offset
        records = np.frombuffer(self.buffer, np.uint8, count=9 * run.count, offset=start)
        # Each record is the opcode byte 'G' and a big-endian double.
        return records.reshape(run.count, 9)[:, 1:].view(">f8")[:, 0]


class ReadAhead:
    """A file read whole by a helper thread, for :meth:`TorchArchive.open` to take.

    Reading releases the GIL: a merge reads its second input while it parses
    the first.  Whoever makes one must :meth:`wait` for it before the
    thread's buffer for ``slot`` is read into again.
    """

    def __init__(self, path: str | os.PathLike[str], *, slot: str | None = None) -> None:
        self.path = os.fspath(path)
        self._outcome: tuple[bool, object] = (False, None)
        self._thread = threading.Thread(target=self._read, args=(whole_reader(slot),),
                                        name="dask-merge-read-ahead", daemon=True)
        self._thread.start()

    def _read(self, read: Callable[[BinaryIO], bytes | memoryview]) -> None:
        try:
            self._outcome = True, _read_regular(self.path, read)
        except BaseException as err:  # noqa: BLE001 - raised again by result(), in the caller's thread
            self._outcome = False, err

    def wait(self) -> None:
        """Until the read has ended."""
        self._thread.join()

    def result(self) -> bytes | memoryview:
        """The file's bytes, or the error reading it raised."""
        self.wait()
        ok, value = self._outcome
        if not ok:
            raise value
        return value


def _read_regular(path: str, read: Callable[[BinaryIO], bytes | memoryview]) -> bytes | memoryview:
    """``read`` of the regular file at ``path``; FileFormatError for anything else."""
    # Only a regular file: a device reads forever (/dev/zero) or has
    # effects, a FIFO blocks open() until a writer comes.  Opened
    # without blocking, then checked on the descriptor, so a FIFO
    # swapped in after a stat cannot block either.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with open(fd, "rb") as f:
        if (kind := _special_kind(os.fstat(fd).st_mode)) is not None:
            raise FileFormatError(f"{path}: a {kind}, not a file")
        return read(f)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Within this block, no cyclic garbage collection (unless another thread resumes it).

    A 10,000-row file makes ~200,000 containers, all alive until the load
    ends: the collector would walk them some 150 times for nothing (~5% of a
    merge).  What a forged pickle makes cyclic is collected after the block.
    """
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def archive_records(entries: dict[str, tuple[int, int, int]], size: int,
                    fail: Callable[[str], FileFormatError]) -> dict[str, tuple[int, int]]:
    """The records of a zip archive's members, as torch.load takes them.

    Maps each (method, data offset, size) of :func:`~.zipdir.zip_entries` of
    a ``size``-byte file to (offset, size) under its name without the
    archive's folder; ``fail(what)`` makes the error for what is refused.
    """
    # torch.load takes the first record's folder as the archive's and
    # refuses any record outside it.
    first = next(iter(entries), "")
    prefix = first[: first.find("/") + 1]
    if not prefix:
        raise fail(f"its first record {short_repr(first)} is not in a folder; not a torch archive")
    records = _plain_records(entries, prefix, size)
    if records is not None:
        return records
    records = {}
    for name, (method, start, length) in entries.items():
        if not name.startswith(prefix):
            raise fail(f"record {short_repr(name)} lies outside the archive's folder {prefix!r}")
        if method != 0:
            raise fail(f"record {name!r} is compressed; torch never does that")
        if start + length > size:
            raise fail(f"record {name!r} runs past the end of the file (truncated?)")
        records[name[len(prefix) :]] = start, length
    return records


def _plain_records(entries: dict[str, tuple[int, int, int]], prefix: str, size: int
                   ) -> dict[str, tuple[int, int]] | None:
    """What :func:`archive_records` makes of ``entries`` if none is at fault, at C speed; else None."""
    if not entries:
        return None
    methods, starts, lengths = zip(*entries.values())
    if any(methods) or max(map(add, starts, lengths)) > size or not all(
            map(str.startswith, entries, repeat(prefix))):
        return None
    cut = len(prefix)
    return dict(zip([name[cut:] for name in entries], zip(starts, lengths)))


def _special_kind(mode: int) -> str | None:
    """What a file that is not regular is; None for a regular file.

    >>> _special_kind(os.stat("/dev/null").st_mode), _special_kind(os.stat(".").st_mode)
    ('character device', 'folder')
    """
    if stat.S_ISREG(mode):
        return None
    kinds = {stat.S_ISCHR: "character device", stat.S_ISBLK: "block device", stat.S_ISSOCK: "socket",
             stat.S_ISFIFO: "FIFO (named pipe)", stat.S_ISDIR: "folder"}
    return next((kind for test, kind in kinds.items() if test(mode)), "special file")
