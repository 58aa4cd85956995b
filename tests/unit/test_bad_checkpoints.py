"""Bad checkpoints through the real command line: every class of damaged or hostile file.

Each case damages a private copy of a complete tiny checkpoint (official layout and formats,
`--preset tiny`: DiT in 3 shards + index + config.json, T5 and VAE `.pth`, tokenizer, wav2vec2, LoRA)
in one way, then runs, in-process through `liveavatar.cli.main`:

- `check-ckpt`: exit 1 with the problem named in its report. It reads headers only, so the value
  cases (NaN/Inf weights, a merge that overflows) pass it with exit 0, which is asserted too;
- `generate --preset tiny --ckpt_dir <copy>` (the real command, loading the copy with the tiny
  preset): one `error:` line on stderr naming the problem, exit 2;
- for config.json cases also the unpatched `generate --preset s2v-14b --ckpt_dir <copy>`.

Every run: no traceback, and no file of the copy modified, deleted or added (hashes before/after).
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from liveavatar.cli import main
from liveavatar.config import TINY
from liveavatar.io import checkpoint as ck
from liveavatar.io.ckpt_writer import random_lora, save_lora, write_random_checkpoint
from liveavatar.models.dit import CausalS2VDiT
from liveavatar.models.sizes import on_meta

SHARD = ck.dit_shard_name(2, 3)
DROP = object()  # an entry field to remove


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    lora = base / "LiveAvatar" / ck.LORA_FILE
    write_random_checkpoint(base / "Wan2.2-S2V-14B", TINY, seed=3, num_shards=3, lora_path=lora)
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((160, 128, 3)) * 255).astype(np.uint8)).save(base / "face.png")
    t = np.arange(16000) / 16000
    sf.write(base / "speech.wav", (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000)
    return base


# ---- file surgery ----------------------------------------------------------------------------


def _st_split(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _st_write(path: Path, header: dict | list | bytes, body: bytes, length: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + body)


def _tensors(header: dict) -> list[str]:
    """Tensor names of a header in data order."""
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def _entry(**fields) -> Callable[[Path, Path], None]:
    """Set (or DROP) fields of the first tensor entry of shard 2."""
    def damage(root: Path, lora: Path) -> None:
        header, body = _st_split(root / SHARD)
        entry = header[_tensors(header)[0]]
        for k, v in fields.items():
            if v is DROP:
                del entry[k]
            else:
                entry[k] = v
        _st_write(root / SHARD, header, body)
    return damage


def _header(edit: Callable[[dict], object], file: str = SHARD) -> Callable[[Path, Path], None]:
    """Replace the header of a safetensors file (a shard, or "lora") by edit(header)."""
    def damage(root: Path, lora: Path) -> None:
        path = lora if file == "lora" else root / file
        header, body = _st_split(path)
        _st_write(path, edit(header), body)
    return damage


def _raw_header(raw: bytes, length: int | None = None) -> Callable[[Path, Path], None]:
    def damage(root: Path, lora: Path) -> None:
        _, body = _st_split(root / SHARD)
        _st_write(root / SHARD, raw, body, length)
    return damage


def _header_length(make: Callable[[int, int], int]) -> Callable[[Path, Path], None]:
    """Rewrite the 8-byte header length of shard 2 as make(length, file size)."""
    def damage(root: Path, lora: Path) -> None:
        data = (root / SHARD).read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        (root / SHARD).write_bytes(struct.pack("<Q", make(n, len(data))) + data[8:])
    return damage


def _not_utf8(root: Path, lora: Path) -> None:
    data = bytearray((root / SHARD).read_bytes())
    data[data.index(b'"', 8) + 1] = 0xFF  # first character of the first key
    (root / SHARD).write_bytes(bytes(data))


def _overlap(root: Path, lora: Path) -> None:
    """Two tensors of the same size share the bytes of the first; the second's are left unused."""
    header, body = _st_split(root / SHARD)
    by_size: dict[int, str] = {}
    for k in _tensors(header):
        start, stop = header[k]["data_offsets"]
        if stop - start in by_size:
            header[k]["data_offsets"] = header[by_size[stop - start]]["data_offsets"]
            return _st_write(root / SHARD, header, body)
        by_size[stop - start] = k
    raise AssertionError("no two tensors of the same size")


