"""A CPU-sized training schedule as a mixin: AdamW with nnU-Net's poly decay and nnU-Net's intensity
augmentations only (no rotation, scaling or mirroring), for demonstrations and benchmarks on a CPU.

nnU-Net's recipe (SGD, momentum 0.99, poly decay, spatial augmentation, 1000 x 250 iterations) needs
thousands of iterations before small organs appear; on a CPU that is out of reach, so a short schedule
converges faster with AdamW and intensity augmentation. Applied identically to a baseline and to every
variant compared with it.
"""

from __future__ import annotations

import os
from typing import ClassVar

import torch
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

__all__ = ["CPUSchedule"]


class CPUSchedule:
    """Mixin (before the trainer in the bases): ``bench_epochs`` x ``bench_iterations`` iterations, AdamW at
    ``bench_learning_rate`` with poly decay, intensity-only augmentation. ``epochs_env_var`` names an
    environment variable that overrides the epochs (None: fixed)."""

    bench_epochs: ClassVar[int] = 40
    bench_iterations: ClassVar[int] = 25
    bench_learning_rate: ClassVar[float] = 3e-3
    epochs_env_var: ClassVar[str | None] = None

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
