"""Checkpoint files: layout, key handling, lazy loading, the LoRA merge, header-only verification.

Everything that touches the official weight files lives here. `Wan2.2-S2V-14B/` holds the DiT
(`config.json` + sharded safetensors with an index), the umT5 encoder and the Wan2.1 VAE as
`torch.save` zips (`.pth`), the umT5 tokenizer folder and the wav2vec2 folder; the Live Avatar LoRA
is one peft safetensors file. Models are built on the meta device and filled tensor by tensor
(`safe_open` / `torch.load(mmap=True)`, cast per tensor, `load_state_dict(assign=True)`), so host
memory never holds a second copy of the weights. Module names equal checkpoint keys, so the only key
mapping is the LoRA's peft naming. `verify_checkpoint` checks a checkpoint from file headers, the
index and zip directories alone (no weights read), against the same meta-built models the loaders
use, and `inspect_preset` reports parameter counts and sizes from those models.
"""

from __future__ import annotations

import json
import math
import re
import struct
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn

from liveavatar.config import AudioConfig, DiTConfig, Preset, T5Config, VAEConfig, get_preset
from liveavatar.errors import UserError

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
_ST_MAX_HEADER = 100 << 20  # larger "headers" mean the file is not safetensors
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
    if not root.is_dir():
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


def _expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _dtype_notes(found: dict[str, TensorMeta], want: torch.dtype, what: str) -> tuple[list[str], list[str]]:
    """(problems, notes): non-float tensors are problems; other float dtypes than the official one, notes."""
    problems = [f"tensor {k} has dtype {_dtype_name(m.dtype)}, expected a floating dtype"
                for k, m in found.items() if not m.dtype.is_floating_point]
    other = sorted({_dtype_name(m.dtype) for m in found.values()
                    if m.dtype.is_floating_point and m.dtype != want})
    notes = [f"{what} stores {'/'.join(other)} tensors (official file: {_dtype_name(want)}); they are cast "
             f"when loaded"] if other else []
    return problems, notes


# ---------------------------------------------------------------------------------------------
# File headers: safetensors and torch.save zips


def read_safetensors_header(path: str | Path) -> dict[str, TensorMeta]:
    """Tensor metadata of a safetensors file from its header (8-byte little-endian length + JSON).

    Raises UserError if the file is not safetensors, or is shorter than its header says (truncated)."""
    path = Path(path)
    size = path.stat().st_size
    redownload = "re-download it"
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise UserError(f"{path} is truncated ({size} bytes, no safetensors header); {redownload}")
        n = struct.unpack("<Q", raw)[0]
        if n > _ST_MAX_HEADER:
            raise UserError(f"{path} is not a safetensors file (header length {n}); {redownload}")
        if 8 + n > size:
            raise UserError(f"{path} is truncated ({size} bytes, header needs {8 + n}); {redownload}")
        try:
            header = json.loads(fh.read(n))
        except ValueError as exc:
            raise UserError(f"{path} has an unreadable safetensors header ({exc}); {redownload}") from exc
    header.pop("__metadata__", None)
    metas, end = {}, 0
    for name, entry in header.items():
        dtype = _ST_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise UserError(f"{path}: tensor {name} has unsupported dtype {entry.get('dtype')!r}; "
                            f"{redownload}")
        meta = TensorMeta(tuple(int(d) for d in entry["shape"]), dtype)
        start, stop = (int(o) for o in entry["data_offsets"])
        if stop - start != meta.nbytes:
            raise UserError(f"{path}: tensor {name} spans {stop - start} bytes but {_shape(meta.shape)} "
                            f"{_dtype_name(dtype)} needs {meta.nbytes}; {redownload}")
        metas[name] = meta
        end = max(end, stop)
    if 8 + n + end > size:
        raise UserError(f"{path} is truncated: {size} bytes on disk, its header describes {8 + n + end}; "
                        f"{redownload}")
    return metas


