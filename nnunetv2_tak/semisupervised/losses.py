"""Losses of the semi-supervised method: class-balanced voxel anchors, TAK's text-visual contrastive
term (the reference code's form) and GALoss (GACE + GADice) for class imbalance.

Pure tensor code. Shapes: B batch, C classes, K prompt kinds, S spatial dims, M sampled voxel anchors,
N = M + C*K anchors of one stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

CONTRAST_BLOCK_ELEMENTS = 1 << 23  # entries of the [rows, N] similarity block materialised at once (32 MB)
_MASKED = -1.0e4  # a "minus infinity" that keeps logsumexp's gradient finite (|s| <= 1 / temperature)


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


def _contrastive_rows(rows: torch.Tensor, row_classes: torch.Tensor, row_index: torch.Tensor,
                      anchors: torch.Tensor, classes: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over the given rows of loss_i (see :func:`anchor_contrastive_loss`).

    rows [r, d] and anchors [N, d] L2-normalised float32, row_index [r] = the rows' positions in anchors.
    """
    s = rows @ anchors.T / temperature  # [r, N]
    same = row_classes[:, None] == classes[None, :]
    is_self = row_index[:, None] == torch.arange(anchors.shape[0], device=rows.device)[None, :]
    positive = same & ~is_self
    log_neg = torch.logsumexp(s.masked_fill(same, _MASKED), dim=1, keepdim=True)  # log sum_{n in N(i)} exp(s_in)
    # -(s_ip - log(exp(s_ip) + sum_n exp(s_in))) = softplus(log_neg_i - s_ip)
    per_pair = F.softplus(log_neg - s)
    per_row = torch.where(positive, per_pair, 0.0).sum(dim=1) / (positive.sum(dim=1) + 1e-5)
    return per_row.sum()


def anchor_contrastive_loss(features: torch.Tensor, classes: torch.Tensor, temperature: float = 0.07,
                            block_elements: int = CONTRAST_BLOCK_ELEMENTS) -> torch.Tensor:
    """TAK's contrastive loss over one stage's anchors (voxel and text anchors alike), in float32.

    features [N, d], classes [N]. With s_ab = cos(a, b) / temperature, P(i) the other anchors of i's
    class and N(i) the anchors of every other class:
    loss_i = -1 / (|P(i)| + 1e-5) * sum_{p in P(i)} [s_ip - log(exp(s_ip) + sum_{n in N(i)} exp(s_in))]
    (each positive against the negatives only; unlike SupCon, other positives are not in the
    denominator). Returns the mean over all N rows. When N * N exceeds ``block_elements`` (many classes),
    rows are processed in blocks of block_elements / N with activation checkpointing, so memory stays
    O(block_elements) however many classes there are; below it, one block and no recomputation.
    """
    n = features.shape[0]
    row_chunk = max(1, block_elements // max(n, 1))
    with torch.autocast(device_type=features.device.type, enabled=False):  # exp(s / 0.07) overflows fp16
        anchors = F.normalize(features.float(), dim=1)
        index = torch.arange(n, device=features.device)
        if n <= row_chunk:
            return _contrastive_rows(anchors, classes, index, anchors, classes, temperature) / n
        total = anchors.new_zeros(())
        for start in range(0, n, row_chunk):
            part = slice(start, start + row_chunk)
            if torch.is_grad_enabled():
                total = total + checkpoint(_contrastive_rows, anchors[part], classes[part], index[part], anchors,
                                           classes, temperature, use_reentrant=False)
            else:
                total = total + _contrastive_rows(anchors[part], classes[part], index[part], anchors, classes,
                                                  temperature)
        return total / n


_POINTWISE_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.Identity)


def _is_pointwise(module: nn.Module) -> bool:
    """An activation, or a 1x1 convolution that maps each voxel's channels alone (stride 1, no padding,
    no groups)."""
    if isinstance(module, _POINTWISE_ACTIVATIONS):
        return True
    return (isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.groups == 1
            and all(k == 1 for k in module.kernel_size) and all(s == 1 for s in module.stride)
            and not isinstance(module.padding, str) and all(p == 0 for p in module.padding))


