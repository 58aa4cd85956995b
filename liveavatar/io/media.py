"""Media input: the output-size rule, the reference image and the speech.

Inputs follow the official pipeline: `--size` is an area cap and `target_size` reproduces
`get_size_less_than_area` (sides are multiples of 64, the image aspect is kept, small images are
never upscaled past the next multiple of 64); the reference image goes through the torchvision
`Resize(min(H, W))` -> `CenterCrop((H, W))` (zero padding) -> `ToTensor` -> `x*2-1` chain, rebuilt
on PIL and numpy; speech is loaded like `librosa.load(path, sr=16000)` (soundfile, channel mean,
soxr HQ), with PyAV decoding the containers libsndfile cannot read (M4A, MP4, AAC...).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import soxr
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from liveavatar.errors import UserError

SAMPLE_RATE = 16000  # speech is resampled to this rate for the audio encoder and the muxed track
SIZE_DIVISOR = 64  # output sides are multiples of this (VAE stride 8 x patch 2 x FramePack 4x bucket)
MIN_SIDE = 128  # smallest output side accepted by default: latent 16, FramePack 4x bucket 2 tokens
ASSETS = Path(__file__).parent.parent / "assets"

# Extensions that libsndfile cannot read; they go straight to PyAV.
SILENCE_RMS = 1e-3  # speech quieter than this RMS (-60 dBFS) gets a warning: the avatar will barely move
_PYAV_SUFFIXES = {".m4a", ".mp4", ".aac", ".mov", ".m4v", ".mkv", ".webm", ".wma", ".3gp", ".opus"}


def example_image_path() -> Path:
    """The bundled example reference image (a drawn cartoon face, 384x704 portrait PNG)."""
    return ASSETS / "face.png"


def example_audio_path() -> Path:
    """The bundled example speech (about 4 s, 16 kHz mono 16-bit WAV, synthesised with espeak-ng)."""
    return ASSETS / "speech.wav"


# ----------------------------------------------------------------------------------------------------
# Output size
# ----------------------------------------------------------------------------------------------------


def parse_size(s: str) -> int:
    """Area cap in pixels from "704*384" (also "704x384"): the official `MAX_AREA_CONFIGS` value."""
    m = re.fullmatch(r"\s*(\d+)\s*[*xX]\s*(\d+)\s*", str(s))
    if m is None or int(m.group(1)) <= 0 or int(m.group(2)) <= 0:
        raise UserError(f"--size {s!r} is not an area of the form H*W; pass e.g. --size 704*384")
    return int(m.group(1)) * int(m.group(2))


def target_size(img_h: int, img_w: int, max_area: int, divisor: int = SIZE_DIVISOR,
                min_side: int = MIN_SIDE) -> tuple[int, int]:
    """Output (H, W) for an img_h x img_w image under the area cap, as the official pipeline picks it.

    Scans 100 scales from sqrt(max_area / (h*w)) (at most 1.0) down to a lower bound, floors the
    scaled sides, rounds each up to a multiple of `divisor` and takes the first that fits the area;
    falls back to flooring an aspect-preserving shape. The float expressions, including the quirky
    `2*a*c` of the lower bound, are the official ones, so results match it exactly (the official loop
    hard-codes 64, which equals the default divisor). Raises UserError when a side is below `min_side`.
    """
    if img_h <= 0 or img_w <= 0:
        raise UserError(f"the reference image has an empty side ({img_h}x{img_w}); use a real image")
    if max_area < min_side * min_side:
        raise UserError(f"--size area {max_area} is below the minimum {min_side}*{min_side}; use e.g. 704*384")
    height, width = img_h, img_w
    if height * width <= max_area:
        min_scale, max_scale = 0.1, 1.0
    else:
        d = divisor - 1
        a = height * width
        b = d * (height + width)
        c = d**2 - max_area
        min_scale = (-b + math.sqrt(b**2 - 2 * a * c)) / (2 * a)
        max_scale = math.sqrt(max_area / (height * width))

    for i in range(100):
        scale = max_scale - (max_scale - min_scale) * i / 100
        new_h, new_w = int(height * scale), int(width * scale)
        out_h = new_h + (divisor - new_h % divisor) % divisor
        out_w = new_w + (divisor - new_w % divisor) % divisor
        if out_h * out_w <= max_area:
            break
    else:
        aspect = width / height
        out_w = int((max_area * aspect) ** 0.5 // divisor * divisor)
        out_h = int((max_area / aspect) ** 0.5 // divisor * divisor)
        if out_w >= width or out_h >= height:
            out_w = int(width // divisor * divisor)
            out_h = int(height // divisor * divisor)

    if min(out_h, out_w) < min_side:
        raise UserError(
            f"a {img_w}x{img_h} (WxH) image under the area cap {max_area} gives a {out_w}x{out_h} video, "
            f"below the minimum side {min_side}; use a larger --size or a less elongated image"
        )
    return out_h, out_w


# ----------------------------------------------------------------------------------------------------
# Reference image
# ----------------------------------------------------------------------------------------------------


def _resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """torchvision `Resize(size)` on a PIL image: shorter edge -> size, longer -> int(size*long/short)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.BILINEAR)  # PIL's bilinear filter antialiases when shrinking


