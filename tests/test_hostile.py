"""Hostile inputs: forged pickles and archives inside real torch files.

Every file here is a real ``torch.save`` archive whose ``data.pkl`` was
replaced.  The reader must refuse each one, say why, name the file, and run
nothing: commands in the payloads would create a marker file.
"""

from __future__ import annotations

import collections
import importlib
import io
import os
import pickle
import re
import struct
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dask_merge import FileFormatError, MergeError, UnsafeFileError, merge_pair
from dask_merge.layouts import read_features
from dask_merge.testing import reference_merge, write_nucleotide_file, write_protein_file
from dask_merge.torchfile import TorchArchive

# --- crafting -----------------------------------------------------------------


def replace_pickle(source: Path, target: Path, payload: bytes) -> Path:
    """Copy the archive ``source`` to ``target`` with ``payload`` as its data.pkl."""
    with zipfile.ZipFile(source) as src:
        records = [(info.filename, src.read(info.filename)) for info in src.infolist()]
    assert any(name.endswith("/data.pkl") for name, _ in records)
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as dst:
        for name, data in records:
            dst.writestr(name, payload if name.endswith("/data.pkl") else data)
    return target


class Storage:
    """Pickles as torch's persistent id of a storage record."""

    def __init__(self, key, numel, kind=None, location="cpu"):
        self.key, self.numel, self.location = key, numel, location
        self.kind = torch.FloatStorage if kind is None else kind


