"""Losses of the semi-supervised method: class-balanced voxel anchors, the text-visual supervised
contrastive loss and a gradient-aware (class-imbalance aware) cross-entropy.

Pure tensor code. Shapes: B batch, C classes, K prompt kinds, S spatial dims, M sampled anchors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def resize_labels(labels: torch.Tensor, size: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Nearest-neighbour resize of integer labels [B, 1, *S] to ``size`` (a feature grid) -> [B, 1, *size]."""
    if tuple(labels.shape[2:]) == tuple(size):
        return labels
    return F.interpolate(labels.float(), size=tuple(size), mode="nearest").long()


@torch.no_grad()
def sample_class_balanced_anchors(labels: torch.Tensor, num_classes: int, max_per_class: int,
                                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``max_per_class`` random voxels per (sample, class present); voxels labelled outside
    [0, C) (ignored, unconfident) are never chosen. Vectorised: one sort, no loop over samples/classes.

    labels: [B, N] integer -> (flat indices into [B * N] [M], their classes [M]).
    """
    b, n = labels.shape
    valid = (labels >= 0) & (labels < num_classes)
    flat_idx = valid.reshape(-1).nonzero(as_tuple=True)[0]
    if flat_idx.numel() == 0 or max_per_class <= 0:
        empty = torch.zeros(0, dtype=torch.long, device=labels.device)
        return empty, empty
    classes = labels.reshape(-1)[flat_idx].long()
    group = (flat_idx // n) * num_classes + classes  # one group per (sample, class)
    noise = torch.rand(flat_idx.shape, device=labels.device, dtype=torch.float64, generator=generator)
    order = torch.argsort(group.double() + noise)  # groups contiguous, random order inside each
    sorted_group = group[order]
    counts = torch.bincount(sorted_group, minlength=b * num_classes)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=labels.device) - starts[sorted_group]
    keep = order[rank < max_per_class]
    return flat_idx[keep], classes[keep]


def supervised_contrastive_loss(voxel_features: torch.Tensor, voxel_classes: torch.Tensor,
                                text_features: torch.Tensor, text_classes: torch.Tensor,
                                temperature: float = 0.07) -> torch.Tensor:
    """Supervised contrastive loss of voxel anchors against voxel and text anchors, in float32.

    voxel_features [M, d], voxel_classes [M], text_features [T, d] (T = C*K), text_classes [T].
    Every voxel anchor i is contrasted with all other anchors a (voxels and texts):
    loss_i = -mean_{p in P(i)} log(exp(s_ip / t) / sum_{a != i} exp(s_ia / t)), s = cosine similarity,
    P(i) = the other anchors of i's class (its class's text anchors always among them). Returns the
    mean over voxel anchors; 0 (still connected to the graph) when there is none.
    """
    if voxel_features.shape[0] == 0:
        return text_features.sum() * 0.0 + voxel_features.sum() * 0.0
    device_type = voxel_features.device.type
    with torch.autocast(device_type=device_type, enabled=False):  # exp(s / 0.07) overflows half precision
        v = F.normalize(voxel_features.float(), dim=1)
        t = F.normalize(text_features.float(), dim=1)
        contrast = torch.cat([v, t], dim=0)  # [M + T, d]
        classes = torch.cat([voxel_classes, text_classes])
        logits = v @ contrast.T / temperature  # [M, M + T]
        m = v.shape[0]
        self_mask = torch.zeros_like(logits, dtype=torch.bool)
        self_mask[:, :m].fill_diagonal_(True)
        logits = logits.masked_fill(self_mask, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        positives = (voxel_classes[:, None] == classes[None, :]) & ~self_mask
        pos_count = positives.sum(dim=1)
        pos_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
        has_pos = pos_count > 0
        per_anchor = -pos_log_prob[has_pos] / pos_count[has_pos]
        if per_anchor.numel() == 0:
            return logits.new_zeros(()) + v.sum() * 0.0
        return per_anchor.mean()


class GradientAwareCrossEntropy(nn.Module):
    """Cross-entropy whose per-class positive and negative gradients are re-weighted by their
    accumulated ratio (the gradient-aware idea of GALoss / EQL v2, applied to softmax segmentation).

    For class c, g_c = (sum of |dL/dz_c| on voxels of class c) / (sum on voxels of other classes),
    accumulated over training. Negative gradients are scaled by q_c = sigmoid(gamma (g_c - mu)) and
    positive ones by r_c = 1 + alpha (1 - q_c): a rare class, whose few positives are drowned by
    negatives from every other voxel, gets its negatives damped and its positives boosted. Until
    statistics exist (first iteration) the weights are 1, i.e. plain cross-entropy.

    forward(logits [B, C, *S], target [B, 1, *S]) -> scalar (mean over non-ignored voxels).
    """

    def __init__(self, num_classes: int, gamma: float = 12.0, mu: float = 0.8, alpha: float = 4.0,
                 ignore_index: int | None = None):
        super().__init__()
        self.num_classes, self.gamma, self.mu, self.alpha = num_classes, gamma, mu, alpha
        self.ignore_index = ignore_index
        self.register_buffer("pos_grad", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("neg_grad", torch.zeros(num_classes, dtype=torch.float64))

    def class_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive weights r [C], negative weights q [C]), float32."""
        ratio = (self.pos_grad / self.neg_grad.clamp_min(1e-12)).float()
        q = torch.sigmoid(self.gamma * (ratio - self.mu))
        started = self.neg_grad.sum() > 0  # stays on the device: no host sync per call
        one = torch.ones_like(q)
        return torch.where(started, 1.0 + self.alpha * (1.0 - q), one), torch.where(started, q, one)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target[:, 0].long() if target.ndim == logits.ndim else target.long()
        ignore = self.ignore_index if self.ignore_index is not None else -100
        valid = (target != ignore)
        if self.pos_grad.device != logits.device:  # nnU-Net does not move its loss to the device
            self.to(logits.device)
        if logits.requires_grad:
            # a view of its own: the hook re-weights only the gradient that flows through this CE, not the
            # Dice term that shares the logits in nnU-Net's Dice+CE
            logits = logits.view_as(logits)
            onehot = F.one_hot(torch.where(valid, target, 0), self.num_classes).movedim(-1, 1).bool()
            onehot &= valid[:, None]
            r, q = self.class_weights()
            shape = (1, -1) + (1,) * (logits.ndim - 2)
            weights = torch.where(onehot, r.view(shape), q.view(shape))
            reduce_dims = [0, *range(2, logits.ndim)]

            def reweight(grad: torch.Tensor) -> torch.Tensor:
                magnitude = torch.nan_to_num(grad.detach().abs().double(), nan=0.0, posinf=0.0)  # AMP inf steps
                with torch.no_grad():
                    self.pos_grad += (magnitude * onehot).sum(dim=reduce_dims)
                    self.neg_grad += (magnitude * (~onehot & valid[:, None])).sum(dim=reduce_dims)
                return grad * weights.to(grad.dtype)

            logits.register_hook(reweight)
        return F.cross_entropy(logits, target, ignore_index=ignore)


