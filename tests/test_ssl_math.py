"""The semi-supervised maths on its own: EMA teacher, schedules, pseudo-labels, anchors, contrastive
loss, gradient-aware CE, shards and splits. Pure tensors, no nnU-Net machinery."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from nnunetv2_tak.losses import (
    GradientAwareCrossEntropy,
    sample_class_balanced_anchors,
    supervised_contrastive_loss,
    text_visual_contrastive_loss,
)
from nnunetv2_tak.splits import SplitError, few_label_split
from nnunetv2_tak.teacher import (
    EMATeacher,
    clipped_noise,
    ema_decay,
    entropy_threshold,
    pseudo_label_statistics,
    pseudo_labels,
    sigmoid_rampup,
)
from nnunetv2_tak.unlabeled import UnlabeledDataError, shard_for_rank, split_unlabeled_cases


# --- EMA ----------------------------------------------------------------------------------------
def test_ema_update_follows_the_warm_up_formula():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    teacher = EMATeacher(student, decay=0.99)
    t0 = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    assert all(not p.requires_grad for p in teacher.module.parameters())

    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student.train()(torch.randn(8, 3))  # changes the BN running stats (buffers)
    assert teacher.update(student) == 0.0  # step 0: decay min(1 - 1/1, 0.99) = 0 -> copy
    for (name, t), s in zip(teacher.module.named_parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(t, s, msg=name)
    torch.testing.assert_close(teacher.module[1].running_mean, student[1].running_mean)

    before = [p.clone() for p in teacher.module.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(-2.0)
    d = teacher.update(student)
    assert d == pytest.approx(0.5)  # step 1: min(1 - 1/2, 0.99)
    for t, b, s in zip(teacher.module.parameters(), before, student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.5 * b + 0.5 * s)
    teacher.step = 1000
    assert teacher.update(student) == pytest.approx(0.99)
    assert not torch.equal(t0["0.weight"], teacher.module.state_dict()["0.weight"])


def test_ema_decay_schedule():
    assert [ema_decay(s, 0.99) for s in (0, 1, 3)] == [0.0, 0.5, 0.75]
    assert ema_decay(10_000, 0.99) == 0.99


# --- schedules ----------------------------------------------------------------------------------
def test_sigmoid_rampup_and_entropy_threshold_schedule():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(100, 100) == 1.0 and sigmoid_rampup(500, 100) == 1.0
    assert sigmoid_rampup(3, 0) == 1.0
    ln2 = math.log(2)
    assert entropy_threshold(0, 100) == pytest.approx(ln2 * (0.75 + 0.25 * math.exp(-5)))
    assert entropy_threshold(100, 100) == pytest.approx(ln2)
    values = [entropy_threshold(t, 100) for t in range(0, 101, 10)]
    assert values == sorted(values)  # the threshold only grows: coverage grows with training


# --- pseudo-labels ------------------------------------------------------------------------------
def test_pseudo_labels_mask_uncertain_voxels_in_float32():
    # 3 classes, 4 voxels: confident class 2, confident class 0, uniform (entropy ln 3), two-way tie (ln 2)
    logits = torch.tensor([[0.0, 0.0, 10.0], [10.0, 0.0, 0.0], [1.0, 1.0, 1.0], [5.0, 5.0, -30.0]])
    logits = logits.T.reshape(1, 3, 4, 1).half()
    labels, entropy = pseudo_labels(logits, threshold=0.6, ignore_index=3)
    assert entropy.dtype == torch.float32
    assert labels.flatten().tolist() == [2, 0, 3, 3]
    assert entropy.flatten()[2].item() == pytest.approx(math.log(3), rel=1e-3)
    assert entropy.flatten()[3].item() == pytest.approx(math.log(2), rel=1e-3)
    # a threshold above ln 2 keeps the tie (argmax = first class)
    labels, _ = pseudo_labels(logits, threshold=0.7, ignore_index=3)
    assert labels.flatten().tolist() == [2, 0, 3, 0]
    stats = pseudo_label_statistics(labels, num_classes=3, ignore_index=3)
    assert stats.tolist() == pytest.approx([0.75, 2 / 3, 0.0, 1 / 3])


def test_clipped_noise_is_bounded():
    x = torch.zeros(10_000)
    noisy = clipped_noise(x, std=0.1, clip=0.2, generator=torch.Generator().manual_seed(0))
    assert noisy.abs().max() <= 0.2 and noisy.std() == pytest.approx(0.1, rel=0.15)


# --- anchors ------------------------------------------------------------------------------------
def test_anchor_sampling_is_class_balanced_per_sample():
    labels = torch.zeros(2, 100, dtype=torch.long)
    labels[0, :3] = 1  # a small organ with 3 voxels in sample 0
    labels[1, :50] = 2
    labels[1, 50:60] = -1  # ignored
    labels[1, 60:70] = 5  # unconfident pseudo-label (= C)
    idx, cls = sample_class_balanced_anchors(labels, num_classes=5, max_per_class=10,
                                             generator=torch.Generator().manual_seed(0))
    b, v = idx // 100, idx % 100
    assert torch.equal(labels[b, v], cls)
    counts = {(int(bb), int(c)): int(((b == bb) & (cls == c)).sum()) for bb in (0, 1) for c in range(5)}
    assert counts[(0, 0)] == 10 and counts[(0, 1)] == 3  # all 3 voxels of the small organ, 10 of background
    assert counts[(1, 0)] == 10 and counts[(1, 2)] == 10
    assert sum(counts.values()) == idx.numel() == 33
    assert len(set(idx.tolist())) == idx.numel()  # no voxel twice
    empty_idx, _ = sample_class_balanced_anchors(torch.full((2, 7), -1), 5, 10)
    assert empty_idx.numel() == 0


# --- contrastive loss ---------------------------------------------------------------------------
def _supcon_by_hand(features: np.ndarray, classes: list[int], num_voxels: int, t: float) -> float:
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    losses = []
    for i in range(num_voxels):
        others = [a for a in range(len(f)) if a != i]
        denom = sum(math.exp(f[i] @ f[a] / t) for a in others)
        pos = [p for p in others if classes[p] == classes[i]]
        losses.append(-sum(math.log(math.exp(f[i] @ f[p] / t) / denom) for p in pos) / len(pos))
    return sum(losses) / len(losses)


def test_contrastive_loss_matches_a_hand_computed_case():
    voxels = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    voxel_classes = torch.tensor([0, 0, 1])
    text = torch.tensor([[1.0, 0.2], [0.9, -0.1], [-0.3, 1.0], [0.1, 0.9]])  # C=2 classes x K=2 kinds
    text_classes = torch.tensor([0, 0, 1, 1])
    t = 0.5
    loss = supervised_contrastive_loss(voxels, voxel_classes, text, text_classes, temperature=t)
    expected = _supcon_by_hand(torch.cat([voxels, text]).numpy(), [0, 0, 1, 0, 0, 1, 1], 3, t)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # a class absent from the batch (class 2's text) only adds negatives
    text3 = torch.cat([text, torch.tensor([[-1.0, -1.0], [-0.9, -1.1]])])
    loss3 = supervised_contrastive_loss(voxels, voxel_classes, text3, torch.tensor([0, 0, 1, 1, 2, 2]), t)
    expected3 = _supcon_by_hand(torch.cat([voxels, text3]).numpy(), [0, 0, 1, 0, 0, 1, 1, 2, 2], 3, t)
    assert loss3.item() == pytest.approx(expected3, rel=1e-5)


def test_contrastive_loss_is_float32_under_half_inputs_and_stable_at_temperature_0_07():
    torch.manual_seed(0)
    voxels = torch.randn(64, 16).half()
    loss = supervised_contrastive_loss(voxels, torch.randint(0, 4, (64,)), torch.randn(8, 16).half(),
                                       torch.arange(4).repeat_interleave(2), temperature=0.07)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_contrastive_term_with_all_voxels_ignored_is_zero_and_connected():
    torch.manual_seed(0)
    heads_v = nn.ModuleList([nn.Linear(4, 4), nn.Linear(8, 8)])
    heads_t = nn.ModuleList([nn.Linear(6, 4), nn.Linear(6, 8)])
    feats = [torch.randn(2, 4, 4, 4, 4, requires_grad=True), torch.randn(2, 8, 2, 2, 2, requires_grad=True)]
    embeddings = torch.randn(3, 2, 6)
    ignored = torch.full((2, 1, 8, 8, 8), 3)  # all unconfident (label C)
    loss = text_visual_contrastive_loss(feats, ignored, heads_v, heads_t, embeddings, (5, 2))
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph (DDP needs that)
    labels = torch.randint(0, 3, (2, 1, 8, 8, 8))
    loss = text_visual_contrastive_loss(feats, labels, heads_v, heads_t, embeddings, (5, 2))
    assert loss.item() > 0
    loss.backward()
    assert heads_t[1].weight.grad.abs().sum() > 0 and feats[1].grad.abs().sum() > 0


# --- gradient-aware CE --------------------------------------------------------------------------
def test_gradient_aware_ce_starts_as_ce_and_then_boosts_the_rare_class():
    torch.manual_seed(0)
    target = torch.zeros(2, 1, 16, 16, dtype=torch.long)
    target[:, :, :2, :2] = 1  # rare class: 8 of 512 voxels
    logits = torch.randn(2, 2, 16, 16, requires_grad=True)
    ga = GradientAwareCrossEntropy(num_classes=2)
    loss = ga(logits, target)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(logits, target[:, 0]))
    loss.backward()
    plain = logits.grad.clone()
    ref = logits.detach().clone().requires_grad_(True)
    nn.functional.cross_entropy(ref, target[:, 0]).backward()
    torch.testing.assert_close(plain, ref.grad)  # first call: weights 1
    assert ga.pos_grad[1] > 0 and ga.neg_grad[1] > ga.pos_grad[1]  # the rare class sees mostly negatives
    r, q = ga.class_weights()
    assert q[1] < q[0] and r[1] > r[0]  # its negatives damped, its positives boosted
    logits.grad = None
    (ga(logits, target) + logits.sum()).backward()  # another term on the same logits (Dice in nnU-Net)
    rare = target[:, 0] == 1
    ratio = (logits.grad - 1.0)[:, 1][rare] / ref.grad[:, 1][rare]  # only the CE part is re-weighted
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(r[1])), rtol=1e-3, atol=0)


# --- DDP shards, few-label splits ----------------------------------------------------------------
def test_unlabeled_shards_are_disjoint_and_cover_all_cases():
    cases = [f"u{i}" for i in range(7)]
    shards = [shard_for_rank(cases, r, 3) for r in range(3)]
    assert sorted(c for shard in shards for c in shard) == sorted(cases)
    assert all(set(a).isdisjoint(b) for i, a in enumerate(shards) for b in shards[i + 1:])
    with pytest.raises(UnlabeledDataError, match="2 unlabeled case"):
        shard_for_rank(["a", "b"], 0, 4)


def test_few_label_split_is_seeded_disjoint_and_complete():
    cases = [f"case_{i:03d}" for i in range(40)]
    a = few_label_split(cases, labeled_fraction=0.05, seed=0)
    assert a == few_label_split(cases, labeled_fraction=0.05, seed=0)
    assert a != few_label_split(cases, labeled_fraction=0.05, seed=1)
    assert len(a["val"]) == 4 and len(a["train"]) == 2 and len(a["unlabeled"]) == 34
    assert sorted(a["train"] + a["val"] + a["unlabeled"]) == cases
    b = few_label_split(cases, labeled=["case_001", "case_002"], val=["case_003"])
    assert b["train"] == ["case_001", "case_002"] and b["val"] == ["case_003"] and len(b["unlabeled"]) == 37
    for seed in range(20):  # random validation cases never collide with the requested labeled ones
        c = few_label_split(cases, labeled=cases[:4], num_val=3, seed=seed)
        assert c["train"] == cases[:4] and not set(c["val"]) & set(cases[:4])
    with pytest.raises(SplitError, match="not training cases"):
        few_label_split(cases, labeled=["nope"])
    with pytest.raises(SplitError, match="both labeled and validation"):
        few_label_split(cases, labeled=["case_001"], val=["case_001"])


def test_fold_outside_a_split_with_unlabeled_cases_is_refused(tmp_path):
    splits = tmp_path / "splits_final.json"
    splits.write_text('[{"train": ["a"], "val": ["b"], "unlabeled": ["c", "d"]}]')
    assert split_unlabeled_cases(splits, 0) == ["c", "d"]
    for fold in ("all", 3):  # nnU-Net would train on c and d with their labels
        with pytest.raises(UnlabeledDataError, match="marks cases as unlabeled"):
            split_unlabeled_cases(splits, fold)
    splits.write_text('[{"train": ["a"], "val": ["b"]}]')
    assert split_unlabeled_cases(splits, "all") == []
    splits.write_text('[{"train": ["a"], "val": ["b"], "unlabeled": ["b", "c"]}]')
    with pytest.raises(UnlabeledDataError, match=r"lists \['b'\] both as unlabeled and as train/val"):
        split_unlabeled_cases(splits, 0)