def split_pointwise_tail(head: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """``head`` as (the part that needs the whole map, its trailing pointwise layers): for the reference
    projection head conv 1x1 -> InstanceNorm -> ReLU -> conv 1x1 that is (conv, norm) and [ReLU, conv].
    A module that is not an ``nn.Sequential`` runs whole on the map."""
    if not isinstance(head, nn.Sequential):
        return head, []
    layers = list(head)
    cut = len(layers)
    while cut > 0 and _is_pointwise(layers[cut - 1]):
        cut -= 1
    return head[:cut], layers[cut:]


def apply_pointwise(layers: list[nn.Module], rows: torch.Tensor) -> torch.Tensor:
    """Pointwise layers (``split_pointwise_tail``) on gathered voxels [M, ch]: a 1x1 convolution is the
    linear map of its weight [out, in, 1, ...], activations act elementwise."""
    for layer in layers:
        if isinstance(layer, nn.modules.conv._ConvNd):
            rows = F.linear(rows, layer.weight.reshape(layer.out_channels, layer.in_channels), layer.bias)
        else:
            rows = layer(rows)
    return rows


def text_visual_contrastive_loss(deep_features: list[torch.Tensor], labels: torch.Tensor,
                                 voxel_heads: nn.ModuleList, text_heads: nn.ModuleList,
                                 text_embeddings: torch.Tensor, anchors_per_stage: tuple[int, ...],
                                 temperature: float = 0.07, stage_reduction: str = "sum",
                                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The TAK contrastive term over the deep encoder stages (``stage_reduction``: "sum" as the
    reference code, or "mean").

    deep_features: [B, ch_s, *S_s] per stage (shallow to deep); labels [B, 1, *S] (ground truth or
    confident pseudo-labels; anything outside [0, C) is ignored); text_embeddings E [C, K, D].
    Per stage: ``voxel_heads[s]`` projects the whole feature map (its norm needs the map), labels are
    nearest-resized to the feature grid and up to ``anchors_per_stage[s]`` voxel anchors per sample and
    class present are gathered; ``text_heads[s]`` projects the C*K prompt embeddings (the text anchors).
    The head's pointwise tail (trailing activations and 1x1 convolutions, see ``split_pointwise_tail``)
    runs on the gathered anchors [M, ch] instead of the whole map: the same values, M instead of B * S_s rows.
    """
    if stage_reduction not in ("sum", "mean"):
        raise ValueError(f"stage_reduction must be 'sum' or 'mean', not {stage_reduction!r}")
    num_classes, num_kinds, dim = text_embeddings.shape
    text_classes = torch.arange(num_classes, device=labels.device).repeat_interleave(num_kinds)
    flat_text = text_embeddings.reshape(num_classes * num_kinds, dim)
    losses = []
    for feats, voxel_head, text_head, max_anchors in zip(deep_features, voxel_heads, text_heads,
                                                         anchors_per_stage, strict=True):
        on_map, tail = split_pointwise_tail(voxel_head)
        projected = on_map(feats)  # [B, ch', *S_s]
        b, ch = projected.shape[:2]
        grid_labels = resize_labels(labels, projected.shape[2:]).reshape(b, -1)
        idx, classes = sample_class_balanced_anchors(grid_labels, num_classes, max_anchors, generator)
        n = grid_labels.shape[1]
        voxels = apply_pointwise(tail, projected.reshape(b, ch, n)[idx // n, :, idx % n])  # [M, ch]
        text = text_head(flat_text.to(voxels.dtype))  # [C*K, ch]
        losses.append(anchor_contrastive_loss(torch.cat([voxels, text]), torch.cat([classes, text_classes]),
                                              temperature))
    stacked = torch.stack(losses)
    return stacked.sum() if stage_reduction == "sum" else stacked.mean()


def _labels_and_valid(logits: torch.Tensor, target: torch.Tensor,
                      ignore_index: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """target [B, 1, *S] or [B, *S] -> (labels [B, 1, N] long with ignored voxels set to 0, valid mask
    [B, 1, N] or None when nothing can be ignored). No copy of the C-channel logits is made."""
    b = logits.shape[0]
    labels = (target[:, 0] if target.ndim == logits.ndim else target).reshape(b, 1, -1).long()
    if ignore_index is None:
        return labels, None
    valid = labels != ignore_index
    return labels.masked_fill(~valid, 0), valid


def ga_cross_entropy(logits: torch.Tensor, target: torch.Tensor, top_fraction: float = 0.1, gamma: float = 0.5,
                     ignore_index: int | None = None, eps: float = 1e-6) -> torch.Tensor:
    """GACE: per-voxel CE, keep the M = max(1, int(top_fraction * V)) voxels with the largest CE, then
    sum_c (sum of kept CE of class c) / ((n_c + eps)^(1 - gamma) * M^gamma), n_c = kept voxels of class c.

    logits [B, C, *S], target [B, 1, *S] (or [B, *S]); V = non-ignored voxels. Float32; only [B, N]-sized
    temporaries besides the CE itself (memory bounded for many classes).
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        b, num_classes = logits.shape[:2]
        labels, valid = _labels_and_valid(logits, target, ignore_index)
        ce = F.cross_entropy(logits.float().reshape(b, num_classes, -1), labels[:, 0], reduction="none")  # [B, N]
        ce, labels = ce.reshape(-1), labels.reshape(-1)
        if valid is not None:
            keep = valid.reshape(-1)
            ce, labels = ce[keep], labels[keep]
        if labels.numel() == 0:
            return logits.sum() * 0.0
        m = max(1, int(top_fraction * labels.numel()))
        kept_ce, kept = torch.topk(ce, m, sorted=False)
        kept_labels = labels[kept]
        per_class = torch.zeros(num_classes, device=ce.device).index_add_(0, kept_labels, kept_ce)
        counts = torch.bincount(kept_labels, minlength=num_classes).float()
        return (per_class / ((counts + eps) ** (1.0 - gamma) * float(m) ** gamma)).sum()


def ga_dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None) -> torch.Tensor:
    """GADice over the whole batch, background included, averaged over the C classes:
    a class present in the target: 1 - 2 sum(p_c t_c) / (sum p_c^2 + sum t_c^2);
    an absent class: sum_v sg(p_c(v) / V) * p_c(v) (sg = stop-gradient, V = non-ignored voxels).

    logits [B, C, *S] -> softmax p; target [B, 1, *S] (or [B, *S]). Float32. The one-hot target is never
    built: sum p_c t_c is a gather + index_add, sum t_c^2 a bincount, so besides p only one [B, C, N]
    temporary (p^2) is held.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        b, num_classes = logits.shape[:2]
        labels, valid = _labels_and_valid(logits, target, ignore_index)
        probs = torch.softmax(logits.float().reshape(b, num_classes, -1), dim=1)  # [B, C, N]
        p_true = probs.gather(1, labels)  # [B, 1, N]
        p_sq = probs.square()
        if valid is not None:
            p_true = p_true * valid
            p_sq = p_sq * valid
            flat_labels = labels[valid]
        else:
            flat_labels = labels.reshape(-1)
        num_voxels = flat_labels.numel()
        if num_voxels == 0:
            return logits.sum() * 0.0
        intersection = torch.zeros(num_classes, device=probs.device).index_add_(0, labels.reshape(-1),
                                                                                 p_true.reshape(-1))
        t_sq = torch.bincount(flat_labels, minlength=num_classes).float()
        p_sq = p_sq.sum(dim=(0, 2))  # [C]
        dice = 1.0 - 2.0 * intersection / (p_sq + t_sq).clamp_min(1e-12)
        # sum_v sg(p / V) * p: the value of sum p^2 / V with half its gradient
        absent = (0.5 * p_sq + 0.5 * p_sq.detach()) / num_voxels
        return torch.where(t_sq > 0, dice, absent).mean()


class GALoss(nn.Module):
    """GALoss = GACE + GADice on logits [B, C, *S] against integer labels [B, 1, *S]; nnU-Net's ignore
    label (``ignore_index``) is honoured. Wrapped by nnU-Net's DeepSupervisionWrapper like Dice+CE."""

    def __init__(self, top_fraction: float = 0.1, gamma: float = 0.5, ignore_index: int | None = None):
        super().__init__()
        self.top_fraction, self.gamma, self.ignore_index = top_fraction, gamma, ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (ga_cross_entropy(logits, target, self.top_fraction, self.gamma, self.ignore_index)
                + ga_dice_loss(logits, target, self.ignore_index))


class GADiceLoss(nn.Module):
    """GADice as a module (the reference's pseudo-label loss: every voxel, background included)."""

    def __init__(self, ignore_index: int | None = None):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ga_dice_loss(logits, target, self.ignore_index)
