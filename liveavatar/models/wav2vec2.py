"""wav2vec2 audio features for the S2V DiT: 16 kHz samples -> [1, 25, hidden, N video frames].

`AudioEncoder` wraps transformers' `Wav2Vec2Model` (the base model; the checkpoint folder
`wav2vec2-large-xlsr-53-english` is a `Wav2Vec2ForCTC`, whose `wav2vec2.` prefix transformers strips
and whose CTC head is not needed). `features` reproduces the official S2V path:

1. per-utterance zero-mean / unit-variance normalisation (the folder's feature extractor);
2. one wav2vec2 pass over the whole utterance; the 25 layer states are stacked: index 0 = input to
   layer 1 (feature projection + positional conv), 1..23 = outputs of layers 1..23, 24 = output of
   layer 24 *after* the final encoder LayerNorm. (transformers >= 5 reports the un-normalised layer-24
   output as its last `hidden_states` entry; the official code ran 4.51, where it was normalised, so
   the last entry is taken from `last_hidden_state` instead.)
3. linear resampling 50 Hz -> 30 Hz: `F.interpolate(linear, align_corners=True)` to
   T30 = int(T50 / 50 · 30) frames, in the model dtype;
4. video frame n takes the 30 Hz feature at round(n · 30 / fps) (numpy rounding of the official
   linspace time points; for fps = 25 this is round(1.2 n), never a tie), zeros past the last one.

Frame count: T50 follows from the conv front end (400-sample receptive field, stride 320). With
F = infer_frames, the official run uses N = nr · F frames with nr = int(T30 / (F · 30 / fps)) + 1
clips; the +1 is unconditional, so the last clip is partly or wholly silent (`num_clips_for_audio`).
`features` encodes the whole utterance in one pass, as the official code does: compute is O(T²) and
so is memory with eager attention (SDPA kernels avoid the quadratic scores). Streaming sessions use
`normalize` and `encode` on windows instead (`liveavatar.engine.audio_features`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from liveavatar.config import AudioConfig
from liveavatar.errors import UserError

SAMPLE_RATE = 16000
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
# Checkpoint entries that inference does not use: the CTC head and the SpecAugment mask vector.
_UNUSED_KEYS = ("lm_head.", "masked_spec_embed")


def conv_geometry(kernels, strides) -> tuple[int, int]:
    """(receptive field, total stride) in samples of a stack of unpadded 1-D convolutions."""
    field, hop = 1, 1
    for k, s in zip(reversed(kernels), reversed(strides), strict=True):
        field = (field - 1) * s + k
        hop *= s
    return field, hop


def conv_frames(num_samples: int, kernels, strides) -> int:
    """Frames out of the conv front end for `num_samples` input samples (0 if too short)."""
    n = num_samples
    for k, s in zip(kernels, strides, strict=True):
        n = (n - k) // s + 1 if n >= k else 0
    return n


def resampled_len(t50: int, feature_rate: int = 50, interp_rate: int = 30) -> int:
    """Frames after the 50 -> 30 Hz resampling, with the official float arithmetic."""
    return int(t50 / float(feature_rate) * interp_rate)


def num_clips_for_audio(num_samples_16k: int, infer_frames: int = 48, fps: int = 25,
                        cfg: AudioConfig | None = None) -> int:
    """Clips the official pipeline generates for this much audio: int(T30 / (F · 30 / fps)) + 1."""
    cfg = cfg or AudioConfig()
    t30 = resampled_len(conv_frames(num_samples_16k, cfg.conv_kernel, cfg.conv_stride),
                        cfg.feature_rate, cfg.interp_rate)
    return int(t30 / (infer_frames * (cfg.interp_rate / fps))) + 1


def resample_features(hidden: torch.Tensor, feature_rate: int = 50, interp_rate: int = 30) -> torch.Tensor:
    """hidden: [L, T50, H] -> [L, T30, H], linear with aligned end points, in hidden's dtype."""
    t30 = resampled_len(hidden.shape[1], feature_rate, interp_rate)
    if t30 < 1:
        raise UserError(f"the audio gives only {hidden.shape[1]} wav2vec2 frame(s), too short to sample; "
                        "use at least 0.05 s of audio")
    out = F.interpolate(hidden.transpose(1, 2), size=t30, mode="linear", align_corners=True)
    return out.transpose(1, 2)


