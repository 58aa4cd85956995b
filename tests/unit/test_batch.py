"""`liveavatar batch`: five jobs (two bad) on one loaded tiny model, killed with -9 mid-way and rerun.

The three good videos must equal their single runs (raw frames and audio exactly; the files decode to
them within encoder noise), the two bad jobs give one clear error line each, and no job is rendered
twice: the finished one is skipped on the rerun, the interrupted one resumes from its checkpoint.
"""

import json
import os
import random
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
from tiny_dit import one_thread  # noqa: F401  (autouse: single-threaded module)

from liveavatar import GenerationOptions, Pipeline
from liveavatar.batch import job_argv, read_jobs
from liveavatar.cli import DEFAULT_PROMPT, main
from liveavatar.errors import UserError
from liveavatar.render import read_dump

REPO = Path(__file__).resolve().parents[2]
SEED = random.randrange(10**6)


def _wav(path, seconds, f0):
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(path, (0.3 * np.sin(2 * np.pi * f0 * t) * np.sin(2 * np.pi * 2 * t)).astype(np.float32), 16000)


@pytest.fixture
def jobs(tmp_path):
    rng = np.random.default_rng(8)
    for name in ("a", "c"):
        Image.fromarray((rng.random((128, 128, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{name}.png")
    _wav(tmp_path / "a.wav", 1.0, 180)
    _wav(tmp_path / "c.wav", 2.3, 210)  # 5 blocks: time to be killed in the middle
    _wav(tmp_path / "e.wav", 1.0, 250)
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    out = tmp_path / "out"

    def job(name, image, audio, **kw):
        return {"image": str(tmp_path / image), "audio": str(tmp_path / audio), "save_file": str(out / f"{name}.mp4"),
                "size": "128*128", "dump_chunks": str(out / f"{name}-dump"), **kw}

    lines = [job("a", "a.png", "a.wav", base_seed=1),
             job("b", "missing.png", "a.wav"),
             job("c", "c.png", "c.wav", base_seed=2, checkpoint_every=1, prompt="a person speaking slowly"),
             job("d", "a.png", "bad.wav"),
             job("e", "c.png", "e.wav", num_clip=1)]
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(json.dumps(j) for j in lines) + "\n")
    return path, lines


def _batch(path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "liveavatar", "batch", str(path), "--preset", "tiny"],
                            cwd=str(REPO), env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _results(path: Path) -> list[dict]:
    f = path.with_suffix(".results.jsonl")
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def _decode(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_a_batch_killed_mid_way_and_rerun_renders_each_job_once(jobs):
    path, lines = jobs
    out = Path(lines[0]["save_file"]).parent
    proc = _batch(path)
    t0 = time.time()
    while not (out / "c.partial.state").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < 240, "timed out"
        time.sleep(0.02)
    time.sleep(random.Random(SEED).uniform(0.0, 1.0))  # somewhere in job c's blocks 1-3
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    first = _results(path)
    assert [(r["job"], r["status"]) for r in first] == [(1, "ok"), (2, "error")], (SEED, first)
    a_bytes = (out / "a.mp4").read_bytes()

    proc = _batch(path)  # runs while the single runs are made here
    pipe = Pipeline.tiny(seed=0)
    single = {}
    for name, k in (("a", 0), ("c", 2), ("e", 4)):
        j = lines[k]
        opts = GenerationOptions(size=128 * 128, seed=j.get("base_seed", 42), num_clip=j.get("num_clip"))
        chunks = list(pipe.session(j["image"], j["audio"], j.get("prompt", DEFAULT_PROMPT), opts))
        single[name] = (np.concatenate([c.frames for c in chunks]), np.concatenate([c.audio for c in chunks]))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err  # some jobs failed
    assert "Traceback" not in err
    second = _results(path)[len(first):]
    assert [(r["job"], r["status"]) for r in second] == [(1, "skipped"), (2, "error"), (3, "ok"), (4, "error"),
                                                         (5, "ok")], second
    c, e = second[2], second[4]
    assert c["resumed_from_block"] >= 1 and c["resumed_from_block"] + c["blocks_rendered"] == 5, c
    assert e["resumed_from_block"] == 0 and e["blocks_rendered"] == 3, e  # 1 s of speech: 22 frames, 3 blocks
    assert (out / "a.mp4").read_bytes() == a_bytes  # never rendered again
    assert "does not exist" in second[1]["message"] and "could not be decoded" in second[3]["message"]
    assert all("\n" not in r["message"] for r in (first[1], second[1], second[3]))
    for name, (frames, audio) in single.items():
        got_frames, got_audio = read_dump(out / f"{name}-dump")
        assert np.array_equal(got_frames, frames) and np.array_equal(got_audio, audio), name
        video = _decode(out / f"{name}.mp4")
        assert video.shape == frames.shape and np.abs(video.astype(int) - frames).mean() < 25, name
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["a.mp4", "c.mp4", "e.mp4"]  # no partial, state


@pytest.mark.parametrize("line,needle", [
    ({"audio": "x.wav", "save_file": "o.mp4"}, "has no 'image'"),
    ({"image": "x.png", "audio": "x.wav", "save_file": "o.mp4", "fp8": True}, "model option"),
    ({"image": "x.png", "audio": "x.wav", "save_file": "o.mp4", "colour": "red"}, "unknown job key 'colour'"),
    ({"image": "x.png", "audio": "x.wav", "save_file": "o.mp4", "num_clip": [1, {}]}, None),
    ({"image": "x.png", "audio": "x.wav", "save_file": "o.mp4", "size": {"w": 1}}, "give a string or a number"),
])
def test_job_lines_become_generate_flags_or_one_clear_error(line, needle):
    if needle is None:
        assert job_argv(line)[-2:] == ["--num_clip", "1,{}"]  # passed on: generate refuses it by name
        return
    with pytest.raises(UserError, match=needle):
        job_argv(line)


def test_bad_batch_files_and_bad_lines(tmp_path, capsys):
    assert main(["batch", str(tmp_path / "none.jsonl"), "--preset", "tiny"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: jobs file")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n# a comment\n")
    assert main(["batch", str(empty), "--preset", "tiny"]) == 2
    assert "holds no job" in capsys.readouterr().err
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"image": "a.png"\n[1, 2]\n{"image": "x.png", "audio": "x.wav", "save_file": "o.mp4", '
                    '"num_clip": 0}\n')
    assert [ln.problem is None for ln in read_jobs(jobs)] == [False, False, True]
    assert main(["batch", str(jobs), "--preset", "tiny"]) == 1  # every job failed alone, no model was loaded
    err = capsys.readouterr().err
    assert "Traceback" not in err and "loading" not in err
    results = [json.loads(x) for x in (tmp_path / "jobs.results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in results] == ["error"] * 3
    assert "not valid JSON" in results[0]["message"] and "not a JSON object" in results[1]["message"]
    assert "--num_clip 0 is out of range" in results[2]["message"]
