"""The umT5-XXL text encoder and its tokenizer, as Wan2.2-S2V conditions on a prompt.

`T5Encoder` is the encoder half of umT5 in Wan's own module naming, so
`models_t5_umt5-xxl-enc-bf16.pth` loads with `load_state_dict(assign=True)` and no key mapping:
token embedding, 24 pre-norm blocks (RMS norm without centering, multi-head attention *without*
1/sqrt(d) scaling whose bias is a per-layer bidirectional relative-position table of 32 buckets
plus `finfo.min` on pad keys, softmax in float32, and a gated-GELU(tanh) FFN
`fc2(fc1(x) * gelu_tanh(gate(x)))`), no biases anywhere, and a final RMS norm. Casts follow the
official module so that bf16 runs round where it rounds. `TextTokenizer` applies the official
prompt cleaning (ftfy, double HTML unescape, whitespace collapse) and pads/truncates to `text_len`
with `</s>` appended; it wraps the checkpoint's `google/umt5-xxl` tokenizer folder, or a
self-contained byte-level vocabulary for the `tiny` preset. `encode_text` trims the encoder output
to the true token count (EOS included), which is what the DiT receives.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from liveavatar.config import T5Config
from liveavatar.errors import UserError


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """Keep fp16 residuals finite (the official encoder does the same); other dtypes pass through."""
    if x.dtype == torch.float16 and torch.isinf(x).any():
        bound = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-bound, bound)
    return x


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation, written out op by op so low-precision dtypes round like the original."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def relative_position_bucket(lq: int, lk: int, num_buckets: int, max_dist: int,
                             device: torch.device | None = None) -> torch.Tensor:
    """Bidirectional T5 bucket of Δ = key − query: half the buckets per sign, exact below
    num_buckets/4, log-spaced up to max_dist, the last bucket beyond. Returns [lq, lk] int64."""
    rel = torch.arange(lk, device=device)[None, :] - torch.arange(lq, device=device)[:, None]
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    dist = rel.abs()
    exact = half // 2
    # Distances >= `exact` share log-spaced buckets; clamp(min=1) only keeps log() finite where the
    # exact branch is taken anyway.
    far = exact + (torch.log(dist.clamp(min=1).float() / exact) / math.log(max_dist / exact)
                   * (half - exact)).long()
    far = far.clamp(max=half - 1)
    return bucket + torch.where(dist < exact, dist, far)


class RMSNorm(nn.Module):
    """T5 layer norm: x / rms(x) · w, no centering, no bias; statistics in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.type_as(self.weight)
        return self.weight * x


class RelativePositionBias(nn.Module):
    """One layer's table of per-head biases, indexed by relative-position bucket."""

    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """buckets: [Lq, Lk] -> bias [1, N, Lq, Lk]."""
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class Attention(nn.Module):
    """Multi-head self-attention with an additive bias and no 1/sqrt(d) scaling."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim_attn // num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x: [B, L, D]; bias: [B or 1, N, L, L] (position bias + pad mask) -> [B, L, D]."""
        b, seq, _ = x.shape
        q = self.q(x).view(b, seq, self.num_heads, self.head_dim).transpose(1, 2)  # [B, N, L, d]
        k = self.k(x).view(b, seq, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, seq, self.num_heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) + bias  # [B, N, L, L]
        probs = torch.softmax(scores.float(), dim=-1).type_as(scores)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, seq, -1)
        return self.o(out)


