"""The nnU-Net trainers: ``nnUNetTrainerTAK`` (``tak``), the plain mean teacher it builds on
(``mean_teacher``), their variants (``variants``) and the quickstart's
CPU demo trainer (``demo``), with what they delegate to: resume checks (``resume``), multi-GPU and
multi-node training (``distributed``), the log and progress plot (``progress``), CPU schedules
(``schedules``). The stock CLI finds every trainer here by name."""

from nnunetv2_tak.trainers.demo import nnUNetTrainerTAK_CPUDemo
from nnunetv2_tak.trainers.mean_teacher import nnUNetTrainerMeanTeacher
from nnunetv2_tak.trainers.tak import CHECKPOINT_KEY, PLANS_KEY, SSLSettingsError, nnUNetTrainerTAK
from nnunetv2_tak.trainers.variants import *  # noqa: F403
from nnunetv2_tak.trainers.variants import __all__ as _variants

__all__ = ["CHECKPOINT_KEY", "PLANS_KEY", "SSLSettingsError", "nnUNetTrainerTAK", "nnUNetTrainerTAK_CPUDemo",
           "nnUNetTrainerMeanTeacher",
           *_variants]
