"""Model sizes without weights: every model of a preset built on the `meta` device.

The checkpoint verifier (expected tensor shapes), the loaders (empty models to assign weights into)
and the memory planner (bytes per component) all read sizes from here, so none of them reaches into
another for them.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from liveavatar.config import AudioConfig, Preset


def on_meta(cls, cfg) -> nn.Module:
    """`cls(cfg)` built on the meta device: shapes and dtypes, no storage."""
    with torch.device("meta"):
        return cls(cfg)


def wav2vec2_on_meta(cfg: AudioConfig) -> nn.Module:
    """The wav2vec2 encoder (`liveavatar.models.wav2vec2.Wav2Vec2`) of `cfg` on the meta device."""
    from liveavatar.models.wav2vec2 import Wav2Vec2

    return on_meta(Wav2Vec2, cfg)


def state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape of every tensor in `model.state_dict()`."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def num_elements(model: nn.Module) -> int:
    """Elements in the state dict (parameters and buffers)."""
    return sum(v.numel() for v in model.state_dict().values())


def encoder_elements(preset: Preset) -> dict[str, int]:
    """Elements of the text encoder, the VAE and the wav2vec2 audio encoder of `preset`."""
    from liveavatar.models.t5 import T5Encoder
    from liveavatar.models.vae import WanVAE

    return {
        "t5": num_elements(on_meta(T5Encoder, preset.t5)),
        "vae": num_elements(on_meta(WanVAE, preset.vae)),
        "wav2vec2": num_elements(wav2vec2_on_meta(preset.audio)),
    }


__all__ = ["encoder_elements", "num_elements", "on_meta", "state_shapes", "wav2vec2_on_meta"]
