"""Builders of the VirNucPro v2 layout, and the v2 fork's convert-then-merge path.

VirNucPro v2 keeps one ``STEM_DNABERT_S.pt`` per chunk but writes the ESM-2
embeddings of the whole data set to HDF5: ``sequence_ids`` (variable-length
UTF-8) and ``embeddings`` (rows x 2560 float32, chunked), in one
``embeddings.h5`` or in per-GPU shards ``shard_N.h5``.  Import these from
:mod:`dask_merge.testing`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .layouts import NUCLEOTIDE_SUFFIX, PROTEIN_SUFFIX

EMBEDDINGS_FILE = "embeddings.h5"
SHARD_BATCH = 64  # rows a GPU embeds at a time: shards take them in turn


class H5Writer:
    """An HDF5 embeddings file being appended to, as the fork's ESM-2 stage writes it.

    ``chunks``: the chunk shape; ``None``: whole rows, about 1 MiB a chunk;
    ``True``: h5py's choice, which splits rows too.  ``compression``: ``None``
    or ``"gzip"`` (with shuffle).
    """

    def __init__(self, path: str | os.PathLike[str], width: int, *, chunks=None,
                 compression: str | None = None) -> None:
        import h5py

        self.file = h5py.File(path, "w")
        self.ids = self.file.create_dataset("sequence_ids", (0,), h5py.string_dtype(),
                                            maxshape=(None,), chunks=(4096,))
        extra = {"compression": "gzip", "shuffle": True} if compression else {}
        if chunks is None:
            chunks = (min(1024, max(1, (1 << 20) // (4 * width))), width)
        self.vectors = self.file.create_dataset("embeddings", (0, width), np.float32,
                                                maxshape=(None, width), chunks=chunks, **extra)

    def append(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        start = self.ids.shape[0]
        self.ids.resize((start + len(ids),))
        self.vectors.resize((start + len(ids), self.vectors.shape[1]))
        if len(ids):
            self.ids[start:] = list(ids)
            self.vectors[start:] = vectors

    def close(self) -> None:
        self.file.close()


def write_embeddings_h5(path: str | os.PathLike[str], ids: Sequence[str], vectors, **options) -> None:
    """Write one HDF5 embeddings file of ``ids`` and their ``vectors`` (see :class:`H5Writer`)."""
    vectors = np.asarray(vectors, np.float32).reshape(len(ids), -1)
    writer = H5Writer(path, vectors.shape[1], **options)
    try:
        writer.append(ids, vectors)
    finally:
        writer.close()


@dataclass(frozen=True)
class H5Sample:
    """A v2 sample data set: the pairs (``protein`` unused) and the HDF5 file(s)."""

    pairs: list
    files: list[Path]
    protein: str | list[str]
    """What ``plan`` and ``merge_pair`` take: the file, or the list of shards."""


def make_h5_dataset(
    folder: str | os.PathLike[str],
    h5_folder: str | os.PathLike[str],
    *,
    pairs: int,
    rows: int,
    shards: int = 0,
    seed: int = 0,
    chunks=None,
    compression: str | None = None,
    on_pair: Callable[[object], object] | None = None,
    **pair_options,
) -> H5Sample:
    """Write ``pairs`` DNABERT-S files into ``folder`` and their ESM-2 vectors to HDF5.

    The ids and vectors are those :func:`~dask_merge.testing.make_dataset`
    writes for the same arguments.  ``shards=0`` writes
    ``h5_folder/embeddings.h5``; ``shards=N`` writes ``shard_0.h5`` ...
    ``shard_{N-1}.h5``, which take batches of rows in turn, so that one chunk
    is spread over every shard.
    """
    from .testing import NUCLEOTIDE_WIDTH, PROTEIN_WIDTH, SamplePair, _pair_content, \
        write_nucleotide_file

    folder, h5_folder = Path(folder), Path(h5_folder)
    folder.mkdir(parents=True, exist_ok=True)
    h5_folder.mkdir(parents=True, exist_ok=True)
    widths = (pair_options.pop("nucleotide_width", NUCLEOTIDE_WIDTH),
              pair_options.pop("protein_width", PROTEIN_WIDTH))
    pair_options.setdefault("nucleotide_only", max(1, rows // 50))
    pair_options.setdefault("protein_only", 1)
    files = [h5_folder / (f"shard_{i}.h5" if shards else EMBEDDINGS_FILE) for i in range(shards or 1)]
    writers = [H5Writer(f, widths[1], chunks=chunks, compression=compression) for f in files]
    made, batch = [], 0
    try:
        for i in range(pairs):
            stem = f"output_{i}"
            content = _pair_content(stem, rows, *widths, pair_options.get("nucleotide_only"),
                                    pair_options.get("protein_only"),
                                    pair_options.get("shuffle", True), seed + i)
            nucleotide = folder / f"{stem}{NUCLEOTIDE_SUFFIX}"
            write_nucleotide_file(nucleotide, content.nucleotide_ids, content.nucleotide_vectors)
            for start in range(0, len(content.protein_ids), SHARD_BATCH):
                end = start + SHARD_BATCH
                writers[batch % len(writers)].append(content.protein_ids[start:end],
                                                     content.protein_vectors[start:end])
                batch += 1
            made.append(SamplePair(stem, nucleotide, files[0], content.nucleotide_ids,
                                   content.protein_ids))
            if on_pair is not None:
                on_pair(made[-1])
    finally:
        for writer in writers:
            writer.close()
    return H5Sample(made, files, [str(f) for f in files] if shards else str(files[0]))


def fork_convert(h5_files: Sequence[str | os.PathLike[str]], chunk_ids: Mapping[str, Sequence[str]],
                 esm_folder: str | os.PathLike[str]) -> list[Path]:
    """The v2 fork's conversion: every HDF5 vector to a tensor, then ``STEM_ESM.pt`` per chunk.

    As the fork does it: read every id, build a dict of one tensor per
    sequence for the whole data set, then ``torch.save`` each chunk's
    ``{'proteins': ids, 'data': [tensor per id]}``, its ids those of
    ``chunk_ids[stem]`` found in the HDF5.  Returns the files written.
    """
    import h5py
    import torch

    vectors = {}
    for path in h5_files:
        with h5py.File(path, "r") as f:
            ids = f["sequence_ids"].asstr()[:]
            embeddings = f["embeddings"]
            for start in range(0, len(ids), 4096):
                block = embeddings[start : start + 4096]
                for seq_id, row in zip(ids[start : start + 4096], block):
                    vectors[seq_id] = torch.from_numpy(row.copy())
    written = []
    for stem, ids in chunk_ids.items():
        found = [i for i in ids if i in vectors]
        path = Path(esm_folder) / f"{stem}{PROTEIN_SUFFIX}"
        torch.save({"proteins": found, "data": [vectors[i] for i in found]}, path)
        written.append(path)
    return written


def fork_merged(h5_files: Sequence[str | os.PathLike[str]], pairs: Sequence,
                folder: str | os.PathLike[str], *, label: str | None = None) -> dict[str, bytes]:
    """The bytes of each merged file of the fork's whole path, by stem: :func:`fork_convert`
    of ``pairs`` (:class:`~dask_merge.testing.SamplePair`) into ``folder/esm``, then
    :func:`~dask_merge.merge_pair` of each into ``folder/merged``."""
    from .merge import merge_pair

    esm, out = Path(folder) / "esm", Path(folder) / "merged"
    esm.mkdir(parents=True)
    out.mkdir()
    fork_convert(h5_files, {p.stem: p.protein_ids for p in pairs}, esm)
    return {p.stem: Path(merge_pair(p.nucleotide, esm / f"{p.stem}{PROTEIN_SUFFIX}",
                                    out / f"{p.stem}_merged.pt", label=label).output).read_bytes()
            for p in pairs}
