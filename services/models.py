"""Avatar registry for the server: finds avatars on disk, loads each one's engine once, keeps the
default one warm and reports what is loaded.

Avatars are found by `synctalk.avatar.AvatarRegistry` over `settings.paths.avatar_roots()` (the user's
dataset/checkpoint roots, then the bundled demo avatar): the same registry the CLIs use.

Nothing is loaded at import time: `ModelService(settings)` only scans folders; engines are built on
first use (`engine(name)`) or by `warm_up()` (the server's lifespan), each under its own lock so two
requests for the same avatar never load it twice. Each loaded avatar gets one
`synctalk.scheduler.FrameScheduler` (`scheduler(name)`), shared by all its streams (batching across
them unless `server.batching` is off). Past
`models.memory_budget_mb` the least recently used other avatars are evicted (a stream still running on
an evicted engine keeps it until it ends); an evicted avatar loads again on its next request.
"""
from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from config import Settings
from synctalk.avatar import AvatarError, AvatarInfo, NoAvatarError, UnknownAvatarError
from synctalk.engine import LipSyncEngine
from synctalk.scheduler import FrameScheduler
from synctalk.timing import SAMPLE_RATE

log = logging.getLogger(__name__)


def limit_torch_threads(threads: int) -> None:
    """Apply `models.feature_threads` to torch (server start-up): intra-op threads always; inter-op threads only
    while torch allows it (once per process, before any parallel work), otherwise logged and left."""
    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != threads:
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError as exc:  # already set, or parallel work has started
            log.info("torch inter-op threads stay at %d: %s", torch.get_num_interop_threads(), exc)


def torch_threads() -> dict[str, int]:
    """torch's intra-op and inter-op thread counts (for /health)."""
    return {"torch": torch.get_num_threads(), "torch_interop": torch.get_num_interop_threads()}


RESCAN_INTERVAL_S = 2.0  # an unknown name rescans the avatar folders at most this often


class AvatarLoadError(AvatarError):
    """An avatar was found on disk but its engine could not be built."""


EngineFactory = Callable[[AvatarInfo], LipSyncEngine]