def frame_feature_indices(num_video_frames: int, fps: int, interp_rate: int = 30) -> np.ndarray:
    """30 Hz feature index of each video frame, computed as the official sampler does. -> [N] int64."""
    times = np.linspace(0.0, num_video_frames / fps, num_video_frames, endpoint=False)
    return np.round(times * interp_rate).astype(np.int64)


def bucket_features(feat: torch.Tensor, num_video_frames: int, fps: int, interp_rate: int = 30) -> torch.Tensor:
    """feat: [L, T30, H] -> [1, L, H, N]: one feature column per video frame, zeros past the audio."""
    layers, t30, hidden = feat.shape
    idx = torch.from_numpy(frame_feature_indices(num_video_frames, fps, interp_rate)).to(feat.device)
    valid = idx < t30
    out = feat.new_zeros(layers, num_video_frames, hidden)
    out[:, valid] = feat[:, idx[valid]]
    return out.permute(0, 2, 1).unsqueeze(0).contiguous()


def wav2vec2_config(cfg: AudioConfig):
    """A stable-layer-norm `Wav2Vec2Config` (the large-xlsr layout) with AudioConfig's sizes."""
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        conv_dim=list(cfg.conv_dim), conv_kernel=list(cfg.conv_kernel), conv_stride=list(cfg.conv_stride),
        num_conv_pos_embeddings=cfg.num_conv_pos_embeddings,
        num_conv_pos_embedding_groups=cfg.num_conv_pos_embedding_groups,
        do_stable_layer_norm=True, feat_extract_norm="layer", conv_bias=True,
    )


def _feature_extractor(do_normalize: bool = True):
    from transformers import Wav2Vec2FeatureExtractor

    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                                    do_normalize=do_normalize, return_attention_mask=True)