def read_pth_metadata(path: str | Path) -> dict[str, TensorMeta]:
    """Tensor metadata of a `torch.save` zip without reading tensor data.

    The pickle is loaded onto the meta device; each storage's record in the zip must be stored
    uncompressed, have exactly the storage's byte size and lie inside the file. A truncated file
    (the zip directory sits at its end) fails to open and is reported as such."""
    path = Path(path)
    redownload = "re-download it"
    try:
        sd = torch.load(path, map_location="meta", weights_only=True)
    except Exception as exc:  # torch reports a bad zip with RuntimeError, a bad pickle with others
        reason = " ".join(str(exc).split())[:160]
        raise UserError(f"{path} cannot be opened as a torch checkpoint, it is probably truncated or "
                        f"corrupt ({type(exc).__name__}: {reason}); {redownload}") from exc
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} does not hold a state dict (name -> tensor); {redownload}")
    size = path.stat().st_size
    records = _zip_data_records(path)
    for name, t in sd.items():
        storage = t.untyped_storage()
        offset = getattr(storage, "_checkpoint_offset", None)
        rec = records.get(offset)
        if rec is None:
            raise UserError(f"{path}: the data record of tensor {name} is missing from the zip; {redownload}")
        rec_size, compressed = rec
        if compressed or rec_size != storage.nbytes() or offset + rec_size > size:
            raise UserError(f"{path}: the data record of tensor {name} is damaged ({rec_size} bytes stored, "
                            f"{storage.nbytes()} expected); {redownload}")
    return {k: TensorMeta(tuple(t.shape), t.dtype) for k, t in sd.items()}


def _zip_data_records(path: Path) -> dict[int, tuple[int, bool]]:
    """Data offset -> (stored size, compressed) for every `<archive>/data/<key>` record of a torch zip."""
    out = {}
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
    return out


# ---------------------------------------------------------------------------------------------
# DiT config and file layout


def dit_config_json(cfg: DiTConfig) -> dict:
    """config.json as the official folder has it (diffusers `WanModel_S2V` kwargs) for `cfg`."""
    out = {"_class_name": "WanModel_S2V"}
    for name in _DIT_CONFIG_FIELDS:
        value = getattr(cfg, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    out.update(_DIT_CONFIG_FIXED)
    return out


def read_dit_config(ckpt_dir: str | Path, expected: DiTConfig | None = None) -> DiTConfig:
    """DiTConfig from `<ckpt_dir>/config.json`, checked field by field against the preset's config."""
    expected = DiTConfig() if expected is None else expected
    path = Path(ckpt_dir) / DIT_CONFIG
    if not path.is_file():
        raise UserError(f"{path} does not exist; --ckpt_dir must point at the Wan2.2-S2V-14B folder")
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); re-download it") from exc
    values, diffs = {}, []
    for name in _DIT_CONFIG_FIELDS:
        if name not in raw:
            continue
        want = getattr(expected, name)
        got = tuple(raw[name]) if isinstance(want, tuple) else raw[name]
        if got != want:
            diffs.append(f"{name}={raw[name]!r} (preset: {want!r})")
        values[name] = got
    if diffs:
        raise UserError(f"{path} does not match the preset: {', '.join(diffs)}; "
                        f"pass the --preset that matches this checkpoint")
    for name, want in _DIT_CONFIG_FIXED.items():
        if name in raw and raw[name] != want:
            raise UserError(f"{path} sets {name}={raw[name]!r}, but only {want!r} (the Wan2.2-S2V-14B model) "
                            f"is implemented; use the Wan2.2-S2V-14B checkpoint")
    return replace(expected, **values)


def _dit_layout(root: Path) -> tuple[dict[Path, list[str] | None], list[str], list[str]]:
    """(shard -> keys the index places there (None: read the header), files used, problems)."""
    index, single = root / DIT_INDEX, root / DIT_SINGLE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            return {}, [DIT_INDEX], [f"{index} is not a safetensors index ({exc!r}); re-download it"]
        shards: dict[Path, list[str]] = {}
        for key, fname in weight_map.items():
            shards.setdefault(root / fname, []).append(key)
        problems = [f"missing shard {p.name} (the index places {len(keys)} tensors there, e.g. {keys[0]})"
                    for p, keys in shards.items() if not p.is_file()]
        files = [DIT_INDEX] + sorted(p.name for p in shards)
        return {p: k for p, k in sorted(shards.items())}, files, problems
    if single.is_file():
        return {single: None}, [DIT_SINGLE], []
    return {}, [], [f"no DiT weights in {root}: expected {DIT_INDEX} with its shards, or {DIT_SINGLE}"]


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


def _build_on_meta(cls, cfg):
    with torch.device("meta"):
        return cls(cfg)


