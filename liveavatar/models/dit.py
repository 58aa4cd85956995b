"""The causal Wan2.2-S2V diffusion transformer as Live Avatar runs it (block-wise streaming).

A 14B Wan DiT (40 blocks, dim 5120) with the S2V extras: a causal audio encoder (SiLU-weighted mix
of 25 wav2vec2 layers, causal Conv1d stack, 4 local + 1 padding token and one global vector per
latent frame), 12 audio cross-attention injectors with AdaLayerNorm, a FramePack motion packer,
a pose encoder whose input is always zero (so only its bias contributes) and a 3-entry token-type
embedding. Module names equal the checkpoint keys (including the `casual_` spelling), so
`Wan2.2-S2V-14B/diffusion_pytorch_model*.safetensors` loads without renaming.

Two entry points, both against explicit caches (`liveavatar.runtime.kv_cache`):
- `prefill_sink`: the t = 0 pass over reference + motion tokens that fills the per-layer sink
  K (pre-RoPE) / V; no audio, output discarded.
- `forward`: one 3-latent-frame block at one denoising timestep: writes its roped K/V into the
  step's ring cache and attends to [active ring ∪ re-roped sink]. Returns the velocity.

Numerics follow the official model: modulation, time embedding, head and audio encoder in fp32;
the residual stream fp32 inside a block and cast to the weight dtype at its end; fp16-rounded RoPE
factors; and the official cast of the residual to bf16 before `norm3` (text cross-attention), kept
even in float32 runs (`bf16_norm3=True`, switchable).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from liveavatar.config import DiTConfig
from liveavatar.models.rope import apply_rope


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """[cos(t·ω), sin(t·ω)] with ω_j = 10000^(-j/half), computed in float64. t: [n] -> [n, dim]."""
    half = dim // 2
    t = t.to(torch.float64)
    ang = torch.outer(t, torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device) / half))
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1)


def linear_f32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear evaluated in float32 whatever the weight dtype (the official fp32 autocast regions)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention, scale 1/sqrt(d). q: [B, Lq, N, d], k/v: [B, Lk, N, d], mask: None (all keys)
    or [Lk] bool (the keys to attend to) -> [B, Lq, N·d]."""
    if mask is not None:
        mask = mask.view(1, 1, 1, -1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    """q/k/v/o projections with RMSNorm over the full width on q and k (self- and cross-attention)."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim))

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, L, D] -> q, k (normed), v: [B, L, N, d]."""
        return self.heads(self.norm_q(self.q(x))), self.heads(self.norm_k(self.k(x))), self.heads(self.v(x))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache) -> torch.Tensor:
        """Self-attention core: RoPE on q and k, the layer's keys and values from `cache` (a `LayerKV`:
        `rope`, `kv(k, k_roped, v)`, `mask`), softmax attention. q, k, v: [B, L, N, d] -> [B, L, N·d].
        Sequence parallelism wraps this."""
        cos, sin = cache.rope
        keys, values = cache.kv(k, apply_rope(k, cos, sin), v)
        return attention(apply_rope(q, cos, sin), keys, values, cache.mask)

    def context_kv(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys (normed) and values of a context. ctx: [B, Lk, D] -> k, v: [B, Lk, N, d]."""
        return self.heads(self.norm_k(self.k(ctx))), self.heads(self.v(ctx))

    def cross(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Unmasked cross-attention. x: [B, Lq, D], kv: `context_kv` of the context -> [B, Lq, D]."""
        q = self.heads(self.norm_q(self.q(x)))
        return self.o(attention(q, *kv))


class Block(nn.Module):
    """Self-attention against the keys/values of an attention context, text cross-attention, GELU-tanh FFN."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.eps = cfg.eps
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)
        self.self_attn = Attention(d, cfg.num_heads, cfg.eps)
        self.norm3 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = Attention(d, cfg.num_heads, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.bf16_norm3 = True

    def forward(self, x, e0, text_kv, cache, frames: int, skip_tail: bool = False):
        """x: [B, L, D]; e0: [B, G, 6, D] fp32 (one modulation row per group of L/G tokens);
        text_kv: this block's `cross_attn.context_kv` of the text (or the text [B, 512, D]: computed here,
        where weights streamed or gathered per block are in place); cache: the layer's `LayerKV` (`rope`
        tables of the L tokens, `kv(k, k_roped, v)`, `mask`). Returns [B, L, D] in x.dtype."""
        dtype = x.dtype
        b, seq, dim = x.shape
        mod = (self.modulation.float().unsqueeze(0) + e0).unbind(2)  # 6 × [B, G, D]

        def modulate(h, shift, scale):  # h: [B, L, D] fp32; per-group shift/scale
            return (h.view(b, frames, -1, dim) * (1 + scale[:, :, None]) + shift[:, :, None]).view(b, seq, dim)

        def gate(y, g):
            return (y.float().view(b, frames, -1, dim) * g[:, :, None]).view(b, seq, dim)

        h = modulate(layer_norm(x, self.eps).float(), mod[0], mod[1]).to(dtype)
        q, k, v = self.self_attn.qkv(h)
        xr = x.float() + gate(self.self_attn.o(self.self_attn.attend(q, k, v, cache)), mod[2])
        if skip_tail:  # sink prefill, last layer: the rest of the block only feeds a discarded output
            return xr.to(dtype)
        # The official block rounds the residual to bf16 before norm3 and returns bf16, in any dtype.
        hn = xr.to(torch.bfloat16).float() if self.bf16_norm3 else xr
        hn = F.layer_norm(hn, (dim,), self.norm3.weight.float(), self.norm3.bias.float(), self.eps)
        hn = (hn.to(torch.bfloat16) if self.bf16_norm3 else hn).to(dtype)
        if isinstance(text_kv, torch.Tensor):
            text_kv = self.cross_attn.context_kv(text_kv)
        xr = xr + self.cross_attn.cross(hn, text_kv).float()
        h = modulate(layer_norm(xr, self.eps), mod[3], mod[4]).to(dtype)
        xr = xr + gate(self.ffn(h), mod[5])
        return xr.to(dtype)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x: [B, F·fs, D]; e: [B, F, D] fp32 per-frame time embedding -> [B, F·fs, out·prod(patch)]."""
        b, seq, dim = x.shape
        f = e.shape[1]
        shift, scale = (self.modulation.float().unsqueeze(0) + e.unsqueeze(2)).unbind(2)  # [B, F, D]
        h = layer_norm(x, self.eps).float().view(b, f, -1, dim) * (1 + scale[:, :, None]) + shift[:, :, None]
        return linear_f32(self.head, h.view(b, seq, dim)).to(x.dtype)


