"""Mean teacher: EMA weights, ramp-up schedules, noisy teacher input and confident pseudo-labels.

Pure tensor code, no nnU-Net imports. Shapes: B batch, C classes, S spatial dims.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

LN2 = math.log(2.0)


def sigmoid_rampup(current: float, length: float) -> float:
    """exp(-5 (1 - t/T)^2) for t in [0, T], 1 after T (Laine & Aila); 1 when ``length`` <= 0."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(current, 0.0), length) / length
    return math.exp(-5.0 * phase * phase)


def entropy_threshold(current: float, length: float, base: float = LN2, start: float = 0.75,
                      end: float = 1.0) -> float:
    """tau(t) = base * (start + (end - start) * sigmoid_rampup(t, T)): ln 2 * (0.75 + 0.25 r(t)) by default.
    Voxels whose teacher entropy (nats) exceeds tau are ignored; tau grows, so coverage grows."""
    return base * (start + (end - start) * sigmoid_rampup(current, length))


def ema_decay(step: int, decay: float) -> float:
    """Warm-up decay min(1 - 1/(step + 1), decay): the teacher follows the student closely at first."""
    return min(1.0 - 1.0 / (step + 1), decay)


def clipped_noise(x: torch.Tensor, std: float, clip: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + clamp(N(0, std^2), -clip, clip), the teacher's input perturbation."""
    if std <= 0:
        return x
    noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator) * std
    return x + noise.clamp_(-clip, clip)


@torch.no_grad()
def teacher_predictions(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits [B, C, *S] -> (argmax [B, 1, *S] long, voxel entropy [B, 1, *S] float32 in nats).

    Softmax and entropy are computed in float32 whatever the autocast dtype.
    """
    log_p = torch.log_softmax(logits.float(), dim=1)
    argmax = log_p.argmax(dim=1, keepdim=True)
    entropy = -log_p.exp().mul_(log_p).sum(dim=1, keepdim=True)  # one [B, C, *S] temporary, not two
    return argmax, entropy


@torch.no_grad()
def mask_unconfident(labels: torch.Tensor, entropy: torch.Tensor, threshold: float, ignore_index: int) -> torch.Tensor:
    """A copy of ``labels`` [B, 1, *S] with ``ignore_index`` where ``entropy`` exceeds ``threshold``."""
    return labels.masked_fill(entropy > threshold, ignore_index)


@torch.no_grad()
def pseudo_labels(logits: torch.Tensor, threshold: float, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Confident pseudo-labels: (argmax [B, 1, *S] with ``ignore_index`` where the entropy exceeds
    ``threshold``, entropy [B, 1, *S] float32)."""
    labels, entropy = teacher_predictions(logits)
    return mask_unconfident(labels, entropy, threshold, ignore_index), entropy


@torch.no_grad()
def pseudo_label_statistics(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """[coverage, share_0, ..., share_{C-1}] (float64 [C+1]): fraction of confident voxels and the class
    distribution among them (zeros when none is confident). No host sync: the ignored voxels are counted with
    weight 0 instead of being selected (a data-dependent size)."""
    flat = labels.reshape(-1)
    keep = flat != ignore_index
    counts = torch.bincount(flat.masked_fill(~keep, 0), weights=keep.double(), minlength=num_classes)[:num_classes]
    confident = counts.sum()
    coverage = confident / max(flat.numel(), 1)
    shares = counts / confident.clamp_min(1.0)
    return torch.cat([coverage.reshape(1), shares])


class EMATeacher:
    """An exponential-moving-average copy of the student network.

    The copy is made from the unwrapped student (no DDP/compile wrapper); under DDP every rank builds
    it after DDP has broadcast rank 0's weights, and the student's weights stay identical across ranks,
    so the teacher is updated identically on every rank without communication.
    """

    def __init__(self, student: nn.Module, decay: float = 0.99):
        self.decay = decay
        self.module = copy.deepcopy(student)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.step = 0

    @torch.no_grad()
    def update(self, student: nn.Module) -> float:
        """teacher = d * teacher + (1 - d) * student for every parameter (one fused foreach op), floating
        buffers copied; returns the decay used. ``step`` counts updates."""
        d = ema_decay(self.step, self.decay)
        t_params = list(self.module.parameters())
        s_params = [p.detach() for p in student.parameters()]
        if len(t_params) != len(s_params):
            raise RuntimeError("teacher and student have different parameters; was the student rebuilt?")
        torch._foreach_mul_(t_params, d)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - d)
        for t_buf, s_buf in zip(self.module.buffers(), student.buffers(), strict=True):
            t_buf.copy_(s_buf)
        self.step += 1
        return d

    def state_dict(self) -> dict:
        return {"weights": self.module.state_dict(), "step": self.step, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["weights"])
        self.step = int(state["step"])
