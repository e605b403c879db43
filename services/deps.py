"""The server's services and the FastAPI dependencies that hand them to routes.

`Services` bundles everything a request needs (settings, avatar registry, TTS, stream counters, debug
recorder, generator class, admission, the running speech requests by id). `create_app(services)` stores
it on `app.state`; routes receive the parts through the typed aliases below (`ModelsDep`, `TTSDep`, ...),
so tests can build an app around their own `Services` or override one dependency with
`app.dependency_overrides`.
"""
from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, HTTPException, WebSocketException, status
from starlette.requests import HTTPConnection

from config import Settings
from services.admission import Admission
from services.debug import DebugRecorder
from services.generator import EnhancedFrameGenerationService, FrameGenerationService
from services.models import ModelService
from services.request_ids import RequestRegistry
from services.streaming import StreamStats
from services.tts import FallbackTTS, build_tts

log = logging.getLogger(__name__)


@dataclass
class Services:
    """Everything the routes use; one instance per app."""

    settings: Settings
    models: ModelService
    tts: FallbackTTS
    generator_cls: type[FrameGenerationService] = field(init=False)  # from settings.server.motion
    stats: StreamStats = field(default_factory=StreamStats)
    debug: DebugRecorder | None = None
    admission: Admission = field(default_factory=Admission)
    requests: RequestRegistry = field(default_factory=RequestRegistry)  # running speech streams by request id

    def __post_init__(self) -> None:
        if self.debug is None:
            self.debug = DebugRecorder(self.settings.debug)
        if self.settings.server.max_streams and self.admission.capacity is None:
            self.admission.capacity = self.settings.server.max_streams
        enhanced = self.settings.server.motion == "enhanced"
        self.generator_cls = EnhancedFrameGenerationService if enhanced else FrameGenerationService


def build_services(settings: Settings) -> Services:
    """Services from the configuration (cheap: nothing is loaded until warm-up or first use)."""
    return Services(settings=settings, models=ModelService(settings), tts=build_tts(settings))


def get_services(conn: HTTPConnection) -> Services:
    """The app's `Services` (set by `create_app`)."""
    services = getattr(conn.app.state, "services", None)
    if services is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "services are not initialised yet")
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_settings(services: ServicesDep) -> Settings:
    return services.settings


def get_models(services: ServicesDep) -> ModelService:
    return services.models


def get_tts(services: ServicesDep) -> FallbackTTS:
    return services.tts


def get_stats(services: ServicesDep) -> StreamStats:
    return services.stats


def get_debug(services: ServicesDep) -> DebugRecorder:
    assert services.debug is not None
    return services.debug


SettingsDep = Annotated[Settings, Depends(get_settings)]
ModelsDep = Annotated[ModelService, Depends(get_models)]
TTSDep = Annotated[FallbackTTS, Depends(get_tts)]
StatsDep = Annotated[StreamStats, Depends(get_stats)]
DebugDep = Annotated[DebugRecorder, Depends(get_debug)]


def presented_token(conn: HTTPConnection) -> str | None:
    """The token a client sent: `Authorization: Bearer <token>`, or the `access_token` query parameter
    (for browser `<img>` tags and WebSockets, which cannot set headers)."""
    header = conn.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return conn.query_params.get("access_token") or None


def require_token(conn: HTTPConnection) -> None:
    """App-wide dependency: when `server.auth_token` is set, every HTTP endpoint and WebSocket needs it."""
    services = get_services(conn)
    expected = services.settings.server.auth_token
    if not expected:
        return
    token = presented_token(conn)
    if token is not None and secrets.compare_digest(token.encode(), str(expected).encode()):
        return
    if conn.scope["type"] == "websocket":
        raise WebSocketException(status.WS_1008_POLICY_VIOLATION, "missing or invalid token")
    raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or invalid bearer token",
                        headers={"WWW-Authenticate": "Bearer"})
