"""wav2vec2 audio features.

- The 25 stacked states are what the official code (transformers 4.51) got: checked against a manual
  walk through the model's submodules, with the final LayerNorm on index 24 only, and against
  transformers' own `Wav2Vec2Model` and feature extractor carrying the same weights (bit-identical).
- Normalisation, 50 -> 30 Hz resampling and per-video-frame bucketing equal independent numpy code
  (exact rational rounding, explicit linear interpolation).
- A tiny model saved as `Wav2Vec2ForCTC` (like the real folder) loads through `from_folder` and gives
  identical features, also from `pytorch_model.bin` with the old weight-norm names and from sharded
  weights with an index; missing folders, files or weights, other layouts and damaged settings are
  one-line `UserError`s.
- Clip counts for several lengths, worked out by hand from the conv arithmetic; the windowed stream
  over one window equals one pass at the fixed rate.
"""

from fractions import Fraction

import numpy as np
import pytest
import torch

from liveavatar.config import TINY
from liveavatar.errors import UserError
from liveavatar.models.wav2vec2 import (
    AudioEncoder,
    bucket_features,
    conv_frames,
    frame_feature_indices,
    num_clips_for_audio,
    resample_features,
)

CFG = TINY.audio
N_SAMPLES = 36800  # 2.3 s: T50 = 114, T30 = 68, 2 clips of 48 frames, frames 57.. past the audio


@pytest.fixture(scope="module")
def enc():
    return AudioEncoder.random(CFG, seed=0)


def _wave(n=N_SAMPLES, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(n) + 0.1).astype(np.float32)


def _np_normalize(x):
    x = x.astype(np.float64)
    return (x - x.mean()) / np.sqrt(x.var() + 1e-7)


def _np_interp(h, t30):
    """h: [L, T50, H] -> [L, T30, H], linear, end points aligned. Source positions are formed in
    float32, the precision torch (and the official GPU run) computes them in; the rest in float64."""
    t50 = h.shape[1]
    scale = np.float32(t50 - 1) / np.float32(t30 - 1) if t30 > 1 else np.float32(0)
    pos = (scale * np.arange(t30, dtype=np.float32)).astype(np.float64)
    i0 = np.floor(pos).astype(int)
    i1 = np.minimum(i0 + 1, t50 - 1)
    w = (pos - i0)[None, :, None]
    return (1 - w) * h[:, i0] + w * h[:, i1]


def _np_bucket(f30, n_frames, fps):
    """f30: [L, T30, H] -> [1, L, H, N]; frame n takes round-half-even(n·30/fps), zeros beyond."""
    layers, t30, hidden = f30.shape
    out = np.zeros((layers, hidden, n_frames))
    for n in range(n_frames):
        i = round(Fraction(30 * n, fps))
        if i < t30:
            out[:, :, n] = f30[:, i]
    return out[None]


def test_hidden_states_follow_official_semantics(enc):
    m = enc.model
    x = torch.from_numpy(enc.normalize(_wave()))[None]
    with torch.no_grad():
        states = enc.encode(x[0].numpy())
        h = m.feature_extractor(x).transpose(1, 2)
        h = m.feature_projection(h)
        h = h[0] if isinstance(h, tuple) else h
        h = h + m.encoder.pos_conv_embed(h)
        ref = [h]
        for layer in m.encoder.layers:
            h = layer(h)
            h = h[0] if isinstance(h, tuple) else h
            ref.append(h)
        ref[-1] = m.encoder.layer_norm(ref[-1])  # only the last state is normalised
    assert states.shape == (25, 114, CFG.hidden_size)
    torch.testing.assert_close(states, torch.cat(ref), rtol=0, atol=1e-5)
    assert not torch.allclose(states[24], h[0], atol=1e-3)  # index 24 is not the raw layer-24 output


def test_normalize_matches_numpy(enc):
    w = _wave()
    np.testing.assert_allclose(enc.normalize(w), _np_normalize(w), rtol=0, atol=1e-5)


