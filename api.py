"""HTTP API: the avatar speaks typed text or an uploaded recording, streamed as multipart MJPEG.

    python api.py [--host 127.0.0.1] [--port 8000] [--avatar NAME]

Flags override `config.py` (`SYNCTALK_*` environment). Endpoints are listed in docs/api-reference.md and
in the OpenAPI page at /docs. `create_app(services)` builds the app around a `services.deps.Services`
(tests pass their own); without one, the lifespan builds it from the configuration and loads the default
avatar before the first request is served. Routes live in small routers (`page_router`, `speech_router`,
`system_router`); a new feature adds its own router to `ROUTERS` and uses the dependencies of
`services/deps.py` (the app-wide token check covers it automatically).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path as FilePath
from typing import Annotated, Any, TypeVar

import anyio
import numpy as np
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from config import REPO_ROOT, Settings
from config import settings as default_settings
from services.admission import RETRY_AFTER_S, calibrate_admission
from services.debug import DebugRecorder
from services.deps import DebugDep, ModelsDep, Services, ServicesDep, StatsDep, build_services, require_token
from services.errors import DOMAIN_ERRORS, APIError, domain_error
from services.generator import FeatureFeed, FrameGenerationService, FrameJob
from services.live import router as live_router
from services.models import (
    AvatarInfo,
    ModelService,
    limit_torch_threads,
    torch_threads,
)
from services.request_ids import REQUEST_ID_PATTERN, RequestIdInUse, RunningRequest, TooManyRequests
from services.streaming import MJPEG_END, MJPEG_MEDIA_TYPE, MJPEGResponse, mjpeg_part, paced_parts
from services.tts import (
    Piece,
    SynthesisCancelled,
    TextError,
    TTSBusy,
    TTSResult,
    TTSUnavailable,
    build_tts,
    estimate_speech_seconds,
)
from services.tts import check_text as tts_check_text
from services.uploads import AUDIO_EXTENSIONS, LIMIT_SETTING, decode_upload, read_upload
from services.webrtc import router as webrtc_router
from synctalk.audio import wav_bytes
from synctalk.fileio import remove_stale_temporaries
from synctalk.timing import SAMPLE_RATE
from synctalk.tts import Speech16kStream

log = logging.getLogger("api")

STATIC_DIR = FilePath(__file__).resolve().parent / "static"
STREAM_HEADERS = ["X-Frame-Count", "X-Audio-Duration", "X-FPS", "X-Avatar", "X-TTS-Engine", "X-Request-Id",
                  "X-Streamed"]
T = TypeVar("T")
_FEEDERS: set[asyncio.Task] = set()  # synthesis of streamed texts' later pieces (a reference until done)


# ---------------------------------------------------------------------------------------------
# Errors: always JSON {error, detail}


class ErrorBody(BaseModel):
    """Every error response."""

    error: str = Field(description="machine-readable code, e.g. `unknown_avatar`")
    detail: str = Field(description="human-readable explanation")


_DEFAULT_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                  405: "method_not_allowed", 408: "body_timeout", 411: "length_required", 413: "upload_too_large",
                  415: "unsupported_media_type", 422: "invalid_request", 503: "unavailable"}


def _error(status_code: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status_code, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """JSON errors for HTTP exceptions, validation failures and the services' domain errors."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "error", None) or _DEFAULT_CODES.get(exc.status_code, "error")
        return _error(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return _error(422, "invalid_request", detail)

    # the services' domain errors: exception class -> (HTTP status, error code); the message is the detail
    for exc_class, (status, code) in DOMAIN_ERRORS.items():
        async def domain_error(_: Request, exc: Exception, status: int = status, code: str = code) -> JSONResponse:
            return _error(status, code, str(exc))

        app.add_exception_handler(exc_class, domain_error)


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "bad input (empty or too long text, corrupt audio)"},
    404: {"model": ErrorBody, "description": "unknown avatar or voice"},
    409: {"model": ErrorBody, "description": "`request_id` belongs to a stream that is still running"},
    413: {"model": ErrorBody, "description": "the speech or audio would be longer than server.max_audio_seconds"},
    503: {"model": ErrorBody, "description": "no avatar available, TTS unavailable, or TTS busy (with Retry-After)"},
}
MJPEG_OK: dict[int | str, dict[str, Any]] = {200: {
    "content": {MJPEG_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    "description": "multipart MJPEG, one JPEG part per 40 ms of audio, paced in real time; headers "
                   "`X-Request-Id`, `X-Streamed`, `X-FPS`, `X-Avatar`, and `X-Frame-Count`, `X-Audio-Duration` (s) "
                   "when the whole audio is known before the first frame (`X-Streamed: 0`)",
}}


# ---------------------------------------------------------------------------------------------
# Reliability plumbing: body-read timeout, secrets out of the logs, paths out of the answers


class BodyTimeoutMiddleware:
    """408 when a request body stalls: each read of the body waits at most `timeout_s` (a slow but steady
    upload is fine; a client that stops sending is not). Reads after the body is complete (waiting for
    a disconnect during a stream) are never timed."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app, self.timeout_s = app, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                with anyio.fail_after(self.timeout_s):
                    message = await receive()
            except TimeoutError:
                raise APIError(408, "body_timeout", f"no request body data for {self.timeout_s:g} s "
                                                    "(server.body_timeout_s)") from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)


TOKEN_IN_TEXT = re.compile(r"(access_token=)[^&\s\"']*")


class RedactTokens(logging.Filter):
    """Replaces `access_token=<secret>` in a log record's message with `access_token=***` (uvicorn's
    access and WebSocket lines carry the query string verbatim)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact in place: the message and each string argument (uvicorn's access formatter unpacks the
        arguments, so their number and order stay)."""
        if isinstance(record.msg, str):
            record.msg = self.redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(self.redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: self.redact(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True

    @staticmethod
    def redact(text: str) -> str:
        """`text` with every `access_token=` value replaced by `***`."""
        return TOKEN_IN_TEXT.sub(r"\1***", text) if "access_token=" in text else text


def install_log_redaction() -> None:
    """Add `RedactTokens` to uvicorn's loggers (once; called at start-up, after uvicorn set up logging)."""
    for name in ("uvicorn.access", "uvicorn.error", "uvicorn"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())


ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/[^\s'\"(),;]+")


def public_path(path: str) -> str:
    """`path` relative to the project when inside it, else only its last component."""
    p = FilePath(path)
    try:
        return str(p.relative_to(REPO_ROOT))
    except ValueError:
        return f".../{p.name}"


def public_paths(value: Any) -> Any:
    """`value` (JSON-like) with every absolute filesystem path made project-relative or cut to its name."""
    if isinstance(value, dict):
        return {k: public_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public_paths(v) for v in value]
    if isinstance(value, str):
        return ABSOLUTE_PATH.sub(lambda m: public_path(m.group(0)), value)
    return value


STALE_TEMPORARY_S = 3600.0  # a temporary of a live process older than this is stale too


def clean_stale_temporaries(settings: Settings) -> int:
    """Remove temporaries left by killed exports and preprocessing (`.*.tmp<pid>*`) under the dataset
    and checkpoint roots: those of a process that is gone, or over an hour old (a live training run or
    export writing one now is left alone); returns how many."""
    removed = [p for root in (settings.paths.dataset_root, settings.paths.checkpoint_root)
               for p in remove_stale_temporaries(root, older_than_s=STALE_TEMPORARY_S)]
    for path in removed:
        log.info("removed stale temporary %s", path)
    return len(removed)


# ---------------------------------------------------------------------------------------------
# Shared steps of the routes


def check_text(text: str, max_chars: int) -> str:
    """The text to speak, stripped (`synctalk.tts.check_text`); 400 when empty or too long."""
    try:
        return tts_check_text(text, max_chars)
    except TextError as exc:
        raise APIError(400, exc.code, str(exc)) from None


def check_speech_length(text: str, max_seconds: float) -> None:
    """413 when `text` would take longer than `max_seconds` to speak, estimated from its length
    (`synctalk.tts.estimate_speech_seconds`) before any synthesis."""
    estimate = estimate_speech_seconds(text)
    if estimate > max_seconds:
        raise APIError(413, "audio_too_long", f"the text would take about {estimate:.0f} s to speak; the limit "
                                              f"({LIMIT_SETTING}) is {max_seconds:g} s")


async def check_voice(services: Services, voice: str | None) -> str | None:
    """`voice` if the TTS chain knows it (None = default voice); 404 otherwise."""
    if voice is None or voice == "":
        return None
    known = await anyio.to_thread.run_sync(services.tts.voices)
    if voice not in known:
        raise APIError(404, "unknown_voice", f"unknown voice {voice!r}; available: {', '.join(known)}")
    return voice


async def run_tts(call: Callable[[], T]) -> T:
    """A TTS call in a worker thread: 400 when nothing is speakable, 503 + Retry-After when every
    synthesis slot and queue place is taken, 499 when its requester went away (or cancelled it)."""
    try:
        return await anyio.to_thread.run_sync(call)
    except TTSBusy as exc:
        raise APIError(503, "tts_busy", str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from None
    except SynthesisCancelled as exc:
        log.info("synthesis stopped: %s", exc)
        raise APIError(499, "client_closed_request", str(exc)) from None
    except TTSUnavailable:
        raise
    except ValueError as exc:
        raise APIError(400, "bad_text", str(exc)) from None


def client_gone(request: Request) -> Callable[[], bool]:
    """Asked from a worker thread: whether `request`'s client has disconnected."""
    return lambda: anyio.from_thread.run(request.is_disconnected)


async def synthesize(services: Services, text: str, voice: str | None, request: Request | None = None) -> Any:
    """The whole text's speech (`FallbackTTS.synthesize`, cached by (text, voice)); stops (499) when
    `request`'s client disconnects while it waits or between text pieces."""
    cancelled = client_gone(request) if request is not None else None
    return await run_tts(partial(services.tts.synthesize, text, voice, cancelled))


def open_request(services: Services, request_id: str | None) -> RunningRequest:
    """Register a speech request under `request_id` (a new id when None): 409 when that id's stream is
    still running, 503 when the registry is full."""
    try:
        return services.requests.open(request_id)
    except RequestIdInUse as exc:
        raise APIError(409, "request_id_in_use", f"{exc}; use another request_id or cancel it first "
                                                 f"(DELETE /generate/{request_id})",
                       headers={"X-Request-Id": str(request_id)}) from None
    except TooManyRequests:
        raise busy(services) from None


def check_running(entry: RunningRequest) -> None:
    """499 when the request is over before its stream started (cancelled, or its client left)."""
    if entry.cancel.is_set():
        raise APIError(499, "client_closed_request", f"request {entry.request_id} ended before its stream started")


def with_request_id(exc: Exception, request_id: str) -> Exception:
    """`exc` as an HTTP error carrying `X-Request-Id` (domain errors become their `APIError`); other
    exceptions unchanged."""
    if isinstance(exc, StarletteHTTPException):
        exc.headers = {**(exc.headers or {}), "X-Request-Id": request_id}
        return exc
    mapped = domain_error(exc)
    if mapped is None:
        return exc
    return APIError(mapped[0], mapped[1], str(exc), headers={"X-Request-Id": request_id})


async def run_request(services: Services, entry: RunningRequest, work: Awaitable[MJPEGResponse]) -> MJPEGResponse:
    """Await a speech request's `work`; when it fails before its stream starts, the id is given back and
    the error carries `X-Request-Id`."""
    try:
        return await work
    except BaseException as exc:
        services.requests.close(entry)
        if not isinstance(exc, Exception):  # cancelled: nothing to answer
            raise
        if entry.cancelled and isinstance(exc, APIError) and exc.status_code == 499:
            exc = APIError(499, "request_cancelled", f"request {entry.request_id} was cancelled "
                                                     "(DELETE /generate/{request_id}) before its stream started")
        tagged = with_request_id(exc, entry.request_id)
        raise tagged from None


async def new_job(services: Services, info: AvatarInfo, audio16k: np.ndarray, kind: str,
                  final: bool = True) -> tuple[FrameJob, FrameGenerationService, str]:
    """A frame job of avatar `info` on 16 kHz `audio16k` (more to come when not `final`), its generator
    and its debug session name (the audio is recorded now when `final`)."""
    settings = services.settings
    scheduler = await anyio.to_thread.run_sync(services.models.scheduler, info.name)
    generator = services.generator_cls(scheduler.engine, batch_size=settings.models.batch_size,
                                       jpeg_quality=settings.server.jpeg_quality, stats=services.stats,
                                       scheduler=scheduler)
    assert services.debug is not None
    session = DebugRecorder.new_session(kind)
    if final:
        await anyio.to_thread.run_sync(services.debug.save_audio_clip, session, audio16k, SAMPLE_RATE)
    job = await anyio.to_thread.run_sync(generator.job, audio16k, services.debug.frame_sink(session), final)
    return job, generator, session


def mjpeg_stream(services: Services, entry: RunningRequest, job: FrameJob, fps: int,
                 headers: dict[str, str]) -> MJPEGResponse:
    """The paced MJPEG response of `job` for request `entry`: takes an admission place (503 when full);
    the place and the id are given back once, when the last frame is sent or the stream ends otherwise
    (client gone, `DELETE /generate/{id}`: `entry.stop` ends it at once)."""
    if entry.cancel.is_set():
        job.cancel.set()
    check_running(entry)
    if not services.admission.try_acquire("mjpeg"):
        job.cancel.set()
        raise busy(services)
    entry.client_gone = None  # from now on the response notices a client that leaves
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            services.admission.release("mjpeg")
            services.requests.close(entry)

    return MJPEGResponse(paced_parts(job, services.stats, fps, on_close=release, stop=entry.stop),
                         headers={**headers, "X-Request-Id": entry.request_id}, on_finish=release)


def stream_headers(generator: FrameGenerationService, info: AvatarInfo, streamed: bool,
                   extra: dict[str, str] | None = None) -> dict[str, str]:
    """Headers every speech stream sends (without the request id)."""
    return {"X-FPS": str(generator.fps), "X-Avatar": info.name, "X-Streamed": "1" if streamed else "0",
            "Cache-Control": "no-store", "X-Accel-Buffering": "no", **(extra or {})}


async def stream_audio(services: Services, entry: RunningRequest, audio16k: np.ndarray, info: AvatarInfo,
                       kind: str, extra_headers: dict[str, str] | None = None) -> MJPEGResponse:
    """The MJPEG response of avatar `info` speaking 16 kHz mono `audio16k` (known whole: the frame count
    and duration are sent as headers)."""
    job, generator, _ = await new_job(services, info, audio16k, kind)
    if job.total == 0:
        raise APIError(400, "audio_too_short", "the audio is shorter than one video frame (40 ms)")
    headers = {"X-Frame-Count": str(job.total), "X-Audio-Duration": f"{len(audio16k) / SAMPLE_RATE:.4f}",
               **stream_headers(generator, info, False, extra_headers)}
    return mjpeg_stream(services, entry, job, generator.fps, headers)


def feed_speech(speech: Iterator[Piece], audio16k: Speech16kStream, feed: FeatureFeed,
                on_complete: Callable[[np.ndarray], None]) -> None:
    """Worker thread: synthesise a text's remaining pieces into `feed` as each is ready, then end it
    (`on_complete(audio)` gets the whole 16 kHz audio). A synthesis that stops (cancelled) or fails ends
    the feed with the error, so a stream still waiting for the audio ends too."""
    try:
        for piece in speech:
            feed.append(audio16k.push(piece.result))
        feed.append(audio16k.end())
        feed.finish()
        on_complete(feed.audio)
    except SynthesisCancelled as exc:
        feed.fail(exc)
    except Exception as exc:
        log.error("speech synthesis failed after the stream started: %s", exc)
        feed.fail(exc)
    finally:
        close = getattr(speech, "close", None)
        if close is not None:
            close()


async def stream_speech(services: Services, entry: RunningRequest, speech: Iterator[Piece], first: TTSResult,
                        info: AvatarInfo, extra_headers: dict[str, str]) -> MJPEGResponse:
    """The MJPEG response of a text whose first piece is synthesised and later ones are not yet: frames
    start from the first piece while a worker thread synthesises the rest into the job (`feed_speech`,
    which then owns `speech`; it is closed here when the stream cannot start).
    The total is not known up front, so `X-Frame-Count` and `X-Audio-Duration` are not sent
    (`X-Streamed: 1`)."""
    try:
        audio16k = Speech16kStream()
        job, generator, session = await new_job(services, info, audio16k.push(first), "text", final=False)
        assert job.feed is not None and services.debug is not None
        response = mjpeg_stream(services, entry, job, generator.fps,
                                stream_headers(generator, info, True, extra_headers))
    except BaseException:
        getattr(speech, "close", lambda: None)()
        raise
    save = partial(services.debug.save_audio_clip, session, sample_rate=SAMPLE_RATE)
    task = asyncio.ensure_future(anyio.to_thread.run_sync(feed_speech, speech, audio16k, job.feed, save))
    _FEEDERS.add(task)
    task.add_done_callback(_FEEDERS.discard)
    return response


def busy(services: Services) -> APIError:
    """503 + Retry-After: the process holds as many streams as it can keep in real time."""
    return APIError(503, "busy", f"this server is at its capacity of {services.admission.capacity} streams; "
                                 f"retry shortly", headers={"Retry-After": str(RETRY_AFTER_S)})


def check_capacity(services: Services) -> None:
    """Refuse a new stream before any expensive work when the process is already full."""
    if not services.admission.has_room():
        raise busy(services)


async def speak_text(services: Services, entry: RunningRequest, text: str, avatar: str | None,
                     voice: str | None, request: Request | None = None) -> MJPEGResponse:
    """Validate, synthesise and stream (the body of both /generate routes). The text is synthesised
    sentence by sentence (`FallbackTTS.synthesize_pieces`): a text of one piece (or a cached one) is
    streamed whole; a longer one starts streaming after its first piece (`stream_speech`)."""
    text = check_text(text, services.settings.tts.max_text_chars)
    check_capacity(services)
    check_speech_length(text, services.settings.server.max_audio_seconds)
    info = services.models.resolve(avatar)
    voice = await check_voice(services, voice)
    entry.client_gone = client_gone(request) if request is not None else None
    speech = services.tts.synthesize_pieces(text, voice, entry.over)
    handed_over = False
    try:
        first = await run_tts(partial(next, speech, None))
        if first is None:
            raise APIError(400, "bad_text", "the text has nothing to speak")
        check_running(entry)
        extra = {"X-TTS-Engine": first.result.engine}
        if first.last:
            next(speech, None)  # the end of the iteration caches the result
            return await stream_audio(services, entry, first.result.to_16k(), info, "text", extra)
        handed_over = True  # stream_speech (then its feeder) closes the iteration from here on
        return await stream_speech(services, entry, speech, first.result, info, extra)
    finally:
        if not handed_over:
            speech.close()


def avatar_still(info: AvatarInfo) -> bytes:
    """JPEG bytes of the avatar's first source frame."""
    return info.first_frame_path().read_bytes()


# ---------------------------------------------------------------------------------------------
# Routes

page_router = APIRouter(tags=["page"])
speech_router = APIRouter(tags=["speech"])
system_router = APIRouter(tags=["system"])

AvatarQuery = Annotated[str | None, Query(description="avatar name (see /health); default avatar if omitted")]
VoiceQuery = Annotated[str | None, Query(description="TTS voice (see /health); default voice if omitted")]
RequestIdQuery = Annotated[str | None, Query(pattern=REQUEST_ID_PATTERN, description=(
    "id of this stream (1-64 characters of A-Z a-z 0-9 _ -) for `DELETE /generate/{request_id}`; made by "
    "the server when omitted; sent back in `X-Request-Id`"))]


class GenerateRequest(BaseModel):
    """Body of POST /generate."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(description="what the avatar says")
    avatar: str | None = None
    voice: str | None = None


class DebugUpdate(BaseModel):
    """Body of POST /debug/config: flags to change (omitted ones stay as they are)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool | None = None
    save_frames: bool | None = None
    save_audio: bool | None = None


PLACEHOLDER_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>SyncTalk 2D</title></head>
<body><h1>SyncTalk 2D</h1><p>The web page is not built yet. The API is up: see <a href="/docs">/docs</a>.</p>
<img src="/avatar" alt="avatar" style="max-width:480px"></body></html>"""


@page_router.get("/", include_in_schema=False)
def index() -> Response:
    """The web page (`static/index.html`)."""
    page = STATIC_DIR / "index.html"
    return FileResponse(page, media_type="text/html") if page.is_file() else HTMLResponse(PLACEHOLDER_PAGE)


@page_router.get("/static/{name}", include_in_schema=False)
def static_file(name: str) -> FileResponse:
    """A file of `static/` (matched against the folder's listing, never joined as a path)."""
    files = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file()} if STATIC_DIR.is_dir() else {}
    if name not in files:
        raise APIError(404, "not_found", f"no static file {name!r}")
    return FileResponse(files[name])


@speech_router.get("/generate", response_class=MJPEGResponse, responses={**MJPEG_OK, **ERRORS})
async def generate_get(services: ServicesDep, request: Request,
                       text: Annotated[str, Query(description="what to say")],
                       avatar: AvatarQuery = None, voice: VoiceQuery = None,
                       request_id: RequestIdQuery = None) -> MJPEGResponse:
    """Stream MJPEG of the avatar speaking `text` (for an `<img src=...>`)."""
    entry = open_request(services, request_id)
    return await run_request(services, entry, speak_text(services, entry, text, avatar, voice, request))


@speech_router.post("/generate", response_class=MJPEGResponse, responses={**MJPEG_OK, **ERRORS})
async def generate_post(services: ServicesDep, request: Request, body: GenerateRequest,
                        request_id: RequestIdQuery = None) -> MJPEGResponse:
    """Stream MJPEG of the avatar speaking the JSON body's `text`."""
    entry = open_request(services, request_id)
    return await run_request(services, entry, speak_text(services, entry, body.text, body.avatar, body.voice,
                                                         request))


class CancelBody(BaseModel):
    """DELETE /generate/{request_id}."""

    request_id: str
    cancelled: bool


@speech_router.delete("/generate/{request_id}", response_model=CancelBody, responses={
    404: {"model": ErrorBody, "description": "no stream with this id is running (unknown or finished)"},
    422: {"model": ErrorBody, "description": "not a valid request id"}})
async def cancel_generate(services: ServicesDep, request_id: Annotated[str, Path(
        pattern=REQUEST_ID_PATTERN, description="the `X-Request-Id` of a running speech stream")]) -> dict[str, Any]:
    """Stop a running `/generate` or `/generate-from-audio` stream: its MJPEG body ends at once (closing
    boundary), its generation and admission place are released; a request still synthesising stops (499)."""
    if services.requests.cancel(request_id) is None:
        raise APIError(404, "unknown_request", f"no running stream has the id {request_id!r} (unknown or "
                                               "already finished)")
    log.info("request %s cancelled", request_id)
    return {"request_id": request_id, "cancelled": True}


UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["audio_file"],
    "properties": {"audio_file": {"type": "string", "format": "binary",
                                  "description": f"audio file: {', '.join(AUDIO_EXTENSIONS)}"}}}}}}}


