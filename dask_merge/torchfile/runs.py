"""Runs of identical records, read in bulk: ids, and the rows of a feature file after the first.

The record fast paths (:mod:`.fastpaths`) read one tensor or DNABERT-S row
at a time.  Once one has been read, the records after it repeat it with only
the storage key, the id and the memo indices changed; these functions take
the whole run of such records at once: one regular expression pass (tensors)
or a few numpy comparisons (rows) check the fixed structure of every record,
the memo indices are checked as integer arrays, and the objects are built by
C-speed comprehensions.

Each record of a run has exactly the effect the one-record fast path would
have on it (the same objects, the same memo entries, the same error).  A run
ends before the first record that does not fit; from there the one-record
path, or the opcodes, carry on as if there had been no run.
"""

from __future__ import annotations

import re
from itertools import chain, count, repeat
from typing import NamedTuple

import numpy as np

from .refs import FloatRun, TensorRef, make_many
from .textspans import decode_spans

LONG_PUTS = 256
"""The memo index from which a pickler writes its puts as LONG_BINPUT.

Runs are of such records only: a file of a few hundred rows or more, where
speed matters, has its rows there, and a smaller file need not pay for
looking for runs at all.
"""
_PUT, _LENGTH, _KEY = "put", "length", "key"
_PIECES = {_PUT: rb"r.{4}", _LENGTH: rb"[\x01-\x14]\x00\x00\x00", _KEY: rb"([0-9]+)"}
_SIZES = {_PUT: 5, _LENGTH: 4}

# A forged file can make each record a new template (the bytes the records
# share); a pattern compiled for each would cost far more than it saves.
MAX_TEMPLATES = 8


class TensorRun(NamedTuple):
    """How to find and check a run of tensor records that share their gets and constants."""

    key: re.Pattern
    """One record; its one group is the storage key (``findall`` gives the keys)."""
    run: re.Pattern
    """Any number of records."""
    length_at: int
    """Where the key's length byte is, from the record's start."""
    key_at: int
    """Where the key starts, from the record's start."""
    put_at: np.ndarray
    """Where each of the seven puts' indices is, from the key's end."""


def tensor_run_layout(get: bytes, shared: tuple[bytes, ...]) -> TensorRun:
    """The layout of a tensor record with ``get`` and ``shared`` bytes, and its patterns.

    A record, from the rebuilder's memo ``get`` on, is the one-record fast
    path's (see ``_TENSOR_RECORD`` in :mod:`.fastpaths`) with its shared gets
    and constants as literal bytes.  A record matches at most one way (the
    key's digits end at a put's ``r``), so the run pattern splits a run
    exactly as repeated matches of the record pattern do.
    """
    storage_get, type_get, location_get, numel, offset, size, stride, odict_get = shared
    pieces = [get + b"((" + storage_get + type_get + b"X", _LENGTH, _KEY, _PUT,
              location_get + numel + b"t", _PUT, b"Q" + offset + size + b"\x85", _PUT,
              stride + b"\x85", _PUT, b"\x89" + odict_get + b")R", _PUT, b"t", _PUT, b"R", _PUT]
    record = b"".join(_PIECES[p] if type(p) is str else re.escape(p) for p in pieces)
    where, put_at = 0, []
    for piece in pieces[pieces.index(_KEY) + 1 :]:
        if piece == _PUT:
            put_at.append(where + 1)
        where += _SIZES[piece] if type(piece) is str else len(piece)
    return TensorRun(
        key=re.compile(record, re.DOTALL),
        run=re.compile(rb"(?:" + record.replace(rb"([0-9]+)", rb"[0-9]+") + rb")*", re.DOTALL),
        length_at=len(pieces[0]), key_at=len(pieces[0]) + 4, put_at=np.array(put_at),
    )