def _place(t: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


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


def _read_safetensors(files: dict[Path, list[str]], metas: dict[str, TensorMeta], dtype: torch.dtype,
                      device: torch.device | str) -> dict[str, torch.Tensor]:
    """Tensors of `files` cast to `dtype` on `device`, one at a time.

    Tensors that need no cast and stay on the CPU are zero-copy views of the file mapping. Otherwise
    the file is re-opened every `_MAP_CHUNK_BYTES`, so that the pages read for the cast or copy are
    unmapped soon after and host memory holds the result plus one chunk at most."""
    zero_copy = torch.device(device).type == "cpu" and all(
        m.dtype == dtype or not m.dtype.is_floating_point for m in metas.values())
    budget = math.inf if zero_copy else _MAP_CHUNK_BYTES
    from safetensors import safe_open

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
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for k in chunk:
                    sd[k] = _place(f.get_tensor(k), dtype, device)
    return sd


def load_dit(ckpt_dir: str | Path, cfg: DiTConfig, dtype: torch.dtype, device: torch.device | str = "cpu",
             lora_path: str | Path | None = None, lora_rank: int = 128, lora_alpha: float = 64.0,
             lora_target_modules: Sequence[str] = LORA_TARGETS):
    """The DiT of `ckpt_dir` in `dtype` on `device`, optionally with the LoRA merged in.

    config.json, the index, every shard header and the LoRA are checked against the model built on
    meta before any weight is read. On the CPU with the file dtype the weights stay memory-mapped."""
    from liveavatar.dit import CausalS2VDiT

    root = ckpt_paths(ckpt_dir).root
    cfg = read_dit_config(root, cfg)
    shards, _, problems = _dit_layout(root)
    if problems:
        raise UserError(f"DiT weights in {root} are incomplete: {_summarize(problems)}")
    metas, where, problems, _ = _dit_headers(shards)
    model = _build_on_meta(CausalS2VDiT, cfg)
    problems += _compare(_expected_shapes(model), metas)
    if problems:
        raise UserError(f"DiT weights in {root} do not match the model: {_summarize(problems)}; "
                        f"check --ckpt_dir and --preset")
    lora = None
    if lora_path is not None:  # fail on a bad LoRA before reading 32 GB
        lora = check_lora(model, load_lora(lora_path), lora_rank, lora_target_modules)
    files: dict[Path, list[str]] = {}
    for k, p in where.items():
        files.setdefault(p, []).append(k)
    sd = _read_safetensors(files, metas, dtype, device)
    model = _finish(model, sd, f"DiT weights in {root}")
    if lora is not None:
        merge_lora(model, lora, lora_alpha, lora_rank, lora_target_modules)
    return model


def _load_pth(path: Path, model: nn.Module, dtype: torch.dtype, device: torch.device | str,
              what: str) -> nn.Module:
    """A `torch.save` state dict into `model` (on meta) through one read-only file mapping: tensors in
    the target dtype on the CPU stay mapped; others are cast or moved one at a time. Pages already read
    stay in the page cache (reclaimable, but counted in RSS) until the last tensor is placed."""
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist; check --ckpt_dir")
    metas = read_pth_metadata(path)
    problems = _compare(_expected_shapes(model), metas)
    if problems:
        raise UserError(f"{what} file {path} does not match the model: {_summarize(problems)}; "
                        f"check --ckpt_dir and --preset")
    loaded = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    sd = {}
    for k in list(loaded):
        sd[k] = _place(loaded.pop(k), dtype, device)  # drop the mapped tensor as soon as it is placed
    return _finish(model, sd, f"{what} file {path}")


def _file_in(path: str | Path, name: str) -> Path:
    path = Path(path)
    return path / name if path.is_dir() else path


def load_t5(path: str | Path, cfg: T5Config, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """umT5 encoder from `models_t5_umt5-xxl-enc-bf16.pth` (or the checkpoint folder holding it)."""
    from liveavatar.t5 import T5Encoder

    return _load_pth(_file_in(path, T5_FILE), _build_on_meta(T5Encoder, cfg), dtype, device, "T5 encoder")


def load_vae(path: str | Path, cfg: VAEConfig, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """Wan2.1 VAE from `Wan2.1_VAE.pth` (or the checkpoint folder holding it)."""
    from liveavatar.vae import WanVAE

    return _load_pth(_file_in(path, VAE_FILE), _build_on_meta(WanVAE, cfg), dtype, device, "VAE")


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
        read_safetensors_header(p)  # truncation and format errors as one-line UserErrors
        from safetensors import safe_open

        with safe_open(str(p), framework="pt", device="cpu") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}
    else:
        read_pth_metadata(p)
        raw = torch.load(p, mmap=True, weights_only=True, map_location="cpu")
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
    """Problems naming the LoRA's keys that match no target, targets without A/B, and shape mismatches.

    `found` is keyed canonically (see `lora_key`)."""
    expected = expected_lora_tensors(model, rank, targets)
    problems = [f"LoRA tensor {k} matches no target module" for k in found if k not in expected]
    for name in lora_targets(model, targets):
        absent = [ab for ab in "AB" if lora_key(name, ab) not in found]
        if absent:
            problems.append(f"target {name} has no lora_{'/'.join(absent)}")
    problems += [f"LoRA tensor {k} has shape {_shape(found[k].shape)}, expected {_shape(s)}"
                 for k, s in expected.items() if k in found and tuple(found[k].shape) != tuple(s)]
    return problems


def check_lora(model: nn.Module, lora_sd: dict[str, torch.Tensor], rank: int,
               targets: Sequence[str] = LORA_TARGETS) -> dict[str, torch.Tensor]:
    """The LoRA keyed canonically, after checking it against the model (which may be on meta): every
    key must belong to a target, every target must have A and B, every shape must match; otherwise a
    UserError names the first mismatches."""
    names = _canonical_lora_keys(lora_sd, "the LoRA state dict")
    lora = {names[k]: t for k, t in lora_sd.items()}
    problems = _lora_problems({k: TensorMeta(tuple(t.shape), t.dtype) for k, t in lora.items()}, model, rank,
                              targets)
    if problems:
        raise UserError(f"the LoRA does not fit this DiT (rank {rank}): {_summarize(problems)}; "
                        f"pass the Live Avatar LoRA and the matching --preset")
    return lora


@torch.no_grad()
def merge_lora(model: nn.Module, lora_sd: dict[str, torch.Tensor], alpha: float, rank: int,
               targets: Sequence[str] = LORA_TARGETS) -> int:
    """Merge W <- W + (alpha / rank) * B @ A into every target Linear, in float32, one layer at a time
    on the weight's device, rounded once to the weight dtype. Keys may carry the `base_model.model.`
    prefix or not; a LoRA that does not fit (see `check_lora`) raises before anything is merged.
    Returns the number of merged layers."""
    lora = check_lora(model, lora_sd, rank, targets)
    linears = lora_targets(model, targets)
    scale = alpha / rank
    for name, lin in linears.items():
        w = lin.weight
        a = lora[lora_key(name, "A")].to(device=w.device, dtype=torch.float32)  # [r, in]
        b = lora[lora_key(name, "B")].to(device=w.device, dtype=torch.float32)  # [out, r]
        w.copy_((w.float() + scale * (b @ a)).to(w.dtype))
    return len(linears)


# ---------------------------------------------------------------------------------------------
# wav2vec2 (Hugging Face folder)

_W2V_HEADS = ("lm_head.", "quantizer.", "project_q.", "project_hid.")  # heads the encoder does not use
_W2V_CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                      "conv_dim", "conv_kernel", "conv_stride", "num_conv_pos_embeddings",
                      "num_conv_pos_embedding_groups")
_W2V_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _w2v_model_on_meta(cfg: AudioConfig) -> nn.Module:
    from transformers import Wav2Vec2Model

    from liveavatar.audio import wav2vec2_config

    with torch.device("meta"):
        return Wav2Vec2Model(wav2vec2_config(cfg))


def _w2v_key(k: str) -> str:
    """Wav2Vec2Model key of a checkpoint key: no `wav2vec2.` prefix, old weight-norm names mapped."""
    k = k.removeprefix("wav2vec2.")
    return k.replace(".weight_g", ".parametrizations.weight.original0").replace(
        ".weight_v", ".parametrizations.weight.original1")


# ---------------------------------------------------------------------------------------------
# Verification from headers


@dataclass
class ComponentReport:
    name: str
    files: list[str] = field(default_factory=list)
    tensors: int = 0
    params: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth knowing, not failures
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def count(self, metas: dict[str, TensorMeta]) -> None:
        self.tensors = len(metas)
        self.params = sum(m.numel for m in metas.values())
        self.bytes = sum(m.nbytes for m in metas.values())


@dataclass
class Report:
    ckpt_dir: str
    preset: str
    components: list[ComponentReport]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.components)

    @property
    def problems(self) -> list[str]:
        return [f"{c.name}: {p}" for c in self.components for p in c.problems]

    def summary(self, max_problems: int | None = 20) -> str:
        """One screen when complete; otherwise every problem (at most `max_problems` per component)."""
        lines = [f"checkpoint {self.ckpt_dir} (preset {self.preset})",
                 f"{'component':<10} {'status':<8} {'tensors':>8} {'params':>16} {'size':>10}  files"]
        for c in self.components:
            status = "skipped" if c.skipped else ("ok" if c.ok else "FAILED")
            files = c.skipped or _files_text(c.files)
            lines.append(f"{c.name:<10} {status:<8} {c.tensors:>8} {c.params:>16,} "
                         f"{format_bytes(c.bytes):>10}  {files}")
        for c in self.components:
            lines += [f"note: {c.name}: {n}" for n in c.notes]
        if self.ok:
            lines.append("all checked components are complete")
            return "\n".join(lines)
        lines.append(f"{len(self.problems)} problem(s):")
        for c in self.components:
            shown = c.problems if max_problems is None else c.problems[:max_problems]
            lines += [f"  {c.name}: {p}" for p in shown]
            if len(shown) < len(c.problems):
                lines.append(f"  {c.name}: ... and {len(c.problems) - len(shown)} more (all: --all_problems)")
        return "\n".join(lines)