@speech_router.post("/generate-from-audio", response_class=MJPEGResponse, openapi_extra=UPLOAD_BODY,
                    responses={**MJPEG_OK, **ERRORS, 411: {"model": ErrorBody}, 413: {"model": ErrorBody},
                               415: {"model": ErrorBody}})
async def generate_from_audio(services: ServicesDep, request: Request, avatar: AvatarQuery = None,
                              request_id: RequestIdQuery = None) -> MJPEGResponse:
    """Stream MJPEG of the avatar speaking an uploaded recording (form field `audio_file`)."""
    entry = open_request(services, request_id)
    return await run_request(services, entry, speak_upload(services, entry, request, avatar))


async def speak_upload(services: Services, entry: RunningRequest, request: Request,
                       avatar: str | None) -> MJPEGResponse:
    """Validate, read, decode and stream an upload (the body of POST /generate-from-audio)."""
    info = services.models.resolve(avatar)
    check_capacity(services)
    data, extension = await read_upload(request, services.settings.server.max_upload_bytes)
    audio = await decode_upload(data, extension, services.settings.server.max_audio_seconds)
    return await stream_audio(services, entry, audio, info, "audio")


@speech_router.get("/generate-from-audio", response_class=MJPEGResponse, responses={**MJPEG_OK, **ERRORS})
async def generate_from_audio_placeholder(models: ModelsDep, avatar: AvatarQuery = None) -> Response:
    """A one-part MJPEG stream of the still avatar, for an `<img>` while the upload runs."""
    info = models.resolve(avatar)
    jpeg = await anyio.to_thread.run_sync(avatar_still, info)
    return Response(mjpeg_part(jpeg) + MJPEG_END, media_type=MJPEG_MEDIA_TYPE, headers={"X-Frame-Count": "1"})


