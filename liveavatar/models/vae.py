"""Wan2.1 causal 3D VAE (checkpoint `Wan2.1_VAE.pth`): encoder, decoder and streaming decode.

A video autoencoder that compresses 8x in space and 4x in time with causal 3D convolutions (frames
see only the past). Video is encoded in chunks of 1, 4, 4, ... frames (T = 1 + 4k frames -> 1 + k
latents) and decoded one latent frame at a time (the first latent gives 1 frame, each later one 4).
Each temporal convolution keeps the last two frames of its input as a cache between chunks; the
decoder's caches live in an explicit `VAEStreamState`, so decoding a latent sequence in consecutive
chunks of any sizes is bit-identical to decoding it at once. Module names equal the checkpoint keys
(`encoder.*`, `conv1`, `conv2`, `decoder.*`, RMS norms as `gamma`), so the official state dict loads
with `load_state_dict(sd, assign=True)`. Semantics follow the official `WanVAE_` (vae2_1.py) and its
`stream_decode` (vae_streaming.py); only the latent mean of the encoder is computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from liveavatar.config import VAEConfig
from liveavatar.errors import UserError

CACHE_T = 2  # frames of history kept per temporal conv (kernel 3, causal)

Caches = list[Tensor | None]


def _slow_cpu_conv3d(x: Tensor) -> bool:
    """Whether PyTorch's CPU conv3d would take its slow reference kernel for input `x` (float32, batch
    of one, B·C·T·H at most 20,480: its oneDNN heuristic)."""
    b, c, t, h, _ = x.shape
    return x.device.type == "cpu" and x.dtype == torch.float32 and b == 1 and b * c * t * h <= 20480


class CausalConv3d(nn.Conv3d):
    """Conv3d padded causally in time: 2*p_t frames in front (zeros or cached frames), symmetric in space.

    A conv with temporal padding owns a cache slot (`slot`, assigned by its encoder/decoder) holding
    the last CACHE_T frames of its (padded) input, which become the front padding of the next chunk.
    """

    def __init__(self, c_in: int, c_out: int, kernel, stride=1, padding=0):
        kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        padding = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        super().__init__(c_in, c_out, kernel, stride, padding=(0, padding[1], padding[2]))
        self.t_pad = 2 * padding[0]
        self.slot: int | None = None

    @property
    def cached(self) -> bool:
        return self.t_pad > 0

    def forward(self, x: Tensor, caches: Caches) -> Tensor:
        # x: [B, C, T, H, W]
        if self.t_pad:
            prev = caches[self.slot]
            x = torch.cat([prev, x], 2) if prev is not None else F.pad(x, (0, 0, 0, 0, self.t_pad, 0))
            caches[self.slot] = x[:, :, -CACHE_T:].clone()
        if _slow_cpu_conv3d(x) and self.stride[0] == 1 and x.shape[3] * x.shape[4] >= 256:
            # One output frame: a 2-D conv over (channel, time) folded together; more: windows as a batch.
            return self._folded_2d(x) if x.shape[2] == self.kernel_size[0] else self._time_in_batch(x)
        return super().forward(x)

    def _folded_2d(self, x: Tensor) -> Tensor:
        """The same convolution for an input that yields one output frame, as a 2-D convolution whose
        input channels are (channel, frame) pairs, in channels-last layout: PyTorch's CPU conv2d takes
        oneDNN there (2-4x faster than the reference conv3d kernel; ~1e-6 relative differences)."""
        b, c, t, h, w = x.shape
        x2 = x.reshape(b, c * t, h, w).contiguous(memory_format=torch.channels_last)
        w2 = self.weight.reshape(self.out_channels, c * t, *self.kernel_size[1:])
        y = F.conv2d(x2, w2.contiguous(memory_format=torch.channels_last), self.bias, self.stride[1:],
                     self.padding[1:])
        return y.unsqueeze(2).contiguous()

    def _time_in_batch(self, x: Tensor) -> Tensor:
        """The same convolution with each output frame's input window as a batch entry: PyTorch's CPU
        conv3d then takes its oneDNN kernel instead of the slow reference one it picks for a batch of
        one small tensor (3-4x faster for the tiny preset's wide, thin layers; same sums, in another
        order: differences of ~1e-6 relative)."""
        b, c, t, h, w = x.shape
        kt = self.kernel_size[0]
        n = t - kt + 1
        windows = x.unfold(2, kt, 1).permute(0, 2, 1, 5, 3, 4).reshape(b * n, c, kt, h, w)
        y = super().forward(windows)  # [B·n, C_out, 1, H', W']
        return y.view(b, n, *y.shape[1:2], *y.shape[3:]).transpose(1, 2)


class RMSNorm(nn.Module):
    """L2-normalise over channels (dim 1), times sqrt(C) and a learned per-channel `gamma`."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu":  # x·rsqrt(Σx²): the same within 1 ulp, several times faster on CPU
            return x * x.square().sum(1, keepdim=True).clamp_min_(1e-24).rsqrt_() * (self.gamma * self.scale)
        return F.normalize(x, dim=1) * (self.gamma * self.scale)


