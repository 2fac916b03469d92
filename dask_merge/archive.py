"""Safe reading and writing of ``torch.save`` archives, without importing torch.

A ``.pt`` file written by ``torch.save`` is an uncompressed zip archive that
holds ``ARCHIVE/data.pkl``, a pickle of the saved object, and one record
``ARCHIVE/data/KEY`` with the raw bytes of each tensor storage.

Pickles can run code, and feature files come from shared storage and
downloads.  So this module does not use :mod:`pickle` to read them.  It runs
its own small pickle machine that knows the opcodes plain containers need and
three globals: torch's tensor rebuilder, torch's typed storage names and
``collections.OrderedDict`` (the empty backward-hook table).  Nothing that a
file names is ever imported or called: a global is a token, and ``REDUCE`` of
a token runs this module's own rebuilder.  Anything else is refused with
:class:`~dask_merge.errors.UnsafeFileError` before it could take effect.

Tensors come back as :class:`TensorRef` (a validated view of a storage record,
read on demand) and runs of pickled floats that fill a list as
:class:`FloatRun` (decoded later with numpy in one go).  That is where the
speed comes from: a 10,000-row DNABERT-S file holds 7.68 M pickled floats,
which :func:`torch.load` turns into Python floats one by one.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import reprlib
import stat
import struct
import threading
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

import numpy as np

from .errors import FileFormatError, UnsafeFileError

# The typed storages torch names in its pickles, and the numpy dtype of each.
STORAGE_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(dtype)
    for name, dtype in [
        ("FloatStorage", "<f4"),
        ("DoubleStorage", "<f8"),
        ("HalfStorage", "<f2"),
        ("LongStorage", "<i8"),
        ("IntStorage", "<i4"),
        ("ShortStorage", "<i2"),
        ("CharStorage", "i1"),
        ("ByteStorage", "u1"),
        ("BoolStorage", "?"),
    ]
}
_STORAGE_NAMES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}

# Longest integer (LONG1/LONG4 payload, bytes) and string accepted in a pickle.
_MAX_LONG_BYTES = 64
# Largest stride (in items) a tensor may declare: keeps byte strides in 64 bits.
_MAX_STRIDE = 2**52
# Most dimensions a tensor may declare (torch's own kernels stop at 25): the
# checks multiply sizes, and a forged shape of 30,000 huge ints would take minutes.
_MAX_DIMS = 64

# repr() of what a hostile pickle built may recurse too deep or run long:
# error messages show values through this bounded repr instead.
_short = reprlib.Repr()
_short.maxlevel, _short.maxstring, _short.maxother = 3, 80, 80
short_repr = _short.repr


# Named tuples, not dataclasses: a file makes one of each per tensor, and a
# tuple is three times cheaper to build.
class StorageRef(NamedTuple):
    """A storage record of the archive: ``numel`` items of ``dtype`` at ``key``."""

    key: str
    dtype: np.dtype
    numel: int


class TensorRef(NamedTuple):
    """A tensor as the pickle describes it; checked to lie inside its storage."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class FloatRun(NamedTuple):
    """``count`` consecutive pickled floats (BINFLOAT) at ``offset`` in the pickle."""

    offset: int
    count: int


@dataclass(frozen=True, slots=True)
class _Global:
    """A global the pickle named and this module allows; never called."""

    module: str
    name: str


