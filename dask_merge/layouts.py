"""The VirNucPro feature layouts: reading them safely, writing merged files.

===============  ==========================================================
file             what ``torch.save`` stored
===============  ==========================================================
STEM_DNABERT_S   ``{'nucleotide': [id, ...], 'data': [{'label': id,
                 'mean_representation': [float, ...]}, ...]}``
STEM_ESM         ``{'proteins': [id, ...], 'data': [1-D float32 tensor, ...]}``
STEM_merged      ``{'ids': [id, ...], 'data': float32 tensor (rows, width)}``,
                 with a training label also ``'labels': [1 or 0]``
===============  ==========================================================

Reading gives a :class:`FeatureFile`: ids and width, checked, with the vectors
left in the file's bytes until :meth:`FeatureFile.fill` copies the rows a
merge needs straight into the output array.
"""

from __future__ import annotations

import numbers
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar

import numpy as np

from .atomic import atomic_write
from .errors import FileFormatError
from .torchfile import (
    ArrayBlocks, FloatRun, ReadAhead, TensorRef, TorchArchive, short_repr, write_archive,
)

NUCLEOTIDE_SUFFIX = "_DNABERT_S.pt"
PROTEIN_SUFFIX = "_ESM.pt"
MERGED_SUFFIX = "_merged.pt"

_LAYOUTS = {
    "nucleotide": ("a DNABERT-S nucleotide", ("nucleotide", "data")),
    "protein": ("an ESM-2 protein", ("proteins", "data")),
    "merged": ("a merged feature", ("ids", "data")),
}
LABELS = {"viral": 1, "host": 0}


