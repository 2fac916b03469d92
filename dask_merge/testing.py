"""Builders of realistic VirNucPro feature files, for tests, notebooks and demos.

Files are written with ``torch.save`` in exactly the layouts upstream writes,
so what is tested is what users have; the VirNucPro v2 layout (HDF5 on the
protein side) too, with the v2 fork's conversion (:mod:`dask_merge.testing_h5`).  :func:`reference_merge` is the upstream
merge algorithm (with its ids bug fixed), loaded through torch's own safe
loader: the model that :func:`dask_merge.merge_pair` must match bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .layouts import NUCLEOTIDE_SUFFIX, PROTEIN_SUFFIX

NUCLEOTIDE_WIDTH = 768  # DNABERT-S
PROTEIN_WIDTH = 2560  # ESM-2 3B


def write_nucleotide_file(path: str | os.PathLike[str], ids: Sequence[str], vectors) -> None:
    """Write a DNABERT-S file: one list of Python floats per id, as upstream does."""
    import torch

    rows = [{"label": i, "mean_representation": v} for i, v in zip(ids, _as_lists(vectors))]
    torch.save({"nucleotide": list(ids), "data": rows}, path)


def write_protein_file(path: str | os.PathLike[str], ids: Sequence[str], vectors) -> None:
    """Write an ESM-2 file: one 1-D float32 tensor per id, as upstream does."""
    import torch

    with np.errstate(over="ignore"):  # rounding huge values to inf, as torch.tensor does
        tensors = [torch.as_tensor(np.asarray(v, np.float32)).clone() for v in vectors]
    torch.save({"proteins": list(ids), "data": tensors}, path)


def _as_lists(vectors) -> list[list[float]]:
    return [np.asarray(v, np.float64).tolist() if not isinstance(v, list) else v for v in vectors]


@dataclass(frozen=True)
class SamplePair:
    """The files of one sample pair and the ids each side holds."""

    stem: str
    nucleotide: Path
    protein: Path
    nucleotide_ids: list[str]
    protein_ids: list[str]


def make_pair(
    folder: str | os.PathLike[str],
    stem: str,
    *,
    rows: int = 100,
    nucleotide_width: int = NUCLEOTIDE_WIDTH,
    protein_width: int = PROTEIN_WIDTH,
    nucleotide_only: int = 0,
    protein_only: int = 0,
    shuffle: bool = True,
    seed: int = 0,
    protein_folder: str | os.PathLike[str] | None = None,
) -> SamplePair:
    """Write ``STEM_DNABERT_S.pt`` and ``STEM_ESM.pt`` with realistic content.

    ``rows`` ids are on both sides; ``nucleotide_only`` more ids only in the
    DNABERT-S file and ``protein_only`` only in the ESM file.  Protein ids are
    shuffled unless ``shuffle=False``.  Vectors are float32 values (as the
    models produce), drawn from a seeded generator.

    >>> import tempfile
    >>> pair = make_pair(tempfile.mkdtemp(), "chunk", rows=3, nucleotide_only=1,
    ...                  nucleotide_width=4, protein_width=2)
    >>> len(pair.nucleotide_ids), len(pair.protein_ids)
    (4, 3)
    """
    folder = Path(folder)
    protein_folder = Path(protein_folder) if protein_folder is not None else folder
    content = _pair_content(stem, rows, nucleotide_width, protein_width, nucleotide_only,
                            protein_only, shuffle, seed)
    pair = SamplePair(
        stem,
        folder / f"{stem}{NUCLEOTIDE_SUFFIX}",
        protein_folder / f"{stem}{PROTEIN_SUFFIX}",
        content.nucleotide_ids,
        content.protein_ids,
    )
    write_nucleotide_file(pair.nucleotide, content.nucleotide_ids, content.nucleotide_vectors)
    write_protein_file(pair.protein, content.protein_ids, content.protein_vectors)
    return pair


@dataclass(frozen=True)
class _Content:
    nucleotide_ids: list[str]
    nucleotide_vectors: np.ndarray
    protein_ids: list[str]
    protein_vectors: np.ndarray


def _pair_content(stem: str, rows: int, nucleotide_width: int, protein_width: int,
                  nucleotide_only: int, protein_only: int, shuffle: bool, seed: int) -> _Content:
    """The ids and vectors of one sample pair (see :func:`make_pair`)."""
    rng = np.random.default_rng(seed)
    shared = [f"{stem}_seq_{i}_chunk_1R{1 + i % 2}" for i in range(rows)]
    nucleotide_ids = shared + [f"{stem}_no_orf_{i}" for i in range(nucleotide_only)]
    protein_ids = shared + [f"{stem}_orphan_orf_{i}" for i in range(protein_only)]
    if shuffle:
        protein_ids = [protein_ids[i] for i in rng.permutation(len(protein_ids))]
    nucleotide_vectors = rng.standard_normal((len(nucleotide_ids), nucleotide_width), np.float32)
    protein_vectors = rng.standard_normal((len(protein_ids), protein_width), np.float32)
    return _Content(nucleotide_ids, nucleotide_vectors * 0.1, protein_ids,
                    protein_vectors * 0.05)


def make_dataset(
    folder: str | os.PathLike[str],
    *,
    pairs: int,
    rows: int,
    seed: int = 0,
    protein_folder: str | os.PathLike[str] | None = None,
    on_pair: Callable[[SamplePair], object] | None = None,
    **pair_options,
) -> list[SamplePair]:
    """Write ``pairs`` sample pairs named ``output_0`` ... into ``folder``.

    Like the pipeline's chunks: a few ids without an ORF on the nucleotide
    side and one orphan ORF on the protein side, unless overridden.
    ``on_pair`` is called with each pair once written (for progress bars).
    """
    Path(folder).mkdir(parents=True, exist_ok=True)
    if protein_folder is not None:
        Path(protein_folder).mkdir(parents=True, exist_ok=True)
    pair_options.setdefault("nucleotide_only", max(1, rows // 50))
    pair_options.setdefault("protein_only", 1)
    made = []
    for i in range(pairs):
        made.append(make_pair(folder, f"output_{i}", rows=rows, seed=seed + i,
                              protein_folder=protein_folder, **pair_options))
        if on_pair is not None:
            on_pair(made[-1])
    return made


def reference_merge(nucleotide_file, protein_file, *, label=None) -> dict:
    """The upstream merge, with torch's safe loader and ``ids`` fixed to the rows kept.

    Per-row ``torch.tensor``, ``torch.cat`` and ``torch.stack``, as upstream.
    """
    import torch

    nucleotide = torch.load(nucleotide_file, weights_only=True)
    protein = torch.load(protein_file, weights_only=True)
    nucleotide_vectors = {
        i: torch.tensor(row["mean_representation"])
        for i, row in zip(nucleotide["nucleotide"], nucleotide["data"])
    }
    protein_vectors = dict(zip(protein["proteins"], protein["data"]))
    ids = [i for i in nucleotide["nucleotide"] if i in protein_vectors]
    rows = [torch.cat((nucleotide_vectors[i], protein_vectors[i]), dim=-1) for i in ids]
    width = len(nucleotide["data"][0]["mean_representation"]) if nucleotide["data"] else 0
    width += len(protein["data"][0]) if protein["data"] else 0
    data = torch.stack(rows) if rows else torch.empty((0, width))
    merged = {"ids": ids, "data": data}
    if label is not None:
        merged["labels"] = [{"viral": 1, "host": 0}.get(label, label)]
    return merged


# The v2 layout's builders live in their own module (they import h5py).
from .testing_h5 import (  # noqa: E402
    EMBEDDINGS_FILE, H5Sample, H5Writer, fork_convert, fork_merged, make_h5_dataset,
    write_embeddings_h5,
)