class CausalConv1d(nn.Module):
    """Conv1d with (k-1) frames of left replicate padding."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.pad = kernel - 1
        self.conv = nn.Conv1d(cin, cout, kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # fp32 region
        x = F.pad(x, (self.pad, 0), mode="replicate")
        bias = None if self.conv.bias is None else self.conv.bias.float()
        return F.conv1d(x, self.conv.weight.float(), bias, stride=self.conv.stride)


class MotionEncoder(nn.Module):
    """Causal temporal conv stack: per latent frame, `num_token` local tokens + 1 padding token, and
    one global vector (shares conv2/conv3 with the local branch)."""

    def __init__(self, in_dim: int, out_dim: int, num_token: int):
        super().__init__()
        self.num_token = num_token
        self.conv1_local = CausalConv1d(in_dim, out_dim // 4 * num_token, 3, stride=1)
        self.conv1_global = CausalConv1d(in_dim, out_dim // 4, 3, stride=1)
        self.conv2 = CausalConv1d(out_dim // 4, out_dim // 2, 3, stride=2)
        self.conv3 = CausalConv1d(out_dim // 2, out_dim, 3, stride=2)
        self.final_linear = nn.Linear(out_dim, out_dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, out_dim))

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        """x: [b, C/4, T] after conv1 + norm + act -> [b, T', C]."""
        x = F.silu(layer_norm(self.conv2(x).transpose(1, 2), 1e-6)).transpose(1, 2)
        return F.silu(layer_norm(self.conv3(x).transpose(1, 2), 1e-6))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, C_in] fp32 -> global [B, T', 1, D], local [B, T', num_token + 1, D]."""
        b = x.shape[0]
        xc = x.transpose(1, 2)
        h = self.conv1_local(xc)  # [B, n·c, T]
        h = h.unflatten(1, (self.num_token, -1)).flatten(0, 1).transpose(1, 2)  # [B·n, T, c]
        h = F.silu(layer_norm(h, 1e-6)).transpose(1, 2)
        loc = self._tail(h).unflatten(0, (b, self.num_token)).transpose(1, 2)  # [B, T', n, D]
        pad = self.padding_tokens.float().expand(b, loc.shape[1], 1, -1)
        loc = torch.cat([loc, pad], dim=2)
        g = F.silu(layer_norm(self.conv1_global(xc).transpose(1, 2), 1e-6)).transpose(1, 2)
        g = linear_f32(self.final_linear, self._tail(g)).unsqueeze(2)  # [B, T', 1, D]
        return g, loc


class CausalAudioEncoder(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.encoder = MotionEncoder(cfg.audio_dim, cfg.dim, cfg.num_audio_token)
        self.weights = nn.Parameter(torch.full((1, cfg.audio_layers, 1, 1), 0.01))

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats: [B, 25, C_a, T] -> global [B, T', 1, D], local [B, T', 5, D] (fp32)."""
        w = F.silu(self.weights.float())
        mixed = (feats.float() * w / w.sum(dim=1, keepdim=True)).sum(dim=1)  # [B, C_a, T]
        return self.encoder(mixed.transpose(1, 2))


