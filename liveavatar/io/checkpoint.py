"""Checkpoint files: layout, key handling, lazy loading and the LoRA merge.

Everything the runtime needs to load the official weight files lives here. `Wan2.2-S2V-14B/` holds
the DiT (`config.json` + sharded safetensors with an index), the umT5 encoder and the Wan2.1 VAE as
`torch.save` zips (`.pth`), the umT5 tokenizer folder and the wav2vec2 folder; the Live Avatar LoRA
is one peft safetensors file. Models are built on the meta device and filled tensor by tensor
(`safe_open` / `torch.load(mmap=True)`, cast per tensor, `load_state_dict(assign=True)`), so host
memory never holds a second copy of the weights. Module names equal checkpoint keys, so the only key
mappings are the LoRA's peft naming and wav2vec2's prefix and weight-norm names. File headers
(safetensors header, `.pth` zip directory) are read here too, so that every file is checked against
the meta-built model before any weight is read; `liveavatar.io.verify` reuses them for the header-only
checks and `liveavatar.io.ckpt_writer` writes files in these formats.

Whatever the bytes on disk, every reader and loader here returns or raises `UserError` naming the file,
the problem and the fix, never another exception: headers are checked as strictly as the libraries
read them, declared sizes before anything is allocated, the shard index may only name plain files in
the checkpoint folder, `.pth` pickles are loaded with `weights_only=True` (objects and code refused),
and DiT and LoRA weights are checked for NaN/Inf as they are loaded and merged.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import struct
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from liveavatar.config import AudioConfig, DiTConfig, T5Config, VAEConfig
from liveavatar.errors import UserError
from liveavatar.models.sizes import on_meta, state_shapes

# ---------------------------------------------------------------------------------------------
# Layout of the official folders

DIT_CONFIG = "config.json"
DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIT_SINGLE = "diffusion_pytorch_model.safetensors"
DIT_SHARD_RE = re.compile(r"^diffusion_pytorch_model-(\d{5})-of-(\d{5})\.safetensors$")
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
VAE_FILE = "Wan2.1_VAE.pth"
TOKENIZER_DIR = "google/umt5-xxl"
AUDIO_DIR = "wav2vec2-large-xlsr-53-english"
LORA_FILE = "liveavatar.safetensors"  # in LiveAvatar/ (HF Quark-Vision/Live-Avatar)
LORA_REPO = "Quark-Vision/Live-Avatar"
LORA_PREFIX = "base_model.model."
LORA_TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")  # peft suffixes of the adapted nn.Linear modules
COMPONENTS = ("dit", "lora", "t5", "vae", "audio", "tokenizer")

# dtypes of the official files; a different float dtype loads fine (cast per tensor) and is only noted.
FILE_DTYPES = {
    "dit": torch.bfloat16, "lora": torch.bfloat16, "t5": torch.bfloat16, "vae": torch.float32,
    "audio": torch.float32,
}

# config.json fields that map onto DiTConfig, and structural switches our DiT implements in one way only.
_DIT_CONFIG_FIELDS = (
    "dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "patch_size", "freq_dim", "text_dim",
    "text_len", "audio_dim", "num_audio_token", "audio_inject_layers", "cond_dim", "eps", "motion_frames",
)
_DIT_CONFIG_FIXED = {
    "model_type": "s2v", "qk_norm": True, "cross_attn_norm": True, "enable_adain": True,
    "adain_mode": "attn_norm", "enable_framepack": True, "framepack_drop_mode": "padd",
    "enable_motioner": False, "enable_tsm": False, "add_last_motion": True, "zero_timestep": True,
    "trainable_token_pos_emb": False, "window_size": [-1, -1],
}

_ST_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_ST_MAX_HEADER = 100_000_000  # the safetensors library's own limit; larger "headers" mean not safetensors
_ST_MAX_ELEMENTS = 2**62  # a shape whose nonzero dims multiply past this is impossible (torch sizes are int64)
_MAX_JSON_BYTES = 64 << 20  # config.json and the index are kilobytes; larger files are not them
_MAX_NAME_BYTES = 255  # longest file name of common file systems
_MAP_CHUNK_BYTES = 32 << 20  # file bytes mapped at once when tensors are cast or moved while loading
_SHOW = 5  # names listed per kind of problem in one-line errors


def dit_shard_name(index: int, count: int) -> str:
    return f"diffusion_pytorch_model-{index:05d}-of-{count:05d}.safetensors"


@dataclass(frozen=True)
class CkptPaths:
    """Where each component lives under a `Wan2.2-S2V-14B/` folder."""

    root: Path
    config: Path
    index: Path
    t5: Path
    vae: Path
    tokenizer: Path
    audio: Path


def ckpt_paths(ckpt_dir: str | Path) -> CkptPaths:
    root = Path(ckpt_dir)
    if not _is_dir(root):
        raise UserError(f"checkpoint folder {root} does not exist; pass --ckpt_dir pointing at "
                        f"Wan2.2-S2V-14B/")
    return CkptPaths(root, root / DIT_CONFIG, root / DIT_INDEX, root / T5_FILE, root / VAE_FILE,
                     root / TOKENIZER_DIR, root / AUDIO_DIR)


# ---------------------------------------------------------------------------------------------
# Tensor metadata and comparison


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def _shape(s: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in s) + "]"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _compare(expected: dict[str, tuple[int, ...]], found: dict[str, TensorMeta]) -> list[str]:
    """Problems, one per tensor: missing, unexpected (not in the model) or misshapen."""
    problems = [f"missing tensor {k}" for k in expected if k not in found]
    problems += [f"unexpected tensor {k}" for k in found if k not in expected]
    problems += [f"tensor {k} has shape {_shape(found[k].shape)}, expected {_shape(s)}"
                 for k, s in expected.items() if k in found and tuple(found[k].shape) != tuple(s)]
    return problems


def _summarize(problems: Sequence[str]) -> str:
    head = "; ".join(problems[:_SHOW])
    more = f"; and {len(problems) - _SHOW} more" if len(problems) > _SHOW else ""
    return f"{len(problems)} problem(s): {head}{more}"


def _dtype_problems(found: dict[str, TensorMeta]) -> list[str]:
    """Tensors the models cannot hold: every weight of every model is floating point."""
    return [f"tensor {k} has dtype {_dtype_name(m.dtype)}, expected a floating dtype"
            for k, m in found.items() if not m.dtype.is_floating_point]


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # e.g. a name too long for the file system
        return False


# ---------------------------------------------------------------------------------------------
# Untrusted text: JSON files and headers, names and values quoted in messages


def _brief(value: object, limit: int = 60) -> str:
    """repr of a value read from a file, cut to `limit` characters for a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(exc: BaseException, limit: int = 160) -> str:
    """`Type: first words of the message` of a library exception, printable and short."""
    text = " ".join("".join(c if c.isprintable() else " " for c in str(exc)).split())
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__


