"""The conditioning stage: what every block of a session is conditioned on besides its noise.

- the prompt: umT5 encoder output, through the DiT's text embedding ([1, 512, D], computed once);
- the reference latent (the second latent of a 5-frame still clip of the reference image) and the
  motion latents (a 73-frame still clip: 19 latents), which the denoise stages prefill their sinks
  with;
- the audio feature stream (`liveavatar.engine.audio_features.AudioFeatures`), built here from the
  session's speech stream.

Encoders run where the pipeline places them (`Pipeline.run_encoder`); the results live on the
compute device, except the audio features, which stay in host memory until a block needs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from liveavatar.engine.audio_features import AudioFeatures, AudioWindows
from liveavatar.engine.speech import SpeechStream
from liveavatar.models.t5 import encode_text


@dataclass
class Conditioning:
    text: torch.Tensor  # [1, text_len, D] the prompt through T5 and the DiT's text embedding
    ref_latent: torch.Tensor  # [1, C, 1, h, w]
    motion_latents: torch.Tensor  # [1, C, T_m, h, w]
    warnings: tuple[str, ...] = ()  # what the user should know about the inputs (e.g. a truncated prompt)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"text": self.text, "ref_latent": self.ref_latent, "motion_latents": self.motion_latents}


def encode_conditioning(pipe, ref: torch.Tensor, prompt: str) -> Conditioning:
    """ref: [3, H, W] float in [-1, 1] (H, W multiples of 64) -> the session's `Conditioning`."""
    dev, dtype, cfg = pipe.device, pipe.dtype, pipe.preset.dit
    warnings = ()
    n = pipe.tokenizer.num_tokens(prompt)
    if n > pipe.tokenizer.text_len:
        warnings = (f"the prompt has {n} tokens; the text encoder reads the first {pipe.tokenizer.text_len} "
                    "and ignores the rest",)
    with torch.no_grad():
        ctx = pipe.run_encoder(pipe.text_encoder, lambda m: encode_text(m, pipe.tokenizer, prompt))
        text = pipe.dit.embed_text(ctx.to(dev))
        ref = ref.to(dev, dtype)
        # The reference latent is latent 1 of the image repeated over 5 frames, which are also the first 5
        # of the motion frames (the same image repeated): one encode gives both, bit-identical to two.
        if cfg.motion_frames >= 5:
            motion, ref5 = pipe.vae.encode_with_prefix(ref[None, :, None].expand(1, 3, cfg.motion_frames, -1, -1), 5)
        else:
            motion = pipe.vae.encode(ref[None, :, None].expand(1, 3, cfg.motion_frames, -1, -1))
            ref5 = pipe.vae.encode(ref[None, :, None].expand(1, 3, 5, -1, -1))
        ref_latent = ref5[:, :, 1:2]
    return Conditioning(text, ref_latent, motion, warnings)


def audio_features(pipe, speech: SpeechStream, mode: str, windows: AudioWindows,
                   one_pass_max_seconds: float) -> AudioFeatures:
    """The session's audio feature stream over `speech` (features in the DiT's dtype, host memory)."""
    return AudioFeatures(pipe.audio_encoder, speech, fps=pipe.preset.fps, dtype=pipe.dtype, mode=mode,
                         windows=windows, one_pass_max_seconds=one_pass_max_seconds,
                         run=lambda fn: pipe.run_encoder(pipe.audio_encoder, fn))


__all__ = ["Conditioning", "audio_features", "encode_conditioning"]
