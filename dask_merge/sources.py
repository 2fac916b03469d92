"""What a merge needs of one side of a pair, whatever holds its vectors.

A *source* is a per-chunk ``.pt`` feature file (:class:`~dask_merge.layouts.FeatureFile`)
or an HDF5 file of the whole data set (:class:`~dask_merge.h5source.H5Source`, its
shards too).  :func:`~dask_merge.merge.join` takes two sources, so that another
kind of file on either side is one more class with these few members, not a
change to the merge.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol, Union

import numpy as np

ProteinSpec = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]
"""A per-chunk ``STEM_ESM.pt``, an ``embeddings.h5``, or a list (tuple) of HDF5 shards."""

H5_SUFFIXES = (".h5", ".hdf5", ".he5")


class Positions(Protocol):
    """Id -> row: a dict, or a compact table of the whole data set's ids."""

    def get(self, seq_id: str, default: int | None = None) -> int | None:
        """The row of ``seq_id``, or ``default``."""


class Source(Protocol):
    """One side of a pair: ids, their width, and a way to copy their vectors."""

    path: str
    """What messages name: the file (an HDF5 source's shards, joined by ', ')."""
    ids: Sequence[str]
    """Every id the source holds, in its order."""
    width: int
    whole_data_set: bool
    """True when the source holds every chunk's ids (an HDF5 file of the data
    set): its ids that a pair does not use are not that pair's leftovers."""

    def positions(self) -> Positions:
        """Id -> row, the row that :meth:`fill` takes; never mutate it."""

    def prepare(self, rows: Sequence[int]) -> None:
        """Before any :meth:`fill`: every row the merge will ask for, in any order."""

    def fill(self, out: np.ndarray, rows: Sequence[int]) -> None:
        """Copy the vectors of ``rows``, in order, into ``out`` (float32)."""


def is_h5(spec: ProteinSpec) -> bool:
    """Whether ``spec`` names HDF5 file(s): a list or tuple of paths, or a path ending .h5.

    >>> is_h5("esm/embeddings.h5"), is_h5(["shard_0.h5", "shard_1.h5"]), is_h5("a_ESM.pt")
    (True, True, False)
    """
    if isinstance(spec, (list, tuple)):
        return True
    return os.fspath(spec).lower().endswith(H5_SUFFIXES)


def spec_paths(spec: ProteinSpec) -> tuple[str, ...]:
    """The file path(s) of a source spec, as strings.

    >>> spec_paths("a_ESM.pt"), spec_paths(["s0.h5", "s1.h5"])
    (('a_ESM.pt',), ('s0.h5', 's1.h5'))
    """
    if isinstance(spec, (list, tuple)):
        return tuple(os.fspath(p) for p in spec)
    return (os.fspath(spec),)


def open_protein(spec: ProteinSpec) -> Source:
    """The protein side of a pair: a ``STEM_ESM.pt``, or HDF5 file(s) of the whole data set."""
    if is_h5(spec):
        from .h5source import open_h5  # h5py only where HDF5 is used

        return open_h5(spec_paths(spec))
    from .layouts import read_features

    return read_features(spec, "protein")
