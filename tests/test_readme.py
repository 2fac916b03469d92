"""The README's Python snippets run as pasted into a script."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dask_merge.testing import make_dataset, make_h5_dataset, make_pair

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.M | re.S)


def test_the_readme_has_python_snippets():
    assert BLOCKS, "README.md shows no ```python block"


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_a_readme_snippet_runs_as_a_script(tmp_path, number):
    # The folders and files the snippets name, as a user would have them.
    make_dataset(tmp_path / "features", protein_folder=tmp_path / "esm", pairs=3, rows=20,
                 nucleotide_width=12, protein_width=20)
    make_pair(tmp_path, "a", rows=5, nucleotide_width=12, protein_width=20)
    for shards in (0, 2):  # esm/embeddings.h5 and esm/shard_*.h5 of the same sequences
        make_h5_dataset(tmp_path / "v2", tmp_path / "esm", pairs=3, rows=20, shards=shards,
                        nucleotide_width=12, protein_width=20)
    script = tmp_path / "snippet.py"
    script.write_text(BLOCKS[number])
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, f"README block {number} failed:\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
