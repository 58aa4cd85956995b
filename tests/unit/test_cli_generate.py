"""`liveavatar generate` on the tiny preset: the MP4 it writes, a killed run, and the bad-input matrix."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from liveavatar.cli import main

SIZE = "128*128"


def _wav(path, seconds, amp=0.3, sr=16000):
    t = np.arange(int(sr * seconds)) / sr
    sf.write(path, (amp * np.sin(2 * np.pi * 200 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32), sr)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((200, 160, 3)) * 255).astype(np.uint8)).save(d / "face.png")
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(d / "small.png")
    (d / "notimage.png").write_text("this is not an image")
    (d / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    sf.write(d / "empty.wav", np.zeros(0, np.float32), 16000)
    return {
        "dir": d,
        "image": str(d / "face.png"),
        "audio": _wav(d / "speech.wav", 1.0),
        "long": _wav(d / "long.wav", 8.0),
        "silent": str(_silent(d / "silent.wav")),
        "small": str(d / "small.png"),
        "notimage": str(d / "notimage.png"),
        "corrupt": str(d / "corrupt.wav"),
        "empty": str(d / "empty.wav"),
    }


def _silent(path):
    sf.write(path, np.zeros(16000, np.float32), 16000)
    return path


def _probe(path):
    with av.open(str(path)) as c:
        kinds = sorted(s.type for s in c.streams)
        frames = sum(1 for _ in c.decode(video=0))
        duration = c.duration / 1e6 if c.duration else None
    return kinds, frames, duration


def _generate(files, out, *extra):
    return main(["generate", "--preset", "tiny", "--image", files["image"], "--audio", files["audio"],
                 "--size", SIZE, "--save_file", str(out), *extra])


def test_generate_writes_mp4_with_video_and_audio_matching_the_speech(files, tmp_path, capsys):
    out = tmp_path / "out" / "video.mp4"
    assert _generate(files, out) == 0
    kinds, frames, duration = _probe(out)
    assert kinds == ["audio", "video"]
    assert frames == 25 - 3  # 1 s of speech at 25 fps, the first 3 generated frames dropped
    assert abs(duration - frames / 25) < 0.07
    assert not list(out.parent.glob("*.partial.mp4"))


def test_num_clip_gives_48n_minus_3_frames(files, tmp_path):
    out = tmp_path / "two.mp4"
    rc = main(["generate", "--preset", "tiny", "--image", files["image"], "--audio", files["long"], "--size", SIZE,
               "--save_file", str(out), "--num_clip", "2", "--offline_decode"])
    assert rc == 0 and _probe(out)[1] == 48 * 2 - 3
    # the official scripts' --num_clip 10000 means "the whole audio"
    whole = tmp_path / "whole.mp4"
    assert _generate(files, whole, "--num_clip", "10000") == 0
    assert _probe(whole)[1] == 25 - 3


def test_silent_audio_warns_but_generates(files, tmp_path, capsys):
    out = tmp_path / "silent.mp4"
    rc = main(["generate", "--preset", "tiny", "--image", files["image"], "--audio", files["silent"],
               "--size", SIZE, "--save_file", str(out)])
    assert rc == 0 and out.exists()
    assert "silent" in capsys.readouterr().err


BAD = [
    ("missing image", ["--image", "{dir}/nope.png"], "does not exist"),
    ("not an image", ["--image", "{notimage}"], "could not be read"),
    ("image too small", ["--image", "{small}"], "smaller than"),
    ("missing audio", ["--audio", "{dir}/nope.wav"], "does not exist"),
    ("corrupt audio", ["--audio", "{corrupt}"], "could not be decoded"),
    ("zero-length audio", ["--audio", "{empty}"], "no samples"),
    ("unparsable size", ["--size", "big"], "--size"),
    ("size too small", ["--size", "64*64"], "minimum"),
    ("infer_frames", ["--infer_frames", "40"], "multiple of 12"),
    ("num_clip zero", ["--num_clip", "0"], "--num_clip"),
    ("guidance", ["--sample_guide_scale", "4.5"], "guidance"),
    ("solver", ["--sample_solver", "unipc"], "euler"),
    ("multi gpu", ["--num_gpus_dit", "4"], "torchrun"),
    ("unwritable output", ["--save_file", "/proc/liveavatar/out.mp4"], "save"),
]


@pytest.mark.parametrize("name,args,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_error_without_output(files, tmp_path, capsys, name, args, needle):
    out = tmp_path / "bad.mp4"
    argv = ["generate", "--preset", "tiny", "--image", files["image"], "--audio", files["audio"],
            "--size", SIZE, "--save_file", str(out)]
    argv += [a.format(**files) for a in args]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert err.startswith("error: ") and "\n" not in err, err
    assert needle.lower() in err.lower(), err
    assert not out.exists() and not list(tmp_path.glob("*.mp4"))


def test_real_model_without_weights_explains_how_to_get_them(files, capsys):
    rc = main(["generate", "--image", files["image"], "--audio", files["audio"]])
    err = capsys.readouterr().err
    assert rc != 0 and "huggingface-cli download Wan-AI/Wan2.2-S2V-14B" in err and "--preset tiny" in err


def test_error_from_the_command_line_has_no_traceback(files, tmp_path):
    r = subprocess.run([sys.executable, "-m", "liveavatar", "generate", "--preset", "tiny", "--image",
                        str(tmp_path / "missing.png"), "--save_file", str(tmp_path / "x.mp4")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and r.stderr.strip().startswith("error:")


def test_killed_run_leaves_a_playable_partial_file(files, tmp_path):
    out = tmp_path / "killed.mp4"
    partial = tmp_path / "killed.partial.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "liveavatar", "generate", "--preset", "tiny", "--image",
                             files["image"], "--audio", files["long"], "--size", SIZE, "--num_clip", "4",
                             "--save_file", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        frames = 0
        while time.time() < deadline and frames < 21:  # wait for at least two finished blocks
            time.sleep(0.5)
            assert proc.poll() is None, "generation ended before it could be killed"
            if partial.exists() and partial.stat().st_size > 0:
                try:
                    frames = _probe(partial)[1]
                except (av.FFmpegError, OSError):
                    frames = 0
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert frames >= 21
    kinds, n, _ = _probe(partial)
    assert kinds == ["audio", "video"] and n >= 21 and (n - 9) % 12 == 0  # whole blocks only
    assert not out.exists()
    assert not Path(str(out)).exists()
