"""The shuffled-text ablation: every organ gets another organ's description (same embeddings, same
centring, classes permuted), the sharpest offline test of whether the descriptions' content matters."""

from __future__ import annotations

import dataclasses

import numpy as np

from nnunetv2_tak.text.embeddings import TextEmbeddings

__all__ = ["derangement", "permute_classes"]


def derangement(num_classes: int, seed: int = 0, keep: tuple[int, ...] = (0,)) -> list[int]:
    """A seeded permutation of ``range(num_classes)`` that moves every class except those in ``keep``
    (background by default): ``order[c]`` is the class whose text class ``c`` receives."""
    moved = [c for c in range(num_classes) if c not in keep]
    if len(moved) < 2:
        raise ValueError(f"a derangement needs at least 2 classes outside {keep}; this dataset has {len(moved)}")
    rng = np.random.default_rng(seed)
    while True:  # rejection sampling: about 1/e of the permutations have no fixed point
        shuffled = rng.permutation(moved).tolist()
        if all(a != b for a, b in zip(moved, shuffled, strict=True)):
            break
    order = list(range(num_classes))
    for c, source in zip(moved, shuffled, strict=True):
        order[c] = source
    return order


def permute_classes(embeddings: TextEmbeddings, order: list[int]) -> TextEmbeddings:
    """E [C, K, D] -> E[order]: class c gets the prompts' embeddings of class ``order[c]``; the provenance
    records the permutation (so plans.json and the log say the text was shuffled)."""
    if sorted(order) != list(range(embeddings.shape[0])):
        raise ValueError(f"{order} is not a permutation of the {embeddings.shape[0]} classes")
    provenance = {**embeddings.provenance, "class_permutation": list(order)}
    return dataclasses.replace(embeddings, tensor=embeddings.tensor[order].contiguous(), provenance=provenance)
