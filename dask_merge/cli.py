"""The ``dask-merge`` command.

Exit status: 0 when nothing failed, 1 when at least one pair failed, 2 for bad
usage or configuration (the message names the path or value at fault), 130
when interrupted.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from .report import Report

# The package is imported by the commands, not here: `dask-merge --help`
# stays quick, and workers that are spawned (on Windows; elsewhere they never
# run this script) need none of it.

EXIT_FAILED, EXIT_CONFIG, EXIT_INTERRUPTED = 1, 2, 130


def _fail(message: str) -> None:
    click.echo(f"dask-merge: error: {message}", err=True)
    sys.exit(EXIT_CONFIG)


def _exits_130_on_ctrl_c(command):
    """Ctrl-C at any moment of ``run``: exit 130, say what is done, no traceback."""
    @functools.wraps(command)
    def wrapper(**options):
        started = time.perf_counter()
        try:
            command(**options)
        except KeyboardInterrupt:
            _interrupted(options, started)
    return wrapper


class _FoldersAsOptions(click.Command):
    """``run``: say that folders are options when they are given as arguments."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        takes_value = {o for p in self.params if isinstance(p, click.Option) and not p.is_flag
                       for o in p.opts}
        stray = [a for before, a in zip([None, *args], args)
                 if not a.startswith("-") and before not in takes_value]
        if stray and "--help" not in args and "-h" not in args:
            raise click.UsageError(
                f"folders are given as options, not as arguments ({' '.join(stray)}): "
                "dask-merge run --nucleotide-dir DIR [--protein-dir DIR] --output-dir DIR, or "
                "dask-merge run --pairs FILE [--output-dir DIR]", ctx)
        return super().parse_args(ctx, args)


def _scheduler_options(command):
    """The options that say where ``run`` and ``check`` compute."""
    for option in reversed([
        click.option("--scheduler", default="processes", show_default=True,
                     help="processes | threads | sync | local | tcp://HOST:PORT of a running scheduler."),
        click.option("--scheduler-file", type=click.Path(dir_okay=False),
                     help="Scheduler file of a running Dask cluster (dask-jobqueue, dask-mpi)."),
        click.option("--workers", type=click.IntRange(min=1), help="Worker processes [default: cores]."),
        click.option("--dashboard-address", default="127.0.0.1:8787", show_default=True,
                     help="Dashboard of --scheduler local (a free port if taken)."),
    ]):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dask-merge")
def main() -> None:
    """Merge VirNucPro DNABERT-S and ESM-2 feature files (Stage 7) with Dask."""


@main.command("run", cls=_FoldersAsOptions)
@click.option("--nucleotide-dir", type=click.Path(file_okay=False),
              help="Folder of STEM_DNABERT_S.pt files (folder mode).")
@click.option("--protein-dir", type=click.Path(file_okay=False),
              help="Folder of STEM_ESM.pt files [default: the nucleotide folder].")
@click.option("--protein-h5", multiple=True, metavar="FILE",
              help="Instead of --protein-dir: the ESM-2 HDF5 file of VirNucPro v2 (embeddings.h5); "
                   "repeat it, or give a quoted glob ('esm/shard_*.h5'), for shards.")
@click.option("--nucleotide-suffix", metavar="SUFFIX",
              help="Pair files named STEM+SUFFIX in the nucleotide folder [default: _DNABERT_S.pt].")
@click.option("--protein-suffix", metavar="SUFFIX",
              help="... with files named STEM+SUFFIX in the protein folder [default: _ESM.pt].")
@click.option("--pairs", "pairs_file", type=click.Path(exists=True, dir_okay=False),
              help="Merge the pairs FILE lists instead of a folder's: one pair a line, "
                   "NUCLEOTIDE<tab>PROTEIN[<tab>OUTPUT], paths relative to FILE's folder.")
@click.option("--output-dir", type=click.Path(file_okay=False),
              help="Folder for STEM_merged.pt files (created if missing); with --pairs, of the "
                   "pairs without an OUTPUT.")
@_scheduler_options
@click.option("--label", help="Training label stored in each output: viral | host | INT.")
@click.option("--force", is_flag=True, help="Merge every pair again, checkpointed or not.")
@click.option("--dry-run", is_flag=True, help="Print the plan; merge nothing.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, allow_dash=True),
              help="Write the JSON report here ('-': to stdout, and the summary to stderr).")
@click.option("--no-progress", is_flag=True, help="No progress bar (for scripts and CI logs).")
@click.option("--retries", default=1, show_default=True, type=click.IntRange(min=0),
              help="Extra tries for a pair whose worker died.")