class Tensor:
    """Pickles as torch's rebuild call, with whatever arguments we like."""

    def __init__(self, storage, offset, shape, stride):
        self.args = (storage, offset, shape, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class Call:
    """Pickles as REDUCE of ``func`` with ``args``: what an attack looks like."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.kind, obj.key, obj.location, obj.numel)
        return None


def dumps(obj, protocol=2) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=protocol).dump(obj)
    return buffer.getvalue()


def protein_layout(vectors, ids=None) -> dict:
    ids = ids if ids is not None else [f"id{i}" for i in range(len(vectors))]
    return {"proteins": ids, "data": vectors}


@pytest.fixture
def files(tmp_path):
    """A legit pair, a marker path that payloads would create, and helpers."""

    class Files:
        folder = tmp_path
        marker = tmp_path / "PWNED"
        nucleotide = tmp_path / "good_DNABERT_S.pt"
        protein = tmp_path / "good_ESM.pt"
        output = tmp_path / "out_merged.pt"

        def forge(self, payload: bytes, name="forged_ESM.pt") -> Path:
            # The legit protein file has storages "0" (4 floats) and "1" (4 floats).
            return replace_pickle(self.protein, tmp_path / name, payload)

    ids = ["id0", "id1"]
    write_nucleotide_file(Files.nucleotide, ids, [[0.5, 1.5], [2.5, 3.5]])
    write_protein_file(Files.protein, ids, [np.arange(4), np.arange(4) + 10])
    return Files()


def assert_refused(files, forged: Path, why: str, error=FileFormatError, side="protein"):
    """Merging with ``forged`` on ``side`` fails cleanly, naming the file and the reason."""
    nucleotide, protein = (files.nucleotide, forged) if side == "protein" else (forged, files.protein)
    with pytest.raises(error) as info:
        merge_pair(nucleotide, protein, files.output)
    message = str(info.value)
    assert isinstance(info.value, MergeError)
    assert str(forged) in message, message
    assert why in message, message
    assert not files.marker.exists()
    assert not files.output.exists()
    assert [p.name for p in files.folder.iterdir() if "tmp" in p.name] == []
    return message


def test_the_legit_pair_merges(files):
    # The baseline the forgeries start from: a refusal below is due to the forgery.
    assert merge_pair(files.nucleotide, files.protein, files.output).rows == 2
    tensors = [Tensor(Storage("0", 4), 0, (4,), (1,)), Tensor(Storage("1", 4), 0, (4,), (1,))]
    forged = files.forge(dumps(protein_layout(tensors)))
    assert merge_pair(files.nucleotide, forged, files.output).rows == 2
    assert torch.equal(torch.load(files.output)["data"][1, 2:], torch.arange(4.0) + 10)


# --- code execution -------------------------------------------------------------


def _command(marker: Path) -> str:
    return f"touch {marker}"


def test_payloads_are_live(files, tmp_path):
    # Proof that these payloads do run under a plain unpickler (so refusing
    # them below means something): run two of them, against a scratch marker.
    scratch = tmp_path / "scratch_marker"
    pickle.loads(dumps(Call(os.system, _command(scratch))))
    assert scratch.exists()
    scratch.unlink()
    pickle.loads(dumps(Call(eval, f"open({str(scratch)!r}, 'w').close()")))
    assert scratch.exists()


ATTACKS = {
    "os.system": lambda m: Call(os.system, _command(m)),
    "builtins.eval": lambda m: Call(eval, f"open({str(m)!r}, 'w').close()"),
    "builtins.exec": lambda m: Call(exec, f"open({str(m)!r}, 'w').close()"),
    "subprocess.Popen": lambda m: Call(subprocess.Popen, ["touch", str(m)]),
    "subprocess.check_output": lambda m: Call(subprocess.check_output, ["touch", str(m)]),
    "importlib.import_module": lambda m: Call(importlib.import_module, "antigravity"),
    "torch.load": lambda m: Call(torch.load, str(m)),
    "torch.save": lambda m: Call(torch.save, [1], str(m)),
    "torch._utils._rebuild_parameter": lambda m: Call(
        torch._utils._rebuild_parameter, Tensor(Storage("0", 4), 0, (4,), (1,)), False, {}
    ),
    "getattr": lambda m: Call(getattr, "", "join"),
}


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_calls_of_anything_but_the_tensor_rebuilder_are_refused(files, attack, protocol):
    evil = ATTACKS[attack](files.marker)
    # Hidden where a vector would be, after legit content.
    payload = dumps(protein_layout([Tensor(Storage("0", 4), 0, (4,), (1,)), evil]), protocol)
    forged = files.forge(payload)
    message = assert_refused(files, forged, "refused", UnsafeFileError)
    # The message names what was refused (the module of the global).
    module = pickle.whichmodule(evil.func, evil.func.__name__)
    assert module.split(".")[0] in message or evil.func.__name__ in message, message


@pytest.mark.parametrize("opcodes", [
    # GLOBAL + REDUCE, hand-assembled: os.system("touch MARKER")
    lambda m: b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(_command(m))) + _command(m).encode() + b"\x85R.",
    # INST: the protocol-0 way to call a class or function
    lambda m: b"(S'" + _command(m).encode() + b"'\nios\nsystem\n.",
    # OBJ
    lambda m: b"\x80\x02(cos\nsystem\nX" + struct.pack("<I", len(_command(m))) + _command(m).encode() + b"o.",
    # NEWOBJ on a global class
    lambda m: b"\x80\x02csubprocess\nPopen\n]X\x05\x00\x00\x00touch\x85\x81.",
    # BUILD (calls __setstate__) on an innocuous dict: refused as an opcode
    lambda m: b"\x80\x02}}b.",
    # EXT1: the extension registry resolves to arbitrary globals
    lambda m: b"\x80\x02\x82\x01.",
    # STACK_GLOBAL with the name built from strings
    lambda m: b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c" + bytes([len(_command(m))]) + _command(m).encode() + b"\x85R.",
    # a storage name called as a function, not as a persistent id
    lambda m: b"\x80\x02ctorch\nFloatStorage\nK\x04\x85R.",
    # the rebuilder called with the wrong number of arguments
    lambda m: b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nX\x01\x00\x00\x00a\x85R.",
], ids=["global_reduce", "inst", "obj", "newobj", "build", "ext1", "stack_global",
        "storage_call", "rebuilder_bad_args"])
def test_hand_assembled_opcodes_are_refused(files, opcodes):
    forged = files.forge(opcodes(files.marker))
    message = assert_refused(files, forged, "data.pkl byte")
    assert "refused" in message or "broken" in message


def test_refusal_happens_before_anything_is_called(files, monkeypatch):
    # Even the import of the named module must not happen.
    monkeypatch.delitem(sys.modules, "antigravity", raising=False)
    forged = files.forge(dumps(Call(importlib.import_module, "antigravity")))
    assert_refused(files, forged, "refused", UnsafeFileError)
    assert "antigravity" not in sys.modules


# --- storages and tensors that lie --------------------------------------------


@pytest.mark.parametrize("storage,why", [
    (Storage("7", 4), "does not hold"),
    (Storage("../0", 4), "does not hold"),
    (Storage("../../etc/passwd", 4), "does not hold"),
    (Storage("/etc/passwd", 4), "does not hold"),
    (Storage("data.pkl", 4), "does not hold"),
    (Storage("0", 5), "its record holds 16 bytes"),
    (Storage("0", 2**40), "its record holds 16 bytes"),
    (Storage("0", -1), "malformed"),
    (Storage(["0"], 4), "malformed"),
    (Storage("0", 4, kind=torch.BFloat16Storage), "refused"),
    (Storage("0", 4, location=["cpu"]), "location"),
], ids=["missing", "dotdot", "dotdot_passwd", "absolute", "pickle_record", "one_more",
        "huge_numel", "negative", "key_not_str", "unknown_type", "bad_location"])
def test_persistent_ids_must_name_a_storage_of_the_archive(files, storage, why):
    forged = files.forge(dumps(protein_layout([Tensor(storage, 0, (4,), (1,))])))
    assert_refused(files, forged, why)


def test_persistent_ids_other_than_storages_are_refused(files):
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("module", "os") if obj == "PID" else None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(protein_layout(["PID"]))
    assert_refused(files, files.forge(buffer.getvalue()), "persistent id", UnsafeFileError)


@pytest.mark.parametrize("offset,shape,stride,why", [
    (0, (10**12,), (1,), "more items"),
    (0, (5,), (1,), "more items"),
    (3, (2,), (1,), "reaches past"),
    (2**62, (4,), (1,), "reaches past"),
    (0, (4,), (2,), "reaches past"),
    (0, (2**40,), (0,), "more items"),
    (0, (1,), (2**100,), "absurd stride"),
    (-1, (4,), (1,), "negative"),
    (0, (-4,), (1,), "negative"),
    (0, (4,), (-1,), "negative"),
    (0, (4, 2), (1,), "malformed"),
    (0, (4.0,), (1,), "malformed"),
    (0, 4, (1,), "malformed"),
    (0, (4,), 1, "malformed"),
    (0, (1,) * 65, (1,) * 65, "65 dimensions"),
    # Checked before the sizes are multiplied: that alone would take minutes.
    (0, (2**511 - 1,) * 30_000, (0,) * 30_000, "30000 dimensions"),
], ids=["huge_size", "size_past_storage", "offset_past_storage", "huge_offset", "stride_past",
        "stride0_expand", "huge_stride", "negative_offset", "negative_size", "negative_stride",
        "rank_mismatch", "float_size", "int_size", "int_stride", "65_dims", "30000_huge_dims"])
def test_tensor_views_must_lie_inside_their_storage(files, offset, shape, stride, why):
    bad = Tensor(Storage("0", 4), offset, shape, stride)
    forged = files.forge(dumps(protein_layout([Tensor(Storage("1", 4), 0, (4,), (1,)), bad])))
    assert_refused(files, forged, why)


def test_a_rebound_memo_entry_is_not_read_through_a_cached_tensor_template(files):
    # Tensor records after the first are read whole, through a template that
    # their memo gets select.  A forged pickle could put another value under a
    # get's index in between: here the storage type, FloatStorage -> IntStorage.
    # torch.load then reads the later tensors as int32, where the template
    # would read float32.  No pickler puts a memo index twice: refused.
    vectors = [torch.arange(4.0) + i for i in range(4)]
    source = files.folder / "source_ESM.pt"
    torch.save({"x": vectors[:2], "proteins": ["id0", "id1"], "data": vectors[2:]}, source)
    with zipfile.ZipFile(source) as z:
        pickled = z.read("source_ESM/data.pkl")
    global_ = b"ctorch\nFloatStorage\nq"
    index = pickled[pickled.index(global_) + len(global_)]
    rebind = b"X\x04\x00\x00\x00junkctorch\nIntStorage\nq" + bytes([index])
    at = pickled.index(b"X\x08\x00\x00\x00proteins")
    forged = replace_pickle(source, files.folder / "forged_ESM.pt",
                            pickled[:at] + rebind + pickled[at:])
    assert torch.load(forged, weights_only=True)["data"][0].dtype == torch.int32
    assert_refused(files, forged, f"memo index {index} after", UnsafeFileError)


# --- resource exhaustion ------------------------------------------------------------


def test_a_huge_memo_index_is_refused(files):
    # LONG_BINPUT 2**31: CPython's C unpickler grows its memo array to the
    # index (gigabytes); we refuse it.
    payload = (b"\x80\x02}(X\x08\x00\x00\x00proteins]r" + struct.pack("<I", 2**31)
               + b"X\x04\x00\x00\x00data]u.")
    assert_refused(files, files.forge(payload), "memo index 2147483648", UnsafeFileError)


def test_a_memo_index_that_was_never_stored_is_broken(files):
    payload = b"\x80\x02}(X\x08\x00\x00\x00proteins]X\x04\x00\x00\x00datah\x07u."
    assert_refused(files, files.forge(payload), "broken pickle")


@pytest.mark.parametrize("where", ["ids", "vector", "top", "persistent_id", "label"])
def test_deeply_nested_lists_do_not_crash(files, where):
    depth = 200_000
    nest = b"]" * depth + b"a" * (depth - 1)  # [[[...]]] built without recursion
    key = struct.pack("<I", 8) + b"proteins"
    data = struct.pack("<I", 4) + b"data"
    if where == "ids":
        payload, side, why = b"\x80\x02}(X" + key + b"](" + nest + b"eX" + data + b"](]eu.", "protein", "not an id string"
    elif where == "vector":
        payload, side, why = b"\x80\x02}(X" + key + b"](X\x01\x00\x00\x00aeX" + data + b"](" + nest + b"eu.", "protein", "not a 1-D tensor"
    elif where == "top":
        payload, side, why = b"\x80\x02" + nest + b".", "protein", "found list"
    elif where == "persistent_id":
        payload, side, why = b"\x80\x02" + nest + b"Q.", "protein", "persistent id"
    else:
        nuc = struct.pack("<I", 10) + b"nucleotide"
        label = struct.pack("<I", 5) + b"label"
        mean = struct.pack("<I", 19) + b"mean_representation"
        payload = (b"\x80\x02}(X" + nuc + b"](X\x03\x00\x00\x00id0eX" + data
                   + b"](}(X" + mean + b"]X" + label + nest + b"ueu.")
        side, why = "nucleotide", "labelled"
    forged = replace_pickle(files.protein, files.folder / f"deep_{where}.pt", payload)
    assert_refused(files, forged, why, side=side)


def test_a_device_is_refused_not_read_forever(files):
    # A symlink to /dev/zero would be read until memory runs out.
    device = files.folder / "zero_ESM.pt"
    device.symlink_to("/dev/zero")
    assert_refused(files, device, "a character device, not a file")


@pytest.mark.parametrize("opcode", [b"]", b"}"], ids=["lists", "dicts"])
def test_running_out_of_memory_while_unpickling_names_the_file(files, opcode):
    # One-byte opcodes that each make a list or dict: ~90 bytes of memory per
    # byte of file.  Under an address-space limit, that is a clear error, not a
    # bare MemoryError.  (Without one, the kernel kills the worker: the engine's
    # crash handling then reports the pair, see test_reliability.)
    forged = files.forge(b"\x80\x02](" + opcode * 8_000_000 + b"e.")
    script = f"""
import resource, sys
from dask_merge import FileFormatError, merge_pair
usage = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (usage + 400 * 2**20, resource.RLIM_INFINITY))
try:
    merge_pair({str(files.nucleotide)!r}, {str(forged)!r}, {str(files.output)!r})
