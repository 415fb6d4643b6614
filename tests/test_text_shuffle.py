"""The shuffled-text ablation: a fixed derangement that keeps background and moves every organ."""

from __future__ import annotations

import pytest
import torch

from nnunetv2_tak.text.embeddings import TextEmbeddings
from nnunetv2_tak.text.shuffle import derangement, permute_classes


@pytest.mark.parametrize("num_classes", [3, 4, 16, 105])
def test_derangement_moves_every_organ_and_keeps_background(num_classes):
    order = derangement(num_classes)
    assert sorted(order) == list(range(num_classes))
    assert order[0] == 0
    assert all(order[c] != c for c in range(1, num_classes))
    assert derangement(num_classes) == order  # fixed: a resumed run or a second seed gets the same text
    if num_classes > 4:  # 2 or 3 organs have only 1 or 2 derangements
        assert derangement(num_classes, seed=1) != order


def test_two_classes_cannot_be_deranged_around_background():
    with pytest.raises(ValueError, match="at least 2 classes"):
        derangement(2)


def test_permute_classes_moves_the_rows_and_records_the_order():
    tensor = torch.arange(4 * 2 * 3, dtype=torch.float32).reshape(4, 2, 3)
    text = TextEmbeddings(tensor, {"source": "file", "class_names": ["background", "a", "b", "c"]})
    order = [0, 2, 3, 1]
    shuffled = permute_classes(text, order)
    for c, source in enumerate(order):
        assert torch.equal(shuffled.tensor[c], tensor[source])
    assert shuffled.provenance["class_permutation"] == order
    assert "PERMUTED" in shuffled.describe()
    assert "class_permutation" not in text.provenance  # the input is left as it was
    with pytest.raises(ValueError, match="not a permutation"):
        permute_classes(text, [0, 1, 1, 2])
