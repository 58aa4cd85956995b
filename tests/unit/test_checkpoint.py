"""Checkpoint files: loading, the LoRA merge, header-only verification and model sizes.

A tiny checkpoint is written in the real on-disk formats (DiT safetensors split over 3 shards with an
index and config.json, T5 bf16 and VAE fp32 `torch.save` zips, HF tokenizer and wav2vec2 folders,
LoRA safetensors); everything must load back bit-exactly through the loaders and the other modules'
folder APIs. The LoRA merge is compared with a float64 computation and with the unmerged low-rank
forward; bad LoRAs must fail naming the offending key. Full-size models built on meta must equal the
checkpoint manifests exactly. Peak host RSS while loading a ~200 MB DiT is measured in a subprocess.
"""

import copy
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from liveavatar.config import S2V_14B, TINY, DiTConfig
from liveavatar.errors import UserError
from liveavatar.io import checkpoint as ck
from liveavatar.io.ckpt_writer import dit_config_json, random_lora, save_dit, save_lora, write_random_checkpoint
from liveavatar.io.verify import inspect_preset, verify_checkpoint
from liveavatar.models.dit import CausalS2VDiT

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
RSS_LIMIT = 1.3


def _manifest(name: str) -> dict:
    return json.loads((FIX / name).read_text())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpt")
    lora = base / "LiveAvatar" / ck.LORA_FILE
    models = write_random_checkpoint(base / "Wan2.2-S2V-14B", TINY, seed=0, num_shards=3, lora_path=lora)
    return base / "Wan2.2-S2V-14B", lora, models


def _assert_same(loaded: dict, reference: dict, dtype: torch.dtype):
    assert loaded.keys() == reference.keys()
    for k, v in reference.items():
        assert loaded[k].dtype == dtype, k
        assert torch.equal(loaded[k], v.to(dtype)), k


# ---- on-disk formats and bit-exact loading ----------------------------------------------------


def test_files_are_in_the_official_formats(ckpt):
    root, lora, models = ckpt
    index = json.loads((root / ck.DIT_INDEX).read_text())["weight_map"]
    shards = sorted({root / f for f in index.values()})
    assert [p.name for p in shards] == [ck.dit_shard_name(i, 3) for i in (1, 2, 3)]
    union = {}
    for p in shards:
        part = load_file(p)
        assert part and all(index[k] == p.name for k in part)
        union.update(part)
    assert union.keys() == models.dit.state_dict().keys()
    assert {v.dtype for v in union.values()} == {torch.bfloat16}
    t5 = torch.load(root / ck.T5_FILE, weights_only=True)
    vae = torch.load(root / ck.VAE_FILE, weights_only=True)
    assert {v.dtype for v in t5.values()} == {torch.bfloat16}
    assert {v.dtype for v in vae.values()} == {torch.float32}
    w2v = load_file(root / ck.AUDIO_DIR / "model.safetensors")
    assert any(k.startswith("wav2vec2.") for k in w2v) and any(k.startswith("lm_head.") for k in w2v)
    assert (root / ck.TOKENIZER_DIR / "tokenizer.json").is_file()
    assert all(k.startswith(ck.LORA_PREFIX) and ".default.weight" in k for k in load_file(lora))


def test_dit_loads_bit_exact_from_shards(ckpt):
    root, _, models = ckpt
    ref = {k: v.to(torch.bfloat16) for k, v in models.dit.state_dict().items()}
    for dtype in (torch.bfloat16, torch.float32):
        model = ck.load_dit(root, TINY.dit, dtype)
        _assert_same(model.state_dict(), ref, dtype)
        assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_dit_loads_from_a_single_file(tmp_path):
    torch.manual_seed(1)
    dit = CausalS2VDiT(TINY.dit)
    save_dit(dit, tmp_path, TINY.dit, num_shards=1, dtype=torch.float32)
    assert (tmp_path / ck.DIT_SINGLE).is_file() and not (tmp_path / ck.DIT_INDEX).exists()
    _assert_same(ck.load_dit(tmp_path, TINY.dit, torch.float32).state_dict(), dit.state_dict(), torch.float32)


