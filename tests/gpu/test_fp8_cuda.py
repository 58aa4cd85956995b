"""FP8 on CUDA: `_scaled_mm` (row-wise and per-tensor) against the CPU's `_scaled_mm` and a float64
reference, the compiled quantiser and dequantiser against the eager code, the per-shape GEMM choice
against the speed model, and the tiny DiT in FP8 on the GPU against the same model on the CPU."""

import copy

import pytest
import torch
import torch.nn as nn
from conftest import needs_fp8_tensor_cores

from liveavatar.runtime.fp8 import FP8Linear, apply_fp8, dequantize_fp8, fp8_kernels, quantize_fp8


@needs_fp8_tensor_cores()
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_scaled_mm_matches_cpu_and_float64(granularity):
    torch.manual_seed(0)
    lin = nn.Linear(256, 192).to(torch.bfloat16)
    x = torch.randn(5, 37, 256).to(torch.bfloat16)
    x[0, 0] *= 30  # an outlier row
    cpu = FP8Linear.from_linear(lin, granularity)
    cpu.gemm = "scaled_mm"
    gpu = copy.deepcopy(cpu).cuda()
    y_gpu = gpu(x.cuda()).cpu()
    y_cpu = cpu(x)
    # Reference: the same quantised operands, multiplied in float64.
    xq, sx = quantize_fp8(x.reshape(-1, 256), "row" if granularity == "channel" else "tensor")
    w = dequantize_fp8(cpu.weight, cpu.weight_scale.reshape(-1, 1) if granularity == "channel" else cpu.weight_scale,
                       torch.float64)
    ref = (xq.double() * sx.double()) @ w.T + lin.bias.detach().double()
    scale = ref.abs().amax(1, keepdim=True)
    assert ((y_gpu.reshape(-1, 192).double() - ref).abs() / scale).max() < 1e-2
    assert ((y_gpu.double() - y_cpu.double()).abs().reshape(-1, 192) / scale).max() < 1e-2


def test_compiled_kernels_match_eager():
    q_c, d_c = fp8_kernels("cuda", "compiled")
    assert q_c is not quantize_fp8, "the FP8 kernels did not compile on CUDA (see the warning)"
    x = (torch.randn(1000, 512, device="cuda") * torch.logspace(-3, 3, 1000, device="cuda")[:, None]).bfloat16()
    for gran in ("row", "tensor"):
        (qe, se), (qc, sc) = quantize_fp8(x, gran), q_c(x, gran)
        assert torch.equal(se, sc)
        diff = (qe.float() - qc.float()).abs()
        assert (diff > 0).float().mean() < 1e-3  # at most a rare one-step rounding difference
        assert torch.equal(dequantize_fp8(qe, se, torch.bfloat16), d_c(qe, se, torch.bfloat16))


def test_auto_gemm_follows_the_speed_model():
    from liveavatar.runtime.gpus import from_device
    from liveavatar.runtime.speed import fp8_gemm_faster

    spec = from_device()
    lin = FP8Linear.from_linear(nn.Linear(5120, 5120).to(torch.bfloat16)).cuda()
    for rows in (15, 512, 3168):
        x = torch.randn(rows, 5120, device="cuda", dtype=torch.bfloat16)
        assert lin._use_scaled_mm(x) == (spec.has_fp8 and fp8_gemm_faster(spec, rows, 5120, 5120))
        lin(x)


def test_tiny_dit_fp8_on_cuda_matches_cpu():
    from tiny_dit import run_blocks

    from liveavatar.config import TINY
    from liveavatar.models.dit import CausalS2VDiT

    torch.manual_seed(0)
    model = apply_fp8(CausalS2VDiT(TINY.dit).eval().to(torch.bfloat16))
    ref = run_blocks(model, TINY.dit, torch.bfloat16, n_blocks=4)[0].double()
    out = run_blocks(model.cuda(), TINY.dit, torch.bfloat16, n_blocks=4)[0].double().cpu()
    assert ((out - ref).norm() / ref.norm()).item() < 0.03


def test_fp8_ring_cache_on_cuda_matches_cpu():
    from conftest import tiny_frames

    from liveavatar.runtime.memory import RuntimeConfig

    rt = RuntimeConfig(fp8=True, kv_fp8=True)
    gpu, cpu = tiny_frames("cuda", rt).float(), tiny_frames("cpu", rt).float()
    assert gpu.shape == cpu.shape and (gpu - cpu).abs().mean() < 2.0
