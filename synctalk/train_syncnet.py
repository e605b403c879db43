"""Train SyncNet on one person's dataset (balanced positives, shifted and in-batch far negatives).

    python syncnet_328.py --dataset_dir dataset/NAME --save_dir syncnet_ckpt/NAME [--size small]
    python -m synctalk.train_syncnet ...        (the same)

Keeps the best held-out accuracy as `best.pth` (meta: mode, size, accuracy, AUC, logit head)."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from syncnet_328 import SyncHead, SyncNet_color, build_syncnet, embed
from synctalk.dataset import MIN_SHIFT, DatasetError, SyncNetDataset, ensure_crop_cache
from synctalk.metrics import SYNCNET_MIN_ACCURACY, syncnet_trusted
from synctalk.trainkit import (
    Dist,
    JsonlLog,
    ProgressLine,
    TrainError,
    add_run_args,
    autocast,
    cosine_with_warmup,
    make_loader,
    resolve_amp,
    resolve_device,
    resolve_workers,
    run_cli,
    seed_everything,
    setup_logging,
    tensorboard_writer,
)
from unet_328 import save_checkpoint

log = logging.getLogger("syncnet_328")


def triplet_loss(net: SyncNet_color, head: SyncHead, face: torch.Tensor, audio: torch.Tensor,
                 shifted: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Balanced BCE over one batch of triplets: weight 1/2 on the B positives, 1/4 on the B shifted
    negatives, 1/4 on the in-batch far negatives (face i with audio j, frames >= MIN_SHIFT apart).
    Returns (loss, accuracy on positives + shifted negatives)."""
    _, v = embed(net, face=face)
    a, _ = embed(net, audio=torch.cat([audio, shifted]))
    assert a is not None and v is not None
    a_pos, a_neg = a[: len(face)], a[len(face):]
    sim = v.float() @ a_pos.float().t()  # [B, B] cosines, diagonal = in sync
    logits = head.scale * sim + head.bias
    pos = logits.diagonal()
    neg_shift = head.scale * (v.float() * a_neg.float()).sum(1) + head.bias
    far_mask = (frames[:, None] - frames[None, :]).abs() >= MIN_SHIFT
    bce = F.binary_cross_entropy_with_logits
    loss = 0.5 * bce(pos, torch.ones_like(pos)) + 0.25 * bce(neg_shift, torch.zeros_like(neg_shift))
    if far_mask.any():
        far = logits[far_mask]
        loss = loss + 0.25 * bce(far, torch.zeros_like(far))
    acc = float(torch.cat([(pos > 0), (neg_shift <= 0)]).float().mean())
    return loss, acc



DEFAULTS = dict(
    size="328",          # model size preset: 328 or small
    mode=None,           # audio mode; default: from the dataset's feature file
    epochs=50,           # passes over the training split (upstream: 100, positives only)
    max_steps=0,         # stop after this many optimizer steps (0 = no limit)
    batchsize=16,        # (upstream: 16)
    lr=5e-4,             # peak learning rate, Adam; linear warm-up then cosine (upstream: 1e-3 constant)
    warmup_steps=200,    # capped at 5 % of the run
    min_lr_ratio=0.05,
    amp="auto",          # auto (bf16 on CUDA when supported), bf16, fp16, none; CPU runs fp32
    device="auto",       # auto, cpu, cuda, cuda:N
    workers=-1,          # DataLoader workers (-1: 0 on CPU, up to 8 on CUDA)
    threads=0,           # torch intra-op CPU threads (0 = torch's default)
    eval_every=0,        # also evaluate every N steps inside an epoch (0 = epoch ends only)
    in_batch=True,       # train on triplets + in-batch far negatives (False: plain balanced pairs)
    bn_samples=128,      # training samples to re-estimate BatchNorm statistics before each evaluation (0 = off)
    log_every=10,
    seed=0,
)


@torch.no_grad()
def precise_bn(net: SyncNet_color, batches, device: torch.device, amp=None) -> None:
    """Re-estimate every BatchNorm's running statistics as the plain average over `batches` of training
    triplets (PreciseBN). After a short or fast-moving run the momentum averages lag far behind the
    weights, and eval-mode outputs are then miscalibrated; this makes held-out numbers trustworthy."""
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    net.train()
    for face, audio, shifted, _ in batches:
        with autocast(device, amp):
            embed(net, face=face.to(device), audio=torch.cat([audio, shifted]).to(device))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum


