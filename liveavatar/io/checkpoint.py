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
"""

from __future__ import annotations

import json
import math
import re
import struct
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from liveavatar.config import DiTConfig, T5Config, VAEConfig
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
    from liveavatar.models.dit import CausalS2VDiT

    root = ckpt_paths(ckpt_dir).root
    cfg = read_dit_config(root, cfg)
    shards, _, problems = _dit_layout(root)
    if problems:
        raise UserError(f"DiT weights in {root} are incomplete: {_summarize(problems)}")
    metas, where, problems, _ = _dit_headers(shards)
    model = on_meta(CausalS2VDiT, cfg)
    problems += _compare(state_shapes(model), metas)
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
    problems = _compare(state_shapes(model), metas)
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
_W2V_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _w2v_key(k: str) -> str:
    """Wav2Vec2Model key of a checkpoint key: no `wav2vec2.` prefix, old weight-norm names mapped."""
    k = k.removeprefix("wav2vec2.")
    return k.replace(".weight_g", ".parametrizations.weight.original0").replace(
        ".weight_v", ".parametrizations.weight.original1")


__all__ = [
    "AUDIO_DIR", "COMPONENTS", "CkptPaths", "DIT_CONFIG", "DIT_INDEX", "DIT_SHARD_RE", "DIT_SINGLE",
    "FILE_DTYPES", "LORA_FILE", "LORA_PREFIX", "LORA_REPO", "LORA_TARGETS", "T5_FILE", "TOKENIZER_DIR",
    "TensorMeta", "VAE_FILE", "check_lora", "ckpt_paths", "dit_shard_name", "expected_lora_tensors",
    "load_dit", "load_lora", "load_t5", "load_vae", "lora_key", "lora_targets", "merge_lora",
    "read_dit_config", "read_pth_metadata", "read_safetensors_header", "resolve_lora_path",
]