except FileFormatError as err:
    sys.exit(str(err))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.stderr.strip() == f"{forged}: out of memory unpickling its 8,000,006-byte pickle"
    assert not files.output.exists()


@pytest.mark.parametrize("payload,why", [
    (b"\x80\x02X\xff\xff\xff\x7f.", "runs past the end"),
    (b"\x80\x02\x8d" + struct.pack("<Q", 2**62) + b".", "runs past the end"),
    (b"\x80\x02\x8b" + struct.pack("<i", 2**30) + b".", "integer of"),
    (b"\x80\x02\x8b" + struct.pack("<i", -5) + b".", "integer of"),
    (b"\x80\x09}.", "protocol"),
    (b"\x80\x02}", "without STOP"),
    (b"\x80\x02}}.", "STOP with a malformed stack"),
    (b"\x80\x02e.", "broken pickle"),
    (b"\x80\x02K\x01]a.", "broken pickle"),
    (b"\x80\x02})K\x01s.", "dict key of type tuple"),
    (b"\x80\x02}]]s.", "dict key of type list"),
], ids=["long_string", "string8", "long4_huge", "long4_negative", "protocol", "no_stop",
        "two_values", "appends_no_mark", "append_to_int", "tuple_key", "list_key"])
def test_malformed_pickles_are_refused(files, payload, why):
    assert_refused(files, files.forge(payload), why)


