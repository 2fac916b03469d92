"""``dask_merge.check`` and ``dask-merge check``: audit a folder of merged files with Dask.

A bag of :func:`~dask_merge.audit.check_files` tasks (``check-file`` on the
dashboard), one per file or per batch of small files, on the schedulers of
``run``; the client then joins the per-file results: ids found in more than
one file, widths that disagree, pairs without an output.

>>> import dask_merge
>>> report = dask_merge.check("merged/", "features/", "esm/")  # doctest: +SKIP
>>> report.ok, report.counts["nan"]  # doctest: +SKIP
(False, 3)
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import numbers
import os
import time
from dataclasses import dataclass, field

from .audit import FileCheck, check_files
from .atomic import atomic_write
from .errors import ConfigurationError
from .executors import get_executor
from .executors.dask import _paths_unseen
from .executors.pool import _start_pool
from .executors.progress import show_progress
from .layouts import MERGED_SUFFIX
from .pairs import files_by_stem, find_pairs, natural_key
from .partition import partition
from .report import _html, _html_table

TASK_NAME = "check-file"  # what tasks are called on the dashboard
EXAMPLES = 5


@dataclass(repr=False)
class CheckReport:
    """What ``check`` found, per file and in all; :attr:`ok` when it found nothing amiss.

    >>> CheckReport([FileCheck("m/a_merged.pt", rows=2, width=3, ids=["x", "y"]),
    ...              FileCheck("m/b_merged.pt", rows=1, width=3, ids=["x"])], "m")
    <CheckReport: 2 files, 3 rows, 1 finding>
    """

    files: list[FileCheck]
    output_dir: str
    missing: list[str] = field(default_factory=list)
    """Outputs that the inputs' pairs should have made but are not there."""
    seconds: float = 0.0
    scheduler: str = "sync"
    dashboard: str | None = None
    shared_ids: dict[str, list[str]] = field(init=False)
    """Each id found in more than one file, with those files."""

    def __post_init__(self) -> None:
        self.shared_ids = _shared_ids(self.files)

    @property
    def counts(self) -> dict[str, int]:
        files = self.files
        return {
            "files": len(files),
            "rows": sum(f.rows or 0 for f in files),
            "unreadable": sum(f.error is not None for f in files),
            "nan": sum(f.nan.get("total") or 0 for f in files),
            "inf": sum(f.inf.get("total") or 0 for f in files),
            "zero_rows": sum(f.zero_rows for f in files),
            "duplicate_ids": sum(f.duplicate_ids for f in files),
            "shared_ids": len(self.shared_ids),
            "stale": sum(_is_stale(f) for f in files),
            "mismatched": sum(f.mismatch is not None for f in files),
            "missing": len(self.missing),
        }

    @property
    def widths(self) -> dict[int, list[str]]:
        """Each width found, with its files."""
        widths: dict[int, list[str]] = {}
        for found in self.files:
            if found.width is not None:
                widths.setdefault(found.width, []).append(found.path)
        return widths

    @functools.cached_property
    def findings(self) -> list[str]:
        """One line per thing amiss, each naming its file."""
        lines = []
        for found in self.files:
            lines += _file_findings(found)
        lines += _shared_findings(self.shared_ids)
        if len(self.widths) > 1:
            lines.append("widths differ: " + "; ".join(
                f"{w} in {len(p)} files, e.g. {p[0]}" for w, p in self.widths.items()))
        lines += [f"{path}: missing: its inputs are there, it is not" for path in self.missing]
        return lines

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict:
        """The JSON report (a stable contract; keys are only ever added)."""
        shared = dict(list(self.shared_ids.items())[:100])
        return {"ok": self.ok, "counts": self.counts, "findings": self.findings,
                "files": [f.to_dict() for f in self.files], "missing": self.missing,
                "widths": {str(w): len(p) for w, p in self.widths.items()},
                "shared_id_examples": shared, "output_dir": self.output_dir,
                "seconds": round(self.seconds, 3), "scheduler": self.scheduler,
                "dashboard": self.dashboard}

    def to_json(self, path: str | None = None) -> str:
        """The JSON report as text; written to ``path`` (complete or not at all) if given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            atomic_write(os.fspath(path), lambda f: f.write(text.encode()), durable=False)
        return text

    def summary(self, findings: int = 10) -> str:
        """A few lines for a terminal."""
        counts = self.counts
        lines = [f"checked {counts['files']} files, {counts['rows']:,} rows in {self.seconds:.1f} s "
                 f"({self.scheduler}): " + ("no findings" if self.ok else f"{len(self.findings)} findings")]
        lines += [f"  {line}" for line in self.findings[:findings]]
        if len(self.findings) > findings:
            lines.append(f"  ... and {len(self.findings) - findings} more")
        return "\n".join(lines)

    def __repr__(self) -> str:
        counts, n = self.counts, len(self.findings)
        return f"<CheckReport: {counts['files']} files, {counts['rows']} rows, {n} finding{'s' * (n != 1)}>"

    def _repr_html_(self) -> str:
        rows = [(os.path.basename(f.path), "" if f.rows is None else f.rows, f.width or "",
                 _half_counts(f.nan), _half_counts(f.inf), f.zero_rows, f.duplicate_ids,
                 "; ".join(_file_findings(f))[:300]) for f in self.files]
        counts = ", ".join(f"{k} {v:,}" for k, v in self.counts.items())
        findings = "".join(f"<li>{_html(line)}</li>" for line in self.findings[:20])
        return (f"<p><b>dask_merge check</b> of {_html(self.output_dir)}: {counts}</p>"
                + (f"<ul>{findings}</ul>" if findings else "<p>no findings</p>")
                + _html_table("per file", ("file", "rows", "width", "NaN (nuc / prot)",
                                           "Inf (nuc / prot)", "zero rows", "dup. ids", "findings"),
                              rows))


def _shared_ids(files: list[FileCheck]) -> dict[str, list[str]]:
    """Each id found in more than one file: the files, in order; ids in the order found shared."""
    shared: dict[str, list[str]] = {}
    if len(set().union(*(f.ids for f in files))) == sum(len(f.ids) for f in files):
        return shared  # no id twice anywhere: the common case, without a loop per id
    first: dict[str, str] = {}
    for found in files:
        for seq_id in dict.fromkeys(found.ids):
            where = first.setdefault(seq_id, found.path)
            if where != found.path:
                shared.setdefault(seq_id, [where]).append(found.path)
    return shared


def _shared_findings(shared: dict[str, list[str]]) -> list[str]:
    """A line per file holding ids found first in another file: how many, and a few.

    Counted at C speed, and examples taken until each file has its few: 16
    copies of one file share 150,000 (id, file) pairs.
    """
    counts = collections.Counter(itertools.chain.from_iterable(paths[1:] for paths in shared.values()))
    examples: dict[str, list[str]] = {path: [] for path in counts}
    wanted = len(counts)  # files still short of examples
    for seq_id, paths in shared.items():
        for path in paths[1:]:
            if len(examples[path]) < EXAMPLES:
                examples[path].append(f"{seq_id!r} (also in {paths[0]})")
                wanted -= len(examples[path]) == min(EXAMPLES, counts[path])
        if not wanted:
            break
    return [f"{path}: {count} ids also in another file, e.g. {', '.join(examples[path])}"
            for path, count in counts.items()]


def _is_stale(found: FileCheck) -> bool:
    """Stale by its record, unless every row was compared with its inputs and found equal
    (then only a timestamp changed)."""
    return found.stale is not None and (found.mismatch is not None or found.compared_rows != found.rows)


def _half_counts(counts: dict) -> str:
    if counts.get("nucleotide") is None:
        return str(counts.get("total", ""))
    return f"{counts['nucleotide']} / {counts['protein']}"


def _file_findings(found: FileCheck) -> list[str]:
    path = found.path
    if found.error is not None:
        return [f"{path}: does not load: {found.error}"]
    lines = []
    for what, counts in (("NaN", found.nan), ("infinite", found.inf)):
        if counts.get("total"):
            lines.append(f"{path}: {counts['total']} {what} values"
                         + ("" if counts.get("nucleotide") is None else
                            f" ({counts['nucleotide']} nucleotide, {counts['protein']} protein)"))
    if found.zero_rows:
        lines.append(f"{path}: {found.zero_rows} all-zero rows, e.g. ids {found.zero_row_examples}")
    if found.duplicate_ids:
        lines.append(f"{path}: {found.duplicate_ids} ids appear more than once, "
                     f"e.g. {found.duplicate_id_examples}")
    if _is_stale(found):
        lines.append(f"stale: {found.stale}")
    if found.mismatch is not None:
        lines.append(found.mismatch)
    return lines


def check(
    output_dir: str | os.PathLike[str],
    nucleotide_dir: str | os.PathLike[str] | None = None,
    protein_dir: str | os.PathLike[str] | None = None,
    *,
    nucleotide_width: int | None = None,
    sample_rows: int | None = None,
    seed: int = 0,
    scheduler: str = "processes",
    workers: int | None = None,
    scheduler_file: str | None = None,
    dashboard_address: str = "127.0.0.1:8787",
    progress: bool = True,
    client=None,
) -> CheckReport:
    """Check every ``STEM_merged.pt`` in ``output_dir``; return a :class:`CheckReport`.

    Parameters
    ----------
    output_dir
        The folder of merged files.
    nucleotide_dir, protein_dir
        The inputs (``protein_dir`` defaults to ``nucleotide_dir``): also check
        that each output is the merge of its inputs as they are now, and that
        every pair has its output.
    nucleotide_width
        Width of the nucleotide half; default: the inputs', else 768 for
        3328-wide files, else unknown (NaN/Inf then counted in total only).
    sample_rows
        Compare only this many rows of each output with its inputs' merge
        (the inputs are still read whole); default: every row.
    seed
        Which rows ``sample_rows`` draws.
    scheduler, workers, scheduler_file, dashboard_address, progress, client
        As for :meth:`dask_merge.Plan.execute`.

    Raises
    ------
    ConfigurationError
        A missing folder, no merged files, a bad option.
    """
    executor = get_executor(scheduler, workers=workers, scheduler_file=scheduler_file,
                            dashboard_address=dashboard_address, progress=progress, client=client)
    for name, value in (("nucleotide_width", nucleotide_width), ("sample_rows", sample_rows)):
        if value is not None and not (isinstance(value, numbers.Integral)
                                      and not isinstance(value, bool) and value >= 0):
            raise ConfigurationError(f"{name} must be an int of at least 0 (or None), not {value!r}")
    if protein_dir is not None and nucleotide_dir is None:
        raise ConfigurationError("a protein folder needs its nucleotide folder")
    files, missing = _files(os.fspath(output_dir), nucleotide_dir, protein_dir)
    start = time.perf_counter()
    found, dashboard = _compute(files, (nucleotide_width, sample_rows, seed), executor)
    return CheckReport(found, os.fspath(output_dir), missing, time.perf_counter() - start,
                       executor.name, dashboard)


def _files(output_dir: str, nucleotide_dir, protein_dir) -> tuple[list[tuple], list[str]]:
    """``(output, nucleotide, protein)`` of each merged file (inputs None when not
    given or not found), and the outputs the inputs should have made but that are missing."""
    if not os.path.isdir(output_dir):
        raise ConfigurationError(f"output folder {output_dir} does not exist")
    outputs = files_by_stem(output_dir, MERGED_SUFFIX)
    if not outputs:
        raise ConfigurationError(f"no STEM{MERGED_SUFFIX} files in {output_dir}")
    pairs = {}
    if nucleotide_dir is not None:
        try:
            pairs = {p.name: p for p in find_pairs(nucleotide_dir, protein_dir, output_dir)}
        except (ValueError, FileNotFoundError) as err:
            raise ConfigurationError(str(err)) from None
    files = [(outputs[stem], *(pairs[stem][1:3] if stem in pairs else (None, None)))
             for stem in sorted(outputs, key=natural_key)]
    missing = [p.output for stem, p in pairs.items() if stem not in outputs]
    return files, missing


def _batches(files: list[tuple], workers: int) -> list[list[tuple]]:
    """Cut the files into tasks as ``run`` cuts pairs: by their bytes (output and inputs)."""
    sizes = [sum(os.path.getsize(p) for p in f if p is not None and os.path.isfile(p))
             for f in files]
    return partition(files, sizes, threads=workers)


def _compute(files: list[tuple], options: tuple, executor) -> tuple[list[FileCheck], str | None]:
    """Run :func:`check_files` on batches of the files with ``executor``'s workers;
    a batch whose worker died is reported unreadable."""
    with executor.started() as session:
        # Dask is imported once the executor has started: the pool's fork
        # server imports the workers' modules meanwhile, on another core.
        from dask.base import tokenize

        batches = _batches(files, session.threads)
        name = f"{TASK_NAME}-{tokenize(batches, options)}"
        graph = {(name, i): (check_files, tuple(map(tuple, b)), *options)
                 for i, b in enumerate(batches)}
        keys = list(graph)
        if session.client is not None:
            unseen = session.client.submit(_paths_unseen, [files[0][0]], pure=False).result()
            if unseen:
                raise ConfigurationError(f"a Dask worker cannot see {unseen[0]}: workers must "
                                         "see the same paths as the client")
            results = _on_cluster(session.client, graph, keys, executor.progress)
        else:
            results = _on_local(graph, keys, executor.name, executor.workers, executor.progress)
    found = []
    for batch, result in zip(batches, results):
        found += result if result is not None else [
            FileCheck(path, error=f"{path}: the worker died while checking it (out of memory?)")
            for path, _, _ in batch]
    return found, session.dashboard


def _on_local(graph, keys, scheduler: str, workers: int, progress: bool) -> list:
    from concurrent.futures.process import BrokenProcessPool

    from dask.callbacks import Callback

    from .executors.graph import LOCAL_SCHEDULERS, progress_bar

    done: dict = {}
    options = {"num_workers": workers}
    pool = None
    if scheduler == "processes":
        pool = _start_pool(workers)
        options = {"pool": pool, "chunksize": 1}
    try:
        with Callback(posttask=lambda key, result, *_: done.__setitem__(key, result)), \
                progress_bar(progress):
            LOCAL_SCHEDULERS[scheduler](graph, keys, **options)
    except BrokenProcessPool:
        pass  # the batches that had not finished are reported below
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return [done.get(key) for key in keys]


def _on_cluster(client, graph, keys, progress: bool) -> list:
    from distributed import KilledWorker, futures_of

    futures = futures_of(client.get(graph, keys, sync=False))
    shown = show_progress(client, futures) if progress else None
    results = []
    for future in futures:
        try:
            results.append(future.result())
        except KilledWorker:
            results.append(None)
    if shown is not None:
        shown.finish()
    return results
