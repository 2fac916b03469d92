"""The kernel: merge one DNABERT-S / ESM-2 file pair into one feature file.

No Dask here: :func:`merge_pair` is a plain function that the engine maps
over many pairs, and that a user can call on one pair to debug it.
"""

from __future__ import annotations

import numbers
import os
import stat
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .errors import FileFormatError, MispairedError, OutputError
from .layouts import label_value, read_features, write_merged
from .sources import ProteinSpec, Source, open_protein, spec_paths
from .torchfile import ArrayBlocks, ReadAhead, short_repr

EXAMPLES = 5  # how many dropped ids a result names
# A real pair's output is smaller than its inputs (a pickled float takes 9
# bytes, a stored one 4).  A forged pair whose rows all reuse one memoized
# vector could ask for hundreds of times more: refused past this factor.
MAX_GROWTH, GROWTH_SLACK = 4, 1 << 20
BLOCK_BYTES = 4 << 20  # output rows are assembled and written in blocks of this size
READ_AHEAD_BYTES = 4 << 20  # a nucleotide file from this size on is read while the protein one is parsed


@dataclass(frozen=True)
class MergeResult:
    """What one merge wrote: small enough to send from a worker to the client."""

    output: str
    rows: int
    nucleotide_width: int
    protein_width: int
    nucleotide_only: int
    """Ids of the nucleotide file without a protein vector: their rows were dropped."""
    protein_only: int
    """Ids of the protein file without a nucleotide vector: not used (0 from HDF5,
    whose ids are the whole data set's)."""
    nucleotide_only_examples: tuple[str, ...]
    protein_only_examples: tuple[str, ...]
    seconds: float


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether both paths name one existing file (through links, too)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # either is missing: not the same file
        return False


def merge_pair(
    nucleotide_file: str | os.PathLike[str],
    protein_file: ProteinSpec,
    output_file: str | os.PathLike[str],
    *,
    label: str | int | None = None,
    max_dropped: float | None = None,
) -> MergeResult:
    """Join two feature files by sequence id and write the merged features.

    Row ``i`` of the output is ``cat(nucleotide vector, protein vector)`` of
    the ``i``-th nucleotide id that has a protein vector; ``ids`` lists
    exactly those ids.  The output appears under ``output_file`` only when
    complete.

    Parameters
    ----------
    nucleotide_file
        ``STEM_DNABERT_S.pt`` as the VirNucPro pipeline writes it.
    protein_file
        ``STEM_ESM.pt`` as the VirNucPro pipeline writes it, or the HDF5
        file of the whole data set that VirNucPro v2 writes
        (``embeddings.h5``, any path ending ``.h5``), or a list of its
        shards (``shard_0.h5``, ...).  From HDF5, ids of the data set that
        this chunk does not hold are not counted as ``protein_only``.
    output_file
        Where to write ``STEM_merged.pt``.
    label
        ``'viral'`` (1), ``'host'`` (0) or an int: stored as ``labels: [n]``
        for training.  ``None`` stores no label (prediction).
    max_dropped
        The largest share (0 to 1) of either file's ids that may lack a
        partner.  Above it the pair fails before anything is written, as a
        mispaired one does: two files that share only some of their ids come
        from different runs or chunks.  ``None`` allows any share.

    Raises
    ------
    MergeError
        A subclass naming the file and the id or key at fault: unreadable,
        unsafe or malformed input (:class:`FileFormatError`,
        :class:`UnsafeFileError`), two files sharing no id
        (:class:`MispairedError`), an output that cannot be written
        (:class:`OutputError`).
    """
    start = time.perf_counter()
    labels = label_value(label)
    check_max_dropped(max_dropped)
    output_file = os.fspath(output_file)
    for given in (nucleotide_file, *spec_paths(protein_file)):
        if _same_file(output_file, given):
            raise OutputError(f"{output_file}: is the input {os.fspath(given)}; "
                              "an output never replaces an input")
    ahead = _read_ahead(nucleotide_file)
    try:
        protein = open_protein(protein_file)
        nucleotide = read_features(nucleotide_file, "nucleotide", ahead=ahead)
    finally:
        if ahead is not None:  # the next merge in this thread may reuse its buffer
            ahead.wait()
    return join(nucleotide, protein, output_file, labels=labels, max_dropped=max_dropped,
                started=start)


