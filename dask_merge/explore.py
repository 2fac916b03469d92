"""``dask_merge.open_merged``: a folder of merged files as one lazy Dask array.

Opening reads each file's header (ids, labels, shape; see
:mod:`dask_merge.header`), never its rows: the array has one chunk per file,
and a chunk is read (``merged-rows`` on the dashboard) only when a
computation needs it, on whichever scheduler runs it.

>>> import dask_merge
>>> merged = dask_merge.open_merged("merged/")  # doctest: +SKIP
>>> merged.nucleotide.mean(axis=0).compute()  # doctest: +SKIP
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass

import dask.array as da
import numpy as np
from dask.base import tokenize

from .audit import nucleotide_width_of
from .errors import FileFormatError
from .layouts import MERGED_SUFFIX
from .header import FLOAT32, MergedHeader, read_merged_header, read_rows
from .pairs import files_by_stem, natural_key

TASK_NAME = "merged-rows"  # what the chunks' tasks are called on the dashboard


def read_block(path: str, offset: int, rows: int, width: int, stamp: tuple) -> np.ndarray:
    """One file's rows, as its header described them (the chunk of :func:`open_merged`).

    Raises :class:`~dask_merge.MergeError` naming the file if it changed since it was opened.
    """
    return read_rows(path, offset, width, stamp, 0, rows)


@dataclass(frozen=True, repr=False)
class MergedFeatures:
    """The rows of many merged files: ids in memory, features as a lazy Dask array."""

    ids: list[str]
    data: da.Array
    """float32, (rows, width), one chunk per file."""
    files: list[str]
    rows: list[int]
    """Rows of each file, in the order of :attr:`files`."""
    labels: list[list[int] | None]
    """Each file's ``labels`` (None for a file without)."""
    width: int
    nucleotide_width: int | None
    """Columns ``[:nucleotide_width]`` are the DNABERT-S half; None if unknown."""

    @property
    def protein_width(self) -> int | None:
        return None if self.nucleotide_width is None else self.width - self.nucleotide_width

    @property
    def nucleotide(self) -> da.Array:
        """The nucleotide half's columns (the widths must be known)."""
        return self.data[:, : self._split()]

    @property
    def protein(self) -> da.Array:
        """The protein half's columns (the widths must be known)."""
        return self.data[:, self._split() :]

    def _split(self) -> int:
        if self.nucleotide_width is None:
            raise ValueError(f"the halves of {self.width}-wide rows are unknown: "
                             "pass nucleotide_width= to open_merged")
        return self.nucleotide_width

    def to_xarray(self):
        """An ``xarray.Dataset``: ``features`` (row, column), ids and files as row
        coordinates, ``part`` ('nucleotide' / 'protein') as a column coordinate
        when the widths are known.  Needs xarray."""
        import xarray as xr

        file_of_row = np.repeat(np.arange(len(self.files)), self.rows)
        coords = {"id": ("row", np.array(self.ids, dtype=object)),
                  "file": ("row", np.array(self.files, dtype=object)[file_of_row])}
        if self.nucleotide_width is not None:
            coords["part"] = ("column", np.array(["nucleotide"] * self.nucleotide_width
                                                 + ["protein"] * self.protein_width))
        return xr.Dataset({"features": (("row", "column"), self.data)}, coords=coords)

    def __repr__(self) -> str:
        halves = "" if self.nucleotide_width is None else f" ({self.nucleotide_width} + {self.protein_width})"
        return (f"<MergedFeatures: {len(self.ids):,} rows x {self.width}{halves} from "
                f"{len(self.files)} files>")

    def _repr_html_(self) -> str:
        return f"<p>{html.escape(repr(self))}</p>" + self.data._repr_html_()


def open_merged(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    nucleotide_width: int | None = None,
) -> MergedFeatures:
    """Open every ``STEM_merged.pt`` of a folder (or the files given) as one lazy array.

    Reads headers only (a few small reads per file); rows are read when
    computed, one file per chunk.  Files come in natural order of their
    names (``output_2`` before ``output_10``).

    Parameters
    ----------
    source
        A folder of merged files, or a list of them.
    nucleotide_width
        Width of the nucleotide half; default 768 for 3328-wide rows (DNABERT-S
        and ESM-2 3B), else unknown.

    Raises
    ------
    FileFormatError
        A file that is not a merged feature file (naming it), files of two
        widths (naming one of each), or no files at all.
    """
    paths = _paths(source)
    headers = [read_merged_header(p) for p in paths]
    widths = {h.width: h.path for h in headers}
    if len(widths) > 1:
        raise FileFormatError("merged files of different widths: " + ", ".join(
            f"{path} is {width} wide" for width, path in widths.items()))
    width = headers[0].width
    return MergedFeatures([i for h in headers for i in h.ids], _array(headers, width), paths,
                          [h.rows for h in headers], [h.labels for h in headers], width,
                          nucleotide_width_of(width, nucleotide_width))


def _paths(source) -> list[str]:
    if isinstance(source, (str, os.PathLike)):
        folder = os.fspath(source)
        if not os.path.isdir(folder):
            raise FileFormatError(f"{folder}: not a folder of merged files")
        stems = files_by_stem(folder, MERGED_SUFFIX)
        paths = [stems[s] for s in sorted(stems, key=natural_key)]
        where = folder
    else:
        paths, where = [os.fspath(p) for p in source], "the files given"
    if not paths:
        raise FileFormatError(f"no STEM{MERGED_SUFFIX} files in {where}")
    return paths


def _array(headers: list[MergedHeader], width: int) -> da.Array:
    # Each task's arguments are a path and a few ints, never the ids: the
    # graph stays small when it travels to a cluster's scheduler.
    name = f"{TASK_NAME}-{tokenize([(h.path, h.offset, h.rows, h.stamp) for h in headers], width)}"
    graph = {(name, i, 0): (read_block, h.path, h.offset, h.rows, width, tuple(h.stamp))
             for i, h in enumerate(headers)}
    chunks = (tuple(h.rows for h in headers), (width,))
    return da.Array(graph, name, chunks, dtype=FLOAT32)
