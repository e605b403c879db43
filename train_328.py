"""Train the generator U-Net on one person's preprocessed dataset.

    python train_328.py --dataset_dir dataset/NAME --save_dir checkpoint/NAME \
        --use_syncnet --syncnet_checkpoint syncnet_ckpt/NAME/best.pth
    python train_328.py ... --size small --max_steps 200 --device cpu      # quick CPU run
    torchrun --standalone --nproc_per_node=2 train_328.py ... --device cuda # DDP, one process per GPU
    python train_328.py ... --resume                                       # continue from latest.pth

Loss = l1_weight * L1 (mouth region counted mouth_weight times, the open mouth inner_mouth_weight times on top)
       + ssim_weight * (1 - SSIM or MS-SSIM)
       + grad_weight * image-gradient L1 + temporal_weight * adjacent-frame L1 + gan_weight * patch-critic
       hinge loss + sync_weight * SyncNet BCE
       (+ perceptual_weight * VGG19 feature MSE, only when torchvision's VGG19 weights are cached locally).
The defaults are the winner of the recipe study (docs/training-guide.md); --cpu_budget_s stops a run after
that many CPU seconds of training steps (the study's equal budget).
Writes to --save_dir: `<epoch>.pth` every --save_every epochs and at the end (unet_328.save_checkpoint
format), `latest.pth` (everything needed to resume bit-for-bit), `train_log.jsonl` (loss terms per logged
step), `metrics.jsonl` (held-out metrics per epoch) and TensorBoard events under `runs/`.
docs/training-guide.md explains every choice and how it differs from upstream.
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import pickle
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from syncnet_328 import load_syncnet_checkpoint
from synctalk import face as face_crop
from synctalk import losses, metrics
from synctalk.dataset import REFERENCE_POLICIES, AvatarDataset, DatasetError, ensure_crop_cache
from synctalk.landmarks import FaceMesh
from synctalk.metrics import SYNCNET_MIN_ACCURACY, syncnet_trusted
from synctalk.trainkit import (
    LATEST,
    CpuBudget,
    JsonlLog,
    ProgressLine,
    TrainError,
    add_run_args,
    atomic_torch_save,
    autocast,
    budget_schedule,
    init_distributed,
    make_loader,
    resolve_amp,
    resolve_device,
    resolve_workers,
    rng_state,
    run_cli,
    seed_everything,
    set_rng_state,
    setup_logging,
    tensorboard_writer,
)
from unet_328 import (
    IMAGE_INPUTS,
    CheckpointError,
    Model,
    build_unet,
    load_unet_checkpoint,
    save_checkpoint,
    state_mismatch,
    with_teeth_inputs,
)

log = logging.getLogger("train_328")

# ----------------------------------------------------------------------------------------------
# Defaults (one block; every one is a command-line flag)

DEFAULTS = dict(
    size="328",            # model size preset: 328 (upstream) or small (160 px, CPU real time)
    mode=None,             # audio mode; default: from the dataset's feature file
    epochs=100,            # passes over the training split (upstream: 100)
    max_steps=0,           # stop after this many optimizer steps (0 = no limit)
    batchsize=8,           # per process (upstream: 8)
    lr=1e-3,               # peak learning rate, Adam (upstream: 1e-3, constant)
    warmup_steps=500,      # linear warm-up, capped at 5 % of the run, then cosine decay
    min_lr_ratio=0.05,     # final learning rate / peak
    grad_clip=0.0,         # max gradient norm (0 = off, as upstream)
    l1_weight=1.0,
    ssim_weight=0.2,       # (1 - SSIM); MS-SSIM at 320 px (see --ssim)
    ssim="auto",           # auto (ms-ssim when the model side is > 160 px, else ssim), ssim, msssim
    sync_weight=0.05,      # SyncNet BCE on (pred, audio); only with --use_syncnet
    perceptual_weight=0.01,  # VGG19 conv1_1..conv3_3 feature MSE (upstream weight); only if weights cached
    mouth_weight=1.0,      # the mouth region (synctalk.face.MOUTH_BOX) counts this many times in L1 / gradient terms
    inner_mouth_weight=1.0,  # the target's open mouth (inner-lip polygon) counts this many times on top
    grad_weight=0.0,       # image-gradient L1 (high-frequency term)
    temporal_weight=0.0,   # adjacent-frame term (trains on consecutive pairs: twice the frames per step)
    gan_weight=0.0,        # patch critic on the mouth region, hinge loss
    gan_start=0.25,        # the critic's term starts after this share of the run and ramps up over 10 %
    critic_warmup=0,       # critic-only updates against the starting U-Net before the first step
    fm_weight=0.0,         # feature matching: L1 between the critic's activations of generated and real mouth
    reference="random",    # reference frame of a training sample: random, nearest (head pose), closed
    teeth_reference=False,  # a third input crop: a training frame that shows the teeth (9-channel U-Net)
    voice_aug=0.0,         # share of samples heard in a voice variant of the track (aud_whisper_voice*.npy)
    context_drop=0.0,      # share of samples whose audio window keeps only its centre (outer rows from elsewhere)
    cpu_budget_s=0.0,      # stop after this many CPU seconds of training steps (0 = no budget)
    ema=False,             # keep an exponential moving average of the weights (saved checkpoints use it)
    ema_decay=0.999,
    amp="auto",            # auto (bf16 on CUDA when supported), bf16, fp16, none; CPU always runs fp32
    device="auto",         # auto, cpu, cuda, cuda:N
    workers=-1,            # DataLoader workers per process (-1: 0 on CPU, min(8, cores per process) on CUDA)
    threads=0,             # torch intra-op CPU threads (0 = torch's default)
    save_every=5,          # write <epoch>.pth every N epochs (and always at the end)
    latest_every=500,      # also refresh latest.pth every N steps inside an epoch (0 = epoch ends only)
    log_every=10,          # steps between train_log.jsonl / TensorBoard entries
    val_every=0,           # also run the held-out validation every N steps inside an epoch (0 = epoch ends)
    val_frames=64,         # held-out frames for PSNR / SSIM / SyncNet confidence
    lmd_frames=8,          # held-out frames for the mediapipe mouth-landmark distance (0 = skip)
    seed=0,
)

def vgg19_weights_file() -> Path | None:
    """torchvision's VGG19 ImageNet weights in the local torch hub cache, if someone put them there."""
    from torchvision.models import VGG19_Weights

    name = Path(VGG19_Weights.IMAGENET1K_V1.url).name
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    return path if path.is_file() else None