def _hole(root: Path, lora: Path) -> None:
    """8 unused bytes inserted before the last tensor (the file size matches the header)."""
    header, body = _st_split(root / SHARD)
    last = header[_tensors(header)[-1]]
    start, stop = last["data_offsets"]
    last["data_offsets"] = [start + 8, stop + 8]
    _st_write(root / SHARD, header, body[:start] + bytes(8) + body[start:])


def _past_end(root: Path, lora: Path) -> None:
    header, body = _st_split(root / SHARD)
    last = header[_tensors(header)[-1]]
    last["data_offsets"] = [o + 4096 for o in last["data_offsets"]]
    _st_write(root / SHARD, header, body)


def _wrong_size(root: Path, lora: Path) -> None:
    header, body = _st_split(root / SHARD)
    entry = header[_tensors(header)[0]]
    entry["shape"] = [entry["shape"][0] + 1, *entry["shape"][1:]]
    _st_write(root / SHARD, header, body)


def _cut(file: str, keep: Callable[[int], int]) -> Callable[[Path, Path], None]:
    def damage(root: Path, lora: Path) -> None:
        path = lora if file == "lora" else root / file
        data = path.read_bytes()
        path.write_bytes(data[: keep(len(data))])
    return damage


def _append(file: str, extra: bytes) -> Callable[[Path, Path], None]:
    def damage(root: Path, lora: Path) -> None:
        with open(root / file, "ab") as fh:
            fh.write(extra)
    return damage


def _index(edit: Callable[[dict], object]) -> Callable[[Path, Path], None]:
    def damage(root: Path, lora: Path) -> None:
        index = json.loads((root / ck.DIT_INDEX).read_text())
        (root / ck.DIT_INDEX).write_text(json.dumps(edit(index)))
    return damage


def _redirect(target: str) -> Callable[[dict], dict]:
    """Every tensor of shard 3 placed in `target` by the index."""
    def edit(index: dict) -> dict:
        wm = index["weight_map"]
        index["weight_map"] = {k: target if v == ck.dit_shard_name(3, 3) else v for k, v in wm.items()}
        return index
    return edit


def _outside(root: Path, lora: Path) -> None:
    """A valid copy of shard 3 next to the checkpoint folder, named by the index as ../<shard>."""
    shutil.copy(root / ck.dit_shard_name(3, 3), root.parent / ck.dit_shard_name(3, 3))
    _index(_redirect("../" + ck.dit_shard_name(3, 3)))(root, lora)


def _first_value(index: dict, value: object) -> dict:
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = value
    return index


def _write(file: str, data: bytes | str) -> Callable[[Path, Path], None]:
    def damage(root: Path, lora: Path) -> None:
        path = root / file
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return damage


def _sparse(file: str, size: int) -> Callable[[Path, Path], None]:
    """The file extended with a hole to `size` bytes (no disk used)."""
    def damage(root: Path, lora: Path) -> None:
        os.truncate(root / file, size)
    return damage


def _config(**fields) -> Callable[[Path, Path], None]:
    def damage(root: Path, lora: Path) -> None:
        raw = json.loads((root / ck.DIT_CONFIG).read_text())
        (root / ck.DIT_CONFIG).write_text(json.dumps(raw | fields))
    return damage


def _foreign_zip(root: Path, lora: Path) -> None:
    (root / ck.VAE_FILE).unlink()
    with zipfile.ZipFile(root / ck.VAE_FILE, "w") as zf:
        zf.writestr("weights/readme.txt", "not a torch archive")