@click.option("--partition-size", type=click.IntRange(min=1),
              help="Pairs per task [default: chosen from the pair sizes].")
@click.option("--performance-report", type=click.Path(dir_okay=False),
              help="On a cluster: write Dask's HTML performance report here.")
@click.option("--max-dropped", type=click.FloatRange(0, 1), metavar="SHARE",
              help="Fail a pair (writing nothing) when more than this share of a file's ids "
                   "has no partner [default: merge, and warn above 0.1].")
@_exits_130_on_ctrl_c
def run_command(nucleotide_dir, protein_dir, protein_h5, nucleotide_suffix, protein_suffix,
                pairs_file, output_dir, scheduler, scheduler_file, workers, dashboard_address,
                label, force, dry_run, report_path, no_progress, retries, partition_size,
                performance_report, max_dropped) -> None:
    """Merge every pair of NUCLEOTIDE-DIR / PROTEIN-DIR (or PROTEIN-H5), or those --pairs
    lists, into OUTPUT-DIR."""
    if protein_dir and protein_h5:
        _fail("give --protein-dir or --protein-h5, not both")
    from . import ConfigurationError
    from .executors import get_executor

    _check_pair_source(nucleotide_dir, protein_dir or protein_h5 or None, nucleotide_suffix,
                       protein_suffix, pairs_file, output_dir)

    try:  # a typo'd scheduler fails before planning makes the output folder
        executor = get_executor(
            scheduler, workers=workers, scheduler_file=scheduler_file,
            dashboard_address=dashboard_address, progress=not no_progress, retries=retries,
            partition_size=partition_size, performance_report=performance_report,
        )
    except ConfigurationError as err:
        _fail(str(err))
    for path in (report_path, performance_report):  # known before the work, not after it
        folder = os.path.dirname(os.path.abspath(path)) if path and path != "-" else None
        if folder and not os.path.isdir(folder):
            _fail(f"cannot write {path}: folder {folder} does not exist")
    try:
        the_plan = _planned(click.get_current_context().params, force=force)
    except ConfigurationError as err:
        _fail(str(err))
    _print_plan(the_plan, verbose=dry_run)
    if dry_run:
        return
    try:
        report = the_plan.execute(executor)
    except ConfigurationError as err:
        _fail(str(err))
    _finish(report, the_plan.output_dir, report_path)


def _check_pair_source(nucleotide_dir, protein, nucleotide_suffix, protein_suffix,
                       pairs_file, output_dir) -> None:
    """Folder mode or ``--pairs``, with the options each takes: else a usage error (exit 2)."""
    if (nucleotide_dir is None) == (pairs_file is None):
        raise click.UsageError("give either --nucleotide-dir (folder mode) or --pairs FILE"
                               + (", not both" if pairs_file else ""))
    if nucleotide_dir is not None and output_dir is None:
        raise click.UsageError("Missing option '--output-dir'.")
    folder_only = [option for option, value in (("--protein-dir/--protein-h5", protein),
                                                ("--nucleotide-suffix", nucleotide_suffix),
                                                ("--protein-suffix", protein_suffix))
                   if value is not None]
    if pairs_file is not None and folder_only:
        raise click.UsageError(f"{', '.join(folder_only)}: for folder mode (--nucleotide-dir), "
                               "not with --pairs, whose FILE names every file")


def _planned(options: dict, *, force: bool):
    """The plan of the command's options: of a folder, or of a pairs file."""
    from . import plan, plan_pairs

    if options["pairs_file"] is not None:
        from .pairlist import read_pairs_file

        return plan_pairs(read_pairs_file(options["pairs_file"]), options["output_dir"],
                          label=options["label"], force=force, max_dropped=options["max_dropped"])
    suffixes = {f"{side}_suffix": options[f"{side}_suffix"] for side in ("nucleotide", "protein")
                if options[f"{side}_suffix"] is not None}
    return plan(options["nucleotide_dir"], _protein_side(options), options["output_dir"],
                label=options["label"], force=force, max_dropped=options["max_dropped"],
                **suffixes)


def _protein_side(options: dict):
    """``--protein-dir``, or the HDF5 files of ``--protein-h5`` with globs expanded.

    A value naming no file is taken for a glob; one matching nothing stays
    as given, for planning to report it missing.
    """
    if not options["protein_h5"]:
        return options["protein_dir"]
    from .pairs import natural_key

    files = []
    for given in options["protein_h5"]:
        matches = [] if os.path.exists(given) else sorted(glob.glob(given), key=natural_key)
        files.extend(matches or [given])
    return files