def test_refusals_name_the_nucleotide_file_too(files):
    forged = replace_pickle(files.nucleotide, files.folder / "evil_DNABERT_S.pt",
                            dumps(Call(os.system, _command(files.marker))))
    assert_refused(files, forged, "refused", UnsafeFileError, side="nucleotide")


def test_a_refused_file_does_not_clobber_an_existing_output(files):
    merge_pair(files.nucleotide, files.protein, files.output)
    before = files.output.read_bytes()
    forged = files.forge(dumps(Call(os.system, _command(files.marker))))
    with pytest.raises(UnsafeFileError):
        merge_pair(files.nucleotide, forged, files.output)
    assert files.output.read_bytes() == before
    assert not files.marker.exists()


def test_torch_archive_open_refuses_without_loading_torch_objects(files):
    # The reader itself (not just merge_pair) refuses, with the path in the message.
    forged = files.forge(dumps(Call(os.system, _command(files.marker))))
    with pytest.raises(UnsafeFileError, match="global (os|posix).system"):
        TorchArchive.open(forged).load()
    with pytest.raises(UnsafeFileError, match=str(forged)):
        read_features(forged, "protein")
    assert not files.marker.exists()


# --- exact or refused: what torch.load reads differently, or refuses ----------------------


class Tensor7(Tensor):
    """A tensor rebuild call with a seventh argument (torch's tensor metadata)."""

    def __init__(self, storage, offset, shape, stride, metadata, requires_grad=False):
        super().__init__(storage, offset, shape, stride)
        self.args = (storage, offset, shape, stride, requires_grad, collections.OrderedDict(), metadata)