class FeedForward(nn.Module):
    """Gated GELU: fc2(fc1(x) · gelu_tanh(gate(x))). `gate` is a Sequential so its key is `gate.0`."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * gelu_tanh(self.gate(x)))


class Block(nn.Module):
    """Pre-norm encoder block with its own relative-position table."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.eps)
        self.attn = Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = RMSNorm(cfg.dim, cfg.eps)
        self.ffn = FeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = RelativePositionBias(cfg.num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """x: [B, L, D]; buckets: [L, L]; keep: [B, L] bool (False = pad key) or None."""
        h = self.norm1(x)
        b, seq, _ = h.shape
        # The bias lives in the normed activations' dtype, like the official zeros-plus-table sum.
        bias = h.new_zeros(b, self.attn.num_heads, seq, seq)
        bias += self.pos_embedding(buckets)
        if keep is not None:
            bias = bias.masked_fill(~keep[:, None, None, :], torch.finfo(h.dtype).min)
        x = _clamp_fp16(x + self.attn(h, bias))
        return _clamp_fp16(x + self.ffn(self.norm2(x)))


class T5Encoder(nn.Module):
    """umT5 encoder. Module names equal the Wan checkpoint keys (see tests/fixtures/t5_umt5_xxl_encoder.json)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        if cfg.dim_attn % cfg.num_heads:
            raise ValueError(f"dim_attn {cfg.dim_attn} is not divisible by num_heads {cfg.num_heads}")
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids: [B, L] int64; mask: [B, L] (nonzero = real token) or None -> [B, L, dim]."""
        x = self.token_embedding(ids)
        seq = ids.shape[1]
        buckets = relative_position_bucket(seq, seq, self.cfg.num_buckets, self.cfg.max_dist, ids.device)
        keep = None if mask is None else mask != 0
        for block in self.blocks:
            x = block(x, buckets, keep)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------
# Tokenizer

BUILTIN_PAD, BUILTIN_EOS, BUILTIN_UNK, BUILTIN_BYTE0 = 0, 1, 2, 3


def clean_prompt(text: str) -> str:
    """The official 'whitespace' cleaning: fix mojibake, unescape HTML twice, collapse whitespace."""
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextTokenizer:
    """Prompt -> (ids [B, text_len] int64, mask [B, text_len] int64), `</s>` appended, pad id 0.

    Backed either by a Hugging Face tokenizer folder (`from_folder`) or by a byte-level vocabulary
    that needs no files (`builtin`): pad 0, eos 1, unk 2, then one id per UTF-8 byte (folded into
    the vocabulary when it has fewer than 259 entries).
    """

    def __init__(self, text_len: int, vocab_size: int, hf_tokenizer=None, name: str = "builtin"):
        self.text_len = text_len
        self.vocab_size = vocab_size
        self.name = name
        self._hf = hf_tokenizer

    @classmethod
    def from_folder(cls, path: str | Path, text_len: int = 512) -> TextTokenizer:
        """Load `<ckpt>/google/umt5-xxl` (or any tokenizer folder `AutoTokenizer` understands)."""
        folder = Path(path)
        expected = ("the umT5 tokenizer files (tokenizer.json or spiece.model, with tokenizer_config.json), "
                    "normally <checkpoint>/google/umt5-xxl")
        if not folder.is_dir():
            raise UserError(f"text tokenizer folder {folder} does not exist; point it at {expected}")
        if not any((folder / f).is_file() for f in ("tokenizer.json", "spiece.model", "tokenizer_config.json")):
            raise UserError(f"text tokenizer folder {folder} holds no tokenizer files; it must hold {expected}")
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(folder))
        except Exception as exc:  # any loader failure is reported the same way
            reason = " ".join(str(exc).split())[:300]
            raise UserError(f"text tokenizer folder {folder} could not be loaded ({type(exc).__name__}: "
                            f"{reason}); it must hold {expected}") from exc
        if tok.pad_token_id is None or tok.eos_token_id is None:
            raise UserError(f"text tokenizer in {folder} defines no pad or eos token; it must hold {expected}")
        return cls(text_len, len(tok), hf_tokenizer=tok, name=str(folder))

    @classmethod
    def builtin(cls, vocab_size: int, text_len: int = 512) -> TextTokenizer:
        """A deterministic byte-level tokenizer for the `tiny` preset (no files needed)."""
        if vocab_size <= BUILTIN_BYTE0:
            raise ValueError(f"builtin tokenizer needs vocab_size > {BUILTIN_BYTE0}, got {vocab_size}")
        return cls(text_len, vocab_size)

    @property
    def pad_id(self) -> int:
        return BUILTIN_PAD if self._hf is None else self._hf.pad_token_id

    @property
    def eos_id(self) -> int:
        return BUILTIN_EOS if self._hf is None else self._hf.eos_token_id

    def num_tokens(self, prompt: str) -> int:
        """Tokens of `prompt` with EOS, before truncation to `text_len` (longer prompts are cut)."""
        text = clean_prompt(prompt)
        if self._hf is not None:
            return len(self._hf(text, add_special_tokens=True, truncation=False)["input_ids"])
        return len(text.encode("utf-8")) + 1

    def __call__(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        texts = [clean_prompt(t) for t in texts]
        if self._hf is not None:
            enc = self._hf(texts, padding="max_length", truncation=True, max_length=self.text_len,
                           add_special_tokens=True, return_tensors="pt")
            return enc["input_ids"].long(), enc["attention_mask"].long()
        ids = torch.full((len(texts), self.text_len), BUILTIN_PAD, dtype=torch.long)
        mask = torch.zeros((len(texts), self.text_len), dtype=torch.long)
        span = self.vocab_size - BUILTIN_BYTE0
        for row, text in enumerate(texts):
            # Truncate the content so that EOS always fits, as T5 tokenizers do.
            toks = [BUILTIN_BYTE0 + b % span for b in text.encode("utf-8")][: self.text_len - 1]
            toks.append(BUILTIN_EOS)
            ids[row, : len(toks)] = torch.tensor(toks)
            mask[row, : len(toks)] = 1
        return ids, mask


@torch.no_grad()
def encode_text(encoder: T5Encoder, tokenizer: TextTokenizer, prompt: str) -> torch.Tensor:
    """Encode one prompt and keep its real tokens (EOS included): -> [L_true, dim] in the encoder dtype.

    Only the real tokens are run: padding keys are masked out in every layer, so the real tokens'
    outputs equal those of the official padded 512-token pass (up to summation order) at a fraction
    of the cost, which matters when the encoder runs on the CPU."""
    ids, mask = tokenizer(prompt)  # [1, text_len] each
    n = int(mask.sum())
    device = encoder.token_embedding.weight.device
    out = encoder(ids[:, :n].to(device), mask[:, :n].to(device))  # [1, n, dim]
    return out[0]


__all__ = ["T5Encoder", "TextTokenizer", "clean_prompt", "encode_text", "relative_position_bucket"]
