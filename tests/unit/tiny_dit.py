"""Shared test helpers: drive a DiT through a sink prefill and streaming block forwards, with the
attention contexts the denoise stage builds."""

import pytest
import torch

from liveavatar.engine.denoise import block_attention, sink_prefill
from liveavatar.models.layout import SinkLayout
from liveavatar.runtime.kv_cache import RingKVCache, SinkCache


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's ops are too small for intra-op threads; on a busy 2-core machine they only
    contend (a tenfold slowdown), so a module importing this runs single-threaded and restores the
    setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def prefill(model, ref, motion, text, sink):
    """The sink prefill of `model` into `sink` (ref: [1, C, 1, h, w], motion: [1, C, T, h, w])."""
    model.prefill_sink(ref, motion, text, sink_prefill(model.cfg, sink, sink.k.device))


def forward(model, z, t, audio, text, ring, sink, frame_start, d):
    """One block forward at latent frame `frame_start` with rolling-sink distance d -> velocity."""
    ctx = block_attention(model.cfg, ring, sink, frame_start, d, z.shape[2], sink.k.device)
    return model(z, t, audio, text, ctx)


def run_blocks(model, cfg, dtype=torch.float32, n_blocks=6, seed=1):
    """Prefill + `n_blocks` block forwards on seeded random inputs at an 8x8 latent (the ring wraps at
    F0 = 12) -> (velocities [n, 1, C, 3, h, w], sink cache, ring cache)."""
    g = torch.Generator().manual_seed(seed)
    h = w = 8
    layout = SinkLayout(h, w)
    sink = SinkCache.allocate(cfg, layout, dtype)
    ring = RingKVCache.allocate(cfg, layout.fs, dtype, sink_tokens=layout.num_tokens)
    ctx = torch.randn(7, cfg.text_dim, generator=g)
    ref = torch.randn(1, cfg.in_dim, 1, h, w, generator=g)
    motion = torch.randn(1, cfg.in_dim, 19, h, w, generator=g)
    vel = []
    with torch.no_grad():
        text = model.embed_text(ctx)
        prefill(model, ref, motion, text, sink)
        for n in range(n_blocks):
            z = torch.randn(1, cfg.in_dim, 3, h, w, generator=g)
            audio = torch.randn(1, 25, cfg.audio_dim, 12, generator=g)
            vel.append(forward(model, z, 700.0, audio, text, ring, sink, frame_start=3 * n, d=6))
    return torch.stack(vel), sink, ring
