"""liveavatar: streaming, real-time, infinite-length audio-driven avatar video (Live Avatar / Wan2.2-S2V).

The package is layered; lower layers never import higher ones:
- `models/`: the networks and their math (DiT, VAE, text and audio encoders, RoPE, token layout);
- `runtime/`: how models sit in memory (KV caches and attention contexts, offload, FP8, the planner);
- `engine/`: stages (conditioning, denoise, decode), block tasks, the session and its scheduler;
- `io/`: media in and out, checkpoints and their verification;
- `cli.py` on top. `Pipeline`, `GenerationOptions` and `Session` are importable from here.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("Pipeline",):
        from liveavatar.engine.pipeline import Pipeline

        return Pipeline
    if name in ("GenerationOptions", "Session", "Chunk", "Inputs"):
        from liveavatar.engine import session

        return getattr(session, name)
    raise AttributeError(f"module 'liveavatar' has no attribute {name!r}")
