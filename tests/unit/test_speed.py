"""The speed model (liveavatar/runtime/speed.py) and the GPU table (runtime/gpus.py): GPUs are identified
by name and compute capability, never by memory size; the counted work of a full-size forward agrees
with the independent hand count (`memory.forward_flops`); FP8 rates apply to the linears only; the
planner's FP8 choice follows the model (it flips to bf16 where FP8 is slower); `plan --gpu`."""

import dataclasses
import json

import pytest
import torch

from liveavatar.cli import build_parser, main
from liveavatar.config import S2V_14B
from liveavatar.models.layout import SinkLayout
from liveavatar.runtime import speed
from liveavatar.runtime.gpus import GPU_NAMES, GiB, default_gpu, gpu_named, identify
from liveavatar.runtime.memory import forward_flops, plan


@pytest.mark.parametrize("name,cc,gib,key,fp8", [
    ("NVIDIA A100-SXM4-80GB", (8, 0), 79.2, "a100-80gb", False),
    ("NVIDIA A100 80GB PCIe", (8, 0), 79.2, "a100-80gb-pcie", False),
    ("NVIDIA A100-PCIE-40GB", (8, 0), 39.4, "a100-40gb", False),
    ("NVIDIA H100 80GB HBM3", (9, 0), 79.1, "h100-sxm", True),
    ("NVIDIA H100 PCIe", (9, 0), 79.1, "h100-pcie", True),
    ("NVIDIA H100 NVL", (9, 0), 93.6, "h100-nvl", True),
    ("NVIDIA H200", (9, 0), 139.8, "h200", True),
    ("NVIDIA L40S", (8, 9), 44.4, "l40s", True),
    ("NVIDIA L4", (8, 9), 22.0, "l4", True),
    ("NVIDIA A10", (8, 6), 22.0, "a10", False),
    ("NVIDIA GeForce RTX 4090", (8, 9), 23.6, "rtx4090", True),
    ("NVIDIA GeForce RTX 3090", (8, 6), 23.6, "rtx3090", False),
])
def test_gpus_are_identified_by_name_and_capability(name, cc, gib, key, fp8):
    spec = identify(name, cc, int(gib * GiB))
    assert spec.known and spec.has_fp8 is fp8 and spec.memory_bytes == int(gib * GiB)
    assert (spec.tflops, spec.mem_gbps) == (gpu_named(key).tflops, gpu_named(key).mem_gbps)


