"""The web layer of `liveavatar serve` (FastAPI): validate, forward to the engine, stream back.

Routes (the protocol is in docs/serving.md):
- `POST /sessions` (multipart: `image`, `prompt`, `options` JSON): queue a live session -> its id and URLs;
- `GET /sessions/{id}`, `DELETE /sessions/{id}`: its status; close it (its caches are freed at once);
- `WS /sessions/{id}/ws`: speech in (binary PCM frames; `{"type": "end"}`, `{"type": "barge_in"}`,
  `{"type": "close"}`), video out (binary fragmented-MP4 segments, the init segment first) and
  JSON events (`queued`, `started`, `block`, `closed`, `error`);
- `GET /sessions/{id}/stream`: the same fragmented MP4 as a chunked HTTP stream;
- `POST /sessions/{id}/speech`: a whole speech file as one utterance; `POST /sessions/{id}/control`;
- `GET /health`, `GET /metrics` (Prometheus text), `GET /` (the page).

FastAPI is an optional dependency (`pip install 'liveavatar[server]'`): import this module only to serve.
Nothing a client sends reaches the model unchecked: bad requests get a 4xx with a JSON error
`{"error": "..."}`, and a session only ever sees its own data. With a token (`--token`), every
request needs `Authorization: Bearer <token>` (or `?token=` where a browser cannot set headers).
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from liveavatar.engine.session import GenerationOptions, check_options
from liveavatar.errors import UserError
from liveavatar.io import media
from liveavatar.serve.engine import LiveEngine, SessionOptions

PAGE = Path(__file__).parent / "page.html"
MAX_IMAGE_BYTES = 20 * 2**20
MAX_SPEECH_BYTES = 200 * 2**20
MAX_PCM_FRAME = 16000 * 60 * 4  # bytes in one WebSocket speech frame (a minute of float32)
OPTION_FIELDS = {"size": str, "seed": int, "sample_steps": int, "audio_encoding": str, "audio_window": list,
                 "one_pass_max_seconds": float}
# Live speech is encoded in windows: a block starts once its audio and 1 s of look-ahead are in.
# (`auto` and `one_pass` wait for the end of each utterance up to 60 s, as a file would be encoded.)
LIVE_AUDIO_ENCODING = "windowed"
SESSION_FIELDS = {"wait_for_speech": bool, "max_seconds": float}
PCM_FORMATS = {"s16le": (np.int16, 32768.0), "f32le": (np.float32, 1.0)}


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_options(text: str | None, default_area: int | None = None
                  ) -> tuple[GenerationOptions, str, SessionOptions]:
    """The `options` form field (JSON object) -> (generation options, PCM format, session options);
    without a size, sessions get `default_area` (the server's)."""
    try:
        raw = json.loads(text) if text else {}
    except ValueError as exc:
        raise HTTPError(400, f"options is not valid JSON ({exc}); send an object such as {{\"size\": \"704*384\"}}"
                        ) from None
    if not isinstance(raw, dict):
        raise HTTPError(400, "options must be a JSON object")
    pcm = raw.pop("pcm", "s16le")
    if pcm not in PCM_FORMATS:
        raise HTTPError(400, f"pcm {pcm!r} is not one of {', '.join(PCM_FORMATS)}")
    rate = raw.pop("sample_rate", media.SAMPLE_RATE)
    if rate != media.SAMPLE_RATE or isinstance(rate, bool):
        raise HTTPError(400, f"sample_rate {rate!r}: speech frames must be {media.SAMPLE_RATE} Hz mono PCM; "
                             "resample before sending")
    kwargs, session = {}, {}
    fields = {**OPTION_FIELDS, **SESSION_FIELDS}
    for key, value in raw.items():
        if key not in fields:
            raise HTTPError(400, f"unknown option {key!r}; known: {', '.join(sorted(fields))}, pcm, sample_rate")
        kind = fields[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise HTTPError(400, f"option {key} must be a {'boolean' if kind is bool else kind.__name__}")
        (session if key in SESSION_FIELDS else kwargs)[key] = value
    try:
        kwargs.setdefault("audio_encoding", LIVE_AUDIO_ENCODING)
        if "size" in kwargs:
            kwargs["size"] = media.parse_size(kwargs["size"])
        elif default_area is not None:
            kwargs["size"] = default_area
        if "audio_window" in kwargs:
            kwargs["audio_window"] = tuple(float(x) for x in kwargs["audio_window"])
        opts = GenerationOptions(**kwargs)
        check_options(opts)
    except (UserError, ValueError, TypeError) as exc:
        raise HTTPError(400, " ".join(str(exc).split())) from None
    max_seconds = session.get("max_seconds")
    if max_seconds is not None and not (0 < max_seconds < float("inf")):
        raise HTTPError(400, f"option max_seconds {max_seconds} must be a positive number of seconds")
    return opts, pcm, SessionOptions(**session)


def pcm_samples(data: bytes, pcm: str) -> np.ndarray:
    """Binary PCM (16 kHz mono) -> float32 samples; HTTPError(400) when malformed."""
    dtype, scale = PCM_FORMATS[pcm]
    size = np.dtype(dtype).itemsize
    if len(data) % size:
        raise HTTPError(400, f"a {pcm} frame must hold whole {size}-byte samples, got {len(data)} bytes")
    if len(data) > MAX_PCM_FRAME:
        raise HTTPError(413, f"a speech frame of {len(data)} bytes is too large; send at most {MAX_PCM_FRAME}")
    x = np.frombuffer(data, dtype=dtype).astype(np.float32) / scale
    if not np.all(np.isfinite(x)):
        raise HTTPError(400, "speech samples must be finite")
    return x


def create_app(engine: LiveEngine, token: str | None = None) -> FastAPI:
    app = FastAPI(title="liveavatar", docs_url=None, redoc_url=None)
    pcm_of: dict[str, str] = {}

    @app.exception_handler(HTTPError)
    async def http_error(request, exc: HTTPError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(UserError)
    async def user_error(request, exc: UserError):
        return JSONResponse({"error": " ".join(str(exc).split())}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def not_found(request, exc: StarletteHTTPException):
        messages = {404: f"no route {request.url.path!r}; see docs/serving.md",
                    405: f"{request.method} is not allowed on {request.url.path!r}"}
        return JSONResponse({"error": messages.get(exc.status_code, str(exc.detail))}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def unprocessable(request, exc):
        detail = getattr(exc, "errors", lambda: [])()
        what = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg')}" for e in detail) or str(exc)
        return JSONResponse({"error": f"malformed request ({what})"}, status_code=422)

    @app.middleware("http")
    async def check_token(request: Request, call_next):
        if token is not None and not _authorized(request.headers, request.query_params, token):
            return JSONResponse({"error": "missing or wrong token; send Authorization: Bearer <token>"},
                                status_code=401)
        return await call_next(request)

    def session_or_404(session_id: str):
        s = engine.get(session_id)
        if s is None:
            raise HTTPError(404, f"no session {session_id!r} (closed, expired or never created)")
        return s

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text())

    @app.get("/example/{name}")
    async def example(name: str):
        """The bundled example face and speech (the page's demo)."""
        files = {"face.png": media.example_image_path(), "speech.wav": media.example_audio_path()}
        if name not in files:
            raise HTTPError(404, f"no example {name!r}; there are {', '.join(files)}")
        return FileResponse(files[name])

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": len(engine.active), "queued": len(engine.queue),
                "max_active": engine.limits.max_active, "max_area": engine.limits.max_area,
                "preset": engine.pipe.preset.name}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(prometheus_text(engine), media_type="text/plain; version=0.0.4")

    @app.post("/sessions", status_code=201)
    async def create(image: UploadFile = File(...), prompt: str = Form(""), options: str = Form("")):  # noqa: B008
        opts, pcm, session_options = parse_options(options, engine.limits.max_area)
        data = await image.read(MAX_IMAGE_BYTES + 1)
        if len(data) > MAX_IMAGE_BYTES:
            raise HTTPError(413, f"the image is larger than {MAX_IMAGE_BYTES // 2**20} MiB; send a smaller one")
        if len(prompt) > 20000:
            raise HTTPError(413, "the prompt is longer than 20,000 characters")
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "image")
            Path(path).write_bytes(data)
            s = await asyncio.to_thread(engine.create, path, prompt, opts, session_options)
        pcm_of[s.id] = pcm
        return {**s.status(), "ws": f"/sessions/{s.id}/ws", "stream": f"/sessions/{s.id}/stream"}

    @app.get("/sessions/{session_id}")
    async def status(session_id: str):
        s = session_or_404(session_id)
        s.touch()
        return s.status()

    @app.delete("/sessions/{session_id}")
    async def delete(session_id: str):
        s = session_or_404(session_id)
        s.close("closed by the client")
        return {"id": s.id, "state": "closed"}

    @app.post("/sessions/{session_id}/control")
    async def control(session_id: str, request: Request):
        s = session_or_404(session_id)
        try:
            msg = json.loads(await request.body())
        except ValueError:
            raise HTTPError(400, "the body must be JSON such as {\"type\": \"barge_in\"}") from None
        _control(s, msg)
        return s.status()

    @app.post("/sessions/{session_id}/speech", status_code=202)
    async def speech(session_id: str, audio: UploadFile = File(...)):  # noqa: B008
        s = session_or_404(session_id)
        data = await audio.read(MAX_SPEECH_BYTES + 1)
        if len(data) > MAX_SPEECH_BYTES:
            raise HTTPError(413, f"the speech file is larger than {MAX_SPEECH_BYTES // 2**20} MiB")
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "speech" + Path(audio.filename or "").suffix[:8])
            Path(path).write_bytes(data)
            wave = await asyncio.to_thread(media.load_audio, path)
        s.push(wave)
        s.end_utterance()
        return {"id": s.id, "samples": len(wave)}

    @app.get("/sessions/{session_id}/stream")
    async def stream(session_id: str):
        s = session_or_404(session_id)
        queue, callback = _subscription()
        s.subscribe(callback)

        async def body():
            try:
                while True:
                    item = await queue.get()
                    if isinstance(item, bytes):
                        yield item
                    elif item.get("type") == "closed":
                        return
            finally:
                s.unsubscribe(callback)

        return StreamingResponse(body(), media_type="video/mp4")

    @app.websocket("/sessions/{session_id}/ws")
    async def ws(websocket: WebSocket, session_id: str):
        if token is not None and not _authorized(websocket.headers, websocket.query_params, token):
            await websocket.close(code=4401, reason="missing or wrong token")
            return
        s = engine.get(session_id)
        if s is None:
            await websocket.close(code=4404, reason=f"no session {session_id!r}")
            return
        await websocket.accept()
        queue, callback = _subscription()
        s.subscribe(callback)
        position = s.position
        if position is not None:
            await websocket.send_json({"type": "queued", "position": position})

        async def outgoing():
            while True:
                item = await queue.get()
                if isinstance(item, bytes):
                    await websocket.send_bytes(item)
                else:
                    await websocket.send_json(item)
                    if item.get("type") == "closed":
                        return

        sender = asyncio.create_task(outgoing())
        try:
            while True:
                msg = await websocket.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                try:
                    if msg.get("bytes") is not None:
                        s.push(pcm_samples(msg["bytes"], pcm_of.get(s.id, "s16le")))
                    elif msg.get("text") is not None:
                        try:
                            data = json.loads(msg["text"])
                        except ValueError:
                            raise HTTPError(400, "text messages must be JSON such as {\"type\": \"end\"}") from None
                        if _control(s, data) == "close":
                            break
                except (HTTPError, UserError) as exc:
                    await websocket.send_json({"type": "error", "error": " ".join(str(exc).split())})
        except WebSocketDisconnect:
            pass
        finally:
            s.unsubscribe(callback)
            s.close("the client disconnected")  # its caches are freed at once
            sender.cancel()
            pcm_of.pop(s.id, None)

    return app


def _control(s, msg) -> str:
    if not isinstance(msg, dict) or msg.get("type") not in ("end", "barge_in", "close", "ping"):
        raise HTTPError(400, "a control message is {\"type\": \"end\" | \"barge_in\" | \"close\" | \"ping\"}")
    kind = msg["type"]
    if kind == "end":
        s.end_utterance()
    elif kind == "barge_in":
        s.barge_in()
    elif kind == "close":
        s.close("closed by the client")
    else:
        s.touch()
    return kind


def _subscription():
    """An asyncio queue fed from the engine thread."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def callback(item):
        loop.call_soon_threadsafe(queue.put_nowait, item)

    return queue, callback


def _authorized(headers, query, token: str) -> bool:
    import hmac

    given = headers.get("authorization", "").removeprefix("Bearer ").strip() or query.get("token", "")
    return hmac.compare_digest(given.encode(), token.encode())


def prometheus_text(engine: LiveEngine) -> str:
    m = engine.metrics
    recent = list(m.block_seconds)
    rate = len(recent) / sum(recent) if recent and sum(recent) > 0 else 0.0
    ttff = m.first_frame_seconds
    cache_bytes, holders = m.cache_bytes()
    lines = [
        "# HELP liveavatar_sessions Sessions by state.", "# TYPE liveavatar_sessions gauge",
        f'liveavatar_sessions{{state="active"}} {len(engine.active)}',
        f'liveavatar_sessions{{state="queued"}} {len(engine.queue)}',
        "# TYPE liveavatar_sessions_created_total counter", f"liveavatar_sessions_created_total {m.sessions_created}",
        "# TYPE liveavatar_sessions_closed_total counter", f"liveavatar_sessions_closed_total {m.sessions_closed}",
        "# TYPE liveavatar_blocks_total counter", f"liveavatar_blocks_total {m.blocks}",
        "# TYPE liveavatar_frames_total counter", f"liveavatar_frames_total {m.frames}",
        "# HELP liveavatar_blocks_per_second Blocks per second of engine time over the last 256 blocks.",
        "# TYPE liveavatar_blocks_per_second gauge", f"liveavatar_blocks_per_second {rate:.4f}",
        "# HELP liveavatar_time_to_first_frame_seconds From session creation to its first frame.",
        "# TYPE liveavatar_time_to_first_frame_seconds summary",
        f"liveavatar_time_to_first_frame_seconds_count {len(ttff)}",
        f"liveavatar_time_to_first_frame_seconds_sum {sum(ttff):.4f}",
        "# TYPE liveavatar_resident_memory_bytes gauge", f"liveavatar_resident_memory_bytes {_rss()}",
        "# HELP liveavatar_session_cache_bytes Bytes of session caches (KV rings, sink, decoder state, conditioning)"
        " still allocated, closed sessions included until freed.",
        "# TYPE liveavatar_session_cache_bytes gauge", f"liveavatar_session_cache_bytes {cache_bytes}",
        "# HELP liveavatar_sessions_holding_caches Sessions with cache memory still allocated.",
        "# TYPE liveavatar_sessions_holding_caches gauge", f"liveavatar_sessions_holding_caches {holders}",
    ]
    try:
        import torch

        if torch.cuda.is_available():
            lines += ["# TYPE liveavatar_gpu_memory_allocated_bytes gauge",
                      f"liveavatar_gpu_memory_allocated_bytes {torch.cuda.memory_allocated()}"]
    except Exception:
        pass
    return "\n".join(lines) + "\n"


def _rss() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def serve(engine: LiveEngine, host: str, port: int, token: str | None) -> None:
    """Run the server until interrupted."""
    import uvicorn

    app = create_app(engine, token)
    engine.start()
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        engine.stop()


__all__ = ["create_app", "parse_options", "pcm_samples", "prometheus_text", "serve"]
