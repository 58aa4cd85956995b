"""Property-based tests of the checkpoint readers: whatever the bytes, a result or a UserError.

Valid small files are written by the project's writers and the libraries' own (`save_lora`,
`save_dit`, `safetensors.torch.save_file`, `torch.save`), then damaged at random: bytes flipped,
inserted, deleted or cut (mostly in the header), the header length rewritten, the header JSON
replaced by random JSON or one entry field replaced, the index and config.json filled with random
JSON. Every reader and loader must return or raise `UserError` with a one-line message; no other
exception. Where the header reader accepts a file, the safetensors library must read every tensor of
it (the checks are at least as strict as the library's). The cheap NaN/Inf check must agree with
`torch.isfinite`. Deterministic: derandomized, no example database.
"""

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from liveavatar.config import TINY
from liveavatar.errors import UserError
from liveavatar.io import checkpoint as ck
from liveavatar.io.ckpt_writer import dit_config_json, random_lora, save_dit, save_lora
from liveavatar.io.verify import verify_checkpoint
from liveavatar.models.dit import CausalS2VDiT
from liveavatar.models.sizes import on_meta


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- the valid files --------------------------------------------------------------------------

LORA_KEYS = ("base_model.model.blocks.0.self_attn.q.lora_A.default.weight",
             "base_model.model.blocks.0.self_attn.q.lora_B.default.weight")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    gen = torch.Generator().manual_seed(0)
    save_file({"a": torch.randn(4, 3, generator=gen).bfloat16(), "b": torch.arange(5, dtype=torch.int32),
               "c": torch.zeros(0, 2), "d": torch.randn(2, generator=gen).half()},
              str(base / "plain.safetensors"), metadata={"format": "pt"})
    lora = {LORA_KEYS[0]: torch.randn(4, 8, generator=gen), LORA_KEYS[1]: torch.randn(8, 4, generator=gen)}
    save_lora(lora, base / "lora.safetensors")
    torch.save({k.removeprefix(ck.LORA_PREFIX): v.bfloat16() for k, v in lora.items()}, base / "lora.pth")
    torch.save({"x": torch.randn(3, 3, generator=gen), "y": torch.randn(2, generator=gen).bfloat16()},
               base / "plain.pth")
    torch.manual_seed(0)
    save_dit(CausalS2VDiT(TINY.dit), base / "dit", TINY.dit, num_shards=3)
    return base


def _work(files: Path, name: str) -> Path:
    (files / "work").mkdir(exist_ok=True)
    return files / "work" / name


def _header_end(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def _ok_or_user_error(fn, *args, **kwargs):
    """fn's result, or None when it raised a UserError of one line that never suggests unsafe loading."""
    try:
        return fn(*args, **kwargs)
    except UserError as exc:
        text = str(exc)
        assert text and "\n" not in text and "weights_only" not in text, text
        return None


# ---- mutations --------------------------------------------------------------------------------

LENGTHS = [0, 1, 2, 7, 8, 100, 2**31, 2**32 - 1, 2**32, 100_000_000, 100_000_001, 2**63, 2**64 - 1]


@st.composite
def byte_ops(draw, data: bytes, header_end: int):
    """1-4 byte-level mutations, positions mostly in the first `header_end` bytes."""
    size = len(data)
    pos = st.one_of(st.integers(0, max(header_end, 1)), st.integers(0, max(size - 1, 0)))
    op = st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(1, 255)),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), pos, st.integers(1, 64)),
        st.tuples(st.just("cut"), pos, st.just(0)),
        st.tuples(st.just("length"), st.just(0), st.one_of(st.sampled_from(LENGTHS), st.integers(0, 2**64 - 1),
                                                           st.integers(-64, 64).map(lambda d: header_end - 8 + d))),
    )
    return draw(st.lists(op, min_size=1, max_size=4))