@dataclass(frozen=True)
class FeatureFile:
    """The ids of one feature file and, still unread, their vectors.

    ``fast`` tells whether every vector can be copied with a slice of the
    file's bytes (the layout upstream writes); otherwise rows are assembled
    piece by piece, with the same result.
    """

    path: str
    ids: list[str]
    width: int
    fast: bool
    _archive: TorchArchive = field(repr=False)
    _vectors: list = field(repr=False)
    whole_data_set: ClassVar[bool] = False  # one chunk's file (see dask_merge.sources.Source)

    def positions(self) -> dict[str, int]:
        """Id -> position in :attr:`ids`, the row that :meth:`fill` takes."""
        return {seq_id: i for i, seq_id in enumerate(self.ids)}

    def prepare(self, rows: Sequence[int]) -> None:
        """Nothing to do: the vectors are already in memory, in the file's bytes."""

    def fill(self, out: np.ndarray, rows: Sequence[int]) -> None:
        """Copy the vectors at positions ``rows`` of :attr:`ids`, in order, into ``out``.

        Values are converted to ``out``'s dtype as ``torch.tensor`` would
        (a pickled float is a double; it is rounded once, to nearest).
        """
        # Rounding to inf and NaN casts are what torch.tensor does, silently;
        # numpy would warn on each (or raise under -W error).
        with np.errstate(over="ignore", invalid="ignore"):
            if self.fast and rows:
                self._fill_fast(out, rows)
            else:
                for j, i in enumerate(rows):
                    out[j] = self._vector(self._vectors[i])

    def _vector(self, value: object) -> np.ndarray:
        if type(value) is TensorRef:
            return self._archive.array(value)
        pieces = [
            self._archive.floats(p) if type(p) is FloatRun else np.array([p], np.float64)
            for p in value
        ]
        return np.concatenate(pieces) if pieces else np.empty(0)

    def _fill_fast(self, out: np.ndarray, rows: Sequence[int]) -> None:
        # One flat view of the bytes, then one cheap slice per row: per-row
        # numpy views cost more than the copy itself at these widths.
        archive, vectors, width = self._archive, self._vectors, self.width
        if type(vectors[rows[0]]) is TensorRef:
            flat = np.frombuffer(archive.buffer, "<f4", count=len(archive.buffer) // 4)
            starts = self._tensor_starts
            for j, i in enumerate(rows):
                start = starts[i]
                out[j] = flat[start : start + width] if start >= 0 else archive.array(vectors[i])
        else:
            # Rows a merge takes are mostly consecutive, and consecutive rows
            # of a file mostly lie equally far apart: each such stretch is
            # one 2-D view of the pickled doubles, converted in one call.
            starts = [vectors[i][0].offset + 1 for i in rows]
            for first, stop, step in _equal_steps(starts):
                out[first:stop] = np.ndarray((stop - first, width), ">f8", archive.buffer,
                                             archive.pickle_offset + starts[first], (step, 9))

    @cached_property
    def _tensor_starts(self) -> list[int]:
        """Where each vector (all TensorRefs) starts in the archive's bytes, in float32
        items; -1 for one whose bytes are not 4-aligned."""
        vectors = self._vectors
        offsets = self._archive.record_offsets([ref.storage.key for ref in vectors])
        return [-1 if offset % 4 else offset // 4 + ref.offset for offset, ref in zip(offsets, vectors)]


def _equal_steps(starts: list[int]) -> Iterator[tuple[int, int, int]]:
    """Cut ``starts`` into stretches ``[first, stop)`` that advance by one ``step``.

    >>> list(_equal_steps([10, 20, 30, 5, 7, 9, 100]))
    [(0, 3, 10), (3, 6, 2), (6, 7, 0)]
    """
    first, count = 0, len(starts)
    while first < count:
        stop, step = first + 1, 0
        if stop < count:
            step = starts[stop] - starts[first]
            while stop < count and starts[stop] - starts[stop - 1] == step:
                stop += 1
        yield first, stop, step
        first = stop


def read_features(path: str | os.PathLike[str], kind: str, *, ahead: ReadAhead | None = None
                  ) -> FeatureFile:
    """Read a ``kind`` ('nucleotide' or 'protein') feature file, checking its layout.

    ``ahead``: its bytes, being read by a helper thread (see :class:`~.torchfile.ReadAhead`).

    Raises
    ------
    FileFormatError
        Naming the file and the id or key at fault: a layout that is not
        ``kind``'s, ids that are not unique strings, a vector of another
        width than the first, a vector that is not float32 / float.
    UnsafeFileError
        The pickle asks for anything beyond tensors and plain containers.
    """
    path = os.fspath(path)
    archive = TorchArchive.open(path, slot=kind, ahead=ahead)
    obj = archive.load()
    ids_key = _LAYOUTS[kind][1][0]
    _check_layout(path, obj, kind)
    ids, rows = obj[ids_key], obj["data"]
    if len(ids) != len(rows):
        raise FileFormatError(
            f"{path}: {len(ids)} ids in {ids_key!r} but {len(rows)} vectors in 'data'"
        )
    _check_unique(path, ids, ids_key)
    vectors, width = (_nucleotide_vectors if kind == "nucleotide" else _protein_vectors)(path, ids, rows)
    return FeatureFile(path, ids, width, _all_fast(vectors), archive, vectors)


def _check_layout(path: str, obj: object, kind: str) -> None:
    title, keys = _LAYOUTS[kind]
    if type(obj) is dict and all(type(obj.get(k)) is list for k in keys):
        return
    # Keys are str or int (the reader allows no others); ints sort first.
    found = sorted(obj, key=lambda k: (type(k) is str, k)) if type(obj) is dict else type(obj).__name__
    for other, (other_title, other_keys) in _LAYOUTS.items():
        if other != kind and type(obj) is dict and set(other_keys) <= set(obj):
            raise FileFormatError(
                f"{path}: expected {title} file (keys {list(keys)}), "
                f"but this is {other_title} file (keys {found})"
            )
    raise FileFormatError(f"{path}: expected {title} file with list values {list(keys)}, found {found}")


def _check_unique(path: str, ids: list, key: str) -> None:
    if {*map(type, ids)} <= {str} and len(set(ids)) == len(ids):
        return  # the common case, checked at C speed
    seen: set[str] = set()
    for i in ids:
        if type(i) is not str:
            raise FileFormatError(f"{path}: {key!r} holds {short_repr(i)}, not an id string")
        if i in seen:
            raise FileFormatError(f"{path}: id {i!r} appears twice in {key!r}")
        seen.add(i)


# Each layout has a check of the whole file at C speed (sets of types and
# sizes) for the common case, and a check row by row that names the id at
# fault when the first finds anything amiss.


def _nucleotide_vectors(path: str, ids: list[str], rows: list) -> tuple[list, int]:
    """The vectors (lists of floats and FloatRuns) and their common width."""
    if {*map(type, rows)} <= {dict}:
        labels = [row.get("label", seq_id) for row, seq_id in zip(rows, ids)]
        vectors = [row.get("mean_representation") for row in rows]
        if labels == ids and {*map(type, vectors)} <= {list} and {*map(len, vectors)} == {1}:
            runs = [v[0] for v in vectors]
            if {*map(type, runs)} == {FloatRun} and len({run.count for run in runs}) == 1:
                return vectors, runs[0].count
    checked = [_nucleotide_vector(path, seq_id, row) for seq_id, row in zip(ids, rows)]
    return [v for v, _ in checked], _common_width(path, ids, [w for _, w in checked])


def _protein_vectors(path: str, ids: list[str], rows: list) -> tuple[list, int]:
    """The vectors (TensorRefs) and their common width."""
    if {*map(type, rows)} <= {TensorRef}:
        shapes = {row.shape for row in rows}
        if len(shapes) == 1 and len(next(iter(shapes))) == 1 and (
            {row.storage.dtype for row in rows} == {np.dtype("<f4")}
        ):
            return rows, next(iter(shapes))[0]
    widths = [_protein_vector(path, seq_id, row) for seq_id, row in zip(ids, rows)]
    return rows, _common_width(path, ids, widths)


def _common_width(path: str, ids: list[str], widths: list[int]) -> int:
    for seq_id, width in zip(ids, widths):
        if width != widths[0]:
            raise FileFormatError(
                f"{path}: the vector of id {seq_id!r} has {width} values, "
                f"the first ({ids[0]!r}) has {widths[0]}"
            )
    return widths[0] if widths else 0


def _nucleotide_vector(path: str, seq_id: str, row: object) -> tuple[list, int]:
    if type(row) is not dict or "mean_representation" not in row:
        raise FileFormatError(f"{path}: the row of id {seq_id!r} has no 'mean_representation'")
    if row.get("label", seq_id) != seq_id:
        raise FileFormatError(
            f"{path}: the row of id {seq_id!r} is labelled {short_repr(row['label'])}; rows and ids disagree"
        )
    values = row["mean_representation"]
    if type(values) is not list or not all(type(v) in (FloatRun, float) for v in values):
        raise FileFormatError(
            f"{path}: 'mean_representation' of id {seq_id!r} is not a list of floats"
        )
    return values, sum(v.count if type(v) is FloatRun else 1 for v in values)


def _protein_vector(path: str, seq_id: str, row: object) -> int:
    if type(row) is not TensorRef or len(row.shape) != 1:
        shape = getattr(row, "shape", type(row).__name__)
        raise FileFormatError(f"{path}: the vector of id {seq_id!r} is not a 1-D tensor ({shape})")
    if row.storage.dtype != np.float32:
        raise FileFormatError(
            f"{path}: the vector of id {seq_id!r} is {row.storage.dtype}, expected float32"
        )
    return row.shape[0]


def _all_fast(vectors: list) -> bool:
    """Whether every vector is one slice of the file's bytes (see :meth:`FeatureFile.fill`)."""
    # Two common cases at C speed: contiguous tensors, single runs of floats.
    types = {*map(type, vectors)}
    if types == {TensorRef} and {v.stride for v in vectors} == {(1,)}:
        return True
    if types == {list} and {*map(len, vectors)} == {1} and {type(v[0]) for v in vectors} == {FloatRun}:
        return True
    return all(map(_is_fast, vectors))


def _is_fast(vector: object) -> bool:
    if type(vector) is TensorRef:
        return vector.stride == (1,) or vector.shape[0] <= 1
    return len(vector) == 1 and type(vector[0]) is FloatRun


# --- the merged file -----------------------------------------------------------


def label_value(label: str | int | None) -> list[int] | None:
    """The ``labels`` entry of a merged file for a training label.

    >>> label_value("viral"), label_value("host"), label_value(3), label_value(None)
    ([1], [0], [3], None)
    >>> label_value(2**63)
    Traceback (most recent call last):
    ValueError: label 9223372036854775808 does not fit in 64 bits
    >>> label_value(1.5)
    Traceback (most recent call last):
    ValueError: label 1.5 is not 'viral', 'host' or an integer
    """
    if label is None:
        return None
    if isinstance(label, str) and label.lower() in LABELS:
        return [LABELS[label.lower()]]
    # Only ints (numpy's too) and their decimal digits: int() would also take
    # 1.5 (as 1), True, b"1", "1_000" or Arabic-Indic digits.
    if not (isinstance(label, numbers.Integral) and not isinstance(label, bool)
            or isinstance(label, str) and re.fullmatch(r"[+-]?[0-9]+", label)):
        raise ValueError(f"label {short_repr(label)} is not 'viral', 'host' or an integer")
    # A classifier reads labels as int64.  Digits are counted first: int()
    # refuses a str of over 4,300 of them, in words that do not name the label.
    digits = label.lstrip("+-0") if isinstance(label, str) else ""
    if len(digits) > 19 or not -(2**63) <= int(label) < 2**63:
        raise ValueError(f"label {short_repr(label)} does not fit in 64 bits")
    return [int(label)]


def write_merged(path: str, ids: list[str], data: np.ndarray | ArrayBlocks,
                 labels: list[int] | None) -> None:
    """Write a merged feature file atomically; it loads with plain ``torch.load``."""
    content: dict[str, object] = {"ids": ids, "data": data}
    if labels is not None:
        content["labels"] = labels
    name = os.path.basename(path).removesuffix(".pt")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        # Undecodable bytes of the file name (surrogates): torch.save cannot
        # write it at all.  Its name for archives saved to a buffer will do.
        name = "archive"
    atomic_write(path, lambda f: write_archive(f, content, name=name))
