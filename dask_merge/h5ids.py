"""The ids of a whole data set, kept compact: what each worker holds between pairs.

A million ids as Python strings in a list and a dict to their rows take some
170 MB per worker process; as one UTF-8 buffer, the offsets into it and a
sorted array of their hashes, 20 bytes per id besides their text, and a
lookup costs a few microseconds.  Hashes are Python's own (``hash``), so the table is only good
in the process that built it, which is the only place it lives.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


class IdTable(Sequence):
    """Ids in row order, with :meth:`get` from an id to its row.

    >>> table = IdTable.build([["a", "bc"], ["d"]])
    >>> len(table), table[1], table[-1], table[:2], table.get("d"), table.get("x")
    (3, 'bc', 'd', ['a', 'bc'], 2, None)
    >>> IdTable.build([["a", "b", "a"]]).duplicate()
    (0, 2)
    """

    _hash = staticmethod(hash)  # what the sorted hashes are of

    def __init__(self, text: bytes, ends: np.ndarray, hashes: np.ndarray,
                 order: np.ndarray) -> None:
        self._text = text  # the ids' UTF-8, one after the other
        self._ends = ends  # where each id's bytes end in _text
        self._hashes = hashes  # the ids' hashes, sorted
        self._order = order  # the row of each of _hashes

    @classmethod
    def build(cls, batches: Iterator[list[str]] | Sequence[list[str]]) -> IdTable:
        """The table of the ids of ``batches`` (lists of str), in order."""
        texts, lengths, hashes = [], [], []
        for batch in batches:
            encoded = [seq_id.encode("utf-8", "surrogatepass") for seq_id in batch]
            texts.append(b"".join(encoded))
            lengths.append(np.fromiter(map(len, encoded), np.int64, len(batch)))
            hashes.append(np.fromiter(map(cls._hash, batch), np.int64, len(batch)))
        all_hashes = np.concatenate(hashes) if hashes else np.empty(0, np.int64)
        order = np.argsort(all_hashes, kind="stable")  # equal hashes stay in row order
        if len(order) < 2**31:
            order = order.astype(np.int32)
        ends = np.cumsum(np.concatenate(lengths)) if lengths else np.empty(0, np.int64)
        return cls(b"".join(texts), ends, all_hashes[order], order)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self._id(i) for i in range(*row.indices(len(self)))]
        if row < 0:
            row += len(self)
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} of {len(self)} ids")
        return self._id(row)

    def _id(self, row: int) -> str:
        start = int(self._ends[row - 1]) if row else 0
        return self._text[start : int(self._ends[row])].decode("utf-8", "surrogatepass")

    def get(self, seq_id: str, default: int | None = None) -> int | None:
        """The row of ``seq_id``, or ``default`` if no row holds it."""
        key = self._hash(seq_id)
        at = int(np.searchsorted(self._hashes, key))
        while at < len(self._hashes) and self._hashes[at] == key:
            row = int(self._order[at])
            if self._id(row) == seq_id:
                return row
            at += 1
        return default

    def duplicate(self) -> tuple[int, int] | None:
        """Two rows of one id, the second the earliest such row of the table; or None."""
        same = self._hashes[1:] == self._hashes[:-1]
        found = None
        for start in np.flatnonzero(same & ~np.r_[False, same[:-1]]).tolist():
            stop = start + 1
            while stop < len(self._hashes) and self._hashes[stop] == self._hashes[start]:
                stop += 1
            seen: dict[str, int] = {}
            for row in self._order[start:stop].tolist():  # ascending: the sort is stable
                seq_id = self._id(row)
                if seq_id in seen:
                    if found is None or row < found[1]:
                        found = (seen[seq_id], row)
                    break
                seen[seq_id] = row
        return found
