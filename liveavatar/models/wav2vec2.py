"""wav2vec2 audio features for the S2V DiT: 16 kHz samples -> [1, 25, hidden, N video frames].

`Wav2Vec2` is the encoder of transformers' `Wav2Vec2Model` in its stable-layer-norm layout (the one
of wav2vec2-large-xlsr-53), written here with the same module names so the official folder (a
`Wav2Vec2ForCTC`: `wav2vec2.` prefix, CTC head unused) loads as it is, and equal to that class within
float rounding (tested); it spares the seconds transformers takes to import where nothing else
needs it (the tiny model; the real checkpoints still use transformers for the umT5 tokenizer).
`features` reproduces the official S2V path:

1. per-utterance zero-mean / unit-variance normalisation (the folder's feature extractor);
2. one wav2vec2 pass over the whole utterance; the 25 layer states are stacked: index 0 = input to
   layer 1 (feature projection + positional conv), 1..23 = outputs of layers 1..23, 24 = output of
   layer 24 *after* the final encoder LayerNorm, as transformers 4.51 (the official run) reported
   them with `output_hidden_states=True`;
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
    """transformers' `Wav2Vec2Config` of the same layout (stable layer norm, the large-xlsr one), for
    writing folders in the official format and for parity tests; the engine itself does not use it."""
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        conv_dim=list(cfg.conv_dim), conv_kernel=list(cfg.conv_kernel), conv_stride=list(cfg.conv_stride),
        num_conv_pos_embeddings=cfg.num_conv_pos_embeddings,
        num_conv_pos_embedding_groups=cfg.num_conv_pos_embedding_groups,
        do_stable_layer_norm=True, feat_extract_norm="layer", conv_bias=cfg.conv_bias,
        layer_norm_eps=cfg.layer_norm_eps,
    )


# ---------------------------------------------------------------------------------------------
# The wav2vec2 encoder (stable-layer-norm layout). Module names are the checkpoint keys of
# transformers' `Wav2Vec2Model`, so a folder's state dict loads as it is; parity with that class is
# tested (tests/unit/test_audio.py). Dropout, SpecAugment masking, padding masks and the CTC head are
# training or batching features that inference does not use, so they are absent.


class _ConvLayer(nn.Module):
    """Conv1d, LayerNorm over channels (eps 1e-5 whatever the config says, as in transformers), GELU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, bias: bool):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride, bias=bias)
        self.layer_norm = nn.LayerNorm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T] -> [B, C', T']
        return F.gelu(self.layer_norm(self.conv(x).transpose(1, 2)).transpose(1, 2))


class _FeatureEncoder(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        dims = (1, *cfg.conv_dim)
        self.conv_layers = nn.ModuleList(
            _ConvLayer(dims[i], dims[i + 1], k, s, cfg.conv_bias)
            for i, (k, s) in enumerate(zip(cfg.conv_kernel, cfg.conv_stride, strict=True)))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:  # [B, S] -> [B, C, T50]
        x = wave[:, None]
        for layer in self.conv_layers:
            x = layer(x)
        return x


class _FeatureProjection(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.layer_norm = nn.LayerNorm(cfg.conv_dim[-1], eps=cfg.layer_norm_eps)
        self.projection = nn.Linear(cfg.conv_dim[-1], cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, C] -> [B, T, H]
        return self.projection(self.layer_norm(x))


class _PositionalConv(nn.Module):
    """Grouped Conv1d over time with weight normalisation (over all dims but the kernel's), 'same'
    length (an even kernel drops its last output), GELU."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        k = cfg.num_conv_pos_embeddings
        conv = nn.Conv1d(cfg.hidden_size, cfg.hidden_size, k, padding=k // 2,
                         groups=cfg.num_conv_pos_embedding_groups)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.drop_last = k % 2 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, T, H]
        y = self.conv(x.transpose(1, 2))
        if self.drop_last:
            y = y[:, :, :-1]
        return F.gelu(y).transpose(1, 2)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, H]
        b, t, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.intermediate_dense = nn.Linear(dim, hidden)
        self.output_dense = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_dense(F.gelu(self.intermediate_dense(x)))


class _Layer(nn.Module):
    """Pre-norm transformer layer: x + attn(LN(x)), then + ffn(LN(.))."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        d = cfg.hidden_size
        self.attention = _Attention(d, cfg.num_attention_heads)
        self.layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.feed_forward = _FeedForward(d, cfg.intermediate_size)
        self.final_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layer_norm(x))
        return x + self.feed_forward(self.final_layer_norm(x))


class _Encoder(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.pos_conv_embed = _PositionalConv(cfg)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_hidden_layers))


