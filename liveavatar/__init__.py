"""liveavatar: streaming, real-time, infinite-length audio-driven avatar video (Live Avatar)."""

__version__ = "0.1.0"
