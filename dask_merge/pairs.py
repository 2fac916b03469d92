"""Planning: which file pairs there are, where their outputs go, which are done.

Everything here is cheap and runs on the client before any work is scheduled:
it lists folders and stats files, and never opens a tensor.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from .atomic import atomic_write, is_temporary
from .errors import ConfigurationError
from .layouts import MERGED_SUFFIX, NUCLEOTIDE_SUFFIX, PROTEIN_SUFFIX, label_value
from .sources import ProteinSpec, is_h5, spec_paths

RECORD_FOLDER = ".dask-merge"
"""Where, inside the output folder, the checkpoint records live (one JSON per output)."""


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


def _natural_key(name: str) -> list:
    # output_2 before output_10, as a person would sort them.  The split puts
    # the digit runs at odd positions (str.isdigit() also accepts '²', which
    # int() refuses): ints and strs then alternate and always compare.
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name))]


def _stems(folder: str, suffix: str) -> dict[str, str]:
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
    nucleotides = _stems(nucleotide_dir, nucleotide_suffix)
    proteins = _stems(protein_dir, protein_suffix)
    stems = sorted(nucleotides.keys() & proteins.keys(), key=_natural_key)
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
    nucleotides = _stems(nucleotide_dir, nucleotide_suffix)
    return FoundPairs([Pair(stem, nucleotides[stem], h5_files,
                            os.path.join(output_dir, stem + MERGED_SUFFIX))
                       for stem in sorted(nucleotides, key=_natural_key)], [])


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


# --- checkpoints ------------------------------------------------------------------


def fingerprint(path: str | os.PathLike[str] | os.stat_result) -> dict[str, int]:
    """What identifies a file's content without reading it: size and mtime_ns.

    Of a path, or of what ``os.stat`` already said about one.
    """
    found = path if isinstance(path, os.stat_result) else os.stat(path)
    return {"size": found.st_size, "mtime_ns": found.st_mtime_ns}


def input_fingerprints(pair: Pair) -> dict[str, dict]:
    """Fingerprints of a pair's inputs; take them *before* merging.

    HDF5 files on the protein side are fingerprinted each, so that a
    regenerated ``embeddings.h5`` makes every pair pending again.

    Raises ``OSError`` naming the file when an input has gone.
    """
    if isinstance(pair.protein, str):
        protein = fingerprint(pair.protein)
    else:
        protein = {"files": [fingerprint(path) for path in pair.protein]}
    return {"nucleotide": fingerprint(pair.nucleotide), "protein": protein}


def record_path(output: str) -> str:
    """The checkpoint record of an output file."""
    folder, name = os.path.split(output)
    return os.path.join(folder, RECORD_FOLDER, name + ".json")


def write_checkpoint(
    pair: Pair, inputs: dict[str, dict[str, int]], *, labels: list[int] | None, rows: int
) -> None:
    """Record, beside a freshly written output, what it was made from.

    The record is written atomically but not fsynced: a power cut that loses
    or truncates it leaves the (fsynced) output without a readable record,
    which counts as done, as an output made elsewhere does.  That saves one
    of the two disk flushes per pair, which dominate small merges.
    """
    record = {
        "inputs": {side: {"path": getattr(pair, side), **fp} for side, fp in inputs.items()},
        "labels": labels,
        "output": fingerprint(pair.output),
        "rows": rows,
    }
    path = record_path(pair.output)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(record, indent=1).encode()), durable=False)


def _read_record(path: str) -> object:
    """The JSON in ``path``, or None if it is not a readable regular file of JSON."""
    try:
        # Non-blocking: a FIFO planted as a record would block its open forever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with open(fd, "rb", closefd=False) as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError):  # RecursionError: [[[[...]]]]
        return None
    finally:
        os.close(fd)


class Checkpoint(NamedTuple):
    """Whether a pair's output is done, and why."""

    done: bool
    reason: str


def checkpoint_state(pair: Pair, *, label: str | int | None = None, force: bool = False,
                     labels: list[int] | None = None) -> Checkpoint:
    """Decide from file metadata alone whether ``pair`` needs merging.

    Done when the output exists and its record says it was made from the
    inputs as they are now (and with the same ``label``: ``"viral"``,
    ``"host"``, an int or None, as :func:`~dask_merge.plan` takes it).  An
    output without a record, e.g. one that upstream wrote, counts as done too.
    ``labels`` is refused with a message that says what to pass instead.

    >>> checkpoint_state(Pair("a", "a_DNABERT_S.pt", "a_ESM.pt", "nowhere/a_merged.pt"))
    Checkpoint(done=False, reason='no output yet')
    >>> checkpoint_state(Pair("a", "n", "p", "o"), labels=[1])
    Traceback (most recent call last):
    TypeError: checkpoint_state takes label='viral', 'host', an int or None, not labels=[1] (pass label=1)
    """
    if labels is not None:
        instead = (f" (pass label={labels[0]!r})" if type(labels) is list and len(labels) == 1
                   else "")
        raise TypeError("checkpoint_state takes label='viral', 'host', an int or None, not "
                        f"labels={labels!r}{instead}")
    return labelled_checkpoint_state(pair, label_value(label), force=force)


def labelled_checkpoint_state(pair: Pair, labels: list[int] | None, *, force: bool = False
                              ) -> Checkpoint:
    """:func:`checkpoint_state` with the label as stored: ``label_value(label)``."""
    if force:
        return Checkpoint(False, "forced")
    try:
        found = os.stat(pair.output)
    except FileNotFoundError:
        return Checkpoint(False, "no output yet")
    except OSError as err:  # a symlink loop, no permission: the merge will replace it or say why
        return Checkpoint(False, f"no output yet (unreadable: {err.strerror})")
    if not stat.S_ISREG(found.st_mode):  # a folder or FIFO is no output
        return Checkpoint(False, "no output yet (not a file under its name)")
    output = fingerprint(found)
    record = _read_record(record_path(pair.output))
    if type(record) is not dict:  # missing, unreadable, or valid JSON but not a record
        return Checkpoint(True, "output exists (no record: made elsewhere)")
    if record.get("output") != output:
        return Checkpoint(True, "output exists (replaced since its record)")
    try:
        now = input_fingerprints(pair)
    except OSError as err:
        return Checkpoint(False, f"input unreadable: {err}")
    recorded = record.get("inputs")
    for side in ("nucleotide", "protein"):
        then = recorded.get(side) if type(recorded) is dict else None
        if type(then) is not dict or {k: then.get(k) for k in now[side]} != now[side]:
            return Checkpoint(False, f"{side} input changed since the merge")
    if record.get("labels") != labels:
        return Checkpoint(False, f"label changed ({record.get('labels')} -> {labels})")
    return Checkpoint(True, "up to date")