def test_t5_and_vae_load_bit_exact(ckpt):
    root, _, models = ckpt
    _assert_same(ck.load_t5(root, TINY.t5, torch.bfloat16).state_dict(),
                 {k: v.to(torch.bfloat16) for k, v in models.t5.state_dict().items()}, torch.bfloat16)
    _assert_same(ck.load_vae(root / ck.VAE_FILE, TINY.vae, torch.float32).state_dict(),
                 models.vae.state_dict(), torch.float32)
    _assert_same(ck.load_vae(root, TINY.vae, torch.bfloat16).state_dict(), models.vae.state_dict(),
                 torch.bfloat16)


def test_tokenizer_and_wav2vec2_folders_load(ckpt):
    from liveavatar.models.t5 import TextTokenizer
    from liveavatar.models.wav2vec2 import AudioEncoder

    root, _, models = ckpt
    tok = TextTokenizer.from_folder(root / ck.TOKENIZER_DIR, text_len=6)
    ids, mask = tok("a  man talks")
    assert ids.tolist() == [[3, 4, 6, 1, 0, 0]] and mask.tolist() == [[1, 1, 1, 1, 0, 0]]
    enc = AudioEncoder.from_folder(root / ck.AUDIO_DIR, torch.float32)
    written = models.audio.wav2vec2.state_dict()
    assert written.pop("masked_spec_embed").shape == (TINY.audio.hidden_size,)  # training-only, not loaded
    _assert_same(enc.model.state_dict(), written, torch.float32)


def test_lora_loads_with_and_without_prefix(ckpt, tmp_path):
    _, lora_path, models = ckpt
    with_prefix = ck.load_lora(lora_path)
    bare = tmp_path / "bare.safetensors"
    save_lora(models.lora, bare, prefix=False)
    assert not any(k.startswith(ck.LORA_PREFIX) for k in load_file(bare))
    without = ck.load_lora(bare)
    ref = {k: v.to(torch.bfloat16) for k, v in models.lora.items()}
    _assert_same(with_prefix, ref, torch.bfloat16)
    _assert_same(without, ref, torch.bfloat16)
    assert ck.load_lora(lora_path.parent).keys() == ref.keys()  # a folder holding liveavatar.safetensors
    torch.save({k.removeprefix(ck.LORA_PREFIX): v for k, v in ref.items()}, tmp_path / "lora.pt")
    _assert_same(ck.load_lora(tmp_path / "lora.pt"), ref, torch.bfloat16)


def test_lora_repo_id_resolves_to_a_local_copy(ckpt, tmp_path, monkeypatch):
    _, lora_path, _ = ckpt
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"LoRA Quark-Vision/Live-Avatar not found"):
        ck.resolve_lora_path(ck.LORA_REPO)
    (tmp_path / "ckpt" / "LiveAvatar").mkdir(parents=True)
    (tmp_path / "ckpt" / "LiveAvatar" / ck.LORA_FILE).write_bytes(lora_path.read_bytes())
    assert ck.resolve_lora_path(ck.LORA_REPO) == Path("ckpt/LiveAvatar") / ck.LORA_FILE


def test_load_dit_merges_the_lora(ckpt):
    root, lora_path, _ = ckpt
    base = ck.load_dit(root, TINY.dit, torch.float32)
    merged = ck.load_dit(root, TINY.dit, torch.float32, lora_path=lora_path, lora_rank=TINY.lora_rank,
                         lora_alpha=TINY.lora_alpha)
    lora = ck.load_lora(lora_path)
    for name, lin in base.named_modules():
        if isinstance(lin, nn.Linear):
            w = merged.get_submodule(name).weight
            key = f"{ck.LORA_PREFIX}{name}.lora_A.default.weight"
            if key in lora:
                a, b = lora[key].double(), lora[key.replace("lora_A", "lora_B")].double()
                ref = lin.weight.double() + TINY.lora_alpha / TINY.lora_rank * (b @ a)
                torch.testing.assert_close(w.double(), ref, rtol=0, atol=1e-6)
            else:
                assert torch.equal(w, lin.weight), name


