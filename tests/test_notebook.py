"""The example notebook: it runs top to bottom in a fresh kernel, and its committed copy is readable.

notebooks/explore.ipynb makes a sample data set (with one broken pair), plans,
runs the merge on a LocalCluster, plots the merged features and reruns the
job, which must then skip every pair.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore.ipynb"
KERNEL = "python3"
TIMEOUT = 300  # seconds per cell; the whole notebook takes about 15 s on 2 cores
RERUN = re.compile(r"rerun: (\d+) of (\d+) pairs skipped, 0 merged, 0 failed")
MACHINE_PATHS = ("/tmp/", "/work/", "/root/", "/home/")


def outputs(nb) -> list[dict]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def text_of(cell) -> str:
    parts = []
    for out in cell.outputs:
        if out.output_type == "stream":
            parts.append(out.text)
        elif "text/plain" in out.get("data", {}):
            parts.append(out.data["text/plain"])
    return "".join(parts)


def tagged(nb, tag: str):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def widget_states(nb) -> dict[str, dict]:
    """model id -> state of every widget, as saved in the notebook's metadata."""
    saved = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    return {model_id: model["state"] for model_id, model in saved.get("state", {}).items()}


def widget_tree(states: dict[str, dict], model_id: str) -> list[dict]:
    """The state of a widget and of all its descendants."""
    found, stack = [], [model_id]
    while stack:
        state = states[stack.pop()]
        found.append(state)
        stack += [child.removeprefix("IPY_MODEL_") for child in state.get("children") or []]
    return found


def assert_progress_widget_complete(nb, tasks: int) -> None:
    """The run cell shows distributed's progress widget, and it was drawn to the end.

    The widget's final state is saved in the notebook metadata (nbclient
    records every update the kernel sends while a cell runs): the merge-pair
    bar is full and green and its counter reads ``tasks / tasks``.  A widget
    that never updated is a VBox without children.
    """
    views = [out.data["application/vnd.jupyter.widget-view+json"]["model_id"]
             for out in tagged(nb, "run").outputs
             if "application/vnd.jupyter.widget-view+json" in out.get("data", {})]
    assert len(views) == 1, f"expected one progress widget in the run cell, found {len(views)}"
    tree = widget_tree(widget_states(nb), views[0])
    bars = [s for s in tree if s.get("_model_name") == "FloatProgressModel"]
    assert len(bars) == 1, f"expected one progress bar (merge-pair tasks), found {len(bars)}: {tree}"
    assert bars[0]["value"] == bars[0]["max"] == 1.0 and bars[0]["bar_style"] == "success", bars[0]
    texts = [s["value"] for s in tree if s.get("_model_name") == "HTMLModel"]
    assert any(">merge-pair<" in t for t in texts), texts
    assert any(f">{tasks} / {tasks}<" in t for t in texts), texts
    assert any("Finished" in t for t in texts), texts


def assert_rerun_skipped_all(nb) -> None:
    text = text_of(tagged(nb, "rerun"))
    match = RERUN.search(text)
    assert match, f"the rerun cell does not report every pair skipped:\n{text[:2000]}"
    skipped, total = map(int, match.groups())
    assert skipped == total > 0


def test_kernel_is_registered():
    """nbclient needs the 'python3' kernelspec (pip install ipykernel provides it)."""
    try:
        KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        pytest.fail(f"no {KERNEL!r} kernelspec: run `python -m ipykernel install --user`")


def test_notebook_runs_in_a_fresh_kernel(tmp_path):
    copy = tmp_path / NOTEBOOK.name
    shutil.copy(NOTEBOOK, copy)
    nb = nbformat.read(copy, as_version=4)
    for cell in nb.cells:  # run from scratch, not on the committed outputs
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    # An error in any cell raises CellExecutionError, which fails the test.
    NotebookClient(nb, timeout=TIMEOUT, kernel_name=KERNEL,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    assert any("image/png" in out.get("data", {}) for out in outputs(nb)), "no figure was drawn"
    assert not [out for out in outputs(nb) if out.output_type == "error"]
    report = "".join(out.get("data", {}).get("text/html", "") for out in tagged(nb, "run").outputs)
    assert "merged 6, skipped 0, failed 1" in report, report[:2000]  # the broken sample pair
    # Seven pairs of ~5 MB: one task each, however many threads the cluster has.
    assert_progress_widget_complete(nb, tasks=7)
    assert_rerun_skipped_all(nb)
    v2 = text_of(tagged(nb, "v2"))
    assert "merged 4, skipped 0, failed 0" in v2 and "convert-then-merge path: True" in v2, v2
    # The sample data set lives in a temporary folder it removes; nothing lands in the cwd.
    assert sorted(p.name for p in tmp_path.iterdir()) == [NOTEBOOK.name]


def test_committed_notebook_has_outputs():
    """Readers see the tables and plots without running anything."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), f"not run top to bottom in one kernel: {counts}"
    assert sum("image/png" in out.get("data", {}) for out in outputs(nb)) >= 2
    assert not [out for out in outputs(nb) if out.output_type == "error"]
    html = "".join(out.get("data", {}).get("text/html", "") for out in outputs(nb))
    assert "dask_merge plan" in html and "dask_merge report" in html
    assert "failed" in text_of(next(c for c in code if "report.failures" in c.source))
    assert_progress_widget_complete(nb, tasks=7)
    assert_rerun_skipped_all(nb)


def test_committed_notebook_is_small_and_machine_independent():
    raw = NOTEBOOK.read_text()
    for path in MACHINE_PATHS:
        assert path not in raw, f"the committed notebook mentions {path!r}: a path of this machine"
    assert NOTEBOOK.stat().st_size < 300_000
