"""Media I/O: the official output-size rule, reference-image preprocessing, speech loading and the
fragmented MP4 writer (including what an interrupted run leaves on disk)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from PIL import Image

from liveavatar.errors import UserError
from liveavatar.io import media
from liveavatar.io.mp4 import MP4Writer

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
SR = 16000


# ----------------------------------------------------------------------------------------------------
# parse_size / target_size
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s, area", [("704*384", 704 * 384), ("704x384", 704 * 384), (" 720 * 400 ", 288000),
                                     ("688X368", 688 * 368)])
def test_parse_size(s, area):
    assert media.parse_size(s) == area


@pytest.mark.parametrize("s", ["", "704", "704*", "abc", "0*384", "704*384*2", "-704*384", "704.5*384"])
def test_parse_size_errors(s):
    with pytest.raises(UserError, match="704\\*384") as e:
        media.parse_size(s)
    assert repr(s) in str(e.value)


# (img_h, img_w): 9:16 portrait, 16:9, 1:1, 3:4 portrait, 3:4 landscape (architecture.md §2.3 and
# runtime.md §4.2, both computed with the official function).
TABLE = {
    "720*400": {(1920, 1080): (704, 384), (1080, 1920): (384, 704), (1024, 1024): (512, 512),
                (1024, 768): (640, 448), (768, 1024): (448, 640), (300, 300): (320, 320)},
    "704*384": {(1920, 1080): (704, 384), (1080, 1920): (384, 704), (1024, 1024): (512, 512),
                (1024, 768): (576, 448), (768, 1024): (448, 576), (300, 300): (320, 320)},
    "688*368": {(1920, 1080): (640, 384), (1080, 1920): (384, 640), (1024, 1024): (448, 448),
                (1024, 768): (512, 384)},
}


@pytest.mark.parametrize("size", list(TABLE))
def test_target_size_spec_table(size):
    area = media.parse_size(size)
    for (h, w), expected in TABLE[size].items():
        assert media.target_size(h, w, area) == expected, (size, h, w)


def test_target_size_matches_official_function():
    """624 (image, area) cases run through the official `get_size_less_than_area`."""
    ref = json.loads((FIXTURES / "official_target_size.json").read_text())
    small = 0
    for h, w, area, H, W in ref["rows"]:
        assert media.target_size(h, w, area, min_side=0) == (H, W), (h, w, area)
        if min(H, W) < media.MIN_SIDE:
            small += 1
            with pytest.raises(UserError):
                media.target_size(h, w, area)
        else:
            assert media.target_size(h, w, area) == (H, W)
    assert small >= 1  # the fixture covers the too-small case


@pytest.mark.parametrize("ratio", [(16, 9), (9, 16), (1, 1), (4, 3), (3, 4), (3, 2), (2, 3)])
@pytest.mark.parametrize("size", ["720*400", "704*384", "688*368", "1280*720"])
def test_target_size_keeps_aspect_and_area(ratio, size):
    area = media.parse_size(size)
    for scale in (150, 400, 1000):  # image sides from 150 px: smaller and larger than the output
        h, w = ratio[0] * scale, ratio[1] * scale
        H, W = media.target_size(h, w, area)
        assert H % 64 == 0 and W % 64 == 0 and H * W <= area
        # Each side is a scaled image side rounded up to a multiple of 64, so the aspect error is
        # bounded by the rounding of the shorter side.
        assert abs((H / W) / (h / w) - 1) < 64 / min(H, W) + 1e-9, (ratio, size, h, w, H, W)
        assert H <= h + 63 and W <= w + 63  # never upscaled beyond the next multiple of 64
        if h * w >= 2 * area:
            assert H * W >= 0.6 * area  # large images use most of the area budget


def test_target_size_too_small():
    with pytest.raises(UserError, match="--size"):
        media.target_size(1000, 1000, 100 * 100)  # area below 128*128
    with pytest.raises(UserError, match="less elongated"):
        media.target_size(4000, 200, 384 * 256)  # gives 1344x64
    assert media.target_size(4000, 200, 384 * 256, min_side=64) == (1344, 64)


# ----------------------------------------------------------------------------------------------------
# Reference image
# ----------------------------------------------------------------------------------------------------


def _save(tmp_path, arr: np.ndarray, name="img.png", **kw) -> Path:
    p = tmp_path / name
    Image.fromarray(arr).save(p, **kw)
    return p


def test_reference_image_exact_size_is_not_resampled(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (704, 384, 3), dtype=np.uint8)
    t, hw = media.load_reference_image(_save(tmp_path, arr), 704 * 384)
    assert hw == (704, 384)
    assert t.dtype == torch.float32 and t.shape == (3, 704, 384)
    expected = torch.from_numpy(arr.astype(np.float32) / 255 * 2 - 1).permute(2, 0, 1)
    torch.testing.assert_close(t, expected, rtol=0, atol=1e-6)
    assert t.min() >= -1 and t.max() <= 1


def test_reference_image_pads_with_black(tmp_path):
    """16:9 1920x1080 at 704*384 -> 384x704; the image resizes to 384x682 -> 11 px bars left/right."""
    color = np.array([200, 100, 50], np.uint8)
    arr = np.broadcast_to(color, (1080, 1920, 3)).copy()
    t, hw = media.load_reference_image(_save(tmp_path, arr), 704 * 384)
    assert hw == (384, 704) and t.shape == (3, 384, 704)
    assert torch.all(t[:, :, :11] == -1) and torch.all(t[:, :, -11:] == -1)
    inner = t[:, :, 11:-11]
    expected = torch.tensor(color / 255 * 2 - 1, dtype=torch.float32)[:, None, None]
    assert (inner - expected).abs().max() <= 2 * 2 / 255


@pytest.mark.parametrize("img_hw, out_hw, resized_wh, offset", [
    ((768, 1024), (448, 576), (597, 448), 10),  # 3:4 landscape: crop 21 columns from round(10.5) = 10
    ((1024, 768), (576, 448), (448, 597), 10),  # 3:4 portrait: the same on rows
    ((498, 1000), (384, 704), (771, 384), 34),  # crop 67 columns from round(33.5) = 34 (half to even)
])
def test_reference_image_center_crop(tmp_path, img_hw, out_hw, resized_wh, offset):
    """Resize(min(H, W)) then CenterCrop((H, W)) at 704*384, on a texture that shows any shift."""
    yy, xx = np.mgrid[0:img_hw[0], 0:img_hw[1]]
    arr = np.stack([xx % 256, yy % 256, (xx // 4 + yy // 4) % 256], -1).astype(np.uint8)
    t, hw = media.load_reference_image(_save(tmp_path, arr), 704 * 384)
    assert hw == out_hw
    resized = np.asarray(Image.fromarray(arr).resize(resized_wh, Image.BILINEAR))
    H, W = out_hw
    crop = resized[:, offset:offset + W] if resized_wh[0] > W else resized[offset:offset + H]
    expected = torch.from_numpy(crop.astype(np.float32) / 255 * 2 - 1).permute(2, 0, 1)
    torch.testing.assert_close(t, expected, rtol=0, atol=1e-6)


def test_reference_image_applies_exif_orientation(tmp_path):
    arr = np.zeros((256, 512, 3), np.uint8)  # stored landscape, 512 wide
    arr[:, :256] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    p = _save(tmp_path, arr, "rot.jpg", exif=exif.tobytes(), quality=95)
    t, hw = media.load_reference_image(p, 512 * 256)
    assert hw == (512, 256)  # portrait after applying the orientation
    assert t[:, :200].mean() > 0.9 and t[:, -200:].mean() < -0.9  # the white half is now on top


def _load_rgb(path, size=128 * 128):
    t, _ = media.load_reference_image(path, size)
    return ((t + 1) / 2 * 255).round().permute(1, 2, 0).numpy()  # [H, W, 3] in 0..255


def test_reference_image_modes_decode_to_the_right_colours(tmp_path):
    """16-bit, palette, grey, CMYK, alpha and float images give the 8-bit RGB a viewer shows."""
    ramp16 = np.tile(np.linspace(0, 65535, 128), (128, 1)).astype(np.uint16)
    Image.fromarray(ramp16).save(tmp_path / "g16.png")  # PIL mode I;16: its own convert("RGB") clips to white
    got = _load_rgb(tmp_path / "g16.png")
    np.testing.assert_allclose(got[:, :, 0], np.tile(np.linspace(0, 255, 128), (128, 1)), atol=1.01)
    assert np.array_equal(got[..., 0], got[..., 1])

    rgb = (np.random.default_rng(0).random((128, 128, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).convert("L").save(tmp_path / "grey.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    Image.fromarray(rgb).convert("P").save(tmp_path / "pal.png")
    for name, want, tol in (("grey.png", np.asarray(Image.fromarray(rgb).convert("L"))[..., None], 0.01),
                            ("cmyk.jpg", rgb, 12.0), ("pal.png", np.asarray(Image.fromarray(rgb).convert("P")
                                                                                 .convert("RGB")), 0.01)):
        got = _load_rgb(tmp_path / name)
        assert np.abs(got - want).mean() <= tol, name

    rgba = np.zeros((128, 128, 4), np.uint8)
    rgba[:64, :, :3], rgba[:64, :, 3] = (200, 10, 10), 255  # top half opaque red, bottom transparent
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    got = _load_rgb(tmp_path / "rgba.png")
    assert np.array_equal(got[10, 10], [200, 10, 10]) and np.array_equal(got[100, 10], media.IMAGE_BACKGROUND)
    Image.fromarray(rgba).convert("LA").save(tmp_path / "la.png")
    assert np.array_equal(_load_rgb(tmp_path / "la.png")[100, 10], media.IMAGE_BACKGROUND)
    pal = Image.fromarray(rgba[..., :3]).convert("P")
    pal.save(tmp_path / "pal_t.png", transparency=pal.getpixel((10, 100)))  # (x, y): the bottom half
    assert np.array_equal(_load_rgb(tmp_path / "pal_t.png")[100, 10], media.IMAGE_BACKGROUND)

    Image.fromarray(np.full((128, 128), 0.5, np.float32), mode="F").save(tmp_path / "f.tiff")
    assert np.allclose(_load_rgb(tmp_path / "f.tiff"), 128, atol=1)


@pytest.mark.parametrize("sr,channels,subtype", [(8000, 1, "PCM_U8"), (96000, 2, "PCM_24"), (44100, 6, "FLOAT"),
                                                  (22050, 1, "DOUBLE"), (16000, 4, "PCM_32")])
def test_unusual_but_valid_speech_files_load(tmp_path, sr, channels, subtype):
    t = np.arange(sr) / sr
    x = 0.4 * np.sin(2 * np.pi * 220 * t)
    p = tmp_path / "s.wav"
    sf.write(p, np.repeat(x[:, None], channels, 1), sr, subtype=subtype)
    info = media.open_speech(p)
    wave = media.load_audio(p)
    assert info.num_samples == len(wave) == 16000 and info.rate == sr
    assert abs(np.sqrt(np.mean(wave**2)) - 0.4 / np.sqrt(2)) < 0.02


def test_reference_image_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        media.load_reference_image(tmp_path / "missing.png", 704 * 384)
    with pytest.raises(UserError, match="does not exist"):
        media.load_reference_image(tmp_path, 704 * 384)  # a directory
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(UserError, match="could not be read as an image"):
        media.load_reference_image(text, 704 * 384)
    good = _save(tmp_path, np.full((400, 300, 3), 128, np.uint8), "good.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(UserError, match="could not be read as an image"):
        media.load_reference_image(truncated, 704 * 384)
    with pytest.raises(UserError, match="at least 128 pixels"):
        media.load_reference_image(_save(tmp_path, np.zeros((100, 300, 3), np.uint8), "tiny.png"), 704 * 384)
    # 300x200 (WxH) would only give a 320x256 video at 704*384, where a large 3:2 image gives 576x384
    small = _save(tmp_path, np.zeros((200, 300, 3), np.uint8), "small.png")
    with pytest.raises(UserError, match="smaller than the 576x384 video.*--size 256\\*320"):
        media.load_reference_image(small, 704 * 384)
    assert media.load_reference_image(small, 256 * 320)[1] == (256, 320)


# ----------------------------------------------------------------------------------------------------
# Speech
# ----------------------------------------------------------------------------------------------------


def _tone(sr: int, seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * sr / len(x)


def _write_m4a(path: Path, wave: np.ndarray, sr: int, channels: int = 2) -> None:
    layout = "stereo" if channels == 2 else "mono"
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("aac", rate=sr, layout=layout)
        pcm = np.repeat(wave[None], channels, axis=0) if channels == 2 else wave[None]
        for i in range(0, pcm.shape[1], 1024):
            f = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, i:i + 1024]), format="fltp", layout=layout)
            f.sample_rate, f.pts, f.time_base = sr, i, Fraction(1, sr)
            c.mux(s.encode(f))
        c.mux(s.encode(None))


def test_load_wav_stereo_resampled(tmp_path):
    sr = 44100
    left = _tone(sr, 1.0)
    stereo = np.stack([left, 0.5 * left], 1)  # mono mix has amplitude 0.375
    p = tmp_path / "a.wav"
    sf.write(p, stereo, sr, subtype="FLOAT")
    wave = media.load_audio(p)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - SR) <= 1
    # librosa.load(sr=16000) equals channel mean + soxr HQ (ecosystem.md §1.9).
    np.testing.assert_array_equal(wave, soxr.resample(stereo.mean(axis=1), sr, SR, quality="HQ"))
    assert abs(_peak_hz(wave, SR) - 440) < 2
    assert abs(np.abs(wave[1000:-1000]).max() - 0.375) < 0.01


def test_load_flac_16k_unchanged(tmp_path):
    x = _tone(SR, 0.5, 300)
    p = tmp_path / "a.flac"
    sf.write(p, x, SR, subtype="PCM_16")
    wave = media.load_audio(p)
    np.testing.assert_allclose(wave, x, atol=1 / 32768 + 1e-7)  # 16-bit quantisation only


@pytest.mark.parametrize("name", ["a.m4a", "a.bin"])  # by extension, and by fallback after soundfile fails
def test_load_m4a(tmp_path, name):
    sr = 22050
    x = _tone(sr, 1.0, 500)
    p = tmp_path / name
    _write_m4a(p, x, sr)
    wave = media.load_audio(p)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - SR) <= 2048  # AAC pads to whole frames
    assert abs(_peak_hz(wave[:SR], SR) - 500) < 2
    ref = soxr.resample(x, sr, SR, quality="HQ")
    n = min(len(ref), len(wave))
    corr = np.dot(ref[:n], wave[:n]) / np.linalg.norm(ref[:n]) / np.linalg.norm(wave[:n])
    assert corr > 0.99  # in sync: the encoder priming is removed by the decoder


def test_load_audio_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        media.load_audio(tmp_path / "missing.wav")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(UserError, match="could not be decoded"):
        media.load_audio(corrupt)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0,), np.float32), SR)
    with pytest.raises(UserError, match="no samples"):
        media.load_audio(empty)
    video_only = tmp_path / "video.mp4"
    with MP4Writer(video_only, width=64, height=64) as w:
        w.write(np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(UserError, match="no audio stream"):
        media.load_audio(video_only)


def test_audio_is_silent():
    assert media.audio_is_silent(np.zeros(SR, np.float32))
    assert media.audio_is_silent(np.random.default_rng(0).normal(0, 1e-4, SR).astype(np.float32))
    assert not media.audio_is_silent(_tone(SR, 1.0))
    assert media.audio_is_silent(np.zeros(0, np.float32))


def test_example_assets():
    img, audio = media.example_image_path(), media.example_audio_path()
    assert img.is_file() and audio.is_file()
    assert img.stat().st_size < 100_000 and audio.stat().st_size < 150_000
    t, hw = media.load_reference_image(img, media.parse_size("704*384"))
    assert hw == (704, 384) and t.std() > 0.2
    wave = media.load_audio(audio)
    assert 3.0 < len(wave) / SR < 5.0 and not media.audio_is_silent(wave)


# ----------------------------------------------------------------------------------------------------
# MP4 writer
# ----------------------------------------------------------------------------------------------------

H, W = 96, 128


def _frames(n0: int, t: int) -> np.ndarray:
    """Smooth moving colour ramps: [t, H, W, 3] uint8."""
    yy, xx = np.mgrid[0:H, 0:W]
    out = [np.stack([(xx + 2 * n) * 255 // (W + 2 * 40), (yy + n) * 255 // (H + 40), np.full_like(xx, 90 + n)], -1)
           for n in range(n0, n0 + t)]
    return np.stack(out).astype(np.uint8)


def _speech_like(seconds: float) -> np.ndarray:
    """Silence with noise bursts at known times (to measure the audio/video sync)."""
    x = np.zeros(int(SR * seconds), np.float32)
    rng = np.random.default_rng(0)
    for t0 in (0.30, 0.77, 1.21):
        i = int(t0 * SR)
        x[i:i + 800] = rng.uniform(-0.5, 0.5, 800)
    return x


def _decode(path: Path):
    with av.open(str(path)) as c:
        kinds = sorted(s.type for s in c.streams)
        frames = [(f.time, f.key_frame, f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    audio = None
    if "audio" in kinds:
        with av.open(str(path)) as c:
            audio = np.concatenate([f.to_ndarray()[0] for f in c.decode(audio=0)])
    return kinds, frames, audio


def test_mp4_writer_chunks_audio_sync(tmp_path):
    out = tmp_path / "out" / "video.mp4"  # the missing folder is created
    audio = _speech_like(2.0)
    with MP4Writer(out, width=W, height=H, fps=25, audio=audio) as w:
        for k in range(3):
            w.write(_frames(12 * k, 12))
        assert w.partial_path.exists() and not out.exists()
    assert out.exists() and not (tmp_path / "out" / "video.partial.mp4").exists()
    assert w.frames_written == 36 and w.duration == pytest.approx(1.44)

    kinds, frames, dec = _decode(out)
    assert kinds == ["audio", "video"]
    assert len(frames) == 36
    np.testing.assert_allclose([f[0] for f in frames], np.arange(36) / 25, atol=1e-6)
    assert [i for i, f in enumerate(frames) if f[1]] == [0, 12, 24]  # one IDR per chunk
    ref = _frames(0, 36)
    err = np.mean([np.abs(f[2].astype(int) - ref[i]).mean() for i, f in enumerate(frames)])
    assert err < 2.0
    with av.open(str(out)) as c:
        v = c.streams.video[0]
        assert float(v.duration * v.time_base) == pytest.approx(1.44)
        assert c.duration / 1e6 == pytest.approx(1.44, abs=0.07)
    # Audio is cut with the video (whole AAC packets) and in sync.
    assert 36 * 640 <= len(dec) < 36 * 640 + 1024
    for t0 in (0.30, 0.77, 1.21):
        i = int(t0 * SR)
        seg = slice(i - 2000, i + 2800)
        xc = np.correlate(dec[seg], audio[seg], mode="full")
        assert abs(int(np.argmax(np.abs(xc))) - (4800 - 1)) <= 2


def test_mp4_writer_takes_audio_chunk_by_chunk(tmp_path):
    out = tmp_path / "inc.mp4"
    audio = _speech_like(2.0)
    with MP4Writer(out, width=W, height=H, fps=25, audio=True) as w:
        for k in range(3):
            w.write(_frames(12 * k, 12), audio[12 * k * 640:12 * (k + 1) * 640])
        with pytest.raises(ValueError, match="audio=True"):
            w.write(_frames(36, 1))
    kinds, frames, dec = _decode(out)
    assert kinds == ["audio", "video"] and len(frames) == 36
    assert 36 * 640 <= len(dec) < 36 * 640 + 1024  # the encoder's tail came with close()
    for t0 in (0.30, 0.77, 1.21):
        i = int(t0 * SR)
        seg = slice(i - 2000, i + 2800)
        xc = np.correlate(dec[seg], audio[seg], mode="full")
        assert abs(int(np.argmax(np.abs(xc))) - (4800 - 1)) <= 2


def test_mp4_writer_short_audio_and_video_only(tmp_path):
    p = tmp_path / "short.mp4"
    with MP4Writer(p, width=W, height=H, audio=np.full(SR // 2, 0.1, np.float32)) as w:
        for k in range(3):
            w.write(_frames(12 * k, 12))
    kinds, frames, dec = _decode(p)
    assert kinds == ["audio", "video"] and len(frames) == 36
    assert SR // 2 <= len(dec) < SR // 2 + 2048  # the audio track simply ends early

    p = tmp_path / "silent.mp4"
    with MP4Writer(p, width=W, height=H) as w:
        w.write(_frames(0, 5))
        w.write(_frames(5, 7))
    kinds, frames, _ = _decode(p)
    assert kinds == ["video"] and len(frames) == 12


_KILLED = textwrap.dedent("""
    import os, sys
    import numpy as np
    from liveavatar.io.mp4 import MP4Writer
    sys.path.insert(0, {tests!r})
    from test_media import _frames, _speech_like
    w = MP4Writer({path!r}, width={W}, height={H}, audio=_speech_like(3.0))
    w.write(_frames(0, 12))
    w.write(_frames(12, 12))
    os._exit(1)
