"""Trainers of the evidence benchmark (examples/benchmark.py): the stock nnUNetTrainer and the TAK
variants with one shared CPU schedule, so every method gets the same plans, iterations and optimizer.

nnU-Net's recipe (SGD, momentum 0.99, poly decay, rotation/scaling/mirroring augmentation) needs
thousands of iterations before the small organs appear; on 2 CPU cores that is out of reach
(DESIGN.md, "CPU calibration"). The CPU profile therefore uses AdamW (lr 1e-3, poly decay) and
nnU-Net's intensity augmentations only (noise, blur, brightness, contrast, low resolution, gamma; no
spatial transform, no mirroring), applied identically to the baseline and to every variant, labeled
and unlabeled stream alike.
"""

from __future__ import annotations

import os
from typing import ClassVar

import torch
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_tak.trainers import (
    nnUNetTrainerTAK,
    nnUNetTrainerTAK_NoContrastive,
    nnUNetTrainerTAK_NoText,
    nnUNetTrainerTAK_NoUnlabeled,
    nnUNetTrainerTAK_RandomText,
)

__all__ = [
    "nnUNetTrainerTAK_BenchCPU",
    "nnUNetTrainerTAK_NoContrastive_BenchCPU",
    "nnUNetTrainerTAK_NoText_BenchCPU",
    "nnUNetTrainerTAK_NoUnlabeled_BenchCPU",
    "nnUNetTrainerTAK_RandomText_BenchCPU",
    "nnUNetTrainer_BenchCPU",
]


class BenchCPUSchedule:
    """Mixin: the benchmark's CPU schedule (epochs x iterations, AdamW + poly decay, intensity-only
    augmentation)."""

    bench_epochs: ClassVar[int] = 40
    bench_iterations: ClassVar[int] = 25
    bench_learning_rate: ClassVar[float] = 3e-3

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("TAK_BENCH_EPOCHS", self.bench_epochs))  # benchmark.py --epochs
        self.num_iterations_per_epoch = self.bench_iterations
        self.num_val_iterations_per_epoch = 5
        self.initial_lr = self.bench_learning_rate

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=3e-5)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """No mirroring in training or inference; patches are cut at their final size."""
        rotation, dummy_2d, _, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, self.configuration_manager.patch_size, None

    @staticmethod
    def get_training_transforms(*args, **kwargs):
        """nnU-Net's training pipeline without its spatial transform (rotation, scaling, cropping)."""
        pipeline = nnUNetTrainer.get_training_transforms(*args, **kwargs)
        pipeline.transforms = [t for t in pipeline.transforms if not isinstance(t, SpatialTransform)]
        return pipeline


class nnUNetTrainer_BenchCPU(BenchCPUSchedule, nnUNetTrainer):
    """Stock nnU-Net (labeled cases only) on the benchmark schedule."""


class nnUNetTrainerTAK_BenchCPU(BenchCPUSchedule, nnUNetTrainerTAK):
    pass


class nnUNetTrainerTAK_NoText_BenchCPU(BenchCPUSchedule, nnUNetTrainerTAK_NoText):
    pass


class nnUNetTrainerTAK_RandomText_BenchCPU(BenchCPUSchedule, nnUNetTrainerTAK_RandomText):
    pass


class nnUNetTrainerTAK_NoContrastive_BenchCPU(BenchCPUSchedule, nnUNetTrainerTAK_NoContrastive):
    pass


class nnUNetTrainerTAK_NoUnlabeled_BenchCPU(BenchCPUSchedule, nnUNetTrainerTAK_NoUnlabeled):
    pass