def _json_type(value: object) -> str:
    kinds = ((bool, "boolean"), (int | float, "number"), (str, "string"), (list, "list"), (dict, "object"))
    return next((name for cls, name in kinds if isinstance(value, cls)), "null")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _parse_json(data: bytes, subject: str) -> object:
    """`data` as strict JSON (UTF-8, no NaN/Infinity, no lone surrogates, as the safetensors library
    reads it); otherwise a UserError '<subject> is not valid UTF-8/JSON (...); re-download it'."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{subject} is not valid UTF-8 text (bad byte at {exc.start}); re-download it") from None
    try:
        value = json.loads(text, parse_constant=_no_constant)
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # lone surrogates (\ud800) are not text
    except RecursionError:
        raise UserError(f"{subject} is not valid JSON (nested too deeply); re-download it") from None
    except ValueError as exc:
        raise UserError(f"{subject} is not valid JSON ({_reason(exc)}); re-download it") from None
    return value


def _read_json_file(path: Path) -> object:
    """A small JSON file (config.json, the shard index) parsed strictly; UserError if unreadable."""
    try:
        size = path.stat().st_size
        if size > _MAX_JSON_BYTES:
            raise UserError(f"{path} is {size} bytes, far too large for this file; re-download it")
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path} cannot be read ({_reason(exc)}); check the file and its permissions") from None
    return _parse_json(data, str(path))


# ---------------------------------------------------------------------------------------------
# File headers: safetensors and torch.save zips


def read_safetensors_header(path: str | Path) -> dict[str, TensorMeta]:
    """Tensor metadata of a safetensors file from its header (8-byte little-endian length + JSON).

    The header is checked as strictly as the safetensors library reads it: a JSON object of tensor
    entries (dtype, shape, data_offsets) and an optional `__metadata__` of strings, tensors laid end to
    end over exactly the rest of the file. Raises UserError naming the file and the first problem
    (truncated, not safetensors, bad entry, overlapping or missing bytes)."""
    path = Path(path)
    size, n, header = _st_header_json(path)
    if not isinstance(header, dict):
        raise UserError(f"{path}: the safetensors header is a JSON {_json_type(header)}, not an object of "
                        f"tensors; re-download it")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise UserError(f"{path}: the safetensors __metadata__ is not a mapping of strings to strings; "
                        f"re-download it")
    metas, spans = {}, []
    for name, entry in header.items():
        metas[name], span = _st_entry(path, name, entry)
        spans.append((span, name))
    _st_layout(path, size, 8 + n, spans)
    return metas


def _st_header_json(path: Path) -> tuple[int, int, object]:
    """(file size, header length, parsed header); the declared length is checked before it is read."""
    redownload = "re-download it"
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise UserError(f"{path} is truncated ({size} bytes, no safetensors header); {redownload}")
            n = struct.unpack("<Q", raw)[0]
            if n > _ST_MAX_HEADER:
                raise UserError(f"{path} is not a safetensors file (header length {n}); {redownload}")
            if 8 + n > size:
                raise UserError(f"{path} is truncated ({size} bytes, header needs {8 + n}); {redownload}")
            data = fh.read(n)
    except OSError as exc:
        raise UserError(f"{path} cannot be read ({_reason(exc)}); check the file and its permissions") from None
    return size, n, _parse_json(data, f"{path}: the safetensors header")


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _st_entry(path: Path, name: str, entry: object) -> tuple[TensorMeta, tuple[int, int]]:
    """(metadata, (start, stop) in the data section) of one header entry, or a UserError naming it."""
    def bad(problem: str) -> UserError:
        return UserError(f"{path}: tensor {name} {problem}; re-download it")

    if not name.isprintable():
        raise UserError(f"{path}: the safetensors header names a tensor {_brief(name)} with control "
                        f"characters; re-download it")
    if not isinstance(entry, dict):
        raise bad(f"is described by a JSON {_json_type(entry)}, not an object")
    missing = [f for f in ("dtype", "shape", "data_offsets") if f not in entry]
    if missing:
        raise bad(f"has no {' or '.join(missing)} in the header")
    dtype = _ST_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise bad(f"has unsupported dtype {_brief(entry['dtype'])}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"has shape {_brief(shape)}, not a list of non-negative integers")
    if not _shape_fits(shape):
        raise bad(f"has the impossible shape {_brief(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise bad(f"has data_offsets {_brief(offsets)}, not two non-negative integers")
    start, stop = offsets
    meta = TensorMeta(tuple(shape), dtype)
    if stop - start != meta.nbytes:
        raise bad(f"spans {stop - start} bytes but {_shape(meta.shape)} {_dtype_name(dtype)} needs {meta.nbytes}")
    return meta, (start, stop)


def _shape_fits(shape: list[int]) -> bool:
    count = 1
    for d in shape:
        count *= max(d, 1)
        if count > _ST_MAX_ELEMENTS:
            return False
    return True


def _st_layout(path: Path, size: int, data_start: int, spans: list[tuple[tuple[int, int], str]]) -> None:
    """Tensors must lie end to end from the start of the data to the end of the file, as the
    safetensors library requires: past the end is truncation, anything else a damaged header."""
    end = max((stop for (_, stop), _ in spans), default=0)
    if data_start + end > size:
        raise UserError(f"{path} is truncated: {size} bytes on disk, its header describes {data_start + end}; "
                        f"re-download it")
    pos = 0
    for (start, stop), name in sorted(spans):
        if start != pos:
            how = "overlaps the tensor before it" if start < pos else f"leaves {start - pos} unused bytes before it"
            raise UserError(f"{path}: tensor {name} starts at data byte {start} and {how}; re-download it")
        pos = stop
    if data_start + pos != size:
        raise UserError(f"{path} has {size - data_start - pos} bytes after its last tensor that its header does "
                        f"not describe; re-download it")


def read_pth_metadata(path: str | Path) -> dict[str, TensorMeta]:
    """Tensor metadata of a `torch.save` zip without reading tensor data.

    The file must be a torch zip (not empty, not the legacy format, not another zip); its pickle is
    loaded onto the meta device with `weights_only=True`, so a file holding Python objects or code
    besides tensors is refused, not run. It must be a mapping of names to dense tensors, and each
    storage's record in the zip must be stored uncompressed, have exactly the storage's byte size
    and lie inside the file. A truncated file (the zip directory sits at its end) is reported as such."""
    path = Path(path)
    _check_torch_zip(path)
    sd = _load_on_meta(path)
    _check_state_dict(path, sd)
    size = path.stat().st_size
    records = _zip_data_records(path)
    for name, t in sd.items():
        storage = t.untyped_storage()
        offset = getattr(storage, "_checkpoint_offset", None)
        rec = records.get(offset)
        if rec is None:
            raise UserError(f"{path}: the data record of tensor {name} is missing from the zip; re-download it")
        rec_size, compressed = rec
        if compressed or rec_size != storage.nbytes() or offset + rec_size > size:
            raise UserError(f"{path}: the data record of tensor {name} is damaged ({rec_size} bytes stored, "
                            f"{storage.nbytes()} expected); re-download it")
    return {k: TensorMeta(tuple(t.shape), t.dtype) for k, t in sd.items()}


def _check_torch_zip(path: Path) -> None:
    """A UserError unless `path` is a zip archive in the layout of `torch.save` (`<name>/data.pkl`)."""
    size, head, infos = _zip_directory(path)
    if size == 0:
        raise UserError(f"{path} is empty (0 bytes); re-download it")
    if infos is None and head.startswith(b"PK\x03\x04"):
        raise UserError(f"{path} cannot be opened as a torch checkpoint, it is probably truncated or corrupt "
                        f"(the zip directory at its end is missing); re-download it")
    if infos is None and head.startswith(b"\x80"):
        raise UserError(f"{path} is in the legacy (non-zip) torch.save format, which is not supported; "
                        f"re-download the official file")
    if infos is None:
        raise UserError(f"{path} is not a torch checkpoint (a torch.save zip archive); re-download it")
    if not any(i.filename.count("/") == 1 and i.filename.endswith("/data.pkl") for i in infos):
        raise UserError(f"{path} is a zip archive but not a torch checkpoint (no <name>/data.pkl in it); "
                        f"re-download it")
    huge = next((i for i in infos if i.file_size > size), None)
    if huge is not None:  # torch.save stores records uncompressed; torch would allocate the claimed size
        raise UserError(f"{path} has a damaged zip directory (record {_brief(huge.filename)} claims "
                        f"{huge.file_size} bytes, more than the whole file); re-download it")


def _zip_directory(path: Path) -> tuple[int, bytes, list[zipfile.ZipInfo] | None]:
    """(file size, first 4 bytes, zip records or None when it is not a zip archive)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(4)
        if not zipfile.is_zipfile(path):
            return size, head, None
        with zipfile.ZipFile(path) as zf:
            return size, head, zf.infolist()
    except OSError as exc:
        raise UserError(f"{path} cannot be read ({_reason(exc)}); check the file and its permissions") from None
    except Exception as exc:  # zipfile reports a damaged directory with several exception types
        raise UserError(f"{path} cannot be opened as a torch checkpoint, it is probably truncated or corrupt "
                        f"({_reason(exc)}); re-download it") from None


