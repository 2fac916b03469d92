"""The zip container of a torch archive: its directory, read without :mod:`zipfile`."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from .textspans import decode_spans

_END = struct.Struct("<4s4H2LH")  # end of central directory
_END64_LOCATOR = struct.Struct("<4sLQL")
_END64 = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # central directory file header
_LOCAL = struct.Struct("<4s5H3L2H")  # local file header
_DOS_DIRECTORY = 0x10  # the directory bit of a member's external attributes
# Flags beyond a data descriptor, UTF-8 names and deflate options (encryption,
# patched data, ...): miniz (torch.load) refuses them as unsupported.
_REFUSED_FLAGS = 0xFFFF & ~0x080E
BULK_ENTRIES = 200
"""From this many entries on, a plain directory is read as one numpy array.

Below it the loop is faster: the numpy calls cost some 0.3 ms whatever the
count, which is what the loop takes for ~150 entries, and the archives of
small pairs have a handful (a DNABERT-S file 5, an ESM file of 10 rows 15).
"""


def zip_entries(buffer: bytes | memoryview) -> dict[str, tuple[int, int, int]]:
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
    >>> zip_entries(f.getvalue())
    {'a/data.pkl': (0, 40, 5)}
    """
    directory, count, offset = _central_directory(lambda start, size: buffer[start : start + size],
                                                  len(buffer))
    plain = _plain_directory(directory, count, offset)
    if plain is not None and (starts := _data_starts(buffer, plain.local)) is not None:
        return dict(zip(plain.names, zip(plain.method.tolist(), starts, plain.size.tolist())))
    members = plain.members() if plain is not None else _directory_entries(directory, count, offset)
    return {name: (method, data_start(buffer, local, local, name), size)
            for name, (method, local, size) in members.items()}


def zip_directory(read: Callable[[int, int], bytes | memoryview], size: int
                  ) -> tuple[dict[str, tuple[int, int, int]], int]:
    """Each member's (method, local header offset, size), and where the central directory starts.

    ``read(start, length)`` gives the file's bytes there (fewer at its end);
    this reads the end records and the central directory only, so that a
    file's members can be found without reading the file.  Raises
    ``ValueError`` or ``struct.error`` on any inconsistency.
    """
    directory, count, offset = _central_directory(read, size)
    plain = _plain_directory(directory, count, offset)
    return (plain.members() if plain is not None else _directory_entries(directory, count, offset),
            offset)


def _central_directory(read: Callable[[int, int], bytes | memoryview], size: int
                       ) -> tuple[bytes | memoryview, int, int]:
    """The central directory's bytes, its entry count and where it starts (see :func:`zip_directory`)."""
    tail, first, end = _end_record(read, size)
    _, disk, directory_disk, count_here, count, length, offset, _ = _END.unpack_from(tail, end)
    # torch.save writes one disk; miniz (torch.load) refuses other disk numbers.
    # (0xFFFF: "see the zip64 end record", which is checked below.)
    fields = disk, directory_disk, count_here, count
    if 0xFFFF not in fields and (disk or directory_disk or count_here != count):
        raise ValueError("a multi-disk zip archive")
    # torch.save always writes zip64 end records; like miniz, use them whenever present.
    has_locator = end >= _END64_LOCATOR.size and tail[end - _END64_LOCATOR.size : end - 16] == b"PK\x06\x07"
    if has_locator or 0xFFFF in (count,) or 0xFFFFFFFF in (length, offset):
        locator = _END64_LOCATOR.unpack_from(tail, end - _END64_LOCATOR.size)
        if locator[0] != b"PK\x06\x07":
            raise ValueError("a zip64 archive without its end record locator")
        if locator[1] != 0 or locator[3] != 1:
            raise ValueError("a multi-disk zip64 archive")
        if locator[2] > first + end - _END64.size:  # struct cannot even take a 2**63 offset
            raise ValueError("the zip64 end record lies outside the file")
        record = _END64.unpack_from(read(locator[2], _END64.size))
        if record[0] != b"PK\x06\x06":
            raise ValueError("a broken zip64 end record")
        if record[4] or record[5] or record[6] != record[7]:
            raise ValueError("a multi-disk zip64 archive")
        count, length, offset = record[7], record[8], record[9]
    if offset + length > first + end:
        raise ValueError("the central directory runs past its end record")
    return read(offset, length), count, offset


