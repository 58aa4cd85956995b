"""Header-only checkpoint verification and model sizes: `liveavatar check-ckpt` and `liveavatar inspect`.

`verify_checkpoint` checks a `Wan2.2-S2V-14B/` folder (and the Live Avatar LoRA) component by
component from file headers, the safetensors index and the `.pth` zip directories alone, without
reading any weight, against the same meta-built models the loaders of `liveavatar.io.checkpoint` use:
missing, unexpected or misshapen tensors, missing or truncated shards, configs that describe another
model, and non-official dtypes (noted, not failed). The result is a `Report` of `ComponentReport`s
that prints as one screen. `inspect_preset` reports tensors, parameters and byte sizes of every
component of a preset from those models (`PartStats`), for `inspect` and the memory planner.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from liveavatar.config import AudioConfig, Preset, get_preset
from liveavatar.errors import UserError
from liveavatar.io.checkpoint import (
    _LORA_KEY,
    COMPONENTS,
    DIT_CONFIG,
    DIT_SHARD_RE,
    FILE_DTYPES,
    ConfigMismatch,
    TensorMeta,
    _brief,
    _compare,
    _dit_headers,
    _dit_layout,
    _dtype_name,
    _dtype_problems,
    _file_metas,
    _json_type,
    _lora_problems,
    _read_json_file,
    _read_preprocessor,
    _w2v_key,
    _w2v_used,
    ckpt_paths,
    expected_lora_tensors,
    lora_key,
    read_dit_config,
    read_pth_metadata,
    resolve_lora_path,
    wav2vec2_config_from,
    wav2vec2_weight_files,
)
from liveavatar.models.sizes import on_meta, state_shapes, wav2vec2_on_meta

# ---------------------------------------------------------------------------------------------
# Verification from headers


def _dtype_notes(found: dict[str, TensorMeta], want: torch.dtype, what: str) -> tuple[list[str], list[str]]:
    """(problems, notes): non-float tensors are problems; other float dtypes than the official one, notes."""
    problems = _dtype_problems(found)
    other = sorted({_dtype_name(m.dtype) for m in found.values()
                    if m.dtype.is_floating_point and m.dtype != want})
    notes = [f"{what} stores {'/'.join(other)} tensors (official file: {_dtype_name(want)}); they are cast "
             f"when loaded"] if other else []
    return problems, notes


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
    from liveavatar.models.dit import CausalS2VDiT

    config_ok = True  # a missing or unreadable config.json does not explain the tensors: compare them
    try:
        read_dit_config(root, preset.dit)
        rep.files.append(DIT_CONFIG)
    except ConfigMismatch as exc:
        rep.problems.append(str(exc))
        config_ok = False
    except UserError as exc:
        rep.problems.append(str(exc))
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
    expected = state_shapes(on_meta(CausalS2VDiT, preset.dit))
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
    rep.problems += _compare(state_shapes(model), metas)
    problems, notes = _dtype_notes(metas, FILE_DTYPES[kind], path.name)
    rep.problems += problems
    rep.notes += notes


def _check_lora(path: str | Path, preset: Preset, rep: ComponentReport) -> None:
    from liveavatar.models.dit import CausalS2VDiT

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
    model = on_meta(CausalS2VDiT, preset.dit)
    rep.problems += _lora_problems(found, model, preset.lora_rank, preset.lora_targets)
    problems, notes = _dtype_notes(raw, FILE_DTYPES["lora"], "the LoRA")
    rep.problems += problems
    rep.notes += notes


# config.json fields compared with the wav2vec2 config of the preset
_W2V_CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                      "conv_dim", "conv_kernel", "conv_stride", "num_conv_pos_embeddings",
                      "num_conv_pos_embedding_groups", "conv_bias")


def _check_audio(folder: Path, cfg: AudioConfig, rep: ComponentReport) -> None:
    if not folder.is_dir():
        rep.problems.append(f"missing folder {folder}")
        return
    conf = folder / "config.json"
    other_model = False  # a missing or unreadable config.json does not explain the tensors: compare them
    if not conf.is_file():
        rep.problems.append(f"missing file {conf}")
    else:
        rep.files.append("config.json")
        problems, other_model = _audio_config_problems(conf, cfg)
        rep.problems += problems
    pre = folder / "preprocessor_config.json"
    if not pre.is_file():
        rep.problems.append(f"missing file {pre}")
    else:
        rep.files.append(pre.name)
        try:
            _read_preprocessor(pre)
        except UserError as exc:
            rep.problems.append(str(exc))
    files, raw_metas, problems = wav2vec2_weight_files(folder)
    rep.files += [p.name for p in files]
    if problems:
        rep.problems += problems
        return
    metas = {_w2v_key(k): m for k, m in raw_metas.items() if _w2v_used(k)}
    expected = state_shapes(wav2vec2_on_meta(cfg))
    rep.count(metas)
    if other_model:
        rep.notes.append("tensors not compared: config.json describes another model than the preset")
        return
    rep.problems += _compare(expected, metas)
    problems, notes = _dtype_notes(metas, FILE_DTYPES["audio"], ", ".join(p.name for p in files))
    rep.problems += problems
    rep.notes += notes


def _audio_config_problems(conf: Path, cfg: AudioConfig) -> tuple[list[str], bool]:
    """(problems, whether it describes another model): the fields of the wav2vec2 config.json that
    differ from the preset, or why it cannot be read."""
    try:
        raw = _read_json_file(conf)
    except UserError as exc:
        return [str(exc)], False
    if not isinstance(raw, dict):
        return [f"{conf} holds a JSON {_json_type(raw)}, not an object of model settings; re-download it"], False
    try:
        found = wav2vec2_config_from(raw, conf)  # a layout this engine runs, with usable values
    except UserError as exc:
        return [str(exc)], True
    diffs = [f"{conf} sets {name}={_brief(_as_json(getattr(found, name)))}, the preset expects "
             f"{_as_json(getattr(cfg, name))!r}"
             for name in _W2V_CONFIG_FIELDS if getattr(found, name) != getattr(cfg, name)]
    return diffs, bool(diffs)


def _as_json(v):
    return list(v) if isinstance(v, tuple) else v


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
    from liveavatar.models.t5 import TextTokenizer

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
            from liveavatar.models.t5 import T5Encoder

            _check_pth(paths.t5, on_meta(T5Encoder, preset.t5), "t5", rep)
        elif name == "vae":
            from liveavatar.models.vae import WanVAE

            _check_pth(paths.vae, on_meta(WanVAE, preset.vae), "vae", rep)
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
    from liveavatar.models.dit import CausalS2VDiT
    from liveavatar.models.t5 import T5Encoder
    from liveavatar.models.vae import WanVAE

    preset = get_preset(preset) if isinstance(preset, str) else preset
    dit = on_meta(CausalS2VDiT, preset.dit)
    out = _stats("dit", state_shapes(dit), FILE_DTYPES["dit"], _DIT_PARTS)
    lora = expected_lora_tensors(dit, preset.lora_rank, preset.lora_targets)
    out += _stats("lora", lora, FILE_DTYPES["lora"])
    out += _stats("t5", state_shapes(on_meta(T5Encoder, preset.t5)), FILE_DTYPES["t5"])
    out += _stats("vae", state_shapes(on_meta(WanVAE, preset.vae)), FILE_DTYPES["vae"], _VAE_PARTS)
    out += _stats("audio", state_shapes(wav2vec2_on_meta(preset.audio)), FILE_DTYPES["audio"])
    return out


__all__ = [
    "ComponentReport", "PartStats", "Report", "format_bytes", "inspect_preset", "parse_components",
    "verify_checkpoint",
]
