"""The streaming session on the tiny preset: determinism, online vs offline decode, lengths, sink refresh."""

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from liveavatar import GenerationOptions, Pipeline
from liveavatar.engine.task import DROP_FIRST_FRAMES, stream_length

SIZE = 128 * 128  # a 1:1 image -> 128x128 video, latent 16x16, 64 tokens per latent frame


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.tiny(seed=0)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    img = (rng.random((160, 160, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(d / "face.png")
    t = np.arange(int(16000 * 4.5)) / 16000
    wave = 0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 2 * t))
    sf.write(d / "speech.wav", wave.astype(np.float32), 16000)
    return str(d / "face.png"), str(d / "speech.wav")


def _frames(pipe, inputs, **kw):
    opts = GenerationOptions(size=SIZE, **kw)
    session = pipe.session(inputs[0], inputs[1], "a person talking", opts)
    chunks = list(session)
    return session, chunks, np.concatenate([c.frames for c in chunks])


def test_same_seed_same_frames_and_other_seed_differs(pipe, inputs):
    session, _, a = _frames(pipe, inputs, num_clip=1, seed=7)
    assert session.done and list(session) == []  # a session is a stream: a finished one has nothing more
    _, _, b = _frames(pipe, inputs, num_clip=1, seed=7)
    _, _, c = _frames(pipe, inputs, num_clip=1, seed=8)
    assert a.dtype == np.uint8 and a.shape == (48 - DROP_FIRST_FRAMES, 128, 128, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_online_and_offline_decode_give_identical_frames(pipe, inputs):
    _, on_chunks, on = _frames(pipe, inputs, num_clip=2, seed=3, online_decode=True)
    _, off_chunks, off = _frames(pipe, inputs, num_clip=2, seed=3, online_decode=False)
    assert np.array_equal(on, off)
    assert [len(c.frames) for c in on_chunks] == [len(c.frames) for c in off_chunks]


def test_frame_count_is_48n_minus_3_and_chunks_carry_their_audio(pipe, inputs):
    session, chunks, frames = _frames(pipe, inputs, num_clip=2, seed=1)
    assert len(frames) == 48 * 2 - 3 == session.num_frames
    assert [len(c.frames) for c in chunks] == [9] + [12] * 7
    assert [c.frame_start for c in chunks] == list(np.cumsum([0] + [len(c.frames) for c in chunks[:-1]]))
    # 16 kHz audio: 640 samples per frame; the track starts 3 frames into the speech
    audio = np.concatenate([c.audio for c in chunks])
    assert len(audio) == len(frames) * 640
    wave = sf.read(inputs[1], dtype="float32")[0]
    n = min(len(wave) - 3 * 640, len(audio))
    assert np.allclose(audio[:n], wave[3 * 640 : 3 * 640 + n], atol=1e-6)
    assert np.all(audio[n:] == 0)
    _, official, _ = _frames(pipe, inputs, num_clip=1, seed=1, audio_offset_frames=0)
    audio = np.concatenate([c.audio for c in official])
    assert len(audio) == 45 * 640 and np.array_equal(audio, wave[: len(audio)])


def test_default_length_follows_the_audio(pipe, inputs):
    session, _, frames = _frames(pipe, inputs, seed=1)
    audio_frames = int(np.ceil(4.5 * 25))
    assert len(frames) == session.num_frames == audio_frames - DROP_FIRST_FRAMES
    assert session.num_clips == 3  # 113 audio frames need three 48-frame clips
    # --num_clip beyond what the audio needs (the official scripts pass 10000) follows the audio
    capped = pipe.session(inputs[0], inputs[1], "a person talking", GenerationOptions(size=SIZE, num_clip=10000))
    assert (capped.num_clips, capped.num_frames) == (3, audio_frames - DROP_FIRST_FRAMES)


@pytest.mark.parametrize("seconds,clips,frames,blocks", [(1.0, 1, 22, 3), (1.92, 1, 45, 4), (1.96, 2, 46, 5),
                                                          (10.0, 6, 247, 21)])
def test_stream_length(seconds, clips, frames, blocks):
    got = stream_length(int(seconds * 16000))
    assert (got.num_clips, got.num_frames, got.num_blocks) == (clips, frames, blocks)
    # --num_clip N caps the clips: exactly 48·N − 3 frames when the audio needs more
    capped = stream_length(int(seconds * 16000), num_clip=3)
    expected = (3, 141, 12) if clips > 3 else (clips, frames, blocks)
    assert (capped.num_clips, capped.num_frames, capped.num_blocks) == expected


def test_sink_is_refreshed_with_the_first_generated_latent(pipe, inputs):
    opts = GenerationOptions(size=SIZE, num_clip=2, seed=5)
    session = pipe.session(inputs[0], inputs[1], "a person talking", opts)
    latents = list(session.latents())
    # After the run the sink holds the prefill of (first generated latent, motion latents).
    from liveavatar.engine.denoise import sink_prefill
    from liveavatar.runtime.kv_cache import SinkCache

    ref = SinkCache.allocate(pipe.preset.dit, session.layout, pipe.dtype)
    with torch.no_grad():
        pipe.dit.prefill_sink(latents[0][:, :, :1], session.cond.motion_latents, session.cond.text,
                              sink_prefill(pipe.preset.dit, ref, "cpu"))
    assert torch.equal(ref.k, session.denoise[0].sink.k)
    # Without the refresh the second clip differs.
    plain = pipe.session(inputs[0], inputs[1], "a person talking",
                         GenerationOptions(size=SIZE, num_clip=2, seed=5, sink_refresh=False))
    other = list(plain.latents())
    assert all(torch.equal(a, b) for a, b in zip(latents[:4], other[:4], strict=True))
    assert not torch.equal(latents[4], other[4])


def test_random_weights_pipeline_is_seeded_and_runs(inputs):
    from liveavatar.config import TINY

    opts = GenerationOptions(size=SIZE, num_clip=1, seed=2)
    runs = []
    for _ in range(2):
        p = Pipeline.random_weights(TINY, "cpu", torch.float32, seed=4)
        assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in p.dit.parameters())
        runs.append(torch.cat(list(p.session(inputs[0], inputs[1], "a person talking", opts).latents()), dim=2))
    assert torch.isfinite(runs[0]).all() and torch.equal(runs[0], runs[1])


def test_reference_latent_is_taken_from_the_motion_encode_bit_for_bit(pipe):
    """The session takes the reference latent from the motion frames' encode (their first 5 frames
    are the image repeated 5 times); it equals encoding those 5 frames alone (what the official code
    does) exactly, and the motion latents equal their own encode."""
    from liveavatar.engine.conditioning import encode_conditioning

    ref = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(3)) * 2 - 1
    cond = encode_conditioning(pipe, ref, "a person talking")
    frames = ref[None, :, None].expand(1, 3, pipe.preset.dit.motion_frames, -1, -1)
    with torch.no_grad():
        direct = pipe.vae.encode(frames[:, :, :5])[:, :, 1:2]
        motion = pipe.vae.encode(frames)
    assert cond.ref_latent.shape == direct.shape and torch.equal(cond.ref_latent, direct)
    assert torch.equal(cond.motion_latents, motion)


def test_encode_with_prefix_is_bit_identical_to_two_encodes(pipe):
    """At 704x64 with 29 frames the final 1x1 conv over 8 latents takes another CPU kernel than over 2
    (slicing the whole encode's latents differs in the last bit there); the prefix's own conv does not."""
    video = (torch.rand(3, 704, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1)[None, :, None]
    video = video.expand(1, 3, 29, -1, -1)
    with torch.no_grad():
        whole, prefix = pipe.vae.encode_with_prefix(video, 5)
        assert torch.equal(whole, pipe.vae.encode(video))
        assert torch.equal(prefix, pipe.vae.encode(video[:, :, :5]))
        assert not torch.equal(whole[:, :, :2], prefix)  # what the shortcut of slicing would have given
        with pytest.raises(ValueError, match="prefix_frames must be 1 \\+ 4j"):
            pipe.vae.encode_with_prefix(video, 4)
