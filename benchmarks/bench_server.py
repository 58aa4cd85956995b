"""`liveavatar serve` against the in-process generator (tiny preset, CPU), side by side.

Measures, in one run:
1. time to first frame and steady blocks/s: an in-process live session vs the same session through a
   real server (HTTP create, speech posted whole, video over the WebSocket), with their ratio;
2. latency from a speech chunk's arrival at the server to the first frame of that speech on the wire
   (a paced server, the avatar idling when the speech comes);
3. memory per session: a queued one (RSS) and an active one (its caches, from /metrics);
4. a soak: `--blocks` blocks across sessions of `--blocks_per_session` blocks, two at a time, with
   the resident memory sampled throughout (flat means no leak).

    python benchmarks/bench_server.py [--size 128*128] [--blocks 1000] [--blocks_per_session 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))

import httpx  # noqa: E402
import websockets  # noqa: E402

from liveavatar.io import media  # noqa: E402

FPS = 25


def in_process(size: str, blocks: int, threads: int) -> tuple[float, float]:
    """(seconds to the first chunk from session creation, blocks/s after it)."""
    import torch

    from liveavatar.cli import DEFAULT_PROMPT
    from liveavatar.engine.pipeline import Pipeline
    from liveavatar.engine.session import GenerationOptions, Inputs

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    pipe = Pipeline.tiny()
    opts = GenerationOptions(size=media.parse_size(size), seed=1, audio_encoding="windowed")  # as the server
    wave = media.load_audio(media.example_audio_path())
    t0 = time.monotonic()
    inputs = Inputs.load(media.example_image_path(), None, opts)
    session = pipe.live_session(inputs, DEFAULT_PROMPT, opts)
    session.push_audio(wave)
    session.end_audio()
    times = []
    while len(times) < blocks:
        chunk = session.step()
        if chunk is not None:
            times.append(time.monotonic())
    session.close()
    return times[0] - t0, (len(times) - 1) / (times[-1] - times[0])


async def through_server(srv, size: str, blocks: int) -> tuple[float, float]:
    t0 = time.monotonic()
    info = srv.create({"seed": 1, "size": size})
    httpx.post(f"{srv.base}/sessions/{info['id']}/speech",
               files={"audio": ("speech.wav", media.example_audio_path().read_bytes())}, timeout=60)
    first, times = None, []
    async with websockets.connect(srv.ws_url(info), max_size=None) as ws:
        while len(times) < blocks:
            msg = await ws.recv()
            now = time.monotonic()
            if isinstance(msg, bytes):
                first = first or now
            elif json.loads(msg)["type"] == "block":
                times.append(now)
        await ws.send(json.dumps({"type": "close"}))
    return first - t0, (len(times) - 1) / (times[-1] - times[0])


async def speech_latency(srv, size: str, trials: int) -> list[float]:
    """Seconds from sending the first 200 ms chunk of an utterance to the first bytes of its first
    spoken block (the avatar idles before each utterance)."""
    info = srv.create({"seed": 2, "size": size})
    wave = media.load_audio(media.example_audio_path())
    pcm = np.clip(np.round(wave * 32768), -32768, 32767).astype(np.int16)
    step = media.SAMPLE_RATE // 5
    out = []
    async with websockets.connect(srv.ws_url(info), max_size=None) as ws:
        async def until(pred):
            while True:
                msg = await ws.recv()
                if isinstance(msg, str) and pred(json.loads(msg)):
                    return time.monotonic()
        await until(lambda e: e["type"] == "block")
        for _ in range(trials):
            await asyncio.sleep(0.3 + np.random.default_rng(len(out)).uniform(0, 0.5))  # a random phase
            t0 = time.monotonic()

            async def send(t0=t0):
                for i in range(0, len(pcm), step):  # at the pace speech is produced
                    await ws.send(pcm[i:i + step].tobytes())
                    await asyncio.sleep(max(0.0, t0 + (i + step) / media.SAMPLE_RATE - time.monotonic()))
                await ws.send(json.dumps({"type": "end"}))
            sender = asyncio.create_task(send())
            t1 = await until(lambda e: e["type"] == "block" and e["speaking"])
            out.append(t1 - t0)
            await sender
            await ws.send(json.dumps({"type": "barge_in"}))
            await until(lambda e: e["type"] == "block" and not e["speaking"] and not e["speech_queued"])
        await ws.send(json.dumps({"type": "close"}))
    return out


def session_memory(srv, size: str) -> tuple[float, float]:
    """(RSS bytes per queued session, cache bytes of one active session)."""
    active = srv.create({"seed": 3, "size": size})  # holds the server's places with max_active 1
    deadline = time.monotonic() + 60
    while srv.metrics()["liveavatar_blocks_total"] < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    cache = srv.metrics()["liveavatar_session_cache_bytes"]
    rss0 = srv.metrics()["liveavatar_resident_memory_bytes"]
    queued = [srv.create({"seed": 10 + i, "size": size}) for i in range(10)]
    rss1 = srv.metrics()["liveavatar_resident_memory_bytes"]
    for info in queued + [active]:
        httpx.delete(f"{srv.base}/sessions/{info['id']}")
    return (rss1 - rss0) / len(queued), cache


async def soak(srv, size: str, blocks: int, per_session: int) -> list[tuple[float, float, float]]:
    sessions = [srv.create({"seed": i, "size": size, "max_seconds": per_session * 12 / FPS})
                for i in range(max(1, blocks // per_session))]
    samples = []

    async def follow(info):
        async with websockets.connect(srv.ws_url(info), max_size=None) as ws:
            while True:
                msg = await ws.recv()
                if isinstance(msg, str) and json.loads(msg)["type"] == "closed":
                    return

    async def sample():
        t0 = time.monotonic()
        while True:
            m = await asyncio.to_thread(srv.metrics)
            samples.append((time.monotonic() - t0, m["liveavatar_blocks_total"], m["liveavatar_resident_memory_bytes"]))
            await asyncio.sleep(2)

    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(follow(i) for i in sessions))
    sampler.cancel()
    m = srv.metrics()
    samples.append((samples[-1][0], m["liveavatar_blocks_total"], m["liveavatar_resident_memory_bytes"]))
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="128*128")
    ap.add_argument("--blocks", type=int, default=1000, help="soak length across sessions (0: no soak)")
    ap.add_argument("--blocks_per_session", type=int, default=50)
    ap.add_argument("--steady_blocks", type=int, default=12)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import test_server  # the test suite's server harness: a real `liveavatar serve` process

    test_server.SIZE = args.size
    test_server.ENV["OMP_NUM_THREADS"] = str(args.threads)

    # Alternate the two, twice each, and keep each one's best (the machine's load varies).
    fast = test_server.Server("--max_active", "1", "--max_lead", "1000")
    runs_in, runs_srv = [], []
    try:
        for _ in range(2):
            runs_in.append(in_process(args.size, args.steady_blocks, args.threads))
            runs_srv.append(asyncio.run(through_server(fast, args.size, args.steady_blocks)))
        per_queued, per_active = session_memory(fast, args.size)
    finally:
        fast.stop()
    ttff_in, rate_in = min(r[0] for r in runs_in), max(r[1] for r in runs_in)
    ttff_srv, rate_srv = min(r[0] for r in runs_srv), max(r[1] for r in runs_srv)
    print(f"tiny preset, {args.size}, {args.threads} thread(s)")
    print(f"{'':28}{'in-process':>12}{'server':>12}{'ratio':>8}")
    print(f"{'time to first frame (s)':28}{ttff_in:12.2f}{ttff_srv:12.2f}{ttff_srv / ttff_in:8.2f}")
    print(f"{'steady blocks/s':28}{rate_in:12.3f}{rate_srv:12.3f}{rate_srv / rate_in:8.2f}")
    print(f"memory: queued session {per_queued / 2**20:.2f} MiB RSS; "
          f"active session caches {per_active / 2**20:.1f} MiB")

    paced = test_server.Server("--max_active", "1")
    try:
        lat = asyncio.run(speech_latency(paced, args.size, 5))
    finally:
        paced.stop()
    print(f"speech chunk -> its first frame on the wire: median {statistics.median(lat):.2f} s "
          f"(min {min(lat):.2f}, max {max(lat):.2f}, {len(lat)} utterances, paced server, block = {12 / FPS:.2f} s)")

    if args.blocks:
        srv = test_server.Server("--max_active", "2", "--max_lead", "1000", "--idle_timeout", "3600")
        try:
            samples = asyncio.run(soak(srv, args.size, args.blocks, args.blocks_per_session))
        finally:
            srv.stop()
        total = samples[-1][1]
        print(f"soak: {int(total)} blocks in {samples[-1][0]:.0f} s across {args.blocks // args.blocks_per_session} "
              f"sessions, two at a time; resident memory (MiB):")
        for frac in (0.1, 0.25, 0.5, 0.75, 1.0):
            window = [rss for _, b, rss in samples if frac - 0.1 < b / total <= frac] or [samples[-1][2]]
            print(f"  blocks {frac:4.0%}: median {np.median(window) / 2**20:7.1f}  max {max(window) / 2**20:7.1f}")
        late = [(b, rss) for _, b, rss in samples if b >= total * 0.25]
        slope = np.polyfit([b for b, _ in late], [r for _, r in late], 1)[0] if len(late) > 2 else 0.0
        print(f"  slope after the first quarter: {slope / 1024:.1f} KiB per block "
              f"({slope * 1000 / 2**20:.1f} MiB per 1,000 blocks)")


if __name__ == "__main__":
    main()
