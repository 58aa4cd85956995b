"""Bad and unusual inputs to `liveavatar generate` and `liveavatar plan`: a table of cases.

Every bad input must give exit code 2, exactly one line on stderr starting with `error:` that names
the problem (a regex per case), no traceback, no output file, and must leave every existing file as
it was (hashes of the whole input folder before and after). All of them are refused before any model
is built, so each case costs milliseconds. Checkpoint files have their own table
(test_bad_checkpoints.py); process signals and concurrent runs are in test_output_safety.py.
"""

import hashlib
import os
import struct
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from liveavatar.cli import main

SIZE = "128*128"


def _png_with_size(path: Path, width: int, height: int) -> None:
    """A valid-looking PNG whose header claims `width` x `height` (CRC correct, pixel data tiny)."""
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def _wav(path: Path, seconds: float, sr: int = 16000, channels: int = 1, subtype: str = "PCM_16",
         fill=None) -> str:
    t = np.arange(int(sr * seconds)) / sr
    x = 0.3 * np.sin(2 * np.pi * 200 * t) * np.sin(2 * np.pi * 3 * t)
    if fill is not None:
        x[len(x) // 2] = fill
    sf.write(path, np.repeat(x[:, None], channels, 1).astype(np.float32), sr, subtype=subtype)
    return str(path)


def _video_only(path: Path) -> None:
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        for i in range(5):
            f = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 20 * i, np.uint8), format="rgb24")
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(3)
    Image.fromarray((rng.random((200, 160, 3)) * 255).astype(np.uint8)).save(d / "face.png")
    good = (d / "face.png").read_bytes()
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(d / "small.png")
    Image.fromarray((rng.random((4000, 100, 3)) * 255).astype(np.uint8)).save(d / "thin.png")
    Image.fromarray((rng.random((160, 200, 3)) * 255).astype(np.uint8)).save(d / "face.jpg", quality=90)
    (d / "truncated.jpg").write_bytes((d / "face.jpg").read_bytes()[:300])
    (d / "truncated.png").write_bytes(good[:200])
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("this is not an image")
    (d / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="300" height="300"/>')
    _png_with_size(d / "bomb.png", 30000, 30000)
    (d / "folder.png").mkdir()
    _wav(d / "speech.wav", 1.0)
    _wav(d / "short.wav", 0.2)
    _wav(d / "nan.wav", 1.0, subtype="FLOAT", fill=np.nan)
    _wav(d / "inf.wav", 1.0, subtype="FLOAT", fill=np.inf)
    sf.write(d / "nosamples.wav", np.zeros(0, np.float32), 16000)
    (d / "zero.wav").write_bytes(b"")
    (d / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    (d / "text.mp3").write_text("not audio at all")
    (d / "folder.wav").mkdir()
    _video_only(d / "video_only.mp4")
    (d / "existing.mp4").write_bytes(b"an earlier result")
    (d / "link_to_face.mp4").symlink_to(d / "face.png")
    os.link(d / "speech.wav", d / "hardlink_speech.mp4")
    (d / "blocker").write_text("a file where a folder is expected")
    (d / "out").mkdir()
    return d


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_symlink():
            out[str(p.relative_to(root))] = "link:" + os.readlink(p)
    return out


G = ["generate", "--preset", "tiny", "--image", "{d}/face.png", "--audio", "{d}/speech.wav", "--size", SIZE,
     "--save_file", "{d}/out/video.mp4"]
P = ["plan", "--gpu_memory", "24"]


def gen(*extra, drop=()):
    """generate argv with `extra` flags (a flag given twice: the later one wins in argparse)."""
    argv = list(G)
    for flag in drop:
        i = argv.index(flag)
        del argv[i:i + 2]
    return argv + list(extra)


CASES = [
    # ---- reference image ----------------------------------------------------------------------
    ("image missing", gen("--image", "{d}/nope.png"), r"reference image .* does not exist"),
    ("image is a folder", gen("--image", "{d}/folder.png"), r"does not exist|could not be read"),
    ("image empty file", gen("--image", "{d}/empty.png"), r"could not be read as an image"),
    ("image is text", gen("--image", "{d}/text.png"), r"could not be read as an image"),
    ("image truncated png", gen("--image", "{d}/truncated.png"), r"could not be read as an image"),
    ("image truncated jpeg", gen("--image", "{d}/truncated.jpg"), r"could not be read as an image"),
    ("image is svg", gen("--image", "{d}/drawing.svg"), r"could not be read as an image"),
    ("image is audio", gen("--image", "{d}/speech.wav"), r"could not be read as an image"),
    ("image decompression bomb", gen("--image", "{d}/bomb.png"), r"could not be read as an image"),
    ("image too small", gen("--image", "{d}/small.png"), r"smaller than 128"),
    ("image too thin", gen("--image", "{d}/thin.png"), r"smaller than 128"),
    ("image smaller than size", gen("--size", "704*384"), r"smaller than the .* video"),
    # ---- speech -------------------------------------------------------------------------------
    ("audio missing", gen("--audio", "{d}/nope.wav"), r"audio file .* does not exist"),
    ("audio is a folder", gen("--audio", "{d}/folder.wav"), r"does not exist"),
    ("audio zero bytes", gen("--audio", "{d}/zero.wav"), r"could not be decoded"),
    ("audio corrupt header", gen("--audio", "{d}/corrupt.wav"), r"could not be decoded"),
    ("audio is text", gen("--audio", "{d}/text.mp3"), r"could not be decoded"),
    ("audio is an image", gen("--audio", "{d}/face.png"), r"could not be decoded"),
    ("audio without samples", gen("--audio", "{d}/nosamples.wav"), r"no samples"),
    ("audio video without sound", gen("--audio", "{d}/video_only.mp4"), r"could not be decoded.*no audio stream"),
    ("audio too short", gen("--audio", "{d}/short.wav"), r"lasts 0\.20 s, shorter than one block"),
    ("audio with NaN", gen("--audio", "{d}/nan.wav"), r"NaN or infinite"),
    ("audio with Inf", gen("--audio", "{d}/inf.wav"), r"NaN or infinite"),
    ("multi-speaker audio", gen("--audio", "{d}/a.wav+{d}/b.wav"), r"multi-speaker"),
    # ---- output file --------------------------------------------------------------------------
    ("save_file is the image", gen("--save_file", "{d}/face.png"), r"is the input .*face\.png"),
    ("save_file is the audio", gen("--save_file", "{d}/speech.wav"), r"is the input .*speech\.wav"),
    ("save_file links to the image", gen("--save_file", "{d}/link_to_face.mp4"), r"is the input"),
    ("save_file hard link to the audio", gen("--save_file", "{d}/hardlink_speech.mp4"), r"is the input"),
    ("save_file exists", gen("--save_file", "{d}/existing.mp4"), r"already exists; pass --overwrite"),
    ("save_file is a folder", gen("--save_file", "{d}/out"), r"is a directory"),
    ("save_file under a file", gen("--save_file", "{d}/blocker/video.mp4"), r"is not a folder"),
    ("save_file unwritable", gen("--save_file", "/proc/liveavatar/video.mp4"), r"not writable.*--save_file"),
    ("save_file empty", gen("--save_file", ""), r"is a directory"),
    # ---- generate flags -----------------------------------------------------------------------
    ("size unparsable", gen("--size", "big"), r"--size 'big' is not an area"),
    ("size negative", gen("--size", "-704*384"), r"argument --size: expected one argument"),
    ("size negative, attached", gen("--size=-704*384"), r"--size '-704\*384' is not an area"),
    ("size zero", gen("--size", "0*0"), r"--size .* is not an area"),
    ("size too small", gen("--size", "64*64"), r"minimum"),
    ("infer_frames not multiple", gen("--infer_frames", "40"), r"multiple of 12"),
    ("infer_frames zero", gen("--infer_frames", "0"), r"--infer_frames 0 is out of range"),
    ("infer_frames negative", gen("--infer_frames", "-12"), r"--infer_frames -12 is out of range"),
    ("infer_frames huge", gen("--infer_frames", "48000"), r"--infer_frames 48000 is out of range"),
    ("infer_frames text", gen("--infer_frames", "many"), r"argument --infer_frames: invalid int"),
    ("num_clip zero", gen("--num_clip", "0"), r"--num_clip 0 is out of range"),
    ("num_clip negative", gen("--num_clip", "-3"), r"--num_clip -3 is out of range"),
    ("num_clip text", gen("--num_clip", "abc"), r"argument --num_clip: invalid int"),
    ("sample_steps zero", gen("--sample_steps", "0"), r"--sample_steps 0 is out of range: .* 1 and 50"),
    ("sample_steps huge", gen("--sample_steps", "1000"), r"--sample_steps 1000 is out of range"),
    ("base_seed negative", gen("--base_seed", "-2"), r"--base_seed -2 is out of range.*-1 for a random seed"),
    ("base_seed too large", gen("--base_seed", str(2**63)), r"--base_seed \d+ is out of range"),
    ("base_seed text", gen("--base_seed", "lucky"), r"argument --base_seed: invalid int"),
    ("gpu_memory zero", gen("--gpu_memory", "0"), r"--gpu_memory 0.0 is out of range"),
    ("gpu_memory negative", gen("--gpu_memory", "-24"), r"--gpu_memory -24.0 is out of range"),
    ("gpu_memory nan", gen("--gpu_memory", "nan"), r"--gpu_memory nan is out of range"),
    ("gpu_memory inf", gen("--gpu_memory", "inf"), r"--gpu_memory inf is out of range"),
    ("device unknown", gen("--device", "tpu"), r"--device 'tpu'"),
    ("device garbage", gen("--device", "cuda:x"), r"--device 'cuda:x' is not a device name"),
    ("device absent gpu", gen("--device", "cuda:7"), r"--device 'cuda:7'"),
    ("audio_offset too large", gen("--audio_offset_frames", "4"), r"--audio_offset_frames 4 is out of range"),
    ("audio_offset negative", gen("--audio_offset_frames", "-1"), r"--audio_offset_frames -1 is out of range"),
    ("audio_window text", gen("--audio_window", "a,b,c"), r"--audio_window 'a,b,c' is not three numbers"),
    ("audio_window two numbers", gen("--audio_window", "1,2"), r"is not three numbers"),
    ("audio_window zero window", gen("--audio_window", "0,5,1"), r"the window must be at least"),
    ("audio_window negative context", gen("--audio_window", "1,-1,1"), r"contexts not negative"),
    ("audio_encoding unknown", gen("--audio_encoding", "magic"), r"argument --audio_encoding: invalid choice"),
    ("resident_blocks negative", gen("--resident_blocks", "-1"), r"--resident_blocks -1 is out of range"),
    ("resident_blocks too many", gen("--resident_blocks", "41"), r"--resident_blocks 41 is out of range"),
    ("kv_on_device too many", gen("--kv_on_device", "5"), r"--kv_on_device 5 is out of range"),
    ("kv_on_device negative", gen("--kv_on_device", "-1"), r"--kv_on_device -1 is out of range"),
    ("guidance", gen("--sample_guide_scale", "4.5"), r"without guidance"),
    ("solver", gen("--sample_solver", "unipc"), r"--sample_solver euler"),
    ("pose video", gen("--pose_video", "{d}/video_only.mp4"), r"--pose_video is not supported"),
    ("offload_model not bool", gen("--offload_model", "maybe"), r"expected true or false"),
    ("preset unknown", gen("--preset", "huge"), r"argument --preset: invalid choice"),
    ("unknown flag", gen("--frobnicate", "3"), r"unrecognized arguments: --frobnicate"),
    ("real model without weights", gen("--preset", "s2v-14b"), r"no model weights given"),
    # ---- plan flags ---------------------------------------------------------------------------
    ("plan gpus zero", ["plan", "--gpus", "0x24"], r"--gpus count 0 is out of range"),
    ("plan gpus absurd", ["plan", "--gpus", "100000000x24"], r"--gpus count 100000000 is out of range"),
    ("plan gpus no memory", ["plan", "--gpus", "4x"], r"--gpus '4x' is not of the form"),
    ("plan gpus text", ["plan", "--gpus", "many"], r"--gpus 'many' is not of the form"),
    ("plan gpus negative memory", ["plan", "--gpus", "2x-8"], r"--gpus memory -8.0 is out of range"),
    ("plan gpu memory missing", ["plan"], r"give the GPU memory"),
    ("plan gpu_memory nan", [*P[:1], "--gpu_memory", "nan"], r"--gpu_memory nan is out of range"),
    ("plan aspect text", [*P, "--aspect", "wide"], r"--aspect 'wide' is not H:W"),
    ("plan aspect zero", [*P, "--aspect", "16:0"], r"--aspect '16:0' is not H:W"),
    ("plan aspect extreme", [*P, "--aspect", "100:1"], r"at most 16:1"),
    ("plan aspect negative", [*P, "--aspect=-9:16"], r"--aspect '-9:16' is not H:W"),
    ("plan size", [*P, "--size", "704"], r"--size '704' is not an area"),
    ("plan infer_frames", [*P, "--infer_frames", "50"], r"multiple of 12"),
    ("plan tflops negative", [*P, "--tflops", "-5"], r"--tflops -5.0 is out of range"),
    ("plan link nan", [*P, "--link_gbps", "nan"], r"--link_gbps nan is out of range"),
    ("plan resident_blocks", [*P, "--resident_blocks", "99"], r"--resident_blocks 99 is out of range"),
    ("plan kv_on_device", [*P, "--kv_on_device", "9"], r"--kv_on_device 9 is out of range"),
]


@pytest.mark.parametrize("name,argv,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_destroys_nothing(d, capsys, name, argv, pattern):
    import re

    before = _snapshot(d)
    rc = main([a.format(d=d) for a in argv])
    out, err = capsys.readouterr()
    err = err.strip()
    assert rc == 2, (rc, err)
    assert "Traceback" not in out + err
    assert err.startswith("error: ") and "\n" not in err, err
    assert re.search(pattern, err), err
    assert _snapshot(d) == before  # nothing created, changed or removed
    assert list((d / "out").iterdir()) == []


def test_the_table_is_large():
    assert len(CASES) >= 90