def _center_crop(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torchvision `CenterCrop((out_h, out_w))`: zero-pads (left/top get the floor half) when the
    image is smaller, then crops at round((size - out) / 2) (round half to even). x: [h, w, C]."""
    h, w = x.shape[:2]
    if out_h > h or out_w > w:
        pad_t = (out_h - h) // 2 if out_h > h else 0
        pad_b = (out_h - h + 1) // 2 if out_h > h else 0
        pad_l = (out_w - w) // 2 if out_w > w else 0
        pad_r = (out_w - w + 1) // 2 if out_w > w else 0
        x = np.pad(x, ((pad_t, pad_b), (pad_l, pad_r), (0, 0)))
        h, w = x.shape[:2]
    top = int(round((h - out_h) / 2.0))
    left = int(round((w - out_w) / 2.0))
    return x[top:top + out_h, left:left + out_w]


IMAGE_BACKGROUND = (255, 255, 255)  # transparent pixels of the reference image are composited on white


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB: 16- and 32-bit integer and float images scaled to 8 bits (PIL's own
    conversion clips them, turning a 16-bit PNG almost white), palette, grey and CMYK converted,
    transparency composited on `IMAGE_BACKGROUND`."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        x = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            top = 1.0 if x.size and np.nanmax(x) <= 1.0 else 255.0
        else:
            top = 255.0 if x.size and x.max() <= 255 else (65535.0 if x.max() <= 65535 else float(x.max()))
        x = np.nan_to_num(x / top, nan=0.0).clip(0, 1)
        img = Image.fromarray((x * 255 + 0.5).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*IMAGE_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_reference_image(path: str | os.PathLike, max_area: int,
                         min_side: int = MIN_SIDE) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reference image -> ([3, H, W] float32 in [-1, 1], (H, W)) with (H, W) = `target_size`.

    The EXIF orientation is applied first (a no-op for images without one; the official code ignores
    it and so animates rotated phone photos sideways), then the image becomes 8-bit RGB (`_to_rgb`:
    16-bit, palette, grey, CMYK; transparency on white). Refused with UserError: a missing path, a file
    PIL cannot decode, an image whose shorter side is below `min_side` pixels, and an image too small for
    the requested size (it would give a smaller video than a large image of its aspect). Since (H, W) never
    exceeds the image scaled to at most 1.0 with sides rounded up to a multiple of 64, a smaller
    image would only be upscaled into a blurry face (and a smaller --size cannot help it).
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"reference image {str(p)!r} does not exist; pass the path of a PNG or JPEG file")
    try:
        with Image.open(p) as im:
            im.load()
            img = _to_rgb(ImageOps.exif_transpose(im))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"reference image {str(p)!r} could not be read as an image ({e}); "
                        "pass a valid PNG or JPEG file") from None
    w0, h0 = img.size
    if min(w0, h0) < min_side:
        raise UserError(f"reference image {str(p)!r} is {w0}x{h0} pixels, smaller than {min_side} on its "
                        f"shorter side; use an image at least {min_side} pixels on each side")
    out_h, out_w = target_size(h0, w0, max_area, min_side=min_side)
    k = math.isqrt(max_area // (h0 * w0) + 1) + 2  # the same aspect, larger than the area cap
    req_h, req_w = target_size(h0 * k, w0 * k, max_area, min_side=min_side)
    if (out_h, out_w) != (req_h, req_w):
        raise UserError(f"reference image {str(p)!r} is {w0}x{h0} pixels, smaller than the {req_w}x{req_h} "
                        f"video that --size {req_h}*{req_w} asks for; use a larger image, or --size "
                        f"{out_h}*{out_w} for a {out_w}x{out_h} video")

    x = np.array(_resize_shorter(img, min(out_h, out_w)))  # [h, w, 3] uint8
    x = np.ascontiguousarray(_center_crop(x, out_h, out_w))  # [H, W, 3]
    t = torch.from_numpy(x).permute(2, 0, 1).float().div(255)  # ToTensor
    return t * 2 - 1, (out_h, out_w)  # [3, H, W]


# ----------------------------------------------------------------------------------------------------
# Speech
# ----------------------------------------------------------------------------------------------------


_READ_BLOCK = 1 << 16  # input frames decoded per step when streaming a file


def _resampled_len(n: int, rate: int) -> int:
    """Samples soxr makes of `n` input samples at `rate` Hz, resampled to 16 kHz (round half up)."""
    return n if rate == SAMPLE_RATE else (2 * n * SAMPLE_RATE + rate) // (2 * rate)


def _blocks_soundfile(path: Path, start: int = 0) -> Iterator[np.ndarray]:
    """[C, n] float32 blocks from input frame `start` on, read with libsndfile."""
    with sf.SoundFile(str(path)) as f:
        if start:
            f.seek(start)
        while True:
            data = f.read(_READ_BLOCK, dtype="float32", always_2d=True)  # [n, C]
            if len(data) == 0:
                return
            yield data.T


def _blocks_pyav(path: Path, start: int = 0) -> Iterator[np.ndarray]:
    """[C, n] float32 blocks of the first audio stream, decoded with PyAV, from input frame `start` on."""
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError("the file has no audio stream")
        resampler = av.AudioResampler(format="fltp")  # keeps the layout and rate; planar float
        skip = start
        for f in _resampled_frames(container.decode(container.streams.audio[0]), resampler):
            x = f.to_ndarray().astype(np.float32, copy=False)  # [C, n]
            if skip:
                cut = min(skip, x.shape[1])
                x, skip = x[:, cut:], skip - cut
            if x.shape[1]:
                yield x


def _resampled_frames(frames, resampler):
    for frame in frames:
        yield from resampler.resample(frame)
    yield from resampler.resample(None)


def _pyav_rate(path: Path) -> int:
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError("the file has no audio stream")
        return container.streams.audio[0].codec_context.sample_rate


@dataclass(frozen=True)
class SpeechFile:
    """A speech file checked from end to end (decodable, finite, not empty) without holding it in
    memory: its decoder, sample rate, length at 16 kHz and level. `chunks()` streams it as 16 kHz mono."""

    path: Path
    decoder: str  # "soundfile" (WAV/FLAC/OGG/MP3 through libsndfile) or "pyav" (M4A, MP4, AAC, ...)
    rate: int  # the file's sample rate
    num_samples: int  # length at 16 kHz
    rms: float  # RMS level of the channel mean

    @property
    def silent(self) -> bool:
        return self.rms < SILENCE_RMS

    @property
    def seconds(self) -> float:
        return self.num_samples / SAMPLE_RATE

    def _blocks(self, start: int = 0) -> Iterator[np.ndarray]:
        return (_blocks_soundfile if self.decoder == "soundfile" else _blocks_pyav)(self.path, start)

    def chunks(self, start: int = 0) -> Iterator[np.ndarray]:
        """float32 mono 16 kHz chunks from 16 kHz sample `start` on: the channel mean, resampled with
        soxr HQ when the file is not at 16 kHz (the same samples as `librosa.load(path, sr=16000)`;
        soxr's stream gives the same samples whatever the block sizes)."""
        if self.rate == SAMPLE_RATE:
            for x in self._blocks(start):
                yield np.mean(x, axis=0)
            return
        stream = soxr.ResampleStream(self.rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        skip = start
        for x, last in _with_last(self._blocks()):
            y = stream.resample_chunk(np.mean(x, axis=0), last=last)
            if skip:
                cut = min(skip, len(y))
                y, skip = y[cut:], skip - cut
            if len(y):
                yield y


def _with_last(it: Iterator[np.ndarray]) -> Iterator[tuple[np.ndarray, bool]]:
    """(item, is_last) pairs, with a final empty block so a resampler can flush."""
    prev = None
    for x in it:
        if prev is not None:
            yield prev, False
        prev = x
    if prev is not None:
        yield prev, False
        yield prev[:, :0], True


def open_speech(path: str | os.PathLike) -> SpeechFile:
    """Check a speech file by decoding it once, block by block (memory stays flat for any length).

    WAV/FLAC/OGG/MP3 are read with soundfile; containers libsndfile cannot read (M4A, MP4, AAC...) and
    anything it fails on are decoded with PyAV. Missing, undecodable, empty or non-finite files raise
    UserError. Silence is not an error here (see `SpeechFile.silent`)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"audio file {str(p)!r} does not exist; pass the path of a WAV, FLAC, MP3 or M4A file")
    decoders = ["pyav"] if p.suffix.lower() in _PYAV_SUFFIXES else ["soundfile", "pyav"]
    for decoder in decoders:
        try:
            if decoder == "soundfile":
                rate, blocks = sf.info(str(p)).samplerate, _blocks_soundfile(p)
            else:
                rate, blocks = _pyav_rate(p), _blocks_pyav(p)
            n, sumsq, finite = 0, 0.0, True
            for x in blocks:
                mono = np.mean(x, axis=0)
                finite = finite and bool(np.all(np.isfinite(mono)))
                sumsq += float(np.sum(np.square(mono, dtype=np.float64)))
                n += len(mono)
            break
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, av.FFmpegError, OSError) as e:
            if decoder == decoders[-1]:
                raise UserError(f"audio file {str(p)!r} could not be decoded ({e}); "
                                "convert it to WAV, FLAC, MP3 or M4A") from None
    if n == 0:
        raise UserError(f"audio file {str(p)!r} contains no samples; pass a file with speech in it")
    if not finite:
        raise UserError(f"audio file {str(p)!r} contains NaN or infinite samples; re-export it as PCM WAV")
    return SpeechFile(p, decoder, rate, _resampled_len(n, rate), float(np.sqrt(sumsq / n)))


def load_audio(path: str | os.PathLike) -> np.ndarray:
    """Speech file -> float32 mono samples at 16 kHz, like `librosa.load(path, sr=16000)` (soundfile or
    PyAV decoding, channel mean, soxr HQ). The whole file in memory: for long files stream
    `open_speech(path).chunks()` instead."""
    chunks = list(open_speech(path).chunks())
    return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)


def audio_is_silent(wave: np.ndarray, threshold: float = SILENCE_RMS) -> bool:
    """True when the RMS level is below `threshold` (default 1e-3, i.e. -60 dBFS): worth a warning,
    since the avatar will barely move, but not an error."""
    if len(wave) == 0:
        return True
    return float(np.sqrt(np.mean(np.square(wave, dtype=np.float64)))) < threshold