# ---- LoRA merge -------------------------------------------------------------------------------


def _is_target(name: str) -> bool:
    """Independent restatement of the peft suffix rule for q,k,v,o,ffn.0,ffn.2."""
    parts = name.split(".")
    return parts[-1] in {"q", "k", "v", "o"} or parts[-2:] in (["ffn", "0"], ["ffn", "2"])


def test_merge_matches_float64_and_unmerged_forward():
    torch.manual_seed(0)
    model = CausalS2VDiT(TINY.dit)
    rank, alpha = TINY.lora_rank, TINY.lora_alpha
    lora = random_lora(model, rank, seed=3)
    merged = copy.deepcopy(model)
    assert ck.merge_lora(merged, lora, alpha, rank) == 4 * 10 + 3 * 4
    n_targets = 0
    for name, lin in model.named_modules():
        if not isinstance(lin, nn.Linear):
            continue
        new = merged.get_submodule(name)
        if not _is_target(name):
            assert torch.equal(new.weight, lin.weight), name
            continue
        n_targets += 1
        a = lora[f"base_model.model.{name}.lora_A.default.weight"].double()  # [r, in]
        b = lora[f"base_model.model.{name}.lora_B.default.weight"].double()  # [out, r]
        ref = lin.weight.double() + (alpha / rank) * b @ a
        torch.testing.assert_close(new.weight.double(), ref, rtol=0, atol=1e-6)
        xin = torch.randn(5, lin.in_features, dtype=torch.float64)
        unmerged = xin @ lin.weight.double().T + (alpha / rank) * (xin @ a.T) @ b.T
        torch.testing.assert_close(xin @ new.weight.double().T, unmerged, rtol=1e-6, atol=1e-6)
    assert n_targets == 52
    for (k, p), (k2, p2) in zip(model.named_parameters(), merged.named_parameters(), strict=True):
        assert k == k2 and (k.endswith(".weight") or torch.equal(p, p2))  # biases untouched


def test_merge_in_bf16_rounds_once():
    torch.manual_seed(0)
    model = CausalS2VDiT(TINY.dit).to(torch.bfloat16)
    lora = {k: v.to(torch.bfloat16) for k, v in random_lora(model, TINY.lora_rank, seed=4).items()}
    merged = copy.deepcopy(model)
    ck.merge_lora(merged, lora, TINY.lora_alpha, TINY.lora_rank)
    lin, new = model.blocks[1].ffn[2], merged.blocks[1].ffn[2]
    a = lora["base_model.model.blocks.1.ffn.2.lora_A.default.weight"].double()
    b = lora["base_model.model.blocks.1.ffn.2.lora_B.default.weight"].double()
    ref = lin.weight.double() + TINY.lora_alpha / TINY.lora_rank * (b @ a)
    assert new.weight.dtype == torch.bfloat16
    # one rounding of the float32 sum to bf16: within half an ulp (2^-9 relative) plus fp32 noise
    assert ((new.weight.double() - ref).abs() <= ref.abs() * 2.0**-8 + 1e-7).all()
    assert not torch.equal(new.weight, lin.weight)


def test_real_dit_lora_targets_match_manifest():
    with torch.device("meta"):
        model = CausalS2VDiT(S2V_14B.dit)
    manifest = _manifest("lora_liveavatar_expected.json")
    expected = ck.expected_lora_tensors(model, manifest["_meta"]["rank"], S2V_14B.lora_targets)
    assert list(expected) == list(manifest["tensors"])
    assert {k: list(s) for k, s in expected.items()} == {k: v[0] for k, v in manifest["tensors"].items()}
    assert len(ck.lora_targets(model, S2V_14B.lora_targets)) == 448
    assert sum(a * b for a, b in expected.values()) == manifest["_meta"]["num_params"] == 676_331_520