def test_a_negative_view_is_refused_not_merged_with_its_sign_flipped(files):
    ids = ["id0", "id1"]
    rows = [torch._neg_view(torch.arange(4.0) + 1), torch._neg_view(torch.arange(4.0) + 5)]
    torch.save(protein_layout(rows, ids), files.folder / "neg_ESM.pt")
    assert torch.load(files.folder / "neg_ESM.pt")["data"][0].tolist() == [-1.0, -2.0, -3.0, -4.0]
    assert_refused(files, files.folder / "neg_ESM.pt", "negative or conjugate view", UnsafeFileError)


@pytest.mark.parametrize("metadata", [None, {}, 0, False])
def test_a_seventh_rebuild_argument_torch_ignores_is_ignored(files, metadata):
    tensors = [Tensor7(Storage("0", 4), 0, (4,), (1,), metadata), Tensor7(Storage("1", 4), 0, (4,), (1,), {})]
    forged = files.forge(dumps(protein_layout(tensors)))
    assert merge_pair(files.nucleotide, forged, files.output).rows == 2
    assert torch.equal(torch.load(files.output)["data"], reference_merge(files.nucleotide, forged)["data"])


@pytest.mark.parametrize("metadata", [{"neg": False}, {"conj": True}, {"other": 1}, 1, (0,)])
def test_a_seventh_rebuild_argument_torch_would_apply_is_refused(files, metadata):
    tensors = [Tensor7(Storage("0", 4), 0, (4,), (1,), metadata), Tensor(Storage("1", 4), 0, (4,), (1,))]
    assert_refused(files, files.forge(dumps(protein_layout(tensors))), "metadata", UnsafeFileError)


def test_one_storage_read_with_two_dtypes_is_refused(files):
    # torch keeps the first storage it builds for a key: both tensors come back int32.
    tensors = [Tensor(Storage("0", 4, torch.IntStorage), 0, (4,), (1,)), Tensor(Storage("0", 4), 0, (4,), (1,))]
    forged = files.forge(dumps(protein_layout(tensors)))
    assert {t.dtype for t in torch.load(forged)["data"]} == {torch.int32}
    assert_refused(files, forged, "referenced as 4 items of int32 and as 4 items of float32")


def test_integer_dict_keys_are_refused_at_the_first_one(files):
    # Keys that all hash alike make every insertion scan all before it:
    # refused at the first SETITEMS (the pickler's first batch of 1,000),
    # so reading stays linear in the file's size.
    keys = [i * (2**61 - 1) for i in range(1, 20001)]
    assert len({hash(k) for k in keys}) == 1
    forged = files.forge(dumps({"proteins": ["id0"], "data": [], "x": dict.fromkeys(keys)}))
    message = assert_refused(files, forged, "a dict key of type int", UnsafeFileError)
    assert int(re.search(r"data.pkl byte (\d+)", message)[1]) < 1001 * 13, message


