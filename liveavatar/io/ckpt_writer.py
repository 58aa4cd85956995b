"""Writers of checkpoints in the official on-disk formats, for tests, demos and converted weights.

`save_dit` writes `config.json` and the DiT as one safetensors file or as shards with an index,
`save_pth` the `torch.save` state dicts of the T5 and VAE files, `save_lora` a peft-named LoRA
safetensors file; `write_tokenizer_folder` and `write_wav2vec2_folder` write small Hugging Face
folders in the layout of the official ones. `write_random_checkpoint` puts these together into a
complete `Wan2.2-S2V-14B/` folder with random weights (and optionally a random LoRA), which every
loader of `liveavatar.io.checkpoint` and every check of `liveavatar.io.verify` reads like the real one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from liveavatar.config import AudioConfig, DiTConfig, Preset, get_preset
from liveavatar.io.checkpoint import (
    _DIT_CONFIG_FIELDS,
    _DIT_CONFIG_FIXED,
    AUDIO_DIR,
    DIT_CONFIG,
    DIT_INDEX,
    DIT_SINGLE,
    FILE_DTYPES,
    LORA_PREFIX,
    LORA_TARGETS,
    T5_FILE,
    TOKENIZER_DIR,
    VAE_FILE,
    _canonical_lora_keys,
    dit_shard_name,
    expected_lora_tensors,
)


def dit_config_json(cfg: DiTConfig) -> dict:
    """config.json as the official folder has it (diffusers `WanModel_S2V` kwargs) for `cfg`."""
    out = {"_class_name": "WanModel_S2V"}
    for name in _DIT_CONFIG_FIELDS:
        value = getattr(cfg, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    out.update(_DIT_CONFIG_FIXED)
    return out


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

    from liveavatar.models.wav2vec2 import wav2vec2_config

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
    from liveavatar.models.dit import CausalS2VDiT
    from liveavatar.models.t5 import T5Encoder
    from liveavatar.models.vae import WanVAE

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
    "RandomCheckpoint", "dit_config_json", "random_lora", "save_dit", "save_lora", "save_pth",
    "write_random_checkpoint", "write_tokenizer_folder", "write_wav2vec2_folder",
]