_REBUILD_TENSOR = _Global("torch._utils", "_rebuild_tensor_v2")
_ORDERED_DICT = _Global("collections", "OrderedDict")
_ALLOWED_GLOBALS = {
    (g.module, g.name): g for g in [_REBUILD_TENSOR, _ORDERED_DICT]
} | {("torch", name): _Global("torch", name) for name in STORAGE_DTYPES}


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

        Inside :func:`reused_read_buffers`, into the buffer kept for ``slot``
        (if given): the archive and its arrays then live until the next
        archive of that slot is opened in this thread.
        """
        path = os.fspath(path)
        try:
            # A device reads forever (/dev/zero) or has effects; a FIFO is a
            # pipe from another program, and is read to its end.
            if (kind := _special_kind(os.stat(path).st_mode)) is not None:
                raise FileFormatError(f"{path}: a {kind}, not a file")
            with open(path, "rb") as f:
                return cls(_read(f, slot), path)
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
            entries = _zip_entries(self.buffer)
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
            return _Unpickler(self).run()
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


class _ReadBuffers(threading.local):
    pool: dict[str, bytearray] | None = None


_read_buffers = _ReadBuffers()
_keep_buffers = False  # see keep_read_buffers


@contextlib.contextmanager
def reused_read_buffers() -> Iterator[None]:
    """Within this block, archives opened with a ``slot`` reuse that slot's buffer.

    Reading a big pair (168 MB) into new memory costs some 43,000 page faults,
    each a page the kernel zeroes first: 70 ms of a 0.5 s merge, and memory
    bandwidth that parallel workers share.  Reading into the same buffer
    again costs none.  The price: an archive's arrays are overwritten when
    the next archive of its slot is opened, so nothing read in the block may
    be kept past its merge.
    """
    if _read_buffers.pool is not None:  # nested, or kept for good
        yield
        return
    _read_buffers.pool = {}
    try:
        yield
    finally:
        if not _keep_buffers:
            _read_buffers.pool = None


def keep_read_buffers() -> None:
    """Keep each thread's read buffers past its blocks: for a process that lives for one run.

    A worker of the pool, or of a cluster started for one run, then reads each
    pair into the memory of the previous one, even with one pair per task.
    """
    global _keep_buffers
    _keep_buffers = True


def _special_kind(mode: int) -> str | None:
    """What a file that is neither regular nor a FIFO is; None for those two.

    >>> _special_kind(os.stat("/dev/null").st_mode), _special_kind(os.stat(".").st_mode)
    ('character device', None)
    """
    kinds = {stat.S_ISCHR: "character device", stat.S_ISBLK: "block device", stat.S_ISSOCK: "socket"}
    return next((kind for test, kind in kinds.items() if test(mode)), None)


def _read(f: BinaryIO, slot: str | None) -> bytes | memoryview:
    """The whole file; inside :func:`reused_read_buffers`, into ``slot``'s buffer."""
    pool = _read_buffers.pool
    if pool is None or slot is None:
        return f.read()
    size = os.fstat(f.fileno()).st_size
    buffer = pool.get(slot)
    if buffer is None or len(buffer) <= size:
        # Replaced, never resized: a view of the old one may still be alive.
        buffer = pool[slot] = bytearray(size + 1 + size // 8)
    view = memoryview(buffer)
    read = f.readinto(view)
    if read < len(buffer):
        return view[:read]
    # Longer than its size said (it grew as we read it, or it is a pipe).
    return bytes(view) + f.read()


# --- the zip container ------------------------------------------------------------

_END = struct.Struct("<4s4H2LH")  # end of central directory
_END64_LOCATOR = struct.Struct("<4sLQL")
_END64 = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # central directory file header
_LOCAL = struct.Struct("<4s5H3L2H")  # local file header


def _zip_entries(buffer: bytes | memoryview) -> dict[str, tuple[int, int, int]]:
    """Map each member of a zip archive to (method, data offset, size).

    :mod:`zipfile` does the same, but builds a ``ZipInfo`` per member: an ESM
    file has 10,000 of them and this is four times faster.  Offsets and sizes
    come from the central directory (torch's local headers leave them zero);
    the data starts after the local header, whose extra field (torch's
    alignment padding) differs from the central one.  Any inconsistency
    raises ``ValueError`` or ``struct.error``.

    >>> import io, zipfile
    >>> f = io.BytesIO()
    >>> with zipfile.ZipFile(f, "w") as z:
    ...     z.writestr("a/data.pkl", b"hello")
    >>> _zip_entries(f.getvalue())
    {'a/data.pkl': (0, 40, 5)}
    """
    tail = max(0, len(buffer) - _END.size - 0xFFFF)  # the end record and its comment
    end = bytes(buffer[tail:]).rfind(b"PK\x05\x06")
    if end < 0:
        raise ValueError("no end of central directory")
    end += tail
    _, _, _, _, count, size, offset, _ = _END.unpack_from(buffer, end)
    if 0xFFFF in (count,) or 0xFFFFFFFF in (size, offset):
        locator = _END64_LOCATOR.unpack_from(buffer, end - _END64_LOCATOR.size)
        if locator[0] != b"PK\x06\x07":
            raise ValueError("a zip64 archive without its end record locator")
        if locator[2] > end - _END64.size:  # struct cannot even take a 2**63 offset
            raise ValueError("the zip64 end record lies outside the file")
        record = _END64.unpack_from(buffer, locator[2])
        if record[0] != b"PK\x06\x06":
            raise ValueError("a broken zip64 end record")
        count, size, offset = record[7], record[8], record[9]
    if offset + size > end:
        raise ValueError("the central directory runs past its end record")
    entries = {}
    position = offset
    for _ in range(count):
        (signature, _, _, _, method, _, _, _, compressed, plain, name_length, extra_length,
         comment_length, _, _, _, local) = _CENTRAL.unpack_from(buffer, position)
        if signature != b"PK\x01\x02":
            raise ValueError(f"a broken central directory entry at byte {position}")
        name_start = position + _CENTRAL.size
        name = str(buffer[name_start : name_start + name_length], "utf-8")
        if 0xFFFFFFFF in (compressed, plain, local):
            plain, compressed, local = _zip64_extra(
                buffer[name_start + name_length : name_start + name_length + extra_length],
                plain, compressed, local)
        position = name_start + name_length + extra_length + comment_length
        if local > offset - _LOCAL.size:  # local headers precede the central directory
            raise ValueError(f"member {name!r} has its local header outside the file")
        header = _LOCAL.unpack_from(buffer, local)
        if header[0] != b"PK\x03\x04":
            raise ValueError(f"member {name!r} has a broken local header")
        entries[name] = method, local + _LOCAL.size + header[9] + header[10], plain
    if len(entries) != count:
        raise ValueError("two members share a name")
    return entries


def _zip64_extra(extra: bytes, *fields: int) -> tuple[int, ...]:
    """Replace the 0xFFFFFFFF ``fields`` by their 64-bit values from a zip64 extra block."""
    position = 0
    while position + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, position)
        if tag == 1:
            values = list(struct.unpack_from(f"<{length // 8}Q", extra, position + 4))
            if len(values) < fields.count(0xFFFFFFFF):
                raise ValueError("a zip64 extra field too short for its member")
            return tuple(values.pop(0) if f == 0xFFFFFFFF else f for f in fields)
        position += 4 + length
    raise ValueError("a zip64 member without its zip64 extra field")


