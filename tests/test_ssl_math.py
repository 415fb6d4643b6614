"""The semi-supervised maths on its own: EMA teacher, schedules, pseudo-labels, anchors, TAK's contrastive
loss, GALoss (GACE + GADice), shards and splits. Pure tensors, no nnU-Net machinery. The contrastive and
GA losses are checked against small cases computed by hand from the reference formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from nnunetv2_tak.semisupervised.losses import (
    GALoss,
    anchor_contrastive_loss,
    ga_cross_entropy,
    ga_dice_loss,
    sample_class_balanced_anchors,
    text_visual_contrastive_loss,
)
from nnunetv2_tak.semisupervised.teacher import (
    EMATeacher,
    clipped_noise,
    ema_decay,
    entropy_threshold,
    pseudo_label_statistics,
    pseudo_labels,
    sigmoid_rampup,
)
from nnunetv2_tak.unlabeled import UnlabeledDataError, shard_for_rank, split_unlabeled_cases
from nnunetv2_tak.unlabeled.splits import SplitError, few_label_split


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
def _tak_contrastive_by_hand(features: np.ndarray, classes: list[int], t: float) -> float:
    """The reference formula written literally: every anchor is a row; each positive p of row i is scored
    against the negatives only: -(1/(|P|+1e-5)) sum_p [s_ip - log(exp(s_ip) + sum_n exp(s_in))]."""
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    rows = []
    for i in range(len(f)):
        pos = [p for p in range(len(f)) if p != i and classes[p] == classes[i]]
        neg_sum = sum(math.exp(f[i] @ f[n] / t) for n in range(len(f)) if classes[n] != classes[i])
        total = sum(f[i] @ f[p] / t - math.log(math.exp(f[i] @ f[p] / t) + neg_sum) for p in pos)
        rows.append(-total / (len(pos) + 1e-5))
    return sum(rows) / len(rows)


def test_contrastive_loss_closed_form():
    # two classes, two identical anchors each, the classes orthogonal; t = 1: every row has one positive
    # (s = 1) and two negatives (s = 0), so loss = (log(e + 2) - 1) / (1 + 1e-5)
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    loss = anchor_contrastive_loss(torch.tensor([e1, e1, e2, e2]), torch.tensor([0, 0, 1, 1]), temperature=1.0)
    assert loss.item() == pytest.approx((math.log(math.e + 2.0) - 1.0) / (1.0 + 1e-5), rel=1e-6)


def test_contrastive_loss_of_4_voxel_and_2_text_anchors_matches_the_reference_formula():
    voxels = torch.tensor([[1.0, 0.0, 0.2], [0.8, 0.6, 0.0], [0.0, 1.0, 0.1], [0.1, 0.7, -0.5]])
    text = torch.tensor([[1.0, 0.2, 0.3], [-0.3, 1.0, 0.4]])  # one text anchor per class (C=2, K=1)
    classes = [0, 0, 1, 1, 0, 1]
    t = 0.5
    features = torch.cat([voxels, text])
    loss = anchor_contrastive_loss(features, torch.tensor(classes), temperature=t)
    expected = _tak_contrastive_by_hand(features.numpy().astype(np.float64), classes, t)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # not SupCon: with the other positives in the denominator the number is different
    f = torch.nn.functional.normalize(features, dim=1).numpy().astype(np.float64)
    supcon = np.mean([-np.mean([f[i] @ f[p] / t - math.log(sum(math.exp(f[i] @ f[a] / t) for a in range(6) if a != i))
                                for p in range(6) if p != i and classes[p] == classes[i]]) for i in range(6)])
    assert abs(loss.item() - supcon) > 1e-2
    # a row without positives (a class with one anchor) contributes 0 and still counts in the mean
    three = torch.cat([features, torch.tensor([[0.0, 0.0, 1.0]])])
    classes3 = [*classes, 2]
    expected3 = _tak_contrastive_by_hand(three.numpy().astype(np.float64), classes3, t)
    assert anchor_contrastive_loss(three, torch.tensor(classes3), t).item() == pytest.approx(expected3, rel=1e-5)


def test_contrastive_loss_in_row_chunks_equals_the_whole_matrix_with_gradients():
    torch.manual_seed(0)
    features = torch.randn(37, 8, dtype=torch.float64)
    classes = torch.randint(0, 4, (37,))
    a = features.clone().requires_grad_(True)
    b = features.clone().requires_grad_(True)
    whole = anchor_contrastive_loss(a, classes, 0.07, block_elements=37 * 37)
    chunked = anchor_contrastive_loss(b, classes, 0.07, block_elements=37 * 5)  # blocks of 5 rows, last partial
    whole.backward()
    chunked.backward()
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_contrastive_loss_is_float32_under_half_inputs_and_stable_at_temperature_0_07():
    torch.manual_seed(0)
    features = torch.randn(72, 16).half()
    loss = anchor_contrastive_loss(features, torch.randint(0, 4, (72,)), temperature=0.07)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def _conv_heads(channels: list[int], embed_dim: int) -> tuple[nn.ModuleList, nn.ModuleList]:
    from nnunetv2_tak.model.network import ContrastiveHeads

    heads = ContrastiveHeads(nn.Conv3d, channels, embed_dim)
    return heads.voxel, heads.text


def test_contrastive_term_sums_its_stages_and_text_anchors_learn_without_voxels():
    torch.manual_seed(0)
    heads_v, heads_t = _conv_heads([4, 8], 6)
    feats = [torch.randn(2, 4, 4, 4, 4, requires_grad=True), torch.randn(2, 8, 2, 2, 2, requires_grad=True)]
    embeddings = torch.randn(3, 2, 6)
    ignored = torch.full((2, 1, 8, 8, 8), 3)  # all unconfident (label C): only the C*K text anchors remain
    loss = text_visual_contrastive_loss(feats, ignored, heads_v, heads_t, embeddings, (5, 2))
    assert loss.item() > 0
    loss.backward()  # the voxel heads are still in the graph (DDP needs that)
    assert heads_t[0][0].weight.grad.abs().sum() > 0
    labels = torch.randint(0, 3, (2, 1, 8, 8, 8))
    generator = torch.Generator().manual_seed(1)
    summed = text_visual_contrastive_loss(feats, labels, heads_v, heads_t, embeddings, (5, 2),
                                          generator=generator)
    generator = torch.Generator().manual_seed(1)
    mean = text_visual_contrastive_loss(feats, labels, heads_v, heads_t, embeddings, (5, 2),
                                        stage_reduction="mean", generator=generator)
    assert summed.item() == pytest.approx(2 * mean.item(), rel=1e-6)  # the reference sums the stages
    summed.backward()
    assert heads_v[1][0].weight.grad.abs().sum() > 0 and feats[1].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="stage_reduction"):
        text_visual_contrastive_loss(feats, labels, heads_v, heads_t, embeddings, (5, 2), stage_reduction="max")


def test_contrastive_heads_have_the_reference_form():
    heads_v, heads_t = _conv_heads([4], 6)
    kinds = [type(m) for m in heads_v[0]]
    assert kinds == [nn.Conv3d, nn.InstanceNorm3d, nn.ReLU, nn.Conv3d]
    assert [type(m) for m in heads_t[0]] == [nn.Linear, nn.ReLU] and heads_t[0][0].out_features == 4


# --- GALoss ---------------------------------------------------------------------------------------
# 5 voxels, 3 classes: logits of each voxel and its label; CE by hand: log(1 + 2e^-2), log 3, log(e + 2),
# log 3, log(e^3 + 2). The two largest (top 40% of 5) are voxel 4 (class 0) and voxel 2 (class 2).
_GA_LOGITS = torch.tensor([[2.0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0], [0, 3, 0]]).T.reshape(1, 3, 5)
_GA_TARGET = torch.tensor([0, 0, 2, 0, 0]).reshape(1, 1, 5)


def test_ga_cross_entropy_matches_a_hand_computed_case():
    e = math.e
    loss = ga_cross_entropy(_GA_LOGITS, _GA_TARGET, top_fraction=0.4, gamma=0.5)
    # class 0 keeps one voxel (CE log(e^3 + 2)), class 2 one (log(e + 2)); M = 2
    expected = (math.log(e ** 3 + 2) + math.log(e + 2)) / ((1 + 1e-6) ** 0.5 * 2 ** 0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # gamma = 1: the mean of the kept CE; gamma = 0: the sum of per-class means
    assert ga_cross_entropy(_GA_LOGITS, _GA_TARGET, 0.4, gamma=1.0).item() == pytest.approx(
        (math.log(e ** 3 + 2) + math.log(e + 2)) / 2, rel=1e-5)
    assert ga_cross_entropy(_GA_LOGITS, _GA_TARGET, 1.0, gamma=0.0).item() == pytest.approx(
        (math.log(1 + 2 / e ** 2) + 2 * math.log(3) + math.log(e ** 3 + 2)) / 4 + math.log(e + 2), rel=1e-5)


def test_ga_dice_matches_a_hand_computed_case_with_an_absent_class():
    e = math.e
    z = [(e ** 2 + 2), 3.0, (e + 2), 3.0, (e ** 3 + 2)]
    p0 = [e ** 2 / z[0], 1 / 3, e / z[2], 1 / 3, 1 / z[4]]
    p1 = [1 / z[0], 1 / 3, 1 / z[2], 1 / 3, e ** 3 / z[4]]
    p2 = [1 / z[0], 1 / 3, 1 / z[2], 1 / 3, 1 / z[4]]
    t0, t2 = [1, 1, 0, 1, 1], [0, 0, 1, 0, 0]
    dice0 = 1 - 2 * sum(p * t for p, t in zip(p0, t0, strict=True)) / (sum(p * p for p in p0) + sum(t0))
    dice2 = 1 - 2 * sum(p * t for p, t in zip(p2, t2, strict=True)) / (sum(p * p for p in p2) + sum(t2))
    absent1 = sum(p * p for p in p1) / 5  # class 1 is absent from the target
    logits = _GA_LOGITS.clone().requires_grad_(True)
    loss = ga_dice_loss(logits, _GA_TARGET)
    assert loss.item() == pytest.approx((dice0 + dice2 + absent1) / 3, rel=1e-6)
    # the absent class's gradient is that of sum sg(p / N) * p, i.e. half of d(sum p^2 / N)
    loss.backward()
    ref = _GA_LOGITS.clone().requires_grad_(True)
    probs = torch.softmax(ref, dim=1)[0]
    onehot = torch.nn.functional.one_hot(_GA_TARGET[0, 0], 3).T.float()
    d = 1 - 2 * (probs * onehot).sum(1) / ((probs * probs).sum(1) + onehot.sum(1))
    ((d[0] + d[2] + 0.5 * (probs[1] ** 2).sum() / 5) / 3).backward()
    torch.testing.assert_close(logits.grad, ref.grad)


def test_ga_loss_honours_the_ignore_label():
    logits = torch.cat([_GA_LOGITS, torch.tensor([[[-9.0], [9.0], [0.0]]])], dim=2)  # a 6th, awful voxel ...
    target = torch.cat([_GA_TARGET, torch.tensor([[[3]]])], dim=2)  # ... labelled ignore (3)
    loss = GALoss(top_fraction=0.4, gamma=0.5, ignore_index=3)
    expected = ga_cross_entropy(_GA_LOGITS, _GA_TARGET, 0.4, 0.5) + ga_dice_loss(_GA_LOGITS, _GA_TARGET)
    assert loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


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
