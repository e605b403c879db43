"""The training kit both trainers share (`train_328.py` for the U-Net, `synctalk.train_syncnet` for
SyncNet): devices and AMP, torchrun/DDP, the epoch sampler and loader, schedules, RNG state, atomic
checkpoint saves, the JSONL log, TensorBoard and the CLI wrapper."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from synctalk.dataset import DatasetError
from synctalk.fileio import atomic_path, write_text_atomic
from unet_328 import CheckpointError

log = logging.getLogger(__name__)

LATEST = "latest.pth"
PROGRESS_EVERY_S = 30.0  # a plain progress line at least this often when stdout is not a terminal


class TrainError(Exception):
    """A problem the user can fix; main() prints it as one `error:` line and exits with code 2."""


def setup_logging(is_main: bool = True) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)


@dataclass
class Dist:
    """This process's place in a torchrun job (world 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(device_arg: str) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_arg != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank)


def resolve_device(arg: str, dist: Dist | None = None) -> torch.device:
    """cpu / cuda / cuda:N / auto -> a torch.device; under DDP on CUDA each process takes cuda:LOCAL_RANK."""
    if arg == "auto":
        arg = "cuda" if torch.cuda.is_available() else "cpu"
    if arg.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainError(f"--device {arg} requested but CUDA is not available; use --device cpu")
        if dist is not None and dist.world > 1:
            return torch.device("cuda", dist.local_rank)
        return torch.device(arg)
    if arg != "cpu":
        raise TrainError(f"--device must be auto, cpu, cuda or cuda:N, got {arg!r}")
    return torch.device("cpu")


def resolve_amp(arg: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = fp32). AMP is CUDA-only here."""
    if device.type != "cuda":
        if arg in ("bf16", "fp16"):
            log.info("--amp %s ignored on %s (fp32)", arg, device)
        return None
    if arg == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[arg]


def resolve_workers(arg: int, device: torch.device, world: int) -> int:
    if arg >= 0:
        return arg
    return 0 if device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) // world - 1))


class CpuBudget:
    """A training budget in CPU seconds of this process (all its threads), counted only inside the
    training steps: forward, losses, backward, optimizer and critic updates (loading the batch, validation
    and checkpoints are free), so arms of a study that take different time per step get the same compute.
    `seconds` <= 0 means no budget."""

    def __init__(self, seconds: float, used: float = 0.0):
        self.seconds, self.used = float(seconds), float(used)
        self._t0: float | None = None

    def start(self) -> None:
        self._t0 = time.process_time()

    def stop(self) -> None:
        if self._t0 is not None:
            self.used += time.process_time() - self._t0
            self._t0 = None

    @property
    def fraction(self) -> float:
        """Share of the budget spent (0 without a budget)."""
        return min(1.0, self.used / self.seconds) if self.seconds > 0 else 0.0

    @property
    def spent(self) -> bool:
        return self.seconds > 0 and self.used >= self.seconds


def budget_schedule(total: int, warmup: int, min_ratio: float, budget: CpuBudget, warmup_share: float = 0.05):
    """LR multiplier for step s (0-based): linear warm-up to 1, then cosine down to `min_ratio` at the end.

    Without a budget the run ends at `total` steps and warm-up lasts `warmup` steps (at most 5 % of them).
    With one, progress is the larger of the step share and the spent budget share, and warm-up lasts the
    first `warmup_share` of that progress."""
    warmup = max(0, min(warmup, total // 20))

    def factor(step: int) -> float:
        if budget.seconds > 0:
            progress, share = max(step / max(1, total), budget.fraction), warmup_share
            if progress < share:
                return max(progress / share, 1e-3)
        else:
            if step < warmup:
                return (step + 1) / warmup
            progress, share = step / max(1, total), warmup / max(1, total)
        rest = min(1.0, (progress - share) / max(1e-9, 1.0 - share))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * rest))

    return factor


def cosine_with_warmup(total: int, warmup: int, min_ratio: float):
    """LR multiplier for step s (0-based): linear warm-up to 1, then cosine down to `min_ratio`."""
    return budget_schedule(total, warmup, min_ratio, CpuBudget(0.0))


class EpochIndices(torch.utils.data.Sampler):
    """Yields (epoch, index) pairs from a DistributedSampler, skipping the first `skip` of the epoch.

    The epoch travels with each index, so samples stay a function of (seed, epoch, frame) even with
    persistent loader workers, and a resumed run can start mid-epoch on exactly the next batch."""

    def __init__(self, sampler: torch.utils.data.DistributedSampler):
        self.sampler, self.epoch, self.skip = sampler, 0, 0

    def set(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        for k, idx in enumerate(self.sampler):
            if k >= self.skip:
                yield (self.epoch, idx)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def make_loader(dataset, batch: int, dist: Dist, seed: int, workers: int, device: torch.device,
                shuffle: bool = True) -> tuple[torch.utils.data.DataLoader, EpochIndices]:
    """A DataLoader over `dataset` sharded across DDP ranks (DistributedSampler) plus its index wrapper."""
    sampler: torch.utils.data.DistributedSampler = torch.utils.data.DistributedSampler(dataset, num_replicas=dist.world, rank=dist.rank,
                                                  shuffle=shuffle, seed=seed, drop_last=False)
    indices = EpochIndices(sampler)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, sampler=indices, num_workers=workers, drop_last=False,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    return loader, indices


def rng_state() -> dict:
    """Python, numpy and torch RNG states in a form torch.load(weights_only=True) accepts."""
    np_state: Any = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save` through `synctalk.fileio.atomic_path` (a kill never leaves a half-written file)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class JsonlLog:
    """Append-only JSON-lines log; on resume, entries after the resumed step are dropped first."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.unlink(missing_ok=True)
        elif path.is_file():
            text = path.read_text()
            lines = text.splitlines()
            if lines and not text.endswith("\n"):  # a line cut by a kill mid-append: never complete
                lines.pop()
            keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            write_text_atomic(path, "".join(line + "\n" for line in keep))

    def write(self, entry: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(entry) + "\n")


