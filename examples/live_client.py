"""A client of `liveavatar serve`: create a session, stream a speech file to it in 200 ms chunks at
the pace a TTS would produce them, and save the video that comes back (fragmented MP4, with sound).

    pip install httpx websockets
    python examples/live_client.py --server http://127.0.0.1:8000 --image face.png --speech hello.wav \
        --out live.mp4 [--token SECRET] [--size 704*384] [--seconds_after 2]

The speech file may be any format and rate the server's `liveavatar` reads (it is decoded and
resampled here to 16 kHz mono, then sent as signed 16-bit PCM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx
import numpy as np
import websockets

from liveavatar.io.media import SAMPLE_RATE, load_audio


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", default="http://127.0.0.1:8000")
    ap.add_argument("--image", required=True)
    ap.add_argument("--speech", required=True)
    ap.add_argument("--out", default="live.mp4")
    ap.add_argument("--prompt", default="A person is talking to the camera.")
    ap.add_argument("--size", default=None)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--token", default=None)
    ap.add_argument("--seconds_after", type=float, default=2.0, help="video to keep after the speech (idle)")
    args = ap.parse_args()
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}

    # 1. Create the session: image, prompt, options (JSON). The answer has its id and URLs.
    options = {"seed": args.seed, "wait_for_speech": True, **({"size": args.size} if args.size else {})}
    with open(args.image, "rb") as f:
        r = httpx.post(f"{args.server}/sessions", files={"image": f}, headers=headers, timeout=60,
                       data={"prompt": args.prompt, "options": json.dumps(options)})
    if r.status_code != 201:
        raise SystemExit(f"error: {r.json()['error']}")
    session = r.json()
    print(f"session {session['id']}: {session['state']}", flush=True)

    # 2. Open its WebSocket: speech goes in as binary frames, video and events come out.
    pcm = np.clip(np.round(load_audio(args.speech) * 32768), -32768, 32767).astype("<i2")
    speech_seconds = len(pcm) / SAMPLE_RATE
    ws_url = args.server.replace("http", "ws", 1) + session["ws"] + (f"?token={args.token}" if args.token else "")
    video = bytearray()
    async with websockets.connect(ws_url, max_size=None) as ws:
        async def speak():
            step, t0 = SAMPLE_RATE // 5, time.monotonic()
            for i in range(0, len(pcm), step):
                await ws.send(pcm[i:i + step].tobytes())
                await asyncio.sleep(max(0.0, t0 + (i + step) / SAMPLE_RATE - time.monotonic()))
            await ws.send(json.dumps({"type": "end"}))  # the utterance is complete

        speaker = asyncio.create_task(speak())
        frames = 0
        while frames < (speech_seconds + args.seconds_after) * 25:
            msg = await ws.recv()
            if isinstance(msg, bytes):
                video += msg  # fragmented MP4: the init segment first, then one fragment per block
                continue
            event = json.loads(msg)
            if event["type"] == "block":
                frames = event["frame_start"] + event["frames"]
            elif event["type"] in ("queued", "started"):
                print(event, flush=True)
            elif event["type"] in ("error", "closed"):
                raise SystemExit(f"error: {event.get('error') or event.get('reason')}")
        await speaker
        await ws.send(json.dumps({"type": "close"}))
    with open(args.out, "wb") as f:
        f.write(video)
    print(f"saved {args.out} ({frames} frames)")


if __name__ == "__main__":
    asyncio.run(main())
