"""open_merged: a folder of merged files as one lazy Dask array, equal to torch.load's."""

from __future__ import annotations

import os

import dask
import dask.array as da
import numpy as np
import pytest
import torch

import dask_merge
from dask_merge.header import read_merged_header
from dask_merge.testing import make_dataset


@pytest.fixture
def merged(tmp_path):
    """Five merged files of 1 to 40 rows, 12 + 20 wide, one of them empty."""
    features = tmp_path / "features"
    make_dataset(features, pairs=5, rows=30, nucleotide_width=12, protein_width=20)
    dask_merge.run(features, output_dir=tmp_path / "merged", scheduler="sync", progress=False,
                   label="viral")
    empty = tmp_path / "merged" / "output_5_merged.pt"
    torch.save({"ids": [], "data": torch.zeros(0, 32), "labels": [1]}, empty)
    return tmp_path / "merged"


def _loaded(folder):
    files = sorted(folder.glob("*_merged.pt"), key=lambda p: int(p.name.split("_")[1]))
    return [torch.load(f) for f in files]


def test_open_merged_equals_torch_load_of_each_file_bit_for_bit(merged):
    opened = dask_merge.open_merged(merged, nucleotide_width=12)
    loaded = _loaded(merged)
    expected = np.concatenate([x["data"].numpy() for x in loaded])
    got = opened.data.compute(scheduler="sync")
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    assert opened.ids == [i for x in loaded for i in x["ids"]]
    assert opened.rows == [len(x["ids"]) for x in loaded] and opened.labels == [[1]] * 6
    assert opened.data.chunks == (tuple(opened.rows), (32,))
    assert np.array_equal(opened.protein.compute(scheduler="sync"), expected[:, 12:])


def test_open_merged_reads_no_tensor_data(tmp_path, monkeypatch):
    """Opening preads the zip directory and the pickle only: some KB of a 20 MB file."""
    make_dataset(tmp_path / "features", pairs=1, rows=1500)  # 768 + 2560 wide
    dask_merge.run(tmp_path / "features", output_dir=tmp_path / "merged", scheduler="sync",
                   progress=False)
    read = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, at: read.append(n) or real(fd, n, at))
    opened = dask_merge.open_merged(tmp_path / "merged")
    assert (tmp_path / "merged" / "output_0_merged.pt").stat().st_size > 19e6
    assert 0 < sum(read) < 200_000
    assert opened.nucleotide_width == 768 and opened.protein_width == 2560  # the standard split
    assert len(opened.ids) == opened.data.shape[0] == 1500


def test_the_array_computes_on_the_processes_scheduler_and_halves_are_named(merged):
    opened = dask_merge.open_merged(merged, nucleotide_width=12)
    expected = np.concatenate([x["data"].numpy() for x in _loaded(merged)])
    with dask.config.set(scheduler="processes", num_workers=2):
        means = opened.nucleotide.mean(axis=0).compute()
    assert np.allclose(means, expected[:, :12].mean(axis=0), rtol=1e-5)
    u, s, v = da.linalg.svd_compressed(opened.data, k=2, seed=0)
    assert s.compute(scheduler="sync").shape == (2,)
    assert {key[0].rsplit("-", 1)[0] for key in opened.data.__dask_graph__()} == {"merged-rows"}


def test_to_xarray_has_ids_files_and_parts(merged):
    xr = pytest.importorskip("xarray")
    ds = dask_merge.open_merged(merged, nucleotide_width=12).to_xarray()
    assert isinstance(ds, xr.Dataset)
    assert list(ds["id"].values[:2]) == _loaded(merged)[0]["ids"][:2]
    assert (ds["part"].values == "nucleotide").sum() == 12
    assert ds["features"].sel(column=ds["part"] == "protein").shape[1] == 20


def test_a_file_changed_since_opening_is_refused_naming_it(merged):
    opened = dask_merge.open_merged(merged)
    victim = merged / "output_2_merged.pt"
    x = torch.load(victim)
    x["data"] = x["data"] + 1
    torch.save(x, victim)
    with pytest.raises(dask_merge.MergeError, match=r"output_2_merged\.pt: changed since it was opened"):
        opened.data.compute(scheduler="sync")
    assert opened.data.blocks[0].compute(scheduler="sync").shape[0] == opened.rows[0]


def test_bad_files_and_mixed_widths_are_named(merged):
    (merged / "output_9_merged.pt").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(dask_merge.FileFormatError, match=r"output_9_merged\.pt"):
        dask_merge.open_merged(merged)
    torch.save({"ids": ["a"], "data": torch.zeros(1, 5)}, merged / "output_9_merged.pt")
    with pytest.raises(dask_merge.FileFormatError, match=r"different widths.*is 5 wide"):
        dask_merge.open_merged(merged)
    torch.save({"ids": ["a"], "data": torch.zeros(1, 5, dtype=torch.float64)}, merged / "x_merged.pt")
    with pytest.raises(dask_merge.FileFormatError, match=r"x_merged\.pt: 'data' is a 2-D float64"):
        read_merged_header(merged / "x_merged.pt")
    with pytest.raises(dask_merge.FileFormatError, match="no STEM_merged.pt files"):
        dask_merge.open_merged(merged.parent / "features")


def test_a_hostile_pickle_is_refused_by_the_header_reader(tmp_path):
    import pickle
    import zipfile

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil_merged.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"ids": [], "data": Evil()}, protocol=2))
        z.writestr("evil/version", b"3\n")
    with pytest.raises(dask_merge.UnsafeFileError, match=r"evil_merged\.pt: refused"):
        read_merged_header(path)