def evaluate_pairs(net: SyncNet_color, head: SyncHead, loader, device: torch.device, amp) -> dict:
    """Held-out accuracy (logit > 0), BCE loss, ROC AUC and mean positive / negative sync probability."""
    net.eval()
    correct, total, loss_sum, pos, neg = 0, 0, 0.0, [], []
    with torch.no_grad():
        for face, audio, label in loader:
            face, audio, label = face.to(device), audio.to(device), label.to(device)
            with autocast(device, amp):
                a, v = net(face, audio)
            logits = head(a, v)
            loss_sum += float(F.binary_cross_entropy_with_logits(logits, label, reduction="sum"))
            correct += int(((logits > 0).float() == label).sum())
            total += len(label)
            prob = torch.sigmoid(logits)
            pos.append(prob[label > 0.5].cpu())
            neg.append(prob[label <= 0.5].cpu())
    net.train()
    pos_t, neg_t = torch.cat(pos), torch.cat(neg)
    # ROC AUC (Mann-Whitney): the chance that a positive scores above a negative; threshold-free
    auc = float(((pos_t[:, None] > neg_t[None, :]).float() + 0.5 * (pos_t[:, None] == neg_t[None, :]).float())
                .mean()) if len(pos_t) and len(neg_t) else float("nan")
    return {"accuracy": correct / max(1, total), "loss": loss_sum / max(1, total), "pairs": total, "auc": auc,
            "p_positive": float(pos_t.mean()) if len(pos_t) else float("nan"),
            "p_negative": float(neg_t.mean()) if len(neg_t) else float("nan")}