""")


def test_mp4_writer_killed_process_leaves_playable_partial(tmp_path):
    out = tmp_path / "killed.mp4"
    code = _KILLED.format(tests=str(Path(__file__).parent), path=str(out), W=W, H=H)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert r.returncode == 1, r.stderr.decode()
    partial = tmp_path / "killed.partial.mp4"
    assert partial.exists() and not out.exists()
    kinds, frames, dec = _decode(partial)
    assert kinds == ["audio", "video"]
    assert len(frames) >= 24
    assert len(dec) >= 24 * 640


def test_mp4_writer_abort_and_misuse(tmp_path):
    p = tmp_path / "a.mp4"
    with pytest.raises(KeyError):
        with MP4Writer(p, width=W, height=H) as w:
            w.write(_frames(0, 12))
            raise KeyError("generation failed")
    assert not p.exists() and w.partial_path.exists()
    assert len(_decode(w.partial_path)[1]) == 12

    w = MP4Writer(tmp_path / "b.mp4", width=W, height=H)
    with pytest.raises(ValueError, match="uint8 frames"):
        w.write(np.zeros((2, H, W, 3), np.float32))
    with pytest.raises(ValueError, match="uint8 frames"):
        w.write(np.zeros((2, H + 2, W, 3), np.uint8))
    w.abort()  # nothing written: nothing was ever created
    assert w.partial_path is None and list(tmp_path.glob("b*")) == []
    with pytest.raises(RuntimeError):
        w.write(_frames(0, 1))

    w = MP4Writer(tmp_path / "c.mp4", width=W, height=H)
    with pytest.raises(ValueError, match="no frames"):
        w.close()
    assert not (tmp_path / "c.mp4").exists()

    with pytest.raises(ValueError, match="mono"):
        MP4Writer(tmp_path / "d.mp4", width=W, height=H, audio=np.zeros((2, 100), np.float32))
    assert not (tmp_path / "d.partial.mp4").exists()


def test_mp4_writer_unwritable_location(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        MP4Writer(blocker / "out.mp4", width=W, height=H)  # parent is a file
    with pytest.raises(UserError, match="is a directory"):
        MP4Writer(tmp_path, width=W, height=H)