def test_features_match_numpy_reference(enc):
    w = _wave()
    feats = enc.features(w, fps=25)
    hidden = enc.encode(enc.normalize(w)).double().numpy()  # [25, 114, H]
    t30 = int(114 / 50 * 30)
    assert t30 == 68
    n = (int(t30 / 57.6) + 1) * 48
    ref = _np_bucket(_np_interp(hidden, t30), n, 25)
    assert feats.shape == (1, 25, CFG.hidden_size, 96) == ref.shape
    np.testing.assert_allclose(feats.double().numpy(), ref, rtol=0, atol=1e-5)
    # Frames whose 30 Hz index round(1.2 n) >= 68 (n >= 57) are silent, the others are not.
    assert (feats[..., 57:] == 0).all()
    assert (feats[..., :57].abs().amax(dim=(0, 1, 2)) > 0).all()
    # An explicit frame count samples the same columns.
    assert torch.equal(enc.features(w, 10, fps=25), feats[..., :10])


@pytest.mark.parametrize("fps,t50,n_frames", [(25, 40, 50), (16, 37, 30), (30, 11, 9)])
def test_resample_and_bucket_functions(fps, t50, n_frames):
    g = torch.Generator().manual_seed(fps)
    h = torch.randn(3, t50, 5, generator=g)
    t30 = int(t50 / 50 * 30)
    f30 = resample_features(h)
    np.testing.assert_allclose(f30.numpy(), _np_interp(h.double().numpy(), t30), rtol=0, atol=1e-6)
    out = bucket_features(f30, n_frames, fps)
    np.testing.assert_allclose(out.numpy(), _np_bucket(f30.double().numpy(), n_frames, fps), rtol=0, atol=0)
    exact = [round(Fraction(30 * n, fps)) for n in range(n_frames)]
    assert frame_feature_indices(n_frames, fps).tolist() == exact


def test_num_clips_for_audio():
    # T50 from the conv stack: 16000 -> 49, 30800 -> 96, 31120 -> 97, 160000 -> 499 (10 s).
    assert [conv_frames(n, CFG.conv_kernel, CFG.conv_stride) for n in (16000, 30800, 31119, 31120, 160000)] == [
        49, 96, 96, 97, 499]
    assert num_clips_for_audio(16000) == 1  # T30 = 29
    assert num_clips_for_audio(30800) == 1  # T30 = 57 < 57.6
    assert num_clips_for_audio(31120) == 2  # T30 = 58
    assert num_clips_for_audio(160000) == 6  # T30 = 299: 5 full clips + the unconditional extra one
    assert num_clips_for_audio(160000, infer_frames=96) == 3  # 299 / 115.2 -> 2, + 1
    assert num_clips_for_audio(160000, fps=16) == 4  # 299 / (48 · 1.875) -> 3, + 1


def test_frame_count_matches_model(enc):
    for n in (N_SAMPLES, 16000 + 123):
        t50 = conv_frames(n, CFG.conv_kernel, CFG.conv_stride)
        assert enc.encode(enc.normalize(_wave(n))).shape[1] == t50
    assert enc.features(_wave()).shape[-1] == num_clips_for_audio(N_SAMPLES, cfg=CFG) * 48


def test_windowed_stream_over_one_window_is_one_pass_at_the_fixed_rate(enc):
    """A window spanning the whole utterance sees what one pass sees: its features are the one-pass
    hidden states, sampled at the exact time of each video frame (50 Hz position 2k, linear)."""
    from liveavatar.engine.audio_features import AudioFeatures, AudioWindows
    from liveavatar.engine.speech import SpeechStream

    w = _wave()
    hidden = enc.encode(enc.normalize(w))  # [25, T50, H]
    speech = SpeechStream()
    speech.push(w)
    speech.end()
    n = 40
    stream = AudioFeatures(enc, speech, fps=25, dtype=torch.float32, mode="windowed",
                           windows=AudioWindows(100.0, 0.0, 0.0))
    got = stream.frames(0, n)[0]  # [25, H, n]
    for k in range(n):
        j = round(1.2 * k)
        p0, frac = divmod(5 * j, 3)
        want = hidden[:, p0] + (hidden[:, p0 + 1] - hidden[:, p0]) * (frac / 3) if frac else hidden[:, p0]
        torch.testing.assert_close(got[:, :, k], want, rtol=0, atol=1e-5)