@speech_router.get("/avatar", response_class=Response, responses={
    200: {"content": {"image/jpeg": {}}, "description": "one still JPEG"}, **ERRORS})
async def avatar_image(models: ModelsDep, avatar: AvatarQuery = None) -> Response:
    """One still JPEG of the avatar (its first source frame)."""
    info = models.resolve(avatar)
    jpeg = await anyio.to_thread.run_sync(avatar_still, info)
    return Response(jpeg, media_type="image/jpeg", headers={"X-Avatar": info.name})


@speech_router.get("/get-tts-audio", response_class=Response, responses={
    200: {"content": {"audio/wav": {}}, "description": "16-bit mono WAV; header `X-Audio-Duration` (s)"},
    **ERRORS})
async def get_tts_audio(services: ServicesDep, request: Request,
                        text: Annotated[str, Query(description="what to say")], voice: VoiceQuery = None) -> Response:
    """The speech for `text` as a WAV file (cached, so a following /generate does not synthesise again)."""
    text = check_text(text, services.settings.tts.max_text_chars)
    check_speech_length(text, services.settings.server.max_audio_seconds)
    result = await synthesize(services, text, await check_voice(services, voice), request)
    headers = {"X-Audio-Duration": f"{result.duration_s:.4f}", "X-TTS-Engine": result.engine,
               "Content-Disposition": 'attachment; filename="tts_audio.wav"', "Cache-Control": "no-store"}
    return Response(wav_bytes(result.audio, result.sample_rate), media_type="audio/wav", headers=headers)