def _print_plan(the_plan, *, verbose: bool) -> None:
    # The plan's counts are progress (stderr); a dry run's listing is its result (stdout).
    click.echo(f"dask-merge: {len(the_plan.pending)} pairs to merge, {len(the_plan.done)} "
               f"checkpointed, {len(the_plan.unpaired)} files without a partner", err=True)
    if verbose:
        for pair in the_plan.pending:
            click.echo(f"pending       {pair.name}")
        for pair, state in the_plan.done:
            click.echo(f"checkpointed  {pair.name}  ({state.reason})")
        for path in the_plan.unpaired:
            click.echo(f"no partner    {path}")


def _interrupted(options: dict, started: float) -> None:
    # Workers are stopped and temporaries removed by the executor; tell what is done.
    again = "Run the same command again to resume."
    try:
        # Ctrl-C may have broken off the package's import
        after = _planned(options, force=False)
        if options["force"]:  # the same command would merge every pair again
            done = (f"{len(after.done)} pairs have an up-to-date output (this run's or older), "
                    f"{len(after.pending)} do not. ")
            again = "Run the command again without --force to merge only those."
        else:
            done = f"{len(after.done)} pairs are done, {len(after.pending)} left. "
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 (only to say what is done)
        # A folder gone; Ctrl-C again; or the Ctrl-C cut short the import of
        # the package or of Dask, whose half-made modules then fail in any way
        # (AttributeError, NameError, ...).
        done = f"cannot tell what is done ({str(err) or 'interrupted again'}). "
    click.echo(f"\ndask-merge: interrupted after {time.perf_counter() - started:.1f} s; "
               f"{done}{again}", err=True)
    sys.exit(EXIT_INTERRUPTED)


def _finish(report: Report, output_dir: str | None, report_path: str | None) -> None:
    """Write the report, print the summary (stdout) and warnings (stderr), exit."""
    from .errors import MergeError

    code = 0 if report.ok else EXIT_FAILED
    written = None
    to_stdout = report_path == "-"
    if to_stdout:  # the JSON is the result: the summary steps aside to stderr
        click.echo(json.dumps(report.to_dict(), indent=1))
    elif report_path:
        try:
            report.to_json(report_path)
            written = report_path
        except MergeError as err:  # the folder went, the disk is full, ...
            click.echo(f"dask-merge: error: the report was not written: {err}", err=True)
            code = EXIT_FAILED
    for warning in report.warnings():
        click.echo(f"dask-merge: {warning}", err=True)
    click.echo(report.summary(), err=to_stdout)
    where = os.path.abspath(output_dir) if output_dir is not None else "the listed folders"
    click.echo(f"outputs in {where}"
               + (f"; report in {written}" if written else ""), err=to_stdout)
    sys.exit(code)


@main.command("check")
@click.option("--output-dir", required=True, type=click.Path(file_okay=False),
              help="Folder of STEM_merged.pt files to check.")
@click.option("--nucleotide-dir", type=click.Path(file_okay=False),
              help="Their STEM_DNABERT_S.pt inputs: also check each output is their merge.")
@click.option("--protein-dir", type=click.Path(file_okay=False),
              help="Their STEM_ESM.pt inputs [default: the nucleotide folder].")
@click.option("--nucleotide-width", type=click.IntRange(min=0),
              help="Width of the nucleotide half [default: the inputs', else 768 of 3328].")
@click.option("--sample-rows", type=click.IntRange(min=0),
              help="Compare only this many rows per output with its inputs' merge [default: all].")
@_scheduler_options
@click.option("--report", "report_path", type=click.Path(dir_okay=False),
              help="Write the JSON report here.")