def tensor_run(unpickler, layout: TensorRun, template: tuple, pos: int,
               memo: dict) -> tuple[list[TensorRef], int]:
    """The tensor records from ``pos`` on that fit ``layout``, and where they end.

    ``template`` is what the records share, checked by the one-record path.
    Records are taken up to the first whose key length or memo puts are not
    what a pickler writes; a storage that is missing, of another size or
    already met is checked as the opcodes would at that record.
    """
    data = unpickler.data
    end = layout.run.match(data, pos, unpickler.limit).end()
    if end == pos:
        return [], pos
    keys = layout.key.findall(data, pos, end)
    first, n = len(memo), len(keys)
    lengths = np.fromiter(map(len, keys), np.int64, count=n)
    # Records differ in length by their keys' alone.
    fixed = (end - pos - int(lengths.sum())) // n
    starts = np.arange(n) * fixed
    starts[1:] += np.cumsum(lengths[:-1])
    taken = _valid_tensor_records(np.frombuffer(data, np.uint8, count=end - pos, offset=pos),
                                  layout, starts, lengths, first)
    if not taken:
        return [], pos
    if taken < n:
        keys, end = keys[:taken], pos + int(starts[taken])
    storage_type, location, dtype, numel, offset, shape, strides = template
    keys = b"\0".join(keys).decode("ascii").split("\0")  # digits: no NUL in a key
    storages = unpickler.archive.storage_refs(keys, dtype, numel)
    tensors = make_many(TensorRef, storages, repeat(offset), repeat(shape), repeat(strides))
    pids = list(zip(repeat("storage"), repeat(storage_type), keys, repeat(location), repeat(numel)))
    hooks = [{} for _ in keys]
    args = list(zip(storages, repeat(offset), repeat(shape), repeat(strides), repeat(False), hooks))
    memo.update(zip(count(first), chain.from_iterable(
        zip(keys, pids, repeat(shape), repeat(strides), hooks, args, tensors))))
    return tensors, end


def _valid_tensor_records(run: np.ndarray, layout: TensorRun, starts: np.ndarray,
                          lengths: np.ndarray, first: int) -> int:
    """How many records from the start of ``run`` (bytes) precede the first a pickler would not write."""
    n = len(starts)
    good = run[starts + layout.length_at] == lengths
    put_at = (starts + layout.key_at + lengths)[:, None] + layout.put_at
    puts = np.ascontiguousarray(run[put_at[..., None] + np.arange(4)]).view("<u4")[..., 0]
    good &= (puts == np.arange(first, first + 7 * n).reshape(n, 7)).all(axis=1)
    return n if good.all() else int(np.argmin(good))


# --- DNABERT-S rows ----------------------------------------------------------
#
# A row after the first, from its EMPTY_DICT:
#   } PUT ( LABEL_GET ID_GET VALUES_GET ] PUT ( G*width e u
# Rows whose id gets have one form (BINGET or LONG_BINGET) have one length,
# so consecutive rows are a 2-D array of bytes, checked column by column.

_FIRST_CHUNK = 16  # rows checked at first; doubled while all fit (see row_run)


def row_run(unpickler, label_get: bytes, values_get: bytes, keys: tuple[str, str], width: int,
            pos: int, memo: dict) -> tuple[list[dict], int]:
    """The DNABERT-S rows from ``pos`` on that repeat the one just read, and where they end.

    ``keys`` are the memo values of ``label_get`` and ``values_get`` (both
    str, checked by the one-record path); every row must have ``width``
    floats.  Rows are taken in growing chunks, so that a run cut short
    early costs little, up to the first row that does not fit.
    """
    rows: list[dict] = []
    while True:
        taken, end = _row_segment(unpickler, label_get, values_get, keys, width, pos, memo)
        if not taken:
            return rows, pos
        rows += taken
        pos = end


def _row_segment(unpickler, label_get: bytes, values_get: bytes, keys: tuple[str, str], width: int,
                 pos: int, memo: dict) -> tuple[list[dict], int]:
    """The rows from ``pos`` whose id gets have the form of the first one's."""
    data, stop = unpickler.data, unpickler.limit
    id_at = 7 + len(label_get)
    id_form = data[pos + id_at] if pos + id_at < stop else None
    if id_form not in (0x68, 0x6A):  # BINGET, LONG_BINGET
        return [], pos
    id_size = 1 if id_form == 0x68 else 4
    header = b"}r\0\0\0\0(" + label_get + bytes([id_form]) + bytes(id_size) + values_get + b"]r\0\0\0\0("
    length = len(header) + 9 * width + 2

    def take(block: np.ndarray, at: int) -> list[dict]:
        return _row_block(unpickler, block, header, id_at + 1, id_size, keys, width, at, memo)

    return in_growing_chunks(data, pos, stop, length, take)


