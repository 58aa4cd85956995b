"""`liveavatar ui` (Gradio): the generator that feeds the live player, the planner's verdict, and the
app served by the CLI."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import numpy as np
import pytest

gr = pytest.importorskip("gradio")
av = pytest.importorskip("av")
httpx = pytest.importorskip("httpx")

from liveavatar.engine.pipeline import Pipeline  # noqa: E402
from liveavatar.errors import UserError  # noqa: E402
from liveavatar.io import media  # noqa: E402
from liveavatar.serve import ui  # noqa: E402


def _frames(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _audio_seconds(path) -> float:
    with av.open(str(path)) as c:
        return sum(f.samples for f in c.decode(audio=0)) / media.SAMPLE_RATE


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.tiny()


def test_segments_play_as_generated_and_add_up_to_the_whole_video(pipe, tmp_path):
    import wave

    speech = tmp_path / "speech.wav"  # the first 2.5 s of the example
    samples = media.load_audio(media.example_audio_path())[: 5 * media.SAMPLE_RATE // 2]
    with wave.open(str(speech), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(media.SAMPLE_RATE)
        w.writeframes(np.clip(np.round(samples * 32768), -32768, 32767).astype("<i2").tobytes())
    out = list(ui.segments(pipe, str(media.example_image_path()), str(speech), "a person", "128*128", 3, tmp_path,
                           segment_seconds=0.8))
    segments = [s for s, _ in out if s is not None]
    wholes = [w for _, w in out if w is not None]
    assert len(wholes) == 1 and out[-1][1] == wholes[0]  # the whole file comes last
    assert len(segments) >= 3
    whole = _frames(wholes[0])
    parts = [_frames(s) for s in segments]
    assert all(len(p) >= 20 for p in parts[:-1])  # 0.8 s or a little more each
    joined = np.concatenate(parts)
    assert joined.shape == whole.shape
    # Each segment is encoded on its own: equal to the whole file within H.264 noise.
    assert np.abs(joined.astype(int) - whole.astype(int)).mean() < 3
    for s, p in zip(segments, parts, strict=True):
        assert abs(_audio_seconds(s) - len(p) / 25) < 0.1  # every segment carries its sound


def test_segments_refuse_missing_inputs(pipe, tmp_path):
    with pytest.raises(UserError, match="reference image"):
        next(ui.segments(pipe, None, str(media.example_audio_path()), "", "128*128", 1, tmp_path))
    with pytest.raises(UserError, match="speech"):
        next(ui.segments(pipe, str(media.example_image_path()), None, "", "128*128", 1, tmp_path))


def test_plan_verdict_names_the_gpu_and_the_flags():
    text = ui.plan_text("s2v-14b", "704*384", "h100-sxm")
    assert "79.6 GiB" in text and "flags: --" in text
    assert ui.plan_text("s2v-14b", "704*384", ui.THIS_MACHINE)  # no GPU here: says so, no error


def test_cli_serves_the_app(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "ui.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "liveavatar", "ui", "--preset", "tiny", "--port", str(port)],
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline, page = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert page is not None and page.status_code == 200, log.read_text()[-2000:]
        assert "liveavatar" in page.text
        config = httpx.get(f"http://127.0.0.1:{port}/config", timeout=10).json()
        kinds = {c.get("type") for c in config["components"]}
        assert {"image", "audio", "video", "dropdown"} <= kinds
    finally:
        proc.terminate()
        proc.wait(timeout=30)
