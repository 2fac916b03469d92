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

import io
import math
import os
import reprlib
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO

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

# repr() of what a hostile pickle built may recurse too deep or run long:
# error messages show values through this bounded repr instead.
_short = reprlib.Repr()
_short.maxlevel, _short.maxstring, _short.maxother = 3, 80, 80
short_repr = _short.repr


@dataclass(frozen=True, slots=True)
class StorageRef:
    """A storage record of the archive: ``numel`` items of ``dtype`` at ``key``."""

    key: str
    dtype: np.dtype
    numel: int


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor as the pickle describes it; checked to lie inside its storage."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class FloatRun:
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
        The whole file's bytes.  Use :meth:`open` to read a file: it reads it
        once, whole, so later changes on disk cannot tear a read in half (an
        ``mmap`` could, and would crash the process on a shrunk file).
    path
        Where the bytes came from; every error message names it.

    Raises
    ------
    FileFormatError
        The file is empty, truncated, compressed or not a torch zip archive.
    """

    def __init__(self, buffer: bytes, path: str):
        self.buffer = buffer
        self.path = path
        self._records = self._index_records()
        self.pickle_offset, self.pickle_size = self._record("data.pkl")
        self._check_byteorder()

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> TorchArchive:
        """Read the archive at ``path``."""
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                return cls(f.read(), path)
        except OSError as err:
            raise FileFormatError(f"{path}: cannot read ({err.strerror or err})") from None

    def _fail(self, what: str) -> FileFormatError:
        return FileFormatError(f"{self.path}: {what}")

    def _index_records(self) -> dict[str, tuple[int, int]]:
        """Map each record name (without the archive prefix) to (offset, size)."""
        if not self.buffer:
            raise self._fail("the file is empty, not a torch archive")
        try:
            infos = zipfile.ZipFile(io.BytesIO(self.buffer)).infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            raise self._fail(
                f"not a torch zip archive, or truncated ({err}); torch.save "
                "writes zip archives since torch 1.6"
            ) from None
        pickles = [i.filename for i in infos if i.filename.endswith("data.pkl")]
        if len(pickles) != 1 or pickles[0].count("/") != 1:
            raise self._fail(f"expected one ARCHIVE/data.pkl record, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        records = {}
        for info in infos:
            if not info.filename.startswith(prefix):
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                raise self._fail(f"record {info.filename!r} is compressed; torch never does that")
            records[info.filename[len(prefix) :]] = self._locate(info)
        return records

    def _locate(self, info: zipfile.ZipInfo) -> tuple[int, int]:
        # The data follows the local header, whose name and extra field (torch
        # pads it to align storages) may differ in length from the central one.
        header = self.buffer[info.header_offset : info.header_offset + 30]
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise self._fail(f"record {info.filename!r} has a broken header")
        name_len, extra_len = struct.unpack_from("<HH", header, 26)
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.file_size > len(self.buffer):
            raise self._fail(f"record {info.filename!r} runs past the end of the file (truncated?)")
        return start, info.file_size

    def _check_byteorder(self) -> None:
        # torch.save records sys.byteorder (files without the record are
        # little-endian); storages hold native bytes.  Reading big-endian
        # storages as little-endian would give garbage values silently.
        start, size = self._records.get("byteorder", (0, 0))
        order = self.buffer[start : start + size] if size else b"little"
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
        return _Unpickler(self).run()

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


# Opcodes, as the integers that indexing a bytes object gives.
_APPENDS = ord("e")


def _float_run_length(ops: np.ndarray) -> int:
    """Count the leading 'G' opcodes in ``ops`` (every 9th byte from a 'G')."""
    start, step = 0, 1024
    while start < len(ops):
        other = np.flatnonzero(ops[start : start + step] != 0x47)
        if other.size:
            return start + int(other[0])
        start, step = start + step, step * 2
    return len(ops)


class _Unpickler:
    """A pickle machine for protocols 2 to 5 that runs nothing from the file.

    It knows the opcodes that dicts, lists, tuples, str, int, float, bool and
    None need, memo access, persistent ids of storages and ``REDUCE`` of the
    allowed globals.  Its memo is a dict (a huge memo index costs nothing)
    and it has no recursion, so a hostile file can at worst be refused.
    """

    def __init__(self, archive: TorchArchive):
        self.archive = archive
        # The machine reads the archive's bytes in place: positions are
        # absolute, and ``base`` turns them into data.pkl offsets.
        self.data = archive.buffer
        self.base = archive.pickle_offset
        self.end = archive.pickle_offset + archive.pickle_size

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
        ops = np.frombuffer(data, np.uint8, count=n - base, offset=base)
        stack: list = []
        marks: list[int] = []
        memo: dict[int, object] = {}
        unpack_from = struct.unpack_from
        run_hint, run_ops = 0, b""
        pos = base
        try:
            # Branches are ordered by how often torch's pickles use them.
            while pos < n:
                op = data[pos]
                pos += 1
                if op == 0x71:  # BINPUT
                    memo[data[pos]] = stack[-1]
                    pos += 1
                elif op == 0x72:  # LONG_BINPUT
                    index = unpack_from("<I", data, pos)[0]
                    # A pickler numbers memo entries 0, 1, 2, ...; a far index
                    # is forged (CPython's unpickler would allocate for it).
                    if index > len(memo):
                        raise self._refuse(pos, f"memo index {index} after {len(memo)} memo entries")
                    memo[index] = stack[-1]
                    pos += 4
                elif op == 0x68:  # BINGET
                    stack.append(memo[data[pos]])
                    pos += 1
                elif op == 0x6A:  # LONG_BINGET
                    stack.append(memo[unpack_from("<I", data, pos)[0]])
                    pos += 4
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
                    begin = pos - 1
                    end = begin + 9 * run_hint
                    # Rows of one file share a width: try the last run's first.
                    if end < n and data[end] == _APPENDS and data[begin:end:9] == run_ops:
                        run = run_hint
                    else:
                        run = _float_run_length(ops[begin - base :: 9][: (n - begin) // 9])
                        end = begin + 9 * run
                    if end < n and data[end] == _APPENDS:
                        stack.append(FloatRun(begin - base, run))
                        run_hint, run_ops = run, b"G" * run
                    else:
                        stack.extend(unpack_from(">d", data, p + 1)[0] for p in range(begin, end, 9))
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
        except (IndexError, KeyError, struct.error) as err:
            # Popping an empty stack or mark list, a memo index never stored,
            # or reading past the end: all mean a truncated or forged pickle.
            raise self._broken(pos, f"{type(err).__name__}: {err} (truncated file?)") from None

    def _global_lines(self, pos: int) -> tuple[str, str, int]:
        """Read GLOBAL's "module\\nname\\n" argument; return it and the next position."""
        lines = self.data[pos : min(pos + 512, self.end)].split(b"\n", 2)
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
        ints = type(shape) is tuple and type(stride) is tuple and {*map(type, shape + stride)} <= {int}
        if not (type(storage) is StorageRef and type(offset) is int and ints
                and len(shape) == len(stride) and type(requires_grad) is bool and hooks == {}):
            raise self._broken(pos, "tensor with malformed arguments")
        if offset < 0 or any(i < 0 for i in shape + stride) or any(t > _MAX_STRIDE for t in stride):
            raise self._broken(pos, f"tensor with negative offset, size or stride, or absurd stride {stride}")
        # More items than the storage holds means overlapping (expanded)
        # views: never in a feature file, and a forged size (2**40 items
        # with stride 0) would make a merge allocate terabytes.
        if math.prod(shape) > storage.numel:
            raise self._broken(
                pos, f"tensor of size {shape} has more items than its storage of {storage.numel}"
            )
        # The furthest item the view reaches must lie inside its storage.
        if 0 not in shape and offset + sum((s - 1) * t for s, t in zip(shape, stride)) >= storage.numel:
            raise self._broken(
                pos, f"tensor of size {shape} reaches past its storage of {storage.numel} items"
            )
        return TensorRef(storage, offset, shape, stride)