def in_growing_chunks(data, pos: int, stop: int, length: int, take) -> tuple[list, int]:
    """The records of ``length`` bytes from ``pos`` (up to ``stop``) that ``take`` takes, and where they end.

    ``take(block, at)`` gets chunks of 16, 32, 64, ... records as 2-D byte
    arrays (``at``: where the chunk starts) and returns what it makes of
    those before the first misfit: a run cut short early costs little.
    """
    items: list = []
    chunk = _FIRST_CHUNK
    while (available := (stop - pos) // length):
        block = np.frombuffer(data, np.uint8, count=min(chunk, available) * length, offset=pos)
        taken = take(block.reshape(-1, length), pos)
        items += taken
        pos += len(taken) * length
        if len(taken) < len(block) // length:
            break
        chunk *= 2
    return items, pos


def _row_block(unpickler, block: np.ndarray, header: bytes, id_at: int, id_size: int,
               keys: tuple[str, str], width: int, pos: int, memo: dict) -> list[dict]:
    """Check rows of one length (a 2-D array of their bytes) and take those before the first misfit."""
    n, length = block.shape
    first = len(memo)
    values_put = len(header) - 5
    constant = np.frombuffer(header, np.uint8).copy()
    variable = np.zeros(len(header), bool)
    for start, size in ((2, 4), (id_at, id_size), (values_put, 4)):
        variable[start : start + size] = True
    good = ((block[:, : len(header)] == constant) | variable).all(axis=1)
    good &= (block[:, len(header) : len(header) + 9 * width : 9] == 0x47).all(axis=1)
    good &= (block[:, -2] == ord("e")) & (block[:, -1] == ord("u"))
    good &= _le_ints(block, 2) == np.arange(first, first + 2 * n, 2)
    good &= _le_ints(block, values_put) == np.arange(first + 1, first + 2 * n, 2)
    taken = n if good.all() else int(np.argmin(good))
    id_indices = _le_ints(block[:taken], id_at, id_size).tolist()
    # An id that is not a string (an index not in the memo yet: one of these
    # rows' own entries, or further; a memoized global) is left to the
    # one-record path and the opcodes, which refuse or read it.
    ids = [memo.get(index) for index in id_indices]
    if {*map(type, ids)} - {str}:
        taken = next(i for i, seq_id in enumerate(ids) if type(seq_id) is not str)
        del ids[taken:]
    label_key, values_key = keys
    offset = pos + len(header) - unpickler.base
    values = list(map(list, zip(make_many(FloatRun, range(offset, offset + taken * length, length),
                                         repeat(width)))))
    rows = [{label_key: seq_id, values_key: run} for seq_id, run in zip(ids, values)]
    memo.update(zip(count(first), chain.from_iterable(zip(rows, values))))
    return rows


def _le_ints(block: np.ndarray, start: int, size: int = 4) -> np.ndarray:
    """Column ``start`` (a byte) or ``start:start+4`` (a little-endian uint32) of each row."""
    if size == 1:
        return block[:, start].astype(np.int64)
    return np.ascontiguousarray(block[:, start : start + 4]).view("<u4")[:, 0].astype(np.int64)


# --- lists of ids ------------------------------------------------------------
#
# An id, from its BINUNICODE on: X <length: 4 bytes> <UTF-8> r <memo index: 4 bytes>,
# the index always the memo's next.

# Bytes searched at first, doubled while all are taken: torch's pickles batch
# a list's items by 1,000, and 1,000 ids of up to 60 bytes fit.
_FIRST_STRING_BYTES = 1 << 16


def string_run(unpickler, pos: int, memo: dict) -> tuple[list[str], int]:
    """The ids from ``pos`` on, each put in the memo at its next index (LONG_BINPUT), and where they end.

    Taken in growing chunks of bytes, up to the first that is not such a
    record, lies past the frame, holds a NUL or is not UTF-8 (the caller's
    loop then takes that one, or refuses it).
    """
    data, limit = unpickler.data, unpickler.limit
    found: list[str] = []
    size = _FIRST_STRING_BYTES
    while pos < limit:
        stop = min(limit, pos + size)
        names, end = _string_block(np.frombuffer(data, np.uint8, count=stop - pos, offset=pos),
                                   len(memo))
        memo.update(zip(count(len(memo)), names))
        found += names
        pos += end
        if end == 0 or stop == limit or stop - pos > size // 2:  # cut short: no more records
            break
        size *= 2
    return found, pos


def _string_block(raw: np.ndarray, first: int) -> tuple[list[str], int]:
    """The records from the start of ``raw`` (all inside it), and where they end.

    Every BINUNICODE opcode byte in ``raw`` is a candidate; the records are
    the candidates whose puts number ``first``, ``first + 1``, ... in turn,
    each starting where the one before ends: an id that looks like a record
    inside another cannot take its place.
    """
    at = np.flatnonzero(raw[: max(len(raw) - 9, 0)] == 0x58)
    if not len(at) or at[0]:
        return [], 0
    u32 = np.ndarray((len(raw) - 3,), "<u4", raw, 0, (1,))  # the uint32 at each byte
    lengths = u32[at + 1].astype(np.int64)
    put = at + 5 + lengths
    fits = put + 5 <= len(raw)
    at, lengths, put = at[fits], lengths[fits], put[fits]
    rank = np.where(raw[put] == 0x72, u32[put + 1].astype(np.int64) - first, -1)
    keep = (rank >= 0) & (rank < len(at))
    at, lengths, put, rank = at[keep], lengths[keep], put[keep], rank[keep]
    order = np.argsort(rank, kind="stable")
    at, lengths, put, rank = at[order], lengths[order], put[order], rank[order]
    # Records 0, 1, 2, ... each once, each where the last one ended.
    chained = (rank == np.arange(len(rank))) & (at == np.concatenate(([0], put[:-1] + 5)))
    taken = len(rank) if chained.all() else int(np.argmin(chained))
    names = decode_spans(raw, at[:taken] + 5, lengths[:taken], errors="surrogatepass")
    return names, int(put[len(names) - 1]) + 5 if names else 0


# --- ids of one size, with puts or without ---------------------------------------
#
# A list of ids: ``X <size> <utf-8>`` each, then in torch's pickles a put of
# the memo's next index (BINPUT below 256, LONG_BINPUT from there), in this
# package's merged files none (string_run above needs the puts).  Ids of one
# length, as most are in long stretches, make records of one length: a 2-D
# array of bytes again.

_PUT_SIZES = {0x71: 2, 0x72: 5}  # BINPUT, LONG_BINPUT


def same_size_string_run(unpickler, pos: int, memo: dict) -> tuple[list[str], int]:
    """The strings from the BINUNICODE at ``pos`` on whose records repeat its form, and where they end.

    A record's form is its string's size and its put (none, BINPUT or
    LONG_BINPUT).  Takes two records or more, or none.  Each string has the
    effect its opcodes would have: pushed, and put in the memo if its record
    has a put.  A run ends before the first record of another form, a put of
    another index than the memo's next, a string that is not UTF-8, or the
    end of the frame; from there the opcodes carry on.
    """
    data, stop = unpickler.data, unpickler.limit
    size_bytes = bytes(data[pos + 1 : pos + 5])
    size = int.from_bytes(size_bytes, "little")
    after = pos + 5 + size
    put = data[after] if after < stop else None
    length = 5 + size + _PUT_SIZES.get(put, 0)
    following = pos + length
    # Cheap to refuse: a string of another size follows (or none).
    if following + 5 > stop or data[following] != 0x58 or data[following + 1 : following + 5] != size_bytes:
        return [], pos

    def take(block: np.ndarray, at: int) -> list[str]:
        taken = _same_size_block(block, size_bytes, put, len(memo))
        if put in _PUT_SIZES:
            memo.update(zip(count(len(memo)), taken))
        return taken

    return in_growing_chunks(data, pos, stop, length, take)


def _same_size_block(block: np.ndarray, size_bytes: bytes, put: int | None, first: int) -> list[str]:
    """The strings of records of one form (a 2-D array of their bytes) before the first misfit."""
    n, size = len(block), len(block[0]) - 5 - _PUT_SIZES.get(put, 0)
    good = (block[:, :5] == np.frombuffer(b"X" + size_bytes, np.uint8)).all(axis=1)
    if put in _PUT_SIZES:
        good &= block[:, 5 + size] == put
        good &= _le_ints(block, 6 + size, _PUT_SIZES[put] - 1) == np.arange(first, first + n)
    taken = n if good.all() else int(np.argmin(good))
    raw = block[:taken, 5 : 5 + size]
    if size == 0:
        return [""] * taken
    if (raw < 0x80).all():  # ASCII: decoded at once, then cut
        text = raw.tobytes().decode("ascii")
        if taken < 256:
            return [text[i : i + size] for i in range(0, len(text), size)]
        # Twice as fast for many; a pattern per size, compiled once per 256 strings at most.
        return re.findall(f"(?s).{{{size}}}", text)
    strings = []
    for row in raw:
        try:
            strings.append(str(row.tobytes(), "utf-8", "surrogatepass"))
        except UnicodeDecodeError:
            break
    return strings