def _files_text(files: list[str]) -> str:
    shards = [f for f in files if DIT_SHARD_RE.match(f)]
    rest = [f for f in files if f not in shards]
    text = ", ".join(rest[:4]) + (f", ... ({len(rest)} files)" if len(rest) > 4 else "")
    return text + (f" + {len(shards)} shards" if len(shards) > 1 else f", {shards[0]}" if shards else "")


def format_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _check_dit(root: Path, preset: Preset, rep: ComponentReport) -> None:
    from liveavatar.dit import CausalS2VDiT

    config_ok = True
    try:
        read_dit_config(root, preset.dit)
        rep.files.append(DIT_CONFIG)
    except UserError as exc:
        rep.problems.append(str(exc))
        config_ok = not (root / DIT_CONFIG).is_file()  # a missing config.json does not explain tensors
    shards, files, problems = _dit_layout(root)
    rep.files += files
    rep.problems += problems
    metas, _, problems, lost = _dit_headers(shards)
    rep.problems += problems
    rep.count(metas)
    if any(shards[p] is None for p in lost) or not shards:
        return  # the single weights file is unreadable: nothing to compare
    if not config_ok:
        rep.notes.append("tensors not compared: config.json describes another model than the preset")
        return
    expected = _expected_shapes(_build_on_meta(CausalS2VDiT, preset.dit))
    # tensors of a missing or unreadable shard are reported with the shard, not one by one
    unknown = {k for p in lost for k in shards[p]}
    rep.problems += _compare({k: s for k, s in expected.items() if k not in unknown}, metas)
    problems, notes = _dtype_notes(metas, FILE_DTYPES["dit"], "the DiT")
    rep.problems += problems
    rep.notes += notes