class AudioEncoder(nn.Module):
    """wav2vec2 + the official feature resampling. Move it with `.to(device, dtype)` like any module."""

    def __init__(self, model, extractor, feature_rate: int = 50, interp_rate: int = 30):
        super().__init__()
        self.model = model.eval().requires_grad_(False)  # transformers Wav2Vec2Model
        self.extractor = extractor  # Wav2Vec2FeatureExtractor (normalisation settings)
        self.feature_rate, self.interp_rate = feature_rate, interp_rate
        c = model.config
        self.receptive_field, self.hop = conv_geometry(c.conv_kernel, c.conv_stride)

    @classmethod
    def from_folder(cls, path: str | Path, dtype: torch.dtype = torch.bfloat16) -> AudioEncoder:
        """Load a Hugging Face wav2vec2 folder (e.g. `<ckpt>/wav2vec2-large-xlsr-53-english`)."""
        folder = Path(path)
        expected = ("config.json, preprocessor_config.json and the model weights "
                    "(model.safetensors or pytorch_model.bin), as in <checkpoint>/wav2vec2-large-xlsr-53-english")
        if not folder.is_dir():
            raise UserError(f"wav2vec2 folder {folder} does not exist; it must hold {expected}")
        absent = [f for f in ("config.json", "preprocessor_config.json") if not (folder / f).is_file()]
        if not any((folder / f).is_file() for f in _WEIGHT_FILES):
            absent.append("model weights")
        if absent:
            raise UserError(f"wav2vec2 folder {folder} lacks {', '.join(absent)}; it must hold {expected}")
        from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # we report missing weights ourselves; the CTC head is expected extra
        try:
            model, info = Wav2Vec2Model.from_pretrained(str(folder), output_loading_info=True)
            extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(folder))
        except Exception as exc:  # any loader failure is reported the same way
            reason = " ".join(str(exc).split())[:300]
            raise UserError(f"wav2vec2 folder {folder} could not be loaded ({type(exc).__name__}: {reason}); "
                            f"it must hold {expected}") from exc
        finally:
            hf_logging.set_verbosity(level)
        missing = sorted(k for k in info["missing_keys"] if not k.startswith(_UNUSED_KEYS))
        unused = sorted(k for k in info["unexpected_keys"] if not k.startswith(_UNUSED_KEYS))
        bad = missing + unused + sorted(str(k) for k in info["mismatched_keys"])
        if bad:
            raise UserError(f"wav2vec2 weights in {folder} do not match its config.json ({len(missing)} missing, "
                            f"{len(unused)} unused, {len(info['mismatched_keys'])} mis-shaped; first: {bad[0]}); "
                            f"re-download the folder")
        if extractor.sampling_rate != SAMPLE_RATE:
            raise UserError(f"wav2vec2 folder {folder} expects {extractor.sampling_rate} Hz audio; "
                            f"this engine feeds {SAMPLE_RATE} Hz, use a 16 kHz wav2vec2 checkpoint")
        return cls(model.to(dtype), extractor)

    @classmethod
    def random(cls, cfg: AudioConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> AudioEncoder:
        """Seeded random weights (the `tiny` preset); leaves the global RNG untouched."""
        from transformers import Wav2Vec2Model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Wav2Vec2Model(wav2vec2_config(cfg))
        return cls(model.to(dtype), _feature_extractor(), cfg.feature_rate, cfg.interp_rate)

    @property
    def num_states(self) -> int:
        return self.model.config.num_hidden_layers + 1

    def normalize(self, wave_16k: np.ndarray) -> np.ndarray:
        """The feature extractor's per-utterance normalisation. [S] -> [S] float32."""
        wave = np.asarray(wave_16k, dtype=np.float32)
        if wave.ndim != 1:
            raise UserError(f"audio must be mono 1-D samples, got an array of shape {wave.shape}; downmix it first")
        if len(wave) < self.receptive_field + self.hop:
            raise UserError(f"audio has {len(wave)} samples at 16 kHz, fewer than the "
                            f"{self.receptive_field + self.hop} wav2vec2 needs; use a longer audio file")
        return self.extractor(wave, sampling_rate=SAMPLE_RATE, return_tensors="np").input_values[0]

    @torch.no_grad()
    def encode(self, samples: np.ndarray) -> torch.Tensor:
        """One wav2vec2 pass over normalised samples [S] -> stacked states [25, T50, H] (model dtype)."""
        p = next(self.model.parameters())
        x = torch.from_numpy(np.ascontiguousarray(samples))[None].to(p.device, p.dtype)  # [1, S]
        out = self.model(x, output_hidden_states=True)
        states = out.hidden_states
        if len(states) != self.num_states:
            raise RuntimeError(f"expected {self.num_states} wav2vec2 hidden states, got {len(states)}")
        # Index 24 must be the final-LayerNorm output (see the module docstring).
        return torch.cat([*states[:-1], out.last_hidden_state])

    def features(self, wave_16k: np.ndarray, num_video_frames: int | None = None, fps: int = 25,
                 infer_frames: int = 48) -> torch.Tensor:
        """wave_16k: [S] float32 mono -> [1, 25, H, N] in the model dtype, encoded in one pass.

        N = num_video_frames, or the official nr · infer_frames when None."""
        if fps <= 0:
            raise UserError(f"fps must be positive, got {fps}")
        hidden = self.encode(self.normalize(wave_16k))
        feat = resample_features(hidden, self.feature_rate, self.interp_rate)  # [25, T30, H]
        if num_video_frames is None:
            nr = int(feat.shape[1] / (infer_frames * (self.interp_rate / fps))) + 1
            num_video_frames = nr * infer_frames
        if num_video_frames < 1:
            raise UserError(f"num_video_frames must be at least 1, got {num_video_frames}")
        return bucket_features(feat, num_video_frames, fps, self.interp_rate)


__all__ = [
    "AudioEncoder", "SAMPLE_RATE", "bucket_features", "conv_frames", "conv_geometry", "frame_feature_indices",
    "num_clips_for_audio", "resample_features", "resampled_len", "wav2vec2_config",
]