def test_an_output_far_larger_than_its_inputs_is_refused(files):
    # 3,000 rows that all reuse one 4,096-float tensor (a memo get each):
    # a 50 MB output from 0.2 MB of input.  torch merges it; we refuse.
    ids = [f"id{i}" for i in range(3000)]
    write_nucleotide_file(files.folder / "many_DNABERT_S.pt", ids, [[0.5, 1.5]] * len(ids))
    torch.save(protein_layout([torch.zeros(4096)] * len(ids), ids), files.folder / "one_ESM.pt")
    nucleotide, protein = files.folder / "many_DNABERT_S.pt", files.folder / "one_ESM.pt"
    with pytest.raises(FileFormatError, match="times the") as info:
        merge_pair(nucleotide, protein, files.output)
    assert str(nucleotide) in str(info.value) and str(protein) in str(info.value)
    assert not files.output.exists()


@pytest.mark.parametrize("kind", ["fifo", "link_to_a_pipe"])
def test_a_fifo_is_refused_without_blocking(files, kind):
    path = files.folder / "piped_ESM.pt"
    read_end, write_end = os.pipe()
    try:
        if kind == "fifo":
            os.mkfifo(path)  # nobody writes: a blocking open would wait forever
        else:
            path.symlink_to(f"/proc/{os.getpid()}/fd/{read_end}")
        outcome = []
        worker = threading.Thread(target=lambda: outcome.append(_refusal(files, path)), daemon=True)
        worker.start()
        worker.join(30)
        assert outcome and "FIFO (named pipe), not a file" in outcome[0], outcome
    finally:
        os.close(read_end), os.close(write_end)


def _refusal(files, path) -> str:
    try:
        merge_pair(files.nucleotide, path, files.output)
    except FileFormatError as err:
        return str(err)
    return "merged"


def _with_records(source: Path, target: Path, change) -> Path:
    """Copy the archive ``source`` to ``target`` with its records changed by ``change``."""
    with zipfile.ZipFile(source) as src:
        records = change([(info.filename, src.read(info.filename)) for info in src.infolist()])
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as dst:
        for name, data in records:
            dst.writestr(name, data)
    return target


def _set(suffix: str, value: bytes | None):
    def change(records):
        return [(n, value) for n, _ in records if n.endswith(suffix) and value is not None] + [
            (n, d) for n, d in records if not n.endswith(suffix)]
    return change


@pytest.mark.parametrize("change, why", [
    (_set("/version", None), "version record"),
    (_set("/version", b"x\n"), "version record"),
    (_set("/version", b"0\n"), "version record"),
    (_set("/version", b"11\n"), "version record"),
    (_set("/.storage_alignment", b"sixty"), ".storage_alignment"),
    (_set("/byteorder", b""), "byte order"),
    (_set("/data/0", b"\0" * 20), "its record holds 20 bytes"),
    (_set("/data/0", b"\0" * 12), "its record holds 12 bytes"),
    (lambda records: records + [("elsewhere/data/9", b"")], "outside the archive's folder"),
    (lambda records: [("x", b"")] + records, "not in a folder"),
], ids=["no_version", "version_x", "version_0", "version_11", "alignment", "byteorder_empty",
        "record_longer", "record_shorter", "record_outside", "first_record_outside"])
def test_archives_torch_load_refuses_are_refused(files, change, why):
    forged = _with_records(files.protein, files.folder / "odd_ESM.pt", change)
    with pytest.raises(Exception):  # noqa: B017 - torch refuses in several ways
        torch.load(forged, weights_only=True, map_location="cpu")
    assert_refused(files, forged, why)


@pytest.mark.parametrize("version", [b"3", b" +3\n", b"1\n", b"10\n"])
def test_version_records_torch_load_reads_are_read(files, version):
    forged = _with_records(files.protein, files.folder / "v_ESM.pt", _set("/version", version))
    assert merge_pair(files.nucleotide, forged, files.output).rows == 2