def _check_pth(path: Path, model: nn.Module, kind: str, rep: ComponentReport) -> None:
    rep.files.append(path.name)
    if not path.is_file():
        rep.problems.append(f"missing file {path}")
        return
    try:
        metas = read_pth_metadata(path)
    except UserError as exc:
        rep.problems.append(str(exc))
        return
    rep.count(metas)
    rep.problems += _compare(_expected_shapes(model), metas)
    problems, notes = _dtype_notes(metas, FILE_DTYPES[kind], path.name)
    rep.problems += problems
    rep.notes += notes


def _check_lora(path: str | Path, preset: Preset, rep: ComponentReport) -> None:
    from liveavatar.dit import CausalS2VDiT

    try:
        p = resolve_lora_path(path)
        rep.files.append(str(p))
        raw = _file_metas(p)
    except UserError as exc:
        rep.problems.append(str(exc))
        return
    rep.count(raw)
    found, foreign = {}, []
    for k, m in raw.items():
        mm = _LORA_KEY.match(k)
        if mm is None:
            foreign.append(k)
        else:
            found[lora_key(mm["module"], mm["ab"])] = m
    rep.problems += [f"tensor {k} is not a peft LoRA weight (<module>.lora_A/B[.default].weight)"
                     for k in foreign]
    model = _build_on_meta(CausalS2VDiT, preset.dit)
    rep.problems += _lora_problems(found, model, preset.lora_rank, preset.lora_targets)
    problems, notes = _dtype_notes(raw, FILE_DTYPES["lora"], "the LoRA")
    rep.problems += problems
    rep.notes += notes