class AdaLayerNorm(nn.Module):
    """LayerNorm(eps 1e-5, no affine) modulated by shift, scale = Linear(SiLU(temb)) (shift first)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x: [n, L, D]; temb: [n, D]."""
        shift, scale = self.linear(F.silu(temb)).chunk(2, dim=1)
        return layer_norm(x, 1e-5) * (1 + scale[:, None]) + shift[:, None]


class AudioInjector(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        n = len(cfg.audio_inject_layers)
        self.injector = nn.ModuleList(Attention(cfg.dim, cfg.num_heads, cfg.eps) for _ in range(n))
        self.injector_adain_layers = nn.ModuleList(AdaLayerNorm(cfg.dim) for _ in range(n))


class FramePacker(nn.Module):
    """FramePack: the newest motion latent at full resolution, the next 2 at 1/2, the oldest 16 at 1/4."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.buckets = cfg.zip_frame_buckets
        c, d = cfg.in_dim, cfg.dim
        self.proj = nn.Conv3d(c, d, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(c, d, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(c, d, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    def forward(self, motion: torch.Tensor) -> torch.Tensor:
        """motion: [B, C, T_m, h, w] (oldest first) -> tokens [B, fs + h/4·w/4 + 4·h/8·w/8, D]."""
        b, c, t, h, w = motion.shape
        total = sum(self.buckets)
        buf = motion.new_zeros(b, c, total, h, w)
        n = min(total, t)
        if n > 0:
            buf[:, :, total - n:] = motion[:, :, t - n:]
        b1, b2, b16 = self.buckets
        old, mid, new = buf.split([b16, b2, b1], dim=2)
        toks = [self.proj(new), self.proj_2x(mid), self.proj_4x(old)]
        return torch.cat([x.flatten(2).transpose(1, 2) for x in toks], dim=1)


class CausalS2VDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.cond_encoder = nn.Conv3d(cfg.cond_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.casual_audio_encoder = CausalAudioEncoder(cfg)
        self.audio_injector = AudioInjector(cfg)
        self.trainable_cond_mask = nn.Embedding(3, d)
        self.frame_packer = FramePacker(cfg)
        self.inject_index = {layer: j for j, layer in enumerate(cfg.audio_inject_layers)}

    # ---- conditioning -------------------------------------------------------------------------

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """context: [L_txt, text_dim] (trimmed T5 output) -> [1, text_len, D], zero rows padded first."""
        pad = context.new_zeros(self.cfg.text_len - context.shape[0], context.shape[1])
        ctx = torch.cat([context, pad]).to(self.text_embedding[0].weight.dtype)
        return self.text_embedding(ctx.unsqueeze(0))

    def text_kv(self, text: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each block's text cross-attention keys and values (`embed_text` output -> [B, 512, N, d]
        each); computed once per session, they stand for `text` in `forward` and `prefill_sink`."""
        return [block.cross_attn.context_kv(text) for block in self.blocks]

    def block_time(self, t: torch.Tensor | float, batch: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The time embedding of a block forward at timestep t ([B] tensor or a number): e [B, F, D] for
        the head and e0 [B, F, 6, D] for the blocks, fp32. A function of t only: cached per timestep,
        it stands for `t` in `forward`."""
        device = self.patch_embedding.weight.device
        t = torch.as_tensor(t, dtype=torch.float32, device=device).reshape(-1).expand(batch)
        e, e0 = self.time_modulation(t[:, None].expand(batch, frames))
        return e, e0[0]

    def time_modulation(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t: [B, F] -> e (per-frame embedding, [B, F, D]) and e0 at t and at 0 ([2, B, F, 6, D]), fp32."""
        tt = torch.cat([t.reshape(1, *t.shape), torch.zeros_like(t).unsqueeze(0)])  # [2, B, F]
        s = sinusoidal_embedding(self.cfg.freq_dim, tt.flatten()).float()
        e = linear_f32(self.time_embedding[2], F.silu(linear_f32(self.time_embedding[0], s)))
        e0 = linear_f32(self.time_projection[1], F.silu(e)).unflatten(1, (6, self.cfg.dim))
        return e.view(*tt.shape, -1)[0], e0.view(*tt.shape, 6, -1)

    def encode_audio(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio: [B, 25, C_a, 12] block features -> global [B, 3, D], local [B, 3, 5, D] (weight dtype).
        Left-padded with `motion_frames` copies of its first frame; the last 3 latent frames are kept."""
        pad = audio[..., :1].expand(*audio.shape[:-1], self.cfg.motion_frames)
        g, loc = self.casual_audio_encoder(torch.cat([pad, audio], dim=-1))
        keep = self.cfg.lat_motion_frames
        dtype = self.patch_embedding.weight.dtype
        return g[:, keep:, 0].to(dtype), loc[:, keep:].to(dtype)

    def _inject_audio(self, layer: int, x: torch.Tensor, a_glob: torch.Tensor, a_loc: torch.Tensor) -> torch.Tensor:
        """Per latent frame: x[frame] += CrossAttn(AdaLN(x[frame], a_glob[frame]), a_loc[frame])."""
        j = self.inject_index[layer]
        b, seq, dim = x.shape
        f = a_glob.shape[1]
        h = x.view(b * f, seq // f, dim)
        h = self.audio_injector.injector_adain_layers[j](h, a_glob.reshape(b * f, dim)).to(x.dtype)
        inj = self.audio_injector.injector[j]
        r = inj.cross(h, inj.context_kv(a_loc.reshape(b * f, -1, dim)))
        return x + r.view(b, seq, dim)

    # ---- sink prefill -------------------------------------------------------------------------

    def prefill_sink(self, ref_latent: torch.Tensor, motion_latents: torch.Tensor, text: torch.Tensor,
                     ctx) -> None:
        """The t = 0 pass over the reference + motion tokens, no audio; `ctx` (a `SinkPrefill`) stores
        each layer's keys (before RoPE) and values in the sink. The output is discarded.

        ref_latent: [B, C, 1, h, w]; motion_latents: [B, C, T_m, h, w]; text: `embed_text` output."""
        cfg = self.cfg
        dtype = self.patch_embedding.weight.dtype
        ref = self.patch_embedding(ref_latent.to(dtype)).flatten(2).transpose(1, 2)
        mot = self.frame_packer(motion_latents.to(dtype))
        mask = self.trainable_cond_mask.weight.to(dtype)
        x = torch.cat([ref + mask[1], mot + mask[2]], dim=1)  # [B, Lc, D]
        b = x.shape[0]
        _, e0 = self.time_modulation(x.new_zeros(b, cfg.frames_per_block, dtype=torch.float32))
        e0 = e0[1, :, :1]  # sink tokens use the t = 0 row of frame 0: [B, 1, 6, D]
        for i, block in enumerate(self.blocks):
            text_kv = text if isinstance(text, torch.Tensor) else text[i]
            x = block(x, e0, text_kv, ctx.layer(i), frames=1, skip_tail=i == len(self.blocks) - 1)
            ctx.done(i)
        ctx.finish()

    # ---- streaming block forward --------------------------------------------------------------

    def forward(self, z: torch.Tensor, t, audio: torch.Tensor, text, ctx) -> torch.Tensor:
        """Velocity for one block.

        z: [B, C, F=3, h, w] noisy latents; t: [B] tensor on z's device (or a number) timestep, or its
        `block_time`; audio: [B, 25, C_a, 4·F] this block's audio features; text: `embed_text` output
        or its `text_kv`; ctx: the block's `BlockAttention` (per layer: the step's ring cache at the
        block's slot followed by the sink re-roped for this call, RoPE tables of its tokens). Returns
        v: [B, C, F, h, w] in the weight dtype."""
        cfg = self.cfg
        dtype = self.patch_embedding.weight.dtype
        b, _, f, h, w = z.shape
        h2, w2 = h // cfg.patch_size[1], w // cfg.patch_size[2]
        a_glob, a_loc = self.encode_audio(audio)
        x = self.patch_embedding(z.to(dtype)).flatten(2).transpose(1, 2)
        x = x + self.cond_encoder.bias.to(dtype) + self.trainable_cond_mask.weight[0].to(dtype)

        e, e0 = t if isinstance(t, tuple) else self.block_time(t, b, f)  # [B, F, D], [B, F, 6, D]
        for i, block in enumerate(self.blocks):
            text_kv = text if isinstance(text, torch.Tensor) else text[i]
            x = block(x, e0, text_kv, ctx.layer(i), frames=f)
            ctx.done(i)
            if i in self.inject_index:
                x = self._inject_audio(i, x, a_glob, a_loc)
        ctx.finish()

        out = self.head(x, e)  # [B, F·fs, 64]
        return self.unpatchify(out, f, h2, w2)

    def unpatchify(self, x: torch.Tensor, f: int, h2: int, w2: int) -> torch.Tensor:
        """[B, F·h2·w2, p_t·p_h·p_w·C] -> [B, C, F·p_t, h2·p_h, w2·p_w]."""
        pt, ph, pw = self.cfg.patch_size
        c = self.cfg.out_dim
        x = x.view(x.shape[0], f, h2, w2, pt, ph, pw, c)
        return torch.einsum("bfhwpqrc->bcfphqwr", x).reshape(x.shape[0], c, f * pt, h2 * ph, w2 * pw)
