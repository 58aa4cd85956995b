"""`liveavatar plan` for several GPUs: per-rank bytes, the layouts people ask about, the torchrun command.

The per-rank cache bytes are checked against the caches a rank allocates (full size, built on meta);
the sharded weights against a real two-rank run are in tests/dist/test_plan_bytes.py.
"""

import json
import shlex

import pytest
import torch

from liveavatar.cli import build_parser, main
from liveavatar.config import S2V_14B
from liveavatar.distributed.layout import ParallelLayout
from liveavatar.distributed.plan import rank_components
from liveavatar.engine.denoise import DenoiseStage
from liveavatar.engine.sampler import make_schedule
from liveavatar.models.dit import CausalS2VDiT
from liveavatar.models.layout import SinkLayout
from liveavatar.runtime.memory import GiB, RuntimeConfig


def plan(capsys, *argv):
    rc = main(["plan", *argv, "--json"])
    out, err = capsys.readouterr()
    assert err == "", err
    return rc, json.loads(out)


def test_five_24_gb_gpus_fit_at_704x384(capsys):
    rc, p = plan(capsys, "--gpus", "5x24", "--auto")
    assert rc == 0 and p["fits"] and p["margin_bytes"] >= 0
    assert len(p["gpus"]) == 5 and all(g["peak_bytes"] <= p["budget_bytes"] for g in p["gpus"])
    assert p["frames_per_second_estimate"] > 0


def test_sequence_parallel_sharded_fp8_on_four_ranks_with_a_decode_gpu_fits_five_24_gb_gpus(capsys):
    """The layout the official FSDP mode cannot fit: the unsharded block and its prefetch buffer are
    counted, and the margin is printed."""
    args = ["--gpus", "5x24", "--num_gpus_dit", "4", "--ulysses_size", "4", "--dit_fsdp", "--enable_vae_parallel",
            "--fp8"]
    rc, p = plan(capsys, *args)
    # 3.8 GiB: each rank's ring holds its heads' share of the sink tokens too (0.5 GiB, kv_cache.py)
    assert rc == 0 and p["fits"] and p["margin_bytes"] > 3.5 * GiB
    rank0 = p["gpus"][0]["components"]
    assert rank0["dit.stream_slots"] > 0 and rank0["dit.weights.shards"] < rank0["dit.stream_slots"] * 10
    assert p["gpus"][4]["role"] == "rank 4, decode" and "dit.weights.shards" not in p["gpus"][4]["components"]
    main(["plan", *args])
    out = capsys.readouterr().out
    assert "fits, " in out and "GiB to spare on the fullest rank" in out
    cmd = [ln for ln in out.splitlines() if ln.startswith("run: torchrun ")][0].removeprefix("run: ")
    argv = shlex.split(cmd)
    assert argv[:3] == ["torchrun", "--nproc_per_node", "5"]
    ns = build_parser().parse_args(argv[argv.index("liveavatar") + 1:])
    assert (ns.num_gpus_dit, ns.ulysses_size, ns.dit_fsdp, ns.enable_vae_parallel, ns.fp8) == (4, 4, True, True, True)


@pytest.mark.parametrize("argv,world,nodes", [(["--gpus", "2x80"], 2, 1), (["--gpus", "8x80", "--nnodes", "2"], 16, 2),
                                              (["--gpus", "4x24"], 4, 1)])
def test_auto_gives_a_fitting_layout_and_its_command(capsys, argv, world, nodes):
    rc, p = plan(capsys, *argv, "--auto")
    assert rc == 0 and p["fits"] and p["layout"]["world"] == world and p["layout"]["nnodes"] == nodes
    assert all(g["peak_bytes"] <= p["budget_bytes"] for g in p["gpus"])
    main(["plan", *argv, "--auto"])
    out = capsys.readouterr().out
    cmd = [ln for ln in out.splitlines() if ln.startswith("run: torchrun ")][0]
    assert f"--nproc_per_node {world // nodes}" in cmd
    assert ("--nnodes 2" in cmd and "--rdzv_backend c10d" in cmd) == (nodes == 2)


def test_a_layout_that_does_not_fit_says_what_fits(capsys):
    rc = main(["plan", "--gpus", "4x24", "--num_gpus_dit", "4"])  # bf16, every block on every rank
    out = capsys.readouterr().out
    assert rc == 1 and "does NOT fit" in out and "GiB over on the fullest rank" in out
    assert any(ln.startswith("what fits: torchrun ") for ln in out.splitlines())


@pytest.mark.parametrize("argv,message", [
    (["--gpus", "5x24", "--num_gpus_dit", "3"], "5 processes were started but --num_gpus_dit 3 needs 3"),
    (["--gpus", "4x24", "--ulysses_size", "3"], "--ulysses_size 3 must divide"),
    (["--gpus", "8x80", "--num_gpus_dit", "8"], "8 denoise stages for 4 denoising steps"),
    (["--gpus", "2x24", "--dit_fsdp"], "--dit_fsdp shards weights"),
    (["--gpus", "4x80", "--nnodes", "2", "--ulysses_size", "8"], "a whole sequence-parallel group"),
    (["--gpus", "2x80", "--nnodes", "0"], "--nnodes 0 is out of range"),
])
def test_impossible_layouts_are_one_line_errors(capsys, argv, message):
    rc = main(["plan", *argv])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("layout", [ParallelLayout(4, decode_rank=True),
                                    ParallelLayout(4, ulysses=4, shard_weights=True), ParallelLayout(8, ulysses=2)])
@pytest.mark.parametrize("cfg", [RuntimeConfig(), RuntimeConfig(kv_fp8=True, kv_on_device=2)])
def test_planned_cache_bytes_equal_what_each_rank_allocates(layout, cfg):
    """Full size on meta: each denoise rank's stage (its steps' rings, its sink, its share of the heads)."""
    layout = ParallelLayout(layout.denoise_ranks, layout.ulysses, layout.shard_weights, layout.decode_rank).check(40)
    with torch.device("meta"):
        dit = CausalS2VDiT(S2V_14B.dit).to(torch.bfloat16)
    tokens = SinkLayout(704 // 8, 384 // 8)
    for role in layout.roles():
        if role.stage is None:
            continue
        steady, _ = rank_components(S2V_14B, cfg, layout, role, 704, 384)
        stage = DenoiseStage(dit, make_schedule(S2V_14B.sampler), role.steps, tokens, "meta", torch.bfloat16, cfg,
                             heads=40 // layout.ulysses)
        rings = [r for r in stage.rings.values()]
        on_dev = sum(r.device_nbytes for r in rings if type(r).__name__ != "HostRingKVCache")
        host_slots = sum(r.device_nbytes for r in rings if type(r).__name__ == "HostRingKVCache")
        assert (on_dev, host_slots, stage.sink.nbytes) == (
            steady["kv.ring_caches"], steady["kv.host_ring_slots"], steady["kv.sink"]), role
