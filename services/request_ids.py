"""Running MJPEG speech requests by id, so that `DELETE /generate/{request_id}` can stop one.

Every `/generate` (GET and POST) and `POST /generate-from-audio` request has an id: the client's
`request_id` query parameter (1-64 characters of `A-Z a-z 0-9 _ -`) or one the server makes. The id is
registered from the start of the request (so synthesis can be cancelled too) until its stream ends: its
last frame is sent, the client goes away, the request fails, or it is cancelled. An id that is still
registered cannot be used again (409); a finished one can. The registry never holds more than `limit`
ids (`MAX_RUNNING`, above any admission capacity: `server.max_streams` is at most 1024).

A `RunningRequest` carries two flags: `cancel` (a `threading.Event`: the request is over, work for it in
worker threads stops, e.g. the synthesis of later sentences) and `stop` (an `asyncio.Event`, set only by
`cancel()`: the MJPEG stream ends now, see `services.streaming.paced_parts`).
"""
from __future__ import annotations

import asyncio
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

REQUEST_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_RUNNING = 1024
_VALID_ID = re.compile(REQUEST_ID_PATTERN)


class RequestIdInUse(Exception):
    """The id belongs to a request that is still running."""


class TooManyRequests(Exception):
    """The registry is full."""


@dataclass(eq=False)
class RunningRequest:
    """One registered request."""

    request_id: str
    cancel: threading.Event = field(default_factory=threading.Event)  # the request is over
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # DELETE: end the stream now
    cancelled: bool = False  # ended by `RequestRegistry.cancel`
    # asked from worker threads before the stream starts: has the client gone? (None once streaming)
    client_gone: Callable[[], bool] | None = None

    def over(self) -> bool:
        """Whether work for this request should stop: it ended, was cancelled, or its client left."""
        gone = self.client_gone
        return self.cancel.is_set() or (gone is not None and gone())


def new_request_id() -> str:
    """A fresh id (32 hex digits)."""
    return uuid.uuid4().hex


def valid_request_id(request_id: str) -> bool:
    """Whether `request_id` has the allowed form."""
    return bool(_VALID_ID.match(request_id))


class RequestRegistry:
    """The running requests by id (thread-safe; `cancel` is called on the event loop)."""

    def __init__(self, limit: int = MAX_RUNNING):
        self.limit = int(limit)
        self._running: dict[str, RunningRequest] = {}
        self._lock = threading.Lock()

    def open(self, request_id: str | None = None) -> RunningRequest:
        """Register a request under `request_id` (a new id when None); RequestIdInUse when that id is
        running, TooManyRequests when `limit` ids are."""
        request_id = request_id or new_request_id()
        if not valid_request_id(request_id):
            raise ValueError(f"invalid request id {request_id!r}")
        with self._lock:
            if request_id in self._running:
                raise RequestIdInUse(f"request {request_id!r} is still running")
            if len(self._running) >= self.limit:
                raise TooManyRequests(f"{len(self._running)} requests are running")
            entry = RunningRequest(request_id)
            self._running[request_id] = entry
            return entry

    def cancel(self, request_id: str) -> RunningRequest | None:
        """Stop the running request `request_id` (its stream ends at once, its work stops) and forget
        it; None when no such request runs."""
        with self._lock:
            entry = self._running.pop(request_id, None)
            if entry is None:
                return None
        entry.cancelled = True
        entry.cancel.set()
        entry.stop.set()
        return entry

    def close(self, entry: RunningRequest) -> None:
        """The request is over (idempotent): forget its id and stop work still running for it."""
        entry.client_gone = None
        entry.cancel.set()
        with self._lock:
            if self._running.get(entry.request_id) is entry:
                del self._running[entry.request_id]

    def __len__(self) -> int:
        """How many requests are registered now."""
        with self._lock:
            return len(self._running)