class Upsample2x(nn.Module):
    """Nearest-neighbour x2 in height and width (identical to the official fp32 nearest-exact)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


def _to_images(x: Tensor) -> Tensor:
    # [B, C, T, H, W] -> [B*T, C, H, W]
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def _to_video(x: Tensor, b: int) -> Tensor:
    # [B*T, C, H, W] -> [B, C, T, H, W]
    bt, c, h, w = x.shape
    return x.view(b, bt // b, c, h, w).transpose(1, 2).contiguous()


class ResidualBlock(nn.Module):
    """RMS, SiLU, causal conv 3^3, RMS, SiLU, (dropout), causal conv 3^3; 1^3 shortcut if widths differ."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(c_in), nn.SiLU(), CausalConv3d(c_in, c_out, 3, padding=1),
            RMSNorm(c_out), nn.SiLU(), nn.Identity(), CausalConv3d(c_out, c_out, 3, padding=1),
        )
        self.shortcut = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor, caches: Caches, first: bool = False) -> Tensor:
        r = self.residual
        h = x if self.shortcut is None else self.shortcut(x)
        y = r[2](F.silu(r[0](x), inplace=True), caches)
        y = r[6](F.silu(r[3](y), inplace=True), caches)
        return y.add_(h)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (1x1 conv qkv / proj), residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, caches: Caches | None = None, first: bool = False) -> Tensor:
        # x: [B, C, T, H, W]
        b, c, t, h, w = x.shape
        y = self.to_qkv(self.norm(_to_images(x)))  # [B*T, 3C, H, W]
        q, k, v = y.flatten(2).transpose(1, 2).unsqueeze(1).contiguous().chunk(3, dim=-1)  # [B*T, 1, HW, C]
        y = F.scaled_dot_product_attention(q, k, v)
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return _to_video(y, b).add_(x)


class Resample(nn.Module):
    """Spatial x2 up/down-sampling per frame, with optional temporal x2 (`*3d` modes).

    upsample3d: `time_conv` (causal, kernel 3) doubles the channels, which are interleaved into two
    frames; it is skipped for the first latent of a stream, which therefore decodes to one frame.
    downsample3d: `time_conv` (kernel 3, stride 2) runs over [last frame of the previous chunk, x];
    the first chunk (one frame) only fills the cache.
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        self.slot: int | None = None
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    @property
    def cached(self) -> bool:
        return self.mode == "downsample3d"

    def forward(self, x: Tensor, caches: Caches, first: bool = False) -> Tensor:
        # x: [B, C, T, H, W]
        b, c, t, h, w = x.shape
        if self.mode == "upsample3d" and not first:
            x = self.time_conv(x, caches)  # [B, 2C, T, H, W] -> frames 2t, 2t+1
            x = x.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        x = _to_video(self.resample(_to_images(x)), b)
        if self.mode == "downsample3d":
            prev = caches[self.slot]
            caches[self.slot] = x[:, :, -1:].clone()
            if prev is not None:
                x = self.time_conv(torch.cat([prev, x], 2), caches)
        return x


def _assign_slots(root: nn.Module) -> int:
    """Give every cached module under `root` its index in the cache list; returns the slot count."""
    n = 0
    for m in root.modules():
        if isinstance(m, (CausalConv3d, Resample)) and m.cached:
            m.slot = n
            n += 1
    return n


def _decoder_stages(cfg: VAEConfig) -> list[tuple[int, int, str | None]]:
    """(input width, output width, resample mode or None) of each decoder up-sampling stage."""
    dims = [cfg.dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
    t_up = cfg.temperal_downsample[::-1]
    stages = []
    for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        c_in = c_in if i == 0 else c_in // 2  # the previous stage's resample halved the channels
        mode = None if i == len(cfg.dim_mult) - 1 else ("upsample3d" if t_up[i] else "upsample2d")
        stages.append((c_in, c_out, mode))
    return stages


class Encoder3d(nn.Module):
    """Video [B, 3, T, H, W] -> [B, 2*z_dim, T', H/8, W/8] for one chunk, using and updating `caches`."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(c_in, c_out))
                c_in = c_out
            if i != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
                blocks.append(Resample(c_out, mode))
        self.downsamples = nn.Sequential(*blocks)
        c = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c))
        self.head = nn.Sequential(RMSNorm(c), nn.SiLU(), CausalConv3d(c, cfg.z_dim * 2, 3, padding=1))
        self.num_slots = _assign_slots(self)

    def forward(self, x: Tensor, caches: Caches) -> Tensor:
        x = self.conv1(x, caches)
        for block in (*self.downsamples, *self.middle):
            x = block(x, caches)
        return self.head[2](F.silu(self.head[0](x), inplace=True), caches)


