"""Where avatars live on disk: the one registry the server and every CLI use.

An avatar is a dataset folder `<dataset_root>/<name>/` with `full_body_img/<i>.jpg` frames plus a
checkpoint folder `<checkpoint_root>/<name>/` holding `<epoch>.pth` files (the largest epoch is used
unless one is asked for). Roots are searched in order; the first that has the name wins, so the
user's own avatar of a name shadows the bundled demo avatar of the same name. Names are only ever
compared with what a scan found; a request's name never becomes a path.

An optional `<dataset_root>/<name>/avatar.json` describes the avatar: `attribution` (a credit line the
server reports and the page shows, for avatars made from licensed footage) and `idle` ("recorded": the
idle loop shows the source frames as they are; "rendered": with the mouth the model renders for silence,
for footage in which the person talks throughout).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class AvatarError(ValueError):
    """Base class of the registry's errors (each has a readable one-line message)."""


class UnknownAvatarError(AvatarError, KeyError):
    """The requested avatar name is not one of the discovered avatars."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown avatar"


class NoAvatarError(AvatarError):
    """No avatar is available at all (nothing trained, no demo avatar)."""


class CheckpointNotFoundError(AvatarError):
    """The requested checkpoint (epoch or file) does not exist."""


@dataclass(frozen=True)
class AvatarRoot:
    """One place avatars are searched: a dataset root and its checkpoint root."""

    dataset_root: Path
    checkpoint_root: Path
    source: str  # "user" or "demo"


@dataclass(frozen=True)
class AvatarInfo:
    """One avatar found on disk (paths come from the scan, never from a request)."""

    name: str
    dataset_dir: Path
    checkpoint_path: Path
    epoch: int
    num_frames: int
    source: str  # "user" or "demo"
    attribution: str | None = None
    idle: str = "recorded"

    def first_frame_path(self) -> Path:
        """The avatar's still image: source frame 0."""
        return self.dataset_dir / "full_body_img" / "0.jpg"

    def public(self) -> dict[str, Any]:
        """What /health reports (no filesystem paths)."""
        return {"name": self.name, "epoch": self.epoch, "frames": self.num_frames, "source": self.source,
                "checkpoint": self.checkpoint_path.name, "attribution": self.attribution}


def read_avatar_file(dataset_dir: Path) -> dict[str, Any]:
    """`attribution` and `idle` from `dataset_dir/avatar.json` (defaults when absent); AvatarError when
    the file is not valid."""
    path = dataset_dir / "avatar.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AvatarError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise AvatarError(f"{path}: expected a JSON object")
    out: dict[str, Any] = {}
    if data.get("attribution") is not None:
        out["attribution"] = str(data["attribution"])
    idle = data.get("idle", "recorded")
    if idle not in ("recorded", "rendered"):
        raise AvatarError(f"{path}: idle must be 'recorded' or 'rendered', got {idle!r}")
    out["idle"] = idle
    return out


def epoch_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Every `<epoch>.pth` in `folder`, sorted by epoch; other files are ignored."""
    if not folder.is_dir():
        return []
    return sorted((int(p.stem), p) for p in folder.glob("*.pth") if p.stem.isdigit() and p.is_file())


def latest_checkpoint(folder: Path) -> tuple[Path, int] | None:
    """The `<epoch>.pth` with the largest integer epoch in `folder`, or None."""
    found = epoch_checkpoints(folder)
    return (found[-1][1], found[-1][0]) if found else None


def pick_checkpoint(folder: Path, spec: str | None) -> Path:
    """A checkpoint from a user's `--checkpoint` spec: an epoch number in `folder`, a `.pth` path, or
    None for the largest epoch. Raises CheckpointNotFoundError with what is available."""
    if spec and not str(spec).isdigit():
        path = Path(spec)
        if not path.is_file():
            raise CheckpointNotFoundError(f"checkpoint not found: {path}")
        return path
    found = epoch_checkpoints(folder)
    if spec:
        path = folder / f"{int(spec)}.pth"
        if not path.is_file():
            have = ", ".join(str(e) for e, _ in found) or "none"
            raise CheckpointNotFoundError(f"checkpoint not found: {path} (available epochs: {have})")
        return path
    if not found:
        raise CheckpointNotFoundError(f"no checkpoint <epoch>.pth in {folder} (train the avatar first)")
    return found[-1][1]


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


def discover_avatars(root: AvatarRoot) -> dict[str, AvatarInfo]:
    """Every `<dataset_root>/<name>/` with frames and a matching `<checkpoint_root>/<name>/<epoch>.pth`."""
    found: dict[str, AvatarInfo] = {}
    if not root.dataset_root.is_dir():
        return found
    for folder in sorted(root.dataset_root.iterdir()):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        ckpt = latest_checkpoint(root.checkpoint_root / folder.name)
        frames = count_frames(folder)
        if ckpt is None or frames == 0:
            log.debug("skipping %s: %s", folder, "no checkpoint" if ckpt is None else "no frames")
            continue
        try:
            extra = read_avatar_file(folder)
        except AvatarError as exc:
            log.warning("skipping %s: %s", folder, exc)
            continue
        found[folder.name] = AvatarInfo(folder.name, folder, ckpt[0], ckpt[1], frames, root.source, **extra)
    return found


class AvatarRegistry:
    """The avatars under a list of roots (earlier roots win). A scan is directory listings only."""

    def __init__(self, roots: Sequence[AvatarRoot]):
        self.roots = list(roots)

    def scan(self) -> dict[str, AvatarInfo]:
        """All avatars by name, the first root holding a name winning."""
        found: dict[str, AvatarInfo] = {}
        for root in reversed(self.roots):
            found.update(discover_avatars(root))
        return found

    def find(self, name: str, checkpoint: str | None = None) -> AvatarInfo:
        """Avatar `name`, with checkpoint spec `checkpoint` (epoch, path, or None for the latest).
        A dataset without checkpoints is reported as such; an unknown name lists what exists."""
        for root in self.roots:
            dataset_dir = root.dataset_root / name
            if not name or name.startswith(".") or "/" in name or not (dataset_dir / "full_body_img").is_dir():
                continue
            path = pick_checkpoint(root.checkpoint_root / name, checkpoint)
            epoch = int(path.stem) if path.stem.isdigit() else -1
            return AvatarInfo(name, dataset_dir, path, epoch, count_frames(dataset_dir), root.source,
                              **read_avatar_file(dataset_dir))
        names = sorted(self.scan())
        raise UnknownAvatarError(f"unknown avatar {name!r}; available: {', '.join(names) or 'none'}")
