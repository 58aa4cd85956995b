"""The planner's byte counts are the runtime's own: they equal the sums over the meta-built models and
the objects the runtime allocates, exactly."""

import pytest
import torch

from liveavatar.config import S2V_14B, TINY
from liveavatar.models.dit import CausalS2VDiT
from liveavatar.models.vae import VAEStreamState, WanVAE, stream_state_nbytes
from liveavatar.runtime.kv_cache import HostRingKVCache, RingKVCache, SinkCache, SinkLayout
from liveavatar.runtime.memory import RuntimeConfig, _peak, components, forward_flops


def _param_bytes(model, dtype=None):
    return sum(p.numel() * (torch.empty((), dtype=dtype).element_size() if dtype else p.element_size())
               for p in model.parameters())


def test_full_size_dit_weights_equal_the_meta_model():
    steady, _ = components(S2V_14B, RuntimeConfig(), 704, 384)
    with torch.device("meta"):
        dit = CausalS2VDiT(S2V_14B.dit).to(torch.bfloat16)
    total = steady["dit.weights.resident_blocks"] + steady["dit.weights.other"]
    assert total == _param_bytes(dit) == 32_591_511_218


def test_full_size_fp8_weights_equal_apply_fp8_on_meta():
    from liveavatar.runtime.fp8 import apply_fp8

    steady, _ = components(S2V_14B, RuntimeConfig(fp8=True), 704, 384)
    with torch.device("meta"):
        dit = apply_fp8(CausalS2VDiT(S2V_14B.dit).to(torch.bfloat16))
    tensors = list(dit.parameters()) + list(dit.buffers())
    assert steady["dit.weights.resident_blocks"] + steady["dit.weights.other"] == sum(
        t.numel() * t.element_size() for t in tensors)


def test_full_size_cache_bytes_equal_the_cache_objects_on_meta():
    h, w = 704 // 8, 384 // 8
    layout = SinkLayout(h, w)
    steady, _ = components(S2V_14B, RuntimeConfig(kv_on_device=1), 704, 384)
    ring = RingKVCache.allocate(S2V_14B.dit, layout.fs, torch.bfloat16, "meta", sink_tokens=layout.num_tokens)
    sink = SinkCache.allocate(S2V_14B.dit, layout, torch.bfloat16, "meta")
    # 10.38 GB of ring and 2.16 GB of sink tokens after it (re-roped per forward, attended without a copy)
    assert steady["kv.ring_caches"] == ring.device_nbytes == 40 * (12 * 1056 + 2640) * 2 * 5120 * 2
    assert steady["kv.sink"] == sink.nbytes == 40 * 2640 * 2 * 5120 * 2
    assert steady["kv.host_ring_slots"] == 3 * 2 * ring.device_nbytes // 40


@pytest.mark.parametrize("preset,height,width", [(S2V_14B, 704, 384), (TINY, 128, 128)], ids=["704x384", "tiny"])
@pytest.mark.parametrize("runtime", [
    RuntimeConfig(), RuntimeConfig(kv_sink="per_ring"), RuntimeConfig(kv_sink="shared"),
    RuntimeConfig(kv_sink="shared", kv_on_device=2), RuntimeConfig(kv_fp8=True, kv_on_device=3),
    RuntimeConfig(kv_on_device=0),
], ids=["auto", "per_ring", "shared", "shared+2-host", "kv-fp8+1-host", "all-host"])
def test_denoise_stage_caches_on_meta_equal_the_planner(preset, height, width, runtime):
    """Every cache a denoise stage of all the steps allocates (rings with or without their sink tokens,
    the staging buffer the staged rings share, host-ring slots, the sink), on meta, against `components`."""
    from liveavatar.engine.denoise import DenoiseStage
    from liveavatar.engine.sampler import make_schedule
    from liveavatar.runtime.kv_cache import StagedRingKVCache

    with torch.device("meta"):
        dit = CausalS2VDiT(preset.dit)
    layout = SinkLayout(height // 8, width // 8, preset.dit.zip_frame_buckets)
    stage = DenoiseStage(dit, make_schedule(preset.sampler), range(preset.sampler.steps), layout, "meta",
                         torch.bfloat16, runtime)
    steady, _ = components(preset, runtime, height, width)
    rings = list(stage.rings.values())
    host = [r for r in rings if isinstance(r, HostRingKVCache)]
    assert sum(r.device_nbytes for r in rings if r not in host) == steady["kv.ring_caches"]
    assert sum(r.device_nbytes for r in host) == steady["kv.host_ring_slots"]
    staged = [r for r in rings if isinstance(r, StagedRingKVCache)]
    assert len(staged) == (len(rings) - len(host) if runtime.sink_shared or runtime.kv_fp8 else 0)
    assert all(r.staging is stage.staging for r in staged)  # one staging buffer for the stage
    assert sum(t.nbytes for t in stage.staging or ()) == steady["kv.staging"]
    assert stage.sink.nbytes == steady["kv.sink"]
    assert stage.device_nbytes == sum(steady[k] for k in ("kv.ring_caches", "kv.staging", "kv.host_ring_slots",
                                                           "kv.sink"))
    if preset is S2V_14B and runtime.sink_shared and runtime.kv_on_device is None:
        # shared: 4 rings of 10.38 GB without their 2.16 GB of sink tokens, one staging layer of ring + sink
        assert steady["kv.ring_caches"] == 4 * 40 * 12 * 1056 * 2 * 5120 * 2
        assert steady["kv.staging"] == (12 * 1056 + 2640) * 2 * 5120 * 2
        per_ring, _ = components(preset, RuntimeConfig(), height, width)
        assert per_ring["kv.ring_caches"] - steady["kv.ring_caches"] == 4 * steady["kv.sink"]
        assert per_ring["kv.staging"] == 0


def test_fp8_ring_cache_bytes_and_round_trip():
    from liveavatar.runtime.kv_cache import FP8RingKVCache

    steady, _ = components(S2V_14B, RuntimeConfig(kv_on_device=2, kv_fp8=True), 704, 384)
    ring = FP8RingKVCache.allocate(S2V_14B.dit, 1056, torch.bfloat16, "meta")
    assert steady["kv.ring_caches"] == 2 * ring.nbytes == 2 * (40 * 12672 * 5120 * 2 + 40 * 12672 * 40 * 2 * 4)
    small = FP8RingKVCache.allocate(TINY.dit, 16, torch.float32)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 1, 48, 4, 16, generator=g).unbind(0)
    small.write(1, 96, k, v)
    rk, rv = small.read(1, 144)
    for ours, ref in ((rk[:, 96:], k), (rv[:, 96:], v)):
        rel = ((ours - ref).norm() / ref.norm()).item()
        assert 0 < rel < 0.04, rel  # e4m3 keeps 3 mantissa bits
    assert torch.all(rk[:, :96] == 0)