@dataclass
class _Slot:
    """Load state of one avatar."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    engine: LipSyncEngine | None = None
    scheduler: FrameScheduler | None = None
    last_used: float = 0.0
    error: str | None = None
    load_seconds: float | None = None


class ModelService:
    """Discovers avatars and hands out one shared engine per avatar (loaded lazily, thread-safe).

    `engine_factory(info)` builds an engine; the default builds `synctalk.engine.LipSyncEngine`
    with the backend/device/threads from `settings.models`. Tests can pass their own factory.
    """

    def __init__(self, settings: Settings, engine_factory: EngineFactory | None = None,
                 default_avatar: str | None = None):
        self.settings = settings
        self._factory = engine_factory or self._build_engine
        self._requested_default = default_avatar or settings.models.default_avatar
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}
        self._avatars: dict[str, AvatarInfo] = {}
        self._last_scan = 0.0
        self.evictions = 0
        self.refresh()

    # -- discovery ---------------------------------------------------------------------------

    def refresh(self) -> dict[str, AvatarInfo]:
        """Rescan the roots (cheap: directory listings only) and return the avatars by name."""
        found = self.settings.paths.avatar_registry().scan()
        self._last_scan = time.monotonic()
        with self._lock:
            self._avatars = found
            for name in self._avatars:
                self._slots.setdefault(name, _Slot())
        log.info("avatars: %s", ", ".join(sorted(self._avatars)) or "none")
        return dict(self._avatars)

    def names(self) -> list[str]:
        """Names of the discovered avatars, sorted."""
        with self._lock:
            return sorted(self._avatars)

    @property
    def default_name(self) -> str | None:
        """The configured default avatar if it exists, else the first one found, else None."""
        with self._lock:
            if self._requested_default in self._avatars:
                return self._requested_default
            return min(self._avatars) if self._avatars else None

    def resolve(self, name: str | None) -> AvatarInfo:
        """The avatar for a request's `name` (None = default). Raises `UnknownAvatarError` (the name is
        only compared with discovered names, never used as a path) or `NoAvatarError`."""
        if name is None or name == "":
            default = self.default_name
            if default is None:
                raise NoAvatarError(
                    "no avatar available: train one (dataset/<name>/ + checkpoint/<name>/<epoch>.pth) "
                    "or install the demo avatar")
            name = default
        with self._lock:
            info = self._avatars.get(name)
        if info is None and time.monotonic() - self._last_scan > RESCAN_INTERVAL_S:
            self.refresh()  # a freshly trained avatar shows up without a restart
            with self._lock:
                info = self._avatars.get(name)
        if info is None:
            raise UnknownAvatarError(f"unknown avatar {name!r}; available: {', '.join(self.names()) or 'none'}")
        return info

    # -- engines -----------------------------------------------------------------------------

    def engine(self, name: str | None = None) -> LipSyncEngine:
        """The loaded engine of avatar `name` (default avatar when None); loads it on first use.
        Blocking: call it from a worker thread in async code."""
        info = self.resolve(name)
        with self._lock:
            slot = self._slots.setdefault(info.name, _Slot())
        slot.last_used = time.monotonic()
        if slot.engine is not None:
            return slot.engine
        with slot.lock:  # one loader per avatar; other callers wait for it
            if slot.engine is None:
                start = time.perf_counter()
                try:
                    slot.engine = self._factory(info)
                except Exception as exc:
                    slot.error = f"{type(exc).__name__}: {exc}"
                    log.exception("cannot load avatar %s", info.name)
                    raise AvatarLoadError(f"cannot load avatar {info.name!r}: {exc}") from exc
                slot.error = None
                slot.load_seconds = time.perf_counter() - start
                server = self.settings.server
                slot.scheduler = FrameScheduler(slot.engine, max_wait_s=server.batch_wait_ms / 1000,
                                                batching=server.batching)
                log.info("loaded avatar %s (%s, epoch %d) in %.2f s, %.0f MB", info.name,
                         info.checkpoint_path.name, info.epoch, slot.load_seconds,
                         slot.engine.memory_bytes() / 2**20)
                self._evict_over_budget(keep=info.name)
        return slot.engine

    def scheduler(self, name: str | None = None) -> FrameScheduler:
        """The frame scheduler every stream of avatar `name` renders through (loads the avatar)."""
        name = self.resolve(name).name
        for _ in range(3):  # evicted between loading and asking: load again (never a private, unclosed one)
            engine = self.engine(name)
            with self._lock:
                scheduler = self._slots[name].scheduler
            if scheduler is not None and scheduler.engine is engine:
                return scheduler
        raise AvatarLoadError(f"avatar {name!r} was evicted while loading; the memory budget is too small")

    def memory_bytes(self) -> int:
        """Memory held by the loaded avatars."""
        with self._lock:
            engines = [s.engine for s in self._slots.values() if s.engine is not None]
        return sum(e.memory_bytes() for e in engines)

    def unload(self, name: str) -> bool:
        """Drop avatar `name`'s engine and scheduler (they are freed once no stream uses them)."""
        with self._lock:
            slot = self._slots.get(name)
            if slot is None or slot.engine is None:
                return False
            scheduler, slot.engine, slot.scheduler = slot.scheduler, None, None
        if scheduler is not None:
            scheduler.close()
        gc.collect()
        log.info("unloaded avatar %s", name)
        return True

    def _evict_over_budget(self, keep: str) -> None:
        """Unload least recently used avatars (never `keep`) while over `models.memory_budget_mb`."""
        budget = self.settings.models.memory_budget_mb * 2**20
        while self.memory_bytes() > budget:
            with self._lock:
                loaded = [(s.last_used, n) for n, s in self._slots.items() if s.engine is not None and n != keep]
            if not loaded:
                return
            self.unload(min(loaded)[1])
            self.evictions += 1

    def warm_up(self) -> str | None:
        """Load the default avatar (server start-up). Returns its name, or None when there is none or
        it failed (the failure is logged and reported by `status()`)."""
        name = self.default_name
        if name is None:
            log.warning("no avatar available under %s / %s or the demo root; /generate will answer 503",
                        self.settings.paths.dataset_root, self.settings.paths.checkpoint_root)
            return None
        try:
            self.engine(name)
        except AvatarError:
            return None
        return name

    def status(self) -> dict[str, Any]:
        """What is discovered and loaded (cheap; used by /health)."""
        with self._lock:
            avatars = dict(self._avatars)
            slots = dict(self._slots)
        out = []
        for name, info in sorted(avatars.items()):
            slot = slots.get(name)
            entry = info.public()
            entry["loaded"] = bool(slot and slot.engine is not None)
            if slot and slot.load_seconds is not None:
                entry["load_seconds"] = round(slot.load_seconds, 3)
            if slot and slot.error:
                entry["error"] = slot.error
            engine = slot.engine if slot else None
            if engine is not None:
                entry["engine"] = engine.describe()
                entry["memory_mb"] = round(engine.memory_bytes() / 2**20, 1)
            if slot and slot.scheduler is not None:
                entry["scheduler"] = slot.scheduler.snapshot()
            out.append(entry)
        return {"default": self.default_name, "avatars": out,
                "loaded": [e["name"] for e in out if e["loaded"]],
                "memory_mb": round(sum(e.get("memory_mb", 0.0) for e in out), 1),
                "memory_budget_mb": self.settings.models.memory_budget_mb, "evictions": self.evictions}

    # -- default factory ---------------------------------------------------------------------

    def _build_engine(self, info: AvatarInfo) -> LipSyncEngine:
        models = self.settings.models
        engine = LipSyncEngine.load(
            info.dataset_dir, info.checkpoint_path, backend=models.backend, device=models.resolved_device(),
            dtype=models.dtype, threads=models.threads, batch_size=models.batch_size, color_match=models.color_match,
            speech_gate=self.settings.speech_gate(),
            ave_checkpoint=models.ave_checkpoint, feature_config=self.settings.audio.feature_config(),
            idle=info.idle,
        )
        warm_engine(engine)
        return engine


def warm_engine(engine: LipSyncEngine) -> None:
    """Run the feature encoder and the U-Net once on a second of silence, so that one-time costs
    (weight loading, first-call allocations) are paid at load time rather than by the first request."""
    features = engine.features(np.zeros(SAMPLE_RATE, np.float32))
    engine.render(engine.audio_windows(features, [0]), [0])