class Decoder3d(nn.Module):
    """One latent frame [B, z_dim, 1, h, w] -> video [B, 3, 1 or 4, 8h, 8w], using and updating `caches`."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        stages = _decoder_stages(cfg)
        c0 = stages[0][0]
        self.conv1 = CausalConv3d(cfg.z_dim, c0, 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(c0, c0), AttentionBlock(c0), ResidualBlock(c0, c0))
        blocks: list[nn.Module] = []
        for c_in, c_out, mode in stages:
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(c_in, c_out))
                c_in = c_out
            if mode is not None:
                blocks.append(Resample(c_out, mode))
        self.upsamples = nn.Sequential(*blocks)
        c = stages[-1][1]
        self.head = nn.Sequential(RMSNorm(c), nn.SiLU(), CausalConv3d(c, 3, 3, padding=1))
        self.num_slots = _assign_slots(self)

    def forward(self, x: Tensor, caches: Caches, first: bool) -> Tensor:
        x = self.conv1(x, caches)
        for block in (*self.middle, *self.upsamples):
            x = block(x, caches, first)
        return self.head[2](F.silu(self.head[0](x), inplace=True), caches)


@dataclass
class VAEStreamState:
    """Decoder state carried between `decode_stream` calls: one cache per temporal conv, plus whether
    the first latent of the stream has been decoded. Each cache is [B, C, 2, H_s, W_s] once two latent
    frames have been decoded, and its size stays fixed after that (see `stream_state_nbytes`)."""

    caches: Caches = field(default_factory=list)
    started: bool = False

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches if c is not None)


def stream_state_nbytes(cfg: VAEConfig, h: int, w: int, dtype: torch.dtype, batch: int = 1) -> int:
    """Bytes of a `VAEStreamState` for latents of size h x w (pixels 8h x 8w) after >= 2 latent frames."""
    stages = _decoder_stages(cfg)
    c0 = stages[0][0]
    elems = cfg.z_dim * h * w + 4 * c0 * h * w  # decoder conv1 + 2 middle residual blocks
    for c_in, c_out, mode in stages:
        elems += (c_in + (2 * cfg.num_res_blocks + 1) * c_out) * h * w
        if mode == "upsample3d":
            elems += c_out * h * w  # time_conv input
        if mode is not None:
            h, w = 2 * h, 2 * w
    elems += stages[-1][1] * h * w  # head conv
    itemsize = torch.empty((), dtype=dtype).element_size()
    return CACHE_T * batch * elems * itemsize


class WanVAE(nn.Module):
    """The Wan2.1 VAE. Raw methods work on unnormalised latents (`mu`); `encode`/`decode`/`decode_stream`
    on latents normalised with cfg.latent_mean / latent_std, as the DiT sees them."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = nn.Conv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = nn.Conv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    def _stats(self, ref: Tensor) -> tuple[Tensor, Tensor]:
        """Latent mean / std as [1, z_dim, 1, 1, 1] float32 tensors on ref's device, uploaded once per
        device (not buffers: a cast of the module to bf16 must not round them)."""
        cache = self.__dict__.setdefault("_stats_cache", {})
        if ref.device not in cache:
            stats = torch.tensor([self.cfg.latent_mean, self.cfg.latent_std], dtype=torch.float32)
            cache[ref.device] = tuple(stats.to(ref.device).view(2, 1, -1, 1, 1, 1).unbind(0))
        return cache[ref.device]

    @torch.no_grad()
    def encode_raw(self, video: Tensor) -> Tensor:
        """Video [B, 3, 1 + 4k, H, W] in [-1, 1] (H, W multiples of 8) -> mu [B, z_dim, 1 + k, H/8, W/8]."""
        return self._mu(self._features(video))

    def _features(self, video: Tensor) -> Tensor:
        """The encoder's output for every latent frame (before `conv1`), chunk by chunk (1, 4, 4, ...)."""
        b, c, t, h, w = video.shape
        if c != 3 or t % 4 != 1 or h % 8 or w % 8:
            raise UserError(
                f"VAE encode got video of shape {tuple(video.shape)}; pass [B, 3, T, H, W] with "
                "T = 1 + 4k frames and H, W multiples of 8"
            )
        video = video.to(self.dtype)
        caches: Caches = [None] * self.encoder.num_slots
        out = [self.encoder(video[:, :, :1], caches)]
        out += [self.encoder(video[:, :, i : i + 4], caches) for i in range(1, t, 4)]
        return torch.cat(out, 2)

    def _mu(self, features: Tensor) -> Tensor:
        z = self.cfg.z_dim
        return F.conv3d(features, self.conv1.weight[:z], self.conv1.bias[:z])  # mu only

    @torch.no_grad()
    def encode_with_prefix(self, video: Tensor, prefix_frames: int) -> tuple[Tensor, Tensor]:
        """(encode(video), encode(video[:, :, :prefix_frames])) for the cost of the first alone: the
        encoder is causal and runs chunk by chunk, so the prefix's latents are the first ones of the
        whole; the last 1x1 conv runs on the prefix's latents as a separate tensor, as encoding the
        prefix alone does (CPU and GPU kernels are chosen by shape), so both are bit-identical to two
        calls. `prefix_frames`: 1 + 4j, at most the video's length."""
        t = video.shape[2]
        if prefix_frames % 4 != 1 or not 1 <= prefix_frames <= t:
            raise ValueError(f"prefix_frames must be 1 + 4j and at most {t}, got {prefix_frames}")
        feats = self._features(video)
        prefix = feats[:, :, : (prefix_frames + 3) // 4].contiguous()
        return self._normalize(self._mu(feats)), self._normalize(self._mu(prefix))

    @torch.no_grad()
    def decode_stream_raw(self, z: Tensor, state: VAEStreamState) -> Tensor:
        """z: [B, z_dim, n, h, w] unnormalised, n >= 1 -> video [B, 3, 4n (first call: 4n - 3), 8h, 8w]."""
        if z.ndim != 5 or z.shape[1] != self.cfg.z_dim or z.shape[2] < 1:
            raise UserError(
                f"VAE decode got latents of shape {tuple(z.shape)}; pass [B, {self.cfg.z_dim}, n >= 1, h, w]"
            )
        if not state.caches:
            state.caches = [None] * self.decoder.num_slots
        z = z.to(self.dtype)
        out = []
        for i in range(z.shape[2]):
            # One latent frame at a time, conv2 included, so any chunking gives identical bits.
            out.append(self.decoder(self.conv2(z[:, :, i : i + 1]), state.caches, not state.started))
            state.started = True
        return torch.cat(out, 2)

    def decode_raw(self, z: Tensor) -> Tensor:
        """z: [B, z_dim, n, h, w] unnormalised -> video [B, 3, 4n - 3, 8h, 8w] (not clamped)."""
        return self.decode_stream_raw(z, VAEStreamState())

    def encode(self, video: Tensor) -> Tensor:
        """video: [B, 3, 1 + 4k, H, W] in [-1, 1] -> normalised latents [B, z_dim, 1 + k, H/8, W/8]."""
        return self._normalize(self.encode_raw(video))

    def _normalize(self, mu: Tensor) -> Tensor:
        mean, std = self._stats(mu)
        return ((mu.float() - mean) / std).to(mu.dtype)

    def denormalize(self, z: Tensor) -> Tensor:
        mean, std = self._stats(z)
        return (z.float() * std + mean).to(self.dtype)

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latents [B, z_dim, n, h, w] -> video [B, 3, 4n - 3, 8h, 8w] (not clamped)."""
        return self.decode_raw(self.denormalize(z))

    def decode_stream(self, z: Tensor, state: VAEStreamState) -> Tensor:
        """Decode the next normalised latents [B, z_dim, n, h, w] of a stream; `state` carries the caches."""
        return self.decode_stream_raw(self.denormalize(z), state)


__all__ = ["VAEStreamState", "WanVAE", "stream_state_nbytes"]