# Opcodes, as the integers that indexing a bytes object gives.
_APPENDS = ord("e")


def _float_run_length(ops: np.ndarray) -> int:
    """Count the leading 'G' opcodes in ``ops`` (every 9th byte from a 'G').

    In growing steps, so that a short run costs little: a forged file may hold
    millions of them.
    """
    start, step = 0, 16
    while start < len(ops):
        other = np.flatnonzero(ops[start : start + step] != 0x47)
        if other.size:
            return start + int(other[0])
        start, step = start + step, step * 2
    return len(ops)


# A tensor record of a protocol 2 pickle after the first, from the opcode
# after the rebuilder's memo get (see _Unpickler._tensor_record):
#   ((storage, FloatStorage, KEY, cpu, NUMEL) BINPERSID, OFFSET, (SIZE,),
#   (STRIDE,), False, OrderedDict()) REDUCE
_GET, _PUT, _INT = rb"(h.|j.{4})", rb"(q.|r.{4})", rb"(K.|M..|J.{4})"
_TENSOR_RECORD = re.compile(
    rb"\(\(" + _GET + _GET + rb"X([\x01-\x14])\x00\x00\x00([0-9]+)" + _PUT + _GET + _INT
    + rb"t" + _PUT + rb"Q" + _INT + _INT + rb"\x85" + _PUT + _INT + rb"\x85" + _PUT
    + rb"\x89" + _GET + rb"\)R" + _PUT + rb"t" + _PUT + rb"R" + _PUT,
    re.DOTALL,
)


# A DNABERT-S row after the first, from the opcode after its EMPTY_DICT up
# to its first float: {label: ID, mean_representation: [...]}
_ROW_RECORD = re.compile(_PUT + rb"\(" + _GET + _GET + _GET + rb"\]" + _PUT + rb"\(G", re.DOTALL)


def _get_index(raw: bytes) -> int:
    """The memo index of a BINGET, LONG_BINGET, BINPUT or LONG_BINPUT."""
    return raw[1] if len(raw) == 2 else int.from_bytes(raw[1:], "little")


def _small_int(raw: bytes) -> int:
    """The value of a BININT1, BININT2 (unsigned) or BININT (signed)."""
    return int.from_bytes(raw[1:], "little", signed=raw[0] == 0x4A)


_SHORT_PUTS, _LONG_PUTS = struct.Struct("<" + "xB" * 7), struct.Struct("<" + "xI" * 7)


def _put_indices(puts: bytes) -> tuple[int, ...]:
    r"""The memo indices of seven BINPUTs or seven LONG_BINPUTs, concatenated.

    >>> _put_indices(b"q\x07" * 7), _put_indices(b"r\x08\x00\x00\x00" * 7)[:2]
    ((7, 7, 7, 7, 7, 7, 7), (8, 8))
    >>> _put_indices(b"q\x07" * 6 + b"r\x08\x00\x00\x00")  # mixed: not a record
    ()
    """
    if len(puts) == _LONG_PUTS.size:
        return _LONG_PUTS.unpack(puts)
    if len(puts) == _SHORT_PUTS.size:
        return _SHORT_PUTS.unpack(puts)
    return ()