def _read_ahead(path: str | os.PathLike[str]) -> ReadAhead | None:
    """Start reading a big regular file in a helper thread (see :class:`ReadAhead`).

    A small one costs less to read than a thread to start; anything else
    is left to the caller's read, which refuses it.
    """
    try:
        found = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(found.st_mode) or found.st_size < READ_AHEAD_BYTES:
        return None
    return ReadAhead(path, slot="nucleotide")


@dataclass(frozen=True)
class Join:
    """Two opened sources joined by id: which rows of each make the merged rows.

    Merged row ``k`` is ``cat(nucleotide row nucleotide_rows[k], protein row
    protein_rows[k])``, of id ``ids[k]``.
    """

    nucleotide: Source
    protein: Source
    ids: list[str]
    nucleotide_rows: list[int]
    protein_rows: list[int]
    nucleotide_only: list[str]
    protein_only: list[str]

    @property
    def shape(self) -> tuple[int, int]:
        """The merged matrix's (rows, width)."""
        return len(self.ids), self.nucleotide.width + self.protein.width

    def fill(self, out: np.ndarray, rows: slice | Sequence[int]) -> None:
        """Write merged rows ``rows`` (a slice or positions) into ``out``, one after the other."""
        if isinstance(rows, slice):
            nucleotide, protein = self.nucleotide_rows[rows], self.protein_rows[rows]
        else:
            nucleotide = [self.nucleotide_rows[k] for k in rows]
            protein = [self.protein_rows[k] for k in rows]
        width = self.nucleotide.width
        self.nucleotide.fill(out[:, :width], nucleotide)
        self.protein.fill(out[:, width:], protein)


def match(nucleotide: Source, protein: Source, *, max_dropped: float | None = None) -> Join:
    """Join two opened sources by id, as :func:`merge_pair` does; write nothing.

    Raises
    ------
    MispairedError
        They share no id, or drop more than ``max_dropped`` of either side's ids.
    """
    position = protein.positions()
    nucleotide_rows, protein_rows, ids, nucleotide_only = [], [], [], []
    for i, seq_id in enumerate(nucleotide.ids):
        j = position.get(seq_id)
        if j is None:
            nucleotide_only.append(seq_id)
        else:
            nucleotide_rows.append(i)
            protein_rows.append(j)
            ids.append(seq_id)
    protein_only = []
    if not protein.whole_data_set and len(ids) < len(protein.ids):
        used = set(ids)
        protein_only = [seq_id for seq_id in protein.ids if seq_id not in used]
    if not ids and (nucleotide.ids or protein.ids):
        raise MispairedError(
            f"{nucleotide.path} ({len(nucleotide.ids)} ids, e.g. {_examples(nucleotide.ids)}) and "
            f"{protein.path} ({len(protein.ids)} ids, e.g. {_examples(protein.ids)}) "
            "share no sequence id: not a pair"
        )
    if max_dropped is not None:
        for side, dropped, other in ((nucleotide, nucleotide_only, protein),
                                     (protein, protein_only, nucleotide)):
            if len(dropped) > max_dropped * len(side.ids):
                raise MispairedError(
                    f"{side.path}: {len(dropped):,} of its {len(side.ids):,} ids "
                    f"({len(dropped) / len(side.ids):.0%}, e.g. {_examples(dropped)}) are not in "
                    f"{other.path}: more than max_dropped={max_dropped} allows"
                )
    nucleotide.prepare(nucleotide_rows)
    protein.prepare(protein_rows)
    if not protein.whole_data_set and os.path.isfile(protein.path):  # HDF5 rows are rows: no memo gets
        _check_growth(nucleotide.path, protein.path,
                      4 * len(ids) * (nucleotide.width + protein.width))
    return Join(nucleotide, protein, ids, nucleotide_rows, protein_rows, nucleotide_only,
                protein_only)