def test_memory_size_never_decides_the_gpu():
    """An 80 GB A100 is not an H100: same memory, different rates, and no FP8 tensor cores."""
    a100 = identify("NVIDIA A100-SXM4-80GB", (8, 0), 80 * GiB)
    h100 = identify("NVIDIA H100 80GB HBM3", (9, 0), 80 * GiB)
    assert a100.memory_bytes == h100.memory_bytes and not a100.has_fp8 and h100.has_fp8
    assert a100.tflops < h100.tflops / 3
    # An unknown GPU keeps the stated default rates; FP8 only from compute capability 8.9.
    for cc, fp8 in (((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)):
        spec = identify("Some Future GPU", cc, 80 * GiB)
        assert not spec.known and spec.has_fp8 is fp8 and spec.tflops == default_gpu(80).tflops
    assert default_gpu(24).tflops == default_gpu(80).tflops  # not scaled by memory


def test_every_table_entry_is_consistent():
    for key in GPU_NAMES:
        g = gpu_named(key)
        assert g.has_fp8 == (g.compute_capability >= (8, 9))
        if g.has_fp8:
            assert 1.9 < g.fp8_tflops / g.tflops < 2.1  # dense FP8 is twice dense bf16 on every part listed
        assert 10 < g.memory_bytes / GiB < 200 and 100 < g.mem_gbps < 10_000


def test_traffic_counter():
    x = torch.empty(1000, dtype=torch.bfloat16, device="meta")
    assert speed.count_traffic(lambda t: t.float(), x) == (2000 + 4000, 1)
    assert speed.count_traffic(lambda t: t.view(10, 100).transpose(0, 1), x) == (0, 0)  # views are free
    row = torch.empty(1, 100, device="meta")
    big = torch.empty(10, 100, device="meta")
    assert speed.count_traffic(lambda a, b: a + b, row.expand(10, 100), big)[0] == (100 + 1000 + 1000) * 4


@pytest.fixture(scope="module")
def work():
    return speed.forward_work(S2V_14B, 704, 384)


def test_counted_flops_match_the_hand_count(work):
    """The traced forward's matmul + attention FLOPs equal memory.forward_flops (122.9 TFLOP) within
    0.5 % (the trace also counts the small linears the hand count leaves out)."""
    hand = forward_flops(S2V_14B, SinkLayout(88, 48))
    assert 0 <= (work.gemm_flops + work.attention_flops) / hand - 1 < 0.005
    assert abs(work.attention_flops / 1e12 - 41.07) < 0.05
    # 40 self-attention + 40 text cross-attention + 12 audio injector calls
    assert sum(c for _, c in work.attention) == 92
    # Elementwise traffic: several GB per layer (the line-by-line count said 7.8).
    assert 5e9 < work.elementwise_bytes / 40 < 12e9
    targets = sum(c for (_, _, _, t, _), c in work.gemms if t)
    assert targets == 40 * 10 + 12 * 4 + 12  # the FP8 targets of apply_fp8 (460 layers), each called once


def test_fp8_rate_applies_to_the_linears_only(work):
    h100 = gpu_named("h100-sxm")
    bf16 = speed.forward_seconds(work, h100)
    fp8 = speed.forward_seconds(work, h100, fp8=True)
    assert fp8["attention"] == bf16["attention"] and fp8["elementwise"] == bf16["elementwise"]
    assert 0.45 < fp8["gemm"] / bf16["gemm"] < 0.55 and fp8["quantisation"] > 0


def test_fp8_is_slower_where_quantisation_costs_more_than_it_saves(work):
    """H100: FP8 with the compiled quantiser beats bf16; with the eager one (8 passes, 39 bytes an
    element) it is slower. A100 (no FP8 tensor cores): FP8 weights only add dequantisation."""
    h100, a100 = gpu_named("h100-sxm"), gpu_named("a100-80gb")
    assert speed.quant_cost("eager")[0] > 30
    bf16 = speed.forward_seconds(work, h100)["total"]
    assert speed.forward_seconds(work, h100, fp8=True)["total"] < bf16
    assert speed.forward_seconds(work, h100, fp8=True, quantiser="eager")["total"] > bf16
    assert speed.forward_seconds(work, a100, fp8=True)["total"] > speed.forward_seconds(work, a100)["total"]
    assert speed.forward_seconds(work, h100, kv_fp8=True)["total"] > bf16  # the FP8 ring costs time


def test_per_linear_fp8_decision():
    h100, a100 = gpu_named("h100-sxm"), gpu_named("a100-80gb")
    assert speed.fp8_gemm_faster(h100, 3168, 5120, 5120)
    assert not speed.fp8_gemm_faster(a100, 3168, 5120, 5120)  # no FP8 GEMM at all
    slow_memory = dataclasses.replace(h100, mem_gbps=100.0)
    assert not speed.fp8_gemm_faster(slow_memory, 3168, 5120, 16)  # quantising the input dwarfs a thin GEMM


def test_planner_fp8_choice_flips_with_the_model():
    """Same memory, different speed: the planner takes FP8 on an H100, bf16 on an A100 80GB, and bf16 on an
    H100 whose FP8 GEMMs would gain nothing (FP8 rate set equal to bf16)."""
    h100 = gpu_named("h100-sxm")
    assert plan(S2V_14B, h100, 704, 384).config.fp8 is True
    assert plan(S2V_14B, gpu_named("a100-80gb"), 704, 384).config.fp8 is False
    no_gain = dataclasses.replace(h100, fp8_tflops=h100.tflops)
    p = plan(S2V_14B, no_gain, 704, 384)
    assert p.fits and p.config.fp8 is False


def run_plan(capsys, *argv):
    rc = main(["plan", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_plan_gpu_flag(capsys):
    rc, out, err = run_plan(capsys, "--gpu", "A100-80GB", "--auto", "--json")
    p = json.loads(out)
    assert rc == 0 and p["gpu"]["name"] == "a100-80gb" and p["gpu"]["has_fp8"] is False
    assert p["config"]["fp8"] is False and p["config"]["kv_fp8"] is False
    rc, out, _ = run_plan(capsys, "--gpu", "h100-sxm", "--gpu_memory", "40", "--json")
    assert json.loads(out)["gpu"]["memory_bytes"] == 40 * GiB
    rc, out, err = run_plan(capsys, "--gpu", "tpu-v9", "--auto")
    assert rc == 2 and out == "" and len(err.splitlines()) == 1 and "h100-sxm" in err and "rtx4090" in err
    rc, out, _ = run_plan(capsys, "--gpu", "l40s", "--auto")
    assert rc == 0 and "l40s (sm 8.9; 362.1 bf16 / 733 FP8 TFLOP/s" in out and "not a measurement" in out


def test_gpu_memory_means_gib_everywhere():
    parser = build_parser()
    sub = {a.dest: a for a in parser._subparsers._group_actions[0].choices["plan"]._actions}
    assert "GiB" in sub["gpu_memory"].help and "GiB" in sub["gpus"].help
    gen = {a.dest: a for a in parser._subparsers._group_actions[0].choices["generate"]._actions}
    assert "GiB" in gen["gpu_memory"].help