class _Unpickler:
    """A pickle machine for protocols 2 to 5 that runs nothing from the file.

    It knows the opcodes that dicts, lists, tuples, str, int, float, bool and
    None need, memo access, persistent ids of storages and ``REDUCE`` of the
    allowed globals.  Its memo takes entries 0, 1, 2, ... once each, as a
    pickler writes them, and it has no recursion, so a hostile file can at
    worst be refused.
    """

    def __init__(self, archive: TorchArchive):
        self.archive = archive
        # The machine reads the archive's bytes in place: positions are
        # absolute, and ``base`` turns them into data.pkl offsets.
        self.data = archive.buffer
        self.base = archive.pickle_offset
        self.end = archive.pickle_offset + archive.pickle_size
        self._templates: dict[tuple[bytes, ...], tuple] = {}  # see _tensor_record
        self._run_hint, self._run_ops = 0, b""  # see _float_run

    def _refuse(self, pos: int, what: str) -> UnsafeFileError:
        return UnsafeFileError(
            f"{self.archive.path}: refused to unpickle {what} (data.pkl byte {pos - self.base}); "
            "feature files may hold only tensors and plain containers, nothing was run"
        )

    def _broken(self, pos: int, what: str) -> FileFormatError:
        return FileFormatError(
            f"{self.archive.path}: broken pickle at data.pkl byte {pos - self.base}: {what}"
        )

    def run(self) -> object:  # noqa: C901 - one flat loop is what keeps it fast
        data, base, n = self.data, self.base, self.end
        stack: list = []
        marks: list[int] = []
        memo: dict[int, object] = {}
        unpack_from = struct.unpack_from
        pos = base
        try:
            # Branches are ordered by how often torch's pickles use them.
            while pos < n:
                op = data[pos]
                pos += 1
                if op == 0x71 or op == 0x72:  # BINPUT, LONG_BINPUT
                    index = data[pos] if op == 0x71 else unpack_from("<I", data, pos)[0]
                    # A pickler numbers memo entries 0, 1, 2, ... and puts each
                    # once.  Any other index is forged: a far one would make
                    # CPython's unpickler allocate for it, an old one would
                    # change what earlier gets meant (see _tensor_record).
                    if index != len(memo):
                        raise self._refuse(pos, f"memo index {index} after {len(memo)} memo entries")
                    memo[index] = stack[-1]
                    pos += 1 if op == 0x71 else 4
                elif op == 0x68 or op == 0x6A:  # BINGET, LONG_BINGET
                    if op == 0x68:
                        value, pos = memo[data[pos]], pos + 1
                    else:
                        value, pos = memo[unpack_from("<I", data, pos)[0]], pos + 4
                    # A tensor after the first: take its whole record at once.
                    if value is _REBUILD_TENSOR and (found := self._tensor_record(pos, memo)):
                        value, pos = found
                    stack.append(value)
                elif op == 0x28:  # MARK
                    marks.append(len(stack))
                elif op == 0x4B:  # BININT1
                    stack.append(data[pos])
                    pos += 1
                elif op == 0x4D:  # BININT2
                    stack.append(data[pos] | data[pos + 1] << 8)
                    pos += 2
                elif op == 0x85:  # TUPLE1
                    stack[-1] = (stack[-1],)
                elif op == 0x74:  # TUPLE
                    first = marks.pop()
                    items = tuple(stack[first:])
                    del stack[first:]
                    stack.append(items)
                elif op == 0x52:  # REDUCE
                    args = stack.pop()
                    stack[-1] = self._reduce(pos, stack[-1], args)
                elif op == 0x58 or op == 0x8C or op == 0x8D:  # BINUNICODE, SHORT_, 8
                    if op == 0x58:
                        size, pos = unpack_from("<I", data, pos)[0], pos + 4
                    elif op == 0x8C:
                        size, pos = data[pos], pos + 1
                    else:
                        size, pos = unpack_from("<Q", data, pos)[0], pos + 8
                    if pos + size > n:
                        raise self._broken(pos, "string runs past the end of the pickle")
                    stack.append(str(data[pos : pos + size], "utf-8", "surrogatepass"))
                    pos += size
                elif op == 0x51:  # BINPERSID
                    stack[-1] = self._persistent(pos, stack[-1])
                elif op == 0x89 or op == 0x88:  # NEWFALSE, NEWTRUE
                    stack.append(op == 0x88)
                elif op == 0x29:  # EMPTY_TUPLE
                    stack.append(())
                elif op == 0x47:  # BINFLOAT: take the whole run at once
                    run, end = self._float_run(pos - 1)
                    if run is None:
                        stack.extend(unpack_from(">d", data, p + 1)[0] for p in range(pos - 1, end, 9))
                    else:
                        stack.append(run)
                    pos = end
                elif op == _APPENDS:
                    items = stack[marks.pop() :]
                    del stack[len(stack) - len(items) :]
                    self._list(pos, stack[-1]).extend(items)
                elif op == 0x61:  # APPEND
                    item = stack.pop()
                    self._list(pos, stack[-1]).append(item)
                elif op == 0x75 or op == 0x73:  # SETITEMS, SETITEM
                    first = marks.pop() if op == 0x75 else len(stack) - 2
                    items = stack[first:]
                    del stack[first:]
                    self._setitems(pos, stack[-1], items)
                elif op == 0x7D:  # EMPTY_DICT
                    # A DNABERT-S row after the first: take it at once.
                    if found := self._row_record(pos, memo):
                        value, pos = found
                        stack.append(value)
                    else:
                        stack.append({})
                elif op == 0x5D:  # EMPTY_LIST
                    stack.append([])
                elif op == 0x86 or op == 0x87:  # TUPLE2, TUPLE3
                    size = op - 0x84
                    items = tuple(stack[-size:])
                    del stack[-size:]
                    stack.append(items)
                elif op == 0x94:  # MEMOIZE
                    memo[len(memo)] = stack[-1]
                elif op == 0x4A:  # BININT
                    stack.append(unpack_from("<i", data, pos)[0])
                    pos += 4
                elif op == 0x8A or op == 0x8B:  # LONG1, LONG4
                    size_len = 1 if op == 0x8A else 4
                    size = data[pos] if op == 0x8A else unpack_from("<i", data, pos)[0]
                    pos += size_len
                    if not 0 <= size <= _MAX_LONG_BYTES:
                        raise self._refuse(pos, f"an integer of {size} bytes")
                    stack.append(int.from_bytes(data[pos : pos + size], "little", signed=True))
                    pos += size
                elif op == 0x4E:  # NONE
                    stack.append(None)
                elif op == 0x63:  # GLOBAL: "module\nname\n"
                    module, name, pos = self._global_lines(pos)
                    stack.append(self._global(pos, module, name))
                elif op == 0x93:  # STACK_GLOBAL
                    name, module = stack.pop(), stack.pop()
                    if type(module) is not str or type(name) is not str:
                        raise self._broken(pos, "STACK_GLOBAL needs two strings")
                    stack.append(self._global(pos, module, name))
                elif op == 0x80:  # PROTO
                    if not 2 <= data[pos] <= 5:
                        raise self._broken(pos, f"pickle protocol {data[pos]}")
                    pos += 1
                elif op == 0x95:  # FRAME: a hint for buffered readers; skip it
                    pos += 8
                elif op == 0x30:  # POP
                    if marks and marks[-1] == len(stack):
                        marks.pop()
                    else:
                        stack.pop()
                elif op == 0x31:  # POP_MARK
                    del stack[marks.pop() :]
                elif op == 0x2E:  # STOP
                    if len(stack) != 1 or marks:
                        raise self._broken(pos, "STOP with a malformed stack")
                    return stack[0]
                else:
                    raise self._refuse(pos - 1, f"opcode {bytes([op])!r}")
            raise self._broken(pos, "the pickle ends without STOP (truncated file?)")
        except (IndexError, KeyError, struct.error, UnicodeDecodeError) as err:
            # Popping an empty stack or mark list, a memo index never stored,
            # reading past the end, a string that is not UTF-8: all mean a
            # truncated or forged pickle.
            raise self._broken(pos, f"{type(err).__name__}: {err} (truncated file?)") from None

    def _float_run(self, begin: int) -> tuple[FloatRun | None, int]:
        """The run of BINFLOATs at ``begin`` and where it ends.

        A run that fills a list (APPENDS follows) comes back as a
        :class:`FloatRun`, decoded later in one go; any other as None.
        """
        data, n = self.data, self.end
        end = begin + 9 * self._run_hint
        # Rows of one file share a width: try the last run's first.
        if end < n and data[end] == _APPENDS and data[begin:end:9] == self._run_ops:
            run = self._run_hint
        else:
            if begin + 9 < n and data[begin + 9] != 0x47:  # a lone float: no numpy
                run = 1
            else:
                ops = np.frombuffer(data, np.uint8, count=n - begin, offset=begin)[::9]
                run = _float_run_length(ops)
            end = begin + 9 * run
            # Any run measured becomes the hint: a long hint that keeps failing
            # would cost its length at each float (quadratic in a forged file).
            if run != self._run_hint:
                self._run_hint, self._run_ops = run, b"G" * run
        if end < n and data[end] == _APPENDS:
            return FloatRun(begin - self.base, run), end
        return None, end

    def _row_record(self, pos: int, memo: dict) -> tuple[dict, int] | None:
        """Read a whole DNABERT-S row after its EMPTY_DICT at ``pos``.

        After the first row, each is ``{'label': id, 'mean_representation':
        [floats]}`` with both keys and the id as memo gets.  Like
        :meth:`_tensor_record`: the same effect as the opcodes, or None.
        """
        match = _ROW_RECORD.match(self.data, pos)
        if match is None:
            return None
        put_row, label_get, id_get, values_get, put_values = match.groups()
        first = len(memo)
        if _get_index(put_row) != first or _get_index(put_values) != first + 1:
            return None
        label_key, seq_id, values_key = (memo.get(_get_index(g)) for g in (label_get, id_get, values_get))
        if type(label_key) is not str or type(values_key) is not str or seq_id is None:
            return None
        run, end = self._float_run(match.end() - 1)
        if run is None or self.data[end : end + 2] != b"eu":
            return None
        values = [run]
        row = {label_key: seq_id, values_key: values}
        memo[first], memo[first + 1] = row, values
        return row, end + 2

    def _tensor_record(self, pos: int, memo: dict) -> tuple[TensorRef, int] | None:
        """Read a whole tensor record after the rebuilder's memo get at ``pos``.

        Protocol 2 pickles of many tensors (an ESM file: one per row) repeat
        one record in which only the storage key and the memo puts change;
        after the first, every global and constant string is a memo get.
        One regular expression match replaces ~30 opcode steps, and what the
        records share (the gets, the sizes) is checked once.  The effect is
        exactly what the opcodes would do: the same checks, the same memo
        entries.  Anything unexpected returns None and the opcodes run one
        by one.
        """
        match = _TENSOR_RECORD.match(self.data, pos)
        if match is None:
            return None
        (storage_get, type_get, key_length, key, put_key, location_get, numel, put_pid,
         offset, size, put_shape, stride, put_stride, odict_get, *put_rest) = match.groups()
        shared = storage_get, type_get, location_get, numel, offset, size, stride, odict_get
        # Keyed by the gets' bytes: sound because a memo entry, once put, is never replaced.
        template = self._templates.get(shared) or self._check_template(pos, shared, memo)
        if template is None:
            return None
        first = len(memo)
        puts = b"".join((put_key, put_pid, put_shape, put_stride, *put_rest))
        if len(key) != key_length[0] or _put_indices(puts) != tuple(range(first, first + 7)):
            return None
        storage_type, location, dtype, numel, offset, shape, strides = template
        key = str(key, "ascii")
        storage = self.archive.storage_ref(key, dtype, numel)
        tensor = TensorRef(storage, offset, shape, strides)
        pid = ("storage", storage_type, key, location, numel)
        hooks = {}
        args = (storage, offset, shape, strides, False, hooks)
        memo.update(zip(range(first, first + 7), (key, pid, shape, strides, hooks, args, tensor)))
        return tensor, match.end()

    def _check_template(self, pos: int, shared: tuple[bytes, ...], memo: dict) -> tuple | None:
        """Check what tensor records share, once; None if it is not torch's."""
        storage_get, type_get, location_get, *ints, odict_get = shared
        storage, storage_type, location, odict = (
            memo.get(_get_index(g)) for g in (storage_get, type_get, location_get, odict_get)
        )
        if not (storage == "storage" and type(storage_type) is _Global
                and storage_type.module == "torch" and storage_type.name in STORAGE_DTYPES
                and type(location) is str and odict is _ORDERED_DICT):
            return None
        numel, offset, size, stride = map(_small_int, ints)
        dtype, shape, strides = STORAGE_DTYPES[storage_type.name], (size,), (stride,)
        try:  # the view's checks depend on these alone
            self._tensor(pos, StorageRef("", dtype, numel), offset, shape, strides, False, {})
        except FileFormatError:
            return None
        template = storage_type, location, dtype, numel, offset, shape, strides
        self._templates[shared] = template
        return template

    def _global_lines(self, pos: int) -> tuple[str, str, int]:
        """Read GLOBAL's "module\\nname\\n" argument; return it and the next position."""
        lines = bytes(self.data[pos : min(pos + 512, self.end)]).split(b"\n", 2)
        if len(lines) < 3:
            raise self._broken(pos, "GLOBAL without its two lines")
        module, name = (str(line, "utf-8", "replace") for line in lines[:2])
        return module, name, pos + len(lines[0]) + len(lines[1]) + 2

    def _setitems(self, pos: int, target: object, items: list) -> None:
        if type(target) is not dict or len(items) % 2:
            raise self._broken(pos, f"SETITEMS on a {type(target).__name__}")
        for key, value in zip(items[::2], items[1::2]):
            if type(key) not in (str, int):
                raise self._refuse(pos, f"a dict key of type {type(key).__name__}")
            target[key] = value

    def _list(self, pos: int, target: object) -> list:
        if type(target) is not list:
            raise self._broken(pos, f"APPEND to a {type(target).__name__}")
        return target

    def _global(self, pos: int, module: str, name: str) -> _Global:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise self._refuse(pos, f"global {module}.{name}")
        return allowed

    def _persistent(self, pos: int, pid: object) -> StorageRef:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise self._refuse(pos, f"persistent id {short_repr(pid)}")
        _, storage_type, key, location, numel = pid
        if type(storage_type) is not _Global or storage_type.name not in STORAGE_DTYPES:
            raise self._refuse(pos, f"storage type {short_repr(storage_type)}")
        if type(location) is not str:
            raise self._broken(pos, f"storage location {short_repr(location)}")
        return self.archive.storage_ref(key, STORAGE_DTYPES[storage_type.name], numel)

    def _reduce(self, pos: int, func: object, args: object) -> object:
        if type(args) is not tuple:
            raise self._broken(pos, "REDUCE without an argument tuple")
        if func is _REBUILD_TENSOR and len(args) in (6, 7):
            return self._tensor(pos, *args[:6])
        if func is _ORDERED_DICT and args == ():
            return {}
        raise self._refuse(pos, f"a call of {short_repr(func)} with {len(args)} arguments")

    def _tensor(self, pos, storage, offset, shape, stride, requires_grad, hooks) -> TensorRef:
        # The tuple checks come first: len() of anything else would raise.
        if not (type(shape) is tuple and type(stride) is tuple and len(shape) == len(stride)
                and {*map(type, shape + stride)} <= _INT_TYPE and type(storage) is StorageRef
                and type(offset) is int and type(requires_grad) is bool and hooks == {}):
            raise self._broken(pos, "tensor with malformed arguments")
        if len(shape) > _MAX_DIMS:
            raise self._broken(pos, f"tensor with {len(shape)} dimensions (at most {_MAX_DIMS})")
        sizes = shape + stride
        if min(sizes, default=0) < 0 or offset < 0 or max(stride, default=0) > _MAX_STRIDE:
            raise self._broken(pos, f"tensor with negative offset, size or stride, or absurd stride {stride}")
        # More items than the storage holds means overlapping (expanded)
        # views: never in a feature file, and a forged size (2**40 items
        # with stride 0) would make a merge allocate terabytes.
        if math.prod(shape) > storage.numel:
            raise self._broken(
                pos, f"tensor of size {shape} has more items than its storage of {storage.numel}"
            )
        # The furthest item the view reaches must lie inside its storage.
        if 0 not in shape and offset + sum(map(_reach, shape, stride)) >= storage.numel:
            raise self._broken(
                pos, f"tensor of size {shape} reaches past its storage of {storage.numel} items"
            )
        return TensorRef(storage, offset, shape, stride)