def _pth(file: str, edit: Callable[[dict], object], **save) -> Callable[[Path, Path], None]:
    def damage(root: Path, lora: Path) -> None:
        sd = torch.load(root / file, weights_only=True)
        torch.save(edit(sd), root / file, **save)
    return damage


def _with(key: str, value: object) -> Callable[[dict], dict]:
    return lambda sd: sd | {key: value}


def _int_tensor(sd: dict) -> dict:
    k = next(iter(sd))
    return sd | {k: sd[k].to(torch.int16)}


def _poke(file: str, value: float) -> Callable[[Path, Path], None]:
    """One value of the first tensor (in name order) of a safetensors file set to `value`."""
    def damage(root: Path, lora: Path) -> None:
        path = lora if file == "lora" else root / file
        sd = load_file(path)
        k = sorted(sd)[0]
        sd[k].view(-1)[0] = value
        save_file(sd, str(path))
    return damage


def _lora_rank(rank: int) -> Callable[[Path, Path], None]:
    def damage(root: Path, lora: Path) -> None:
        save_lora(random_lora(on_meta(CausalS2VDiT, TINY.dit), rank, seed=2), lora)
    return damage


def _overflowing_lora(root: Path, lora: Path) -> None:
    """Finite LoRA values whose product B @ A overflows float32 (and so every merged weight)."""
    big = {k: torch.full_like(v, 1e30) for k, v in random_lora(on_meta(CausalS2VDiT, TINY.dit), 4).items()}
    save_lora(big, lora)


# ---- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    damage: Callable[[Path, Path], object]  # (checkpoint folder, LoRA file) -> None
    message: str  # regex naming the problem, in the check-ckpt report and in the generate error
    in_headers: bool = True  # False: a value problem, which the header-only check-ckpt cannot see
    s2v: bool = False  # also the unpatched `generate --preset s2v-14b` (fails at config.json first)


