"""The quickstart's trainer: TAK with a CPU demo schedule (examples/quickstart.py).

This is a demonstration schedule sized for a laptop CPU, not nnU-Net's recipe: AdamW with poly decay
and nnU-Net's intensity augmentations only (``schedules.CPUSchedule``, as the evidence benchmark), on a short
budget. ``nnUNetTrainerTAK`` itself keeps nnU-Net's schedule (SGD, 1000 x 250 iterations, full
augmentation); use it, not this variant, on real data. The budget was chosen on the validation split
(fold 0) of the quickstart cohort, never on its held-out test scans (examples/EVIDENCE.md,
"Quickstart schedule").
"""

from __future__ import annotations

from typing import ClassVar

from nnunetv2_tak.model.network import TextPriorConfig
from nnunetv2_tak.trainers.schedules import CPUSchedule
from nnunetv2_tak.trainers.tak import nnUNetTrainerTAK

__all__ = ["nnUNetTrainerTAK_CPUDemo"]


class CPUDemoSchedule(CPUSchedule):
    """Mixin: the quickstart's CPU demo schedule (AdamW + poly decay, intensity-only augmentation)."""

    bench_epochs: ClassVar[int] = 16
    bench_iterations: ClassVar[int] = 25
    bench_learning_rate: ClassVar[float] = 8e-3  # validation: beat the benchmark's 3e-3 (EVIDENCE.md)


class nnUNetTrainerTAK_CPUDemo(CPUDemoSchedule, nnUNetTrainerTAK):
    """TAK (text-prior head, unlabeled stream, EMA teacher, contrastive term) on the CPU demo schedule.
    Accepts text encoded with random open_clip weights, which the offline quickstart uses.

    Keeps the raw text (``text_centering="none"``), the setting its schedule was chosen with: on this
    schedule the centred text of nnUNetTrainerTAK's default found fewer organs in the same time (fold-0
    validation 0.220 vs 0.399, one run each; examples/EVIDENCE.md, "The default text handling")."""

    allow_random_text_encoder = True
    text_prior = TextPriorConfig(text_centering="none")
