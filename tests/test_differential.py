"""Differential tests: the reader against ``torch.load``, ``merge_pair`` against the upstream merge.

Files are made with ``torch.save`` the way the pipelines write them and in
the odd ways torch allows (views sharing one storage, non-contiguous and
negative views, other dtypes, pickle protocols 2 to 5, repeated objects,
nested containers, NaN payloads, -0.0, infinities, subnormals), then mutated
(pickle opcodes and arguments, dtype names, locations, zip records, sizes
and offsets).  For every file, the reader gives exactly what
``torch.load(weights_only=True, map_location="cpu")`` gives (structure,
dtypes, shapes, bits) or raises a :class:`MergeError`; it never raises
anything else, never takes a second, never takes memory out of proportion to
the file; and its record fast paths give what the opcodes one by one give.

CI runs a few thousand files; ``pytest -m campaign`` runs the long campaign
(``DASK_MERGE_CAMPAIGN`` files, 20,000 unless set).
"""

from __future__ import annotations

import functools
import io
import math
import os
import pickle
import random
import re
import struct
import time
import tracemalloc
import types
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from dask_merge import MergeError, merge_pair
from dask_merge.testing import reference_merge
from dask_merge.torchfile import FloatRun, StorageRef, TensorRef, TorchArchive

QUICK_FILES, QUICK_PAIRS = 1500, 60
CAMPAIGN_FILES = int(os.environ.get("DASK_MERGE_CAMPAIGN", "20000"))
CAMPAIGN_PAIRS = CAMPAIGN_FILES // 10
SECONDS = 1.0  # most any one file may take to read or refuse
# Peak memory of a read: a forged pickle of one-byte containers takes ~90
# times its size in Python objects; anything beyond is a leak or a bomb.
MEMORY_PER_BYTE, MEMORY_SLACK = 100, 4 << 20

# --- generating valid files -----------------------------------------------------------

_F32_SPECIALS = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001,
                 0xFFC00123, 0x00000001, 0x807FFFFF, 0x7F7FFFFF]
_F64_SPECIALS = [0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, -1e-310, 1.7976931348623157e308,
                 struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000001))[0],
                 struct.unpack("<d", struct.pack("<Q", 0xFFF8DEADBEEF0000))[0]]


def _floats(rng: random.Random, n: int) -> list[float]:
    """Python floats, a third of them odd (NaN payloads, -0.0, inf, subnormals)."""
    return [rng.choice(_F64_SPECIALS) if rng.random() < 0.3 else rng.gauss(0, 10) for _ in range(n)]