def _check_audio(folder: Path, cfg: AudioConfig, rep: ComponentReport) -> None:
    if not folder.is_dir():
        rep.problems.append(f"missing folder {folder}")
        return
    conf = folder / "config.json"
    config_problems = len(rep.problems)
    if not conf.is_file():
        rep.problems.append(f"missing file {conf}")
        config_problems += 1  # tensors are still worth comparing
    else:
        rep.files.append("config.json")
        try:
            raw = json.loads(conf.read_text())
            from liveavatar.audio import wav2vec2_config

            want = wav2vec2_config(cfg).to_dict()
            for name in _W2V_CONFIG_FIELDS:
                if name in raw and list(_as_list(raw[name])) != list(_as_list(want[name])):
                    rep.problems.append(f"{conf} sets {name}={raw[name]!r}, the preset expects "
                                        f"{want[name]!r}")
        except ValueError as exc:
            rep.problems.append(f"{conf} is not valid JSON ({exc})")
    weights = [folder / n for n in _W2V_WEIGHTS if (folder / n).is_file()]
    if not weights:
        rep.problems.append(f"no wav2vec2 weights in {folder}: expected {' or '.join(_W2V_WEIGHTS)}")
        return
    path = weights[0]
    rep.files.append(path.name)
    try:
        raw_metas = _file_metas(path)
    except UserError as exc:
        rep.problems.append(str(exc))
        return
    metas = {_w2v_key(k): m for k, m in raw_metas.items() if not k.startswith(_W2V_HEADS)}
    metas.pop("masked_spec_embed", None)  # only used for training-time masking; optional in checkpoints
    expected = _expected_shapes(_w2v_model_on_meta(cfg))
    expected.pop("masked_spec_embed", None)
    rep.count(metas)
    if len(rep.problems) > config_problems:
        rep.notes.append("tensors not compared: config.json describes another model than the preset")
        return
    rep.problems += _compare(expected, metas)
    problems, notes = _dtype_notes(metas, FILE_DTYPES["audio"], path.name)
    rep.problems += problems
    rep.notes += notes


def _as_list(v):
    return v if isinstance(v, list | tuple) else [v]


def _check_tokenizer(folder: Path, preset: Preset, rep: ComponentReport) -> None:
    if not folder.is_dir():
        rep.problems.append(f"missing folder {folder}")
        return
    names = ("tokenizer.json", "spiece.model", "tokenizer_config.json")
    present = [n for n in names if (folder / n).is_file()]
    rep.files += present
    if not {"tokenizer.json", "spiece.model"} & set(present):
        rep.problems.append(f"{folder} holds neither tokenizer.json nor spiece.model")
        return
    from liveavatar.t5 import TextTokenizer

    try:
        tok = TextTokenizer.from_folder(folder, text_len=preset.t5.text_len)
    except UserError as exc:
        rep.problems.append(str(exc))
        return
    if tok.vocab_size > preset.t5.vocab_size:
        rep.problems.append(f"the tokenizer has {tok.vocab_size} tokens but the T5 embedding only "
                            f"{preset.t5.vocab_size}; use the umT5 tokenizer of this checkpoint")


def parse_components(only: str | Sequence[str] | None) -> tuple[str, ...]:
    if only is None:
        return COMPONENTS
    names = [n.strip() for n in (only.split(",") if isinstance(only, str) else only) if n.strip()]
    bad = [n for n in names if n not in COMPONENTS]
    if bad or not names:
        raise UserError(f"unknown component(s) {', '.join(bad) or '(none given)'} in --only; "
                        f"choose from {','.join(COMPONENTS)}")
    return tuple(n for n in COMPONENTS if n in names)


