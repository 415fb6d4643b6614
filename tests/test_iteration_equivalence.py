"""The leaner iteration computes what the plain formulations compute: same values and gradients on fixed
inputs (float32 precision), against reference implementations written out here."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_tak.model.network import ContrastiveHeads
from nnunetv2_tak.semisupervised.losses import (
    anchor_contrastive_loss,
    resize_labels,
    sample_class_balanced_anchors,
    split_pointwise_tail,
    text_visual_contrastive_loss,
)
from nnunetv2_tak.semisupervised.teacher import pseudo_label_statistics, teacher_predictions
from nnunetv2_tak.trainers.mean_teacher import LossTerms, UnlabeledBatch, nnUNetTrainerMeanTeacher


def reference_contrastive(deep, labels, voxel_heads, text_heads, text_embeddings, anchors, temperature, generator):
    """The term with every projection head run on the whole feature map, anchors gathered afterwards."""
    num_classes, num_kinds, dim = text_embeddings.shape
    text_classes = torch.arange(num_classes).repeat_interleave(num_kinds)
    flat_text = text_embeddings.reshape(num_classes * num_kinds, dim)
    losses = []
    for feats, voxel_head, text_head, max_anchors in zip(deep, voxel_heads, text_heads, anchors, strict=True):
        projected = voxel_head(feats)
        b, ch = projected.shape[:2]
        grid_labels = resize_labels(labels, projected.shape[2:]).reshape(b, -1)
        idx, classes = sample_class_balanced_anchors(grid_labels, num_classes, max_anchors, generator)
        n = grid_labels.shape[1]
        voxels = projected.reshape(b, ch, n)[idx // n, :, idx % n]
        text = text_head(flat_text)
        losses.append(anchor_contrastive_loss(torch.cat([voxels, text]), torch.cat([classes, text_classes]),
                                              temperature))
    return torch.stack(losses).sum()


def test_projection_tail_on_anchors_matches_whole_map() -> None:
    torch.manual_seed(0)
    channels, embed_dim, num_classes = [8, 16, 16], 12, 4
    heads = ContrastiveHeads(nn.Conv3d, channels, embed_dim)
    deep = [torch.randn(3, ch, 8 // 2**s, 12 // 2**s, 12 // 2**s, requires_grad=True)
            for s, ch in enumerate(channels)]
    labels = torch.randint(0, num_classes + 1, (3, 1, 8, 12, 12))  # label C: unconfident, never an anchor
    text = torch.randn(num_classes, 2, embed_dim)
    results = []
    for fn in (reference_contrastive, text_visual_contrastive_loss):
        heads.zero_grad()
        for f in deep:
            f.grad = None
        g = torch.Generator().manual_seed(1)
        if fn is reference_contrastive:
            loss = fn(deep, labels, heads.voxel, heads.text, text, (5, 3, 2), 0.07, g)
        else:
            loss = fn(deep, labels, heads.voxel, heads.text, text, (5, 3, 2), 0.07, generator=g)
        loss.backward()
        results.append((loss.detach(), [f.grad.clone() for f in deep],
                        [p.grad.clone() for p in heads.parameters()]))
    (ref, ref_feat, ref_par), (new, new_feat, new_par) = results
    torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(new_feat + new_par, ref_feat + ref_par, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    on_map, tail = split_pointwise_tail(heads.voxel[0])
    assert len(on_map) == 2 and [type(m) for m in tail] == [nn.ReLU, nn.Conv3d]


def test_split_keeps_spatial_layers_on_the_map() -> None:
    head = nn.Sequential(nn.Conv3d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, 1))
    assert len(split_pointwise_tail(head)[0]) == 1
    strided = nn.Sequential(nn.Conv3d(4, 4, 1), nn.Conv3d(4, 4, 1, stride=2))
    assert len(split_pointwise_tail(strided)[0]) == 2
    plain = nn.Conv3d(4, 4, 1)
    assert split_pointwise_tail(plain) == (plain, [])


def test_teacher_predictions_match_plain_formulas() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4, 6, 6) * 3
    argmax, entropy = teacher_predictions(logits)
    log_p = torch.log_softmax(logits, dim=1)
    assert torch.equal(argmax, log_p.argmax(dim=1, keepdim=True))
    assert torch.equal(entropy, -(log_p.exp() * log_p).sum(dim=1, keepdim=True))


def test_pseudo_label_statistics_match_selection() -> None:
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (2, 1, 5, 6, 7))  # 3 = ignored
    for lab in (labels, torch.full_like(labels, 3)):
        flat = lab.reshape(-1)
        counts = torch.bincount(flat[flat != 3], minlength=3)[:3].double()
        expected = torch.cat([(counts.sum() / flat.numel()).reshape(1), counts / counts.sum().clamp_min(1.0)])
        assert torch.equal(pseudo_label_statistics(lab, 3, 3), expected)


def test_step_outputs_one_transfer_same_values() -> None:
    torch.manual_seed(0)
    fake = SimpleNamespace(label_manager=SimpleNamespace(num_segmentation_heads=3), device=torch.device("cpu"))
    terms = LossTerms(*(torch.rand((), requires_grad=True) * 3 for _ in range(4)))
    pseudo = torch.randint(0, 4, (2, 1, 4, 4, 4))
    for unlabeled in (UnlabeledBatch(torch.zeros(1), pseudo, pseudo), None):
        out = nnUNetTrainerMeanTeacher.step_outputs(fake, terms, unlabeled)
        values = torch.stack([terms.total, terms.supervised, terms.pseudo_label, terms.contrastive]).detach()
        values = values.float().numpy()
        assert out["loss"] == values[0] and out["loss"].dtype == np.float32
        np.testing.assert_array_equal(out["tak_terms"], values[1:])
        assert out["tak_terms"].dtype == np.float32
        stats = (pseudo_label_statistics(pseudo, 3, 3).numpy() if unlabeled is not None
                 else np.full(4, np.nan))
        np.testing.assert_array_equal(out["tak_pl"], stats)
        assert out["tak_pl"].dtype == np.float64


def test_pointwise_conv_as_linear() -> None:
    torch.manual_seed(0)
    conv = nn.Conv3d(6, 5, 1)
    x = torch.randn(2, 6, 3, 3, 3)
    rows = x.permute(0, 2, 3, 4, 1).reshape(-1, 6)
    torch.testing.assert_close(F.linear(rows, conv.weight.reshape(5, 6), conv.bias),
                               conv(x).permute(0, 2, 3, 4, 1).reshape(-1, 5), rtol=1e-5, atol=1e-6)
