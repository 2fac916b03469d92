"""A ``torch.save`` archive, read safely and lazily, without importing torch."""

from __future__ import annotations

import os
import stat
import struct

import numpy as np

from ..errors import FileFormatError
from .buffers import read_whole
from .refs import FloatRun, StorageRef, TensorRef, short_repr
from .unpickler import Unpickler
from .zipdir import zip_entries


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
        self.pickle_offset, self.pickle_size = self._record("data.pkl")
        self._check_byteorder()

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, slot: str | None = None) -> TorchArchive:
        """Read the archive at ``path``.

        Inside :func:`~dask_merge.torchfile.reused_read_buffers`, into the
        buffer kept for ``slot`` (if given): the archive and its arrays then
        live until the next archive of that slot is opened in this thread.
        """
        path = os.fspath(path)
        try:
            # A device reads forever (/dev/zero) or has effects; a FIFO is a
            # pipe from another program, and is read to its end.
            if (kind := _special_kind(os.stat(path).st_mode)) is not None:
                raise FileFormatError(f"{path}: a {kind}, not a file")
            with open(path, "rb") as f:
                return cls(read_whole(f, slot), path)
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
        pickles = [name for name in entries if name.endswith("data.pkl")]
        if len(pickles) != 1 or pickles[0].count("/") != 1:
            raise self._fail(f"expected one ARCHIVE/data.pkl record, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        records = {}
        for name, (method, start, size) in entries.items():
            if not name.startswith(prefix):
                continue
            if method != 0:
                raise self._fail(f"record {name!r} is compressed; torch never does that")
            if start + size > len(self.buffer):
                raise self._fail(f"record {name!r} runs past the end of the file (truncated?)")
            records[name[len(prefix) :]] = start, size
        return records

    def _check_byteorder(self) -> None:
        # torch.save records sys.byteorder (files without the record are
        # little-endian); storages hold native bytes.  Reading big-endian
        # storages as little-endian would give garbage values silently.
        start, size = self._records.get("byteorder", (0, 0))
        order = bytes(self.buffer[start : start + size]) if size else b"little"
        if order != b"little":
            raise self._fail(
                f"its storages are in {order[:20].decode('ascii', 'replace')!r} byte order "
                "(saved on a big-endian machine); only little-endian files are supported"
            )

    def _record(self, name: str) -> tuple[int, int]:
        try:
            return self._records[name]
        except KeyError:
            raise self._fail(f"the archive has no record {name!r}") from None

    def load(self) -> object:
        """Unpickle ``data.pkl`` safely; tensors come back as :class:`TensorRef`."""
        try:
            return Unpickler(self).run()
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
        _, size = self._records.get(f"data/{key}", (0, None))
        if size is None:
            raise self._fail(f"the pickle points at storage {key!r}, which the archive does not hold")
        if numel * dtype.itemsize > size:
            raise self._fail(
                f"storage {key!r} declares {numel} items of {dtype} but holds only {size} bytes"
            )
        return StorageRef(key, dtype, numel)

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


def _special_kind(mode: int) -> str | None:
    """What a file that is neither regular nor a FIFO is; None for those two.

    >>> _special_kind(os.stat("/dev/null").st_mode), _special_kind(os.stat(".").st_mode)
    ('character device', None)
    """
    kinds = {stat.S_ISCHR: "character device", stat.S_ISBLK: "block device", stat.S_ISSOCK: "socket"}
    return next((kind for test, kind in kinds.items() if test(mode)), None)
