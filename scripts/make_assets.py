"""Regenerate the example inputs shipped in liveavatar/assets/.

- `face.png`: a friendly cartoon face drawn with PIL, 384x704 (9:16 portrait, exactly the
  `--size 704*384` output, so it is used unscaled). Deterministic.
- `speech.wav`: about 4 s of English speech synthesised with espeak-ng, resampled to 16 kHz mono
  16-bit. Needs the `espeak-ng` program (`apt-get install espeak-ng`); its output differs slightly
  between espeak-ng versions.

Usage: python scripts/make_assets.py [--only face|speech]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from PIL import Image, ImageDraw, ImageFilter

ASSETS = Path(__file__).resolve().parent.parent / "liveavatar" / "assets"
WIDTH, HEIGHT = 384, 704
SS = 3  # supersampling factor for smooth edges
SENTENCE = "Hello! I am your live avatar. Give me a voice, and I will talk."
SAMPLE_RATE = 16000

SKIN, SKIN_SHADE = (246, 205, 170), (232, 180, 146)
HAIR = (92, 58, 38)
SHIRT, SHIRT_SHADE = (64, 150, 160), (50, 124, 134)
IRIS, PUPIL, WHITE = (88, 120, 70), (30, 24, 20), (255, 255, 255)
LIPS, MOUTH, TEETH = (196, 86, 86), (120, 40, 48), (250, 246, 240)
BLUSH = (240, 140, 140, 90)


def _ellipse(d: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float, fill, **kw) -> None:
    d.ellipse([(cx - rx) * SS, (cy - ry) * SS, (cx + rx) * SS, (cy + ry) * SS], fill=fill, **kw)


def draw_face() -> Image.Image:
    """The example reference image: a cartoon head and shoulders, centred, facing the camera."""
    w, h = WIDTH * SS, HEIGHT * SS
    # Background: a vertical pastel gradient (one colour per row compresses well in PNG).
    t = np.linspace(0.0, 1.0, h)[:, None, None]
    top, bottom = np.array([214, 232, 245]), np.array([246, 238, 226])
    bg = (top * (1 - t) + bottom * t).astype(np.uint8)
    img = Image.fromarray(np.broadcast_to(bg, (h, w, 3)).copy())
    d = ImageDraw.Draw(img)

    cx, cy = WIDTH / 2, 300  # head centre
    # Shoulders and shirt, neck.
    d.rounded_rectangle([40 * SS, 510 * SS, (WIDTH - 40) * SS, (HEIGHT + 80) * SS], radius=110 * SS, fill=SHIRT)
    d.polygon([((cx - 60) * SS, 510 * SS), (cx * SS, 580 * SS), ((cx + 60) * SS, 510 * SS)], fill=SHIRT_SHADE)
    d.rectangle([(cx - 42) * SS, 400 * SS, (cx + 42) * SS, 520 * SS], fill=SKIN_SHADE)
    _ellipse(d, cx, 516, 44, 22, SKIN_SHADE)
    # Hair behind the head, ears, head.
    _ellipse(d, cx, cy - 22, 138, 160, HAIR)
    _ellipse(d, cx - 118, cy + 10, 22, 34, SKIN_SHADE)
    _ellipse(d, cx + 118, cy + 10, 22, 34, SKIN_SHADE)
    _ellipse(d, cx, cy + 10, 120, 150, SKIN)
    # Fringe: overlapping ellipses across the forehead.
    for dx, dy, rx, ry in ((-70, -120, 70, 44), (0, -132, 80, 42), (70, -120, 70, 44), (-100, -86, 30, 50),
                           (100, -86, 30, 50)):
        _ellipse(d, cx + dx, cy + dy, rx, ry, HAIR)

    # Blush on a transparent layer.
    blush = Image.new("RGBA", img.size, (0, 0, 0, 0))
    bd = ImageDraw.Draw(blush)
    _ellipse(bd, cx - 70, cy + 52, 24, 14, BLUSH)
    _ellipse(bd, cx + 70, cy + 52, 24, 14, BLUSH)
    img = Image.alpha_composite(img.convert("RGBA"), blush.filter(ImageFilter.GaussianBlur(6 * SS))).convert("RGB")
    d = ImageDraw.Draw(img)

    # Eyes: white, iris, pupil, highlight; eyebrows above.
    for side in (-1, 1):
        ex, ey = cx + side * 46, cy + 2
        _ellipse(d, ex, ey, 24, 17, WHITE, outline=PUPIL, width=2 * SS)
        _ellipse(d, ex + side * 2, ey + 1, 12, 12, IRIS)
        _ellipse(d, ex + side * 2, ey + 1, 6, 6, PUPIL)
        _ellipse(d, ex + side * 2 + 4, ey - 4, 3, 3, WHITE)
        d.arc([(ex - 28) * SS, (ey - 44) * SS, (ex + 28) * SS, (ey - 14) * SS], start=200, end=340,
              fill=HAIR, width=6 * SS)
    # Nose.
    d.arc([(cx - 12) * SS, (cy + 26) * SS, (cx + 12) * SS, (cy + 50) * SS], start=20, end=160,
          fill=SKIN_SHADE, width=4 * SS)
    # Smile: an open mouth (lower half-ellipse) with teeth and lips.
    mouth = [(cx - 44) * SS, (cy + 56) * SS, (cx + 44) * SS, (cy + 112) * SS]
    d.chord(mouth, start=0, end=180, fill=MOUTH, outline=LIPS, width=4 * SS)
    d.chord([(cx - 34) * SS, (cy + 60) * SS, (cx + 34) * SS, (cy + 84) * SS], start=0, end=180, fill=TEETH)
    d.line([(cx - 44) * SS, (cy + 84) * SS, (cx + 44) * SS, (cy + 84) * SS], fill=LIPS, width=4 * SS)

    return img.resize((WIDTH, HEIGHT), Image.LANCZOS)


def synth_speech(text: str = SENTENCE) -> np.ndarray:
    """Speak `text` with espeak-ng; return float32 mono at 16 kHz, trimmed and normalised to -3 dBFS."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SystemExit("espeak-ng not found; install it (apt-get install espeak-ng) to regenerate speech.wav")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run([exe, "-v", "en-us", "-s", "175", "-p", "45", "-w", str(wav), text], check=True)
        x, sr = sf.read(wav, dtype="float32", always_2d=True)
    x = soxr.resample(x.mean(axis=1), sr, SAMPLE_RATE, quality="HQ")
    voiced = np.flatnonzero(np.abs(x) > 0.01)
    pad = int(0.15 * SAMPLE_RATE)
    x = x[max(0, voiced[0] - pad): voiced[-1] + pad]
    return (x / np.abs(x).max() * 10 ** (-3 / 20)).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["face", "speech"])
    args = ap.parse_args()
    ASSETS.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "face"):
        path = ASSETS / "face.png"
        draw_face().save(path, optimize=True)
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    if args.only in (None, "speech"):
        path = ASSETS / "speech.wav"
        wave = synth_speech()
        sf.write(path, wave, SAMPLE_RATE, subtype="PCM_16")
        print(f"wrote {path} ({len(wave) / SAMPLE_RATE:.2f} s, {path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