def text_visual_contrastive_loss(deep_features: list[torch.Tensor], labels: torch.Tensor,
                                 voxel_heads: nn.ModuleList, text_heads: nn.ModuleList,
                                 text_embeddings: torch.Tensor, anchors_per_stage: tuple[int, ...],
                                 temperature: float = 0.07,
                                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The TAK contrastive term, averaged over the deep encoder stages.

    deep_features: [B, ch_s, *S_s] per stage (shallow to deep); labels [B, 1, *S] (ground truth or
    confident pseudo-labels; anything outside [0, C) is ignored); text_embeddings E [C, K, D].
    Per stage: labels nearest-resized to the feature grid, up to ``anchors_per_stage[s]`` voxel anchors
    per sample and class present, projected by ``voxel_heads[s]``; the C*K prompt embeddings projected
    by ``text_heads[s]`` are the text anchors.
    """
    num_classes, num_kinds, dim = text_embeddings.shape
    text_classes = torch.arange(num_classes, device=labels.device).repeat_interleave(num_kinds)
    flat_text = text_embeddings.reshape(num_classes * num_kinds, dim)
    losses = []
    for feats, voxel_head, text_head, max_anchors in zip(deep_features, voxel_heads, text_heads,
                                                         anchors_per_stage, strict=True):
        b, ch = feats.shape[:2]
        grid_labels = resize_labels(labels, feats.shape[2:]).reshape(b, -1)
        idx, classes = sample_class_balanced_anchors(grid_labels, num_classes, max_anchors, generator)
        n = grid_labels.shape[1]
        voxels = feats.reshape(b, ch, n)[idx // n, :, idx % n]  # [M, ch], gathered: no full-map projection
        text = text_head(flat_text.to(voxels.dtype))
        losses.append(supervised_contrastive_loss(voxel_head(voxels), classes, text, text_classes, temperature))
    return torch.stack(losses).mean()
