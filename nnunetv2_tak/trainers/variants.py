"""User-facing variants of nnUNetTrainerTAK and nnUNetTrainerMeanTeacher, each a few class attributes: the
ablations (no text, random text, raw text, shuffled text, no unlabeled data, no contrastive term, labeled-only
text prior), the alternative losses, and ``_Debug`` schedules for plumbing checks (1 epoch of 2 iterations;
they accept random-weight text)."""

from __future__ import annotations

from typing import ClassVar

from nnunetv2_tak.model.network import TextPriorConfig
from nnunetv2_tak.text.embeddings import TextEmbeddings
from nnunetv2_tak.text.shuffle import derangement, permute_classes
from nnunetv2_tak.trainers.mean_teacher import nnUNetTrainerMeanTeacher
from nnunetv2_tak.trainers.tak import nnUNetTrainerTAK

__all__ = [
    "nnUNetTrainerMeanTeacher_Debug",
    "nnUNetTrainerTAK_CenteredText",
    "nnUNetTrainerTAK_ConfidentDiceCE",
    "nnUNetTrainerTAK_Debug",
    "nnUNetTrainerTAK_GALoss",
    "nnUNetTrainerTAK_NoContrastive",
    "nnUNetTrainerTAK_NoText",
    "nnUNetTrainerTAK_NoText_Debug",
    "nnUNetTrainerTAK_NoUnlabeled",
    "nnUNetTrainerTAK_RandomText",
    "nnUNetTrainerTAK_RandomText_Debug",
    "nnUNetTrainerTAK_RawText",
    "nnUNetTrainerTAK_ShuffledText",
    "nnUNetTrainerTAK_TextPriorOnly",
    "nnUNetTrainerTAK_TextPriorOnly_Debug",
]


class _Debug:
    """Plumbing checks: 1 epoch of 2 iterations, 1 validation iteration; accepts random-weight text.
    The contrastive term starts at once so that every term runs."""

    allow_random_text_encoder = True
    epochs = 1
    iterations_per_epoch = 2
    val_iterations_per_epoch = 1
    contrastive_start_fraction = 0.0


class nnUNetTrainerTAK_RandomText(nnUNetTrainerTAK):
    """Ablation: seeded random text embeddings instead of prompts (no textual knowledge). Not centred:
    independent Gaussian vectors share no common component to remove (the benchmark measured it so)."""

    text_source = "random"
    text_prior = TextPriorConfig(text_centering="none")


class nnUNetTrainerTAK_NoText(nnUNetTrainerTAK):
    """Ablation: learned class embeddings instead of text (head and contrastive anchors learn them), not
    centred: nothing fixed to remove (the benchmark measured it so)."""

    text_source = "learned"
    text_prior = TextPriorConfig(text_centering="none")


class nnUNetTrainerTAK_RawText(nnUNetTrainerTAK):
    """The reference code's text handling: the raw CLIP text features into the text MLP, not centred across
    classes. The ablation behind the default (examples/EVIDENCE.md, "Does the text help")."""

    text_prior = TextPriorConfig(text_centering="none")


class nnUNetTrainerTAK_NoUnlabeled(nnUNetTrainerTAK):
    """Ablation: labeled data only, with text-prior head and contrastive term (no teacher, no pseudo-labels)."""

    use_unlabeled = False


class nnUNetTrainerTAK_NoContrastive(nnUNetTrainerTAK):
    """Ablation: no text-visual contrastive term."""

    contrastive_weight = 0.0


class nnUNetTrainerTAK_TextPriorOnly(nnUNetTrainerTAK):
    """Ablation: the text-prior network trained on labeled data only: no unlabeled data, no contrastive term."""

    use_unlabeled = False
    contrastive_weight = 0.0


class nnUNetTrainerTAK_GALoss(nnUNetTrainerTAK):
    """Class-imbalance aware supervised loss: GALoss (GACE + GADice, the reference code's) in place of
    nnU-Net's Dice+CE, with the same deep supervision."""

    supervised_loss = "ga"


class nnUNetTrainerTAK_Debug(_Debug, nnUNetTrainerTAK):
    pass


class nnUNetTrainerTAK_RandomText_Debug(_Debug, nnUNetTrainerTAK_RandomText):
    pass


class nnUNetTrainerTAK_NoText_Debug(_Debug, nnUNetTrainerTAK_NoText):
    pass


class nnUNetTrainerTAK_TextPriorOnly_Debug(_Debug, nnUNetTrainerTAK_TextPriorOnly):
    pass


class nnUNetTrainerTAK_ConfidentDiceCE(nnUNetTrainerTAK):
    """Pseudo-label loss alternative: nnU-Net's Dice+CE on the teacher's confident voxels only, instead of the
    reference's GADice on every voxel (README, "Reference vs ours")."""

    unsup_loss = "dice_ce_confident"


class nnUNetTrainerTAK_CenteredText(nnUNetTrainerTAK):
    """Same as nnUNetTrainerTAK (centred text, ``text_centering="center_scale"``), under its own name: results
    folders trained under this name keep resuming (--c) and predicting."""

    text_prior = TextPriorConfig(text_centering="center_scale")


class nnUNetTrainerTAK_ShuffledText(nnUNetTrainerTAK):
    """Ablation: the dataset's real text with the organs' descriptions permuted by a fixed derangement that keeps
    background in place (every organ gets another organ's text); everything else as nnUNetTrainerTAK, centring
    included. If it scores like nnUNetTrainerTAK, the descriptions' content does not matter."""

    text_shuffle_seed: ClassVar[int] = 0

    def resolve_text_embeddings(self) -> TextEmbeddings:
        embeddings = super().resolve_text_embeddings()
        return permute_classes(embeddings, derangement(embeddings.shape[0], self.text_shuffle_seed))


class nnUNetTrainerMeanTeacher_Debug(_Debug, nnUNetTrainerMeanTeacher):
    pass