def _save_ctc_folder(enc, path, drop_key=None):
    from safetensors.torch import load_file, save_file
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    from liveavatar.models.wav2vec2 import wav2vec2_config

    ctc = Wav2Vec2ForCTC(wav2vec2_config(enc.model.config))
    missing, unexpected = ctc.wav2vec2.load_state_dict(enc.model.state_dict(), strict=False)
    assert missing == ["masked_spec_embed"] and not unexpected  # the training-only SpecAugment vector
    ctc.save_pretrained(str(path))
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(str(path))
    weights = path / "model.safetensors"
    sd = load_file(str(weights))
    assert any(k.startswith("wav2vec2.") for k in sd) and "lm_head.weight" in sd  # the CTC layout
    if drop_key:
        del sd[drop_key]
        save_file(sd, str(weights), metadata={"format": "pt"})
    return sd


def test_parity_with_transformers(enc):
    """transformers' Wav2Vec2Model and feature extractor with our weights give the same normalised
    samples and the same 25 states (index 24 from last_hidden_state, as 4.51 reported it)."""
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    from liveavatar.models.wav2vec2 import wav2vec2_config

    hf = Wav2Vec2Model(wav2vec2_config(CFG)).eval()
    missing, unexpected = hf.load_state_dict(enc.model.state_dict(), strict=False)
    assert missing == ["masked_spec_embed"] and not unexpected
    ext = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True)
    for n, seed in ((N_SAMPLES, 0), (16000 + 123, 1)):
        w = _wave(n, seed) * (1 + seed)
        x = ext(w, sampling_rate=16000, return_tensors="np").input_values[0]
        assert np.array_equal(enc.normalize(w), x)
        with torch.no_grad():
            out = hf(torch.from_numpy(x)[None], output_hidden_states=True)
        ref = torch.cat([*out.hidden_states[:-1], out.last_hidden_state])
        torch.testing.assert_close(enc.encode(x), ref, rtol=0, atol=1e-6)


def test_from_folder_roundtrip(enc, tmp_path):
    _save_ctc_folder(enc, tmp_path / "w2v")
    loaded = AudioEncoder.from_folder(tmp_path / "w2v", dtype=torch.float32)
    assert loaded.model.state_dict().keys() == enc.model.state_dict().keys()
    for name, p in enc.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], p), name
    w = _wave()
    assert torch.equal(loaded.features(w), enc.features(w))


