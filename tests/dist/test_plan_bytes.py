"""The planner's per-rank bytes equal what each rank allocates: a real two-rank run (gloo, tiny preset
in bf16) of a sequence-parallel stage with sharded weights, for each rank's weights (shards, slots
and the rest of the model) and caches."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from ranks import run_ranks  # noqa: E402

from liveavatar.config import TINY  # noqa: E402
from liveavatar.distributed.layout import ParallelLayout  # noqa: E402
from liveavatar.distributed.plan import rank_components  # noqa: E402
from liveavatar.runtime.memory import RuntimeConfig  # noqa: E402

LAYOUT = ParallelLayout(4, ulysses=2, shard_weights=True)


def measure(rank, world, layout):
    import torch
    import torch.distributed as dist

    from liveavatar.distributed.sharding import apply_sharded_weights
    from liveavatar.distributed.ulysses import apply_ulysses
    from liveavatar.engine.denoise import DenoiseStage
    from liveavatar.engine.sampler import make_schedule
    from liveavatar.models.dit import CausalS2VDiT
    from liveavatar.models.layout import SinkLayout

    role = layout.role(rank)
    groups = {s: dist.new_group(layout.group(s)) for s in range(layout.stages)}
    torch.manual_seed(0)
    dit = CausalS2VDiT(TINY.dit).to(torch.bfloat16).eval()
    apply_ulysses(dit, groups[role.stage])
    blocks = apply_sharded_weights(dit, groups[role.stage], "cpu")
    stage = DenoiseStage(dit, make_schedule(TINY.sampler), role.steps, SinkLayout(16, 16), "cpu", torch.bfloat16,
                         heads=TINY.dit.num_heads // layout.ulysses)
    return {"shards": blocks.nbytes_source, "slots": blocks.nbytes_slots, "other": blocks.nbytes_resident,
            "rings": sum(r.device_nbytes for r in stage.rings.values()), "sink": stage.sink.nbytes}


def test_planned_bytes_are_allocated_bytes():
    measured = run_ranks(measure, LAYOUT.world, LAYOUT.check(TINY.dit.num_heads), timeout=300)
    for rank, got in enumerate(measured):
        steady, _ = rank_components(TINY, RuntimeConfig(), LAYOUT, LAYOUT.role(rank), 128, 128)
        planned = {"shards": steady["dit.weights.shards"], "slots": steady["dit.stream_slots"],
                   "other": steady["dit.weights.other"], "rings": steady["kv.ring_caches"] + steady["kv.host_ring_slots"],
                   "sink": steady["kv.sink"]}
        assert got == planned, (rank, got, planned)
