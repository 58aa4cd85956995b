"""umT5 encoder and tokenizer.

- Built on `meta` with the default config, the encoder's state dict equals the manifest of the real
  `models_t5_umt5-xxl-enc-bf16.pth` (names, shapes, parameter count) and loads it with `assign=True`.
- At a tiny config, with our weights mapped onto transformers' independent `UMT5EncoderModel`, both
  give the same hidden states (float32, max abs err <= 1e-5), padding included.
- Tokenizers: a folder written here loads through `from_folder` and gives hand-computed ids after the
  official cleaning; the builtin byte tokenizer is deterministic, in range, appends EOS and pads.
- `encode_text` keeps exactly the real tokens, and they equal an unpadded run of the encoder.
"""

import json
from pathlib import Path

import pytest
import torch

from liveavatar.config import TINY, T5Config
from liveavatar.errors import UserError
from liveavatar.models.t5 import T5Encoder, TextTokenizer, clean_prompt, encode_text, relative_position_bucket

FIX = Path(__file__).resolve().parents[1] / "fixtures"
PARITY_TOL = 1e-5


def _manifest():
    data = json.loads((FIX / "t5_umt5_xxl_encoder.json").read_text())
    return data["_meta"], data["tensors"]


def test_meta_build_matches_checkpoint_manifest():
    meta, tensors = _manifest()
    with torch.device("meta"):
        model = T5Encoder(T5Config())
    sd = model.state_dict()
    assert list(sd) == list(tensors)
    for name, (shape, _dtype) in tensors.items():
        assert list(sd[name].shape) == shape, name
    assert len(sd) == meta["num_tensors"] == 242
    assert sum(p.numel() for p in model.parameters()) == meta["num_params"] == 5_680_910_336
    # The checkpoint is bf16; assign=True must take its tensors as they are.
    ckpt = {k: torch.empty(s, dtype=getattr(torch, d), device="meta") for k, (s, d) in tensors.items()}
    model.load_state_dict(ckpt, strict=True, assign=True)
    assert model.blocks[23].ffn.gate[0].weight.dtype == torch.bfloat16


def test_relative_buckets_match_closed_form():
    # b = 16·[Δ>0] + (|Δ| if |Δ| < 8 else min(15, 8 + floor(log(|Δ|/8) / log(16) · 8))), Δ = key − query.
    import math

    lq, lk = 5, 300
    got = relative_position_bucket(lq, lk, 32, 128)
    for i in range(lq):
        for j in range(lk):
            d = j - i
            a = abs(d)
            ref = 16 * (d > 0) + (a if a < 8 else min(15, 8 + int(math.log(a / 8) / math.log(16) * 8)))
            assert got[i, j].item() == ref, (i, j)


def _umt5_from_ours(ours: T5Encoder, cfg: T5Config):
    """transformers' UMT5 encoder carrying our weights (the key mapping lives only here)."""
    from transformers import UMT5Config, UMT5EncoderModel

    hf_cfg = UMT5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.dim, d_kv=cfg.dim_attn // cfg.num_heads, d_ff=cfg.dim_ffn,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.num_buckets,
        relative_attention_max_distance=cfg.max_dist, feed_forward_proj="gated-gelu",
        layer_norm_epsilon=cfg.eps, dropout_rate=0.0,
    )
    hf = UMT5EncoderModel(hf_cfg).eval()
    sd = ours.state_dict()
    mapped = {"shared.weight": sd["token_embedding.weight"],
              "encoder.embed_tokens.weight": sd["token_embedding.weight"],
              "encoder.final_layer_norm.weight": sd["norm.weight"]}
    for i in range(cfg.num_layers):
        src, dst = f"blocks.{i}.", f"encoder.block.{i}.layer."
        for p in "qkvo":
            mapped[f"{dst}0.SelfAttention.{p}.weight"] = sd[f"{src}attn.{p}.weight"]
        mapped[f"{dst}0.SelfAttention.relative_attention_bias.weight"] = sd[f"{src}pos_embedding.embedding.weight"]
        mapped[f"{dst}0.layer_norm.weight"] = sd[f"{src}norm1.weight"]
        mapped[f"{dst}1.layer_norm.weight"] = sd[f"{src}norm2.weight"]
        mapped[f"{dst}1.DenseReluDense.wi_0.weight"] = sd[f"{src}ffn.gate.0.weight"]
        mapped[f"{dst}1.DenseReluDense.wi_1.weight"] = sd[f"{src}ffn.fc1.weight"]
        mapped[f"{dst}1.DenseReluDense.wo.weight"] = sd[f"{src}ffn.fc2.weight"]
    missing, unexpected = hf.load_state_dict(mapped, strict=False)
    assert not unexpected and not [k for k in missing if "embed_tokens" not in k], (missing, unexpected)
    return hf


