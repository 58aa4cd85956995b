"""A long speech costs neither time before the first frame nor memory: `liveavatar generate --num_clip 1`
on a 30-minute speech (written here, block by block) against a 1-minute one, each in its own process.

The speech is checked from end to end before any model loads (one streaming pass), then read only as
far as the generated clip needs; the 30-minute run must reach its first frame in about the time of
the 1-minute run and peak within 10 % of its resident memory. Each run fixes glibc's mmap threshold
(`MALLOC_MMAP_THRESHOLD_`), so that freed buffers go back to the system and the peak is what the
program holds, not what the allocator happened to keep (otherwise the same run varies by ±30 MiB).
The exact figures for 1, 10 and 30 minutes are in benchmarks/bench_long_speech.py.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

REPO = Path(__file__).resolve().parents[2]

_RUN = """
import resource, sys, torch
torch.set_num_threads(1)
from liveavatar.cli import main
code = main(sys.argv[1:])
print("maxrss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def write_speech(path: Path, minutes: float, sr: int = 16000) -> None:
    """A speech-like tone (pitch and loudness moving) of `minutes`, written one second at a time."""
    with sf.SoundFile(str(path), "w", samplerate=sr, channels=1, subtype="PCM_16") as f:
        for s in range(int(minutes * 60)):
            t = s + np.arange(sr) / sr
            x = 0.3 * np.sin(2 * np.pi * (140 + 40 * np.sin(0.7 * t)) * t) * (0.55 + 0.45 * np.sin(2 * np.pi * 2.5 * t))
            f.write(x.astype(np.float32))


def generate(image: Path, audio: Path, out: Path) -> tuple[float, int]:
    """(seconds to the first frame, peak RSS in KiB) of a tiny 1-clip generation in a fresh process."""
    args = ["--preset", "tiny", "--size", "128*128", "--num_clip", "1", "--image", str(image),
            "--audio", str(audio), "--save_file", str(out)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    r = subprocess.run([sys.executable, "-c", _RUN, "generate", *args], capture_output=True, text=True,
                       timeout=900, cwd=str(REPO), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    first = float(re.search(r"first frame after ([0-9.]+)s", r.stdout).group(1))
    rss = int(re.search(r"maxrss_kb (\d+)", r.stderr).group(1))
    return first, rss


def test_thirty_minutes_of_speech_cost_no_more_than_one(tmp_path):
    rng = np.random.default_rng(0)
    image = tmp_path / "face.png"
    Image.fromarray((rng.random((128, 128, 3)) * 255).astype(np.uint8)).save(image)
    write_speech(tmp_path / "one.wav", 1)
    write_speech(tmp_path / "thirty.wav", 30)
    assert (tmp_path / "thirty.wav").stat().st_size > 57_000_000
    t1, rss1 = generate(image, tmp_path / "one.wav", tmp_path / "one.mp4")
    t30, rss30 = generate(image, tmp_path / "thirty.wav", tmp_path / "thirty.mp4")
    print(f"first frame: 1 min {t1:.1f} s, 30 min {t30:.1f} s; peak RSS: {rss1 / 1024:.0f} MiB, {rss30 / 1024:.0f} MiB")
    assert rss30 <= 1.10 * rss1, (rss1, rss30)
    # A loose bound: the failure it guards against (encoding or holding the whole speech) costs minutes.
    assert t30 <= 1.5 * t1 + 2.0, (t1, t30)