def _tiny_lora(model, **changes):
    lora = random_lora(model, TINY.lora_rank, seed=5)
    for k, v in changes.items():
        if v is None:
            lora.pop(k)
        else:
            lora[k] = v
    return lora


@pytest.mark.parametrize("change, message", [
    ({"base_model.model.blocks.0.norm3.lora_A.default.weight": torch.zeros(4, 64)},
     r"blocks\.0\.norm3\.lora_A\.default\.weight matches no target"),
    ({"base_model.model.blocks.2.ffn.0.lora_B.default.weight": torch.zeros(128, 5)},
     r"blocks\.2\.ffn\.0\.lora_B\.default\.weight has shape \[128, 5\], expected \[128, 4\]"),
    ({"base_model.model.audio_injector.injector.1.k.lora_B.default.weight": None},
     r"target audio_injector\.injector\.1\.k has no lora_B"),
    ({"blocks.0.self_attn.q.lora_A.default.weight": torch.zeros(4, 64)}, r"same LoRA tensor"),
    ({"blocks.0.self_attn.q.alpha": torch.zeros(1)}, r"not peft LoRA weights.*self_attn\.q\.alpha"),
])
def test_merge_rejects_mismatches_and_changes_nothing(change, message):
    torch.manual_seed(0)
    model = CausalS2VDiT(TINY.dit)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=message):
        ck.merge_lora(model, _tiny_lora(model, **change), TINY.lora_alpha, TINY.lora_rank)
    _assert_same(model.state_dict(), before, torch.float32)


def test_merge_rejects_a_wrong_rank():
    model = CausalS2VDiT(TINY.dit)
    with pytest.raises(UserError, match=r"rank 8.*has shape \[4, 64\], expected \[8, 64\]"):
        ck.merge_lora(model, _tiny_lora(model), 1.0, 8)


