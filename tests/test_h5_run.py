"""Runs from VirNucPro v2's HDF5 embeddings: the Python API, checkpoints and the command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import dask_merge
from dask_merge.cli import main
from dask_merge.testing import fork_convert, make_h5_dataset

NARROW = {"nucleotide_width": 8, "protein_width": 40}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def fork_bytes(tmp_path: Path, sample, label=None) -> dict[str, bytes]:
    """Each merged file of the fork's convert-then-merge path, by name."""
    esm, out = tmp_path / "fork-esm", tmp_path / "fork-out"
    esm.mkdir(exist_ok=True)
    fork_convert(sample.files, {p.stem: p.protein_ids for p in sample.pairs}, esm)
    dask_merge.run(sample.pairs[0].nucleotide.parent, esm, out, label=label, scheduler="sync",
                   progress=False)
    return {p.name: p.read_bytes() for p in out.glob("*_merged.pt")}


def outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob("*_merged.pt")}


@pytest.mark.parametrize("shards, scheduler", [(0, "processes"), (3, "processes"), (2, "local")])
def test_plan_merges_from_hdf5_as_the_fork_would(tmp_path, shards, scheduler):
    sample = make_h5_dataset(tmp_path / "features", tmp_path / "esm", pairs=5, rows=60,
                             shards=shards, compression="gzip" if shards else None, **NARROW)
    assert isinstance(sample.protein, list if shards else str)
    plan = dask_merge.plan(tmp_path / "features", sample.protein, tmp_path / "merged", label="host")
    assert len(plan.pending) == 5 and not plan.unpaired
    report = plan.execute(scheduler, workers=2, progress=False)
    assert report.counts == {"merged": 5, "skipped": 0, "failed": 0}
    assert [(r.rows, r.nucleotide_only, r.protein_only) for r in report.records] == [(60, 1, 0)] * 5
    assert outputs(tmp_path / "merged") == fork_bytes(tmp_path, sample, label="host")


def test_a_regenerated_embeddings_file_makes_every_pair_pending(tmp_path):
    sample = make_h5_dataset(tmp_path / "features", tmp_path / "esm", pairs=3, rows=10, **NARROW)
    dask_merge.run(tmp_path / "features", sample.protein, tmp_path / "merged", scheduler="sync",
                   progress=False)
    again = dask_merge.plan(tmp_path / "features", sample.protein, tmp_path / "merged")
    assert not again.pending and [c.reason for _, c in again.done] == ["up to date"] * 3
    # The same ids with other vectors, as a new run of the ESM-2 stage writes them.
    with h5py.File(sample.files[0], "r+") as f:
        f["embeddings"][0] = np.ones(40, np.float32)
    os.utime(sample.files[0], ns=(1, 1))
    again = dask_merge.plan(tmp_path / "features", sample.protein, tmp_path / "merged")
    assert len(again.pending) == 3
    report = again.execute("sync", progress=False)
    assert report.counts["merged"] == 3
    assert outputs(tmp_path / "merged") == fork_bytes(tmp_path, sample)


def test_a_bad_hdf5_fails_every_pair_naming_it(tmp_path):
    sample = make_h5_dataset(tmp_path / "features", tmp_path / "esm", pairs=2, rows=5, **NARROW)
    with h5py.File(sample.files[0], "r+") as f:
        del f["sequence_ids"]
    report = dask_merge.run(tmp_path / "features", sample.protein, tmp_path / "merged",
                            scheduler="processes", workers=2, progress=False)
    assert report.counts == {"merged": 0, "skipped": 0, "failed": 2}
    assert all(f"{sample.files[0]}: no dataset 'sequence_ids'" in r.error for r in report.records)
    assert not list((tmp_path / "merged").glob("*.pt"))


def test_planning_names_a_missing_hdf5_file(tmp_path):
    make_h5_dataset(tmp_path / "features", tmp_path / "esm", pairs=1, rows=5, **NARROW)
    with pytest.raises(dask_merge.ConfigurationError, match=r"HDF5 file .*gone\.h5 does not exist"):
        dask_merge.plan(tmp_path / "features", [tmp_path / "esm" / "embeddings.h5",
                                                tmp_path / "esm" / "gone.h5"], tmp_path / "m")


def test_the_command_takes_one_file_repeated_shards_or_a_glob(tmp_path):
    runner = CliRunner()
    made = runner.invoke(main, ["sample", "--dir", str(tmp_path / "v2"), "--pairs", "3", "--rows",
                                "20", "--layout", "v2", "--shards", "2", "--compression", "gzip",
                                "--nucleotide-width", "8", "--protein-width", "40"])
    assert made.exit_code == 0, made.output
    shards = [tmp_path / "v2" / "shard_0.h5", tmp_path / "v2" / "shard_1.h5"]
    assert all(s.is_file() for s in shards) and not (tmp_path / "v2" / "embeddings.h5").exists()
    common = ["--nucleotide-dir", tmp_path / "v2", "--scheduler", "sync", "--no-progress"]
    repeated = invoke("run", *common, "--protein-h5", shards[0], "--protein-h5", shards[1],
                      "--output-dir", tmp_path / "a", "--report", tmp_path / "a.json")
    assert repeated.exit_code == 0, repeated.output
    assert "merged 3, skipped 0, failed 0" in repeated.output
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["pairs"][0]["rows"] == 20 and report["pairs"][0]["protein_only"] == 0
    globbed = invoke("run", *common, "--protein-h5", tmp_path / "v2" / "shard_*.h5",
                     "--output-dir", tmp_path / "a")
    assert globbed.exit_code == 0 and "merged 0, skipped 3" in globbed.output, globbed.output
    one = make_h5_dataset(tmp_path / "v1", tmp_path / "v1", pairs=2, rows=10, **NARROW)
    single = invoke("run", "--nucleotide-dir", tmp_path / "v1", "--protein-h5", one.protein,
                    "--output-dir", tmp_path / "b", "--scheduler", "sync", "--no-progress")
    assert single.exit_code == 0 and "merged 2" in single.output, single.output


def test_the_command_refuses_both_protein_options_and_names_a_missing_file(tmp_path):
    make_h5_dataset(tmp_path / "f", tmp_path / "f", pairs=1, rows=5, **NARROW)
    both = invoke("run", "--nucleotide-dir", tmp_path / "f", "--protein-dir", tmp_path / "f",
                  "--protein-h5", tmp_path / "f" / "embeddings.h5", "--output-dir", tmp_path / "o")
    assert both.exit_code == 2 and "--protein-dir or --protein-h5, not both" in both.output
    missing = invoke("run", "--nucleotide-dir", tmp_path / "f", "--protein-h5",
                     tmp_path / "nope_*.h5", "--output-dir", tmp_path / "o")
    assert missing.exit_code == 2 and f"HDF5 file {tmp_path / 'nope_*.h5'} does not exist" in \
        missing.output
    v1_only = invoke("sample", "--dir", tmp_path / "s", "--shards", "2")
    assert v1_only.exit_code == 2 and "go with --layout v2" in v1_only.output
