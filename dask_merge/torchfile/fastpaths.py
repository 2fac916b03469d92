"""The unpickler's fast paths: whole records of torch's pickles matched at once.

A 10,000-row file repeats one record per row.  After the first, each is
matched by one regular expression (or, for a run of floats, measured with
numpy) instead of some 30 opcode steps.  Every fast path has exactly the
effect the opcodes would have, or returns None and lets them run.
"""

from __future__ import annotations

import re
import struct

import numpy as np

from ..errors import FileFormatError
from .refs import ORDERED_DICT, STORAGE_DTYPES, FloatRun, Global, StorageRef, TensorRef, known_location
from .runs import (
    LONG_PUTS, MAX_TEMPLATES, row_run, same_size_string_run, string_run, tensor_run, tensor_run_layout,
)

# Opcodes, as the integers that indexing a bytes object gives.
APPENDS = ord("e")
_MIN_STRING_RUN, _MAX_SHORT_STRING_RUNS = 8, 16  # see RecordFastPaths._string_run
_BULK_AFTER = 32  # strings taken one by one before one size is tried in bulk


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
# after the rebuilder's memo get (see Unpickler._tensor_record):
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


class RecordFastPaths:
    """The fast paths, as methods of :class:`~dask_merge.torchfile.unpickler.Unpickler`."""

    runs = True
    """Whether a record read by a fast path takes the run of records after it too (:mod:`.runs`)."""

    def _float_run(self, begin: int) -> tuple[FloatRun | None, int]:
        """The run of BINFLOATs at ``begin`` and where it ends.

        A run that fills a list (APPENDS follows) comes back as a
        :class:`FloatRun`, decoded later in one go; any other as None.
        """
        data, n = self.data, self.limit
        end = begin + 9 * self._run_hint
        # Rows of one file share a width: try the last run's first.
        if end < n and data[end] == APPENDS and data[begin:end:9] == self._run_ops:
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
        if end < n and data[end] == APPENDS:
            return FloatRun(begin - self.base, run), end
        return None, end

    def _string_run(self, pos: int, stack: list, memo: dict) -> int | None:
        """Push the strings from the BINUNICODE at ``pos`` on, each put in the memo or not.

        A list of ids is such a run: ``X <size> <utf-8>``, then in torch's
        pickles a put of the memo's next index (``r <index>`` or a BINPUT),
        in this package's merged files none.  Long runs with LONG_BINPUTs
        (:func:`~.runs.string_run`) and strings of one size
        (:func:`~.runs.same_size_string_run`) come in bulk, others one (and
        its put) per step of a small loop, instead of one or two turns of the
        opcode loop;
        where anything else comes (another opcode, a put of another index, a
        string that is not UTF-8, the end of the frame), the opcodes carry
        on.  Returns where the run ends, or None if it took nothing.
        """
        data, limit, start = self.data, self.limit, pos
        unpack_from, index, depth = struct.unpack_from, len(memo), len(stack)
        while pos + 5 <= limit and data[pos] == 0x58:
            # LONG_BINPUTs: the rest in bulk (see .runs.string_run), then the
            # one that stopped it here.  Runs cut short early cost a search
            # each for little: a file that makes many (a forged one can) goes
            # one by one from then on.
            if (index >= LONG_PUTS and pos + 10 <= limit and self.runs
                    and self._short_string_runs < _MAX_SHORT_STRING_RUNS):
                names, pos = string_run(self, pos, memo)
                stack += names
                index += len(names)
                self._short_string_runs += len(names) < _MIN_STRING_RUN
                if not (pos + 5 <= limit and data[pos] == 0x58):
                    break
            # Ids of one size, with or without puts, in bulk once the run is
            # long enough to pay for numpy (a dict's keys, a file of 10 ids never are).
            elif self.runs and len(stack) - depth >= _BULK_AFTER:
                strings, end = same_size_string_run(self, pos, memo)
                if strings:
                    stack += strings
                    pos, index = end, len(memo)
                    continue
            after = pos + 5 + unpack_from("<I", data, pos + 1)[0]
            if after > limit:
                break
            put = data[after] if after < limit else None
            if put == 0x72:
                if after + 5 > limit or unpack_from("<I", data, after + 1)[0] != index:
                    break
                end = after + 5
            elif put == 0x71:
                if after + 2 > limit or data[after + 1] != index:
                    break
                end = after + 2
            else:
                end = after
            try:
                value = str(data[pos + 5 : after], "utf-8", "surrogatepass")
            except UnicodeDecodeError:
                break
            stack.append(value)
            if end != after:
                memo[index] = value
                index += 1
            pos = end
        return pos if pos != start else None

    def _row_record(self, pos: int, memo: dict) -> tuple[list[dict], int] | None:
        """Read a whole DNABERT-S row after its EMPTY_DICT at ``pos``, and the run of rows after it.

        After the first row, each is ``{'label': id, 'mean_representation':
        [floats]}`` with both keys and the id as memo gets.  Like
        :meth:`_tensor_record`: the same effect as the opcodes, or None.
        """
        match = _ROW_RECORD.match(self.data, pos, self.limit)
        if match is None:
            return None
        put_row, label_get, id_get, values_get, put_values = match.groups()
        first = len(memo)
        if _get_index(put_row) != first or _get_index(put_values) != first + 1:
            return None
        label_key, seq_id, values_key = (memo.get(_get_index(g)) for g in (label_get, id_get, values_get))
        if type(label_key) is not str or type(values_key) is not str or type(seq_id) is not str:
            return None
        run, end = self._float_run(match.end() - 1)
        if run is None or end + 2 > self.limit or self.data[end : end + 2] != b"eu":
            return None
        values = [run]
        row = {label_key: seq_id, values_key: values}
        memo[first], memo[first + 1] = row, values
        if not self.runs or len(memo) < LONG_PUTS:
            return [row], end + 2
        rows, end = row_run(self, label_get, values_get, (label_key, values_key), run.count, end + 2, memo)
        return [row, *rows], end

    def _tensor_record(self, get: bytes, pos: int, memo: dict) -> tuple[list[TensorRef], int] | None:
        """Read a whole tensor record after the rebuilder's memo ``get`` at ``pos``, and the run after it.

        Protocol 2 pickles of many tensors (an ESM file: one per row) repeat
        one record in which only the storage key and the memo puts change;
        after the first, every global and constant string is a memo get.
        One regular expression match replaces ~30 opcode steps, and what the
        records share (the gets, the sizes) is checked once.  The effect is
        exactly what the opcodes would do: the same checks, the same memo
        entries.  Anything unexpected returns None and the opcodes run one
        by one.  The records that follow with the same ``get`` and shared
        bytes are taken with it (:func:`~.runs.tensor_run`).
        """
        match = _TENSOR_RECORD.match(self.data, pos, self.limit)
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
        if not self.runs or len(memo) < LONG_PUTS:
            return [tensor], match.end()
        layout = self._run_layouts.get((get, shared))
        if layout is None:
            if len(self._run_layouts) >= MAX_TEMPLATES:
                return [tensor], match.end()
            layout = self._run_layouts[get, shared] = tensor_run_layout(get, shared)
        tensors, end = tensor_run(self, layout, template, match.end(), memo)
        return [tensor, *tensors], end

    def _check_template(self, pos: int, shared: tuple[bytes, ...], memo: dict) -> tuple | None:
        """Check what tensor records share, once; None if it is not torch's."""
        storage_get, type_get, location_get, *ints, odict_get = shared
        storage, storage_type, location, odict = (
            memo.get(_get_index(g)) for g in (storage_get, type_get, location_get, odict_get)
        )
        if not (storage == "storage" and type(storage_type) is Global
                and storage_type.module == "torch" and storage_type.name in STORAGE_DTYPES
                and type(location) is str and known_location(location) and odict is ORDERED_DICT):
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