def tensorboard_writer(logdir: Path, enabled: bool, purge_step: int | None):
    """A SummaryWriter, or None when disabled or tensorboard is unavailable."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as exc:  # protobuf / tensorboard version trouble must not stop training
        log.warning("TensorBoard logging disabled: %s", exc)
        return None
    return SummaryWriter(str(logdir), purge_step=purge_step)


def format_duration(seconds: float) -> str:
    """Seconds as `1h02m`, `3m05s` or `42s` (`?` when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class ProgressLine:
    """Plain progress lines for logs (stdout not a terminal, where tqdm's bar shows nothing): at least
    every `every_s` seconds and at the last step, `label: step S/T (P %), R samples/s, ETA E, loss L`.
    With a CPU `budget` the run may end before step T: the line then reads `step S (P % of the CPU
    budget)` when the budget is nearer its end, and the ETA is the sooner of the two ends."""

    def __init__(self, total: int, label: str = "train", every_s: float = PROGRESS_EVERY_S,
                 stream: TextIO | None = None, enabled: bool | None = None, start_step: int = 0,
                 clock: Callable[[], float] = time.monotonic, budget: CpuBudget | None = None):
        self.stream = stream if stream is not None else sys.stdout
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.enabled = (not isatty()) if enabled is None else enabled
        self.total, self.label, self.every_s, self.clock = total, label, every_s, clock
        self.start_step = start_step
        self.budget = budget if budget is not None and budget.seconds > 0 else None
        self.start_fraction = self.budget.fraction if self.budget is not None else 0.0
        self.start = self.last = clock()

    def _budget_eta(self, budget: CpuBudget, elapsed: float) -> float:
        """Seconds until `budget` is spent at the rate so far (NaN before any of it was spent)."""
        rate = (budget.fraction - self.start_fraction) / elapsed
        return (1.0 - budget.fraction) / rate if rate > 0 else float("nan")

    def due(self, step: int) -> bool:
        """Whether `emit` should be called at this step (cheap: no loss is read otherwise)."""
        return self.enabled and (step >= self.total or self.clock() - self.last >= self.every_s)

    def emit(self, step: int, samples: int, loss: float) -> str:
        """Print (and return) one progress line; `samples` = samples processed since the start."""
        now = self.clock()
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        steps_per_s = (step - self.start_step) / elapsed
        eta = (self.total - step) / steps_per_s if steps_per_s > 0 else float("nan")
        share = step / max(1, self.total)
        where = f"step {step}/{self.total} ({100.0 * share:.0f} %)"
        if self.budget is not None and self.budget.fraction >= share:
            where = f"step {step} ({100.0 * self.budget.fraction:.0f} % of the CPU budget)"
            budget_eta = self._budget_eta(self.budget, elapsed)
            eta = budget_eta if math.isnan(eta) or budget_eta < eta else eta  # the sooner end
        line = (f"{self.label}: {where}, {samples / elapsed:.1f} samples/s, ETA {format_duration(eta)}, "
                f"loss {loss:.4f}")
        print(line, file=self.stream, flush=True)
        return line


# ----------------------------------------------------------------------------------------------
# Loss


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def add_run_args(p: argparse.ArgumentParser, d: dict[str, Any]) -> None:
    """The flags both trainers share (size, mode, schedule, device, AMP, workers, threads, seed), with
    each trainer's own defaults `d`."""
    p.add_argument("--size", default=d["size"], choices=["328", "small"])
    p.add_argument("--mode", "--asr", dest="mode", default=d["mode"], choices=["whisper", "ave"])
    p.add_argument("--epochs", type=int, default=d["epochs"])
    p.add_argument("--max_steps", type=int, default=d["max_steps"])
    p.add_argument("--batchsize", type=int, default=d["batchsize"])
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--warmup_steps", type=int, default=d["warmup_steps"])
    p.add_argument("--min_lr_ratio", type=float, default=d["min_lr_ratio"])
    p.add_argument("--amp", default=d["amp"], choices=["auto", "bf16", "fp16", "none"])
    p.add_argument("--device", default=d["device"])
    p.add_argument("--workers", type=int, default=d["workers"])
    p.add_argument("--threads", type=int, default=d["threads"])
    p.add_argument("--seed", type=int, default=d["seed"])


def run_cli(fn: Callable[[argparse.Namespace], Any], argv: list[str] | None, parser: argparse.ArgumentParser,
            check: Callable[[argparse.Namespace], None] | None = None) -> int:
    """Parse, `check(args)`, run `fn(args)` and print its result; user errors (TrainError and the
    `errors` given) -> one `error:` line and exit code 2."""
    args = parser.parse_args(argv)
    try:
        if check is not None:
            check(args)
        result = fn(args)
    except (TrainError, DatasetError, CheckpointError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except torch.OutOfMemoryError:
        sys.stderr.write(f"error: CUDA out of memory at --batchsize {args.batchsize}; "
                         f"try a smaller --batchsize (e.g. {max(1, args.batchsize // 2)})\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted; continue later with --resume\n")
        return 130
    if os.environ.get("RANK", "0") == "0":  # one line from a torchrun job, not one per process
        print(result)
    return 0