def verify_checkpoint(ckpt_dir: str | Path, lora_path: str | Path | None = None,
                      only: str | Sequence[str] | None = None, preset: Preset | str = "s2v-14b") -> Report:
    """Check a checkpoint folder (and LoRA) against the models of `preset` without reading weights."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    names = parse_components(only)
    if only is not None and "lora" in names and lora_path is None:
        raise UserError("--only lora needs --lora_path pointing at liveavatar.safetensors")
    paths = ckpt_paths(ckpt_dir)
    reports = []
    for name in names:
        rep = ComponentReport(name)
        if name == "dit":
            _check_dit(paths.root, preset, rep)
        elif name == "lora":
            if lora_path is None:
                rep.skipped = "no --lora_path given"
            else:
                _check_lora(lora_path, preset, rep)
        elif name == "t5":
            from liveavatar.t5 import T5Encoder

            _check_pth(paths.t5, _build_on_meta(T5Encoder, preset.t5), "t5", rep)
        elif name == "vae":
            from liveavatar.vae import WanVAE

            _check_pth(paths.vae, _build_on_meta(WanVAE, preset.vae), "vae", rep)
        elif name == "audio":
            _check_audio(paths.audio, preset.audio, rep)
        else:
            _check_tokenizer(paths.tokenizer, preset, rep)
        reports.append(rep)
    return Report(str(paths.root), preset.name, reports)


# ---------------------------------------------------------------------------------------------
# Sizes of the models of a preset (for `inspect` and planning)

_DIT_PARTS = (
    ("blocks", ("blocks.",)),
    ("embeddings+head",
     ("patch_embedding.", "text_embedding.", "time_embedding.", "time_projection.", "head.")),
    ("audio encoder", ("casual_audio_encoder.",)),
    ("audio injectors", ("audio_injector.",)),
    ("frame packer+cond", ("frame_packer.", "cond_encoder.", "trainable_cond_mask.")),
)
_VAE_PARTS = (("encoder", ("encoder.", "conv1.")), ("decoder", ("decoder.", "conv2.")))


@dataclass(frozen=True)
class PartStats:
    name: str  # "dit", "dit.blocks", ...
    tensors: int
    params: int
    file_dtype: torch.dtype

    def bytes_as(self, dtype: torch.dtype) -> int:
        return self.params * dtype.itemsize

    @property
    def file_bytes(self) -> int:
        return self.bytes_as(self.file_dtype)

    def to_json(self) -> dict:
        return {
            "name": self.name, "tensors": self.tensors, "params": self.params,
            "file_dtype": _dtype_name(self.file_dtype), "file_bytes": self.file_bytes,
            "bytes_per_dtype": {_dtype_name(d): self.bytes_as(d) for d in (torch.bfloat16, torch.float32)},
        }


def _stats(name: str, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
           parts: Sequence[tuple[str, tuple[str, ...]]] = ()) -> list[PartStats]:
    def one(label: str, keys: list[str]) -> PartStats:
        return PartStats(label, len(keys), sum(math.prod(shapes[k]) for k in keys), dtype)

    out = [one(name, list(shapes))]
    covered = set()
    for label, prefixes in parts:
        keys = [k for k in shapes if k.startswith(prefixes)]
        covered.update(keys)
        out.append(one(f"{name}.{label}", keys))
    if parts and len(covered) != len(shapes):
        out.append(one(f"{name}.other", [k for k in shapes if k not in covered]))
    return out


def inspect_preset(preset: Preset | str = "s2v-14b") -> list[PartStats]:
    """Tensors, parameters and sizes of every component of `preset`, from the models built on meta."""
    from liveavatar.dit import CausalS2VDiT
    from liveavatar.t5 import T5Encoder
    from liveavatar.vae import WanVAE

    preset = get_preset(preset) if isinstance(preset, str) else preset
    dit = _build_on_meta(CausalS2VDiT, preset.dit)
    out = _stats("dit", _expected_shapes(dit), FILE_DTYPES["dit"], _DIT_PARTS)
    lora = expected_lora_tensors(dit, preset.lora_rank, preset.lora_targets)
    out += _stats("lora", lora, FILE_DTYPES["lora"])
    out += _stats("t5", _expected_shapes(_build_on_meta(T5Encoder, preset.t5)), FILE_DTYPES["t5"])
    out += _stats("vae", _expected_shapes(_build_on_meta(WanVAE, preset.vae)), FILE_DTYPES["vae"], _VAE_PARTS)
    out += _stats("audio", _expected_shapes(_w2v_model_on_meta(preset.audio)), FILE_DTYPES["audio"])
    return out


# ---------------------------------------------------------------------------------------------
# Writing checkpoints in the official layout (tests, demos, converted weights)


def save_dit(model: nn.Module, ckpt_dir: str | Path, cfg: DiTConfig, num_shards: int = 1,
             dtype: torch.dtype = torch.bfloat16) -> list[Path]:
    """config.json + DiT safetensors: one file, or `num_shards` shards of about equal size + index."""
    from safetensors.torch import save_file

    root = Path(ckpt_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / DIT_CONFIG).write_text(json.dumps(dit_config_json(cfg), indent=2))
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if num_shards == 1:
        save_file(sd, str(root / DIT_SINGLE))
        return [root / DIT_SINGLE]
    total = sum(t.nbytes for t in sd.values())
    groups: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    acc = 0
    for k, t in sd.items():  # consecutive keys, cut at equal byte fractions
        groups[min(num_shards - 1, acc * num_shards // max(total, 1))][k] = t
        acc += t.nbytes
    if any(not g for g in groups):
        raise ValueError(f"cannot split {len(sd)} tensors into {num_shards} non-empty shards")
    weight_map, paths = {}, []
    for i, g in enumerate(groups, start=1):
        name = dit_shard_name(i, num_shards)
        save_file(g, str(root / name))
        weight_map.update({k: name for k in g})
        paths.append(root / name)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / DIT_INDEX).write_text(json.dumps(index, indent=2))
    return paths


def save_pth(model: nn.Module, path: str | Path, dtype: torch.dtype) -> Path:
    """A `torch.save` state dict in `dtype`, the format of the official T5 and VAE files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}, path)
    return path


