"""Model and pipeline configuration: frozen dataclasses with named presets.

`s2v-14b` holds the real sizes of Wan2.2-S2V-14B + the Live Avatar LoRA (umT5-XXL text encoder,
Wan2.1 VAE, wav2vec2-large-xlsr-53 audio front end). `tiny` has the same structure with tiny widths
so that a whole generation runs on a CPU in seconds; its DiT and VAE sizes equal the official parity
fixtures. CLI flags map onto these fields; nothing here knows about devices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)


@dataclass(frozen=True)
class DiTConfig:
    """The causal S2V diffusion transformer (checkpoint: Wan2.2-S2V-14B/diffusion_pytorch_model*)."""

    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    audio_dim: int = 1024
    audio_layers: int = 25  # wav2vec2 hidden states mixed by the audio encoder
    num_audio_token: int = 4
    audio_inject_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    cond_dim: int = 16
    eps: float = 1e-6
    # Streaming / sink geometry.
    motion_frames: int = 73  # pixel frames of motion context -> (73 + 3) // 4 = 19 latents
    zip_frame_buckets: tuple[int, int, int] = (1, 2, 16)  # FramePack buckets, newest first
    frames_per_block: int = 3  # latent frames denoised per block
    ring_frames: int = 12  # latent frames held by each per-step ring KV cache
    sink_ref_pos: int = 30  # temporal RoPE position of the reference frame at prefill
    rsfm_d_range: tuple[int, int] = (4, 30)  # rolling-sink distance d ~ U{lo..hi}
    # The official RoPE table has 45,000 rows (about 2 h of video). Positions below this limit use
    # the table's exact fp16-rounded factors; larger ones are computed on the fly the same way.
    rope_table_len: int = 45000

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def lat_motion_frames(self) -> int:
        return (self.motion_frames + 3) // 4

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Complex pairs for (time, height, width)."""
        c = self.head_dim // 2
        return c - 2 * (c // 3), c // 3, c // 3


@dataclass(frozen=True)
class T5Config:
    """umT5-XXL encoder (checkpoint: models_t5_umt5-xxl-enc-bf16.pth)."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_dist: int = 128
    text_len: int = 512
    eps: float = 1e-6


@dataclass(frozen=True)
class VAEConfig:
    """Wan2.1 causal 3D VAE (checkpoint: Wan2.1_VAE.pth)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latent_mean: tuple[float, ...] = WAN21_LATENT_MEAN
    latent_std: tuple[float, ...] = WAN21_LATENT_STD
    stride: tuple[int, int, int] = (4, 8, 8)


@dataclass(frozen=True)
class AudioConfig:
    """wav2vec2 front end (checkpoint folder: wav2vec2-large-xlsr-53-english)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24  # 25 hidden states including the input projection
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    conv_dim: tuple[int, ...] = (512,) * 7
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    conv_bias: bool = True
    layer_norm_eps: float = 1e-5
    vocab_size: int = 33
    sample_rate: int = 16000
    feature_rate: int = 50  # wav2vec2 frames per second
    interp_rate: int = 30  # features are linearly resampled to this rate, then sampled at video fps


@dataclass(frozen=True)
class SamplerConfig:
    """Flow-matching Euler schedule of the 4-step distilled student (no guidance)."""

    num_train_timesteps: int = 1000
    shift: float = 3.0
    steps: int = 4


@dataclass(frozen=True)
class Preset:
    name: str
    dit: DiTConfig
    t5: T5Config
    vae: VAEConfig
    audio: AudioConfig
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    fps: int = 25
    infer_frames: int = 48  # video frames per clip, a multiple of 12
    dtype: str = "bfloat16"  # compute dtype of the DiT / VAE / encoders
    lora_rank: int = 128
    lora_alpha: float = 64.0
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "ffn.0", "ffn.2")


S2V_14B = Preset(
    name="s2v-14b",
    dit=DiTConfig(),
    t5=T5Config(),
    vae=VAEConfig(),
    audio=AudioConfig(),
)

TINY = Preset(
    name="tiny",
    # Same sizes as the official parity fixture (tests/fixtures/official_tiny_dit.pt).
    dit=DiTConfig(
        dim=64, ffn_dim=128, num_heads=4, num_layers=4, text_dim=32, audio_dim=32,
        audio_inject_layers=(0, 2, 3),
    ),
    t5=T5Config(
        vocab_size=384, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2,
    ),
    vae=VAEConfig(dim=8),
    audio=AudioConfig(
        hidden_size=32, num_attention_heads=2, intermediate_size=64, conv_dim=(32,) * 7,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
    ),
    dtype="float32",
    lora_rank=4,
    lora_alpha=2.0,
)

PRESETS: dict[str, Preset] = {p.name: p for p in (S2V_14B, TINY)}


def get_preset(name: str) -> Preset:
    from liveavatar.errors import UserError

    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


__all__ = [
    "AudioConfig", "DiTConfig", "PRESETS", "Preset", "S2V_14B", "SamplerConfig", "T5Config",
    "TINY", "VAEConfig", "get_preset",
]