def join_pair(nucleotide_file: str | os.PathLike[str], protein_file: ProteinSpec) -> Join:
    """Open a pair and join it by id, as :func:`merge_pair` does; write nothing.

    Raises
    ------
    MergeError
        As :func:`merge_pair` does for its inputs.
    """
    protein = open_protein(protein_file)
    return match(read_features(nucleotide_file, "nucleotide"), protein)


def join(nucleotide: Source, protein: Source, output_file: str, *, labels: list[int] | None,
         max_dropped: float | None = None, started: float | None = None) -> MergeResult:
    """Write the merged features of two opened sources (see :func:`merge_pair`).

    ``started``: the :func:`time.perf_counter` the result's seconds count from.
    """
    start = time.perf_counter() if started is None else started
    joined = match(nucleotide, protein, max_dropped=max_dropped)
    shape = joined.shape

    write_merged(output_file, joined.ids, ArrayBlocks(shape, np.dtype(np.float32), _blocks(joined)),
                 labels)
    return MergeResult(
        output=output_file,
        rows=len(joined.ids),
        nucleotide_width=nucleotide.width,
        protein_width=protein.width,
        nucleotide_only=len(joined.nucleotide_only),
        protein_only=len(joined.protein_only),
        nucleotide_only_examples=tuple(joined.nucleotide_only[:EXAMPLES]),
        protein_only_examples=tuple(joined.protein_only[:EXAMPLES]),
        seconds=time.perf_counter() - start,
    )


def _blocks(joined: Join) -> Iterator[np.ndarray]:
    """The merged rows, a block of :data:`BLOCK_BYTES` at a time, each filled while the last is written.

    Rows are assembled into two small buffers in turn, so the whole output
    never sits in memory.  A helper thread fills the next block while the
    caller checksums and writes this one (both release the GIL): on a
    machine with a core to spare, the copies leave the critical path.
    """
    rows, width = joined.shape
    step = max(1, BLOCK_BYTES // (4 * width or 1))
    starts = range(0, rows, step)
    buffers = [np.empty((min(step, rows), width), np.float32) for _ in starts[:2]]

    def filled(k: int) -> np.ndarray:
        block = buffers[k % 2][: min(step, rows - starts[k])]
        joined.fill(block, slice(starts[k], starts[k] + step))
        return block

    if len(starts) < 2:
        yield from map(filled, range(len(starts)))
        return
    with ThreadPoolExecutor(1, thread_name_prefix="dask-merge-fill") as filler:
        pending = filler.submit(filled, 0)
        for k in range(len(starts)):
            block = pending.result()
            if k + 1 < len(starts):  # into the other buffer: this one is written meanwhile
                pending = filler.submit(filled, k + 1)
            yield block


def check_max_dropped(share: float | None) -> None:
    """Refuse a ``max_dropped`` that is not a share from 0 to 1.

    >>> check_max_dropped(1.5)
    Traceback (most recent call last):
    ValueError: max_dropped must be a number from 0 to 1 (or None), not 1.5
    """
    if share is not None and not (isinstance(share, numbers.Real) and not isinstance(share, bool)
                                  and 0 <= share <= 1):
        raise ValueError(f"max_dropped must be a number from 0 to 1 (or None), not {share!r}")


def _check_growth(nucleotide: str, protein: str, output_bytes: int) -> None:
    """Refuse a merge whose output would exceed :data:`MAX_GROWTH` times its inputs."""
    input_bytes = os.path.getsize(nucleotide) + os.path.getsize(protein)
    if output_bytes > MAX_GROWTH * input_bytes + GROWTH_SLACK:
        raise FileFormatError(
            f"{nucleotide}, {protein}: the merged features would take {output_bytes:,} bytes, "
            f"{output_bytes / input_bytes:.0f} times the {input_bytes:,} bytes of the two files; "
            "real files never grow so, these reuse one vector for many rows"
        )


def _examples(ids: list[str], count: int = 3) -> str:
    """A few ids for a message.

    >>> _examples(["a", "b", "c", "d"]), _examples([])
    ("'a', 'b', 'c'", 'none')
    """
    return ", ".join(map(short_repr, ids[:count])) or "none"