class HealthBody(BaseModel):
    """GET /health."""

    status: str = Field(description="ok (default avatar loaded), degraded (not loaded yet or failed), "
                                    "unavailable (no avatar at all)")
    device: str
    backend: str
    model: dict[str, Any]
    avatars: list[dict[str, Any]]
    tts: dict[str, Any]
    streams: dict[str, int]
    threads: dict[str, int] = Field(description="torch intra-op and inter-op threads (models.threads)")
    memory: dict[str, Any] = Field(description="memory of the loaded avatars, the budget, evictions so far")
    admission: dict[str, Any] = Field(description="stream capacity, running streams by kind, refusals")


@system_router.get("/health", response_model=HealthBody)
def health(services: ServicesDep) -> dict[str, Any]:
    """Cheap status: default/loaded avatars, TTS chain, device and stream counters (no synthesis); paths
    are relative to the project (or only a name), never absolute."""
    models = services.models.status()
    default = models["default"]
    state = "unavailable" if default is None else ("ok" if default in models["loaded"] else "degraded")
    tts = services.tts.status()
    return public_paths({
        "status": state, "device": services.settings.models.resolved_device(),
        "backend": services.settings.models.backend, "model": {"default": default, "loaded": models["loaded"]},
        "avatars": models["avatars"], "tts": tts, "streams": services.stats.snapshot(), "threads": torch_threads(),
        "memory": {k: models[k] for k in ("memory_mb", "memory_budget_mb", "evictions")},
        "admission": services.admission.status()})