_PICKLED_OBJECT = re.compile(r"GLOBAL ([\w.]+)|unrecognized function|new object|is blocked|must be imported")


def _load_on_meta(path: Path) -> object:
    """The pickle of a torch zip on the meta device, loaded with `weights_only=True` (no code runs)."""
    try:
        return torch.load(path, map_location="meta", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's text here advises unsafe loading: not shown
        m = _PICKLED_OBJECT.search(str(exc))
        if m is None:
            raise UserError(f"{path} cannot be opened as a torch checkpoint, its pickle is damaged; "
                            f"re-download it") from None
        what = f" ({m[1]})" if m[1] else ""
        raise UserError(f"{path} holds Python code or objects besides tensors{what}, which are not loaded "
                        f"(only plain tensors are read from checkpoints); re-download the official file") from None
    except Exception as exc:  # torch reports a bad zip with RuntimeError, a bad pickle with others
        raise UserError(f"{path} cannot be opened as a torch checkpoint, it is probably truncated or corrupt "
                        f"({_reason(exc)}); re-download it") from None


def _check_state_dict(path: Path, sd: object) -> None:
    """A UserError unless `sd` maps printable names to dense tensors."""
    if not isinstance(sd, dict):
        raise UserError(f"{path} does not hold a state dict (name -> tensor) but a {type(sd).__name__}; "
                        f"re-download it")
    for k, v in sd.items():
        if not isinstance(k, str) or not k.isprintable():
            raise UserError(f"{path} does not hold a state dict (name -> tensor): key {_brief(k)} is not a "
                            f"tensor name; re-download it")
        if not isinstance(v, torch.Tensor):
            raise UserError(f"{path} does not hold a state dict (name -> tensor): {k} is a "
                            f"{type(v).__name__}; re-download it")
        if v.layout != torch.strided or v.is_quantized:
            raise UserError(f"{path}: tensor {k} is not a dense tensor ({v.layout}); re-download it")


def _zip_data_records(path: Path) -> dict[int, tuple[int, bool]]:
    """Data offset -> (stored size, compressed) for every `<archive>/data/<key>` record of a torch zip."""
    out = {}
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
            for info in zf.infolist():
                parts = info.filename.split("/")
                if len(parts) != 3 or parts[1] != "data":
                    continue
                fh.seek(info.header_offset)
                local = fh.read(30)  # local file header; name and extra lengths at bytes 26..30
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                start = info.header_offset + 30 + name_len + extra_len
                out[start] = (info.file_size, info.compress_type != zipfile.ZIP_STORED)
    except OSError as exc:
        raise UserError(f"{path} cannot be read ({_reason(exc)}); check the file and its permissions") from None
    except Exception as exc:  # a damaged zip directory or local header
        raise UserError(f"{path} has a damaged zip directory ({_reason(exc)}); re-download it") from None
    return out


# ---------------------------------------------------------------------------------------------
# DiT config and file layout


class ConfigMismatch(UserError):
    """config.json is readable but describes another model than the preset."""


def read_dit_config(ckpt_dir: str | Path, expected: DiTConfig | None = None) -> DiTConfig:
    """DiTConfig from `<ckpt_dir>/config.json`, checked field by field against the preset's config.

    An unreadable file, or one that is not a JSON object or has fields of the wrong type, raises
    UserError; a readable one that describes another model raises its subclass ConfigMismatch."""
    expected = DiTConfig() if expected is None else expected
    path = Path(ckpt_dir) / DIT_CONFIG
    if not path.is_file():
        raise UserError(f"{path} does not exist; --ckpt_dir must point at the Wan2.2-S2V-14B folder")
    raw = _read_json_file(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path} holds a JSON {_json_type(raw)}, not an object of model settings; re-download it")
    values, diffs = {}, []
    for name in _DIT_CONFIG_FIELDS:
        if name not in raw:
            continue
        want = getattr(expected, name)
        _check_config_type(path, name, raw[name], want)
        got = tuple(raw[name]) if isinstance(want, tuple) else raw[name]
        if got != want:
            diffs.append(f"{name}={_brief(raw[name])} (preset: {want!r})")
        values[name] = got
    if diffs:
        raise ConfigMismatch(f"{path} does not match the preset: {', '.join(diffs)}; "
                             f"pass the --preset that matches this checkpoint")
    for name, want in _DIT_CONFIG_FIXED.items():
        if name in raw and raw[name] != want:
            raise ConfigMismatch(f"{path} sets {name}={_brief(raw[name])}, but only {want!r} (the Wan2.2-S2V-14B "
                                 f"model) is implemented; use the Wan2.2-S2V-14B checkpoint")
    return replace(expected, **values)


def _check_config_type(path: Path, name: str, value: object, want: object) -> None:
    """A UserError unless `value` (from config.json) has the JSON type of the preset's `want`."""
    def integer(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if isinstance(want, tuple):
        ok, kind = isinstance(value, list) and all(integer(v) for v in value), "a list of integers"
    elif isinstance(want, float):
        ok, kind = integer(value) or isinstance(value, float), "a number"
    else:
        ok, kind = integer(value), "an integer"
    if not ok:
        raise UserError(f"{path} sets {name}={_brief(value)}, which is not {kind}; re-download it")


def _dit_layout(root: Path) -> tuple[dict[Path, list[str] | None], list[str], list[str]]:
    """(shard -> keys the index places there (None: read the header), files used, problems)."""
    index, single = root / DIT_INDEX, root / DIT_SINGLE
    if index.is_file():
        weight_map, problems = _read_index(index)
        shards: dict[Path, list[str]] = {}
        for key, fname in weight_map.items():
            shards.setdefault(root / fname, []).append(key)
        problems += [f"missing shard {p.name} (the index places {len(keys)} tensors there, e.g. {keys[0]})"
                     for p, keys in shards.items() if not p.is_file()]
        files = [DIT_INDEX] + sorted(p.name for p in shards)
        return {p: k for p, k in sorted(shards.items())}, files, problems
    if single.is_file():
        return {single: None}, [DIT_SINGLE], []
    return {}, [], [f"no DiT weights in {root}: expected {DIT_INDEX} with its shards, or {DIT_SINGLE}"]


def _read_index(index: Path) -> tuple[dict[str, str], list[str]]:
    """The index's weight_map (tensor -> shard file name), or {} and the problems that make it unusable;
    every entry must name a plain file inside the checkpoint folder."""
    try:
        raw = _read_json_file(index)
    except UserError as exc:
        return {}, [str(exc)]
    if not isinstance(raw, dict):
        return {}, [f"{index} is not a safetensors index (a JSON {_json_type(raw)}, not an object); re-download it"]
    weight_map = raw.get("weight_map")
    if not isinstance(weight_map, dict):
        what = f"a weight_map that is a JSON {_json_type(weight_map)}" if "weight_map" in raw else "no weight_map"
        return {}, [f"{index} is not a safetensors index: it has {what}, not an object of tensor -> file; "
                    f"re-download it"]
    if not weight_map:
        return {}, [f"{index} lists no tensors (its weight_map is empty); re-download it"]
    problems = [p for k, f in weight_map.items() if (p := _index_entry_problem(index, k, f))]
    return ({} if problems else weight_map), problems


def _plain_file_name(name: str) -> bool:
    """A name that can only mean a file in the folder itself: no separators ('/', '\\', ':'), no '..',
    not '.', printable (no NUL), and short enough for the file system."""
    return (name.strip() not in ("", ".") and ".." not in name and not any(c in name for c in "/\\:")
            and name.isprintable() and len(name.encode("utf-8")) <= _MAX_NAME_BYTES)


def _index_entry_problem(index: Path, key: str, fname: object) -> str | None:
    """Why the index entry key -> fname is refused, or None: the file must be a plain name inside the
    checkpoint folder (no separators, no '..', not absolute, no control characters)."""
    entry = key if key.isprintable() else _brief(key)
    if not isinstance(fname, str):
        return f"{index}: entry {entry} maps to a JSON {_json_type(fname)}, not a file name; re-download it"
    if not _plain_file_name(fname):
        return (f"{index}: entry {entry} names the file {_brief(fname)}, which is refused: only a plain file name "
                f"inside {index.parent} is read; re-download the index")
    if not key.isprintable():
        return f"{index}: entry {entry} is not a tensor name (control characters); re-download it"
    return None


def _dit_headers(shards: dict[Path, list[str] | None]
                 ) -> tuple[dict[str, TensorMeta], dict[str, Path], list[str], list[Path]]:
    """Metadata of every tensor in the readable shards, where each lives, problems (unreadable or
    truncated shards, index inconsistencies), and the shards that are missing or unreadable."""
    metas: dict[str, TensorMeta] = {}
    where: dict[str, Path] = {}
    problems, lost = [], []
    for path, keys in shards.items():
        if not path.is_file():
            lost.append(path)
            continue
        try:
            header = read_safetensors_header(path)
        except UserError as exc:
            problems.append(str(exc))
            lost.append(path)
            continue
        if keys is not None:
            problems += [f"tensor {k} is listed in the index for {path.name} but is not in that file"
                         for k in keys if k not in header]
            problems += [f"tensor {k} in {path.name} is not listed in the index"
                         for k in header if k not in keys]
        for k, m in header.items():
            if keys is None or k in keys:
                metas[k], where[k] = m, path
    return metas, where, problems, lost


# ---------------------------------------------------------------------------------------------
# Loading


def _place(t: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinite value in `t`; always true for integer tensors.

    One reduction pass without temporaries the size of `t`: min and max propagate NaN and are
    infinite when any value is (`isfinite(t).all()` would allocate a mask, and freed masks stay in
    the host allocator, which shows as resident memory while a checkpoint loads)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dtype.itemsize == 1:  # float8: no min/max or isfinite kernels for every format
        t = t.to(torch.bfloat16)
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _nonfinite_text(t: torch.Tensor) -> str:
    t = t.to(torch.bfloat16) if t.dtype.itemsize == 1 else t
    return f"{int(torch.isnan(t).sum())} NaN and {int(torch.isinf(t).sum())} infinite values"


def _check_finite(placed: torch.Tensor, read: torch.Tensor, where: str) -> None:
    """A UserError naming `where` unless the tensor as placed is finite; `read` (the tensor as read
    from the file) tells a damaged file from values that overflow the target dtype."""
    if _all_finite(placed):
        return
    if _all_finite(read):
        raise UserError(f"{where} has values too large for {_dtype_name(placed.dtype)}; load the weights in "
                        f"bfloat16")
    raise UserError(f"{where} holds {_nonfinite_text(read)}; re-download it")


def _finish(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> nn.Module:
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as exc:
        raise UserError(f"{what} does not fit the model: {' '.join(str(exc).split())[:300]}") from exc
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{type(model).__name__} keeps tensors outside its state dict on meta: "
                           f"{left[:_SHOW]}")
    return model.eval().requires_grad_(False)


def _library_failure(exc: BaseException) -> bool:
    """An error of a reader library on a damaged file: any Exception, or a Rust panic (pyo3's
    PanicException derives from BaseException); not KeyboardInterrupt, SystemExit or GeneratorExit."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def _st_tensors(path: Path, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of `keys` in a safetensors file, memory-mapped; a failure of the reader (the
    header was checked first, so only a file changed or damaged since) is a UserError."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for k in keys:
                yield k, f.get_tensor(k)
    except BaseException as exc:
        if not _library_failure(exc):
            raise
        raise UserError(f"{path} cannot be read as safetensors ({_reason(exc)}); re-download it") from None


def _read_safetensors(files: dict[Path, list[str]], metas: dict[str, TensorMeta], dtype: torch.dtype,
                      device: torch.device | str) -> dict[str, torch.Tensor]:
    """Tensors of `files` cast to `dtype` on `device`, one at a time, each checked for NaN and
    infinite values once placed (one pass over a tensor already in memory).

    Tensors that need no cast and stay on the CPU are zero-copy views of the file mapping. Otherwise
    the file is re-opened every `_MAP_CHUNK_BYTES`, so that the pages read for the cast or copy are
    unmapped soon after and host memory holds the result plus one chunk at most."""
    zero_copy = torch.device(device).type == "cpu" and all(
        m.dtype == dtype or not m.dtype.is_floating_point for m in metas.values())
    budget = math.inf if zero_copy else _MAP_CHUNK_BYTES
    sd = {}
    for path, keys in files.items():
        chunks, cur, size = [], [], 0
        for k in keys:
            if cur and size + metas[k].nbytes > budget:
                chunks.append(cur)
                cur, size = [], 0
            cur.append(k)
            size += metas[k].nbytes
        chunks.append(cur)
        for chunk in chunks:
            for k, t in _st_tensors(path, chunk):
                sd[k] = _place(t, dtype, device)
                _check_finite(sd[k], t, f"{path}: tensor {k}")
    return sd


def _checked_dit_files(root: Path, model: nn.Module) -> tuple[dict[Path, list[str]], dict[str, TensorMeta]]:
    """(shard -> its tensors, metadata) of the DiT in `root` after checking the index and every
    header against `model` (on meta); a UserError names the first problems."""
    shards, _, problems = _dit_layout(root)
    if problems:
        raise UserError(f"DiT weights in {root} are incomplete: {_summarize(problems)}")
    metas, where, problems, _ = _dit_headers(shards)
    if problems:  # the tensors of an unreadable shard would all be reported missing: name the shard only
        raise UserError(f"DiT weights in {root} are damaged: {_summarize(problems)}")
    problems = _compare(state_shapes(model), metas) + _dtype_problems(metas)
    if problems:
        raise UserError(f"DiT weights in {root} do not match the model: {_summarize(problems)}; "
                        f"check --ckpt_dir and --preset")
    files: dict[Path, list[str]] = {}
    for k, p in where.items():
        files.setdefault(p, []).append(k)
    return files, metas


def load_dit(ckpt_dir: str | Path, cfg: DiTConfig, dtype: torch.dtype, device: torch.device | str = "cpu",
             lora_path: str | Path | None = None, lora_rank: int = 128, lora_alpha: float = 64.0,
             lora_target_modules: Sequence[str] = LORA_TARGETS):
    """The DiT of `ckpt_dir` in `dtype` on `device`, optionally with the LoRA merged in.

    config.json, the index, every shard header and the LoRA (also its values) are checked against the
    model built on meta before any weight is read; each weight is checked for NaN and infinite values
    as it is loaded, and again after the merge. On the CPU with the file dtype the weights stay
    memory-mapped."""
    from liveavatar.models.dit import CausalS2VDiT

    root = ckpt_paths(ckpt_dir).root
    cfg = read_dit_config(root, cfg)
    model = on_meta(CausalS2VDiT, cfg)
    files, metas = _checked_dit_files(root, model)
    lora, source = None, None
    if lora_path is not None:  # fail on a bad LoRA before reading 32 GB
        source = f"the LoRA {resolve_lora_path(lora_path)}"
        lora = check_lora(model, load_lora(lora_path), lora_rank, lora_target_modules, source=source)
    sd = _read_safetensors(files, metas, dtype, device)
    model = _finish(model, sd, f"DiT weights in {root}")
    if lora is not None:
        _merge_checked(model, lora, lora_alpha / lora_rank, lora_target_modules, source)
    return model


def _load_pth(path: Path, model: nn.Module, dtype: torch.dtype, device: torch.device | str,
              what: str) -> nn.Module:
    """A `torch.save` state dict into `model` (on meta) through one read-only file mapping: tensors in
    the target dtype on the CPU stay mapped; others are cast or moved one at a time. Pages already read
    stay in the page cache (reclaimable, but counted in RSS) until the last tensor is placed."""
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist; check --ckpt_dir")
    metas = read_pth_metadata(path)
    problems = _compare(state_shapes(model), metas) + _dtype_problems(metas)
    if problems:
        raise UserError(f"{what} file {path} does not match the model: {_summarize(problems)}; "
                        f"check --ckpt_dir and --preset")
    loaded = _mmap_pth(path)
    sd = {}
    for k in list(loaded):
        sd[k] = _place(loaded.pop(k), dtype, device)  # drop the mapped tensor as soon as it is placed
    return _finish(model, sd, f"{what} file {path}")


def _mmap_pth(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a `torch.save` zip already checked by `read_pth_metadata`, memory-mapped."""
    try:
        return torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as exc:  # only a file changed or damaged since its check; torch's text is not shown
        raise UserError(f"{path} cannot be opened as a torch checkpoint, it is probably truncated or corrupt "
                        f"({type(exc).__name__}); re-download it") from None


def _file_in(path: str | Path, name: str) -> Path:
    path = Path(path)
    return path / name if path.is_dir() else path


def load_t5(path: str | Path, cfg: T5Config, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """umT5 encoder from `models_t5_umt5-xxl-enc-bf16.pth` (or the checkpoint folder holding it)."""
    from liveavatar.models.t5 import T5Encoder

    return _load_pth(_file_in(path, T5_FILE), on_meta(T5Encoder, cfg), dtype, device, "T5 encoder")


def load_vae(path: str | Path, cfg: VAEConfig, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """Wan2.1 VAE from `Wan2.1_VAE.pth` (or the checkpoint folder holding it)."""
    from liveavatar.models.vae import WanVAE

    return _load_pth(_file_in(path, VAE_FILE), on_meta(WanVAE, cfg), dtype, device, "VAE")


# ---------------------------------------------------------------------------------------------
# LoRA (peft naming: [base_model.model.]<module>.lora_{A,B}[.default].weight)

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


def lora_key(module: str, ab: str) -> str:
    """The canonical (official file) name of a LoRA tensor."""
    return f"{LORA_PREFIX}{module}.lora_{ab}.default.weight"


def resolve_lora_path(path: str | Path) -> Path:
    """A local LoRA file: the path itself, `<dir>/liveavatar.safetensors`, or for the repo id
    `Quark-Vision/Live-Avatar` a copy already downloaded under ckpt/LiveAvatar (local-dir or cache
    layout) or in the default Hugging Face cache. Nothing is downloaded."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir() and (p / LORA_FILE).is_file():
        return p / LORA_FILE
    text = str(path)
    if "/" in text and not text.startswith(("/", ".")) and not p.exists():
        local = Path("ckpt/LiveAvatar") / LORA_FILE
        if local.is_file():
            return local
        try:
            from huggingface_hub import try_to_load_from_cache

            for cache_dir in ("ckpt/LiveAvatar", None):
                hit = try_to_load_from_cache(text, LORA_FILE, cache_dir=cache_dir)
                if isinstance(hit, str):
                    return Path(hit)
        except Exception:  # a missing or old huggingface_hub just means no cached copy
            pass
    raise UserError(f"LoRA {text} not found; download it with `huggingface-cli download {LORA_REPO} "
                    f"--local-dir ckpt/LiveAvatar` and pass --lora_path ckpt/LiveAvatar/{LORA_FILE}")


def _file_metas(path: Path) -> dict[str, TensorMeta]:
    return read_safetensors_header(path) if path.suffix == ".safetensors" else read_pth_metadata(path)


def _canonical_lora_keys(keys: Iterable[str], where: str) -> dict[str, str]:
    """file key -> canonical key; foreign or duplicate keys raise a UserError naming them."""
    out, foreign, seen = {}, [], {}
    for k in keys:
        m = _LORA_KEY.match(k)
        if m is None:
            foreign.append(k)
            continue
        canon = lora_key(m["module"], m["ab"])
        if canon in seen:
            raise UserError(f"{where} holds both {seen[canon]} and {k} for the same LoRA tensor; keep one")
        seen[canon] = k
        out[k] = canon
    if foreign:
        raise UserError(f"{where} holds {len(foreign)} key(s) that are not peft LoRA weights "
                        f"(<module>.lora_A/B[.default].weight), e.g. {', '.join(foreign[:_SHOW])}; "
                        f"pass the Live Avatar LoRA file")
    return out


def load_lora(path: str | Path) -> dict[str, torch.Tensor]:
    """LoRA tensors keyed `base_model.model.<module>.lora_{A,B}.default.weight` (whatever the file's
    prefix), in the file's dtype; safetensors are memory-mapped, other files go through torch.load."""
    p = resolve_lora_path(path)
    if p.suffix == ".safetensors":
        raw = dict(_st_tensors(p, read_safetensors_header(p)))  # format errors as one-line UserErrors first
    else:
        read_pth_metadata(p)
        raw = _mmap_pth(p)
    names = _canonical_lora_keys(raw, f"LoRA file {p}")
    return {names[k]: t for k, t in raw.items()}


def lora_targets(model: nn.Module, targets: Sequence[str] = LORA_TARGETS
                 ) -> dict[str, nn.Linear]:
    """The nn.Linear modules peft adapts: name == t or name ends with "." + t, for any target t."""
    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)}


def expected_lora_tensors(model: nn.Module, rank: int,
                          targets: Sequence[str] = LORA_TARGETS
                          ) -> dict[str, tuple[int, ...]]:
    """Canonical LoRA tensor name -> shape (A: [rank, in], B: [out, rank]) for the model's targets."""
    out = {}
    for name, lin in lora_targets(model, targets).items():
        out[lora_key(name, "A")] = (rank, lin.in_features)
        out[lora_key(name, "B")] = (lin.out_features, rank)
    return out


def _lora_problems(found: dict[str, TensorMeta], model: nn.Module, rank: int, targets: Sequence[str]
                   ) -> list[str]:
    """Problems naming the LoRA's keys that match no target, targets without A/B, and shape mismatches
    (with the rank the tensor has when only the rank differs).

    `found` is keyed canonically (see `lora_key`)."""
    expected = expected_lora_tensors(model, rank, targets)
    problems = [f"LoRA tensor {k} matches no target module" for k in found if k not in expected]
    for name in lora_targets(model, targets):
        absent = [ab for ab in "AB" if lora_key(name, ab) not in found]
        if absent:
            problems.append(f"target {name} has no lora_{'/'.join(absent)}")
    problems += [_lora_shape_problem(k, found[k].shape, s)
                 for k, s in expected.items() if k in found and tuple(found[k].shape) != tuple(s)]
    return problems


def _lora_shape_problem(key: str, shape: tuple[int, ...], want: tuple[int, ...]) -> str:
    text = f"LoRA tensor {key} has shape {_shape(shape)}, expected {_shape(want)}"
    axis = 0 if ".lora_A." in key else 1  # A: [rank, in], B: [out, rank]
    if len(shape) == 2 and shape[1 - axis] == want[1 - axis]:
        text += f" (rank {shape[axis]} instead of {want[axis]})"
    return text


def check_lora(model: nn.Module, lora_sd: dict[str, torch.Tensor], rank: int,
               targets: Sequence[str] = LORA_TARGETS, source: str = "the LoRA") -> dict[str, torch.Tensor]:
    """The LoRA keyed canonically, after checking it against the model (which may be on meta): every
    key must belong to a target, every target must have A and B, every shape must match, every tensor
    must be floating point with finite values (one pass over each); otherwise a UserError names the
    first mismatches, or the tensor holding NaN or infinite values. `source` names it in messages."""
    names = _canonical_lora_keys(lora_sd, "the LoRA state dict")
    lora = {names[k]: t for k, t in lora_sd.items()}
    metas = {k: TensorMeta(tuple(t.shape), t.dtype) for k, t in lora.items()}
    problems = _lora_problems(metas, model, rank, targets) + _dtype_problems(metas)
    if problems:
        raise UserError(f"{source} does not fit this DiT (rank {rank}): {_summarize(problems)}; "
                        f"pass the Live Avatar LoRA and the matching --preset")
    for k, t in lora.items():
        if not _all_finite(t):
            raise UserError(f"{source}: tensor {k} holds {_nonfinite_text(t)}; re-download the LoRA")
    return lora


@torch.no_grad()
def merge_lora(model: nn.Module, lora_sd: dict[str, torch.Tensor], alpha: float, rank: int,
               targets: Sequence[str] = LORA_TARGETS) -> int:
    """Merge W <- W + (alpha / rank) * B @ A into every target Linear, in float32, one layer at a time
    on the weight's device, rounded once to the weight dtype. Keys may carry the `base_model.model.`
    prefix or not; a LoRA that does not fit or holds NaN/Inf (see `check_lora`) raises before anything
    is merged; a merged weight that is not finite raises naming it (earlier layers stay merged).
    Returns the number of merged layers."""
    lora = check_lora(model, lora_sd, rank, targets)
    return _merge_checked(model, lora, alpha / rank, targets, "the LoRA")


@torch.no_grad()
def _merge_checked(model: nn.Module, lora: dict[str, torch.Tensor], scale: float, targets: Sequence[str],
                   source: str) -> int:
    """The merge of a LoRA already passed through `check_lora`; each merged weight is checked for NaN
    and infinite values (one pass over it) before it replaces the old one."""
    linears = lora_targets(model, targets)
    for name, lin in linears.items():
        w = lin.weight
        a = lora[lora_key(name, "A")].to(device=w.device, dtype=torch.float32)  # [r, in]
        b = lora[lora_key(name, "B")].to(device=w.device, dtype=torch.float32)  # [out, r]
        merged = (w.float() + scale * (b @ a)).to(w.dtype)
        if not _all_finite(merged):
            cause = "it held them before" if not _all_finite(w) else f"the sum overflows {_dtype_name(w.dtype)}"
            raise UserError(f"DiT weight {name}.weight holds NaN or infinite values after merging {source} "
                            f"({cause}); pass the Live Avatar LoRA of this checkpoint and re-download both")
        w.copy_(merged)
    return len(linears)


# ---------------------------------------------------------------------------------------------
# wav2vec2 (Hugging Face folder)

_W2V_HEADS = ("lm_head.", "quantizer.", "project_q.", "project_hid.")  # heads the encoder does not use
_W2V_UNUSED = ("masked_spec_embed",)  # training-time SpecAugment vector; optional in checkpoints
_W2V_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_W2V_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# transformers' Wav2Vec2Config defaults, for fields a config.json leaves out
_W2V_DEFAULTS = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "conv_dim": [512] * 7, "conv_kernel": [10, 3, 3, 3, 3, 2, 2], "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16, "conv_bias": False,
    "layer_norm_eps": 1e-5, "do_stable_layer_norm": False, "feat_extract_norm": "group", "hidden_act": "gelu",
    "feat_extract_activation": "gelu", "add_adapter": False, "adapter_attn_dim": None, "model_type": "wav2vec2",
}
# the layout this engine implements (wav2vec2-large-xlsr-53's)
_W2V_LAYOUT = {"model_type": "wav2vec2", "do_stable_layer_norm": True, "feat_extract_norm": "layer",
               "hidden_act": "gelu", "feat_extract_activation": "gelu", "add_adapter": False,
               "adapter_attn_dim": None}


def _w2v_key(k: str) -> str:
    """Wav2Vec2Model key of a checkpoint key: no `wav2vec2.` prefix, old weight-norm names mapped."""
    k = k.removeprefix("wav2vec2.")
    return k.replace(".weight_g", ".parametrizations.weight.original0").replace(
        ".weight_v", ".parametrizations.weight.original1")


def _w2v_used(k: str) -> bool:
    return not k.startswith(_W2V_HEADS) and _w2v_key(k) not in _W2V_UNUSED


def read_wav2vec2_config(path: str | Path) -> AudioConfig:
    """The AudioConfig of a wav2vec2 folder's config.json (transformers' defaults for fields it leaves
    out); a UserError if it cannot be read or describes a layout this engine does not run."""
    path = Path(path)
    raw = _read_json_file(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path} holds a JSON {_json_type(raw)}, not an object of model settings; re-download it")
    return wav2vec2_config_from(raw, path)


def wav2vec2_config_from(raw: dict, path: Path) -> AudioConfig:
    """The AudioConfig of the settings `raw` read from the config.json at `path` (see
    `read_wav2vec2_config`)."""
    conf = _W2V_DEFAULTS | raw
    for name, want in _W2V_LAYOUT.items():
        if conf[name] != want:
            raise UserError(f"{path} sets {name}={_brief(conf[name])}; this engine runs the wav2vec2 layout of "
                            f"wav2vec2-large-xlsr-53-english ({name}={want!r}), use that checkpoint")

    def positive_int(name: str, v: object) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"{path} sets {name}={_brief(v)}, which is not a positive integer; re-download it")
        return v

    ints = {n: positive_int(n, conf[n]) for n in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                   "intermediate_size", "num_conv_pos_embeddings",
                                                   "num_conv_pos_embedding_groups")}
    lists = {}
    for n in ("conv_dim", "conv_kernel", "conv_stride"):
        if not isinstance(conf[n], list) or not conf[n]:
            raise UserError(f"{path} sets {n}={_brief(conf[n])}, which is not a list of integers; re-download it")
        lists[n] = tuple(positive_int(n, v) for v in conf[n])
    if len({len(v) for v in lists.values()}) != 1:
        raise UserError(f"{path} sets conv_dim, conv_kernel and conv_stride of different lengths "
                        f"({', '.join(str(len(v)) for v in lists.values())}); re-download it")
    eps = conf["layer_norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < 1:
        raise UserError(f"{path} sets layer_norm_eps={_brief(eps)}, which is not a small positive number; "
                        f"re-download it")
    if not isinstance(conf["conv_bias"], bool):
        raise UserError(f"{path} sets conv_bias={_brief(conf['conv_bias'])}, which is not true or false; "
                        f"re-download it")
    for a, b in (("hidden_size", "num_attention_heads"), ("hidden_size", "num_conv_pos_embedding_groups")):
        if ints[a] % ints[b]:
            raise UserError(f"{path} sets {a}={ints[a]}, not a multiple of {b}={ints[b]}; re-download it")
    return AudioConfig(**ints, **lists, conv_bias=conf["conv_bias"], layer_norm_eps=float(eps))


def _read_preprocessor(path: Path) -> bool:
    """do_normalize of a wav2vec2 folder's preprocessor_config.json, after checking that it feeds
    16 kHz mono samples."""
    raw = _read_json_file(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path} holds a JSON {_json_type(raw)}, not an object of settings; re-download it")
    rate = raw.get("sampling_rate", 16000)
    if rate != 16000:
        raise UserError(f"wav2vec2 folder {path.parent} expects {_brief(rate)} Hz audio; this engine feeds "
                        f"16000 Hz, use a 16 kHz wav2vec2 checkpoint")
    if raw.get("feature_size", 1) != 1:
        raise UserError(f"{path} sets feature_size={_brief(raw['feature_size'])}; wav2vec2 here takes raw "
                        f"mono samples (feature_size 1), use the checkpoint's own folder")
    norm = raw.get("do_normalize", True)
    if not isinstance(norm, bool):
        raise UserError(f"{path} sets do_normalize={_brief(norm)}, which is not true or false; re-download it")
    return norm


def wav2vec2_weight_files(folder: str | Path) -> tuple[dict[Path, list[str]], dict[str, TensorMeta], list[str]]:
    """(file -> its tensors, checkpoint key -> metadata, problems) of the weights in a wav2vec2 folder:
    one model.safetensors or pytorch_model.bin, or the shards an index of either lists; only headers
    are read."""
    folder = Path(folder)
    single = [folder / n for n in _W2V_WEIGHTS if (folder / n).is_file()]
    indexes = [folder / n for n in _W2V_INDEXES if (folder / n).is_file()]
    weight_map = None
    if single:
        paths = [single[0]]
    elif indexes:
        weight_map, problems = _read_index(indexes[0])
        if problems:
            return {}, {}, problems
        # only the shards holding tensors the encoder uses are needed (not a CTC or pre-training head's)
        paths = [folder / f for f in sorted({f for k, f in weight_map.items() if _w2v_used(k)})]
        absent = [p.name for p in paths if not p.is_file()]
        if absent:
            return {}, {}, [f"{indexes[0]} lists {', '.join(absent[:_SHOW])}, missing from {folder}; re-download it"]
    else:
        return {}, {}, [f"no wav2vec2 weights in {folder}: expected {' or '.join(_W2V_WEIGHTS)} "
                        f"(or a sharded index of either)"]
    files, metas, problems, home = {}, {}, [], {}
    for p in paths:
        try:
            found = _file_metas(p)
        except UserError as exc:
            problems.append(str(exc))
            continue
        files[p] = list(found)
        for k in found:
            canonical = _w2v_key(k) if _w2v_used(k) else k
            if canonical in home:
                problems.append(f"tensor {k} in {p.name} is also in {home[canonical]} (as {canonical})")
            home[canonical] = f"{p.name} ({k})" if canonical != k else p.name
            if weight_map is not None and weight_map.get(k, p.name) != p.name:
                problems.append(f"tensor {k} in {p.name} is listed in the index for {weight_map[k]}")
        metas |= found
    if weight_map is not None:
        problems += [f"{k} is listed in the index for {f} but is not in it"
                     for k, f in weight_map.items() if folder / f in files and k not in metas]
    return files, metas, problems


def load_wav2vec2(folder: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """(the `Wav2Vec2` of a Hugging Face wav2vec2 folder, whether its audio is normalised): config,
    preprocessor settings and every tensor header checked before any weight is read; each tensor
    cast to `dtype` and checked for NaN and infinite values. Problems are one-line UserErrors."""
    from liveavatar.models.wav2vec2 import Wav2Vec2

    folder = Path(folder)
    expected = ("config.json, preprocessor_config.json and the model weights "
                "(model.safetensors or pytorch_model.bin), as in <checkpoint>/wav2vec2-large-xlsr-53-english")
    if not folder.is_dir():
        raise UserError(f"wav2vec2 folder {folder} does not exist; it must hold {expected}")
    absent = [f for f in ("config.json", "preprocessor_config.json") if not (folder / f).is_file()]
    if not any((folder / f).is_file() for f in _W2V_WEIGHTS + _W2V_INDEXES):
        absent.append("model weights")
    if absent:
        raise UserError(f"wav2vec2 folder {folder} lacks {', '.join(absent)}; it must hold {expected}")
    cfg = read_wav2vec2_config(folder / "config.json")
    do_normalize = _read_preprocessor(folder / "preprocessor_config.json")
    files, metas, problems = wav2vec2_weight_files(folder)
    if problems:
        raise UserError(f"wav2vec2 weights in {folder} cannot be read: {_summarize(problems)}")
    model = on_meta(Wav2Vec2, cfg)
    want = state_shapes(model)
    found = {_w2v_key(k): m for k, m in metas.items() if _w2v_used(k)}
    missing = sorted(set(want) - set(found))
    unused = sorted(set(found) - set(want))
    misshaped = sorted(f"{k} {_shape(found[k].shape)} (expected {_shape(want[k])})"
                       for k in set(want) & set(found) if tuple(found[k].shape) != tuple(want[k]))
    bad = missing + unused + misshaped
    if bad:
        raise UserError(f"wav2vec2 weights in {folder} do not match its config.json ({len(missing)} missing, "
                        f"{len(unused)} unused, {len(misshaped)} mis-shaped; first: {bad[0]}); "
                        f"re-download the folder")
    problems = _dtype_problems({k: m for k, m in metas.items() if _w2v_used(k)})
    if problems:
        raise UserError(f"wav2vec2 weights in {folder}: {_summarize(problems)}; re-download the folder")
    sd = {}
    for path, keys in files.items():
        keys = [k for k in keys if _w2v_used(k)]
        if path.suffix == ".safetensors":
            read = _read_safetensors({path: keys}, metas, dtype, device)
        else:
            mapped = _mmap_pth(path)
            read = {}
            for k in keys:
                t = mapped.pop(k)
                read[k] = _place(t, dtype, device)
                _check_finite(read[k], t, f"{path}: tensor {k}")
            del mapped
        sd |= {_w2v_key(k): t for k, t in read.items()}
    return _finish(model, sd, f"wav2vec2 weights in {folder}"), do_normalize


__all__ = [
    "AUDIO_DIR", "COMPONENTS", "CkptPaths", "DIT_CONFIG", "DIT_INDEX", "DIT_SHARD_RE", "DIT_SINGLE",
    "FILE_DTYPES", "LORA_FILE", "LORA_PREFIX", "LORA_REPO", "LORA_TARGETS", "T5_FILE", "TOKENIZER_DIR",
    "TensorMeta", "VAE_FILE", "check_lora", "ckpt_paths", "dit_shard_name", "expected_lora_tensors",
    "load_dit", "load_lora", "load_t5", "load_vae", "load_wav2vec2", "lora_key", "lora_targets", "merge_lora",
    "read_dit_config", "read_pth_metadata", "read_safetensors_header", "read_wav2vec2_config",
    "resolve_lora_path", "wav2vec2_config_from", "wav2vec2_weight_files",
]