def _directory_entries(directory: bytes | memoryview, count: int, offset: int
                       ) -> dict[str, tuple[int, int, int]]:
    """The ``count`` entries of a central directory that starts at byte ``offset``, one by one."""
    length = len(directory)
    entries = {}
    position = 0
    for _ in range(count):
        (signature, _, _, flags, method, _, _, _, compressed, plain, name_length, extra_length,
         comment_length, member_disk, _, attributes, local) = _CENTRAL.unpack_from(directory, position)
        if signature != b"PK\x01\x02":
            raise ValueError(f"a broken central directory entry at byte {offset + position}")
        if member_disk or flags & _REFUSED_FLAGS:
            raise ValueError(f"a member on disk {member_disk} or encrypted (flags {flags:#x})")
        name_start = position + _CENTRAL.size
        name = str(directory[name_start : name_start + name_length], "utf-8")
        # miniz takes a member whose name ends in "/" or whose DOS attributes
        # have the directory bit for a folder, and "reads" it without copying
        # a byte: torch.load then gets uninitialized memory for the record.
        if attributes & _DOS_DIRECTORY or name.endswith("/"):
            raise ValueError(f"member {name!r} is marked as a folder (attributes {attributes:#x})")
        if 0xFFFFFFFF in (compressed, plain, local):
            plain, compressed, local = _zip64_extra(
                directory[name_start + name_length : name_start + name_length + extra_length],
                plain, compressed, local)
        position = name_start + name_length + extra_length + comment_length
        if method == 0 and compressed != plain:  # miniz (torch.load) refuses it too
            raise ValueError(f"member {name!r} is stored, yet its two sizes differ")
        if local > offset - _LOCAL.size:  # local headers precede the central directory
            raise ValueError(f"member {name!r} has its local header outside the file")
        entries[name] = method, local, plain
    if position > length:  # miniz (torch.load) refuses it too
        raise ValueError("the central directory's entries run past its size")
    if len(entries) != count:
        raise ValueError("two members share a name")
    return entries


def _end_record(read: Callable[[int, int], bytes | memoryview], size: int) -> tuple[bytes, int, int]:
    """The file's bytes from ``first`` to its end, ``first``, and where its end record is in them.

    The end record is the last ``PK\\5\\6`` of the file's last 64 KiB and
    some bytes (it and its comment), with room before it for a zip64
    locator.  Files without a comment have it in their last KiB: read that
    first, and the whole span only if it is not there.
    """
    search = max(0, size - _END.size - 0xFFFF)  # the end record and its comment
    widest = max(0, search - _END64_LOCATOR.size)  # and the zip64 locator before it
    for first in dict.fromkeys((max(widest, size - _TAIL), widest)):
        tail = bytes(read(first, size - first))
        end = tail.rfind(b"PK\x05\x06", max(search - first, 0))
        # A suffix of the span holds the span's last match, if it holds any,
        # and then, with room for the locator before it, all the span would give.
        if end >= _END64_LOCATOR.size or (end >= 0 and first == widest):
            return tail, first, end
    raise ValueError("no end of central directory")


_TAIL = 1024


def data_start(header: bytes | memoryview, at: int, local: int, name: str) -> int:
    """Where member ``name``'s data starts, from its local header at ``header[at:]``,
    which is byte ``local`` of the file."""
    fields = _LOCAL.unpack_from(header, at)
    if fields[0] != b"PK\x03\x04":
        raise ValueError(f"member {name!r} has a broken local header")
    return local + _LOCAL.size + fields[9] + fields[10]


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


# --- the common case, at numpy speed ------------------------------------------------------------
#
# An ESM file has a member per row.  When every entry of its central
# directory is a plain one (no zip64 fields, no folder, nothing a check above
# refuses), the entries are read as one array.  Anything else, and any doubt,
# returns None: the loop above then reads them one by one and names the fault.