class Wav2Vec2(nn.Module):
    """wav2vec2 (stable layer norm, e.g. wav2vec2-large-xlsr-53) returning every hidden state the S2V
    audio path uses. `config` is the AudioConfig it was built from."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.config = cfg  # a folder's sizes are checked by `io.checkpoint.read_wav2vec2_config`
        self.feature_extractor = _FeatureEncoder(cfg)
        self.feature_projection = _FeatureProjection(cfg)
        self.encoder = _Encoder(cfg)

    def forward(self, wave: torch.Tensor) -> list[torch.Tensor]:
        """wave: [B, S] normalised samples -> num_hidden_layers + 1 states [B, T50, H]: the input of
        layer 1 (projection + positional conv), the outputs of layers 1..L-1, and the output of layer L
        after the final LayerNorm (what transformers 4.51, the official run, reported)."""
        x = self.feature_projection(self.feature_extractor(wave).transpose(1, 2))
        x = x + self.encoder.pos_conv_embed(x)
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        states[-1] = self.encoder.layer_norm(x)
        return states


def _random_init(model: Wav2Vec2, generator: torch.Generator) -> None:
    """Deterministic random weights: linears normal(0, 0.02), convs normal(0, sqrt(2 / fan_in)), norms
    1 and 0, biases 0; the positional conv's weight-norm magnitude is the norm of its direction."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name.split(".")[-2]:
                p.fill_(1.0)
            elif name.endswith("original0"):
                continue  # set from original1 below
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                std = 0.02 if p.dim() == 2 else (2.0 / fan_in) ** 0.5
                p.copy_(torch.randn(p.shape, generator=generator) * std)
        conv = model.encoder.pos_conv_embed.conv.parametrizations.weight
        v = conv.original1
        conv.original0.copy_(torch.linalg.vector_norm(v, dim=(0, 1), keepdim=True))


class AudioEncoder(nn.Module):
    """wav2vec2 + the official feature resampling. Move it with `.to(device, dtype)` like any module."""

    def __init__(self, model: Wav2Vec2, do_normalize: bool = True, feature_rate: int = 50, interp_rate: int = 30):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.do_normalize = do_normalize  # the folder's feature extractor setting (true for the official one)
        self.feature_rate, self.interp_rate = feature_rate, interp_rate
        c = model.config
        self.receptive_field, self.hop = conv_geometry(c.conv_kernel, c.conv_stride)

    @classmethod
    def from_folder(cls, path: str | Path, dtype: torch.dtype = torch.bfloat16) -> AudioEncoder:
        """Load a Hugging Face wav2vec2 folder (e.g. `<ckpt>/wav2vec2-large-xlsr-53-english`): its
        config.json, preprocessor_config.json and weights (model.safetensors or pytorch_model.bin,
        either possibly sharded with an index; a `Wav2Vec2ForCTC` folder's `wav2vec2.` prefix and
        CTC head are handled). Every problem is a one-line UserError."""
        from liveavatar.io.checkpoint import load_wav2vec2

        model, do_normalize = load_wav2vec2(path, dtype)
        return cls(model, do_normalize)

    @classmethod
    def random(cls, cfg: AudioConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> AudioEncoder:
        """Seeded random weights (the `tiny` preset); leaves the global RNG untouched."""
        with torch.device("meta"):  # no default initialisation: it would draw from the global RNG
            model = Wav2Vec2(cfg)
        model = model.to_empty(device="cpu")
        _random_init(model, torch.Generator().manual_seed(seed))
        return cls(model.to(dtype), True, cfg.feature_rate, cfg.interp_rate)

    @property
    def num_states(self) -> int:
        return self.model.config.num_hidden_layers + 1

    def normalize(self, wave_16k: np.ndarray) -> np.ndarray:
        """The feature extractor's per-utterance normalisation, in float32 as transformers' extractor
        computes it: (x - mean) / sqrt(var + 1e-7). [S] -> [S] float32."""
        wave = np.asarray(wave_16k, dtype=np.float32)
        if wave.ndim != 1:
            raise UserError(f"audio must be mono 1-D samples, got an array of shape {wave.shape}; downmix it first")
        if len(wave) < self.receptive_field + self.hop:
            raise UserError(f"audio has {len(wave)} samples at 16 kHz, fewer than the "
                            f"{self.receptive_field + self.hop} wav2vec2 needs; use a longer audio file")
        if not self.do_normalize:
            return wave.copy()
        return (wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)

    @torch.no_grad()
    def encode(self, samples: np.ndarray) -> torch.Tensor:
        """One wav2vec2 pass over normalised samples [S] -> stacked states [25, T50, H] (model dtype)."""
        p = next(self.model.parameters())
        x = torch.from_numpy(np.ascontiguousarray(samples))[None].to(p.device, p.dtype)  # [1, S]
        with nn.utils.parametrize.cached():  # the positional conv's weight is normalised once per call
            return torch.cat(self.model(x))

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
    "AudioEncoder", "SAMPLE_RATE", "Wav2Vec2", "bucket_features", "conv_frames", "conv_geometry",
    "frame_feature_indices", "num_clips_for_audio", "resample_features", "resampled_len", "wav2vec2_config",
]
