"""Multi-process generation (gloo on CPU, tiny preset) gives the single-process video frame for frame.

Each layout runs in fresh processes through `liveavatar.distributed.generate.run_rank`, the program
every torchrun rank runs: timestep pipelines of 2, 3 and 4 denoise ranks, each with and without a
decode rank of its own; Ulysses sequence parallelism over 2 ranks, alone and with sharded weights;
and 2 pipeline stages each split over 2 Ulysses ranks with sharded weights (4 processes). The speech
gives 5 blocks, so the sink refresh (block 4, the first of clip 1) is crossed. Everything runs on one
thread per process, as the reference does (CPU kernels differ in the last bits between thread counts).
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from ranks import run_ranks  # noqa: E402

from liveavatar import GenerationOptions, Pipeline  # noqa: E402
from liveavatar.distributed.layout import ParallelLayout  # noqa: E402

OPTS = GenerationOptions(size=128 * 128, num_clip=2, seed=9)
PROMPT = "a person talking"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    rng = np.random.default_rng(4)
    Image.fromarray((rng.random((128, 128, 3)) * 255).astype(np.uint8)).save(d / "face.png")
    t = np.arange(int(16000 * 2.3)) / 16000  # 5 blocks: 4 in clip 0, then the refresh
    sf.write(d / "speech.wav", (0.3 * np.sin(2 * np.pi * 170 * t) * np.sin(2 * np.pi * 2.5 * t)).astype(np.float32),
             16000)
    return str(d / "face.png"), str(d / "speech.wav")


@pytest.fixture(scope="module")
def reference(files):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        chunks = list(Pipeline.tiny(seed=0).session(*files, PROMPT, OPTS))
    finally:
        torch.set_num_threads(threads)
    assert len(chunks) == 5
    return np.concatenate([c.frames for c in chunks]), np.concatenate([c.audio for c in chunks])


def rank_main(rank, world, layout, files, opts):
    """One rank: its part of the generation; the decoding rank returns the chunks it made."""
    from liveavatar.distributed.generate import RankJob, run_rank
    from liveavatar.engine.pipeline import Pipeline

    chunks = []

    def build(role, place_dit):
        return Pipeline.tiny(seed=0, place_dit=place_dit)

    job = RankJob(layout, rank, opts, files[0], files[1], PROMPT, build)
    stats, _ = run_rank(job, lambda h, w: chunks.append)
    return {"chunks": [(c.index, c.frame_start, c.frames, c.audio) for c in chunks], "stats": stats.__dict__,
            "role": layout.role(rank).describe()}


LAYOUTS = {
    "pipeline 2": ParallelLayout(2),
    "pipeline 2 + decode rank": ParallelLayout(2, decode_rank=True),
    "pipeline 3": ParallelLayout(3),
    "pipeline 3 + decode rank": ParallelLayout(3, decode_rank=True),
    "pipeline 4": ParallelLayout(4),
    "pipeline 4 + decode rank": ParallelLayout(4, decode_rank=True),
    "ulysses 2": ParallelLayout(2, ulysses=2),
    "ulysses 2 + sharded weights": ParallelLayout(2, ulysses=2, shard_weights=True),
    "2 stages x ulysses 2, sharded": ParallelLayout(4, ulysses=2, shard_weights=True),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_gives_the_single_process_video(files, reference, name):
    layout = LAYOUTS[name].check(num_heads=4)
    results = run_ranks(rank_main, layout.world, layout, files, OPTS, timeout=600)
    decoder = results[layout.decoder]
    assert all(not r["chunks"] for i, r in enumerate(results) if i != layout.decoder)
    frames = np.concatenate([c[2] for c in decoder["chunks"]])
    audio = np.concatenate([c[3] for c in decoder["chunks"]])
    assert [c[1] for c in decoder["chunks"]] == [0, 9, 21, 33, 45]
    assert np.array_equal(frames, reference[0]) and np.array_equal(audio, reference[1])
    # every denoise rank crossed the sink refresh; those before the last stage got the first latent
    for i, r in enumerate(results):
        role = layout.role(i)
        if role.stage is not None:
            assert r["stats"]["blocks"] == 5 and r["stats"]["refresh_compute"] > 0, (i, r["stats"])


def compiled_rank_main(rank, world, layout, files, opts):
    """One rank with its stage's blocks compiled (aot_eager: dynamo's graph capture, no code generation)."""
    from torch._dynamo.utils import counters

    from liveavatar.distributed.generate import RankJob, run_rank
    from liveavatar.engine.pipeline import Pipeline

    chunks = []
    counters.clear()
    job = RankJob(layout, rank, opts, files[0], files[1], PROMPT,
                  lambda role, place_dit: Pipeline.tiny(seed=0, place_dit=place_dit), compile_backend="aot_eager")
    run_rank(job, lambda h, w: chunks.append)
    return {"chunks": [(c.index, c.frame_start, c.frames, c.audio) for c in chunks],
            "graph_breaks": sum(counters["graph_break"].values()), "graphs": counters["stats"]["unique_graphs"]}


@pytest.mark.parametrize("name", ["pipeline 2 + decode rank", "ulysses 2 + sharded weights"])
def test_compiled_layout_gives_the_single_process_video(files, reference, name):
    """`--compile` under torchrun: each denoise rank's blocks compile whole (no graph break, with the
    sequence-parallel all-to-alls inside the graph) and the video is the single-process one, up to
    float rounding (compiled graphs sum in another order: a few 8-bit values move by one)."""
    layout = LAYOUTS[name].check(num_heads=4)
    results = run_ranks(compiled_rank_main, layout.world, layout, files, OPTS, timeout=600)
    frames = np.concatenate([c[2] for c in results[layout.decoder]["chunks"]])
    assert frames.shape == reference[0].shape
    diff = np.abs(frames.astype(int) - reference[0].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # float rounding flips a few 8-bit values
    for i, r in enumerate(results):
        if layout.role(i).stage is not None:
            assert r["graph_breaks"] == 0 and r["graphs"] == 2, (i, r)