_CENTRAL_ARRAY = np.dtype([
    ("signature", "V4"), ("made_by", "<u2"), ("needed", "<u2"), ("flags", "<u2"), ("method", "<u2"),
    ("time", "<u2"), ("date", "<u2"), ("crc", "<u4"), ("compressed", "<u4"), ("plain", "<u4"),
    ("name_length", "<u2"), ("extra_length", "<u2"), ("comment_length", "<u2"), ("disk", "<u2"),
    ("internal", "<u2"), ("attributes", "<u4"), ("local", "<u4"),
])
_LOCAL_ARRAY = np.dtype([("signature", "V4"), ("fields", "V22"), ("name_length", "<u2"),
                         ("extra_length", "<u2")])
assert _CENTRAL_ARRAY.itemsize == _CENTRAL.size and _LOCAL_ARRAY.itemsize == _LOCAL.size


class _PlainDirectory(NamedTuple):
    """A central directory's entries as arrays: names, methods, local header offsets, sizes."""

    names: list[str]
    method: np.ndarray
    local: np.ndarray
    size: np.ndarray

    def members(self) -> dict[str, tuple[int, int, int]]:
        """Name -> (method, local header offset, size), as :func:`zip_directory` gives them."""
        return dict(zip(self.names, zip(self.method.tolist(), self.local.tolist(), self.size.tolist())))


def _records_at(raw: np.ndarray, starts: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The fixed-size records of ``dtype`` at byte positions ``starts`` of ``raw`` (all inside it)."""
    windows = np.lib.stride_tricks.sliding_window_view(raw, dtype.itemsize)
    return windows[starts].view(dtype)[:, 0]


def _plain_directory(directory: bytes | memoryview, count: int, offset: int) -> _PlainDirectory | None:
    """What :func:`_directory_entries` finds, if every entry is plain; else None.

    The entries are where the signatures are: those positions must chain,
    each entry ending where the next begins, so a signature inside a name
    or comment sends the directory to the loop, and so does a name that
    :func:`~.textspans.decode_spans` cannot take.
    """
    raw = np.frombuffer(directory, np.uint8)
    if count < BULK_ENTRIES or len(raw) < _CENTRAL.size * count:
        return None
    starts = np.flatnonzero(raw[:-3] == 0x50)
    starts = starts[(raw[starts + 1] == 0x4B) & (raw[starts + 2] == 1) & (raw[starts + 3] == 2)]
    if len(starts) != count or starts[0] != 0 or starts[-1] > len(raw) - _CENTRAL.size:
        return None
    entries = _records_at(raw, starts, _CENTRAL_ARRAY)
    name_starts = starts + _CENTRAL.size
    name_ends = name_starts + entries["name_length"]
    ends = name_ends + entries["extra_length"] + entries["comment_length"]
    if ends[-1] > len(raw) or (ends[:-1] != starts[1:]).any():
        return None
    wide = 0xFFFFFFFF
    if ((entries["disk"] != 0) | (entries["flags"] & _REFUSED_FLAGS != 0)
            | (entries["attributes"] & _DOS_DIRECTORY != 0)
            | (entries["compressed"] == wide) | (entries["plain"] == wide) | (entries["local"] == wide)
            | ((entries["method"] == 0) & (entries["compressed"] != entries["plain"]))
            | (entries["local"].astype(np.int64) > offset - _LOCAL.size)
            | (entries["name_length"] == 0) | (raw[name_ends - 1] == ord("/"))).any():
        return None
    names = decode_spans(raw, name_starts, entries["name_length"])
    if len(names) != count:
        return None
    if len(set(names)) != count:
        return None
    return _PlainDirectory(names, entries["method"], entries["local"], entries["plain"])


def _data_starts(buffer: bytes | memoryview, local: np.ndarray) -> list[int] | None:
    """Where each member's data starts (see :func:`data_start`), from its local header at
    byte ``local``, if every local header is sound; else None."""
    raw = np.frombuffer(buffer, np.uint8)
    local = local.astype(np.int64)
    if local.max() > len(raw) - _LOCAL.size:
        return None
    headers = _records_at(raw, local, _LOCAL_ARRAY)
    if (headers["signature"] != np.void(b"PK\x03\x04")).any():
        return None
    return (local + _LOCAL.size + headers["name_length"] + headers["extra_length"]).tolist()
