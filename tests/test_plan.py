"""Planning: pairing files by stem, and checkpoints decided from metadata alone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from dask_merge import Checkpoint, Pair, checkpoint_state, find_pairs, merge_pair
from dask_merge import atomic, layouts
from dask_merge.torchfile import TorchArchive
from dask_merge.layouts import label_value
from dask_merge.checkpoints import RECORD_FOLDER, input_fingerprints, record_path, write_checkpoint
from dask_merge.testing import make_pair


def touch(path: Path, name: str) -> Path:
    path = path / name
    path.write_bytes(b"x")
    return path


# --- find_pairs ------------------------------------------------------------------------


def test_pairs_by_stem_never_by_sorted_position(tmp_path):
    for stem in ["output_1", "output_2", "output_3"]:
        touch(tmp_path, f"{stem}_ESM.pt")
    for stem in ["output_1", "output_3", "output_4"]:  # output_2 missing in the middle
        touch(tmp_path, f"{stem}_DNABERT_S.pt")
    found = find_pairs(tmp_path)
    assert [p.name for p in found] == ["output_1", "output_3"]
    for pair in found:
        assert isinstance(pair, Pair)
        assert Path(pair.nucleotide).name == f"{pair.name}_DNABERT_S.pt"
        assert Path(pair.protein).name == f"{pair.name}_ESM.pt"
        assert pair.output == str(tmp_path / f"{pair.name}_merged.pt")
    assert found.unpaired == sorted([str(tmp_path / "output_2_ESM.pt"),
                                     str(tmp_path / "output_4_DNABERT_S.pt")])
    assert len(found) == 2


def test_pairs_come_in_natural_order(tmp_path):
    stems = ["output_10", "output_2", "output_1", "chunk_b", "chunk_a", "output_1²", "x٣"]
    for stem in stems:
        touch(tmp_path, f"{stem}_ESM.pt")
        touch(tmp_path, f"{stem}_DNABERT_S.pt")
    names = [p.name for p in find_pairs(tmp_path)]
    assert names[:2] == ["chunk_a", "chunk_b"]
    assert names.index("output_1") < names.index("output_2") < names.index("output_10")
    assert sorted(names) == sorted(stems)


def test_separate_folders_and_output_folder(tmp_path):
    nuc, prot, out = tmp_path / "nuc", tmp_path / "prot", tmp_path / "out"
    nuc.mkdir(), prot.mkdir()
    touch(nuc, "a_DNABERT_S.pt"), touch(prot, "a_ESM.pt")
    touch(nuc, "a_ESM.pt")  # a protein file in the nucleotide folder is not looked at
    touch(prot, "b_DNABERT_S.pt")  # nor a nucleotide file in the protein folder
    found = find_pairs(nuc, prot, out)
    assert found.pairs == [Pair("a", str(nuc / "a_DNABERT_S.pt"), str(prot / "a_ESM.pt"),
                                str(out / "a_merged.pt"))]
    assert found.unpaired == []


def test_ignores_temporaries_hidden_files_folders_and_outputs(tmp_path):
    touch(tmp_path, "a_DNABERT_S.pt"), touch(tmp_path, "a_ESM.pt")
    touch(tmp_path, ".b_ESM.pt"), touch(tmp_path, "._b_DNABERT_S.pt")  # hidden (macOS's ._ too)
    touch(tmp_path, "a_merged.pt")
    touch(tmp_path, "a_DNABERT_S.pt.bak")
    (tmp_path / "e_ESM.pt").mkdir()
    # a temporary that atomic_write really makes, kept by a failed run
    (tmp_path / f".a_merged.pt{atomic._TEMPORARY_MARK}{'0f' * 16}").write_bytes(b"")
    found = find_pairs(tmp_path)
    assert [p.name for p in found] == ["a"]
    assert found.unpaired == []


def test_a_stem_holding_the_temporary_mark_is_an_ordinary_pair(tmp_path):
    # Only the exact names atomic_write makes are temporaries: anything else
    # is the user's, to be paired (and never removed as debris).
    touch(tmp_path, "c.dask-merge-tmp-0123_DNABERT_S.pt"), touch(tmp_path, "c.dask-merge-tmp-0123_ESM.pt")
    touch(tmp_path, f"d{atomic._TEMPORARY_MARK}{'0f' * 16}_DNABERT_S.pt")
    found = find_pairs(tmp_path)
    assert [p.name for p in found] == ["c.dask-merge-tmp-0123"]
    assert found.unpaired == [str(tmp_path / f"d{atomic._TEMPORARY_MARK}{'0f' * 16}_DNABERT_S.pt")]


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        find_pairs(tmp_path / "nowhere")
    touch(tmp_path, "a_file")
    with pytest.raises(FileNotFoundError, match="a_file is not a folder"):
        find_pairs(tmp_path / "a_file")
    with pytest.raises(FileNotFoundError, match="gone"):
        find_pairs(tmp_path, tmp_path / "gone")


# --- checkpoints -------------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path) -> Pair:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    made = make_pair(tmp_path / "in", "s", rows=5, nucleotide_width=3, protein_width=2)
    found = find_pairs(tmp_path / "in", output_dir=tmp_path / "out")
    assert [p.name for p in found] == [made.stem]
    return found.pairs[0]


def merge_with_record(pair: Pair, label=None) -> None:
    """What the engine does: fingerprint inputs, merge, record."""
    inputs = input_fingerprints(pair)
    result = merge_pair(pair.nucleotide, pair.protein, pair.output, label=label)
    write_checkpoint(pair, inputs, labels=label_value(label), rows=result.rows)


def test_no_output_is_pending(pair):
    assert checkpoint_state(pair) == Checkpoint(False, "no output yet")


def test_a_recorded_output_with_unchanged_inputs_is_done(pair):
    merge_with_record(pair)
    state = checkpoint_state(pair)
    assert state.done and state.reason == "up to date"
    record = json.loads(Path(record_path(pair.output)).read_text())
    assert Path(record_path(pair.output)).parent.name == RECORD_FOLDER
    assert record["rows"] == 5 and record["labels"] is None
    assert record["inputs"]["nucleotide"]["path"] == pair.nucleotide


@pytest.mark.parametrize("side", ["nucleotide", "protein"])
def test_touching_an_input_makes_the_pair_pending_naming_the_side(pair, side):
    merge_with_record(pair)
    path = getattr(pair, side)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000))
    state = checkpoint_state(pair)
    assert not state.done
    assert side in state.reason and "changed" in state.reason
    other = "protein" if side == "nucleotide" else "nucleotide"
    assert other not in state.reason


@pytest.mark.parametrize("side", ["nucleotide", "protein"])
def test_rewriting_an_input_makes_the_pair_pending(pair, side, tmp_path):
    merge_with_record(pair)
    path = Path(getattr(pair, side))
    stat = path.stat()
    # regenerated with other content (another size), mtime forced back unchanged
    (tmp_path / "again").mkdir()
    make_pair(tmp_path / "again", "s", rows=6, nucleotide_width=3, protein_width=2)
    path.write_bytes((tmp_path / "again" / path.name).read_bytes())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size != stat.st_size
    state = checkpoint_state(pair)
    assert not state.done and side in state.reason


def test_a_deleted_input_makes_the_pair_pending(pair):
    merge_with_record(pair)
    os.unlink(pair.protein)
    state = checkpoint_state(pair)
    assert not state.done and pair.protein in state.reason


def test_an_output_without_record_counts_as_done(pair):
    merge_pair(pair.nucleotide, pair.protein, pair.output)  # as upstream would, no record
    assert not os.path.exists(record_path(pair.output))
    state = checkpoint_state(pair)
    assert state.done and "no record" in state.reason
    assert checkpoint_state(pair, label=1).done  # nothing to compare the label with


@pytest.mark.parametrize("kind", ["folder", "fifo", "symlink loop"])
def test_something_other_than_a_file_under_the_output_name_is_no_output(pair, kind):
    if kind == "symlink loop":  # stat raised ELOOP out of plan(), --dry-run and run
        os.symlink(os.path.basename(pair.output), pair.output)
        assert checkpoint_state(pair) == Checkpoint(
            False, "no output yet (unreadable: Too many levels of symbolic links)")
        return
    os.mkdir(pair.output) if kind == "folder" else os.mkfifo(pair.output)
    assert checkpoint_state(pair) == Checkpoint(False, "no output yet (not a file under its name)")


@pytest.mark.parametrize("label", ["viral", "Viral", 1, "1", np.int64(1)])
def test_a_label_is_given_as_plan_takes_it(pair, label):
    merge_with_record(pair, label="viral")
    assert checkpoint_state(pair, label=label).done
    assert not checkpoint_state(pair, label="host").done


@pytest.mark.parametrize("labels", ["viral", 1, [True], ("1",), [1]])
def test_labels_is_refused_with_what_to_pass_instead(pair, labels):
    # A label in another form than plan() takes once answered "label changed".
    merge_with_record(pair, label="viral")
    with pytest.raises(TypeError, match=r"checkpoint_state takes label='viral', 'host', an int or None"):
        checkpoint_state(pair, labels=labels)
    with pytest.raises(ValueError, match=r"label \[True\] is not"):
        checkpoint_state(pair, label=[True])


def test_force_makes_everything_pending(pair):
    merge_with_record(pair)
    assert checkpoint_state(pair).done
    assert checkpoint_state(pair, force=True) == Checkpoint(False, "forced")


@pytest.mark.parametrize("before,after", [(None, "viral"), ("viral", "host"), ("host", None),
                                          (1, 2)])
def test_a_changed_label_makes_the_pair_pending(pair, before, after):
    merge_with_record(pair, label=before)
    assert checkpoint_state(pair, label=before).done
    state = checkpoint_state(pair, label=after)
    assert not state.done and "label" in state.reason


@pytest.mark.parametrize("content", ["[]", "null", '"text"', "{}", '{"inputs": []}',
                                     '{"inputs": {"nucleotide": 3}}', "{not json",
                                     "[" * 100_000 + "]" * 100_000, "fifo", "folder"])
def test_a_malformed_record_does_not_crash_the_plan(pair, content):
    merge_with_record(pair)
    record = Path(record_path(pair.output))
    if content in ("fifo", "folder"):  # a FIFO's open would wait for a writer forever
        record.unlink()
        os.mkfifo(record) if content == "fifo" else record.mkdir()
    else:
        record.write_text(content)  # deep nesting made json raise RecursionError
    # A record that does not describe this output is as good as none: the
    # output, complete under its final name, is kept (as one made upstream).
    state = checkpoint_state(pair)
    assert isinstance(state, Checkpoint) and state.done, state


def test_a_record_with_broken_inputs_but_matching_output_is_pending(pair):
    merge_with_record(pair)
    path = Path(record_path(pair.output))
    record = json.loads(path.read_text())
    for broken in ([], {"nucleotide": 3}, {"nucleotide": record["inputs"]["nucleotide"]}):
        record["inputs"] = broken
        path.write_text(json.dumps(record))
        state = checkpoint_state(pair)
        assert not state.done and "input changed" in state.reason


def test_deciding_never_reads_a_tensor(pair, monkeypatch):
    merge_with_record(pair)
    # The output becomes garbage, and its record is made to match it: a
    # reader that opened the output would fail; the decision must not.
    Path(pair.output).write_bytes(b"not a torch file at all")
    write_checkpoint(pair, input_fingerprints(pair), labels=None, rows=5)

    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint_state read a feature file")

    monkeypatch.setattr(TorchArchive, "open", classmethod(refuse))
    monkeypatch.setattr(TorchArchive, "__init__", refuse)
    monkeypatch.setattr(layouts, "read_features", refuse)
    assert checkpoint_state(pair) == Checkpoint(True, "up to date")
    os.utime(pair.nucleotide, ns=(0, 10**18))
    assert not checkpoint_state(pair).done
    assert checkpoint_state(pair, force=True) == Checkpoint(False, "forced")
    monkeypatch.undo()
    with pytest.raises(layouts.FileFormatError):
        TorchArchive.open(pair.output)


def test_an_output_replaced_after_its_record_counts_as_done(pair):
    merge_with_record(pair)
    merge_pair(pair.nucleotide, pair.protein, pair.output, label="viral")  # no new record
    os.utime(pair.output, ns=(0, 10**18))
    state = checkpoint_state(pair)
    assert state.done and "replaced" in state.reason
