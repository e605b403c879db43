"""Errors every transport reports the same way: `APIError` (an HTTP error with a stable `error` code,
rendered as `{error, detail}`) and the services' domain errors, one table from exception class to
(HTTP status, stable error code). `api.py` turns them into JSON responses; the WebSocket and
WebRTC paths send the same codes as error events."""
from __future__ import annotations

from fastapi import HTTPException

from services.models import AvatarLoadError
from services.tts import TTSUnavailable
from synctalk.avatar import NoAvatarError, UnknownAvatarError


class APIError(HTTPException):
    """An HTTP error with a stable machine-readable `error` code."""

    def __init__(self, status_code: int, error: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(status_code, detail, headers)
        self.error = error


DOMAIN_ERRORS: dict[type[Exception], tuple[int, str]] = {
    UnknownAvatarError: (404, "unknown_avatar"),
    NoAvatarError: (503, "no_avatar"),
    AvatarLoadError: (503, "avatar_unavailable"),
    TTSUnavailable: (503, "tts_unavailable"),
}


def domain_error(exc: BaseException) -> tuple[int, str] | None:
    """(status, code) of a domain error (the most specific class in the table), None for others."""
    for cls in type(exc).__mro__:
        if cls in DOMAIN_ERRORS:
            return DOMAIN_ERRORS[cls]
    return None