def test_parity_with_transformers_umt5():
    cfg = T5Config(vocab_size=97, dim=32, dim_attn=48, dim_ffn=64, num_heads=4, num_layers=3)
    torch.manual_seed(0)
    ours = T5Encoder(cfg).eval()
    with torch.no_grad():  # non-trivial norms and position tables, so every weight matters
        for name, p in ours.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                p.uniform_(0.5, 1.5)
            elif "pos_embedding" in name:
                p.normal_(0.0, 1.0)
    hf = _umt5_from_ours(ours, cfg)
    # 160 positions reach past max_dist 128; the second row has 37 pad tokens.
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (2, 160), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 123:] = 0
    ids[1, 123:] = 0
    with torch.no_grad():
        a = ours(ids, mask)
        b = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    err = (a - b).abs().max().item()
    print(f"T5 vs transformers UMT5EncoderModel: max abs err {err:.3e} (max |x| {b.abs().max().item():.2f})")
    assert a.shape == (2, 160, cfg.dim)
    assert err <= PARITY_TOL


def _write_tokenizer_folder(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "hello": 3, "world": 4, "&": 5, "café": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(path))


def test_tokenizer_from_folder(tmp_path):
    _write_tokenizer_folder(tmp_path / "tok")
    tok = TextTokenizer.from_folder(tmp_path / "tok", text_len=8)
    # Cleaning: whitespace collapsed, "&amp;amp;" unescaped twice to "&", mojibake "cafÃ©" fixed by ftfy.
    ids, mask = tok(["  hello\n\t world  &amp;amp; cafÃ©", "nope hello"])
    assert ids.tolist() == [[3, 4, 5, 6, 1, 0, 0, 0], [2, 3, 1, 0, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    # Truncation keeps EOS last.
    ids, mask = tok(" ".join(["hello"] * 20))
    assert ids.tolist() == [[3] * 7 + [1]] and mask.sum().item() == 8


def test_tokenizer_folder_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        TextTokenizer.from_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty holds no tokenizer files.*umt5-xxl"):
        TextTokenizer.from_folder(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match=r"bad could not be loaded") as err:
        TextTokenizer.from_folder(bad)
    assert "\n" not in str(err.value)


def test_clean_prompt():
    assert clean_prompt("  a\u00a0 b\n\nc &amp;lt; d ") == "a b c < d"


def test_builtin_tokenizer():
    tok = TextTokenizer.builtin(TINY.t5.vocab_size, text_len=16)
    ids, mask = tok(["héllo  world", "héllo world"])
    assert torch.equal(ids[0], ids[1]) and torch.equal(mask[0], mask[1])  # cleaning collapses spaces
    expected = [3 + b for b in "héllo world".encode()] + [1]
    assert ids[0, : len(expected)].tolist() == expected
    assert mask[0].tolist() == [1] * len(expected) + [0] * (16 - len(expected))
    assert (ids[0, len(expected):] == 0).all()
    again, _ = tok("héllo world")
    assert torch.equal(again[0], ids[0])
    long_ids, long_mask = tok("x" * 100)
    assert long_ids[0, -1].item() == 1 and long_mask.sum().item() == 16
    small = TextTokenizer.builtin(20, text_len=64)
    s_ids, _ = small("any text \u4e2d\u6587 with bytes > vocab")
    assert int(s_ids.max()) < 20 and int(s_ids.min()) >= 0


def test_encode_text_trims_to_real_tokens():
    cfg = TINY.t5
    torch.manual_seed(0)
    enc = T5Encoder(cfg).eval()
    tok = TextTokenizer.builtin(cfg.vocab_size, text_len=cfg.text_len)
    out = encode_text(enc, tok, "a person talks")
    n = len("a person talks") + 1  # bytes + EOS
    assert out.shape == (n, cfg.dim)
    ids, mask = tok("a person talks")
    assert ids[0, n - 1].item() == tok.eos_id
    with torch.no_grad():
        full = enc(ids, mask)[0, :n]
        unpadded = enc(ids[:, :n], torch.ones(1, n, dtype=torch.long))[0]
    assert torch.equal(out, unpadded)
    # Pad keys are masked out, so the official padded 512-token pass gives the same real-token outputs.
    torch.testing.assert_close(out, full, rtol=0, atol=1e-5)


def test_a_long_prompt_is_truncated_with_a_warning():
    """A prompt longer than the encoder's 512 tokens is cut (as the official tokenizer does) and the
    session says so; it is neither an error nor a crash."""
    import torch

    from liveavatar import Pipeline
    from liveavatar.engine.conditioning import encode_conditioning

    pipe = Pipeline.tiny(seed=0)
    prompt = "a person talking " * 100  # 1,700 bytes: 1,701 tokens with the built-in byte tokenizer
    assert pipe.tokenizer.num_tokens(prompt) > 512 >= pipe.tokenizer.num_tokens("a person talking")
    cond = encode_conditioning(pipe, torch.zeros(3, 128, 128), prompt)
    assert cond.warnings and "reads the first 512" in cond.warnings[0]
    assert torch.isfinite(cond.text).all() and cond.text.shape[1] == 512
    assert encode_conditioning(pipe, torch.zeros(3, 128, 128), "a person talking").warnings == ()
