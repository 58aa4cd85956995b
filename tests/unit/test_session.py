"""Stages, streamed speech and saved state of a session, on the tiny preset.

The same seed must give the same video whatever the layout: the denoising steps split over 1-4
denoise stages; the speech passed as a file or pushed in chunks of any size (1, 320, 16,000, random);
a session saved after block k and continued in a fresh process. Latents are compared where the decode
stage is the same for both sides (the frames follow from them); frames and audio where the output
path itself differs.
"""

import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from tiny_dit import one_thread  # noqa: F401  (autouse: single-threaded module)

from liveavatar import GenerationOptions, Pipeline
from liveavatar.engine.audio_features import ONE_PASS, WINDOWED, feature_index
from liveavatar.engine.task import SinkDistances
from liveavatar.io import media
from liveavatar.models.wav2vec2 import frame_feature_indices

REPO = Path(__file__).resolve().parents[2]
SIZE = 128 * 128
PROMPT = "a person talking"
OPTS = GenerationOptions(size=SIZE, num_clip=2, seed=3)  # 8 blocks: the sink refresh (block 4) and a ring wrap


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.tiny(seed=0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("session")
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((144, 144, 3)) * 255).astype(np.uint8)).save(d / "face.png")
    t = np.arange(int(16000 * 4.3)) / 16000
    wave = 0.25 * np.sin(2 * np.pi * 160 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    wave += 0.01 * rng.standard_normal(len(t))
    sf.write(d / "speech.wav", wave.astype(np.float32), 16000)
    return str(d / "face.png"), str(d / "speech.wav")


def _latents(session):
    return torch.cat(list(session.latents()), dim=2)


def _output(chunks):
    return np.concatenate([c.frames for c in chunks]), np.concatenate([c.audio for c in chunks])


@pytest.fixture(scope="module")
def reference(pipe, files):
    """The single-process, single-stage run from the file: latents, frames, audio."""
    lat = _latents(pipe.session(*files, PROMPT, OPTS))
    frames, audio = _output(list(pipe.session(*files, PROMPT, OPTS)))
    return lat, frames, audio


@pytest.mark.parametrize("stages", [(2, 2), (1, 2, 1), (1, 1, 1, 1), (3, 1)])
def test_steps_split_over_denoise_stages_give_the_same_latents(pipe, files, reference, stages):
    opts = GenerationOptions(**{**OPTS.__dict__, "denoise_stages": stages})
    session = pipe.session(*files, PROMPT, opts)
    assert [stage.steps for stage in session.denoise] == [list(range(a, a + k)) for a, k in
                                                          zip(np.cumsum((0, *stages[:-1])), stages, strict=True)]
    assert len({id(stage.sink) for stage in session.denoise}) == len(stages)  # each stage has its own sink
    assert torch.equal(_latents(session), reference[0])


def test_split_stages_give_the_same_frames(pipe, files, reference):
    opts = GenerationOptions(**{**OPTS.__dict__, "denoise_stages": (1, 1, 1, 1)})
    frames, audio = _output(list(pipe.session(*files, PROMPT, opts)))
    assert np.array_equal(frames, reference[1]) and np.array_equal(audio, reference[2])


def _push(session, wave, sizes, poll=False):
    """Push `wave` in chunks of the given sizes (cycled); collect what poll() gives on the way."""
    got, i, k = [], 0, 0
    while i < len(wave):
        n = sizes[k % len(sizes)]
        session.push_audio(wave[i:i + n])
        i, k = i + n, k + 1
        if poll:
            got += list(session.poll())
    session.end_audio()
    return got


@pytest.mark.parametrize("chunk", [1, 320, 16000, "random"])
def test_pushed_speech_in_any_chunks_equals_the_file(pipe, files, reference, chunk):
    wave = media.load_audio(files[1])
    sizes = [chunk] if chunk != "random" else [random.Random(4).randint(1, 9000) for _ in range(60)]
    session = pipe.session(files[0], None, PROMPT, OPTS)
    assert session.num_frames is None  # unknown until the speech ends
    _push(session, wave, sizes)
    assert session.num_frames == reference[1].shape[0]
    assert torch.equal(_latents(session), reference[0])


def test_pushed_speech_with_polling_gives_the_same_frames_and_audio(pipe, files, reference):
    wave = media.load_audio(files[1])
    session = pipe.session(files[0], None, PROMPT, OPTS)
    early = _push(session, wave, [random.Random(5).randint(1, 5000) for _ in range(40)], poll=True)
    assert early == []  # auto encoding of a short speech is one-pass: it waits for the whole speech
    frames, audio = _output(list(session.poll()))
    assert session.done
    assert np.array_equal(frames, reference[1]) and np.array_equal(audio, reference[2])


def test_windowed_encoding_streams_and_any_chunking_gives_the_same_video(pipe, files):
    opts = GenerationOptions(**{**OPTS.__dict__, "audio_encoding": WINDOWED, "audio_window": (0.5, 1.0, 0.5)})
    from_file = pipe.session(*files, PROMPT, opts)
    lat = _latents(from_file)
    assert from_file.features.mode == WINDOWED
    wave = media.load_audio(files[1])
    session = pipe.session(files[0], None, PROMPT, opts)
    early = _push(session, wave, [random.Random(6).randint(1, 4000) for _ in range(80)], poll=True)
    assert early and early[0].index == 0  # blocks come out while the speech is still arriving
    frames, audio = _output(early + list(session.poll()))
    pushed = pipe.session(files[0], None, PROMPT, opts)
    _push(pushed, wave, [1000])
    assert torch.equal(_latents(pushed), lat)
    ref_frames, ref_audio = _output(list(pipe.session(*files, PROMPT, opts)))
    assert np.array_equal(frames, ref_frames) and np.array_equal(audio, ref_audio)


def test_auto_encoding_switches_to_windowed_past_the_limit(pipe, files):
    short = pipe.session(*files, PROMPT, OPTS)
    assert short.features.ready(12) and short.features.mode == ONE_PASS
    opts = GenerationOptions(**{**OPTS.__dict__, "one_pass_max_seconds": 2.0})
    long = pipe.session(*files, PROMPT, opts)
    assert long.features.ready(12) and long.features.mode == WINDOWED
    pushed = pipe.session(files[0], None, PROMPT, opts)
    pushed.push_audio(np.zeros(32000, np.float32))
    assert not pushed.features.ready(12)  # 2.0 s: could still end at the limit (one-pass)
    pushed.push_audio(np.zeros(1, np.float32))
    assert not pushed.features.ready(12) and pushed.features.mode == WINDOWED  # decided; window 0 + look-ahead due
    pushed.push_audio(np.zeros(16000, np.float32))
    assert pushed.features.ready(12)


_RESTORE = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    torch.set_num_threads(1)
    from liveavatar import Pipeline
    session = Pipeline.tiny(seed=0).restore({state!r}, audio={audio!r})
    chunks = list(session)
    np.savez({out!r}, frames=np.concatenate([c.frames for c in chunks]),
             audio=np.concatenate([c.audio for c in chunks]), first=chunks[0].frame_start)
""")


def test_saved_session_continues_in_a_fresh_process(pipe, files, reference, tmp_path):
    session = pipe.session(*files, PROMPT, OPTS)
    chunks = session.poll()
    head = [next(chunks) for _ in range(3)]  # blocks 0..2; the sink refresh is still to come
    chunks.close()
    state = session.save(tmp_path / "state.pt")
    code = _RESTORE.format(state=str(state), audio=files[1], out=str(tmp_path / "rest.npz"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=600, cwd=str(REPO))
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    rest = np.load(tmp_path / "rest.npz")
    assert int(rest["first"]) == sum(len(c.frames) for c in head)
    frames = np.concatenate([*(c.frames for c in head), rest["frames"]])
    audio = np.concatenate([*(c.audio for c in head), rest["audio"]])
    assert np.array_equal(frames, reference[1]) and np.array_equal(audio, reference[2])


def test_saved_pushed_windowed_session_continues_after_the_sink_refresh(pipe, files, tmp_path):
    opts = GenerationOptions(**{**OPTS.__dict__, "audio_encoding": WINDOWED, "audio_window": (1.0, 2.0, 0.5),
                                "denoise_stages": (2, 2)})
    wave = media.load_audio(files[1])
    full = pipe.session(files[0], wave, PROMPT, opts)
    lat = _latents(full)
    session = pipe.session(files[0], None, PROMPT, opts)
    session.push_audio(wave[:64000])
    gen = session.latents()
    head = [next(gen) for _ in range(6)]  # past the refresh at block 4, the speech still open
    gen.close()
    session.save(tmp_path / "s.pt")
    position = session.audio_position
    session.close()
    restored = pipe.restore(tmp_path / "s.pt")
    assert restored.audio_position == position and restored.next_block == 6
    restored.push_audio(wave[position:])
    restored.end_audio()
    assert torch.equal(torch.cat([*head, _latents(restored)], dim=2), lat)


def test_a_state_saved_with_a_sink_per_ring_continues_with_the_sink_shared(pipe, files, tmp_path):
    """A saved ring holds its ring tokens only, whatever `--kv_sink`: the session moves across."""
    from liveavatar.runtime.kv_cache import StagedRingKVCache
    from liveavatar.runtime.memory import RuntimeConfig

    full = _latents(pipe.session(*files, PROMPT, OPTS))
    session = pipe.session(*files, PROMPT, OPTS)
    gen = session.latents()
    head = [next(gen) for _ in range(5)]  # past the sink refresh at block 4
    gen.close()
    session.save(tmp_path / "s.pt")
    session.close()
    restored = Pipeline.tiny(seed=0, runtime=RuntimeConfig(kv_sink="shared")).restore(tmp_path / "s.pt",
                                                                                      audio=files[1])
    assert all(isinstance(r, StagedRingKVCache) for stage in restored.denoise for r in stage.rings.values())
    assert torch.equal(torch.cat([*head, _latents(restored)], dim=2), full)


def test_restore_refuses_a_foreign_or_mismatched_state(pipe, files, tmp_path):
    from liveavatar.errors import UserError

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a state")
    with pytest.raises(UserError, match="session state"):
        pipe.restore(bad)
    session = pipe.session(*files, PROMPT, OPTS)
    state = session.state_dict()
    state["dtype"] = "bfloat16"
    with pytest.raises(UserError, match="preset tiny in bfloat16"):
        pipe.restore(state)


def test_close_frees_every_cache_and_ends_the_session(files):
    from liveavatar.runtime.memory import RuntimeConfig

    pipe = Pipeline.tiny(seed=0, runtime=RuntimeConfig(kv_on_device=1))  # host-staged caches too
    with pipe.session(*files, PROMPT, OPTS) as session:
        next(session.latents())
        stages = session.denoise
        assert all(ring.k is not None for stage in stages for ring in stage.rings.values())
    assert session.closed and all(stage.rings == {} and stage.sink.k is None for stage in stages)
    with pytest.raises(RuntimeError, match="closed"):
        list(session)
    session.close()  # closing twice is harmless


def test_sink_distances_are_a_pure_function_of_seed_block_and_step():
    seq = random.Random(9)
    draws = [[seq.randint(4, 30) for _ in range(4)] for _ in range(50)]
    d = SinkDistances(9, 4, 4, 30)
    assert [[d(n, i) for i in range(4)] for n in range(50)] == draws
    assert d(7, 2) == draws[7][2] and d(49, 3) == draws[49][3] and d(0, 0) == draws[0][0]  # any order
    stage_b = SinkDistances(9, 4, 4, 30)  # a stage that only owns steps 2 and 3
    assert [(stage_b(n, 2), stage_b(n, 3)) for n in range(50)] == [(r[2], r[3]) for r in draws]


@pytest.mark.parametrize("fps", [25, 30, 16])
def test_feature_index_matches_the_official_sampler(fps):
    """Rates without exact ties (the model's 25 fps among them); at exact ties (24 fps: 17.5) the
    official float time points fall on either side depending on the video length."""
    n = 3000
    assert [feature_index(k, fps, 30) for k in range(n)] == frame_feature_indices(n, fps).tolist()
