"""Shared fixtures: the real upstream files, and small sample data sets."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest

from dask_merge.testing import make_dataset

collect_ignore = ["scripts"]  # run as subprocesses by the tests, not collected

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "data"  # real upstream files; see its README for their source
REFERENCE_SETS = ["test_with_orfs", "test_fixed_500bp"]

def _recorded_sums() -> dict[str, str]:
    """The SHA-256 sums that tests/data/README.md records, by relative path."""
    text = (FIXTURES / "README.md").read_text()
    return dict((path, digest) for digest, path in re.findall(r"^([0-9a-f]{64})  (\S+)$", text, re.M))

@pytest.fixture(params=REFERENCE_SETS)
def reference_set(request) -> Path:
    """A folder with a real upstream pair and its merged output (output_1_*), checked intact."""
    folder = FIXTURES / request.param
    sums = {path: digest for path, digest in _recorded_sums().items()
            if path.startswith(request.param + "/")}
    assert len(sums) == 3, f"tests/data/README.md records {len(sums)} sums for {request.param}"
    for path, digest in sums.items():
        assert hashlib.sha256((FIXTURES / path).read_bytes()).hexdigest() == digest, (
            f"tests/data/{path} differs from the upstream file recorded in tests/data/README.md")
    return folder

@pytest.fixture
def dataset(tmp_path) -> Path:
    """Six small pairs (20 shared rows, narrow vectors) in tmp_path/features."""
    folder = tmp_path / "features"
    make_dataset(folder, pairs=6, rows=20, nucleotide_width=12, protein_width=20)
    return folder

def copy_reference_pairs(folder: Path, pairs: int) -> Path:
    """``pairs`` copies of a real upstream pair in ``folder`` (output_1 .. output_N); no torch needed."""
    folder.mkdir(parents=True, exist_ok=True)
    source = FIXTURES / "test_with_orfs"
    for i in range(1, pairs + 1):
        for side in ("DNABERT_S", "ESM"):
            shutil.copyfile(source / f"output_1_{side}.pt", folder / f"output_{i}_{side}.pt")
    return folder
