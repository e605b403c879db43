"""The generator's extra loss terms of the recipe study (docs/training-guide.md, "Recipe study").

- `region_weights`: a per-pixel weight map that counts the mouth region `mouth_weight` times.
- `with_mask_weight`: per-sample weights that count a mask (the open mouth: teeth, tongue) again.
- `gradient_l1`: L1 between image gradients (finite differences), the high-frequency term that punishes
  a blurred mouth and missing teeth edges more than plain L1 does.
- `PatchDiscriminator` + `hinge_d` / `hinge_g`: a small patch discriminator trained from scratch on the
  mouth region, with its own optimizer and start step (`AdversarialTerm`).
- `feature_matching_l1`: L1 between the critic's hidden activations of the generated and the real mouth
  (pix2pixHD's feature matching): a perceptual term learned on this person, no downloaded weights.
- `temporal_l1`: the adjacent-frame term: the change between two consecutive generated frames must match
  the change between the real ones (punishes flicker and a mouth that moves in silence).

No term downloads weights. Images are float `[B, 3, S, S]` in [0, 1].
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from synctalk.face import MOUTH_BOX, mouth_slices


def region_weights(side: int, mouth_weight: float, box: tuple[float, float, float, float] = MOUTH_BOX,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Weights `[1, 1, side, side]` with mean 1: the mouth box counts `mouth_weight` times the rest
    (a 1.0 weight gives a flat map, i.e. plain averaging)."""
    w = torch.ones(1, 1, side, side, device=device)
    rows, cols = mouth_slices(side, box)
    w[..., rows, cols] = mouth_weight
    return w / w.mean()


def with_mask_weight(weights: torch.Tensor | None, mask: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-sample weights `[B, 1, S, S]`: `weights` (or 1) times `weight` where `mask` (`[B, 1, S, S]`,
    0..1) is 1, e.g. the open mouth counted again on top of the mouth box."""
    return (1.0 if weights is None else weights) * (1.0 + (weight - 1.0) * mask)


def weighted_l1(pred: torch.Tensor, label: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of |pred - label| x weights (weights from `region_weights`, mean 1)."""
    return ((pred - label).abs() * weights).mean()


def gradient_l1(pred: torch.Tensor, label: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """L1 between the horizontal and vertical finite differences of `pred` and `label` (optionally
    weighted per pixel by `weights` `[1, 1, S, S]`)."""
    def diffs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]

    (pdx, pdy), (ldx, ldy) = diffs(pred), diffs(label)
    ex, ey = (pdx - ldx).abs(), (pdy - ldy).abs()
    if weights is not None:
        ex, ey = ex * weights[..., :, 1:], ey * weights[..., 1:, :]
    return 0.5 * (ex.mean() + ey.mean())


def temporal_l1(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Adjacent-frame term on batches laid out as consecutive pairs (`[2B, 3, S, S]`, rows 2k and 2k+1
    are frames t and t+1 of one sample): L1 between the generated and the real frame-to-frame change."""
    if pred.shape[0] % 2:
        raise ValueError(f"temporal_l1 needs an even batch of frame pairs, got {pred.shape[0]}")
    p, r = pred.unflatten(0, (-1, 2)), label.unflatten(0, (-1, 2))
    return ((p[:, 1] - p[:, 0]) - (r[:, 1] - r[:, 0])).abs().mean()


class PatchDiscriminator(nn.Module):
    """PatchGAN-style critic on the mouth region: strided convs with spectral norm, one logit per patch
    (about 22 px of receptive field per patch at the small size)."""

    def __init__(self, width: int = 32, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = 3
        for i in range(layers):
            c_out = width * 2 ** i
            blocks += [nn.utils.parametrizations.spectral_norm(nn.Conv2d(c_in, c_out, 4, 2, 1)),
                       nn.LeakyReLU(0.2, inplace=True)]
            c_in = c_out
        blocks.append(nn.utils.parametrizations.spectral_norm(nn.Conv2d(c_in, 1, 3, 1, 1)))
        self.net = nn.Sequential(*blocks)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.features(image)[-1]

    def features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The activation after each hidden layer, then the patch logits (last)."""
        rows, cols = mouth_slices(image.shape[-1])
        x, out = image[..., rows, cols] * 2.0 - 1.0, []
        for layer in self.net:
            x = layer(x)
            if isinstance(layer, nn.LeakyReLU):
                out.append(x)
        return out + [x]


def hinge_d(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the critic."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_g(fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the generator against the critic."""
    return -fake_logits.mean()


def feature_matching_l1(fake: list[torch.Tensor], real: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the critic's hidden layers (the logits left out) of L1(fake activation, real activation);
    the real side carries no gradient."""
    return torch.stack([F.l1_loss(f, r.detach()) for f, r in zip(fake[:-1], real[:-1])]).mean()


class AdversarialTerm:
    """The patch critic with its own Adam and schedule: off until `start` (share of the run), then its
    weight ramps linearly to full over the next `ramp` share (a critic that starts on untrained blur would
    only add noise)."""

    def __init__(self, device: torch.device, start: float, ramp: float = 0.1, lr: float = 2e-4):
        self.critic = PatchDiscriminator().to(device)
        self.optimizer = torch.optim.Adam(self.critic.parameters(), lr=lr, betas=(0.5, 0.999))
        self.start, self.ramp = start, max(1e-6, ramp)

    def scale(self, progress: float) -> float:
        """The weight factor in [0, 1] at `progress` (share of the run done)."""
        return min(1.0, max(0.0, (progress - self.start) / self.ramp))

    def generator_terms(self, pred: torch.Tensor, label: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hinge loss of the generated batch, feature-matching L1 against `label` or None without one);
        gradients flow into the generator, not the critic. Generated and real go through the critic in one
        batch: its spectral norm's power iteration runs once per call, so both sides see the same weights."""
        self.critic.requires_grad_(False)
        try:
            if label is None:
                return hinge_g(self.critic(pred.float())), None
            both = self.critic.features(torch.cat([pred.float(), label.detach().float()]))
            fake, real = [f[:len(pred)] for f in both], [f[len(pred):] for f in both]
            return hinge_g(fake[-1]), feature_matching_l1(fake, real)
        finally:
            self.critic.requires_grad_(True)

    def critic_step(self, pred: torch.Tensor, label: torch.Tensor) -> float:
        """One critic update on (detached generated, real); returns its loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = hinge_d(self.critic(label.float()), self.critic(pred.detach().float()))
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def state_dict(self) -> dict:
        return {"critic": self.critic.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])