def _reach(size: int, stride: int) -> int:
    return (size - 1) * stride


_INT_TYPE = {int}


# --- writing ----------------------------------------------------------------


def _pickle_str(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _pickle_int(value: int) -> bytes:
    """The opcodes of an int: BININT, LONG1 or LONG4 (from 256 bytes on).

    >>> import pickle
    >>> values = (7, -2**31, 2**31, -2**2040, 2**2100)
    >>> [pickle.loads(b"\\x80\\x02" + _pickle_int(v) + b".") == v for v in values]
    [True, True, True, True, True]
    """
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    if len(raw) < 256:
        return b"\x8a" + bytes([len(raw)]) + raw  # LONG1
    return b"\x8b" + struct.pack("<i", len(raw)) + raw  # LONG4


class ArrayBlocks(NamedTuple):
    """An array of ``shape`` and ``dtype`` given as consecutive C-order blocks.

    :func:`write_archive` writes it block by block, so the whole array is
    never in memory: a merge fills a few hundred rows, writes them, reuses
    the buffer.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    blocks: Iterable[np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _pickle_tensor(key: str, shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The opcodes ``torch.save`` writes for a contiguous CPU tensor."""
    strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n(("
        + _pickle_str("storage") + f"ctorch\n{_STORAGE_NAMES[dtype]}\n".encode()
        + _pickle_str(key) + _pickle_str("cpu") + _pickle_int(math.prod(shape))
        + b"tQ" + _pickle_int(0)
        + b"(" + b"".join(map(_pickle_int, shape)) + b"t"
        + b"(" + b"".join(map(_pickle_int, strides)) + b"t"
        + b"\x89ccollections\nOrderedDict\n)RtR"
    )


def _pickle_value(value: object, arrays: list[np.ndarray | ArrayBlocks]) -> bytes:
    if isinstance(value, str):
        return _pickle_str(value)
    if isinstance(value, bool) or not isinstance(value, (int, list, dict, np.ndarray, ArrayBlocks)):
        raise TypeError(f"cannot write a {type(value).__name__} into a feature file")
    if isinstance(value, int):
        return _pickle_int(value)
    if isinstance(value, list):
        return b"](" + b"".join(_pickle_value(v, arrays) for v in value) + b"e"
    if isinstance(value, dict):
        return b"}(" + b"".join(
            _pickle_str(k) + _pickle_value(v, arrays) for k, v in value.items()
        ) + b"u"
    if value.dtype not in _STORAGE_NAMES:
        raise TypeError(f"cannot write an array of {value.dtype} into a feature file")
    # Not np.ascontiguousarray: it turns a 0-d array into a 1-d one.
    if isinstance(value, np.ndarray) and not value.flags.c_contiguous:
        value = value.copy(order="C")
    arrays.append(value)
    return _pickle_tensor(str(len(arrays) - 1), value.shape, value.dtype)


def _flat_bytes(payload: bytes | np.ndarray) -> memoryview:
    # memoryview.cast refuses arrays with a zero in their shape: view as bytes first.
    return memoryview(payload.reshape(-1).view(np.uint8) if isinstance(payload, np.ndarray) else payload)


def _aligned_info(zf: zipfile.ZipFile, name: str, size: int, alignment: int = 64) -> zipfile.ZipInfo:
    """A stored ZipInfo whose data will start on an ``alignment`` boundary.

    torch aligns storages so that ``torch.load(mmap=True)`` can map them; it pads
    the local header's extra field with an 'FB' block, and so do we.
    """
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT
    header_end = zf.fp.tell() + 30 + len(name.encode()) + (20 if zip64 else 0)
    pad = -(header_end + 4) % alignment
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    return info


def write_archive(file: BinaryIO, obj: Mapping[str, object], *, name: str = "archive") -> None:
    """Write ``obj`` to ``file`` as ``torch.save`` would, readable by ``torch.load``.

    ``obj`` may hold str, int, lists and dicts of them, and numpy arrays of the
    dtypes in :data:`STORAGE_DTYPES`, which become tensors.  Nothing else: the
    output must load under ``torch.load``'s safe default.

    >>> import io
    >>> buffer = io.BytesIO()
    >>> write_archive(buffer, {"ids": ["a"], "data": np.arange(4, dtype=np.float32).reshape(2, 2)})
    >>> saved = TorchArchive(buffer.getvalue(), "<memory>").load()
    >>> saved["ids"], saved["data"].shape
    (['a'], (2, 2))
    """
    arrays: list[np.ndarray | ArrayBlocks] = []
    pickled = b"\x80\x02" + _pickle_value(dict(obj), arrays) + b"."
    records: list[tuple[str, bytes | np.ndarray | ArrayBlocks]] = [  # torch's order
        (f"{name}/data.pkl", pickled),
        (f"{name}/.format_version", b"1"),
        (f"{name}/.storage_alignment", b"64"),
        (f"{name}/byteorder", b"little"),
        *((f"{name}/data/{i}", a) for i, a in enumerate(arrays)),
        (f"{name}/version", b"3\n"),
    ]
    if sum(_payload_size(p) for _, p in records) <= SMALL_ARCHIVE:
        # zipfile seeks back to each member's header: on a real file, some
        # 40 system calls per small archive; in memory, then one write.
        buffer = io.BytesIO()
        _zip(buffer, records)
        file.write(buffer.getbuffer())
    else:
        _zip(file, records)


SMALL_ARCHIVE = 1 << 20


def _payload_size(payload: bytes | np.ndarray | ArrayBlocks) -> int:
    return payload.nbytes if isinstance(payload, ArrayBlocks) else _flat_bytes(payload).nbytes


def _zip(file: BinaryIO, records: list[tuple[str, bytes | np.ndarray | ArrayBlocks]]) -> None:
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for record, payload in records:
            blocks = payload.blocks if isinstance(payload, ArrayBlocks) else [payload]
            size = _payload_size(payload)
            info = _aligned_info(zf, record, size)
            written = 0
            with zf.open(info, "w") as out:
                for block in blocks:
                    written += out.write(_flat_bytes(block))
            if written != size:
                raise ValueError(f"{record}: {written} bytes given for an array of {size}")
