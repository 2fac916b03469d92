"""The pickle machine: protocols 2 to 5, no code run, no recursion."""

from __future__ import annotations

import math
import struct
from typing import TYPE_CHECKING

from ..errors import FileFormatError, UnsafeFileError
from .fastpaths import APPENDS, RecordFastPaths
from .refs import (
    ALLOWED_GLOBALS, ORDERED_DICT, REBUILD_TENSOR, STORAGE_DTYPES, Global, StorageRef, TensorRef,
    known_location, short_repr,
)

if TYPE_CHECKING:
    from .archive import TorchArchive

# Longest integer (LONG1/LONG4 payload, bytes) and string accepted in a pickle.
_MAX_LONG_BYTES = 64
# Largest stride (in items) a tensor may declare: keeps byte strides in 64 bits.
_MAX_STRIDE = 2**52
# Most dimensions a tensor may declare (torch's own kernels stop at 25): the
# checks multiply sizes, and a forged shape of 30,000 huge ints would take minutes.
_MAX_DIMS = 64


class Unpickler(RecordFastPaths):
    """A pickle machine for protocols 2 to 5 that runs nothing from the file.

    It knows the opcodes that dicts, lists, tuples, str, int, float, bool and
    None need, memo access, persistent ids of storages and ``REDUCE`` of the
    allowed globals.  Its memo takes entries 0, 1, 2, ... once each, as a
    pickler writes them, and it has no recursion, so a hostile file can at
    worst be refused.
    """

    def __init__(self, archive: TorchArchive, *, fast_paths: bool = True):
        self.archive = archive
        if not fast_paths:  # every record taken opcode by opcode
            self._tensor_record = self._row_record = self._string_run = _no_record
        # The machine reads the archive's bytes in place: positions are
        # absolute, and ``base`` turns them into data.pkl offsets.
        self.data = archive.buffer
        self.base = archive.pickle_offset
        self.end = archive.pickle_offset + archive.pickle_size
        # Where the fast paths must stop: the end of the pickle, or of the
        # current FRAME (an opcode boundary there is no record's end).
        self.limit = self.end
        self._templates: dict[tuple[bytes, ...], tuple] = {}  # see _tensor_record
        self._run_layouts: dict[tuple, object] = {}  # see _tensor_record
        self._run_hint, self._run_ops = 0, b""  # see _float_run
        self._short_string_runs = 0  # see _string_run

    def _refuse(self, pos: int, what: str) -> UnsafeFileError:
        return UnsafeFileError(
            f"{self.archive.path}: refused to unpickle {what} (data.pkl byte {pos - self.base}); "
            "feature files may hold only tensors and plain containers, nothing was run"
        )

    def _broken(self, pos: int, what: str) -> FileFormatError:
        return FileFormatError(
            f"{self.archive.path}: broken pickle at data.pkl byte {pos - self.base}: {what}"
        )

    def _below_mark(self, pos: int) -> FileFormatError:
        return self._broken(pos, "an opcode takes items from below its MARK")

    def run(self) -> object:  # noqa: C901 - one flat loop is what keeps it fast
        data, base, n = self.data, self.base, self.end
        stack: list = []
        marks: list[int] = []
        # CPython's unpickler starts a new stack at each MARK: no opcode may
        # reach below the last mark.  ``floor`` is where that mark stands.
        floor = 0
        # Where the current FRAME ends (n + 1: none).  CPython's unpickler
        # refuses an opcode that runs across a frame's end.
        frame_end = n + 1
        memo: dict[int, object] = {}
        unpack_from = struct.unpack_from
        pos = base
        try:
            # Branches are ordered by how often torch's pickles use them.
            while pos < n:
                if pos >= frame_end:
                    if pos > frame_end:
                        raise self._broken(frame_end, "an opcode runs across the end of its FRAME")
                    frame_end, self.limit = n + 1, n
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
                    if len(stack) <= floor:
                        raise self._below_mark(pos)
                    memo[index] = stack[-1]
                    pos += 1 if op == 0x71 else 4
                elif op == 0x68 or op == 0x6A:  # BINGET, LONG_BINGET
                    if op == 0x68:
                        value, pos = memo[data[pos]], pos + 1
                    else:
                        value, pos = memo[unpack_from("<I", data, pos)[0]], pos + 4
                    # A tensor after the first: take its whole record, and those
                    # after it, at once.
                    if value is REBUILD_TENSOR and (found := self._tensor_record(
                            bytes(data[pos - (2 if op == 0x68 else 5) : pos]), pos, memo)):
                        values, pos = found
                        stack.extend(values)
                    else:
                        stack.append(value)
                elif op == 0x28:  # MARK
                    floor = len(stack)
                    marks.append(floor)
                elif op == 0x4B:  # BININT1
                    stack.append(data[pos])
                    pos += 1
                elif op == 0x4D:  # BININT2
                    stack.append(data[pos] | data[pos + 1] << 8)
                    pos += 2
                elif op == 0x85:  # TUPLE1
                    if len(stack) <= floor:
                        raise self._below_mark(pos)
                    stack[-1] = self._tuple(pos, (stack[-1],))
                elif op == 0x74:  # TUPLE
                    first = marks.pop()
                    floor = marks[-1] if marks else 0
                    items = self._tuple(pos, tuple(stack[first:]))
                    del stack[first:]
                    stack.append(items)
                elif op == 0x52:  # REDUCE
                    if len(stack) < floor + 2:
                        raise self._below_mark(pos)
                    args = stack.pop()
                    stack[-1] = self._reduce(pos, stack[-1], args)
                elif op == 0x58 and (after := self._string_run(pos - 1, stack, memo)):
                    pos = after  # a list of ids: strings, each put in the memo, taken at once
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
                    if len(stack) <= floor:
                        raise self._below_mark(pos)
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
                elif op == APPENDS:
                    first = marks.pop()
                    floor = marks[-1] if marks else 0
                    if first <= floor:
                        raise self._below_mark(pos)
                    items = stack[first:]
                    del stack[first:]
                    self._list(pos, stack[-1], items).extend(items)
                elif op == 0x61:  # APPEND
                    if len(stack) < floor + 2:
                        raise self._below_mark(pos)
                    item = stack.pop()
                    self._list(pos, stack[-1], (item,)).append(item)
                elif op == 0x75 or op == 0x73:  # SETITEMS, SETITEM
                    if op == 0x75:
                        first = marks.pop()
                        floor = marks[-1] if marks else 0
                    else:
                        first = len(stack) - 2
                    if first <= floor:
                        raise self._below_mark(pos)
                    items = stack[first:]
                    del stack[first:]
                    self._setitems(pos, stack[-1], items)
                elif op == 0x7D:  # EMPTY_DICT
                    # A DNABERT-S row after the first: take it, and those after it, at once.
                    if found := self._row_record(pos, memo):
                        values, pos = found
                        stack.extend(values)
                    else:
                        stack.append({})
                elif op == 0x5D:  # EMPTY_LIST
                    stack.append([])
                elif op == 0x86 or op == 0x87:  # TUPLE2, TUPLE3
                    size = op - 0x84
                    if len(stack) < floor + size:
                        raise self._below_mark(pos)
                    items = self._tuple(pos, tuple(stack[-size:]))
                    del stack[-size:]
                    stack.append(items)
                elif op == 0x94:  # MEMOIZE
                    if len(stack) <= floor:
                        raise self._below_mark(pos)
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
                    if len(stack) < floor + 2:
                        raise self._below_mark(pos)
                    name, module = stack.pop(), stack.pop()
                    if type(module) is not str or type(name) is not str:
                        raise self._broken(pos, "STACK_GLOBAL needs two strings")
                    stack.append(self._global(pos, module, name))
                elif op == 0x80:  # PROTO
                    if not 2 <= data[pos] <= 5:
                        raise self._broken(pos, f"pickle protocol {data[pos]}")
                    pos += 1
                elif op == 0x95:  # FRAME: a hint for buffered readers, but it must fit
                    if frame_end <= n:
                        raise self._broken(pos, "a FRAME inside a FRAME")
                    frame_end = pos + 8 + unpack_from("<Q", data, pos)[0]
                    self.limit = min(frame_end, n)
                    if frame_end > n:
                        raise self._broken(pos, "a FRAME runs past the end of the pickle")
                    pos += 8
                elif op == 0x2E:  # STOP
                    if len(stack) != 1 or marks:
                        raise self._broken(pos, "STOP with a malformed stack")
                    self._no_loose_global(pos, stack)
                    return stack[0]
                else:
                    raise self._refuse(pos - 1, f"opcode {bytes([op])!r}")
            raise self._broken(pos, "the pickle ends without STOP (truncated file?)")
        except (IndexError, KeyError, struct.error, UnicodeDecodeError) as err:
            # Popping an empty stack or mark list, a memo index never stored,
            # reading past the end, a string that is not UTF-8: all mean a
            # truncated or forged pickle.
            raise self._broken(pos, f"{type(err).__name__}: {err} (truncated file?)") from None

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
            # The layouts key their dicts by str alone.  Other keys (ints
            # that all hash alike) would make reading quadratic in file size.
            if type(key) is not str:
                raise self._refuse(pos, f"a dict key of type {type(key).__name__}")
        self._no_loose_global(pos, items[1::2])
        target.update(zip(items[::2], items[1::2]))

    def _list(self, pos: int, target: object, items: list | tuple) -> list:
        """``target``, checked to be a list that may take ``items``."""
        if type(target) is not list:
            raise self._broken(pos, f"APPEND to a {type(target).__name__}")
        self._no_loose_global(pos, items)
        return target

    def _no_loose_global(self, pos: int, items: list | tuple) -> None:
        """Refuse ``items`` (going into a list, a dict or the result) if they hold a global.

        torch's layouts use a global only where it is called (``REDUCE``) or
        as the storage type inside a persistent id.  Anywhere else torch.load
        hands back the function or class itself, which no feature file holds,
        and which this machine, calling nothing, could not give.  Tuples
        holding a tuple that holds a global are refused as they are built
        (:meth:`_tuple`), so one level down is deep enough.
        """
        kinds = {*map(type, items)}
        if Global in kinds or (tuple in kinds and any(
                Global in {*map(type, item)} for item in items if type(item) is tuple)):
            raise self._refuse(pos, "a global that is neither called nor a storage type")

    def _tuple(self, pos: int, items: tuple) -> tuple:
        """``items``, refused if one of them is a tuple holding a global (see :meth:`_no_loose_global`)."""
        if tuple in {*map(type, items)}:
            self._no_loose_global(pos, [item for item in items if type(item) is tuple])
        return items

    def _global(self, pos: int, module: str, name: str) -> Global:
        allowed = ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise self._refuse(pos, f"global {module}.{name}")
        return allowed

    def _persistent(self, pos: int, pid: object) -> StorageRef:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise self._refuse(pos, f"persistent id {short_repr(pid)}")
        _, storage_type, key, location, numel = pid
        if type(storage_type) is not Global or storage_type.name not in STORAGE_DTYPES:
            raise self._refuse(pos, f"storage type {short_repr(storage_type)}")
        if type(location) is not str or not known_location(location):
            raise self._refuse(pos, f"storage location {short_repr(location)}")
        return self.archive.storage_ref(key, STORAGE_DTYPES[storage_type.name], numel)

    def _reduce(self, pos: int, func: object, args: object) -> object:
        if type(args) is not tuple:
            raise self._broken(pos, "REDUCE without an argument tuple")
        if func is REBUILD_TENSOR and len(args) in (6, 7):
            if len(args) == 7 and not _no_metadata(args[6]):
                # torch applies it: {'neg': ...} negates the values, 'conj' is for complex
                # tensors alone.  Feature files never hold such views.
                raise self._refuse(pos, f"a tensor with metadata {short_repr(args[6])} "
                                        "(a negative or conjugate view)")
            return self._tensor(pos, *args[:6])
        if func is ORDERED_DICT and args == ():
            return {}
        raise self._refuse(pos, f"a call of {short_repr(func)} with {len(args)} arguments")

    def _tensor(self, pos, storage, offset, shape, stride, requires_grad, hooks) -> TensorRef:
        # The tuple checks come first: len() of anything else would raise.
        if not (type(shape) is tuple and type(stride) is tuple and len(shape) == len(stride)
                and {*map(type, shape + stride)} <= _INT_TYPE and type(storage) is StorageRef
                and type(offset) is int and type(requires_grad) is bool and hooks == {}):
            raise self._broken(pos, "tensor with malformed arguments")
        if requires_grad and storage.dtype.kind != "f":  # torch.load refuses it too
            raise self._broken(pos, f"a tensor of {storage.dtype} that requires grad")
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


def _no_record(*args: object) -> None:
    """A record fast path that never matches."""


def _no_metadata(metadata: object) -> bool:
    """Whether a tensor's seventh rebuild argument is one torch ignores (a false value).

    >>> _no_metadata(None), _no_metadata({}), _no_metadata({"neg": False}), _no_metadata((1,))
    (True, True, False, False)
    """
    return metadata is None or (type(metadata) in _PLAIN_TYPES and not metadata)


_PLAIN_TYPES = {dict, list, tuple, str, int, float, bool}


def _reach(size: int, stride: int) -> int:
    return (size - 1) * stride


_INT_TYPE = {int}
