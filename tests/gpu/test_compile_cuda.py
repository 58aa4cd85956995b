"""Compiled blocks on CUDA against eager: `torch.compile` on every transformer block of the tiny DiT
(the generic path), and the engine's `apply_compile` (default and CUDA-graph `reduce-overhead` mode)
where `liveavatar.runtime.compile` provides it, with the dynamo counters showing no graph break."""

import copy

import pytest
import torch

from liveavatar.config import TINY
from liveavatar.models.dit import CausalS2VDiT


@pytest.fixture(scope="module")
def eager():
    from tiny_dit import run_blocks

    torch.manual_seed(0)
    model = CausalS2VDiT(TINY.dit).eval().cuda()
    return model, run_blocks(model, TINY.dit, n_blocks=6)[0]


def _close(out, ref):
    return ((out - ref).norm() / ref.norm()).item() < 1e-4


def test_torch_compile_per_block_matches_eager(eager):
    from tiny_dit import run_blocks

    model, ref = eager
    compiled = copy.deepcopy(model)
    torch._dynamo.reset()
    for block in compiled.blocks:
        block.compile()
    assert _close(run_blocks(compiled, TINY.dit, n_blocks=6)[0], ref)


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_apply_compile_matches_eager(eager, mode):
    compile_mod = pytest.importorskip("liveavatar.runtime.compile")
    if not hasattr(compile_mod, "apply_compile"):
        pytest.skip("liveavatar.runtime.compile has no apply_compile")
    from tiny_dit import run_blocks
    from torch._dynamo.utils import counters

    model, ref = eager
    compiled = copy.deepcopy(model)
    torch._dynamo.reset()
    counters.clear()
    compile_mod.apply_compile(compiled, mode=mode)
    out = run_blocks(compiled, TINY.dit, n_blocks=6)[0]
    assert _close(out, ref)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