# --- writing ----------------------------------------------------------------


def _pickle_str(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _pickle_int(value: int) -> bytes:
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _pickle_tensor(key: str, array: np.ndarray) -> bytes:
    """The opcodes ``torch.save`` writes for a contiguous CPU tensor."""
    storage = _STORAGE_NAMES[array.dtype]
    strides = [s // array.itemsize for s in array.strides]
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n(("
        + _pickle_str("storage") + f"ctorch\n{storage}\n".encode()
        + _pickle_str(key) + _pickle_str("cpu") + _pickle_int(array.size)
        + b"tQ" + _pickle_int(0)
        + b"(" + b"".join(map(_pickle_int, array.shape)) + b"t"
        + b"(" + b"".join(map(_pickle_int, strides)) + b"t"
        + b"\x89ccollections\nOrderedDict\n)RtR"
    )


def _pickle_value(value: object, arrays: list[np.ndarray]) -> bytes:
    if isinstance(value, str):
        return _pickle_str(value)
    if isinstance(value, bool) or not isinstance(value, (int, list, dict, np.ndarray)):
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
    arrays.append(value if value.flags.c_contiguous else value.copy(order="C"))
    return _pickle_tensor(str(len(arrays) - 1), arrays[-1])


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

    >>> buffer = io.BytesIO()
    >>> write_archive(buffer, {"ids": ["a"], "data": np.arange(4, dtype=np.float32).reshape(2, 2)})
    >>> saved = TorchArchive(buffer.getvalue(), "<memory>").load()
    >>> saved["ids"], saved["data"].shape
    (['a'], (2, 2))
    """
    arrays: list[np.ndarray] = []
    pickled = b"\x80\x02" + _pickle_value(dict(obj), arrays) + b"."
    records: list[tuple[str, bytes | np.ndarray]] = [
        ("data.pkl", pickled),
        (".format_version", b"1"),
        (".storage_alignment", b"64"),
        ("byteorder", b"little"),
        *((f"data/{i}", a) for i, a in enumerate(arrays)),
        ("version", b"3\n"),
    ]
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for record, payload in records:
            # Flat bytes; memoryview.cast refuses arrays with a zero in their shape.
            view = memoryview(payload.reshape(-1).view(np.uint8) if isinstance(payload, np.ndarray) else payload)
            info = _aligned_info(zf, f"{name}/{record}", view.nbytes)
            with zf.open(info, "w") as out:
                out.write(view)