@system_router.get("/debug/status")
def debug_status(debug: DebugDep, stats: StatsDep) -> dict[str, Any]:
    """Debug flags and folders (project-relative), bytes written, and the stream counters."""
    return public_paths({**debug.status(), "streams": stats.snapshot()})


@system_router.post("/debug/config", responses={422: {"model": ErrorBody}})
def debug_config(debug: DebugDep, stats: StatsDep, body: DebugUpdate) -> dict[str, Any]:
    """Switch debug recording flags; frames go to the configured frames dir, audio to the audio dir."""
    debug.update(**body.model_dump())
    return public_paths({**debug.status(), "streams": stats.snapshot()})


docs_router = APIRouter(include_in_schema=False)  # only when a token is set: then the docs need it too


@docs_router.get("/openapi.json")
def openapi_schema(request: Request) -> JSONResponse:
    """The OpenAPI schema (behind the token)."""
    return JSONResponse(request.app.openapi())


def _schema_url(request: Request) -> str:
    """/openapi.json, carrying the query token the page was opened with (the page's fetch sends no header)."""
    token = request.query_params.get("access_token")
    return "/openapi.json" + (f"?access_token={token}" if token else "")


@docs_router.get("/docs")
def swagger_page(request: Request) -> HTMLResponse:
    """Swagger UI (behind the token)."""
    return get_swagger_ui_html(openapi_url=_schema_url(request), title="SyncTalk 2D - docs")