def _apply(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for kind, pos, arg in ops:
        p = pos % (len(buf) + 1)
        if kind == "flip" and p < len(buf):
            buf[p] ^= arg
        elif kind == "insert":
            buf[p:p] = arg
        elif kind == "delete":
            del buf[p:p + arg]
        elif kind == "cut":
            del buf[p:]
        elif kind == "length" and 0 <= arg < 2**64:
            buf[:8] = struct.pack("<Q", arg)
    return bytes(buf)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
near_ints = st.integers(-3, 3) | st.integers(0, 2**64) | st.sampled_from([2**63 - 1, 2**63, 2**64 - 1])
field_values = st.one_of(
    json_values,
    st.sampled_from([float("nan"), float("inf"), -float("inf"), True, None, {}, [], "\ud800"]),
    st.sampled_from(["BF16", "F32", "F16", "I32", "U8", "BOOL", "F8_E4M3", "U16", "C64", "bf16", ""]),
    st.lists(near_ints, max_size=4),
)


def _st_rewrite(header: object, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _read_like_the_library(path: Path) -> None:
    """The header reader accepted `path`: the safetensors library must read every tensor of it."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for k in f.keys():
            f.get_tensor(k)


def _check_safetensors(path: Path) -> None:
    metas = _ok_or_user_error(ck.read_safetensors_header, path)
    if metas is not None:
        _read_like_the_library(path)
        assert set(metas) == set(dict(ck._st_tensors(path, metas)))


# ---- safetensors ------------------------------------------------------------------------------


@fuzz(150)
@given(data=st.data())
def test_safetensors_byte_mutations(files, data):
    for name in ("plain.safetensors", "lora.safetensors"):
        raw = (files / name).read_bytes()
        path = _work(files, name)
        path.write_bytes(_apply(raw, data.draw(byte_ops(raw, _header_end(raw)))))
        _check_safetensors(path)
        if name.startswith("lora"):
            _ok_or_user_error(ck.load_lora, path)


@fuzz(80)
@given(header=json_values)
def test_safetensors_header_replaced_by_random_json(files, header):
    raw = (files / "plain.safetensors").read_bytes()
    path = _work(files, "random.safetensors")
    path.write_bytes(_st_rewrite(header, raw[_header_end(raw):]))
    _check_safetensors(path)


@fuzz(120)
@given(data=st.data())
def test_safetensors_entry_fields_replaced(files, data):
    raw = (files / "plain.safetensors").read_bytes()
    header = json.loads(raw[8:_header_end(raw)])
    if data.draw(st.booleans()):  # an extra tensor of zero bytes: any shape with a 0 fits its empty span
        shape = data.draw(st.lists(near_ints, max_size=4)) + [0]
        header["z"] = {"dtype": "F32", "shape": data.draw(st.permutations(shape)), "data_offsets": [0, 0]}
    for _ in range(data.draw(st.integers(0, 3))):
        key = data.draw(st.sampled_from(sorted(header)))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra", None]))
        if field is None:
            header[key] = data.draw(field_values)
        elif isinstance(header[key], dict):
            header[key][field] = data.draw(field_values)
    path = _work(files, "fields.safetensors")
    path.write_bytes(_st_rewrite(header, raw[_header_end(raw):]))
    _check_safetensors(path)


# ---- .pth -------------------------------------------------------------------------------------


@st.composite
def zip_ops(draw, data: bytes):
    """Byte mutations anywhere in a small torch zip, often in its pickle or its directory at the end."""
    size = len(data)
    pos = st.one_of(st.integers(0, size - 1), st.integers(max(size - 400, 0), size - 1))
    op = st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(1, 255)),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("delete"), pos, st.integers(1, 32)),
        st.tuples(st.just("cut"), pos, st.just(0)),
    )
    return draw(st.lists(op, min_size=1, max_size=3))


@fuzz(150)
@given(data=st.data())
def test_pth_byte_mutations(files, data):
    for name in ("plain.pth", "lora.pth"):
        raw = (files / name).read_bytes()
        path = _work(files, name)
        path.write_bytes(_apply(raw, data.draw(zip_ops(raw))))
        metas = _ok_or_user_error(ck.read_pth_metadata, path)
        if name.startswith("lora"):
            _ok_or_user_error(ck.load_lora, path)
        elif metas is not None:  # accepted: the memory-mapped load reads the same tensors
            assert set(ck._mmap_pth(path)) == set(metas)


@fuzz(40)
@given(value=json_values)
def test_pth_holding_random_python_values(files, value):
    path = _work(files, "values.pth")
    torch.save(value, path)
    _ok_or_user_error(ck.read_pth_metadata, path)
    torch.save({"x": torch.zeros(2), "v": value}, path)
    _ok_or_user_error(ck.read_pth_metadata, path)


# ---- index.json and config.json ---------------------------------------------------------------

SHARD_NAMES = [ck.dit_shard_name(i, 3) for i in (1, 2, 3)]
# file names outside the folder that exist and hold a valid shard (see _dit_copy), and other bad names
OUTSIDE = ["../" + SHARD_NAMES[0], "sub/" + SHARD_NAMES[0], "./" + SHARD_NAMES[0], "sub/../" + SHARD_NAMES[0]]
names = st.one_of(st.sampled_from(SHARD_NAMES), st.sampled_from(OUTSIDE),
                  st.sampled_from(["/etc/passwd", "..", ".", "", " ", "a\\b", "x\x00y", "c:x", "x" * 300]),
                  st.text(max_size=12), json_values)


def _dit_copy(files: Path) -> Path:
    """A fresh copy of the tiny DiT folder in work/dit, with valid shards at the OUTSIDE names."""
    root = files / "work" / "dit"
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(files / "dit", root)
    (root / "sub").mkdir()
    for outside in (root.parent / SHARD_NAMES[0], root / "sub" / SHARD_NAMES[0]):
        shutil.copy(root / SHARD_NAMES[0], outside)
    return root


def _check_dit_folder(root: Path) -> None:
    report = verify_checkpoint(root, only="dit", preset="tiny")
    assert report.ok or report.problems
    _ok_or_user_error(ck.load_dit, root, TINY.dit, torch.float32)


@fuzz(60)
@given(data=st.data())
def test_random_index_contents(files, data):
    root = _dit_copy(files)
    index = json.loads((root / ck.DIT_INDEX).read_text())
    kind = data.draw(st.sampled_from(["random", "values", "keys"]))
    if kind == "random":
        index = data.draw(json_values)
    elif kind == "values":  # some entries moved to random file names
        wm = index["weight_map"]
        for k in data.draw(st.lists(st.sampled_from(sorted(wm)), min_size=1, max_size=3)):
            wm[k] = data.draw(names)
    else:
        index["weight_map"] = data.draw(st.dictionaries(st.text(max_size=10), names, max_size=4))
    (root / ck.DIT_INDEX).write_text(json.dumps(index))
    report = verify_checkpoint(root, only="dit", preset="tiny")
    model = _ok_or_user_error(ck.load_dit, root, TINY.dit, torch.float32)
    wm = index.get("weight_map") if isinstance(index, dict) else None
    refused = [v for v in (wm.values() if isinstance(wm, dict) else ())
               if not isinstance(v, str) or v in OUTSIDE or "/" in v or "\\" in v or ".." in v or "\x00" in v]
    try:
        json.dumps(index, allow_nan=False)
        strict = True
    except ValueError:  # NaN or infinity written as JSON's non-standard tokens: the index is not JSON
        strict = False
    if not strict:
        assert model is None and any("not valid JSON" in p for p in report.problems), report.problems
    elif refused:  # an entry that is not a plain file name in the folder is refused by name, never read
        assert model is None and not report.ok
        assert any("which is refused" in p or "not a file name" in p for p in report.problems), report.problems


@fuzz(60)
@given(data=st.data())
def test_random_config_contents(files, data):
    root = _dit_copy(files)
    config = dit_config_json(TINY.dit)
    if data.draw(st.booleans()):
        config = data.draw(json_values)
    else:
        keys = st.sampled_from(["patch_size", "audio_inject_layers", "dim", "eps"]) | st.sampled_from(sorted(config))
        for k in data.draw(st.lists(keys, min_size=1, max_size=3)):
            config[k] = data.draw(field_values)
    (root / ck.DIT_CONFIG).write_text(json.dumps(config))
    _ok_or_user_error(ck.read_dit_config, root, TINY.dit)
    _check_dit_folder(root)


@fuzz(40)
@given(data=st.data())
def test_dit_shard_byte_mutations(files, data):
    root = _dit_copy(files)
    shard = root / SHARD_NAMES[2]
    raw = shard.read_bytes()
    shard.write_bytes(_apply(raw, data.draw(byte_ops(raw, _header_end(raw)))))
    _check_dit_folder(root)


@fuzz(15)
@given(data=st.data())
def test_config_and_index_bytes_mutated(files, data):
    root = _dit_copy(files)
    for name in (ck.DIT_CONFIG, ck.DIT_INDEX):
        raw = (root / name).read_bytes()
        (root / name).write_bytes(_apply(raw, data.draw(byte_ops(raw, len(raw)))))
    _check_dit_folder(root)


# ---- values -----------------------------------------------------------------------------------

FLOATS = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e5m2, torch.float8_e4m3fn]


@fuzz(120)
@given(dtype=st.sampled_from(FLOATS), shape=st.lists(st.integers(0, 40), min_size=0, max_size=3),
       specials=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from([float("nan"), float("inf"),
                                                                            float("-inf")])), max_size=3),
       seed=st.integers(0, 2**16), strided=st.booleans())
def test_finite_check_agrees_with_isfinite(dtype, shape, specials, seed, strided):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    flat = t.view(-1)
    for pos, value in specials:
        if flat.numel():
            flat[pos % flat.numel()] = value
    if strided and t.dim() >= 1:
        t = t.transpose(0, -1)
    assert ck._all_finite(t) == bool(torch.isfinite(t.to(torch.float32)).all())


@fuzz(30)
@given(data=st.data())
def test_lora_with_nonfinite_values_is_refused_naming_the_tensor(data):
    model = on_meta(CausalS2VDiT, TINY.dit)
    lora = random_lora(model, TINY.lora_rank, seed=data.draw(st.integers(0, 100)))
    bad = data.draw(st.lists(st.sampled_from(sorted(lora)), max_size=2, unique=True))
    for k in bad:
        lora[k].view(-1)[data.draw(st.integers(0, lora[k].numel() - 1))] = data.draw(
            st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    if not bad:
        assert ck.check_lora(model, lora, TINY.lora_rank).keys() == lora.keys()
        return
    with pytest.raises(UserError, match=r"tensor (\S+) holds \d+ NaN and \d+ infinite values") as err:
        ck.check_lora(model, lora, TINY.lora_rank)
    assert any(k in str(err.value) for k in bad)