class VGGFeatures(nn.Module):
    """VGG19 conv1_1 .. conv3_3 (features[0:15], output before the last ReLU, as upstream), frozen.
    Input BGR [0, 1]; converted to ImageNet-normalised RGB (upstream fed raw BGR)."""

    mean: torch.Tensor  # buffers
    std: torch.Tensor

    def __init__(self, weights: Path):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        self.features = make_layers(cfgs["E"])[:15]  # = vgg19().features[:15], without the 548 MB classifier
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = {k[len("features."):]: v for k, v in state.items()
                 if k.startswith("features.") and int(k.split(".")[1]) < 15}
        self.features.load_state_dict(state, strict=True)
        self.features.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def train(self, mode: bool = True):  # always eval (no BN here, but keep it frozen)
        return super().train(False)

    def forward(self, bgr: torch.Tensor) -> torch.Tensor:
        return self.features((bgr.flip(1) - self.mean) / self.std)


class GeneratorLoss(nn.Module):
    """Weighted sum of the active terms; returns (total, {term: detached value})."""

    pixel_weights: torch.Tensor  # buffer

    def __init__(self, inner: int, l1_weight: float, ssim_weight: float, ssim_kind: str,
                 sync_weight: float, perceptual_weight: float, syncnet: nn.Module | None = None,
                 sync_head: tuple[float, float] | None = None, vgg: nn.Module | None = None,
                 mouth_weight: float = 1.0, grad_weight: float = 0.0, temporal_weight: float = 0.0,
                 gan_weight: float = 0.0, adversarial: losses.AdversarialTerm | None = None,
                 inner_mouth_weight: float = 1.0, fm_weight: float = 0.0):
        super().__init__()
        if ssim_kind == "auto":
            ssim_kind = "msssim" if inner > 160 else "ssim"
        if ssim_kind == "msssim" and inner <= 160:
            raise TrainError(f"MS-SSIM needs images larger than 160 px (model side {inner}); use --ssim ssim")
        self.w = {"l1": l1_weight, "ssim": ssim_weight, "sync": sync_weight if syncnet is not None else 0.0,
                  "perceptual": perceptual_weight if vgg is not None else 0.0, "grad": grad_weight,
                  "temporal": temporal_weight, "gan": gan_weight if adversarial is not None else 0.0,
                  "fm": fm_weight if adversarial is not None else 0.0}
        self.mouth_weight, self.inner_mouth_weight, self.adversarial = mouth_weight, inner_mouth_weight, adversarial
        self.register_buffer("pixel_weights", losses.region_weights(inner, mouth_weight), persistent=False)
        self.ssim_kind = ssim_kind
        self.syncnet, self.vgg = syncnet, vgg
        self.sync_head = sync_head or (1.0, 0.0)
        if syncnet is not None:
            syncnet.eval().requires_grad_(False)

    def active(self) -> dict[str, float]:
        return {k: v for k, v in self.w.items() if v > 0}

    def train(self, mode: bool = True):  # the frozen nets stay in eval mode (BN running statistics)
        super().train(mode)
        for net in (self.syncnet, self.vgg):
            if net is not None:
                net.eval()
        return self

    def sync_logits(self, pred: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """The frozen SyncNet's logit for (generated, audio); only with a SyncNet."""
        if self.syncnet is None:
            raise TrainError("sync_logits needs a SyncNet (--use_syncnet)")
        a, v = self.syncnet(pred, audio)
        scale, bias = self.sync_head
        return scale * (a.float() * v.float()).sum(1) + bias

    def forward(self, pred: torch.Tensor, label: torch.Tensor, audio: torch.Tensor, gan_scale: float = 0.0,
                pairs: bool = False, mouth_mask: torch.Tensor | None = None):
        """(weighted total, {term: detached value}); `pairs`: the batch is consecutive frame pairs
        (the temporal term is computed only then); `gan_scale`: the critic term's ramp factor;
        `mouth_mask` `[B, 1, S, S]`: the targets' open mouths, counted `inner_mouth_weight` times in the
        L1 and gradient terms."""
        with torch.autocast(pred.device.type, enabled=False):  # SSIM's local variances need fp32 (bf16: 7x off)
            terms = self.pixel_terms(pred.float(), label.float(), pairs, mouth_mask)
        if (self.w["gan"] > 0 or self.w["fm"] > 0) and gan_scale > 0 and self.adversarial is not None:
            hinge, fm = self.adversarial.generator_terms(pred, label if self.w["fm"] > 0 else None)
            if self.w["gan"] > 0:
                terms["gan"] = gan_scale * hinge
            if fm is not None:
                terms["fm"] = gan_scale * fm
        if self.w["sync"] > 0:
            logits = self.sync_logits(pred, audio)
            terms["sync"] = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        if self.w["perceptual"] > 0 and self.vgg is not None:
            terms["perceptual"] = F.mse_loss(self.vgg(pred).float(), self.vgg(label).float())
        total = sum(self.w[k] * v for k, v in terms.items())
        return total, {k: v.detach() for k, v in terms.items()}

    def pixel_terms(self, pred: torch.Tensor, label: torch.Tensor, pairs: bool,
                    mouth_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """L1, image-gradient, adjacent-frame and SSIM terms of fp32 images (`forward` runs them outside
        autocast)."""
        from pytorch_msssim import ms_ssim, ssim

        terms: dict[str, torch.Tensor] = {}
        weights = self.pixel_weights if self.mouth_weight != 1.0 else None
        if mouth_mask is not None and self.inner_mouth_weight != 1.0:
            weights = losses.with_mask_weight(weights, mouth_mask.float(), self.inner_mouth_weight)
        terms["l1"] = (losses.weighted_l1(pred, label, weights) if weights is not None
                       else F.l1_loss(pred, label))
        if self.w["grad"] > 0:
            terms["grad"] = losses.gradient_l1(pred, label, weights)
        if self.w["temporal"] > 0 and pairs:
            terms["temporal"] = losses.temporal_l1(pred, label)
        if self.w["ssim"] > 0:
            fn = ms_ssim if self.ssim_kind == "msssim" else ssim
            terms["ssim"] = 1.0 - fn(pred, label, data_range=1.0, size_average=True)
        return terms


# ----------------------------------------------------------------------------------------------
# EMA


class EMA:
    """Exponential moving average of a model's parameters (buffers copied)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # warm-up: early on the average follows the model closely (decay (1+n)/(10+n) < `decay`), otherwise
        # the random initial weights would dominate the average for thousands of steps
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - decay)
        for avg, live in zip(self.model.buffers(), model.buffers()):
            avg.copy_(live)

    def state_dict(self) -> dict:
        return {"weights": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if "weights" in state:
            self.updates = int(state["updates"])
            state = state["weights"]
        self.model.load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# Held-out validation


class Validator:
    """PSNR, SSIM, SyncNet confidence on up to `val_frames` held-out frames and the mouth-landmark
    distance (mediapipe lip points of the generated frame pasted back vs the real frame) on `lmd_frames`."""

    def __init__(self, dataset: AvatarDataset, val_frames: int, lmd_frames: int, device: torch.device,
                 loss: GeneratorLoss, amp: torch.dtype | None):
        self.ds, self.device, self.loss, self.amp = dataset, device, loss, amp
        n = len(dataset)
        self.positions = np.unique(np.linspace(0, n - 1, min(n, val_frames)).round().astype(int))
        self.lmd_positions = (np.unique(np.linspace(0, n - 1, min(n, lmd_frames)).round().astype(int))
                              if lmd_frames > 0 else np.zeros(0, int))
        self._mesh: FaceMesh | None = None
        self.paster = face_crop.Paster(dataset.size)  # the engine's paste: validation sees what users see
        self._real_lips: dict[int, np.ndarray] = {}
        self._lmd_disabled = lmd_frames <= 0

    @torch.no_grad()
    def predict(self, model: nn.Module, positions: np.ndarray, batch: int = 16):
        """(pred uint8 [N, S, S, 3], label uint8, image float [N, 6, S, S] cpu, sync confidence [N] or None)."""
        preds, labels, images, conf = [], [], [], []
        for k in range(0, len(positions), batch):
            items = [self.ds[int(i)] for i in positions[k:k + batch]]
            image, audio, label = (torch.stack(t) for t in zip(*items))
            x, a = image.to(self.device), audio.to(self.device)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.amp):
                pred = model(x, a)
                if self.loss.syncnet is not None:
                    conf.append(torch.sigmoid(self.loss.sync_logits(pred, a)).float().cpu())
            preds.append((pred.float().clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu())
            labels.append((label * 255).round().to(torch.uint8).permute(0, 2, 3, 1))
            images.append(image)
        return (torch.cat(preds).numpy(), torch.cat(labels).numpy(), torch.cat(images),
                torch.cat(conf).numpy() if conf else None)

    def lip_points(self, frame_bgr: np.ndarray, box: np.ndarray) -> np.ndarray:
        """Lip landmarks of `frame_bgr` in crop coordinates of `box` (NaN where no face); needs the mesh."""
        if self._mesh is None:
            raise TrainError("the mouth-landmark distance needs mediapipe's face mesh")
        lm = self._mesh(frame_bgr)[None]
        return metrics.to_crop_coords(metrics.lip_points(lm), np.asarray(box)[None], self.ds.size.crop)[0]

    def mouth_landmark_distance(self, model: nn.Module) -> tuple[float, float]:
        """(LMD in crop pixels over the frames where both faces were found, share of such frames)."""
        if self._lmd_disabled or len(self.lmd_positions) == 0:
            return float("nan"), 0.0
        import cv2


        try:
            if self._mesh is None:
                self._mesh = FaceMesh()
            boxes = np.asarray(face_crop.dataset_crop_boxes(self.ds.dataset_dir))
        except Exception as exc:  # no mediapipe or no frames: report the other metrics anyway
            log.warning("mouth-landmark distance disabled: %s", exc)
            self._lmd_disabled = True
            return float("nan"), 0.0
        pred, _, _, _ = self.predict(model, self.lmd_positions)
        gen, real = [], []
        b, s = self.ds.size.border, self.ds.size.inner
        for p, frame_pos in zip(pred, self.lmd_positions):
            idx = int(self.ds.frames[frame_pos])
            frame = cv2.imread(str(self.ds.dataset_dir / "full_body_img" / f"{idx}.jpg"))
            if frame is None:
                continue
            if idx not in self._real_lips:
                self._real_lips[idx] = self.lip_points(frame, boxes[idx])
            crop = np.array(self.ds.crops[idx])
            crop[b:b + s, b:b + s] = p
            gen.append(self.lip_points(self.paster(frame, crop, boxes[idx]), boxes[idx]))
            real.append(self._real_lips[idx])
        if not gen:
            return float("nan"), 0.0
        gen_a, real_a = np.stack(gen), np.stack(real)
        found = ~(np.isnan(gen_a).any(axis=(1, 2)) | np.isnan(real_a).any(axis=(1, 2)))
        return metrics.landmark_distance(gen_a, real_a), float(found.mean())

    def __call__(self, model: nn.Module) -> tuple[dict, torch.Tensor]:
        """Metrics dict and an image grid [3, H, W] RGB (rows: reference, masked, generated, real)."""

        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        pred, label, image, conf = self.predict(model, self.positions)
        out = {"psnr": metrics.video_psnr(pred, label), "ssim": metrics.ssim(pred, label)}
        if conf is not None:
            out["sync_confidence"] = float(conf.mean())
        lmd, found = self.mouth_landmark_distance(model)
        if not math.isnan(lmd):
            out["mouth_lmd"], out["lmd_found"] = lmd, found
        out["val_seconds"] = time.perf_counter() - t0
        model.train(was_training)
        k = min(4, len(pred))
        to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a[:k])).permute(0, 3, 1, 2).float() / 255  # noqa: E731
        rows = [image[:k, :3], image[:k, 3:6], to_t(pred), to_t(label)]
        from torchvision.utils import make_grid

        grid = make_grid(torch.cat(rows), nrow=k, padding=2).flip(0)  # BGR -> RGB for display
        return out, grid


# ----------------------------------------------------------------------------------------------
# Training


def load_frozen_syncnet(path: str | None, mode: str, size: str, device: torch.device, require: bool = False):
    """(SyncNet in eval mode with frozen parameters, (logit scale, bias)); (None, None) with one warning
    when its held-out accuracy is below SYNCNET_MIN_ACCURACY (a loss from a SyncNet at chance level
    only adds noise), or TrainError then with `require`."""
    if not path:
        raise TrainError("--use_syncnet needs --syncnet_checkpoint PATH (train one with syncnet_328.py)")
    try:
        net, meta = load_syncnet_checkpoint(path, device=device, expect_mode=mode, expect_size=size)
    except CheckpointError as exc:
        raise TrainError(str(exc)) from None
    acc = meta.get("accuracy")
    acc = float(acc) if acc is not None else float("nan")
    if not syncnet_trusted(acc):
        problem = (f"SyncNet {path} has held-out accuracy {acc:.3f}, below {SYNCNET_MIN_ACCURACY} "
                   "(chance is 0.5): it cannot judge sync")
        if require:
            raise TrainError(f"{problem}; train a better SyncNet or drop --require_syncnet")
        log.warning("%s; training WITHOUT the sync loss term (--require_syncnet stops instead)", problem)
        return None, None
    log.info("SyncNet %s: held-out accuracy %.3f", path, acc)
    return net, (float(meta.get("logit_scale", 1.0)), float(meta.get("logit_bias", 0.0)))


class Run:
    """One training run of `args`: datasets, networks, optimiser state and logs (`__init__`, resuming
    from `latest.pth` with `--resume`), then `fit()`: the epochs, validation and checkpoints."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dist = dist = init_distributed(args.device)
        setup_logging(dist.is_main)
        self.device = device = resolve_device(args.device, dist)
        self.amp = resolve_amp(args.amp, device)
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        self.save_dir = Path(args.save_dir)
        seed_everything(args.seed + dist.rank)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.train_ds, self.val_ds = self._datasets()
        self.model, self.loss_fn, self.adversarial = self._networks()
        workers = resolve_workers(args.workers, device, dist.world)
        self.loader, self.indices = make_loader(self.train_ds, args.batchsize, dist, args.seed, workers, device)
        self.steps_per_epoch = len(self.loader)
        self.total = args.epochs * self.steps_per_epoch
        if args.max_steps > 0:
            self.total = min(self.total, args.max_steps)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=args.lr)
        self.budget = CpuBudget(args.cpu_budget_s)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, budget_schedule(self.total, args.warmup_steps, args.min_lr_ratio, self.budget))
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)
        self.ema = EMA(self.model, args.ema_decay) if args.ema else None
        self.epoch, self.skip, self.step = 0, 0, 0
        self.history: list[dict] = []
        self.latest = self.save_dir / LATEST
        if args.resume:
            self._resume()
        start = self.step if args.resume else None
        self.train_log = JsonlLog(self.save_dir / "train_log.jsonl", dist.is_main, start)
        self.metrics_log = JsonlLog(self.save_dir / "metrics.jsonl", dist.is_main, start)
        self.writer = tensorboard_writer(self.save_dir / "runs", dist.is_main, start)
        self.validator = (Validator(self.val_ds, args.val_frames, args.lmd_frames, device, self.loss_fn, self.amp)
                          if dist.is_main else None)
        self.net: nn.Module = self.model
        if dist.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.net.train()
        self.loss_fn.train()
        self.last_ckpt: Path | None = None
        self.t_start, self.samples = time.perf_counter(), 0
        self.progress: ProgressLine | None = None  # made when the loop starts (fit)

    # -- construction ---------------------------------------------------------------------------

    def _datasets(self) -> tuple[AvatarDataset, AvatarDataset]:
        """The training and held-out splits (the main process builds the crop cache first)."""
        args, dist = self.args, self.dist
        if dist.is_main:  # one process builds the crop cache, the others wait for it
            try:
                ensure_crop_cache(args.dataset_dir, args.size)
            except DatasetError as exc:
                raise TrainError(str(exc)) from None
        dist.barrier()
        train_ds = AvatarDataset(args.dataset_dir, args.size, args.mode, "train", seed=args.seed, build_cache=False,
                                 reference=args.reference, pairs=args.temporal_weight > 0, voice_aug=args.voice_aug,
                                 inner_mouth=args.inner_mouth_weight != 1.0, teeth=args.teeth_reference,
                                 context_drop=args.context_drop)
        val_ds = AvatarDataset(args.dataset_dir, args.size, train_ds.mode, "val", seed=args.seed, build_cache=False,
                               teeth=args.teeth_reference)
        if train_ds.teeth_pool is not None and self.dist.is_main:
            log.info("teeth reference: frame %d for inference, drawn from the %d frames showing the most teeth in "
                     "training", train_ds.teeth_frame, len(train_ds.teeth_pool))
        return train_ds, val_ds

    def _networks(self) -> tuple[nn.Module, GeneratorLoss, losses.AdversarialTerm | None]:
        """The U-Net (from `--init_checkpoint` when given) and the loss with its frozen helpers."""
        args, device = self.args, self.device
        mode, size = self.train_ds.mode, self.train_ds.size
        model = build_unet(mode, size.name, teeth=args.teeth_reference).to(device)
        if args.init_checkpoint and not args.resume:
            start_from(model, args.init_checkpoint, mode, size.name)
        if self.train_ds.teeth_frame is not None:  # the crop inference appends (training samples bring theirs)
            model.set_teeth(self.train_ds.interior(self.train_ds.teeth_frame))
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        syncnet, head = (load_frozen_syncnet(args.syncnet_checkpoint, mode, size.name, device, args.require_syncnet)
                         if args.use_syncnet or args.require_syncnet else (None, None))
        vgg_file = vgg19_weights_file() if args.perceptual_weight > 0 else None
        vgg = VGGFeatures(vgg_file).to(device) if vgg_file else None
        critic = args.gan_weight > 0 or args.fm_weight > 0
        adversarial = losses.AdversarialTerm(device, args.gan_start) if critic else None
        if adversarial is not None and args.init_critic and not args.resume:
            carry_critic(adversarial, args.init_critic, device)
        loss_fn = GeneratorLoss(size.inner, args.l1_weight, args.ssim_weight, args.ssim, args.sync_weight,
                                args.perceptual_weight, syncnet, head, vgg, mouth_weight=args.mouth_weight,
                                grad_weight=args.grad_weight, temporal_weight=args.temporal_weight,
                                gan_weight=args.gan_weight, adversarial=adversarial,
                                inner_mouth_weight=args.inner_mouth_weight, fm_weight=args.fm_weight).to(device)
        if self.dist.is_main:
            log.info("dataset %s: mode %s, size %s, %d training / %d held-out frames", self.train_ds.name, mode,
                     size.name, len(self.train_ds), len(self.val_ds))
            log.info("reference policy %s; mouth region x%g, open mouth x%g on top; loss terms: %s%s", args.reference,
                     args.mouth_weight, args.inner_mouth_weight,
                     ", ".join(f"{k} x{v:g}" for k, v in loss_fn.active().items()),
                     "" if vgg else " (VGG19 perceptual term off: no torchvision VGG19 weights in "
                     f"{torch.hub.get_dir()}/checkpoints)")
        return model, loss_fn, adversarial

    def _resume(self) -> None:
        """Continue from `latest.pth`: weights, optimiser, schedule, EMA, position, budget, RNG."""
        args = self.args
        if not self.latest.is_file():
            raise TrainError(f"--resume: {self.latest} not found (nothing to resume; drop --resume to start over)")
        blob = torch.load(self.latest, map_location=self.device, weights_only=True)
        mismatch = state_mismatch(blob["state_dict"], self.model.state_dict())
        if mismatch:
            raise TrainError(f"--resume: {self.latest} holds another network ({mismatch}); resume with the options "
                             f"of the saved run (e.g. --teeth_reference), or drop --resume")
        self.model.load_state_dict(blob["state_dict"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        self.scaler.load_state_dict(blob["scaler"])
        if self.ema is not None:
            if blob.get("ema") is not None:
                self.ema.load_state_dict(blob["ema"])
            else:
                self.ema = EMA(self.model, args.ema_decay)
        self.epoch, self.skip, self.step = blob["epoch"], blob["batch_in_epoch"], blob["step"]
        self.budget.used = float(blob.get("cpu_used", 0.0))
        if self.adversarial is not None and blob.get("adversarial") is not None:
            self.adversarial.load_state_dict(blob["adversarial"])
        self.history = list(blob.get("history", []))
        set_rng_state(blob["rng"][min(self.dist.rank, len(blob["rng"]) - 1)])
        old = blob.get("args", {})
        for key in ("batchsize", "lr", "epochs", "max_steps", "warmup_steps", "seed", "size"):
            if key in old and str(old[key]) != str(getattr(args, key)):
                log.warning("--resume with %s=%s, the saved run used %s: the continuation will differ",
                            key, getattr(args, key), old[key])
        if self.dist.is_main:
            log.info("resuming from %s at epoch %d, step %d", self.latest, self.epoch, self.step)

    # -- checkpoints and validation -------------------------------------------------------------

    def save_latest(self, epoch: int, skip: int) -> None:
        """Everything `--resume` needs, atomically, in `latest.pth` (every process's RNG state)."""
        states = [rng_state()]
        if self.dist.world > 1:
            gathered: list = [None] * self.dist.world
            torch.distributed.all_gather_object(gathered, states[0])
            states = gathered
        if not self.dist.is_main:
            return
        ema, adversarial = self.ema, self.adversarial
        atomic_torch_save({
            "state_dict": self.model.state_dict(),
            "meta": unet_meta(self.train_ds, epoch, self.step, ema is not None),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "ema": ema.state_dict() if ema else None,
            "epoch": epoch, "batch_in_epoch": skip, "step": self.step, "rng": states, "history": self.history,
            "cpu_used": self.budget.used, "adversarial": adversarial.state_dict() if adversarial else None,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()},
        }, self.latest)

    def validate(self, epoch_label: float, save_numbered: bool) -> Path | None:
        """Held-out metrics -> metrics.jsonl / TensorBoard; with `save_numbered`, also <epoch>.pth."""
        assert self.validator is not None
        eval_model = self.ema.model if self.ema is not None else self.model
        metrics, grid = self.validator(eval_model)
        elapsed = time.perf_counter() - self.t_start
        entry = {"step": self.step, "epoch": epoch_label, **metrics,
                 "samples_per_s": self.samples / elapsed if elapsed > 0 else 0.0, "train_cpu_s": self.budget.used}
        path = None
        if save_numbered:
            path = self.save_dir / f"{int(epoch_label)}.pth"
            meta = unet_meta(self.train_ds, int(epoch_label), self.step, self.ema is not None)
            meta["val"] = {k: v for k, v in metrics.items() if k != "val_seconds"}
            save_checkpoint(path, eval_model.state_dict(), meta)
            entry["checkpoint"] = str(path)
        self.metrics_log.write(entry)
        self.history.append(entry)
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"val/{k}", v, self.step)
            self.writer.add_image("val/reference_masked_generated_real", grid, self.step)
            self.writer.flush()
        log.info("epoch %s (step %d): %s", f"{epoch_label:g}", self.step,
                 ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return path

    # -- the loop -------------------------------------------------------------------------------

    def train_step(self, image: torch.Tensor, audio: torch.Tensor, label: torch.Tensor,
                   mouth_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """One optimiser step on a batch (its CPU time counted by the budget); (loss, terms, samples).
        `mouth_mask`: the targets' open-mouth masks (datasets built with `inner_mouth`)."""
        device, args, adversarial = self.device, self.args, self.adversarial
        self.budget.start()
        pairs = image.dim() == 5  # temporal pairs: consecutive rows once on the device
        image, audio, label, mouth_mask = self._on_device(image, audio, label, mouth_mask)
        self.optimizer.zero_grad(set_to_none=True)  # upstream's SyncNet forgot this; we never do
        gan_scale = adversarial.scale(max(self.step / self.total, self.budget.fraction)) if adversarial else 0.0
        with autocast(device, self.amp):
            pred = self.net(image, audio)
            loss, terms = self.loss_fn(pred, label, audio, gan_scale=gan_scale, pairs=pairs, mouth_mask=mouth_mask)
        self.scaler.scale(loss).backward()
        if args.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        if adversarial is not None and gan_scale > 0:
            terms["critic"] = torch.tensor(adversarial.critic_step(pred, label), device=loss.device)
        self.budget.stop()
        self.step += 1
        return loss, terms, len(image)

    def _on_device(self, image: torch.Tensor, audio: torch.Tensor, label: torch.Tensor,
                   mouth_mask: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A loader batch on the training device: temporal pairs [B, 2, ...] become consecutive rows [2B, ...],
        the image channels-last on CUDA."""
        if image.dim() == 5:
            image, audio, label = (t.flatten(0, 1) for t in (image, audio, label))
            mouth_mask = mouth_mask.flatten(0, 1) if mouth_mask is not None else None
        device = self.device
        image, audio, label = (t.to(device, non_blocking=True) for t in (image, audio, label))
        mouth_mask = mouth_mask.to(device, non_blocking=True) if mouth_mask is not None else None
        if device.type == "cuda":
            image = image.contiguous(memory_format=torch.channels_last)
        return image, audio, label, mouth_mask

    def warm_critic(self, steps: int) -> None:
        """`steps` updates of the patch critic alone against the starting U-Net (frozen, no optimizer step),
        so a continued stage's critic knows generated from real before the generator hears from it (a stage
        restarted with an untrained critic gives back detail first). Its CPU time is logged, not budgeted."""
        adversarial = self.adversarial
        if adversarial is None or steps <= 0 or len(self.loader) == 0:
            return
        t0, done, losses_seen, shown = time.process_time(), 0, [], time.monotonic()
        self.indices.set(self.epoch, 0)
        self.net.eval()
        while done < steps:
            for image, audio, label, *rest in self.loader:
                image, audio, label, _ = self._on_device(image, audio, label, rest[0] if rest else None)
                with torch.no_grad(), autocast(self.device, self.amp):
                    pred = self.net(image, audio)
                losses_seen.append(adversarial.critic_step(pred, label))
                done += 1
                if time.monotonic() - shown >= 20 or done == steps:  # a line at least every 30 s
                    shown = time.monotonic()
                    log.info("critic warm-up %d/%d: critic loss %.3f (mean of the last 50)", done, steps,
                             float(np.mean(losses_seen[-50:])))
                if done >= steps:
                    break
        self.net.train()
        self.train_log.write({"step": 0, "critic_warmup_steps": steps,
                              "critic_warmup_loss": float(np.mean(losses_seen[-50:])),
                              "critic_warmup_cpu_s": round(time.process_time() - t0, 1)})

    def log_step(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], pbar) -> None:
        """Loss terms and learning rate -> train_log.jsonl / TensorBoard (averaged over processes)."""
        values_t = torch.stack([loss.detach().float()] + [terms[k].float() for k in sorted(terms)])
        if self.dist.world > 1:
            torch.distributed.all_reduce(values_t)
            values_t /= self.dist.world
        values = values_t.tolist()
        entry = {"step": self.step, "epoch": self.epoch + 1, "loss": values[0],
                 **dict(zip(sorted(terms), values[1:])), "lr": self.scheduler.get_last_lr()[0]}
        self.train_log.write(entry)
        if self.writer is not None:
            for k, v in entry.items():
                if k not in ("step", "epoch"):
                    self.writer.add_scalar(f"train/{k}", v, self.step)
        if pbar is not None:
            pbar.set_postfix(loss=f"{values[0]:.4f}")

    def run_epoch(self) -> bool:
        """The rest of the current epoch (or up to the step limit / budget), then validation, the epoch
        checkpoint and `latest.pth`; True when the run is over."""
        args, dist = self.args, self.dist
        self.indices.set(self.epoch, self.skip * args.batchsize)
        pbar = None
        if dist.is_main:
            from tqdm import tqdm

            pbar = tqdm(total=self.steps_per_epoch, initial=self.skip, desc=f"epoch {self.epoch + 1}/{args.epochs}",
                        disable=None, leave=False)
        batch_i, done = self.skip, False
        for batch in self.loader:
            loss, terms, n = self.train_step(*batch)
            batch_i += 1
            self.samples += n * dist.world
            if pbar is not None:
                pbar.update(1)
            if self.progress is not None and self.progress.due(self.step):
                self.progress.emit(self.step, self.samples, loss.item())
            if self.step % args.log_every == 0 or self.step == self.total:
                self.log_step(loss, terms, pbar)
            done = self.step >= self.total or self.budget.spent
            if done:
                break
            self._within_epoch(batch_i)
        if pbar is not None:
            pbar.close()
        return self._end_epoch(batch_i, done)

    def _within_epoch(self, batch_i: int) -> None:
        """Validation (`--val_every`) and `latest.pth` (`--latest_every`) inside an epoch."""
        args, step = self.args, self.step
        if args.val_every > 0 and step % args.val_every == 0 and batch_i < self.steps_per_epoch:
            if self.dist.is_main:
                self.validate(round(self.epoch + batch_i / self.steps_per_epoch, 3), False)
                self.net.train()
            self.dist.barrier()
        if args.latest_every > 0 and step % args.latest_every == 0 and batch_i < self.steps_per_epoch:
            self.save_latest(self.epoch, batch_i)

    def _end_epoch(self, batch_i: int, done: bool) -> bool:
        """Advance the position, validate, save the epoch checkpoint and `latest.pth`; True when over."""
        epoch_done = batch_i >= self.steps_per_epoch
        if epoch_done:
            self.epoch, self.skip = self.epoch + 1, 0
        else:
            self.skip = batch_i
        label_epoch = self.epoch if epoch_done else self.epoch + 1  # number of (possibly partial) epochs trained
        final = done or self.epoch >= self.args.epochs or self.budget.spent
        if self.dist.is_main:
            saved = self.validate(label_epoch, label_epoch % self.args.save_every == 0 or final)
            self.last_ckpt = saved or self.last_ckpt
        self.save_latest(self.epoch, self.skip)
        self.dist.barrier()
        return final

    def fit(self) -> Path:
        """Train to the end (epochs, `--max_steps` or the CPU budget); returns the final `<epoch>.pth`."""
        done = self.step >= self.total or self.budget.spent
        if done and self.dist.is_main:
            log.info("nothing to do: step %d already reached the limit %d", self.step, self.total)
        self.t_start, self.samples = time.perf_counter(), 0
        self.progress = ProgressLine(self.total, "train_328", start_step=self.step,
                                     enabled=None if self.dist.is_main else False, budget=self.budget)
        if not self.args.resume and self.step == 0:
            self.warm_critic(self.args.critic_warmup)
        while not done and self.epoch < self.args.epochs:
            done = self.run_epoch()
        if self.writer is not None:
            self.writer.close()
        if self.last_ckpt is None:  # resumed a finished run: the newest epoch checkpoint is the result
            existing = sorted((int(p.stem), p) for p in self.save_dir.glob("*.pth") if p.stem.isdigit())
            self.last_ckpt = existing[-1][1] if existing else self.latest
        if self.dist.world > 1:
            torch.distributed.destroy_process_group()
        return self.last_ckpt


def train(args: argparse.Namespace) -> Path:
    """Run the training described by `args`; returns the final `<epoch>.pth`."""
    return Run(args).fit()


def start_from(model: Model, path: str, mode: str, size: str) -> None:
    """Load the weights of U-Net checkpoint `path` into `model` (fine-tuning; the optimizer starts fresh);
    TrainError when it is another mode or size. A model without the teeth input starts a teeth-reference
    model with the new input's weights at zero (`with_teeth_inputs`)."""
    try:
        init, meta = load_unet_checkpoint(path, expect_mode=mode)
    except CheckpointError as exc:
        raise TrainError(f"--init_checkpoint: {exc}") from None
    if meta.get("size", "328") != size:
        raise TrainError(f"--init_checkpoint: {path} is a size {meta.get('size')} model, training size {size}")
    state = init.state_dict()
    if model.n_channels != init.n_channels:
        if init.n_channels != IMAGE_INPUTS:
            raise TrainError(f"--init_checkpoint: {path} takes a teeth reference; train it with --teeth_reference")
        state = with_teeth_inputs(state, model.size.inner)
    model.load_state_dict(state)
    log.info("starting from the weights of %s (epoch %s, step %s)", path, meta.get("epoch"), meta.get("step"))


def carry_critic(adversarial: losses.AdversarialTerm, path: str, device: torch.device) -> None:
    """Load the patch critic and its optimizer from another run's `latest.pth` (a continuation keeps the
    critic the generator was trained against); TrainError when the file holds none."""
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        raise TrainError(f"--init_critic: cannot read {path} ({exc})") from None
    state = blob.get("adversarial") if isinstance(blob, dict) else None
    if state is None:
        raise TrainError(f"--init_critic: {path} holds no patch critic (give the latest.pth of a run trained with "
                         f"--gan_weight or --fm_weight)")
    adversarial.load_state_dict(state)
    log.info("patch critic carried over from %s (step %s)", path, blob.get("step"))


def unet_meta(ds: AvatarDataset, epoch: int, step: int, ema: bool) -> dict:
    meta = {"kind": "unet", "mode": ds.mode, "size": ds.size.name, "epoch": epoch, "step": step,
            "dataset": ds.name, "ema": ema, "val_fraction": 0.1}
    if ds.teeth_frame is not None:
        meta["teeth_frame"] = ds.teeth_frame
    return meta


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(description="Train the lip-sync U-Net on one preprocessed dataset.")
    p.add_argument("--dataset_dir", required=True, help="dataset/NAME (made by data_utils/process.py)")
    p.add_argument("--save_dir", required=True, help="checkpoint/NAME")
    p.add_argument("--use_syncnet", action="store_true", help="add the SyncNet loss term")
    p.add_argument("--syncnet_checkpoint", default=None, help="syncnet_ckpt/NAME/best.pth")
    p.add_argument("--require_syncnet", action="store_true",
                   help=f"stop when the SyncNet's held-out accuracy is below {SYNCNET_MIN_ACCURACY} "
                        "(default: warn and train without the sync term)")
    add_run_args(p, d)
    p.add_argument("--grad_clip", type=float, default=d["grad_clip"])
    p.add_argument("--l1_weight", type=float, default=d["l1_weight"])
    p.add_argument("--ssim_weight", type=float, default=d["ssim_weight"])
    p.add_argument("--ssim", default=d["ssim"], choices=["auto", "ssim", "msssim"])
    p.add_argument("--sync_weight", type=float, default=d["sync_weight"])
    p.add_argument("--perceptual_weight", type=float, default=d["perceptual_weight"])
    p.add_argument("--mouth_weight", type=float, default=d["mouth_weight"],
                   help="weight of the mouth region in the L1 and gradient terms (1 = uniform)")
    p.add_argument("--inner_mouth_weight", type=float, default=d["inner_mouth_weight"],
                   help="the target's open mouth (teeth, tongue; from its landmarks) counts this many times, on "
                        "top of --mouth_weight, in the L1 and gradient terms (1 = off, < 1 = less)")
    p.add_argument("--grad_weight", type=float, default=d["grad_weight"], help="image-gradient L1 term")
    p.add_argument("--temporal_weight", type=float, default=d["temporal_weight"],
                   help="adjacent-frame term (each sample becomes a pair of consecutive frames)")
    p.add_argument("--gan_weight", type=float, default=d["gan_weight"], help="patch critic on the mouth region")
    p.add_argument("--gan_start", type=float, default=d["gan_start"],
                   help="share of the run before the critic's term starts")
    p.add_argument("--fm_weight", type=float, default=d["fm_weight"],
                   help="feature matching: L1 between the patch critic's hidden activations of the generated and "
                        "the real mouth (trains the critic even with --gan_weight 0; follows --gan_start)"),
    p.add_argument("--reference", default=d["reference"], choices=list(REFERENCE_POLICIES),
                   help="reference frame of a training sample: random, nearest head pose, closed mouth")
    p.add_argument("--teeth_reference", action="store_true", default=d["teeth_reference"],
                   help="give the U-Net a third input crop, a training frame that shows the teeth (a 9-channel "
                        "model; the crop of the first such frame is saved in the checkpoint and used at inference)")
    p.add_argument("--voice_aug", type=float, default=d["voice_aug"],
                   help="share of samples heard in one of the dataset's voice variants (aud_whisper_voice*.npy)")
    p.add_argument("--context_drop", type=float, default=d["context_drop"],
                   help="share of samples whose audio window keeps only the 7 frames round the target, its outer "
                        "rows taken from another training frame (the mouth cannot lean on the surrounding words)")
    p.add_argument("--cpu_budget_s", type=float, default=d["cpu_budget_s"],
                   help="stop after this many CPU seconds spent in training steps (0 = no budget)")
    p.add_argument("--ema", action="store_true", default=d["ema"])
    p.add_argument("--ema_decay", type=float, default=d["ema_decay"])
    p.add_argument("--save_every", type=int, default=d["save_every"])
    p.add_argument("--latest_every", type=int, default=d["latest_every"])
    p.add_argument("--log_every", type=int, default=d["log_every"])
    p.add_argument("--val_every", type=int, default=d["val_every"])
    p.add_argument("--val_frames", type=int, default=d["val_frames"])
    p.add_argument("--lmd_frames", type=int, default=d["lmd_frames"])
    p.add_argument("--resume", action="store_true", help=f"continue from SAVE_DIR/{LATEST}")
    p.add_argument("--init_checkpoint", default=None,
                   help="start from this U-Net checkpoint's weights (fine-tuning; fresh optimizer and schedule)")
    p.add_argument("--init_critic", default=None,
                   help=f"start the patch critic (and its optimizer) from another run's {LATEST} instead of fresh")
    p.add_argument("--critic_warmup", type=int, default=d["critic_warmup"],
                   help="before the first step, train the patch critic alone for this many batches against the "
                        "starting U-Net (a continued stage whose critic was not kept; its CPU time is not budgeted)")
    return p


def check_args(args: argparse.Namespace) -> None:
    for key in ("epochs", "batchsize", "save_every", "log_every"):
        if getattr(args, key) < 1:
            raise TrainError(f"--{key} must be >= 1, got {getattr(args, key)}")
    if args.lr <= 0:
        raise TrainError(f"--lr must be > 0, got {args.lr}")
    if min(args.max_steps, args.latest_every, args.val_every) < 0:
        raise TrainError("--max_steps, --latest_every and --val_every must be >= 0")
    if min(args.mouth_weight, args.grad_weight, args.temporal_weight, args.gan_weight, args.fm_weight,
           args.cpu_budget_s) < 0:
        raise TrainError("--mouth_weight, --grad_weight, --temporal_weight, --gan_weight, --fm_weight and --cpu_budget_s "
                         "must be >= 0")
    if args.inner_mouth_weight <= 0:
        raise TrainError(f"--inner_mouth_weight must be > 0, got {args.inner_mouth_weight}")
    if not 0.0 <= args.gan_start < 1.0:
        raise TrainError(f"--gan_start must be in [0, 1), got {args.gan_start}")
    if not 0.0 < args.ema_decay < 1.0:
        raise TrainError(f"--ema_decay must be in (0, 1), got {args.ema_decay}")
    if not 0.0 <= args.voice_aug <= 1.0:
        raise TrainError(f"--voice_aug must be in [0, 1], got {args.voice_aug}")
    if not 0.0 <= args.context_drop <= 1.0:
        raise TrainError(f"--context_drop must be in [0, 1], got {args.context_drop}")
    for flag, value in (("--init_critic", args.init_critic), ("--critic_warmup", args.critic_warmup)):
        if value and args.gan_weight == 0 and args.fm_weight == 0:
            raise TrainError(f"{flag} needs the critic: give --gan_weight or --fm_weight")
    if args.critic_warmup < 0:
        raise TrainError(f"--critic_warmup must be >= 0, got {args.critic_warmup}")


def main(argv: list[str] | None = None) -> int:
    return run_cli(train, argv, build_parser(), check_args)


if __name__ == "__main__":
    raise SystemExit(main())