def _matrix(rng: random.Random, rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``dtype`` with odd values among normal ones."""
    if dtype.is_floating_point:
        bits = np.array([rng.choice(_F32_SPECIALS) if rng.random() < 0.2 else
                         struct.unpack("<I", struct.pack("<f", rng.gauss(0, 5)))[0]
                         for _ in range(rows * width)], np.uint32)
        values = torch.from_numpy(bits.view(np.float32).reshape(rows, width))
        return values.to(dtype)
    if dtype is torch.bool:
        return torch.tensor([[rng.random() < 0.5 for _ in range(width)] for _ in range(rows)])
    info = torch.iinfo(dtype)
    return torch.tensor([[rng.randint(info.min, info.max) for _ in range(width)] for _ in range(rows)],
                        dtype=dtype)


_DTYPES = [torch.float32] * 4 + [torch.float16, torch.bfloat16, torch.float64, torch.int64,
                                 torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


def _ids(rng: random.Random, n: int) -> list[str]:
    return [f"seq_{rng.randrange(10**6)}_{i}_chunk_1R{1 + i % 2}" for i in range(n)]


def _row_count(rng: random.Random) -> int:
    """Mostly a few rows; at times enough that the rows' memo indices pass 255,
    where the reader takes runs of records in bulk (torchfile.runs)."""
    return rng.randint(0, 6) if rng.random() < 0.96 else rng.randint(256, 300)


def nucleotide_layout(rng: random.Random) -> dict:
    """A DNABERT-S file: rows of pickled floats."""
    ids, width = _ids(rng, _row_count(rng)), rng.randint(1, 6)
    return {"nucleotide": ids, "data": [{"label": i, "mean_representation": _floats(rng, width)}
                                        for i in ids]}


def protein_layout(rng: random.Random) -> dict:
    """An ESM file: rows of one matrix (views of one storage) or tensors of their own."""
    ids, width = _ids(rng, _row_count(rng)), rng.randint(1, 6)
    matrix = _matrix(rng, len(ids), width, torch.float32)
    rows = list(matrix) if rng.random() < 0.5 else [row.clone() for row in matrix]
    return {"proteins": ids, "data": rows}


def _odd_tensor(rng: random.Random) -> torch.Tensor:
    """A tensor as torch allows it: a slice, a transpose, a strided or negative view, a scalar."""
    dtype = rng.choice(_DTYPES)
    base = _matrix(rng, rng.randint(1, 4), rng.randint(1, 5), dtype)
    view = rng.choice(["plain", "row", "t", "step", "scalar", "narrow", "neg", "empty"])
    if view == "row":
        return base[rng.randrange(base.shape[0])]
    if view == "t":
        return base.t()
    if view == "step":
        return base[:, ::2]
    if view == "scalar":
        return base[0, 0]
    if view == "narrow":
        return base[:, 1:]
    if view == "neg" and dtype.is_floating_point:
        return torch._neg_view(base)
    if view == "empty":
        return base[:0]
    return base


def odd_object(rng: random.Random, depth: int = 0) -> object:
    """Nested containers of tensors and plain values, some objects repeated."""
    kinds = ["tensor", "str", "int", "float", "none", "bool"] + ["list", "dict", "tuple"] * (depth < 3)
    kind = rng.choice(kinds)
    if kind == "tensor":
        return _odd_tensor(rng)
    if kind == "str":
        return rng.choice(["", "a", "ünï", "🧬", "x" * 300])
    if kind == "int":
        return rng.choice([0, -1, 255, 65536, -(2**31), 2**31, 2**63, -(2**200)])
    if kind == "float":
        return _floats(rng, 1)[0]
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    items = [odd_object(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if items and rng.random() < 0.3:
        items.append(items[0])  # the same object twice: a memo get
    if kind == "list":
        return items
    if kind == "tuple":
        return tuple(items)
    return {f"k{i}": item for i, item in enumerate(items)}


def valid_file(rng: random.Random) -> bytes:
    """A file as ``torch.save`` writes it, with a random pickle protocol."""
    maker = rng.choice([nucleotide_layout, protein_layout, odd_object, odd_object])
    buffer = io.BytesIO()
    torch.save(maker(rng), buffer, pickle_protocol=rng.randint(2, 5))
    return buffer.getvalue()


# --- mutating them ----------------------------------------------------------------------


def _records(raw: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        return [(info.filename, z.read(info)) for info in z.infolist()]


def _zip(records: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:
        for name, data in records:
            z.writestr(name, data)
    return buffer.getvalue()


def _with_pickle(raw: bytes, change: Callable[[bytes], bytes]) -> bytes:
    return _zip([(n, change(d) if n.endswith("/data.pkl") else d) for n, d in _records(raw)])


def _splice(data: bytes, rng: random.Random) -> bytes:
    """One random byte-level change: set, flip a bit, delete, insert or repeat a slice."""
    if not data:
        return bytes([rng.randrange(256)])
    pos = rng.randrange(len(data))
    how = rng.randrange(5)
    if how == 0:
        return data[:pos] + bytes([rng.randrange(256)]) + data[pos + 1 :]
    if how == 1:
        return data[:pos] + bytes([data[pos] ^ (1 << rng.randrange(8))]) + data[pos + 1 :]
    if how == 2:
        return data[:pos] + data[pos + rng.randint(1, 9) :]
    if how == 3:
        return data[:pos] + bytes([rng.choice(b"()tRQ0ehjqrK.N}]sua\x85\x86\x87\x88\x89\x94\x93")]) + data[pos:]
    end = min(len(data), pos + rng.randint(1, 40))
    return data[:end] + data[pos:end] * rng.randint(1, 3) + data[end:]


_TOKENS = [
    (b"FloatStorage", [b"IntStorage", b"HalfStorage", b"DoubleStorage", b"BFloat16Storage",
                       b"ByteStorage", b"BoolStorage", b"ComplexFloatStorage", b"FloatStorag\x00"]),
    (b"cpu", [b"cuda", b"xyz", b"mps", b"met", b"CPU"]),
    (b"storage", [b"storagf", b"Storage"]),
    (b"_rebuild_tensor_v2", [b"_rebuild_tensor_v3", b"_rebuild_parameter"]),
    (b"OrderedDict", [b"OrderedDicx", b"defaultdict"]),
    (b"\x89", [b"\x88", b"N"]),  # requires_grad False -> True / None
    (b"K\x00", [b"K\x01", b"J\xff\xff\xff\xff", b"K\x05"]),  # offsets, sizes
    (b"K\x01", [b"K\x00", b"K\x02", b"M\x00\x01"]),
    (b"\x85", [b"\x86", b")"]),
    (b"R", [b"0R", b"\x85R"]),
]


def _replace_token(data: bytes, rng: random.Random) -> bytes:
    """Change a dtype name, a location, a global, an int argument or an opcode torch wrote."""
    old, news = rng.choice(_TOKENS)
    places = [i for i in range(len(data)) if data.startswith(old, i)]
    if not places:
        return _splice(data, rng)
    pos = rng.choice(places)
    new = rng.choice(news)
    # Keep a BINUNICODE's length right as often as not: the token then survives the string check.
    if len(new) != len(old) and pos >= 4 and data[pos - 5 : pos - 4] == b"X" and rng.random() < 0.5:
        length = struct.unpack_from("<I", data, pos - 4)[0] + len(new) - len(old)
        return data[: pos - 4] + struct.pack("<I", length) + new + data[pos + len(old) :]
    return data[:pos] + new + data[pos + len(old) :]


def _mutate_records(raw: bytes, rng: random.Random) -> bytes:
    """Drop, rename, add, lengthen or shorten a zip record, or change a small one."""
    records = _records(raw)
    i = rng.randrange(len(records))
    name, data = records[i]
    folder = records[0][0].split("/")[0]
    how = rng.randrange(7)
    if how == 0:
        del records[i]
    elif how == 1:
        records[i] = (rng.choice(["other/" + name.split("/", 1)[-1], name + "x", "x"]), data)
    elif how == 2:
        records.insert(rng.randrange(len(records) + 1), (rng.choice([f"{folder}/data/99", "elsewhere/x"]), b"\0" * 8))
    elif how == 3:
        records[i] = (name, data + b"\0" * rng.choice([1, 2, 4, 8]))
    elif how == 4:
        records[i] = (name, data[: -rng.choice([1, 2, 4])])
    elif how == 5:
        small = [j for j, (n, _) in enumerate(records) if n.rsplit("/", 1)[-1] in
                 ("version", "byteorder", ".storage_alignment", ".format_version")]
        j = rng.choice(small or [i])
        records[j] = (records[j][0], rng.choice([b"", b"x", b"0\n", b"3", b"11\n", b"big", b" 3\n", b"7_"]))
    else:
        rng.shuffle(records)
    return _zip(records)


def mutate(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    """A random mutation of a valid file, and its name (or the file as it is)."""
    how = rng.choice(["none", "pickle", "pickle", "token", "token", "records", "file", "truncate"])
    if how == "pickle":
        return how, _with_pickle(raw, lambda d: _splice(d, rng))
    if how == "token":
        return how, _with_pickle(raw, lambda d: _replace_token(d, rng))
    if how == "records":
        return how, _mutate_records(raw, rng)
    if how == "file":  # zip headers too: sizes, offsets, names
        return how, _splice(raw, rng)
    if how == "truncate":
        return how, raw[: rng.randrange(len(raw))]
    return how, raw


# --- comparing -------------------------------------------------------------------------


def _tensor_key(array: np.ndarray) -> tuple:
    return ("tensor", array.dtype.str, array.shape, np.ascontiguousarray(array).tobytes())


def _cycles_marked(plain: Callable) -> Callable:
    """Make ``plain`` give ("cycle", n) for a list or dict met again n levels inside itself.

    A pickle may put a list into itself (a memo get inside the list's own
    APPENDS): torch.load and the reader then both build the cycle.
    """
    inside: dict[int, int] = {}  # id of each list or dict being converted: its level

    @functools.wraps(plain)
    def marking(obj: object, *args: object) -> object:
        if not isinstance(obj, (list, dict)):
            return plain(obj, *args)
        if id(obj) in inside:
            return ("cycle", len(inside) - inside[id(obj)])
        inside[id(obj)] = len(inside)
        try:
            return plain(obj, *args)
        finally:
            del inside[id(obj)]

    return marking


@_cycles_marked
def plain_torch(obj: object) -> object:
    """What torch.load gave, as comparable values (floats and tensors by their bits)."""
    if isinstance(obj, torch.Tensor):
        return _tensor_key(obj.detach().resolve_neg().resolve_conj().numpy())
    if isinstance(obj, torch.TypedStorage):  # a bare storage: the reader's StorageRef
        return ("storage", _tensor_key(torch.tensor([], dtype=obj.dtype).set_(obj).numpy()))
    if type(obj) is float:
        return ("float", struct.pack("<d", obj))
    if isinstance(obj, dict):
        return ("dict", [(k, plain_torch(v)) for k, v in obj.items()])
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, [plain_torch(v) for v in obj])
    return (type(obj).__name__, obj)


@_cycles_marked
def plain_reader(obj: object, archive: TorchArchive) -> object:
    """What the reader gave, in :func:`plain_torch`'s terms (float runs unrolled)."""
    if type(obj) is TensorRef:
        return _tensor_key(archive.array(obj))
    if type(obj) is StorageRef:
        return ("storage", _tensor_key(archive.array(TensorRef(obj, 0, (obj.numel,), (1,)))))
    if type(obj) is float:
        return ("float", struct.pack("<d", obj))
    if type(obj) is dict:
        return ("dict", [(k, plain_reader(v, archive)) for k, v in obj.items()])
    if type(obj) is list:
        items = []
        for v in obj:
            if type(v) is FloatRun:
                items.extend(("float", struct.pack("<d", x)) for x in archive.floats(v).tolist())
            else:
                items.append(plain_reader(v, archive))
        return ("list", items)
    if type(obj) is tuple:
        return ("tuple", [plain_reader(v, archive) for v in obj])
    return (type(obj).__name__, obj)


class _AllowListUnpickler(pickle.Unpickler):
    """CPython's whole pickle machine, calling only what torch's safe loader may call."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in {("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict")}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed")


_allow_list_pickle = types.ModuleType("allow_list_pickle")
_allow_list_pickle.Unpickler = _AllowListUnpickler
_allow_list_pickle.load = pickle.load

# Opcodes torch.save writes with pickle_protocol=4 or 5 that torch's safe
# loader lacks: it refuses files torch itself writes.  For those files the
# oracle is torch.load with CPython's full machine behind an allow-list.
_PROTOCOL_4_OPCODES = {0x95, 0x8C, 0x8D, 0x94, 0x93}  # FRAME, SHORT_BINUNICODE, BINUNICODE8, MEMOIZE, STACK_GLOBAL


_torch_load = torch.load  # the real one, also while _reference patches torch.load


def _load_with_torch(path: Path, **_: object) -> object:
    """torch.load(weights_only=True, map_location="cpu"), protocol 4/5 files aside (see above)."""
    try:
        return _torch_load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported operand (\d+)", str(err))
        if found is None or int(found[1]) not in _PROTOCOL_4_OPCODES:
            raise
    return _torch_load(path, weights_only=False, map_location="cpu", pickle_module=_allow_list_pickle)


def torch_outcome(path: Path) -> object:
    """torch.load's result as plain values, or None if it refuses the file."""
    try:
        loaded = _load_with_torch(path)
    except Exception:  # torch refuses in many ways; any refusal is one
        return None
    try:
        return plain_torch(loaded)
    except TypeError:  # bfloat16 has no numpy dtype; the reader refuses those storages
        return "unconvertible"


def reader_outcome(raw: bytes, path: Path, *, fast_paths: bool = True) -> tuple[str, object]:
    """("ok", plain values) or ("refused", its message); any other exception propagates."""
    try:
        archive = TorchArchive(raw, str(path))
        return "ok", plain_reader(archive.load(fast_paths=fast_paths), archive)
    except MergeError as err:
        return "refused", str(err)


def check_file(raw: bytes, path: Path, tally: dict[str, int]) -> str | None:
    """Check one file; return what went wrong, or None."""
    path.write_bytes(raw)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        outcome = reader_outcome(raw, path)
    except Exception as err:
        return f"the reader raised {type(err).__name__}: {err}"
    finally:
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    if seconds > SECONDS:
        return f"the reader took {seconds:.2f} s"
    if peak > MEMORY_PER_BYTE * len(raw) + MEMORY_SLACK:
        return f"the reader took {peak:,} bytes for a {len(raw):,}-byte file"
    if reader_outcome(raw, path, fast_paths=False) != outcome:
        return "the record fast paths changed the outcome"
    tally[outcome[0]] += 1
    if outcome[0] == "refused":
        return None
    expected = torch_outcome(path)
    if expected is None:
        return "the reader accepted a file torch.load refuses"
    if outcome[1] != expected:
        return "the reader's values differ from torch.load's"
    return None


def check_generated_file(rng: random.Random, folder: Path, tally: dict[str, int]) -> str | None:
    """Generate and mutate one file, then :func:`check_file` it."""
    how, raw = mutate(valid_file(rng), rng)
    problem = check_file(raw, folder / "f.pt", tally)
    return problem and f"{how}: {problem}"


def run_cases(check: Callable, count: int, seed: int, folder: Path) -> dict[str, int]:
    """Run ``check`` on ``count`` seeded cases; fail listing the first divergences with their seeds."""
    tally, failures = {"ok": 0, "refused": 0}, []
    for i in range(count):
        problem = check(random.Random(f"{seed}-{i}"), folder, tally)
        if problem:
            failures.append(f"case {seed}-{i} ({problem})")
    assert not failures, f"{len(failures)} of {count} cases diverge:\n" + "\n".join(failures[:10])
    return tally


CAMPAIGN_SEED = int(os.environ.get("DASK_MERGE_CAMPAIGN_SEED", "1000"))


# --- end to end: merge_pair against the upstream merge ------------------------------------


def _pair_files(rng: random.Random, folder: Path) -> tuple[Path, Path]:
    """A pair sharing most ids, with odd floats, saved with random protocols and layouts."""
    ids, width_n, width_p = _ids(rng, rng.randint(1, 5)), rng.randint(1, 5), rng.randint(1, 5)
    nucleotide_ids = ids + _ids(rng, rng.randint(0, 2))
    protein_ids = rng.sample(ids, len(ids)) + _ids(rng, rng.randint(0, 2))
    nucleotide = {"nucleotide": nucleotide_ids,
                  "data": [{"label": i, "mean_representation": _floats(rng, width_n)} for i in nucleotide_ids]}
    matrix = _matrix(rng, len(protein_ids), width_p, torch.float32)
    protein = {"proteins": protein_ids,
               "data": list(matrix) if rng.random() < 0.5 else [row.clone() for row in matrix]}
    paths = folder / "p_DNABERT_S.pt", folder / "p_ESM.pt"
    for path, obj in zip(paths, (nucleotide, protein)):
        buffer = io.BytesIO()
        torch.save(obj, buffer, pickle_protocol=rng.randint(2, 5))
        raw = buffer.getvalue()
        if rng.random() < 0.5:
            raw = mutate(raw, rng)[1]
        path.write_bytes(raw)
    return paths


def _reference(nucleotide: Path, protein: Path, label: object) -> dict | None:
    """The upstream merge on torch's own load (as :func:`torch_outcome`'s), or None if it fails."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "load", _load_with_torch)
        try:
            return reference_merge(nucleotide, protein, label=label)
        except Exception:  # torch's refusals, and upstream's own failures on odd layouts
            return None


def check_pair(rng: random.Random, folder: Path, tally: dict[str, int]) -> str | None:
    """Generate a pair, maybe mutate it, merge it, and compare with the upstream merge."""
    nucleotide, protein = _pair_files(rng, folder)
    output, label = folder / "p_merged.pt", rng.choice([None, "viral", 0])
    output.unlink(missing_ok=True)
    try:
        merge_pair(nucleotide, protein, output, label=label)
    except MergeError:
        tally["refused"] += 1
        return None if not output.exists() else "a refused merge left an output"
    except Exception as err:
        return f"merge_pair raised {type(err).__name__}: {err}"
    tally["ok"] += 1
    expected = _reference(nucleotide, protein, label)
    if expected is None:
        return "merge_pair merged a pair the upstream merge cannot"
    got = torch.load(output, weights_only=True)
    if plain_torch(got) != plain_torch(expected):
        return "merge_pair's output differs from the upstream merge"
    return None


# --- the tests ---------------------------------------------------------------------------

# Per kind: the check, cases in CI, cases in the campaign, and the least
# share of either outcome (a generator or mutator gone dead would show).
KINDS = {"files": (check_generated_file, QUICK_FILES, CAMPAIGN_FILES, 5),
         "pairs": (check_pair, QUICK_PAIRS, CAMPAIGN_PAIRS, 10)}


@pytest.mark.parametrize("kind", KINDS)
def test_torch_load_and_the_upstream_merge_agree_or_we_refuse(tmp_path, kind):
    check, count, _, share = KINDS[kind]
    tally = run_cases(check, count, 1, tmp_path)
    assert min(tally.values()) > count // share, tally


# The suite's 5-minute timeout would cut a campaign of more than ~30,000
# files short; a tenth of a second per case leaves room on a loaded machine.
@pytest.mark.campaign
@pytest.mark.timeout(300 + CAMPAIGN_FILES // 10)
@pytest.mark.parametrize("kind", KINDS)
def test_campaign(tmp_path, kind):
    check, _, count, _ = KINDS[kind]
    tally = run_cases(check, count, CAMPAIGN_SEED, tmp_path)
    print(f"campaign: {count} {kind} (seed {CAMPAIGN_SEED}): {tally}")


@pytest.mark.parametrize("payload, plain", [
    (b"\x80\x02]q\x00h\x00a.", ("list", [("cycle", 1)])),  # [[...]]
    (b"\x80\x02}q\x00X\x01\x00\x00\x00a]q\x01(h\x00h\x01es.",  # {'a': [{...}, [...]]}
     ("dict", [("a", ("list", [("cycle", 2), ("cycle", 1)]))])),
], ids=["a_list_in_itself", "a_dict_in_its_list_in_itself"])
def test_a_container_holding_itself_is_read_as_torch_reads_it(tmp_path, payload, plain):
    # A memo get of a list inside its own APPENDS: both build the cycle, and the comparison marks it.
    raw = _zip([("archive/data.pkl", payload), ("archive/version", b"3\n")])
    tally = {"ok": 0, "refused": 0}
    assert check_file(raw, tmp_path / "cycle.pt", tally) is None
    assert tally == {"ok": 1, "refused": 0}
    assert reader_outcome(raw, tmp_path / "cycle.pt") == ("ok", plain)


# Cases the campaigns found, each once a divergence: a global left uncalled,
# zip records marked as folders, lists holding themselves.
@pytest.mark.parametrize("case", ["1000-7221", "1000-14580", "1000-18994", "2000-9481", "2000-32377",
                                  "2000-59870"])
def test_cases_the_campaigns_found(tmp_path, case):
    assert check_generated_file(random.Random(case), tmp_path, {"ok": 0, "refused": 0}) is None


def test_a_bare_storage_is_read_as_torch_reads_it(tmp_path):
    # torch.load gives a TypedStorage, the reader a StorageRef: the comparison
    # must take both for the same values, and tell different values apart.
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TypedStorage is deprecated, not gone
        torch.save({"s": torch.tensor([1.5, -0.0, float("nan")]).storage()}, buffer)
    raw, path = buffer.getvalue(), tmp_path / "storage.pt"
    tally = {"ok": 0, "refused": 0}
    assert check_file(raw, path, tally) is None
    assert tally == {"ok": 1, "refused": 0}
    status, plain = reader_outcome(raw, path)
    assert status == "ok" and plain[1][0][1][0] == "storage"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        positive_zero = plain_torch({"s": torch.tensor([1.5, 0.0, float("nan")]).storage()})
    assert positive_zero != plain  # -0.0 and 0.0 differ by their bits
