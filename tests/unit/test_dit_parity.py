"""The causal S2V DiT against reference outputs of the official classes (tests/fixtures/PARITY.md).

Weights under the official key names load into our model; the sink prefill and five streaming block
forwards (including a ring wrap and a rolled sink) must reproduce the stored sink K/V, ring K/V and
velocities within 1e-4 (float32).
"""

from pathlib import Path

import pytest
import torch
from tiny_dit import forward, prefill

from liveavatar.config import DiTConfig
from liveavatar.models.dit import CausalS2VDiT
from liveavatar.models.layout import SinkLayout
from liveavatar.runtime.kv_cache import RingKVCache, SinkCache

FIX = Path(__file__).resolve().parents[1] / "fixtures"
TOL = 1e-4


def _config(fx) -> DiTConfig:
    c = fx["config"]
    return DiTConfig(
        dim=c["dim"], ffn_dim=c["ffn_dim"], num_heads=c["num_heads"], num_layers=c["num_layers"],
        in_dim=c["in_dim"], out_dim=c["out_dim"], freq_dim=c["freq_dim"], text_dim=c["text_dim"],
        text_len=c["text_len"], audio_dim=c["audio_dim"], num_audio_token=c["num_audio_token"],
        audio_inject_layers=tuple(c["audio_inject_layers"]), cond_dim=c["cond_dim"], eps=c["eps"],
    )


def _load(name):
    """The fixture, its config, and our model holding the official weights (strict key match)."""
    fx = torch.load(FIX / name, weights_only=True)
    cfg = _config(fx)
    model = CausalS2VDiT(cfg)
    model.load_state_dict(fx["state_dict"], strict=True)
    return fx, cfg, model.eval()


def _run(name):
    fx, cfg, model = _load(name)
    inp, meta = fx["inputs"], fx["meta"]
    h, w = meta["lat_h"], meta["lat_w"]
    layout = SinkLayout(h, w)
    sink = SinkCache.allocate(cfg, layout, torch.float32)
    ring = RingKVCache.allocate(cfg, layout.fs, torch.float32, sink_tokens=layout.num_tokens)
    with torch.no_grad():
        text = model.embed_text(inp["context"])
        prefill(model, inp["ref_latents"], inp["motion_latents"], text, sink)
        vel, ring_k0, ring_v0 = [], [], []
        for i, f0 in enumerate(meta["block_F0"]):
            v = forward(model, inp["z"][i : i + 1], inp["t_block"], inp["audio"][i], text, ring, sink,
                        frame_start=f0, d=fx["d_draws"][i])
            vel.append(v[0])
            ring_k0.append(ring.k[0, 0].clone())
            ring_v0.append(ring.v[0, 0].clone())
    return fx, sink, ring, torch.stack(vel), torch.stack(ring_k0), torch.stack(ring_v0)


def _err(a, b):
    a, b = a.double(), b.double()
    return (a - b).abs().max().item(), ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", ["official_tiny_dit.pt", "official_tiny_dit_nonsquare.pt"])
def test_dit_matches_official(name):
    fx, sink, ring, vel, rk0, rv0 = _run(name)
    out = fx["outputs"]
    n = out["sink_cond_end"][0]
    assert sink.layout.num_tokens == n
    checks = {
        "sink_k": (sink.k[:, 0], out["sink_cond_k"]),
        "sink_v": (sink.v[:, 0], out["sink_cond_v"]),
        "ring_k_layer0": (rk0, out["ring_k_layer0"]),
        "ring_v_layer0": (rv0, out["ring_v_layer0"]),
        "ring_k_final": (ring.k[:, 0], out["ring_k_all_final"]),
        "ring_v_final": (ring.v[:, 0], out["ring_v_all_final"]),
        "velocity": (vel, out["velocity"]),
    }
    report = {}
    for key, (ours, ref) in checks.items():
        assert ours.shape == ref.shape, (key, ours.shape, ref.shape)
        report[key] = _err(ours, ref)
    print(name, {k: f"max_abs={a:.2e} rel={r:.2e}" for k, (a, r) in report.items()})
    for key, (max_abs, _) in report.items():
        assert max_abs <= TOL, (key, max_abs)


def test_rsfm_distance_matters_at_wrap():
    """The rolled reference position must feed the output: a different d at F0 = 36 changes it."""
    fx, cfg, model = _load("official_tiny_dit.pt")
    inp = fx["inputs"]
    layout = SinkLayout(8, 8)
    outs = []
    with torch.no_grad():
        text = model.embed_text(inp["context"])
        for d in (6, 4):
            sink = SinkCache.allocate(cfg, layout, torch.float32)
            ring = RingKVCache.allocate(cfg, layout.fs, torch.float32, sink_tokens=layout.num_tokens)
            prefill(model, inp["ref_latents"], inp["motion_latents"], text, sink)
            outs.append(forward(model, inp["z"][4:5], inp["t_block"], inp["audio"][4], text, ring, sink, 36, d))
    assert (outs[0] - outs[1]).abs().max() > 1e-4


def test_block_forward_past_the_official_two_hour_table():
    """Positions beyond the official 45,000-row RoPE table (about 2 h) keep working."""
    fx, cfg, model = _load("official_tiny_dit.pt")
    inp = fx["inputs"]
    layout = SinkLayout(8, 8)
    sink = SinkCache.allocate(cfg, layout, torch.float32)
    ring = RingKVCache.allocate(cfg, layout.fs, torch.float32, sink_tokens=layout.num_tokens)
    with torch.no_grad():
        text = model.embed_text(inp["context"])
        prefill(model, inp["ref_latents"], inp["motion_latents"], text, sink)
        for f0 in (44_991, 44_994, 44_997, 45_000, 90_000):  # the sink reference reaches F0 + 30
            v = forward(model, inp["z"][:1], inp["t_block"], inp["audio"][0], text, ring, sink, frame_start=f0, d=30)
            assert torch.isfinite(v).all()