def test_load_lora_names_foreign_keys(tmp_path):
    save_file({"blocks.0.self_attn.q.lora_A.default.weight": torch.zeros(4, 64),
               "blocks.0.self_attn.q.weight": torch.zeros(64, 64)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(UserError, match=r"1 key\(s\) that are not peft LoRA weights.*q\.weight"):
        ck.load_lora(tmp_path / "x.safetensors")
    with pytest.raises(UserError, match=r"LoRA .*missing\.safetensors not found.*huggingface-cli download"):
        ck.load_lora(tmp_path / "missing.safetensors")


# ---- config, loader errors, metadata readers --------------------------------------------------


def test_dit_config_round_trip_and_mismatch(tmp_path):
    (tmp_path / ck.DIT_CONFIG).write_text(json.dumps(dit_config_json(S2V_14B.dit)))
    assert ck.read_dit_config(tmp_path, S2V_14B.dit) == S2V_14B.dit
    with pytest.raises(UserError, match=r"does not match the preset: num_layers=40 \(preset: 39\); pass"):
        ck.read_dit_config(tmp_path, replace(S2V_14B.dit, num_layers=39))
    with pytest.raises(UserError, match=r"dim=5120 \(preset: 64\), ffn_dim=13824 \(preset: 128\), num_heads"):
        ck.read_dit_config(tmp_path, TINY.dit)
    raw = dit_config_json(S2V_14B.dit) | {"enable_framepack": False}
    (tmp_path / ck.DIT_CONFIG).write_text(json.dumps(raw))
    with pytest.raises(UserError, match=r"sets enable_framepack=False"):
        ck.read_dit_config(tmp_path, S2V_14B.dit)
    with pytest.raises(UserError, match=r"config\.json does not exist"):
        ck.read_dit_config(tmp_path / "nowhere", S2V_14B.dit)


def test_loader_errors_name_the_problem(ckpt, tmp_path):
    root, _, _ = ckpt
    with pytest.raises(UserError, match=r"does not match the preset: dim=64 \(preset: 5120\)"):
        ck.load_dit(root, S2V_14B.dit, torch.bfloat16)
    wide = replace(TINY.dit, ffn_dim=256)
    save_dit(CausalS2VDiT(TINY.dit), tmp_path / "d", wide, num_shards=3)  # config says 256, tensors 128
    with pytest.raises(UserError, match=r"do not match the model: 12 problem\(s\): tensor blocks\.0\.ffn\.0\."
                                        r"weight has shape \[128, 64\], expected \[256, 64\].*and 7 more"):
        ck.load_dit(tmp_path / "d", wide, torch.float32)
    (tmp_path / "d" / ck.dit_shard_name(2, 3)).unlink()
    with pytest.raises(UserError, match=r"incomplete: 1 problem\(s\): missing shard \S+-00002-of-00003"):
        ck.load_dit(tmp_path / "d", wide, torch.float32)
    bad_lora = tmp_path / "bad.safetensors"
    save_file({"blocks.0.self_attn.q.lora_A.default.weight": torch.zeros(3, 64)}, str(bad_lora))
    with pytest.raises(UserError, match=r"LoRA \S*bad\.safetensors does not fit this DiT \(rank 4\): \d+ "
                                        r"problem\(s\): target blocks\.0\.self_attn\.q has no lora_B"):
        ck.load_dit(root, TINY.dit, torch.float32, lora_path=bad_lora, lora_rank=4)
    data = (root / ck.T5_FILE).read_bytes()
    (tmp_path / ck.T5_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"probably truncated"):
        ck.load_t5(tmp_path, TINY.t5, torch.float32)
    with pytest.raises(UserError, match=r"T5 encoder .*does not match the model: .*missing tensor"):
        ck.load_t5(root, replace(TINY.t5, num_layers=3), torch.float32)


def test_pth_metadata_reads_no_data_and_checks_records(tmp_path):
    sd = {"a": torch.randn(3, 4).bfloat16(), "b": torch.arange(6.0)}
    sd["c"] = sd["b"][2:]  # a view sharing b's storage
    torch.save(sd, tmp_path / "x.pth")
    metas = ck.read_pth_metadata(tmp_path / "x.pth")
    assert metas == {"a": ck.TensorMeta((3, 4), torch.bfloat16), "b": ck.TensorMeta((6,), torch.float32),
                     "c": ck.TensorMeta((4,), torch.float32)}
    data = (tmp_path / "x.pth").read_bytes()
    (tmp_path / "y.pth").write_bytes(data[:-10])
    with pytest.raises(UserError, match=r"y\.pth cannot be opened .*truncated"):
        ck.read_pth_metadata(tmp_path / "y.pth")


def test_safetensors_header_detects_truncation(tmp_path):
    save_file({"w": torch.ones(16, 16)}, str(tmp_path / "w.safetensors"))
    want = {"w": ck.TensorMeta((16, 16), torch.float32)}
    assert ck.read_safetensors_header(tmp_path / "w.safetensors") == want
    data = (tmp_path / "w.safetensors").read_bytes()
    for cut in (4, 40, len(data) - 1):
        (tmp_path / "t.safetensors").write_bytes(data[:cut])
        with pytest.raises(UserError, match=r"t\.safetensors .*truncated|unreadable"):
            ck.read_safetensors_header(tmp_path / "t.safetensors")


# ---- verification details (the CLI tests cover the exit codes) --------------------------------


def test_verify_reports_counts_and_notes(ckpt, tmp_path):
    root, lora, models = ckpt
    report = verify_checkpoint(root, lora_path=lora, preset="tiny")
    assert report.ok, report.summary()
    by = {c.name: c for c in report.components}
    assert [c.name for c in report.components] == list(ck.COMPONENTS)
    dit_sd = models.dit.state_dict()
    assert (by["dit"].tensors, by["dit"].params) == (len(dit_sd), sum(v.numel() for v in dit_sd.values()))
    assert by["dit"].bytes == 2 * by["dit"].params and by["vae"].bytes == 4 * by["vae"].params
    assert by["lora"].tensors == 104 and not any(c.notes for c in report.components)
    # a float32 LoRA is fine (cast when loaded) but noted
    save_lora(models.lora, tmp_path / "f32.safetensors", dtype=torch.float32)
    rep = verify_checkpoint(root, lora_path=tmp_path / "f32.safetensors", only="lora", preset="tiny")
    assert rep.ok and "float32" in rep.components[0].notes[0]
    assert verify_checkpoint(root, preset="tiny").components[1].skipped


def test_verify_folders_and_index(ckpt, tmp_path):
    import shutil

    root, _, _ = ckpt
    bad = tmp_path / "c"
    shutil.copytree(root, bad)
    cfg = json.loads((bad / ck.AUDIO_DIR / "config.json").read_text())
    (bad / ck.AUDIO_DIR / "config.json").write_text(json.dumps(cfg | {"num_hidden_layers": 3}))
    shutil.rmtree(bad / ck.TOKENIZER_DIR)
    index = json.loads((bad / ck.DIT_INDEX).read_text())
    home = index["weight_map"]["head.modulation"]
    assert home != ck.dit_shard_name(1, 3)
    index["weight_map"]["head.modulation"] = ck.dit_shard_name(1, 3)
    (bad / ck.DIT_INDEX).write_text(json.dumps(index))
    report = verify_checkpoint(bad, preset="tiny")
    text = "\n".join(report.problems)
    assert "num_hidden_layers=3, the preset expects 2" in text
    assert f"missing folder {bad / ck.TOKENIZER_DIR}" in text
    assert "head.modulation is listed in the index for diffusion_pytorch_model-00001-of-00003" in text
    assert f"head.modulation in {home} is not listed" in text
    with pytest.raises(UserError, match=r"unknown component\(s\) vea"):
        verify_checkpoint(root, only="dit,vea")
    with pytest.raises(UserError, match=r"--only lora needs --lora_path"):
        verify_checkpoint(root, only="lora")


def test_verify_reports_a_wav2vec2_layout_or_preprocessor_the_engine_cannot_run(ckpt, tmp_path):
    import shutil

    root, _, _ = ckpt
    bad = tmp_path / "c"
    shutil.copytree(root, bad)
    conf = bad / ck.AUDIO_DIR / "config.json"
    conf.write_text(json.dumps(json.loads(conf.read_text()) | {"feat_extract_norm": "group"}))
    (bad / ck.AUDIO_DIR / "preprocessor_config.json").unlink()
    problems = verify_checkpoint(bad, preset="tiny", only="audio").problems
    assert any("sets feat_extract_norm='group'; this engine runs the wav2vec2 layout" in p for p in problems)
    assert any(p.endswith(f"missing file {bad / ck.AUDIO_DIR / 'preprocessor_config.json'}") for p in problems)
    assert not any("unused" in p or "missing tensor" in p for p in problems)  # tensors of another layout: not compared


# ---- full-size models on meta -----------------------------------------------------------------


@pytest.mark.parametrize("component, manifest", [
    ("dit", "dit_wan_s2v_14b.json"), ("t5", "t5_umt5_xxl_encoder.json"), ("vae", "vae_wan2_1.json"),
])
def test_meta_models_match_manifests(component, manifest):
    from liveavatar.models.t5 import T5Encoder
    from liveavatar.models.vae import WanVAE

    cls, cfg = {"dit": (CausalS2VDiT, S2V_14B.dit), "t5": (T5Encoder, S2V_14B.t5),
                "vae": (WanVAE, S2V_14B.vae)}[component]
    with torch.device("meta"):
        sd = cls(cfg).state_dict()
    m = _manifest(manifest)
    assert {k: list(v.shape) for k, v in sd.items()} == {k: v[0] for k, v in m["tensors"].items()}
    assert {v[1] for v in m["tensors"].values()} == {str(ck.FILE_DTYPES[component]).removeprefix("torch.")}
    counts = (len(sd), sum(v.numel() for v in sd.values()))
    assert counts == (m["_meta"]["num_tensors"], m["_meta"]["num_params"])


def test_inspect_counts_match_the_spec():
    stats = {s.name: s for s in inspect_preset("s2v-14b")}
    expect = {  # architecture.md §10.1 and the manifests
        "dit": (1260, 16_295_755_609), "dit.blocks": (None, 14_055_772_160),
        "dit.embeddings+head": (None, 232_719_424), "dit.audio encoder": (None, 95_051_545),
        "dit.audio injectors": (None, 1_887_928_320), "dit.frame packer+cond": (None, 24_284_160),
        "lora": (896, 676_331_520), "t5": (242, 5_680_910_336), "vae": (194, 126_892_531),
        "vae.decoder": (None, 73_295_603),
        "audio": (None, 315_438_720 - 1024),  # Wav2Vec2Model less its training-only masked_spec_embed [1024]
    }
    for name, (tensors, params) in expect.items():
        assert stats[name].params == params, name
        assert tensors is None or stats[name].tensors == tensors, name
    assert "dit.other" not in stats
    assert stats["dit"].file_bytes == 2 * 16_295_755_609 and stats["vae"].file_bytes == 4 * 126_892_531
    assert stats["vae.encoder"].params + stats["vae.decoder"].params == stats["vae"].params


# ---- host memory while loading ----------------------------------------------------------------

# Peak RSS is read from VmHWM (the high-water mark of this process image): ru_maxrss of a child also
# counts the RSS of the parent it was forked from (here the whole pytest process), which would hide it.
_RSS_PROBE = r"""
import json, sys
import torch
from liveavatar.io.checkpoint import load_dit
from liveavatar.config import DiTConfig, get_preset
from liveavatar.models.dit import CausalS2VDiT

def peak_rss():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

ckpt, cfg_json, dtype = sys.argv[1], json.loads(sys.argv[2]), getattr(torch, sys.argv[3])
cfg = DiTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_json.items()})
with torch.device("meta"):  # the first meta build pulls in torch's meta kernels (~70 MB, once per process)
    CausalS2VDiT(get_preset("tiny").dit)
base = peak_rss()
model = load_dit(ckpt, cfg, dtype)
for t in model.state_dict().values():
    t.max()  # fault every weight page in, as a forward pass would
peak = peak_rss()
weights = sum(t.nbytes for t in model.state_dict().values())
print(json.dumps({"weights": weights, "peak": peak - base, "ratio": (peak - base) / weights}))
"""


def test_peak_host_rss_while_loading_stays_near_one_copy(tmp_path):
    cfg = replace(DiTConfig(), dim=768, ffn_dim=3072, num_heads=6, num_layers=8,
                  audio_inject_layers=(0, 2, 4, 6))
    torch.manual_seed(0)
    model = CausalS2VDiT(cfg)
    save_dit(model, tmp_path / "bf16", cfg, num_shards=3, dtype=torch.bfloat16)  # ~213 MB
    save_dit(model, tmp_path / "fp32", cfg, num_shards=3, dtype=torch.float32)  # ~425 MB
    del model
    cfg_json = json.dumps({k: getattr(cfg, k) for k in ("dim", "ffn_dim", "num_heads", "num_layers",
                                                         "audio_inject_layers")})
    for folder, dtype in (("bf16", "bfloat16"), ("bf16", "float32"), ("fp32", "bfloat16")):
        out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(tmp_path / folder), cfg_json, dtype],
                             capture_output=True, text=True, cwd=ROOT, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"peak host RSS loading a {folder} DiT as {dtype}: {r['peak'] / 1e6:.1f} MB for "
              f"{r['weights'] / 1e6:.1f} MB of weights, ratio {r['ratio']:.3f}")
        assert r["weights"] > 200e6 and r["peak"] > 0.9 * r["weights"]  # the weights are resident
        assert r["ratio"] <= RSS_LIMIT
