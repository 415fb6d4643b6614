"""Trainers of the evidence benchmark (examples/benchmark.py): the stock nnUNetTrainer and the TAK
variants with one shared schedule, so every method gets the same plans, iterations, optimizer and
augmentation.

nnU-Net's recipe (SGD, momentum 0.99, poly decay, rotation/scaling/mirroring augmentation) needs
thousands of iterations before the small organs appear; on 2 CPU cores that is out of reach
(DESIGN.md, "CPU calibration"). The benchmark therefore uses AdamW (lr 3e-3, poly decay) and
nnU-Net's intensity augmentations only (noise, blur, brightness, contrast, low resolution, gamma; no
spatial transform, no mirroring), applied identically to the baseline and to every variant, labeled
and unlabeled stream alike. In 1,000 iterations with lr 1e-3 the fully supervised reference segmented
none of the small organs but the aorta; with 3e-3 it also reached the gallbladder, esophagus, IVC,
pancreas and an adrenal gland (validation pseudo-Dice; examples/EVIDENCE.md, "Evidence benchmark").
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
    "nnUNetTrainerTAK_Bench",
    "nnUNetTrainerTAK_ConfidentDiceCE_Bench",
    "nnUNetTrainerTAK_NoContrastive_Bench",
    "nnUNetTrainerTAK_NoText_Bench",
    "nnUNetTrainerTAK_NoUnlabeled_Bench",
    "nnUNetTrainerTAK_RandomText_Bench",
    "nnUNetTrainer_Bench",
]


class BenchSchedule:
    """Mixin: the benchmark's schedule (epochs x iterations, AdamW + poly decay, intensity-only
    augmentation)."""

    bench_epochs: ClassVar[int] = 40
    bench_iterations: ClassVar[int] = 25
    bench_learning_rate: ClassVar[float] = 3e-3
    epochs_env_var: ClassVar[str | None] = "TAK_BENCH_EPOCHS"  # benchmark.py --epochs; None: fixed epochs

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        epochs = os.environ.get(self.epochs_env_var) if self.epochs_env_var else None
        self.num_epochs = int(epochs or self.bench_epochs)
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


class nnUNetTrainer_Bench(BenchSchedule, nnUNetTrainer):
    """Stock nnU-Net (labeled cases only) on the benchmark schedule."""


class nnUNetTrainerTAK_Bench(BenchSchedule, nnUNetTrainerTAK):
    pass


class nnUNetTrainerTAK_NoText_Bench(BenchSchedule, nnUNetTrainerTAK_NoText):
    pass


class nnUNetTrainerTAK_RandomText_Bench(BenchSchedule, nnUNetTrainerTAK_RandomText):
    pass


class nnUNetTrainerTAK_NoContrastive_Bench(BenchSchedule, nnUNetTrainerTAK_NoContrastive):
    pass


class nnUNetTrainerTAK_NoUnlabeled_Bench(BenchSchedule, nnUNetTrainerTAK_NoUnlabeled):
    pass


class nnUNetTrainerTAK_ConfidentDiceCE_Bench(nnUNetTrainerTAK_Bench):
    """Issue 9's alternative pseudo-label loss: nnU-Net Dice+CE on confident voxels only (the default is
    the reference's GADice on every voxel)."""

    unsup_loss = "dice_ce_confident"
