"""Avatar registry for the server: finds avatars on disk, loads each one's engine once, keeps the
default one warm and reports what is loaded.

An avatar is a dataset folder `<dataset_root>/<name>/` with `full_body_img/<i>.jpg` frames plus a
checkpoint folder `<checkpoint_root>/<name>/` holding `<epoch>.pth` files (the largest epoch is used).
The bundled demo avatar lives under `<demo_root>/dataset/<name>/` and `<demo_root>/checkpoint/<name>/`
(the same layout); an avatar of the same name under the user's roots wins over the demo one.

Nothing is loaded at import time: `ModelService(settings)` only scans folders; engines are built on
first use (`engine(name)`) or by `warm_up()` (the server's lifespan), each under its own lock so two
requests for the same avatar never load it twice.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class AvatarError(Exception):
    """Base class of the registry's errors (each has a readable message)."""


class UnknownAvatarError(AvatarError, KeyError):
    """The requested avatar name is not one of the discovered avatars."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown avatar"


class NoAvatarError(AvatarError):
    """No avatar is available at all (nothing trained, no demo avatar)."""


class AvatarLoadError(AvatarError):
    """An avatar was found on disk but its engine could not be built."""


@dataclass(frozen=True)
class AvatarInfo:
    """One avatar found on disk (paths come from the scan, never from a request)."""

    name: str
    dataset_dir: Path
    checkpoint_path: Path
    epoch: int
    num_frames: int
    source: str  # "user" (dataset/checkpoint roots) or "demo"

    def first_frame_path(self) -> Path:
        """The avatar's still image: source frame 0."""
        return self.dataset_dir / "full_body_img" / "0.jpg"

    def public(self) -> dict[str, Any]:
        """What /health reports (no absolute paths)."""
        return {"name": self.name, "epoch": self.epoch, "frames": self.num_frames, "source": self.source,
                "checkpoint": self.checkpoint_path.name}


def latest_checkpoint(folder: Path) -> tuple[Path, int] | None:
    """The `<epoch>.pth` with the largest integer epoch in `folder`; other files are ignored."""
    best: tuple[Path, int] | None = None
    if not folder.is_dir():
        return None
    for path in folder.glob("*.pth"):
        if path.stem.isdigit() and path.is_file() and (best is None or int(path.stem) > best[1]):
            best = (path, int(path.stem))
    return best


def count_frames(dataset_dir: Path) -> int:
    """Number of consecutive frames `full_body_img/0.jpg, 1.jpg, ...`."""
    frames = dataset_dir / "full_body_img"
    if not frames.is_dir():
        return 0
    names = {p.name for p in frames.iterdir()}
    n = 0
    while f"{n}.jpg" in names:
        n += 1
    return n


def discover_avatars(dataset_root: Path, checkpoint_root: Path, source: str) -> dict[str, AvatarInfo]:
    """Every `<dataset_root>/<name>/` with frames and a matching `<checkpoint_root>/<name>/<epoch>.pth`."""
    found: dict[str, AvatarInfo] = {}
    if not dataset_root.is_dir():
        return found
    for folder in sorted(dataset_root.iterdir()):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        ckpt = latest_checkpoint(checkpoint_root / folder.name)
        frames = count_frames(folder)
        if ckpt is None or frames == 0:
            log.debug("skipping %s: %s", folder, "no checkpoint" if ckpt is None else "no frames")
            continue
        found[folder.name] = AvatarInfo(folder.name, folder, ckpt[0], ckpt[1], frames, source)
    return found


EngineFactory = Callable[[AvatarInfo], Any]


@dataclass
class _Slot:
    """Load state of one avatar."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    engine: Any = None
    error: str | None = None
    load_seconds: float | None = None


class ModelService:
    """Discovers avatars and hands out one shared engine per avatar (loaded lazily, thread-safe).

    `engine_factory(info)` builds an engine; the default builds `services.generator.LipSyncEngine`
    with the backend/device/threads from `settings.models`. Tests can pass their own factory.
    """

    def __init__(self, settings: Any, engine_factory: EngineFactory | None = None,
                 default_avatar: str | None = None):
        self.settings = settings
        self._factory = engine_factory or self._build_engine
        self._requested_default = default_avatar or settings.models.default_avatar
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}
        self._avatars: dict[str, AvatarInfo] = {}
        self.refresh()

    # -- discovery ---------------------------------------------------------------------------

    def refresh(self) -> dict[str, AvatarInfo]:
        """Rescan the roots (cheap: directory listings only) and return the avatars by name."""
        paths = self.settings.paths
        demo = discover_avatars(Path(paths.demo_root) / "dataset", Path(paths.demo_root) / "checkpoint", "demo")
        user = discover_avatars(Path(paths.dataset_root), Path(paths.checkpoint_root), "user")
        with self._lock:
            self._avatars = {**demo, **user}
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
        if info is None:
            self.refresh()  # a freshly trained avatar shows up without a restart
            with self._lock:
                info = self._avatars.get(name)
        if info is None:
            raise UnknownAvatarError(f"unknown avatar {name!r}; available: {', '.join(self.names()) or 'none'}")
        return info

    # -- engines -----------------------------------------------------------------------------

    def engine(self, name: str | None = None) -> Any:
        """The loaded engine of avatar `name` (default avatar when None); loads it on first use.
        Blocking: call it from a worker thread in async code."""
        info = self.resolve(name)
        with self._lock:
            slot = self._slots.setdefault(info.name, _Slot())
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
                log.info("loaded avatar %s (%s, epoch %d) in %.2f s", info.name, info.checkpoint_path.name,
                         info.epoch, slot.load_seconds)
        return slot.engine

    def loaded(self, name: str) -> Any | None:
        """The engine of `name` if it is already loaded, else None (never loads)."""
        with self._lock:
            slot = self._slots.get(name)
        return slot.engine if slot is not None else None

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
            if engine is not None and hasattr(engine, "describe"):
                entry["engine"] = engine.describe()
            out.append(entry)
        return {"default": self.default_name, "avatars": out,
                "loaded": [e["name"] for e in out if e["loaded"]]}

    # -- default factory ---------------------------------------------------------------------

    def _build_engine(self, info: AvatarInfo) -> Any:
        from services.generator import LipSyncEngine  # heavy imports only when an avatar is loaded

        models = self.settings.models
        engine = LipSyncEngine.load(
            info.dataset_dir, info.checkpoint_path, backend=models.backend, device=models.resolved_device(),
            dtype=models.dtype, threads=models.threads, batch_size=models.batch_size,
            ave_checkpoint=models.ave_checkpoint,
        )
        warm_engine(engine)
        return engine


def warm_engine(engine: Any) -> None:
    """Run the feature encoder and the U-Net once on silence, so that one-time costs (weight loading,
    first-call allocations) are paid at load time rather than by the first request."""
    import numpy as np

    import speech_features

    silence = np.zeros(16000, np.float32)
    if engine.mode == "whisper":
        features = speech_features.extract_features(silence, "whisper", device=engine.describe()["device"])
    else:
        features = engine.features(silence)
    engine.render(engine.audio_windows(features, [0]), [0])
