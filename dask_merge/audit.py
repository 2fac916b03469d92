"""Check one merged file: what a scientist asks before training on it.

:func:`check_file` streams a ``STEM_merged.pt`` file's rows in blocks of
2 MiB (never the whole matrix in memory) and counts NaN and infinite
values in each half, all-zero rows and ids that appear twice.  Given the
pair it was made from, it also says whether it is the merge of those inputs
as they are now: by its checkpoint record, and by merging them again in
memory and comparing every row (or ``sample_rows`` of them) bit for bit.

No Dask here: :mod:`dask_merge.checks` maps :func:`check_files` over a bag.

Which columns are the nucleotide half: the width given, else the width of
the pair's DNABERT-S file when its inputs are checked, else 768 when the
file is 768 + 2560 = 3328 wide (DNABERT-S and ESM-2 3B, what VirNucPro
makes), else unknown (only totals are counted).
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np

from .errors import MergeError
from .header import FLOAT32, MergedHeader, RowReader, read_merged_header
from .merge import Join, join_pair
from .checkpoints import checkpoint_state
from .pairs import Pair

STANDARD_WIDTHS = (768, 2560)  # DNABERT-S, ESM-2 3B
HALVES = ("nucleotide", "protein")
EXAMPLES = 5  # ids a finding names
# Rows are read and counted in blocks of about this size: the block is
# still in the core's cache when it is summed after being read.
BLOCK_BYTES = 2 << 20


def nucleotide_width_of(width: int, given: int | None = None) -> int | None:
    """The nucleotide half's width in a ``width``-wide merged file, if known.

    >>> nucleotide_width_of(3328), nucleotide_width_of(32), nucleotide_width_of(32, 12)
    (768, None, 12)
    """
    if given is not None:
        return given if 0 <= given <= width else None
    return STANDARD_WIDTHS[0] if width == sum(STANDARD_WIDTHS) else None


@dataclass
class FileCheck:
    """What :func:`check_file` found in one merged file; small, but for its ids."""

    path: str
    rows: int | None = None
    width: int | None = None
    nucleotide_width: int | None = None
    labels: list[int] | None = None
    nan: dict[str, int | None] = field(default_factory=dict)
    """NaN values: ``total``, and by half (``nucleotide``, ``protein``; None if widths are unknown)."""
    inf: dict[str, int | None] = field(default_factory=dict)
    zero_rows: int = 0
    zero_row_examples: list[str] = field(default_factory=list)
    duplicate_ids: int = 0
    """Ids that appear more than once in this file."""
    duplicate_id_examples: list[str] = field(default_factory=list)
    error: str | None = None
    """Why the file does not load; None if it does."""
    inputs: dict[str, str] | None = None
    stale: str | None = None
    """Why its checkpoint record says the inputs changed since it was made."""
    mismatch: str | None = None
    """Why it is not the merge of its current inputs (or why that cannot be known)."""
    compared_rows: int | None = None
    seconds: float = 0.0
    ids: list[str] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        """Everything but the ids."""
        # Not asdict: it would deep-copy every id first.
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "ids"}


def check_files(batch: Sequence[tuple], nucleotide_width: int | None, sample_rows: int | None,
                seed: int) -> list[FileCheck]:
    """:func:`check_file` of each ``(path, nucleotide, protein)`` (inputs None if not given)."""
    return [check_file(path, None if nucleotide is None else (nucleotide, protein),
                       nucleotide_width=nucleotide_width, sample_rows=sample_rows, seed=seed)
            for path, nucleotide, protein in batch]


def check_file(path: str, inputs: tuple[str, str] | None = None, *,
               nucleotide_width: int | None = None, sample_rows: int | None = None,
               seed: int = 0) -> FileCheck:
    """Check one merged file; never raises for a bad file: the result says what is wrong.

    Parameters
    ----------
    path
        A ``STEM_merged.pt`` file.
    inputs
        Its ``(STEM_DNABERT_S.pt, STEM_ESM.pt)``: also check that it is their merge.
    nucleotide_width
        Width of the nucleotide half (see the module's doc for the default).
    sample_rows
        Compare only this many rows (drawn with ``seed``) with the inputs'
        merge, not all; ids are always compared in full.
    """
    start = time.perf_counter()
    found = FileCheck(path, inputs=None if inputs is None else dict(zip(HALVES, inputs)))
    try:
        header = read_merged_header(path)
    except MergeError as err:
        found.error = str(err)
        found.seconds = time.perf_counter() - start
        return found
    found.rows, found.width, found.labels, found.ids = header.rows, header.width, header.labels, header.ids
    joined = None
    if inputs is not None:
        joined = _recompute(found, header, inputs)
        if joined is not None and nucleotide_width is None:
            nucleotide_width = joined.nucleotide.width
        if found.mismatch is not None:  # ids differ: rows are not compared
            joined = None
    found.nucleotide_width = nucleotide_width_of(header.width, nucleotide_width)
    _duplicates(found, header.ids)
    try:
        _scan(found, header, joined, sample_rows, seed)
    except MergeError as err:
        found.error = str(err)
    found.seconds = time.perf_counter() - start
    return found


def _duplicates(found: FileCheck, ids: list[str]) -> None:
    if len(set(ids)) == len(ids):
        return
    twice = [seq_id for seq_id, n in Counter(ids).items() if n > 1]
    found.duplicate_ids, found.duplicate_id_examples = len(twice), twice[:EXAMPLES]


def _recompute(found: FileCheck, header: MergedHeader, inputs: tuple[str, str]) -> Join | None:
    """Join the inputs and compare ids (and the record); the rows are compared as they are read.

    Returns the join (None if the inputs do not load); :attr:`FileCheck.mismatch`
    is set if the ids differ.
    """
    nucleotide, protein = inputs
    state = checkpoint_state(Pair("", nucleotide, protein, header.path), labels=header.labels)
    if not state.done:
        found.stale = f"{header.path}: {state.reason} (its checkpoint record)"
    try:
        joined = join_pair(nucleotide, protein)
    except MergeError as err:
        found.mismatch = f"{header.path}: cannot merge its inputs again: {err}"
        return None
    if joined.shape != (header.rows, header.width) or joined.ids != header.ids:
        found.mismatch = f"{header.path}: {_id_difference(header.ids, joined.ids, inputs)}"
    return joined


def _id_difference(ids: list[str], expected: list[str], inputs: tuple[str, str]) -> str:
    """Where the ids of a file and of its inputs' merge part."""
    where = f"the merge of {inputs[0]} and {inputs[1]}"
    for k, (have, want) in enumerate(zip(ids, expected)):
        if have != want:
            return f"row {k} has id {have!r}, {where} has {want!r} there"
    if len(ids) != len(expected):
        return f"{len(ids)} rows, {where} has {len(expected)}"
    return f"another width than {where}"


def _scan(found: FileCheck, header: MergedHeader, joined: Join | None, sample_rows: int | None,
          seed: int) -> None:
    """Stream the rows once: count NaN, Inf and zero rows; compare with ``joined``."""
    rows, width = header.rows, header.width
    split = found.nucleotide_width
    nan, inf = np.zeros(2, np.int64), np.zeros(2, np.int64)
    zeros: list[int] = []
    compare = _Comparison(joined, rows, sample_rows, seed) if joined is not None else None
    step = max(1, BLOCK_BYTES // (FLOAT32.itemsize * width or 1))
    buffer = np.empty((min(step, rows), width), FLOAT32)
    with RowReader(header.path, header.offset, width, header.stamp) as reader:
        for first in range(0, rows, step):
            block = reader.read(first, min(first + step, rows), out=buffer)
            zeros += (first + _count_block(block, width if split is None else split, nan, inf)).tolist()
            if compare is not None:
                compare.block(block, first)
    found.nan, found.inf = _by_half(nan, split), _by_half(inf, split)
    found.zero_rows, found.zero_row_examples = len(zeros), [header.ids[k] for k in zeros[:EXAMPLES]]
    if compare is not None:
        found.compared_rows = compare.compared
        found.mismatch = compare.outcome(header)


def _count_block(block: np.ndarray, split: int, nan: np.ndarray, inf: np.ndarray) -> np.ndarray:
    """Add the block's NaN and infinite values, left and right of column ``split``,
    to ``nan`` and ``inf``; return the indices of its all-zero rows.

    One pass over the block gives each row's sum (``einsum``: vectorized,
    single-threaded, so never in contention with the other workers as a
    multi-threaded BLAS product would be).  A finite sum proves its row free of NaN and
    infinities (either makes the sum NaN or infinite), a nonzero one proves
    it not all zero.  Only the other rows are looked at value by value: those
    with a NaN, an infinity or all zeros, and those whose finite values
    overflow the sum or cancel out in it, which only cost that look.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        sums = np.einsum("ij->i", block)
    nonfinite = np.flatnonzero(~np.isfinite(sums))
    if nonfinite.size:
        rows = block[nonfinite]
        for half, part in enumerate((rows[:, :split], rows[:, split:])):
            nans = int(np.count_nonzero(np.isnan(part)))
            nan[half] += nans
            inf[half] += part.size - int(np.count_nonzero(np.isfinite(part))) - nans
    maybe_zero = np.flatnonzero(sums == 0)
    return maybe_zero[~block[maybe_zero].any(axis=1)]


def _by_half(counts: np.ndarray, split: int | None) -> dict[str, int | None]:
    total = int(counts.sum())
    if split is None:
        return {"total": total, "nucleotide": None, "protein": None}
    return {"total": total, "nucleotide": int(counts[0]), "protein": int(counts[1])}


class _Comparison:
    """Compares rows, block by block, with those of the inputs' merge, bit for bit."""

    def __init__(self, joined: Join, rows: int, sample_rows: int | None, seed: int):
        self.joined = joined
        self.sample = None
        if sample_rows is not None and sample_rows < rows:
            picked = np.random.default_rng(seed).choice(rows, sample_rows, replace=False)
            self.sample = np.sort(picked)
        self.compared = 0
        self.differing: list[int] = []

    def block(self, block: np.ndarray, first: int) -> None:
        if self.sample is None:
            positions, got = np.arange(first, first + len(block)), block
            expected = np.empty_like(block)
            self.joined.fill(expected, slice(first, first + len(block)))
        else:
            positions = self.sample[(self.sample >= first) & (self.sample < first + len(block))]
            got = block[positions - first]
            expected = np.empty_like(got)
            self.joined.fill(expected, positions.tolist())
        differ = (got.view(np.uint32) != expected.view(np.uint32)).any(axis=1)
        self.differing += positions[differ].tolist()
        self.compared += len(positions)

    def outcome(self, header: MergedHeader) -> str | None:
        if not self.differing:
            return None
        k = self.differing[0]
        return (f"{header.path}: {len(self.differing)} of {self.compared} rows compared differ "
                f"from the merge of {self.joined.nucleotide.path} and {self.joined.protein.path}, "
                f"the first row {k} (id {header.ids[k]!r})")