@pytest.mark.parametrize("location, refused", [
    ("cuda:0", False), ("cuda", False), ("mps", False), ("xyz", True), ("cpu\0", True), ("meta", True),
    ("CPU", True), ("cpu:0", True),
])
def test_storage_locations_map_to_the_cpu_or_are_refused(files, location, refused):
    # cuda:0 is read as torch.load(map_location="cpu") reads it; torch refuses
    # "xyz" without a map_location, and "meta" storages hold no values.
    tensors = [Tensor(Storage("0", 4, location=location), 0, (4,), (1,)), Tensor(Storage("1", 4), 0, (4,), (1,))]
    forged = files.forge(dumps(protein_layout(tensors)))
    if refused:
        assert_refused(files, forged, "storage location", UnsafeFileError)
    else:
        merge_pair(files.nucleotide, forged, files.output)
        assert torch.load(files.output)["data"][0, 2:].tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("payload", [
    b"\x80\x02N(\x85t.",  # TUPLE1 takes the item below the mark
    b"\x80\x02]N(a0.",  # APPEND
    b"\x80\x02}X\x01\x00\x00\x00a(Ns.",  # SETITEM
    b"\x80\x02NN(\x86t.",  # TUPLE2
    b"\x80\x02N(q\x00t.",  # BINPUT
    b"\x80\x02(]e.",  # APPENDS with no list below its mark
], ids=["tuple1", "append", "setitem", "tuple2", "binput", "appends_empty"])
def test_opcodes_reaching_below_a_mark_are_refused(files, payload):
    forged = files.forge(payload)
    with pytest.raises(Exception):  # noqa: B017 - torch refuses in several ways
        torch.load(forged, weights_only=True)
    with pytest.raises(FileFormatError):
        TorchArchive.open(forged).load()


def test_an_int_tensor_that_requires_grad_is_refused(files):
    tensors = [Tensor7(Storage("0", 4, torch.IntStorage), 0, (4,), (1,), None, requires_grad=True),
               Tensor(Storage("1", 4), 0, (4,), (1,))]
    forged = files.forge(dumps(protein_layout(tensors)))
    with pytest.raises(RuntimeError, match="require gradients"):
        torch.load(forged, weights_only=True)
    with pytest.raises(FileFormatError, match="int32 that requires grad"):
        TorchArchive.open(forged).load()


_PERSISTENT_ID_TWICE = (  # [storage, its persistent id again]: the id tuple holds the class FloatStorage
    b"\x80\x02]q\x00(X\x07\x00\x00\x00storageq\x01ctorch\nFloatStorage\nq\x02X\x01\x00\x00\x000q\x03"
    b"X\x03\x00\x00\x00cpuq\x04K\x04tq\x05Qq\x06ah\x05a."
)


def _row_id_global(rows: int, forged: int) -> bytes:
    """A DNABERT-S layout whose row ``forged`` has for its id a memo get of the OrderedDict global.

    The global is memo entry 2; the row is one the record fast paths would
    take (from row 256 on, in a run of rows).
    """
    ids = [f"id{i:03}" for i in range(rows)]
    raw = dumps({"x": collections.OrderedDict(), "nucleotide": ids,
                 "data": [{"label": i, "mean_representation": [1.0, 2.0]} for i in ids]})
    put = raw.index(b"X\x05\x00\x00\x00" + ids[forged].encode()) + 10
    index = raw[put + 1 : put + 2] if raw[put] == ord("q") else raw[put + 1 : put + 5]
    get, forged_get = (b"h", b"h\x02") if len(index) == 1 else (b"j", b"j\x02\x00\x00\x00")
    assert raw.count(get + index) == 1, "the id is got once, in its row"
    return raw.replace(get + index, forged_get)


@pytest.mark.parametrize("payload", [
    dumps(protein_layout([torch._utils._rebuild_tensor_v2])),
    dumps({"proteins": torch.FloatStorage, "data": []}),
    dumps(collections.OrderedDict),
    dumps([(torch.FloatStorage,)]),
    dumps([((torch.FloatStorage,),)]),
    _PERSISTENT_ID_TWICE,
    _row_id_global(2, 1),
    _row_id_global(400, 350),
], ids=["in_a_list", "a_dict_value", "the_result", "in_a_tuple", "in_a_nested_tuple", "a_persistent_id_again",
        "a_row_id", "a_row_id_in_a_run"])
def test_a_global_neither_called_nor_a_storage_type_is_refused(files, payload):
    # torch.load hands back the function or class itself; the reader calls
    # nothing and has only an inert token to give.
    forged = files.forge(payload)
    loaded = repr(torch.load(forged, weights_only=True))
    assert re.search(r"<(function|class|torch\.serialization\.StorageType) ", loaded), loaded
    with pytest.raises(UnsafeFileError, match="a global that is neither called nor a storage type"):
        TorchArchive.open(forged).load(fast_paths=False)
    with pytest.raises(UnsafeFileError, match="a global that is neither called nor a storage type"):
        TorchArchive.open(forged).load()