S = r"\S+"  # a path
CASES = [
    # -- safetensors: header length, header text, header structure
    Case("header length absurd", _header_length(lambda n, size: 2**62),
         rf"{S}{SHARD} is not a safetensors file \(header length 4611686018427387904\); re-download it"),
    Case("header length past the end", _header_length(lambda n, size: size),
         rf"{SHARD} is truncated \(\d+ bytes, header needs \d+\)"),
    Case("header length too short", _header_length(lambda n, size: n - 10),
         rf"{SHARD}: the safetensors header is not valid JSON"),
    Case("header not JSON", _raw_header(b"this is not JSON at all"),
         rf"{SHARD}: the safetensors header is not valid JSON \(JSONDecodeError"),
    Case("header not UTF-8", _not_utf8, rf"{SHARD}: the safetensors header is not valid UTF-8 text"),
    Case("header nested too deeply", _raw_header(b"[" * 100_000), r"not valid JSON \(nested too deeply\)"),
    Case("header NaN literal", _header(lambda h: h | {"__metadata__": {"x": float("nan")}}),
         r"not valid JSON \(ValueError: NaN is not a JSON value\)"),
    Case("header a JSON list", _header(lambda h: list(h.values())),
         rf"{SHARD}: the safetensors header is a JSON list, not an object of tensors"),
    Case("header a JSON string", _header(lambda h: "weights"), r"safetensors header is a JSON string"),
    Case("entry not an object", _header(lambda h: h | {_tensors(h)[0]: [1, 2]}),
         r"tensor \S+ is described by a JSON list, not an object"),
    Case("entry without dtype", _entry(dtype=DROP), r"tensor \S+ has no dtype in the header"),
    Case("entry without shape", _entry(shape=DROP), r"tensor \S+ has no shape in the header"),
    Case("entry without data_offsets", _entry(data_offsets=DROP), r"tensor \S+ has no data_offsets in the header"),
    Case("unknown dtype", _entry(dtype="Q7"), r"tensor \S+ has unsupported dtype 'Q7'"),
    Case("dtype not a string", _entry(dtype=["BF16"]), r"tensor \S+ has unsupported dtype \['BF16'\]"),
    Case("negative dimension", _entry(shape=[-64]),
         r"tensor \S+ has shape \[-64\], not a list of non-negative integers"),
    Case("shape not a list", _entry(shape="64x64"), r"has shape '64x64', not a list of non-negative integers"),
    Case("shape of floats", _entry(shape=[64.0]), r"has shape \[64\.0\], not a list of non-negative integers"),
    Case("impossible shape", _entry(shape=[0, 2**62, 8]), r"has the impossible shape \[0, 4611686018427387904, 8\]"),
    Case("data_offsets not two ints", _entry(data_offsets=[0]), r"has data_offsets \[0\], not two non-negative"),
    Case("data_offsets strings", _entry(data_offsets=["0", "128"]), r"has data_offsets \['0', '128'\], not two"),
    Case("size does not match shape", _wrong_size, r"tensor \S+ spans \d+ bytes but \[\d+(, \d+)*\] bfloat16 needs"),
    Case("offsets past the end", _past_end, rf"{SHARD} is truncated: \d+ bytes on disk, its header describes"),
    Case("overlapping tensors", _overlap, r"tensor \S+ starts at data byte \d+ and overlaps the tensor before it"),
    Case("unused bytes between tensors", _hole, r"tensor \S+ starts at data byte \d+ and leaves 8 unused bytes"),
    Case("bytes after the last tensor", _append(SHARD, bytes(100)),
         rf"{SHARD} has 100 bytes after its last tensor that its header does not describe"),
    Case("__metadata__ not strings", _header(lambda h: h | {"__metadata__": {"format": 1}}),
         r"the safetensors __metadata__ is not a mapping of strings to strings"),
    Case("__metadata__ a list", _header(lambda h: h | {"__metadata__": ["pt"]}),
         r"the safetensors __metadata__ is not a mapping of strings to strings"),
    Case("tensor name with control characters", _header(lambda h: {"a\x1b[2J": h.pop(_tensors(h)[0])} | h),
         r"names a tensor 'a\\x1b\[2J' with control characters"),
    Case("shard truncated", _cut(SHARD, lambda n: n - 1000), rf"{SHARD} is truncated: \d+ bytes on disk"),
    Case("shard empty", _cut(SHARD, lambda n: 0), rf"{SHARD} is truncated \(0 bytes, no safetensors header\)"),
    Case("LoRA header not JSON", _header(lambda h: b"{not json}", file="lora"),
         rf"{ck.LORA_FILE}: the safetensors header is not valid JSON"),
    Case("LoRA truncated", _cut("lora", lambda n: n // 2), rf"{ck.LORA_FILE} is truncated"),
    # -- the shard index
    Case("index not JSON", _write(ck.DIT_INDEX, "{'weight_map': {}}"), rf"{ck.DIT_INDEX} is not valid JSON"),
    Case("index a JSON list", _write(ck.DIT_INDEX, "[1, 2]"),
         rf"{ck.DIT_INDEX} is not a safetensors index \(a JSON list, not an object\)"),
    Case("index without weight_map", _index(lambda i: {"metadata": i["metadata"]}),
         r"is not a safetensors index: it has no weight_map"),
    Case("index weight_map a list", _index(lambda i: i | {"weight_map": list(i["weight_map"])}),
         r"is not a safetensors index: it has a weight_map that is a JSON list"),
    Case("index absurdly large", _sparse(ck.DIT_INDEX, 200 << 20),
         rf"{ck.DIT_INDEX} is 209715200 bytes, far too large for this file"),
    Case("index weight_map empty", _index(lambda i: i | {"weight_map": {}}), r"lists no tensors"),
    Case("index value not a string", _index(lambda i: _first_value(i, 3)),
         r"entry \S+ maps to a JSON number, not a file name"),
    Case("index path traversal", _index(_redirect("../../etc/passwd")),
         r"entry \S+ names the file '\.\./\.\./etc/passwd', which is refused: only a plain file name inside"),
    Case("index names a real file outside", _outside,
         rf"names the file '\.\./{re.escape(ck.dit_shard_name(3, 3))}', which is refused"),
    Case("index absolute path", _index(_redirect("/etc/passwd")), r"names the file '/etc/passwd', which is refused"),
    Case("index backslashes", _index(_redirect("..\\..\\x.safetensors")),
         r"names the file '\.\.\\\\\.\.\\\\x\.safetensors', which is refused"),
    Case("index NUL in a name", _index(_redirect("x\x00.safetensors")),
         r"names the file 'x\\x00\.safetensors', which is refused"),
    Case("index sub-folder", _index(_redirect("sub/" + SHARD)), r"names the file 'sub/\S+', which is refused"),
    Case("index dot-dot", _index(_redirect("..")), r"names the file '\.\.', which is refused"),
    # -- config.json
    Case("config not JSON", _write(ck.DIT_CONFIG, "dim = 64"), rf"{ck.DIT_CONFIG} is not valid JSON", s2v=True),
    Case("config a JSON list", _write(ck.DIT_CONFIG, "[64, 128]"),
         rf"{ck.DIT_CONFIG} holds a JSON list, not an object of model settings", s2v=True),
    Case("config absurdly large", _sparse(ck.DIT_CONFIG, 1 << 30),
         rf"{ck.DIT_CONFIG} is 1073741824 bytes, far too large for this file", s2v=True),
    Case("config a number", _write(ck.DIT_CONFIG, "5120"), rf"{ck.DIT_CONFIG} holds a JSON number", s2v=True),
    Case("config field a string", _config(dim="64"), r"sets dim='64', which is not an integer", s2v=True),
    Case("config field a boolean", _config(num_heads=True), r"sets num_heads=True, which is not an integer",
         s2v=True),
    Case("config list field a number", _config(audio_inject_layers=3),
         r"sets audio_inject_layers=3, which is not a list of integers", s2v=True),
    Case("config not UTF-8", _write(ck.DIT_CONFIG, b'{"dim": "\xff"}'), r"is not valid UTF-8 text", s2v=True),
    # -- .pth (T5 / VAE)
    Case("VAE empty", _write(ck.VAE_FILE, b""), rf"{ck.VAE_FILE} is empty \(0 bytes\)"),
    Case("T5 truncated", _cut(ck.T5_FILE, lambda n: n // 2),
         rf"{ck.T5_FILE} cannot be opened as a torch checkpoint, it is probably truncated"),
    Case("VAE random bytes", _write(ck.VAE_FILE, b"\x13\x37" * 500), rf"{ck.VAE_FILE} is not a torch checkpoint"),
    Case("VAE zip that is not torch", _foreign_zip,
         rf"{ck.VAE_FILE} is a zip archive but not a torch checkpoint \(no <name>/data\.pkl"),
    Case("T5 legacy torch format", _pth(ck.T5_FILE, dict, _use_new_zipfile_serialization=False),
         rf"{ck.T5_FILE} is in the legacy \(non-zip\) torch\.save format"),
    Case("VAE holds a Python object", _pth(ck.VAE_FILE, _with("args", argparse.Namespace(x=1))),
         r"holds Python code or objects besides tensors \(argparse\.Namespace\), which are not loaded"),
    Case("T5 holds code", _pth(ck.T5_FILE, _with("hook", os.system)),
         r"holds Python code or objects besides tensors \((posix|os|nt)\.system\), which are not loaded"),
    Case("VAE not a state dict", _pth(ck.VAE_FILE, lambda sd: list(sd.values())),
         r"does not hold a state dict \(name -> tensor\) but a list"),
    Case("VAE integer tensor", _pth(ck.VAE_FILE, _int_tensor),
         r"tensor \S+ has dtype int16, expected a floating dtype"),
    # -- values (read when loading; check-ckpt reads headers only)
    Case("DiT weight NaN", _poke(SHARD, float("nan")), rf"{SHARD}: tensor \S+ holds 1 NaN and 0 infinite values",
         in_headers=False),
    Case("DiT weight Inf", _poke(SHARD, float("-inf")), rf"{SHARD}: tensor \S+ holds 0 NaN and 1 infinite values",
         in_headers=False),
    Case("LoRA NaN", _poke("lora", float("nan")),
         rf"the LoRA {S}{ck.LORA_FILE}: tensor \S+lora_A\S+ holds 1 NaN and 0 infinite values; re-download the LoRA",
         in_headers=False),
    Case("LoRA Inf", _poke("lora", float("inf")), r"tensor \S+ holds 0 NaN and 1 infinite values", in_headers=False),
    Case("LoRA rank 8 instead of 4", _lora_rank(8),
         r"LoRA tensor \S+lora_A\S+ has shape \[8, 64\], expected \[4, 64\] \(rank 8 instead of 4\)"),
    Case("merge overflows", _overflowing_lora,
         r"DiT weight \S+\.weight holds NaN or infinite values after merging the LoRA \S+ \(the sum overflows",
         in_headers=False),
]


def _hashes(*paths: Path) -> dict[str, str]:
    out = {}
    for top in paths:
        for p in sorted([top] if top.is_file() else top.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def quiet_transformers():
    """No weight-loading progress bars from transformers on stderr: it must hold only the error line."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


def test_the_table_is_large_and_distinct():
    assert len(CASES) >= 35
    assert len({c.name for c in CASES}) == len(CASES) and len({c.message for c in CASES}) >= 35


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_checkpoint(case, pristine, tmp_path, capsys, quiet_transformers):
    root, lora = tmp_path / "ck", tmp_path / ck.LORA_FILE
    shutil.copytree(pristine / "Wan2.2-S2V-14B", root)
    shutil.copy(pristine / "LiveAvatar" / ck.LORA_FILE, lora)
    case.damage(root, lora)
    before = _hashes(root, lora)

    code = main(["check-ckpt", "--ckpt_dir", str(root), "--lora_path", str(lora), "--preset", "tiny"])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "weights_only" not in out and err == ""
    if case.in_headers:
        assert code == 1 and "FAILED" in out, out
        assert re.search(case.message, out), out
    else:
        assert code == 0 and "all checked components are complete" in out, out

    for preset in ["tiny", "s2v-14b"] if case.s2v else ["tiny"]:
        code = main(["generate", "--preset", preset, "--device", "cpu", "--ckpt_dir", str(root),
                     "--lora_path", str(lora), "--image", str(pristine / "face.png"),
                     "--audio", str(pristine / "speech.wav"), "--size", "128*128",
                     "--save_file", str(tmp_path / "out" / "video.mp4")])
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err and "weights_only" not in err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (preset, err)
        assert re.search(case.message, err), (preset, err)
    assert _hashes(root, lora) == before


def test_the_undamaged_checkpoint_generates(pristine, tmp_path, capsys, quiet_transformers):
    """The control: the same command on the intact copy loads it (official formats, LoRA merged) and
    writes the video."""
    import av

    out = tmp_path / "video.mp4"
    code = main(["generate", "--preset", "tiny", "--device", "cpu", "--ckpt_dir", str(pristine / "Wan2.2-S2V-14B"),
                 "--lora_path", str(pristine / "LiveAvatar" / ck.LORA_FILE), "--image", str(pristine / "face.png"),
                 "--audio", str(pristine / "speech.wav"), "--size", "128*128", "--save_file", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 25 - 3
