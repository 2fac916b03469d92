"""Pairs: which file pairs there are and where their outputs go.

Everything here is cheap and runs on the client before any work is scheduled:
it lists folders and stats files, and never opens a tensor.  Which pairs are
already done is :mod:`dask_merge.checkpoints`' part.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from .atomic import is_temporary
from .errors import ConfigurationError
from .layouts import MERGED_SUFFIX, NUCLEOTIDE_SUFFIX, PROTEIN_SUFFIX
from .sources import ProteinSpec, is_h5, spec_paths

class Pair(NamedTuple):
    """One unit of work: two inputs and the output they make.

    ``protein`` is a ``STEM_ESM.pt``, or a tuple of the HDF5 file(s) that
    hold the ESM-2 vectors of the whole data set (VirNucPro v2).
    """

    name: str
    nucleotide: str
    protein: str | tuple[str, ...]
    output: str


@dataclass(frozen=True)
class FoundPairs:
    """What :func:`find_pairs` found: the pairs, and files without a partner."""

    pairs: list[Pair]
    unpaired: list[str]

    def __iter__(self):
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)


def natural_key(name: str) -> list:
    """A sort key that puts ``output_2`` before ``output_10``, as a person would.

    >>> sorted(["output_10", "output_2"], key=natural_key)
    ['output_2', 'output_10']
    """
    # The split puts
    # the digit runs at odd positions (str.isdigit() also accepts '²', which
    # int() refuses): ints and strs then alternate and always compare.
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name))]


def files_by_stem(folder: str, suffix: str) -> dict[str, str]:
    """The visible regular files of ``folder`` ending in ``suffix``, by what comes before it."""
    return {
        entry.name[: -len(suffix)]: entry.path
        for entry in os.scandir(folder)
        if entry.name.endswith(suffix) and not entry.name.startswith(".")
        and not is_temporary(entry.name) and entry.is_file()
    }


def find_pairs(
    nucleotide_dir: str | os.PathLike[str],
    protein_dir: ProteinSpec | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    *,
    nucleotide_suffix: str = NUCLEOTIDE_SUFFIX,
    protein_suffix: str = PROTEIN_SUFFIX,
) -> FoundPairs:
    """Pair ``STEM_DNABERT_S.pt`` with ``STEM_ESM.pt`` by stem, or with HDF5 file(s).

    Never by sorted position: a missing file would shift every later pair.
    Outputs are named ``output_dir/STEM_merged.pt``; the pairs are made by
    :func:`build_pairs`, as explicit pairs are.

    Parameters
    ----------
    nucleotide_dir
        Folder of the DNABERT-S files.
    protein_dir
        Folder of the ESM-2 files; the nucleotide folder when omitted.  Or
        the HDF5 file of the whole data set (a path ending ``.h5``), or a
        list of its shards: every DNABERT-S file is then paired with it.
    output_dir
        Folder of the merged files; the nucleotide folder when omitted.
    nucleotide_suffix, protein_suffix
        The ends of the file names that are paired by what comes before them.

    Raises
    ------
    FileNotFoundError
        A folder or HDF5 file does not exist, or is of the other kind (the
        message names it).
    ConfigurationError
        A suffix that is empty, holds a ``/`` or is the other's; an output
        that is an input.
    """
    _check_suffixes(nucleotide_suffix, protein_suffix)
    nucleotide_dir = os.fspath(nucleotide_dir)
    if protein_dir is not None and is_h5(protein_dir):
        return _pairs_with_h5(nucleotide_dir, spec_paths(protein_dir), output_dir,
                              nucleotide_suffix)
    protein_dir = os.fspath(protein_dir) if protein_dir is not None else nucleotide_dir
    output_dir = os.fspath(output_dir) if output_dir is not None else nucleotide_dir
    for folder in {nucleotide_dir, protein_dir}:
        if not os.path.isdir(folder):
            what = "is not a folder" if os.path.exists(folder) else "does not exist"
            raise FileNotFoundError(f"input folder {folder} {what}")
    nucleotides = files_by_stem(nucleotide_dir, nucleotide_suffix)
    proteins = files_by_stem(protein_dir, protein_suffix)
    stems = sorted(nucleotides.keys() & proteins.keys(), key=natural_key)
    pairs = build_pairs(
        [(nucleotides[stem], proteins[stem], os.path.join(output_dir, stem + MERGED_SUFFIX))
         for stem in stems]) if stems else []
    unpaired = sorted(
        [path for stem, path in nucleotides.items() if stem not in proteins]
        + [path for stem, path in proteins.items() if stem not in nucleotides]
    )
    return FoundPairs(pairs, unpaired)


def _pairs_with_h5(nucleotide_dir: str, h5_files: tuple[str, ...],
                   output_dir: str | os.PathLike[str] | None, nucleotide_suffix: str
                   ) -> FoundPairs:
    """Every DNABERT-S file with the HDF5 file(s) of the whole data set."""
    output_dir = os.fspath(output_dir) if output_dir is not None else nucleotide_dir
    if not h5_files:
        raise FileNotFoundError("no HDF5 file given for the protein side")
    if not os.path.isdir(nucleotide_dir):
        what = "is not a folder" if os.path.exists(nucleotide_dir) else "does not exist"
        raise FileNotFoundError(f"input folder {nucleotide_dir} {what}")
    for path in h5_files:
        if not os.path.isfile(path):
            what = "is not a file" if os.path.exists(path) else "does not exist"
            raise FileNotFoundError(f"HDF5 file {path} {what}")
    nucleotides = files_by_stem(nucleotide_dir, nucleotide_suffix)
    return FoundPairs([Pair(stem, nucleotides[stem], h5_files,
                            os.path.join(output_dir, stem + MERGED_SUFFIX))
                       for stem in sorted(nucleotides, key=natural_key)], [])


def _check_suffixes(nucleotide_suffix: str, protein_suffix: str) -> None:
    """Refuse suffixes that cannot pair two different files by their stem.

    >>> _check_suffixes("_DNABERT.pt", "_DNABERT.pt")
    Traceback (most recent call last):
    dask_merge.errors.ConfigurationError: the nucleotide and protein suffixes are both '_DNABERT.pt': a file would be its own partner
    """
    for side, suffix in (("nucleotide", nucleotide_suffix), ("protein", protein_suffix)):
        if type(suffix) is not str or not suffix or os.sep in suffix or "/" in suffix:
            raise ConfigurationError(f"the {side} suffix must be the non-empty end of a file "
                                     f"name, not {suffix!r}")
    if nucleotide_suffix == protein_suffix:
        raise ConfigurationError(f"the nucleotide and protein suffixes are both "
                                 f"{nucleotide_suffix!r}: a file would be its own partner")


# --- pairs from tuples: explicit ones, and those folder mode finds ----------------


def output_name(nucleotide: str) -> str:
    """The output file name of a pair given without one: ``NAME_merged.pt``.

    NAME is the nucleotide file's name without ``.pt`` and without a trailing
    ``_DNABERT_S``, so that a folder's pairs are named as in folder mode.

    >>> output_name("chunks/output_7_DNABERT_S.pt")
    'output_7_merged.pt'
    >>> output_name("file_0_DNABERT.pt")
    'file_0_DNABERT_merged.pt'
    """
    name = os.path.basename(nucleotide).removesuffix(".pt")
    return name.removesuffix(NUCLEOTIDE_SUFFIX.removesuffix(".pt")) + MERGED_SUFFIX


def pair_name(output: str) -> str:
    """A pair's name in plans and reports: its output's stem.

    That is the file name without ``_merged.pt``, else without its extension.

    >>> pair_name("merged/output_7_merged.pt"), pair_name("out/chunk.pt")
    ('output_7', 'chunk')
    """
    name = os.path.basename(output)
    if name.endswith(MERGED_SUFFIX) and name != MERGED_SUFFIX:
        return name[: -len(MERGED_SUFFIX)]
    return os.path.splitext(name)[0] or name


def build_pairs(specs: Iterable, output_dir: str | os.PathLike[str] | None = None) -> list[Pair]:
    """Pairs from ``(nucleotide, protein)`` or ``(nucleotide, protein, output)`` tuples.

    A tuple without an output writes ``output_dir/``:func:`output_name`.
    Each pair is named after its output (:func:`pair_name`).

    Raises
    ------
    ConfigurationError
        No tuples; a tuple of another shape, or without an output when
        ``output_dir`` is None; an input that is not a file; two pairs that
        write one output; an output that is an input.  The message names
        the tuple's position and paths.
    """
    output_dir = None if output_dir is None else os.fspath(output_dir)
    pairs = [_pair(i, spec, output_dir) for i, spec in enumerate(specs)]
    if not pairs:
        raise ConfigurationError("no pairs given")
    _check_outputs(pairs)
    return pairs


def _pair(index: int, spec: object, output_dir: str | None) -> Pair:
    """The :class:`Pair` of one tuple; :func:`build_pairs` says what it checks."""
    if isinstance(spec, Pair):
        spec = spec[1:]
    if not isinstance(spec, (tuple, list)) or len(spec) not in (2, 3):
        raise ConfigurationError(f"pair {index}: {spec!r} is not (nucleotide, protein) or "
                                 "(nucleotide, protein, output)")
    try:
        paths = [os.fspath(path) for path in spec]
    except TypeError:
        paths = []
    if len(paths) != len(spec) or not all(type(path) is str and path for path in paths):
        raise ConfigurationError(f"pair {index}: {spec!r} holds something other than a path")
    if len(paths) == 2:
        if output_dir is None:
            raise ConfigurationError(f"the pair ({paths[0]}, {paths[1]}) names no output, "
                                     "and no output folder was given (output_dir, --output-dir)")
        paths.append(os.path.join(output_dir, output_name(paths[0])))
    nucleotide, protein, output = paths
    for side, path in (("nucleotide", nucleotide), ("protein", protein)):
        try:
            regular = stat.S_ISREG(os.stat(path).st_mode)
        except OSError as err:
            raise ConfigurationError(f"{side} file {path} cannot be read ({err.strerror})"
                                     ) from None
        if not regular:
            raise ConfigurationError(f"{side} file {path} is not a file")
    return Pair(pair_name(output), nucleotide, protein, output)


def _check_outputs(pairs: list[Pair]) -> None:
    """Refuse two pairs that write one output, and an output that is an input.

    Paths are compared with their folders' symlinks resolved, one
    ``realpath`` per folder: a pair's own symlinked files are caught when it
    is merged.
    """
    folders: dict[str, str] = {}

    def resolved(path: str) -> str:
        folder, name = os.path.split(os.path.abspath(path))
        if folder not in folders:
            folders[folder] = os.path.realpath(folder)
        return os.path.join(folders[folder], name)

    inputs = {resolved(path): pair for pair in pairs for path in (pair.nucleotide, pair.protein)}
    outputs: dict[str, Pair] = {}
    for pair in pairs:
        output = resolved(pair.output)
        if output in outputs:
            raise ConfigurationError(f"two pairs write {pair.output}: {_paths(outputs[output])} "
                                     f"and {_paths(pair)}")
        if output in inputs:
            raise ConfigurationError(f"the output {pair.output} of {_paths(pair)} is an input "
                                     f"of {_paths(inputs[output])}")
        outputs[output] = pair


def _paths(pair: Pair) -> str:
    return f"({pair.nucleotide}, {pair.protein})"


def no_pairs_message(nucleotide_dir: str | os.PathLike[str], protein_dir: ProteinSpec | None,
                     nucleotide_suffix: str, protein_suffix: str) -> str:
    """Why :func:`find_pairs` found no pair, with what each folder holds instead."""
    nucleotide_dir = os.fspath(nucleotide_dir)
    if protein_dir is not None and is_h5(protein_dir):
        return f"no pairs found: no STEM{nucleotide_suffix} in {nucleotide_dir}"
    protein_dir = os.fspath(protein_dir or nucleotide_dir)
    suffixes = (nucleotide_suffix, protein_suffix, MERGED_SUFFIX)
    folders = dict.fromkeys((nucleotide_dir, protein_dir))  # one listing each, in this order
    counts = {folder: _suffix_counts(folder, suffixes) for folder in folders}
    where = [f"{folder} holds " + ", ".join(f"{n} STEM{suffix}" for suffix, n in found.items())
             for folder, found in counts.items()]
    swapped = (protein_dir != nucleotide_dir and not counts[nucleotide_dir][nucleotide_suffix]
               and counts[nucleotide_dir][protein_suffix] and counts[protein_dir][nucleotide_suffix])
    hint = "; were --nucleotide-dir and --protein-dir swapped?" if swapped else ""
    return (f"no pairs found: no STEM{nucleotide_suffix} in {nucleotide_dir} has a "
            f"STEM{protein_suffix} partner in {protein_dir} ({'; '.join(where)}){hint}")


def _suffix_counts(folder: str, suffixes: tuple[str, ...]) -> dict[str, int]:
    """How many visible files of ``folder`` end in each suffix."""
    names = [name for name in os.listdir(folder) if not name.startswith(".")]
    return {suffix: sum(name.endswith(suffix) for name in names) for suffix in suffixes}
