"""A pairs file: one pair a line, for ``dask-merge run --pairs FILE``.

Each line holds two or three paths separated by tabs: the nucleotide file,
the protein file and, optionally, the output.  Blank lines and lines whose
first non-blank character is ``#`` are skipped.  A relative path is relative
to the folder of the pairs file, so that the file can move with the data.
"""

from __future__ import annotations

import os

from .errors import ConfigurationError


def read_pairs_file(path: str | os.PathLike[str]) -> list[tuple[str, ...]]:
    """The pairs a pairs file lists, as tuples for :func:`~dask_merge.plan_pairs`.

    Parameters
    ----------
    path
        The pairs file.

    Raises
    ------
    ConfigurationError
        The file cannot be read, or a line is not two or three
        tab-separated paths (the message names the file and line number).

    Examples
    --------
    >>> import pathlib, tempfile
    >>> listing = pathlib.Path(tempfile.mkdtemp()) / "pairs.tsv"
    >>> _ = listing.write_text("# chunk 0\\na_DNABERT.pt\\t/data/a_ESM.pt\\n\\n")
    >>> [(os.path.relpath(n, listing.parent), p) for n, p in read_pairs_file(listing)]
    [('a_DNABERT.pt', '/data/a_ESM.pt')]
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise ConfigurationError(f"cannot read pairs file {path} ({err.strerror})") from None
    folder = os.path.dirname(path)
    pairs = []
    for number, raw in enumerate(lines, 1):
        line = os.fsdecode(raw)  # paths are bytes to the OS: any byte survives
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [field.strip() for field in line.split("\t")]
        if len(fields) not in (2, 3) or not all(fields):
            raise ConfigurationError(
                f"{path}, line {number}: expected two or three tab-separated paths "
                f"(nucleotide, protein[, output]), found {_found(fields)}: {line!r}")
        pairs.append(tuple(os.path.join(folder, field) for field in fields))
    if not pairs:
        raise ConfigurationError(f"pairs file {path} lists no pair")
    return pairs


def _found(fields: list[str]) -> str:
    """What a bad line holds, for its error message.

    >>> _found(["a b"]), _found(["a", "", "b"])
    ('1 field (are the paths separated by spaces, not tabs?)', 'an empty field')
    """
    if not all(fields):
        return "an empty field"
    if len(fields) == 1:
        return "1 field" + (" (are the paths separated by spaces, not tabs?)" if " " in fields[0]
                            else "")
    return f"{len(fields)} fields"