@click.option("--no-progress", is_flag=True, help="No progress bar (for scripts and CI logs).")
def check_command(output_dir, nucleotide_dir, protein_dir, nucleotide_width, sample_rows, scheduler,
                  scheduler_file, workers, dashboard_address, report_path, no_progress) -> None:
    """Check the merged files of OUTPUT-DIR: NaN/Inf, zero rows, duplicate ids, stale outputs.

    Exit status 0 when nothing was found, 1 for findings, 2 for bad usage.
    """
    if scheduler == "processes" and scheduler_file is None:
        # The pool's fork server imports what the workers need (numpy, the
        # reader, Dask's core) while this process imports the same for itself.
        from ._worker_main import pool_context

        pool_context()
    try:
        _check_and_report(report_path, output_dir, nucleotide_dir, protein_dir,
                          nucleotide_width=nucleotide_width, sample_rows=sample_rows,
                          scheduler=scheduler, scheduler_file=scheduler_file, workers=workers,
                          dashboard_address=dashboard_address, progress=not no_progress)
    except KeyboardInterrupt:
        click.echo("\ndask-merge: check interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)


def _check_and_report(report_path, *folders, **options) -> None:
    from .checks import check
    from .errors import ConfigurationError, MergeError

    folder = os.path.dirname(os.path.abspath(report_path)) if report_path else None
    if folder and not os.path.isdir(folder):
        _fail(f"cannot write {report_path}: folder {folder} does not exist")
    try:
        report = check(*folders, **options)
    except ConfigurationError as err:
        _fail(str(err))
    code = 0 if report.ok else EXIT_FAILED
    if report_path:
        try:
            report.to_json(report_path)
        except MergeError as err:
            click.echo(f"dask-merge: error: the report was not written: {err}", err=True)
            code = EXIT_FAILED
    click.echo(report.summary())  # the result: stdout, as for run
    sys.exit(code)


@main.command()
@click.option("--dir", "folder", required=True, type=click.Path(file_okay=False),
              help="Folder to write the pairs into (created if missing).")
@click.option("--pairs", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--rows", default=1000, show_default=True, type=click.IntRange(min=0))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--nucleotide-width", default=768, show_default=True, type=click.IntRange(min=1))
@click.option("--protein-width", default=2560, show_default=True, type=click.IntRange(min=1))
@click.option("--layout", type=click.Choice(["v1", "v2"]), default="v1", show_default=True,
              help="v1: STEM_ESM.pt files; v2 (VirNucPro v2): DIR/embeddings.h5 instead.")
@click.option("--shards", default=0, show_default=True, type=click.IntRange(min=0),
              help="With --layout v2: write DIR/shard_0.h5 ... instead of embeddings.h5.")
@click.option("--compression", type=click.Choice(["none", "gzip"]), default="none",
              show_default=True, help="With --layout v2: of the HDF5 embeddings.")
def sample(folder, pairs, rows, seed, nucleotide_width, protein_width, layout, shards,
           compression) -> None:
    """Write realistic synthetic pairs in the upstream formats.

    Protein ids come in another order than nucleotide ids, a few ids are on
    one side only, and widths are DNABERT-S's and ESM-2 3B's by default.
    """
    if layout == "v1" and (shards or compression != "none"):
        _fail("--shards and --compression go with --layout v2")
    h5 = {"shards": shards, "compression": None if compression == "none" else compression}
    _write_sample(folder, pairs, rows, seed, h5=h5 if layout == "v2" else None,
                  nucleotide_width=nucleotide_width, protein_width=protein_width)


def _write_sample(folder, pairs, rows, seed, *, h5: dict | None = None, **widths) -> None:
    from .testing import make_dataset, make_h5_dataset

    with click.progressbar(length=pairs, label=f"writing {pairs} sample pairs",
                           file=sys.stderr) as bar:
        if h5 is None:
            make_dataset(folder, pairs=pairs, rows=rows, seed=seed,
                         on_pair=lambda pair: bar.update(1), **widths)
        else:
            made = make_h5_dataset(folder, folder, pairs=pairs, rows=rows, seed=seed,
                                   on_pair=lambda pair: bar.update(1), **h5, **widths)
    if h5 is not None:
        click.echo(f"ESM-2 vectors in {', '.join(map(str, made.files))}", err=True)


@main.command()
@click.option("--dir", "folder", default="dask-merge-demo", show_default=True,
              type=click.Path(file_okay=False), help="Where the sample data and outputs go.")
@click.option("--pairs", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--rows", default=1000, show_default=True, type=click.IntRange(min=1))
def demo(folder, pairs, rows) -> None:
    """Make a sample data set and merge it on the processes scheduler."""
    from . import plan

    inputs, outputs = Path(folder) / "features", Path(folder) / "merged"
    if not any(inputs.glob("*_ESM.pt")):
        _write_sample(inputs, pairs, rows, seed=0)
    the_plan = plan(inputs, None, outputs, label="viral")
    _print_plan(the_plan, verbose=False)
    report = the_plan.execute("processes")
    report.to_json(str(Path(folder) / "report.json"))
    click.echo(report.summary())
    click.echo(
        f"\nInputs in {inputs}/, merged files in {outputs}/, the JSON report in "
        f"{Path(folder) / 'report.json'}.\nRun the demo again: every pair is skipped "
        "(checkpointed). Try also: dask-merge run --scheduler local "
        f"--nucleotide-dir {inputs} --output-dir {outputs} --force")
    sys.exit(0 if report.ok else EXIT_FAILED)