def save_lora(lora_sd: dict[str, torch.Tensor], path: str | Path, prefix: bool = True,
              dtype: torch.dtype = torch.bfloat16) -> Path:
    """A peft-named LoRA safetensors file, with or without the `base_model.model.` prefix."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = _canonical_lora_keys(lora_sd, "the LoRA state dict")
    out = {}
    for k, t in lora_sd.items():
        key = names[k] if prefix else names[k].removeprefix(LORA_PREFIX)
        out[key] = t.detach().to(dtype).contiguous()
    save_file(out, str(path))
    return path


def random_lora(model: nn.Module, rank: int, seed: int = 0,
                targets: Sequence[str] = LORA_TARGETS) -> dict[str, torch.Tensor]:
    """A LoRA with random A and B (both nonzero, so merging changes every target), float32."""
    gen = torch.Generator().manual_seed(seed)
    shapes = expected_lora_tensors(model, rank, targets)
    return {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}


def write_tokenizer_folder(folder: str | Path, vocab_size: int) -> Path:
    """A small word-level tokenizer folder (`<pad>` 0, `</s>` 1, `<unk>` 2, `</s>` appended)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["a", "man", "woman", "talks", "smiles", "to", "the", "camera", "in", "room", "light", "and"]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words[: max(0, vocab_size - 3)]:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(str(folder))
    return Path(folder)


def write_wav2vec2_folder(folder: str | Path, cfg: AudioConfig, seed: int = 0) -> nn.Module:
    """A wav2vec2 folder like the official one (Wav2Vec2ForCTC safetensors, config, feature extractor);
    returns the model written."""
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    from liveavatar.audio import wav2vec2_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Wav2Vec2ForCTC(wav2vec2_config(cfg))
    model.save_pretrained(str(folder), safe_serialization=True)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=cfg.sample_rate, padding_value=0.0,
                             do_normalize=True, return_attention_mask=True).save_pretrained(str(folder))
    return model


@dataclass
class RandomCheckpoint:
    """The models written by `write_random_checkpoint` (float32, as initialised) and the LoRA."""

    dit: nn.Module
    t5: nn.Module
    vae: nn.Module
    audio: nn.Module  # transformers Wav2Vec2ForCTC
    lora: dict[str, torch.Tensor] | None = None


def write_random_checkpoint(ckpt_dir: str | Path, preset: Preset | str = "tiny", seed: int = 0,
                            num_shards: int = 3, lora_path: str | Path | None = None) -> RandomCheckpoint:
    """A complete checkpoint with random weights in the official layout and file dtypes (for tests):
    sharded DiT + index + config.json, T5 and VAE `.pth`, tokenizer and wav2vec2 folders, and, when
    `lora_path` is given, a random LoRA with prefixed keys."""
    from liveavatar.dit import CausalS2VDiT
    from liveavatar.t5 import T5Encoder
    from liveavatar.vae import WanVAE

    preset = get_preset(preset) if isinstance(preset, str) else preset
    root = Path(ckpt_dir)
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(seed)
        dit, t5, vae = CausalS2VDiT(preset.dit), T5Encoder(preset.t5), WanVAE(preset.vae)
    save_dit(dit, root, preset.dit, num_shards=num_shards, dtype=FILE_DTYPES["dit"])
    save_pth(t5, root / T5_FILE, FILE_DTYPES["t5"])
    save_pth(vae, root / VAE_FILE, FILE_DTYPES["vae"])
    write_tokenizer_folder(root / TOKENIZER_DIR, preset.t5.vocab_size)
    out = RandomCheckpoint(dit, t5, vae, write_wav2vec2_folder(root / AUDIO_DIR, preset.audio, seed))
    if lora_path is not None:
        out.lora = random_lora(out.dit, preset.lora_rank, seed, preset.lora_targets)
        save_lora(out.lora, lora_path, prefix=True, dtype=FILE_DTYPES["lora"])
    return out


__all__ = [
    "AUDIO_DIR", "COMPONENTS", "CkptPaths", "ComponentReport", "DIT_CONFIG", "DIT_INDEX", "DIT_SINGLE",
    "FILE_DTYPES", "LORA_FILE", "LORA_PREFIX", "LORA_REPO", "LORA_TARGETS", "PartStats", "RandomCheckpoint",
    "Report", "T5_FILE", "TOKENIZER_DIR", "TensorMeta", "VAE_FILE", "check_lora", "ckpt_paths",
    "dit_config_json", "dit_shard_name", "expected_lora_tensors", "format_bytes", "inspect_preset",
    "load_dit", "load_lora", "load_t5", "load_vae", "lora_key", "lora_targets", "merge_lora",
    "parse_components", "random_lora", "read_dit_config", "read_pth_metadata", "read_safetensors_header",
    "resolve_lora_path", "save_dit", "save_lora", "save_pth", "verify_checkpoint", "write_random_checkpoint",
    "write_tokenizer_folder", "write_wav2vec2_folder",
]
