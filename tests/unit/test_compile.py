"""The compiled transformer block (`liveavatar.runtime.compile`) and the per-block path's host work.

A whole tiny generation (ring filling, ring wrap, sink refresh) with every block compiled
`fullgraph=True` traces exactly two graphs (ring filling, steady state), never breaks a graph and never
recompiles, and gives the eager latents within float32 rounding; one block compiled by inductor equals
eager within float32 rounding. `fullgraph=True` without graph breaks also means no `.item()` or other
host read inside a block.
Structural checks: the time embedding, the text keys/values and the RoPE tables are computed and
uploaded once per step, per session and per block, not per forward or per layer.
"""

import pytest
import torch
import torch._dynamo as dynamo
from tiny_dit import one_thread  # noqa: F401  (autouse: single-threaded module)
from torch._dynamo.utils import counters

from liveavatar import GenerationOptions, Inputs, Pipeline
from liveavatar.config import TINY
from liveavatar.engine import denoise
from liveavatar.io import media
from liveavatar.models.dit import CausalS2VDiT
from liveavatar.models.layout import SinkLayout
from liveavatar.runtime.compile import apply_compile, is_compiled
from liveavatar.runtime.kv_cache import LayerKV, StagedRingKVCache
from liveavatar.runtime.memory import RuntimeConfig

OPTS = GenerationOptions(size=128 * 128, num_clip=2)  # 8 blocks: the ring fills, wraps; sink refresh at block 4


@pytest.fixture(scope="module")
def inputs():
    return Inputs.load(str(media.example_image_path()), str(media.example_audio_path()), OPTS)


def _latents(pipe, inputs):
    with torch.no_grad():
        session = pipe.session(inputs, prompt="a person talking", options=OPTS)
        return torch.cat(list(session.latents()), dim=2)


@pytest.fixture(scope="module")
def eager(inputs):
    return _latents(Pipeline.tiny(seed=0), inputs)


@pytest.mark.parametrize("kv_sink", ["auto", "shared"])
def test_compiled_generation_traces_two_graphs_without_breaks_or_recompiles(inputs, eager, kv_sink):
    """Also with the sink shared by the rings (`--kv_sink shared`: each layer staged into one buffer
    outside the graph, the block's keys and values written to the buffer and the ring inside it)."""
    runtime = RuntimeConfig(kv_sink=kv_sink)
    pipe = Pipeline.tiny(seed=0, runtime=runtime)
    apply_compile(pipe.dit, backend="aot_eager")  # dynamo + AOT autograd; inductor is checked below
    assert is_compiled(pipe.dit)
    dynamo.reset()
    counters.clear()
    with dynamo.config.patch(error_on_recompile=True):
        out = _latents(pipe, inputs)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 2  # ring filling (key mask) and steady state
    rings = pipe.session(inputs, prompt="a person talking", options=OPTS).denoise[0].rings.values()
    assert all(isinstance(r, StagedRingKVCache) == runtime.sink_shared for r in rings)
    rel = ((out - eager).norm() / eager.norm()).item()
    assert rel < 1e-6, rel


def test_sizes_beyond_the_recompile_limit_run_eagerly(capsys):
    """A server compiles each video size once; past dynamo's recompile limit (1 here, 8 by default) a
    new size runs its blocks uncompiled, with one warning, instead of failing (fullgraph refuses to
    fall back by itself), and gives the eager result."""
    from liveavatar.runtime import compile as compile_mod

    compile_mod._warned = False
    img, wav = str(media.example_image_path()), str(media.example_audio_path())
    compiled, eager = Pipeline.tiny(seed=0), Pipeline.tiny(seed=0)
    apply_compile(compiled.dit, backend="aot_eager")
    dynamo.reset()
    with dynamo.config.patch(recompile_limit=1), torch.no_grad():
        for size in (128 * 128, 192 * 128):
            o = GenerationOptions(size=size, num_clip=1)
            got, want = (torch.cat(list(p.session(Inputs.load(img, wav, o), prompt="a person talking",
                                                  options=o).latents()), 2) for p in (compiled, eager))
            assert ((got - want).norm() / want.norm()).item() < 1e-6
    assert capsys.readouterr().err.count("blocks of further sizes run uncompiled") == 1


def test_inductor_block_equals_eager():
    torch.manual_seed(0)
    cfg = TINY.dit
    dit = CausalS2VDiT(cfg).eval()
    block = dit.blocks[1]
    # The official bf16 rounding before norm3 turns any float32 reordering into a bf16 ulp (4e-3): compare
    # the float32 arithmetic itself.
    block.bf16_norm3 = False
    layout = SinkLayout(8, 8)
    ring_len, lq = cfg.ring_frames * layout.fs, cfg.frames_per_block * layout.fs
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, lq, cfg.dim, generator=g)
    e0 = torch.randn(1, cfg.frames_per_block, 6, cfg.dim, generator=g)
    text = torch.randn(1, cfg.text_len, cfg.dim, generator=g)
    cos, sin = torch.rand(2, lq, cfg.head_dim // 2, generator=g).unbind(0)
    buf = torch.randn(2, 1, ring_len + layout.num_tokens, cfg.num_heads, cfg.head_dim, generator=g)
    index = torch.arange(2 * lq, 3 * lq)
    mask = torch.arange(buf.shape[2]) < 3 * lq
    outs = []
    for compiled in (False, True):
        if compiled:
            apply_compile(dit, backend="inductor")
        kv = buf.clone()
        with torch.no_grad():
            for m in (mask, None):  # ring filling, then steady state
                cache = LayerKV(kv[0], kv[1], index, (cos, sin), ring_len, m)
                outs.append((block(x, e0, block.cross_attn.context_kv(text), cache, cfg.frames_per_block), kv.clone()))
    for (ye, ke), (yc, kc) in zip(outs[:2], outs[2:], strict=True):
        assert torch.allclose(yc, ye, rtol=1e-5, atol=1e-5), (yc - ye).abs().max()
        assert torch.allclose(kc, ke, rtol=1e-6, atol=1e-6)


def test_per_block_host_work_is_once_per_step_session_and_block(inputs, monkeypatch):
    """Time embedding once per step, text keys/values once per stage start, one table upload per block."""
    pipe = Pipeline.tiny(seed=0)
    calls = {"time": 0, "text_kv": 0, "tables": 0}
    time_modulation, text_kv, block_tables = pipe.dit.time_modulation, pipe.dit.text_kv, denoise.block_tables

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(pipe.dit, "time_modulation", count("time", time_modulation))
    monkeypatch.setattr(pipe.dit, "text_kv", count("text_kv", text_kv))
    monkeypatch.setattr(denoise, "block_tables", count("tables", block_tables))
    _latents(pipe, inputs)
    blocks, steps, prefills = 8, OPTS.sample_steps, 2  # the session start and the sink refresh
    assert calls == {"time": steps + prefills, "text_kv": 1, "tables": blocks}
