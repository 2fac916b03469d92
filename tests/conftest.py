"""Shared fixtures: the real upstream files, and small sample data sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dask_merge.testing import make_dataset

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(
    os.environ.get("DASK_MERGE_FIXTURES", REPO.parent / "shared" / "fixtures" / "virnucpro-reference")
)
REFERENCE_SETS = ["test_with_orfs", "test_fixed_500bp"]


@pytest.fixture(params=REFERENCE_SETS)
def reference_set(request) -> Path:
    """A folder with a real upstream pair and its merged output (output_1_*)."""
    folder = FIXTURES / request.param
    assert (folder / "output_1_merged.pt").is_file(), (
        f"the golden fixtures are missing at {folder}; set DASK_MERGE_FIXTURES"
    )
    return folder


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Six small pairs (20 shared rows, narrow vectors) in tmp_path/features."""
    folder = tmp_path / "features"
    make_dataset(folder, pairs=6, rows=20, nucleotide_width=12, protein_width=20)
    return folder