class SyncNetRun:
    """One SyncNet training of `args`: data (training pairs, held-out pairs, the BatchNorm calibration
    set), networks and logs (`__init__`), then `fit()`; the best held-out accuracy is kept as best.pth."""

    def __init__(self, args: argparse.Namespace):
        setup_logging(True)
        self.args = args
        self.log = logging.getLogger("syncnet_328")
        self.device = device = resolve_device(args.device)
        self.amp = resolve_amp(args.amp, device)
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        seed_everything(args.seed)
        for key in ("epochs", "batchsize", "log_every"):
            if getattr(args, key) < 1:
                raise TrainError(f"--{key} must be >= 1, got {getattr(args, key)}")
        try:
            ensure_crop_cache(args.dataset_dir, args.size)
        except DatasetError as exc:
            raise TrainError(str(exc)) from None
        self.train_ds = SyncNetDataset(args.dataset_dir, args.size, args.mode, "train", seed=args.seed,
                                       build_cache=False, triplets=args.in_batch)
        val_ds = SyncNetDataset(args.dataset_dir, args.size, self.train_ds.mode, "val", seed=args.seed,
                                build_cache=False)
        workers = resolve_workers(args.workers, device, 1)
        self.loader, self.indices = make_loader(self.train_ds, args.batchsize, Dist(), args.seed, workers, device)
        self.val_loader = torch.utils.data.DataLoader(val_ds, batch_size=64, shuffle=False,
                                                      num_workers=min(workers, 2))
        self.net = build_syncnet(self.train_ds.mode, self.train_ds.size.name).to(device)
        self.head = SyncHead().to(device)
        self.optimizer = torch.optim.Adam(list(self.net.parameters()) + list(self.head.parameters()), lr=args.lr)
        self.total = args.epochs * len(self.loader)
        if args.max_steps > 0:
            self.total = min(self.total, args.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(self.total, args.warmup_steps, args.min_lr_ratio))
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)
        save_dir = Path(args.save_dir)
        self.best_path = save_dir / "best.pth"
        self.train_log = JsonlLog(save_dir / "train_log.jsonl", True)
        self.metrics_log = JsonlLog(save_dir / "metrics.jsonl", True)
        self.writer = tensorboard_writer(save_dir / "runs", True, None)
        self.log.info("SyncNet on %s: mode %s, size %s, %d training / %d held-out pairs, %d steps",
                      self.train_ds.name, self.train_ds.mode, self.train_ds.size.name, len(self.train_ds),
                      len(val_ds), self.total)
        self.best: tuple[float, float] | None = None  # (accuracy, -loss)
        self.step, self.t0 = 0, time.perf_counter()
        self.progress = ProgressLine(self.total, "syncnet")
        self.calib_loader = self._calibration_loader(workers)

    def _calibration_loader(self, workers: int) -> torch.utils.data.DataLoader:
        """`--bn_samples` fixed training triplets for the BatchNorm statistics before each evaluation."""
        args = self.args
        calib_ds = SyncNetDataset(args.dataset_dir, args.size, self.train_ds.mode, "train", seed=args.seed,
                                  build_cache=False, triplets=True)
        calib_idx = np.random.default_rng(args.seed).permutation(len(calib_ds))[: args.bn_samples].tolist()
        return torch.utils.data.DataLoader(torch.utils.data.Subset(calib_ds, calib_idx),
                                           batch_size=args.batchsize, num_workers=min(workers, 2))

    def evaluate(self, epoch_label: float) -> None:
        """Held-out accuracy / AUC / loss -> metrics.jsonl and TensorBoard; best.pth when it is the best."""
        net, head, step = self.net, self.head, self.step
        if self.args.bn_samples > 0:
            precise_bn(net, self.calib_loader, self.device, self.amp)
        res = evaluate_pairs(net, head, self.val_loader, self.device, self.amp)
        res.update(step=step, epoch=epoch_label, logit_scale=head.scale.item(), logit_bias=head.bias.item())
        key = (res["accuracy"], -res["loss"])
        if self.best is None or key > self.best:
            self.best = key
            ds = self.train_ds
            meta = {"kind": "syncnet", "mode": ds.mode, "size": ds.size.name,
                    "accuracy": res["accuracy"], "val_loss": res["loss"], "epoch": epoch_label, "step": step,
                    "dataset": ds.name, "logit_scale": head.scale.item(), "logit_bias": head.bias.item()}
            save_checkpoint(self.best_path, net.state_dict(), meta)
            res["saved"] = str(self.best_path)
        self.metrics_log.write(res)
        if self.writer is not None:
            for k in ("accuracy", "auc", "loss", "p_positive", "p_negative"):
                self.writer.add_scalar(f"val/{k}", res[k], step)
        self.log.info("held-out after %d steps: accuracy %.3f, AUC %.3f, loss %.4f, p(pos) %.3f, p(neg) %.3f%s",
                      step, res["accuracy"], res["auc"], res["loss"], res["p_positive"], res["p_negative"],
                      " (best so far, saved)" if "saved" in res else "")

    def train_step(self, batch: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
        """One optimiser step on a batch (triplets with `--in_batch`, else labelled pairs); (loss, accuracy)."""
        net, head = self.net, self.head
        batch = [t.to(self.device, non_blocking=True) for t in batch]
        self.optimizer.zero_grad(set_to_none=True)  # upstream never cleared gradients
        with autocast(self.device, self.amp):
            if self.args.in_batch:
                loss, acc = triplet_loss(net, head, *batch)
            else:
                face, audio, label = batch
                a, v = net(face, audio)
                logits = head(a, v)
                loss = F.binary_cross_entropy_with_logits(logits, label)
                acc = float(((logits.detach() > 0).float() == label).float().mean())
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return loss, acc

    def log_step(self, epoch: int, loss: torch.Tensor, acc: float) -> None:
        """Loss, accuracy and learning rate -> train_log.jsonl / TensorBoard."""
        entry = {"step": self.step, "epoch": epoch + 1, "loss": loss.item(), "accuracy": acc,
                 "lr": self.scheduler.get_last_lr()[0]}
        self.train_log.write(entry)
        if self.writer is not None:
            self.writer.add_scalar("train/loss", entry["loss"], self.step)
            self.writer.add_scalar("train/accuracy", acc, self.step)

    def run_epoch(self, epoch: int) -> bool:
        """One pass over the training pairs (evaluating every `--eval_every` steps); True at the step limit."""
        args = self.args
        self.indices.set(epoch)
        self.net.train()
        for batch_i, batch in enumerate(self.loader, 1):
            loss, acc = self.train_step(batch)
            if self.progress.due(self.step):
                self.progress.emit(self.step, self.step * args.batchsize, loss.item())
            if self.step % args.log_every == 0 or self.step == self.total:
                self.log_step(epoch, loss, acc)
            done = self.step >= self.total
            if done or (args.eval_every > 0 and self.step % args.eval_every == 0 and batch_i < len(self.loader)):
                self.evaluate(epoch + batch_i / len(self.loader))
            if done:
                return True
        return False

    def fit(self) -> Path:
        """Train all epochs (or to `--max_steps`), evaluating after each; returns best.pth."""
        for epoch in range(self.args.epochs):
            if self.run_epoch(epoch):
                break
            self.evaluate(epoch + 1)
        if self.writer is not None:
            self.writer.close()
        best_acc = self.best[0] if self.best else float("nan")
        self.log.info("SyncNet done in %.0f s: best held-out accuracy %.3f -> %s", time.perf_counter() - self.t0,
                      best_acc, self.best_path)
        warn_if_chance(best_acc)
        return self.best_path


def train_syncnet(args: argparse.Namespace) -> Path:
    """Train with balanced positive / off-sync pairs; keep the best held-out accuracy as best.pth."""
    return SyncNetRun(args).fit()


def warn_if_chance(accuracy: float) -> bool:
    """Log one warning when the best held-out accuracy never beat chance by a usable margin; True then."""
    if syncnet_trusted(accuracy):
        return False
    log.warning("SyncNet never beat chance: best held-out accuracy %.3f < %.2f (chance 0.5). train_328.py "
                "will not use it as a loss and evaluate.py reports its numbers as not measurable; train longer, "
                "on more (and more varied) speech", accuracy, SYNCNET_MIN_ACCURACY)
    return True


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(description="Train the per-person SyncNet (balanced in/off-sync pairs).")
    p.add_argument("--dataset_dir", required=True, help="dataset/NAME (made by data_utils/process.py)")
    p.add_argument("--save_dir", required=True, help="syncnet_ckpt/NAME")
    add_run_args(p, d)
    p.add_argument("--eval_every", type=int, default=d["eval_every"])
    p.add_argument("--in_batch", action=argparse.BooleanOptionalAction, default=d["in_batch"],
                   help="triplets with in-batch far negatives (--no-in_batch: plain balanced pairs)")
    p.add_argument("--bn_samples", type=int, default=d["bn_samples"])
    p.add_argument("--log_every", type=int, default=d["log_every"])
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(train_syncnet, argv, build_parser())


if __name__ == "__main__":
    raise SystemExit(main())
