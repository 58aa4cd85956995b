"""Block streaming (liveavatar/offload.py) on a CPU "device": the tiny DiT with 0-3 of its 4 groups
resident (alone and after apply_fp8) must give bit-identical velocities, sink and ring caches to the
resident model over two sessions of prefill + 6 block forwards; the byte accounting must equal the
parameter bytes; the model's weights must occupy resident groups + 2 slots and nothing more.

Resident 1 (3 streamed groups, an odd ring) is the case where the wrap from the last group to the
first lands on the slot still in use; a schedule that prefetched into it would fail here.
"""

import copy

import pytest
import torch
from tiny_dit import one_thread, run_blocks  # noqa: F401  (one_thread: autouse fixture)

from liveavatar.config import S2V_14B, TINY
from liveavatar.errors import UserError
from liveavatar.models.dit import CausalS2VDiT
from liveavatar.runtime.fp8 import apply_fp8, fp8_nbytes
from liveavatar.runtime.offload import (
    apply_block_streaming,
    base_nbytes,
    choose_resident_blocks,
    group_nbytes,
    stream_groups,
)


def _run(model, cfg, n_blocks=6, seed=1):
    """Prefill + `n_blocks` block forwards (ring wrap at F0 = 12) -> velocities, sink, ring."""
    return run_blocks(model, cfg, torch.float32, n_blocks, seed)


def _param_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.fixture(scope="module")
def tiny():
    cfg = TINY.dit
    torch.manual_seed(0)
    model = CausalS2VDiT(cfg).eval()
    fp8 = apply_fp8(copy.deepcopy(model))
    return cfg, {False: (model, _run(model, cfg)), True: (fp8, _run(fp8, cfg))}


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("resident", [0, 1, 2, 3])
def test_streaming_is_bit_identical(tiny, resident, fp8):
    cfg, models = tiny
    model, (v_ref, sink_ref, ring_ref) = models[fp8]
    m = copy.deepcopy(model)
    apply_block_streaming(m, resident, "cpu")
    for seed in (1, 1, 2):  # repeated sessions; the second equals the first
        v, sink, ring = _run(m, cfg, seed=seed)
        if seed == 2:
            v_ref, sink_ref, ring_ref = _run(model, cfg, seed=2)
        assert torch.equal(v, v_ref)
        assert torch.equal(sink.k, sink_ref.k) and torch.equal(sink.v, sink_ref.v)
        assert torch.equal(ring.k, ring_ref.k) and torch.equal(ring.v, ring_ref.v)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("resident", [0, 1, 2])
def test_byte_accounting(tiny, resident, fp8):
    cfg, models = tiny
    model = models[fp8][0]
    groups = stream_groups(model)
    assert groups[0] == ("blocks.0", "audio_injector.injector.0", "audio_injector.injector_adain_layers.0")
    assert groups[1] == ("blocks.1",)
    # Independent per-group parameter bytes (tiny sizes are multiples of the 256-byte alignment).
    per_group = [_param_bytes(p for n in names for p in model.get_submodule(n).parameters()) for names in groups]
    total = _param_bytes(model.parameters())
    m = copy.deepcopy(model)
    st = apply_block_streaming(m, resident, "cpu")
    assert st.nbytes_host == sum(per_group[resident:])
    assert st.slot_nbytes == max(per_group[resident:])
    assert st.nbytes_device == total - sum(per_group[resident:]) + 2 * max(per_group[resident:])
    # What the model's weights really occupy on the device: distinct storages = resident + 2 slots.
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in m.parameters()}
    assert sum(storages.values()) == st.nbytes_device
    # Streamed groups alternate slots: groups two apart alias, neighbours do not.
    ptr = [m.blocks[i].self_attn.q.weight.data_ptr() for i in range(cfg.num_layers)]
    streamed = list(range(resident, cfg.num_layers))
    assert ptr[streamed[0]] != ptr[streamed[1]]
    if len(streamed) > 2:
        assert ptr[streamed[0]] == ptr[streamed[2]]
    assert len({ptr[i] for i in range(resident)} | {ptr[streamed[0]]}) == resident + 1


def test_planner_sizes_on_meta():
    with torch.device("meta"):
        model = CausalS2VDiT(S2V_14B.dit).to(torch.bfloat16)
    sizes = group_nbytes(model)
    block = 351_394_304 * 2  # architecture.md §10.1: one transformer block, bf16
    injector = 1_887_928_320 * 2 // 12  # one of 12 (cross-attention + AdaLN) injectors
    assert sizes[1] == block and sizes[0] == block + injector and sizes[39] == block + injector
    assert sum(sizes) + base_nbytes(model) == 16_295_755_609 * 2
    expected = fp8_nbytes(model)  # per-channel scales: every 14B tensor size is a multiple of the alignment
    fp8 = apply_fp8(model)
    assert sum(group_nbytes(fp8)) + base_nbytes(fp8) == expected


def test_choose_resident_blocks():
    sizes = [15, 10, 10, 15, 10]
    base = 5
    assert choose_resident_blocks(10**6, sizes, base) == 5
    assert choose_resident_blocks(5 + 60, sizes, base) == 5
    # K=4: 5 + 50 + 10 (one streamed group needs a single slot) = 65 > 64; K=3: 5 + 35 + 2·15 = 70;
    # K=2: 5 + 25 + 2·15 = 60.
    assert choose_resident_blocks(64, sizes, base) == 2
    assert choose_resident_blocks(59, sizes, base) == 1  # 5 + 15 + 2·15 = 50 <= 59
    assert choose_resident_blocks(35, sizes, base) == 0  # 5 + 2·15
    with pytest.raises(UserError, match="budget"):
        choose_resident_blocks(34, sizes, base)


def test_rejects_bad_arguments(tiny):
    model = tiny[1][False][0]
    with pytest.raises(UserError, match="resident"):
        apply_block_streaming(copy.deepcopy(model), 5, "cpu")
    with torch.device("meta"):
        meta = CausalS2VDiT(TINY.dit)
    with pytest.raises(UserError, match="meta"):
        apply_block_streaming(meta, 1, "cpu")