@docs_router.get("/redoc")
def redoc_page(request: Request) -> HTMLResponse:
    """ReDoc (behind the token)."""
    return get_redoc_html(openapi_url=_schema_url(request), title="SyncTalk 2D - ReDoc")


ROUTERS: list[APIRouter] = [page_router, speech_router, system_router, live_router, webrtc_router]


# ---------------------------------------------------------------------------------------------
# App


def create_app(services: Services | None = None, settings: Settings | None = None) -> FastAPI:
    """The FastAPI app around `services` (built from `settings` or `config.settings` at start-up when
    None). The lifespan loads the default avatar once before serving."""
    if settings is None:
        settings = services.settings if services is not None else default_settings

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if getattr(app.state, "services", None) is None:
            app.state.services = build_services(settings)
        svc: Services = app.state.services
        install_log_redaction()
        limit_torch_threads(svc.settings.models.feature_threads)
        await anyio.to_thread.run_sync(clean_stale_temporaries, svc.settings)
        name = await anyio.to_thread.run_sync(svc.models.warm_up)
        if name is not None and svc.admission.capacity is None:
            scheduler = await anyio.to_thread.run_sync(svc.models.scheduler, name)
            await anyio.to_thread.run_sync(calibrate_admission, svc.admission, svc.generator_cls, scheduler,
                                           svc.settings.server.jpeg_quality)
        await anyio.to_thread.run_sync(svc.tts.warm_up)
        log.info("ready: default avatar %s, device %s, backend %s", name or "(none)",
                 svc.settings.models.resolved_device(), svc.settings.models.backend)
        yield

    protected_docs = bool(settings.server.auth_token)  # FastAPI's own docs routes skip app dependencies
    hidden_docs: dict[str, Any] = {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="SyncTalk 2D", version="1.0", lifespan=lifespan, dependencies=[Depends(require_token)],
                  description="Lip-synced talking-head video from text or audio, streamed as MJPEG.",
                  **(hidden_docs if protected_docs else {}))
    app.state.services = services
    app.add_middleware(BodyTimeoutMiddleware, timeout_s=settings.server.body_timeout_s)
    if settings.server.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.server.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization", "Content-Type"],
                           expose_headers=STREAM_HEADERS)
    install_error_handlers(app)
    for router in ROUTERS + ([docs_router] if protected_docs else []):
        app.include_router(router)
    return app


app = create_app()


def main(argv: list[str] | None = None) -> int:
    """Command line: start uvicorn with the app (flags override the configuration)."""
    settings = default_settings
    parser = argparse.ArgumentParser(description="SyncTalk 2D streaming server")
    parser.add_argument("--host", default=settings.server.host, help="bind address (default %(default)s)")
    parser.add_argument("--port", type=int, default=settings.server.port, help="port (default %(default)s)")
    parser.add_argument("--avatar", default=settings.models.default_avatar, help="default avatar (%(default)s)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    cfg = settings.model_copy(deep=True)
    cfg.server.host, cfg.server.port, cfg.models.default_avatar = args.host, args.port, args.avatar
    models = ModelService(cfg)
    if args.avatar not in models.names() and args.avatar != settings.models.default_avatar:
        sys.stderr.write(f"error: avatar {args.avatar!r} not found; available: {', '.join(models.names()) or 'none'}\n")
        return 2
    server_app = create_app(Services(settings=cfg, models=models, tts=build_tts(cfg)))
    uvicorn.run(server_app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