def test_tiny_pipeline_objects_match_the_planner(tmp_path):
    """Allocate what a tiny session allocates (device emulated on the CPU) and compare every byte count."""
    from liveavatar.runtime.offload import apply_block_streaming

    cfg = RuntimeConfig(resident_blocks=1, kv_on_device=2)
    height = width = 128
    steady, _ = components(TINY, cfg, height, width)
    torch.manual_seed(0)
    dit = CausalS2VDiT(TINY.dit)  # fp32 on CPU; the planner counts bf16, so compare in bf16
    dit = dit.to(torch.bfloat16)
    streamer = apply_block_streaming(dit, cfg.resident_blocks, "cpu")
    assert streamer.nbytes_device == (steady["dit.weights.resident_blocks"] + steady["dit.weights.other"]
                                      + steady["dit.stream_slots"])
    layout = SinkLayout(height // 8, width // 8)
    rings = [RingKVCache.allocate(TINY.dit, layout.fs, torch.bfloat16, sink_tokens=layout.num_tokens)
             for _ in range(2)]
    rings += [HostRingKVCache.allocate(TINY.dit, layout.fs, torch.bfloat16, "cpu", sink_tokens=layout.num_tokens)
              for _ in range(2)]
    assert sum(r.device_nbytes for r in rings[:2]) == steady["kv.ring_caches"]
    assert sum(r.device_nbytes for r in rings[2:]) == steady["kv.host_ring_slots"]
    assert SinkCache.allocate(TINY.dit, layout, torch.bfloat16).nbytes == steady["kv.sink"]
    vae = WanVAE(TINY.vae).to(torch.bfloat16)
    assert _param_bytes(vae) == steady["vae.weights"]
    state = VAEStreamState()
    with torch.no_grad():
        vae.decode_stream(torch.randn(1, 16, 2, height // 8, width // 8), state)
    assert state.nbytes == steady["vae.stream_state"] == stream_state_nbytes(TINY.vae, 16, 16, torch.bfloat16)


def test_peak_is_max_of_setup_and_steady_and_encoders_placement():
    cfg = RuntimeConfig(offload_model=True)
    steady, setup = components(S2V_14B, cfg, 704, 384)
    peak, st, su = _peak(steady, setup)
    assert peak == max(st, su)
    assert steady["text_encoder"] == 0 and setup["text_encoder"] == 11_361_820_672
    _, setup_cpu = components(S2V_14B, RuntimeConfig(t5_cpu=True), 704, 384)
    assert setup_cpu["text_encoder"] == 0
    resident, _ = components(S2V_14B, RuntimeConfig(offload_model=False), 704, 384)
    assert resident["text_encoder"] == 11_361_820_672


@pytest.mark.parametrize("h,w,tflop", [(88, 48, 122.9)])  # 704x384
def test_forward_flops_match_the_architecture_count(h, w, tflop):
    assert abs(forward_flops(S2V_14B, SinkLayout(h, w)) / 1e12 - tflop) < 0.1