def test_from_folder_bin_old_names_and_shards(enc, tmp_path):
    """pytorch_model.bin with the pre-parametrisation weight-norm names (weight_g, weight_v), as older
    copies of the official folder hold, and safetensors shards listed by an index load the same."""
    import json
    import shutil

    from safetensors.torch import save_file

    sd = _save_ctc_folder(enc, tmp_path / "st")
    old = {k.replace("parametrizations.weight.original0", "weight_g").replace(
        "parametrizations.weight.original1", "weight_v"): v for k, v in sd.items()}
    assert "wav2vec2.encoder.pos_conv_embed.conv.weight_g" in old
    shutil.copytree(tmp_path / "st", tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(old, tmp_path / "bin" / "pytorch_model.bin")
    shutil.copytree(tmp_path / "st", tmp_path / "shards")
    (tmp_path / "shards" / "model.safetensors").unlink()
    keys = sorted(k for k in sd if not k.startswith("lm_head."))
    weight_map = {k: "model-head.safetensors" for k in sd if k.startswith("lm_head.")}  # a shard not needed
    for i, part in enumerate((keys[::2], keys[1::2])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(tmp_path / "shards" / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
    (tmp_path / "shards" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    w = _wave()
    for folder in ("bin", "shards"):
        loaded = AudioEncoder.from_folder(tmp_path / folder, dtype=torch.float32)
        assert torch.equal(loaded.features(w), enc.features(w)), folder
    half = AudioEncoder.from_folder(tmp_path / "bin", dtype=torch.bfloat16)
    assert next(half.model.parameters()).dtype == torch.bfloat16


def test_from_folder_errors(enc, tmp_path):
    import json
    import shutil

    with pytest.raises(UserError, match="does not exist"):
        AudioEncoder.from_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="lacks config.json, preprocessor_config.json, model weights"):
        AudioEncoder.from_folder(tmp_path / "empty")
    _save_ctc_folder(enc, tmp_path / "holed", drop_key="wav2vec2.encoder.layers.3.attention.q_proj.weight")
    with pytest.raises(UserError, match=r"1 missing.*encoder.layers.3.attention.q_proj.weight"):
        AudioEncoder.from_folder(tmp_path / "holed")
    _save_ctc_folder(enc, tmp_path / "good")
    conf = json.loads((tmp_path / "good" / "config.json").read_text())
    pre = json.loads((tmp_path / "good" / "preprocessor_config.json").read_text())
    cases = [
        ("config.json", conf | {"do_stable_layer_norm": False}, r"sets do_stable_layer_norm=False; this engine runs"),
        ("config.json", {k: v for k, v in conf.items() if k != "feat_extract_norm"},
         r"sets feat_extract_norm='group'"),  # transformers' default for a field left out
        ("config.json", conf | {"hidden_size": "32"}, r"sets hidden_size='32', which is not a positive integer"),
        ("config.json", conf | {"conv_kernel": [10, 3]}, r"conv_dim, conv_kernel and conv_stride of different"),
        ("config.json", conf | {"num_attention_heads": 3}, r"hidden_size=32, not a multiple of num_attention_heads"),
        ("config.json", conf | {"num_hidden_layers": 3}, r"do not match its config.json \(0 missing, 336 unused"),
        ("config.json", conf | {"intermediate_size": 48}, r"0 missing, 0 unused, 72 mis-shaped"),
        ("config.json", [1, 2], r"holds a JSON list, not an object"),
        ("config.json", "{", r"is not valid JSON"),
        ("preprocessor_config.json", pre | {"sampling_rate": 8000}, r"expects 8000 Hz audio; this engine feeds 16000"),
        ("preprocessor_config.json", pre | {"do_normalize": "yes"}, r"do_normalize='yes', which is not true or false"),
    ]
    for i, (name, value, message) in enumerate(cases):
        bad = tmp_path / f"bad{i}"
        shutil.copytree(tmp_path / "good", bad)
        (bad / name).write_text(value if isinstance(value, str) else json.dumps(value))
        with pytest.raises(UserError, match=message):
            AudioEncoder.from_folder(bad)
    from safetensors.torch import load_file, save_file

    twice = tmp_path / "twice"
    shutil.copytree(tmp_path / "good", twice)
    sd = load_file(str(twice / "model.safetensors"))
    sd["encoder.layer_norm.weight"] = sd["wav2vec2.encoder.layer_norm.weight"] + 1  # with and without the prefix
    save_file(sd, str(twice / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"layer_norm.weight in model.safetensors is also in model.safetensors"):
        AudioEncoder.from_folder(twice)
    (tmp_path / "good" / "model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(UserError, match="wav2vec2 weights in .* cannot be read"):
        AudioEncoder.from_folder(tmp_path / "good")


def test_nonfinite_weights_are_refused(enc, tmp_path):
    from safetensors.torch import save_file

    sd = _save_ctc_folder(enc, tmp_path / "w2v")
    sd["wav2vec2.encoder.layers.0.feed_forward.output_dense.weight"][0, 0] = float("nan")
    save_file(sd, str(tmp_path / "w2v" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"layers.0.feed_forward.output_dense.weight holds 1 NaN"):
        AudioEncoder.from_folder(tmp_path / "w2v", dtype=torch.float32)


def test_bad_waves(enc):
    with pytest.raises(UserError, match="mono"):
        enc.features(np.zeros((2, 16000), np.float32))
    with pytest.raises(UserError, match="samples"):
        enc.features(np.zeros(500, np.float32))


def test_importing_the_engine_does_not_import_transformers():
    """transformers takes seconds to import; the tiny pipeline and the audio path never need it."""
    import subprocess
    import sys

    code = ("import sys; from liveavatar import Pipeline; from liveavatar.cli import main; "
            "p = Pipeline.tiny(); print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_random_is_seeded():
    torch.manual_seed(0)
    before = torch.rand(4)
    torch.manual_seed(0)
    a = AudioEncoder.random(CFG, seed=3).model.state_dict()
    assert torch.equal(torch.rand(4), before)  # the global RNG is left as it was
    b = AudioEncoder.random(CFG, seed=3).model.state_dict()
    c = AudioEncoder.random(CFG, seed=4).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_bf16_runs_in_model_dtype(enc):
    w = _wave()
    half = AudioEncoder.random(CFG, seed=0, dtype=torch.bfloat16)
    f = half.features(w)
    assert f.dtype == torch.bfloat16
    torch.testing.assert_close(f.float(), enc.features(w), rtol=0.05, atol=0.1)