def _mark_as_folder(raw: bytes, suffix: bytes, attributes: int) -> bytes:
    """``raw`` with the external attributes of its members ending in ``suffix`` set to ``attributes``."""
    raw, position = bytearray(raw), 0
    while (position := raw.find(b"PK\x01\x02", position)) >= 0:
        name_length = struct.unpack_from("<H", raw, position + 28)[0]
        if raw[position + 46 : position + 46 + name_length].endswith(suffix):
            struct.pack_into("<I", raw, position + 38, attributes)
        position += 4
    return bytes(raw)


@pytest.mark.parametrize("record", [b"/data/0", b"/.storage_alignment", b"/.data/serialization_id"])
@pytest.mark.parametrize("attributes", [0x10, 0xF4, 0x15])
def test_a_record_marked_as_a_folder_is_refused(files, record, attributes):
    # miniz takes a member with the DOS directory bit for a folder and copies
    # none of its bytes: torch.load reads uninitialized memory in their place.
    forged = files.folder / "folder_ESM.pt"
    forged.write_bytes(_mark_as_folder(files.protein.read_bytes(), record, attributes))
    if record == b"/data/0":
        assert torch.load(forged, weights_only=True)["data"][0].tolist() != [0.0, 1.0, 2.0, 3.0]
    assert_refused(files, forged, "is marked as a folder")


@pytest.mark.parametrize("attributes", [0x20, 0x01, 0o100644 << 16])
def test_record_attributes_miniz_ignores_are_ignored(files, attributes):
    # The archive bit, read-only, and Unix file modes (in the high half) leave records as they are.
    odd = files.folder / "attributes_ESM.pt"
    odd.write_bytes(_mark_as_folder(files.protein.read_bytes(), b"", attributes))
    assert torch.load(odd, weights_only=True)["data"][1].tolist() == [10.0, 11.0, 12.0, 13.0]
    assert merge_pair(files.nucleotide, odd, files.output).rows == 2


def _central_entries(raw: bytes):
    """The offsets of ``raw``'s central directory entries, in order."""
    position = 0
    while (position := raw.find(b"PK\x01\x02", position)) >= 0:
        yield position
        position += 4


def _with_central_flags(raw: bytes, flags: int) -> bytes:
    """``raw`` with the general purpose flags of every central directory entry set to ``flags``."""
    raw = bytearray(raw)
    for position in _central_entries(bytes(raw)):
        struct.pack_into("<H", raw, position + 8, flags)
    return bytes(raw)


@pytest.mark.parametrize("flags, refused", [
    (0x0001, True),   # encrypted
    (0x0020, True),   # patched data
    (0x0040, True),   # strong encryption
    (0x2000, True),   # masked local headers
    (0x0008, False),  # sizes in a data descriptor (the central directory has them too)
    (0x0800, False),  # UTF-8 names
    (0x0006, False),  # deflate options, meaningless for stored records
])
def test_zip_flags_miniz_refuses_are_refused_and_the_rest_read(files, flags, refused):
    odd = files.folder / "flags_ESM.pt"
    odd.write_bytes(_with_central_flags(files.protein.read_bytes(), flags))
    if refused:
        with pytest.raises(Exception):  # noqa: B017 - miniz's message varies by flag
            torch.load(odd, weights_only=True)
        assert_refused(files, odd, f"flags {flags:#x}")
    else:
        assert torch.load(odd, weights_only=True)["data"][1].tolist() == [10.0, 11.0, 12.0, 13.0]
        assert merge_pair(files.nucleotide, odd, files.output).rows == 2


def test_a_central_entry_running_past_the_directory_is_refused(files):
    # The last entry's extra field claims bytes beyond the directory's declared
    # size (into the end-of-directory record): miniz refuses the archive.
    raw = bytearray(files.protein.read_bytes())
    last = list(_central_entries(bytes(raw)))[-1]
    struct.pack_into("<H", raw, last + 30, 16)
    odd = files.folder / "overrun_ESM.pt"
    odd.write_bytes(bytes(raw))
    with pytest.raises(Exception):  # noqa: B017
        torch.load(odd, weights_only=True)
    assert_refused(files, odd, "run past its size")
