"""The serving engine: one thread that owns the model and runs the live sessions of many clients.

Clients create sessions (a reference image, a prompt, options); each session waits in a queue until
one of the `max_active` places is free, then gets its caches, encodes its conditioning and runs as a
live session (`liveavatar.engine.live`): speech pushed as utterances, idle motion between them,
barge-in. The engine thread interleaves the active sessions block by block, keeps each at most
`max_lead` seconds of video ahead of real time (a live stream is played as it is made), and turns
every block into a fragment of the session's fragmented MP4, which goes to every subscriber (the
WebSocket, the HTTP stream) as it is made. The web layer (`liveavatar.serve.app`) only validates,
forwards and streams; everything that touches the model happens here.

Sessions end when the client closes them or disconnects (their caches are freed at once, by the
engine thread), after `max_seconds` of video, or after `idle_timeout` seconds without a message
from the client.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from liveavatar.engine.session import GenerationOptions, Inputs, Session
from liveavatar.errors import UserError
from liveavatar.io import media
from liveavatar.io.mp4 import MP4Writer


@dataclass
class Limits:
    max_active: int = 2  # sessions generating at once
    max_queued: int = 64  # sessions waiting for a place
    max_seconds: float = 3600.0  # video a session may generate
    idle_timeout: float = 300.0  # seconds without a client message before a session is closed
    max_lead: float = 1.0  # seconds of video a session may run ahead of real time
    max_area: int = 704 * 384  # largest video area (width x height) a session may ask for


@dataclass
class Metrics:
    sessions_created: int = 0
    sessions_closed: int = 0
    blocks: int = 0
    frames: int = 0
    first_frame_seconds: list[float] = field(default_factory=list)  # per session, from creation
    block_seconds: collections.deque = field(default_factory=lambda: collections.deque(maxlen=256))
    # Weak references to every cache tensor of the sessions started: a tensor counts until it is freed,
    # so a session whose caches outlive its close (a leak) shows here.
    caches: dict[str, list[weakref.ref]] = field(default_factory=dict)

    def track(self, sid: str, session) -> None:
        """Add the tensors `session` holds now (called when it starts and after each block)."""
        refs = self.caches.setdefault(sid, [])
        known = {id(t) for t in (r() for r in refs) if t is not None}
        refs.extend(weakref.ref(t) for t in session_tensors(session) if id(t) not in known)

    def cache_bytes(self) -> tuple[int, int]:
        """(bytes of session caches still allocated, sessions holding some); drops the freed ones."""
        total, holders = 0, 0
        for sid, refs in list(self.caches.items()):
            alive = [t for t in (r() for r in refs) if t is not None]
            if not alive:
                del self.caches[sid]
                continue
            holders += 1
            total += sum(_storage_bytes(alive))
        return total, holders


def _storage_bytes(tensors) -> list[int]:
    seen, sizes = set(), []
    for t in tensors:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            sizes.append(storage.nbytes())
    return sizes


def session_tensors(session) -> list[torch.Tensor]:
    """The tensors a session owns: its denoise stages' caches, its decoder state, its conditioning
    (found by walking the objects it holds, never into a model's weights)."""
    found: dict[int, torch.Tensor] = {}
    seen: set[int] = set()
    stack = [(part, 0) for part in (session.denoise, session.decode, session.cond)]
    while stack:  # a loop, not a recursive closure: a closure would keep `found` alive in a cycle
        obj, depth = stack.pop()
        if depth > 6 or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found[id(obj)] = obj
        elif isinstance(obj, torch.nn.Module):
            continue  # weights are the server's, not the session's
        elif isinstance(obj, dict):
            stack.extend((v, depth + 1) for v in obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend((v, depth + 1) for v in obj)
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("liveavatar."):
            stack.extend((v, depth + 1) for k, v in vars(obj).items()
                         if k not in ("pipe", "model", "vae", "dit", "frontend"))
    return list(found.values())


@dataclass
class SessionOptions:
    """What a client chooses about its session besides the generation options."""
    wait_for_speech: bool = False  # no frame before the first speech (the first utterance starts at frame 0)
    max_seconds: float | None = None  # video this session may make (at most the server's limit)


class ServedSession:
    """A client's session as the server sees it; its fields are read by the web layer."""

    def __init__(self, engine: LiveEngine, inputs: Inputs, prompt: str, opts: GenerationOptions,
                 options: SessionOptions | None = None):
        self.id = uuid.uuid4().hex
        self.engine, self.inputs, self.prompt, self.opts = engine, inputs, prompt, opts
        self.options = options or SessionOptions()
        self.heard = False  # speech has arrived
        self.state = "queued"  # queued -> starting (conditioning encoded) -> active -> closed
        self.created = time.monotonic()
        self.last_seen = self.created
        self.started: float | None = None  # when its first frame left
        self.session: Session | None = None
        self.writer: MP4Writer | None = None
        self.subscribers: list[Callable[[object], None]] = []  # each gets bytes (fragments) and dicts (events)
        self.init_segment: bytes | None = None
        self.frames = 0
        self.blocks = 0
        self.error: str | None = None
        self.pending: list[tuple[str, object]] = []  # speech and controls that arrived before activation
        self.lock = threading.Lock()

    @property
    def video_seconds(self) -> float:
        return self.frames / 25.0

    @property
    def max_seconds(self) -> float:
        mine = self.options.max_seconds
        return self.engine.limits.max_seconds if mine is None else min(mine, self.engine.limits.max_seconds)

    @property
    def position(self) -> int | None:
        """1-based place in the queue while queued."""
        return self.engine.queue_position(self)

    def status(self) -> dict:
        return {"id": self.id, "state": self.state, "position": self.position, "frames": self.frames,
                "blocks": self.blocks, "width": self.inputs.width, "height": self.inputs.height,
                "mime": self.writer.mime if self.writer is not None else None, "error": self.error}

    # -- from the web layer (any thread) ------------------------------------------------------------

    def touch(self) -> None:
        self.last_seen = time.monotonic()

    def _forward(self, kind: str, value=None):
        with self.lock:
            if self.state == "closed":
                raise UserError(f"session {self.id} is closed")
            if self.session is None:
                self.pending.append((kind, value))
                return None
            session = self.session
        self._apply(session, kind, value)
        self.engine.wake()
        return None

    def _apply(self, session: Session, kind: str, value) -> None:
        """Hand one client message (speech samples, end of utterance, barge-in) to the running session."""
        if kind == "speech":
            self.heard = True
            session.push_audio(value)
        elif kind == "end":
            session.end_audio()
        else:
            session.barge_in()

    def push(self, samples: np.ndarray) -> None:
        self.touch()
        self._forward("speech", samples)

    def end_utterance(self) -> None:
        self.touch()
        self._forward("end")

    def barge_in(self) -> None:
        """Drop the speech playing and queued at once."""
        self.touch()
        with self.lock:
            self.pending = [p for p in self.pending if p[0] not in ("speech", "end")]
        self._forward("barge_in")

    def subscribe(self, callback: Callable[[object], None]) -> None:
        """`callback` gets every fragment (bytes, the init segment first) and event (dict) from now on."""
        with self.lock:
            self.subscribers.append(callback)
            if self.init_segment is not None:
                callback(self.init_segment)

    def unsubscribe(self, callback) -> None:
        with self.lock:
            if callback in self.subscribers:
                self.subscribers.remove(callback)

    def close(self, reason: str = "closed by the client") -> None:
        self.engine.close(self, reason)

    # -- from the engine thread ---------------------------------------------------------------------

    def _send(self, item) -> None:
        with self.lock:
            subscribers = list(self.subscribers)
        for callback in subscribers:
            callback(item)


class LiveEngine:
    def __init__(self, pipe, limits: Limits | None = None):
        self.pipe, self.limits = pipe, limits or Limits()
        self.sessions: dict[str, ServedSession] = {}
        self.queue: collections.deque[ServedSession] = collections.deque()
        self.active: list[ServedSession] = []
        self.metrics = Metrics()
        self._cond = threading.Condition()
        self._closing: list[tuple[ServedSession, str]] = []
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="liveavatar-engine", daemon=True)

    def start(self) -> LiveEngine:
        self.thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self.thread.join(timeout=30)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- sessions -----------------------------------------------------------------------------------

    def create(self, image: str, prompt: str, opts: GenerationOptions,
               options: SessionOptions | None = None) -> ServedSession:
        """Check the inputs (UserError when bad) and queue a session."""
        if opts.size > self.limits.max_area:
            raise UserError(f"size area {opts.size} is larger than this server's {self.limits.max_area}; ask for a "
                            "smaller size")
        options = options or SessionOptions()
        if options.max_seconds is not None and not (0 < options.max_seconds < float("inf")):
            raise UserError(f"max_seconds {options.max_seconds} must be a positive number of seconds")
        inputs = Inputs.load(image, None, opts)
        with self._cond:
            if len(self.queue) >= self.limits.max_queued:
                raise UserError(f"the server is full ({len(self.queue)} sessions waiting); try again later")
            s = ServedSession(self, inputs, prompt, opts, options)
            self.sessions[s.id] = s
            self.queue.append(s)
            self.metrics.sessions_created += 1
            self._cond.notify_all()
        return s

    def get(self, session_id: str) -> ServedSession | None:
        return self.sessions.get(session_id)

    def queue_position(self, s: ServedSession) -> int | None:
        with self._cond:
            for i, q in enumerate(self.queue):
                if q is s:
                    return i + 1
        return None

    def close(self, s: ServedSession, reason: str) -> None:
        """Close a session: its caches are freed by the engine thread at once (a queued one right here)."""
        with self._cond:
            if s.state == "closed":
                return
            if s in self.queue:
                self.queue.remove(s)
                self._finish(s, reason)
            else:
                self._closing.append((s, reason))
            self._cond.notify_all()

    def _finish(self, s: ServedSession, reason: str) -> None:
        with s.lock:
            s.state = "closed"
            session, s.session = s.session, None
        if session is not None:
            session.close()
        if s.writer is not None:
            s.writer.abort()
            s.writer = None
        s._send({"type": "closed", "reason": reason})
        self.sessions.pop(s.id, None)
        if s in self.active:
            self.active.remove(s)
        self.metrics.sessions_closed += 1
        for q in self.queue:  # everyone behind moved up
            q._send({"type": "queued", "position": self.queue_position(q)})

    # -- the engine thread --------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                if self._stop:
                    break
                closing, self._closing = self._closing, []
            for s, reason in closing:
                self._finish(s, reason)
            self._expire()
            self._activate()
            worked = False
            for s in list(self.active):
                worked |= self._step(s)
            if not worked:
                with self._cond:
                    if not self._closing and not self._stop:
                        self._cond.wait(timeout=self._sleep())
        for s in list(self.active) + list(self.queue):
            self._finish(s, "the server stopped")

    def _sleep(self) -> float:
        """How long nothing needs doing: until the first paced session may run again (at most 0.5 s)."""
        now, wait = time.monotonic(), 0.5
        for s in self.active:
            if s.started is not None:
                wait = min(wait, max(0.01, s.started + s.video_seconds - self.limits.max_lead - now))
        return wait

    def _expire(self) -> None:
        now = time.monotonic()
        for s in list(self.active) + list(self.queue):
            if now - s.last_seen > self.limits.idle_timeout:
                self.close(s, f"no message from the client for {self.limits.idle_timeout:g} s")
            elif s.video_seconds >= s.max_seconds:
                self.close(s, f"the session reached its {s.max_seconds:g} s limit")
        with self._cond:
            closing, self._closing = self._closing, []
        for s, reason in closing:
            self._finish(s, reason)

    def _activate(self) -> None:
        while True:
            with self._cond:
                if len(self.active) >= self.limits.max_active or not self.queue:
                    return
                s = self.queue.popleft()
                s.state = "starting"
                self.active.append(s)
            for q in self.queue:
                q._send({"type": "queued", "position": self.queue_position(q)})
            try:
                session = self.pipe.live_session(s.inputs, s.prompt, s.opts)
            except Exception as exc:  # a session that cannot start fails alone
                s.error = " ".join(str(exc).split())
                self._finish(s, f"could not start: {s.error}")
                continue
            s.writer = MP4Writer(self._sink(s), width=s.inputs.width, height=s.inputs.height, fps=self.pipe.preset.fps,
                                 audio=True, sample_rate=media.SAMPLE_RATE)
            self.metrics.track(s.id, session)
            with s.lock:
                s.session, s.state = session, "active"
                pending, s.pending = s.pending, []
            for kind, value in pending:
                s._apply(session, kind, value)
            s._send({"type": "started", "mime": s.writer.mime, "width": s.inputs.width, "height": s.inputs.height})

    def _sink(self, s: ServedSession):
        def emit(data: bytes) -> None:
            if s.init_segment is None:
                s.init_segment = data  # the first fragment carries the init segment: late subscribers get it
            s._send(data)
        return emit

    def _step(self, s: ServedSession) -> bool:
        """At most one block of `s`; whether one was made."""
        if s.started is not None and s.video_seconds > time.monotonic() - s.started + self.limits.max_lead:
            return False  # far enough ahead of real time
        if s.options.wait_for_speech and not s.heard:
            return False
        if s.video_seconds >= s.max_seconds:
            return False  # closed at the next pass
        t0 = time.monotonic()
        try:
            chunk = s.session.step()
        except Exception as exc:  # one session's failure never stops the others
            s.error = " ".join(str(exc).split())
            self.close(s, f"failed: {s.error}")
            return False
        if chunk is None:
            return False
        s.writer.write(chunk.frames, chunk.audio)
        if s.started is None:
            s.started = time.monotonic() - chunk.frame_start / 25.0
            self.metrics.first_frame_seconds.append(time.monotonic() - s.created)
        if s.blocks < 4:  # the decoder's state and the rings are complete after the first blocks
            self.metrics.track(s.id, s.session)
        s.frames += len(chunk.frames)
        s.blocks += 1
        self.metrics.blocks += 1
        self.metrics.frames += len(chunk.frames)
        self.metrics.block_seconds.append(time.monotonic() - t0)
        s._send({"type": "block", "index": chunk.index, "frames": len(chunk.frames), "frame_start": chunk.frame_start,
                 "speaking": s.session.frontend.block_speaks(chunk.index),
                 "speech_queued": s.session.frontend.speaking})
        return True


__all__ = ["Limits", "LiveEngine", "Metrics", "ServedSession"]


PER_SESSION = ("kv.ring_caches", "kv.host_ring_slots", "kv.staging", "kv.sink", "vae.stream_state")
MAX_AUTO_ACTIVE = 8


def auto_max_active(pipe, height: int, width: int) -> tuple[int, str]:
    """How many sessions at `height`x`width` may generate at once on `pipe`'s device, and the reason,
    for the startup line and /health: as many as fit in memory (`max_active_for`), and on a GPU of the
    planner's table no more than keep real time by its speed model."""
    from liveavatar.runtime import memory

    if pipe.device.type == "cuda":
        from liveavatar.runtime.gpus import from_device

        total = torch.cuda.get_device_properties(pipe.device).total_memory
        budget = int(total * (1 - memory.FRAGMENTATION)) - memory.CUDA_CONTEXT_BYTES
        return max_active_for(pipe.preset, pipe.runtime, height, width, budget,
                              f"{total / 2**30:.1f} GiB GPU after weights and workspaces", from_device(pipe.device),
                              planned_shared=True)
    # measured now, with the weights already loaded
    return max_active_for(pipe.preset, pipe.runtime, height, width, _available_host_bytes() // 2,
                          "half the free host memory")


def max_active_for(preset, runtime, height: int, width: int, free: int, where: str, gpu=None,
                   planned_shared: bool = False) -> tuple[int, str]:
    """(K, why): sessions at `height`x`width` whose own memory (step caches, sink, decoder state) fits
    in `free` bytes (less the planner's weights and workspaces with `planned_shared`: a whole device's
    budget), at most MAX_AUTO_ACTIVE; with `gpu` (a GPUSpec of the planner's table) also at most as
    many as its speed model says keep real time: K sessions take turns, so each gets a block every
    K x (seconds per block), which must not exceed the seconds a block plays. One session is always
    allowed (and told when it is already slower than real time). A GPU the table does not know (its
    rates would be guesses) counts as no estimate."""
    from liveavatar.runtime import memory

    steady, setup = memory.components(preset, runtime, height, width)
    per = sum(steady.get(k, 0) for k in PER_SESSION)
    if planned_shared:
        free -= memory._peak(steady, setup)[0] - per
    k_mem = max(1, min(MAX_AUTO_ACTIVE, free // max(per, 1)))
    why = f"{per / 2**20:.1f} MiB of caches each, {max(free, 0) / 2**30:.2f} GiB for them ({where}) fit {k_mem}"
    if gpu is None or not gpu.known:
        off = "off a GPU" if gpu is None else f"for {gpu.name}, which the planner's table does not know"
        return k_mem, (f"{_sessions(k_mem)} at {width}x{height}: {why} (at most {MAX_AUTO_ACTIVE} by default; speed "
                       f"is not estimated {off}: keep K x seconds per block under the block's play time)")
    block = memory.seconds_per_block(preset, runtime, gpu, height, width)
    plays = preset.dit.frames_per_block * preset.vae.stride[0] / preset.fps  # 12 frames: 0.48 s at 25 fps
    k_speed = int(plays / block + 1e-9)
    k = max(1, min(k_mem, k_speed))
    pace = (f"the planner estimates {block:.2f} s a block on {gpu.name} (an estimate from data sheets) and a "
            f"block plays {plays:.2f} s, so {k_speed} keep real time" if k_speed else
            f"one session is already slower than real time on {gpu.name}: an estimated {block:.2f} s a block "
            f"for {plays:.2f} s of video (a smaller --size, or --max_lead large for offline use)")
    return k, f"{_sessions(k)} at {width}x{height}: {why}; {pace}"


def _sessions(k: int) -> str:
    return "1 session" if k == 1 else f"{k} sessions"


def _available_host_bytes() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30
