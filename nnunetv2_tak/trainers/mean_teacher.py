"""A plain mean teacher in nnU-Net: labeled batches as nnU-Net samples them plus an unlabeled stream
(``imagesUnlabeled/`` and split-marked cases), an EMA teacher on noisy unlabeled input, and a pseudo-label
loss on the student's unlabeled predictions. nnU-Net's own network and segmentation layers; no text, no
prompts, so it trains on any nnU-Net dataset.

``nnUNetTrainerTAK`` is this trainer plus the text-prior head and the text-visual contrastive term; the maths
lives in ``nnunetv2_tak.semisupervised`` (teacher, ramps, losses), the unlabeled data in
``nnunetv2_tak.unlabeled``, resume checks in ``resume``. Every knob is a typed class attribute::

    class MyTrainer(nnUNetTrainerMeanTeacher):
        unsup_weight = 0.2
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.distributed as dist
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.configuration import default_num_processes
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context

from nnunetv2_tak.fileio import atomic_write
from nnunetv2_tak.model.network import unwrap_network
from nnunetv2_tak.semisupervised.losses import GADiceLoss, GALoss
from nnunetv2_tak.semisupervised.teacher import (
    LN2,
    EMATeacher,
    clipped_noise,
    entropy_threshold,
    mask_unconfident,
    pseudo_label_statistics,
    sigmoid_rampup,
    teacher_predictions,
)
from nnunetv2_tak.text.prompts import dataset_class_names
from nnunetv2_tak.text.source import raw_dataset_folder
from nnunetv2_tak.trainers.distributed import DistributedTrainerMixin
from nnunetv2_tak.trainers.progress import TAKLocalLogger
from nnunetv2_tak.trainers.resume import (
    SSLSettingsError,
    changed_settings,
    describe_extension,
    extension_allowed,
    poly_lr,
    read_checkpoint,
    refuse_changed_settings,
    retire_final_checkpoint,
)
from nnunetv2_tak.trainers.settings import Checked, checked_knobs
from nnunetv2_tak.unlabeled import (
    UNLABELED_DIR,
    ImageOnlyDataset,
    UnlabeledDataError,
    preprocess_unlabeled,
    preprocessed_unlabeled_cases,
    shard_for_rank,
    split_unlabeled_cases,
)

__all__ = ["CHECKPOINT_KEY", "LossTerms", "UnlabeledBatch", "nnUNetTrainerMeanTeacher"]

CHECKPOINT_KEY = "tak_ssl"  # extra checkpoint entry: teacher, settings, unlabeled set, loss state


@dataclass
class UnlabeledBatch:
    """One unlabeled batch and the teacher's targets for it."""

    images: torch.Tensor  # [B_u, c, *S] the student's input
    target: torch.Tensor  # [B_u, 1, *S] what the pseudo-label loss compares with (argmax or masked argmax)
    pseudo_labels: torch.Tensor  # [B_u, 1, *S] argmax, unconfident voxels = num_classes (ignored)


@dataclass
class LossTerms:
    """The loss of one iteration and its terms (unweighted), for the optimizer and the log."""

    total: torch.Tensor
    supervised: torch.Tensor
    pseudo_label: torch.Tensor
    contrastive: torch.Tensor
    deep_features: list[torch.Tensor] | None = None  # the student's deepest encoder stages, for added terms
    backward_done: bool = False  # the gradients are already accumulated (sequential halves): step only


def _full_resolution(output: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    return output[0] if isinstance(output, list) else output


class nnUNetTrainerMeanTeacher(DistributedTrainerMixin, nnUNetTrainer):
    """nnU-Net + unlabeled stream, EMA teacher, entropy-filtered pseudo-labels and a ramped pseudo-label loss.

    Knobs declared ``Checked`` must match when a run is resumed (``--c``); the checkpoint stores them."""

    # --- semi-supervised training (defaults of the TAK reference code; README "Reference vs ours") ---
    use_unlabeled: ClassVar[Checked[bool]] = True  # False: labeled data only (no teacher, no pseudo-labels)
    unlabeled_batch_size: ClassVar[Checked[int | None]] = None  # None: the planned batch size
    ema_decay: ClassVar[Checked[float]] = 0.99  # teacher decay, warm-up min(1 - 1/(step + 1), decay)
    teacher_noise_std: ClassVar[Checked[float]] = 0.1  # Gaussian noise on the teacher's input ...
    teacher_noise_clip: ClassVar[Checked[float]] = 0.2  # ... clipped to +-this
    entropy_threshold_base: ClassVar[Checked[float]] = LN2  # tau(t) = base * (start + (1 - start) * rampup(t))
    entropy_threshold_start: ClassVar[Checked[float]] = 0.75
    entropy_rampup_fraction: ClassVar[Checked[float]] = 0.625  # threshold ramps over this fraction of training
    unsup_weight: ClassVar[Checked[float]] = 0.1  # pseudo-label loss weight * sigmoid_rampup(epoch, ramp length)
    unsup_rampup_fraction: ClassVar[Checked[float]] = 1.0  # the weight ramps over this fraction of training
    unsup_loss: ClassVar[Checked[str]] = "ga_dice"  # "ga_dice": every voxel, background included (reference);
    #                                                 "dice_ce_confident": nnU-Net Dice+CE on confident voxels only
    supervised_loss: ClassVar[Checked[str]] = "dice_ce"  # "dice_ce" (nnU-Net's) or "ga" (GACE + GADice)
    ga_top_fraction: ClassVar[Checked[float]] = 0.1  # GACE keeps this fraction of voxels with the largest CE
    ga_gamma: ClassVar[Checked[float]] = 0.5  # GACE class normalisation n_c^(1-g) * M^g
    # memory: the student runs the unlabeled, then the labeled half, one forward/backward each, so it holds the
    # activations of one half at a time (same losses and gradients; see loss_terms_sequential). Not checked on
    # resume: it changes where the work happens, not what is computed.
    sequential_halves: ClassVar[bool] = False
    # --- schedule (None keeps nnU-Net's default) --------------------------------------------
    epochs: ClassVar[int | None] = None
    iterations_per_epoch: ClassVar[int | None] = None
    val_iterations_per_epoch: ClassVar[int | None] = None
    initial_learning_rate: ClassVar[float | None] = None
    allow_extend_epochs: ClassVar[bool] = False  # --c may continue a run for more epochs (or TAK_ALLOW_EXTEND=1)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.class_names = dataset_class_names(dataset_json)  # fails early on region-based labels
        for knob, target in (("epochs", "num_epochs"), ("iterations_per_epoch", "num_iterations_per_epoch"),
                             ("val_iterations_per_epoch", "num_val_iterations_per_epoch"),
                             ("initial_learning_rate", "initial_lr")):
            if getattr(self, knob) is not None:
                setattr(self, target, getattr(self, knob))
        self.logger.local_logger = TAKLocalLogger(self.logger.local_logger.verbose, class_names=self.class_names)
        self.teacher: EMATeacher | None = None
        self.unsup_criterion: torch.nn.Module | None = None
        self.dataloader_unlabeled = None
        self.unlabeled_cases: list[str] = []
        self._restored_unlabeled_digest: str | None = None
        self._iteration_in_epoch = 0
        if self.sequential_halves and self.is_ddp:
            raise RuntimeError(f"{type(self).__name__}: sequential_halves runs several backward passes per "
                               "iteration, which DistributedDataParallel does not support; train it on one GPU or "
                               "set sequential_halves = False (and a smaller unlabeled_batch_size for memory)")

    # --- set-up -----------------------------------------------------------------------------
    def initialize(self):
        super().initialize()
        self.on_network_built(unwrap_network(self.network))
        if self.use_unlabeled and self.teacher is None:
            # after DDP has broadcast rank 0's weights: every rank starts from the same teacher
            self.teacher = EMATeacher(unwrap_network(self.network), self.ema_decay)
            self.teacher.module.decoder.deep_supervision = False
        if self.use_unlabeled and self.unsup_criterion is None:
            self.unsup_criterion = self._build_unsup_loss()

    def on_network_built(self, network: torch.nn.Module) -> None:
        """Called once the (unwrapped) student exists, before the teacher copies it."""

    def _build_loss(self):
        """nnU-Net's Dice+CE with deep supervision, or GALoss (GACE + GADice) in its place."""
        loss = super()._build_loss()
        if self.supervised_loss == "ga":
            ga = GALoss(self.ga_top_fraction, self.ga_gamma, ignore_index=self.label_manager.ignore_label)
            if isinstance(loss, DeepSupervisionWrapper):  # same deep-supervision weights as nnU-Net's
                loss.loss = ga
            else:
                loss = ga
        elif self.supervised_loss != "dice_ce":
            raise ValueError(f"{type(self).__name__}.supervised_loss must be 'dice_ce' or 'ga', "
                             f"not {self.supervised_loss!r}")
        return loss

    def _build_unsup_loss(self) -> torch.nn.Module:
        """Loss of the full-resolution unlabeled output against the teacher's argmax: GADice on every voxel
        (the reference), or nnU-Net's Dice+CE where unconfident voxels carry the label C and are ignored."""
        if self.unsup_loss == "ga_dice":
            return GADiceLoss()
        if self.unsup_loss == "dice_ce_confident":
            return DC_and_CE_loss({"batch_dice": self.configuration_manager.batch_dice, "smooth": 1e-5,
                                   "do_bg": False, "ddp": self.is_ddp}, {}, weight_ce=1, weight_dice=1,
                                  ignore_label=self.label_manager.num_segmentation_heads,
                                  dice_class=MemoryEfficientSoftDiceLoss)
        raise ValueError(f"{type(self).__name__}.unsup_loss must be 'ga_dice' or 'dice_ce_confident', "
                         f"not {self.unsup_loss!r}")

    # --- schedules --------------------------------------------------------------------------
    def training_progress(self, iteration: int = 0) -> float:
        """Fractional epoch t of the current iteration (epoch + iteration / iterations per epoch)."""
        return self.current_epoch + iteration / max(self.num_iterations_per_epoch, 1)

    def ssl_weights(self, t: float) -> dict[str, float]:
        """Loss weights and entropy threshold at fractional epoch t."""
        unsup_ramp = sigmoid_rampup(t, self.unsup_rampup_fraction * self.num_epochs)
        return {
            "unsup": self.unsup_weight * unsup_ramp if self.use_unlabeled else 0.0,
            "contrast": 0.0,
            "threshold": entropy_threshold(t, self.entropy_rampup_fraction * self.num_epochs,
                                           self.entropy_threshold_base, self.entropy_threshold_start),
        }

    # --- unlabeled stream -------------------------------------------------------------------
    def find_unlabeled_cases(self) -> ImageOnlyDataset:
        """imagesUnlabeled/ (preprocessed on first use, by rank 0 alone under DDP) plus this fold's
        split-marked unlabeled cases (images only, labels never opened); this rank's disjoint shard."""
        if self.is_cascaded:
            raise UnlabeledDataError(f"{type(self).__name__} does not support cascaded configurations "
                                     f"({self.configuration_name}); train 3d_fullres, 3d_lowres or 2d.")
        if self.is_ddp:
            # rank 0 alone looks at nnUNet_raw and preprocesses; every rank gets its case list, so all ranks
            # agree on the cases and on the collectives even when only some nodes see nnUNet_raw
            payload: list = [None]
            if dist.get_rank() == 0:
                try:
                    payload = [("ok", self._unlabeled_sources())]
                except UnlabeledDataError as exc:
                    payload = [("error", str(exc))]
            dist.broadcast_object_list(payload, src=0)
            status, value = payload[0]
            if status == "error":
                raise UnlabeledDataError(value)
            sources = value
        else:
            sources = self._unlabeled_sources()
        dataset = ImageOnlyDataset.from_folders(sources)
        if len(dataset) == 0:
            raise UnlabeledDataError(
                f"{type(self).__name__} trains with unlabeled data but {self.plans_manager.dataset_name} has none: "
                f"put unlabeled scans in nnUNet_raw/{self.plans_manager.dataset_name}/{UNLABELED_DIR}/ (nnU-Net "
                "file naming, all channels), or mark training cases as unlabeled with nnUNetv2_tak_make_splits, or "
                "train a labeled-only trainer (nnUNetTrainer, nnUNetTrainerTAK_NoUnlabeled).")
        self.unlabeled_cases = list(dataset.identifiers)
        if self.is_ddp:
            shard = shard_for_rank(dataset.identifiers, dist.get_rank(), dist.get_world_size())
            dataset = ImageOnlyDataset({case: dataset.sources[case] for case in shard})
        return dataset

    def _unlabeled_sources(self) -> list[tuple]:
        """[(preprocessed folder, case ids)]: imagesUnlabeled/ (preprocessed now if needed) or, without
        nnUNet_raw, an up-to-date preprocessed unlabeled folder; plus the split's unlabeled cases."""
        raw = raw_dataset_folder(self.plans_manager.dataset_name)
        sources = []
        if raw is not None and (raw / UNLABELED_DIR).is_dir():
            sources.append(preprocess_unlabeled(
                raw, self.preprocessed_dataset_folder_base, self.plans_manager.plans, self.configuration_name,
                self.dataset_json, num_processes=max(1, min(default_num_processes, 8)), progress=True,
                log=self.print_to_log_file))
        else:  # nnUNet_raw not available here (e.g. only nnUNet_preprocessed copied to a cluster)
            found = preprocessed_unlabeled_cases(self.preprocessed_dataset_folder_base, self.plans_manager.plans,
                                                 self.configuration_name, self.dataset_json, log=self.print_to_log_file)
            if found is not None:
                self.print_to_log_file(f"TAK: nnUNet_raw/{self.plans_manager.dataset_name}/{UNLABELED_DIR} not found; "
                                       f"using the preprocessed unlabeled cases in {found[0]}")
                sources.append(found)
        split_cases = split_unlabeled_cases(os.path.join(self.preprocessed_dataset_folder_base, "splits_final.json"),
                                            self.fold)
        if split_cases:  # checked against the fold's train/val cases by split_unlabeled_cases
            sources.append((self.preprocessed_dataset_folder, split_cases))
        return sources

    @property
    def unlabeled_patches_per_step(self) -> int:
        """Unlabeled patches per step in this process: ``unlabeled_batch_size``, or the labeled batch."""
        return self.unlabeled_batch_size or self.batch_size

    def unlabeled_digest(self) -> str:
        return hashlib.sha256("\n".join(sorted(self.unlabeled_cases)).encode()).hexdigest()

    def get_dataloaders(self):
        if self.use_unlabeled:
            unlabeled = self.find_unlabeled_cases()  # errors before any worker starts
            if self._restored_unlabeled_digest not in (None, self.unlabeled_digest()):
                raise SSLSettingsError(
                    f"the unlabeled cases changed since the checkpoint ({len(self.unlabeled_cases)} now); resuming "
                    "would mix two data settings. Restore the unlabeled images/split, or train into a new folder.")
        train, val = super().get_dataloaders()
        if self.use_unlabeled:
            self.dataloader_unlabeled = self._unlabeled_loader(unlabeled)
            self.print_to_log_file(f"TAK: {len(self.unlabeled_cases)} unlabeled case(s), "
                                   f"{len(unlabeled)} streamed by this process")
        else:
            self.print_to_log_file("TAK: labeled data only (this variant uses no unlabeled data)")
        return train, val

    def _unlabeled_loader(self, dataset: ImageOnlyDataset):
        """nnU-Net's loader and training augmentation on images only (random patches, no oversampling).
        Mirrors the training half of nnUNetTrainer.get_dataloaders (nnunetv2 2.8): same transforms, same
        augmenter choice by get_allowed_n_proc_DA."""
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        transforms = self.get_training_transforms(
            self.configuration_manager.patch_size, rotation, None, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels, regions=None, ignore_label=None)
        loader = nnUNetDataLoader(dataset, self.unlabeled_patches_per_step, initial_patch_size,
                                  self.configuration_manager.patch_size, self.label_manager,
                                  oversample_foreground_percent=0.0, transforms=transforms)
        loader.has_ignore = False  # with an ignore label nnU-Net samples annotated voxels; here: random patches
        workers = get_allowed_n_proc_DA()
        if workers == 0:
            return SingleThreadedAugmenter(loader, None)
        return NonDetMultiThreadedAugmenter(loader, None, workers, num_cached=max(6, workers // 2), seeds=None,
                                            pin_memory=self.device.type == "cuda", wait_time=0.002)

    def on_train_start(self):
        super().on_train_start()
        if self.teacher is not None and self.teacher.step == 0:  # fresh run (maybe -pretrained_weights)
            self.teacher.module.load_state_dict(unwrap_network(self.network).state_dict())

    def on_train_end(self):
        super().on_train_end()
        if isinstance(self.dataloader_unlabeled, NonDetMultiThreadedAugmenter):
            stdout, sys.stdout = sys.stdout, open(os.devnull, "w")  # noqa: SIM115 (silence the workers' exit)
            try:
                self.dataloader_unlabeled._finish()
            finally:
                sys.stdout.close()
                sys.stdout = stdout

    # --- one iteration ----------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict:
        """Labeled batch (nnU-Net's) + an unlabeled batch: the teacher's targets, one student forward on both,
        the loss terms, the optimizer step, then the teacher's EMA update. Out of GPU memory, the error says
        which knobs of this trainer lower its memory."""
        try:
            return self._train_step(batch)
        except torch.OutOfMemoryError as exc:
            raise torch.OutOfMemoryError(f"{exc}\n\n{self.memory_advice()}") from exc

    def memory_advice(self) -> str:
        """What lowers this trainer's peak memory, for an out-of-memory error (README "GPU memory")."""
        batch = self.batch_size
        unlabeled = self.unlabeled_patches_per_step
        patch = "x".join(str(s) for s in self.configuration_manager.patch_size)
        holds = f"the labeled batch ({batch}) plus the unlabeled batch ({unlabeled})" if self.use_unlabeled \
            else f"the labeled batch ({batch})"
        lines = [f"{type(self).__name__} ran out of memory: its student holds activations for {holds} of {patch} "
                 "patches. What lowers that, set in a subclass of this trainer (README, \"GPU memory\"):"]
        if self.use_unlabeled and not self.sequential_halves and not self.is_ddp:
            lines.append("  - sequential_halves = True: one half's activations at a time, same losses and gradients")
        if self.use_unlabeled and unlabeled > 1:
            lines.append("  - unlabeled_batch_size = 1: fewer unlabeled patches per step")
        lines.append("  - or plan for less memory: nnUNetv2_plan_experiment -d ID -gpu_memory_target GB "
                     "-overwrite_plans_name NAME, then nnUNetv2_preprocess and train with -p NAME")
        return "\n".join(lines)

    def _train_step(self, batch: dict) -> dict:
        data, target = self.labeled_batch(batch)
        weights = self.ssl_weights(self.training_progress(self._iteration_in_epoch))
        self._iteration_in_epoch += 1
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            unlabeled = self.unlabeled_batch(weights["threshold"]) if self.use_unlabeled else None
            terms = self.loss_terms(data, target, unlabeled, weights)
        if self.optimizer_step(terms.total, backward=not terms.backward_done) and self.teacher is not None:
            self.teacher.update(unwrap_network(self.network))
        return self.step_outputs(terms, unlabeled)

    def labeled_batch(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor]]:
        """nnU-Net's batch on the device: data [B, c, *S], target [B, 1, *S] (a list under deep supervision)."""
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        return batch["data"].to(self.device, non_blocking=True), target

    def unlabeled_batch(self, threshold: float) -> UnlabeledBatch:
        """The next unlabeled batch and the teacher's targets: argmax of its prediction on the noisy images,
        voxels whose entropy is above ``threshold`` masked with the label C."""
        images = next(self.dataloader_unlabeled)["data"].to(self.device, non_blocking=True)
        num_classes = self.label_manager.num_segmentation_heads
        with torch.no_grad():
            teacher_logits = self.teacher.module(clipped_noise(images, self.teacher_noise_std, self.teacher_noise_clip))
            argmax, entropy = teacher_predictions(teacher_logits)
            del teacher_logits
            pseudo = mask_unconfident(argmax, entropy, threshold, ignore_index=num_classes)
        return UnlabeledBatch(images, argmax if self.unsup_loss == "ga_dice" else pseudo, pseudo)

    def student_forward(self, inputs: torch.Tensor, labeled: int | None = None
                        ) -> tuple[torch.Tensor | list[torch.Tensor], list | None]:
        """The student's output on [B, c, *S] and the deep features later terms need (none here). The samples
        from ``labeled`` on are unlabeled (None: all labeled): a loss reads their full-resolution output only,
        so a network may leave their lower deep-supervision outputs out (nnU-Net's segmentation layers, a
        1x1 convolution, compute them anyway)."""
        return self.network(inputs), None

    def loss_terms(self, data: torch.Tensor, target: torch.Tensor | list[torch.Tensor],
                   unlabeled: UnlabeledBatch | None, weights: dict[str, float]) -> LossTerms:
        """One student forward on labeled + unlabeled images; supervised loss on the labeled half and the
        weighted pseudo-label loss on the full-resolution unlabeled half (``sequential_halves``: see
        :meth:`loss_terms_sequential`)."""
        if unlabeled is not None and self.sequential_halves:
            return self.loss_terms_sequential(data, target, unlabeled, weights)
        n_labeled = data.shape[0]
        inputs = data if unlabeled is None else torch.cat([data, unlabeled.images])
        output, deep = self.student_forward(inputs, labeled=n_labeled)
        labeled = [o[:n_labeled] for o in output] if isinstance(output, list) else output[:n_labeled]
        supervised = self.loss(labeled, target)
        pseudo_label = torch.zeros((), device=self.device)
        total = supervised
        if unlabeled is not None:
            pseudo_label = self.unsup_criterion(_full_resolution(output)[n_labeled:], unlabeled.target)
            total = total + weights["unsup"] * pseudo_label
        return LossTerms(total, supervised, pseudo_label, torch.zeros((), device=self.device), deep)

    def loss_terms_sequential(self, data: torch.Tensor, target: torch.Tensor | list[torch.Tensor],
                              unlabeled: UnlabeledBatch, weights: dict[str, float]) -> LossTerms:
        """The terms and gradients of :meth:`loss_terms`, the student holding one half's activations at a time.

        Every layer of nnU-Net's network (InstanceNorm included) and of the text prior acts on each sample
        alone, so each half's forward/backward gives its share of the joint gradient. A term that pairs the
        two halves (TAK's contrastive anchors) is first evaluated on both halves' deep features from a
        no-grad encoder pass (:meth:`deep_feature_gradients`); its gradient with respect to those features is
        then fed into each half's backward. Costs that extra encoder forward; the gradients are accumulated
        here (``backward_done``) and ``optimizer_step`` only clips and steps."""
        feature_term, feature_grads = self.deep_feature_gradients(data, target, unlabeled, weights)
        n_labeled = data.shape[0]
        labeled_grads = unlabeled_grads = None
        if feature_grads is not None:
            labeled_grads = [g[:n_labeled] for g in feature_grads]
            unlabeled_grads = [g[n_labeled:] for g in feature_grads]
        output, deep = self.student_forward(unlabeled.images, labeled=0)
        pseudo_label = self.unsup_criterion(_full_resolution(output), unlabeled.target)
        self.backward(weights["unsup"] * pseudo_label, deep, unlabeled_grads)
        del output, deep
        output, deep = self.student_forward(data)
        supervised = self.loss(output, target)
        self.backward(supervised, deep, labeled_grads)
        del output, deep
        total = supervised.detach() + weights["unsup"] * pseudo_label.detach()
        if feature_grads is not None:  # only a trainer with a deep-feature term (TAK) weighs one: "contrast"
            total = total + weights["contrast"] * feature_term
        return LossTerms(total, supervised.detach(), pseudo_label.detach(), feature_term, None, backward_done=True)

    def deep_feature_gradients(self, data: torch.Tensor, target: torch.Tensor | list[torch.Tensor],
                               unlabeled: UnlabeledBatch, weights: dict[str, float]
                               ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """For :meth:`loss_terms_sequential`: a term on the student's deep features of both halves, its value
        and its (loss-scaled) gradients with respect to those features [B_l + B_u, ch_i, *S_i], its own
        parameters' gradients accumulated. The mean teacher has none: (0, None)."""
        return torch.zeros((), device=self.device), None

    def backward(self, loss: torch.Tensor, features: list[torch.Tensor] | None = None,
                 feature_grads: list[torch.Tensor] | None = None) -> None:
        """Backward of ``loss`` (scaled by nnU-Net's grad scaler under AMP), plus, when given, the already
        scaled gradients ``feature_grads`` flowing into ``features`` from a term evaluated elsewhere."""
        scaled = loss if self.grad_scaler is None else self.grad_scaler.scale(loss)
        if feature_grads is None:
            scaled.backward()
            return
        torch.autograd.backward([scaled, *features], [None, *feature_grads])

    def optimizer_step(self, loss: torch.Tensor, backward: bool = True) -> bool:
        """Backward (unless the gradients are already accumulated), clip, step; whether the optimizer stepped
        (AMP skips steps with inf gradients).
        Mirrors the update in nnUNetTrainer.train_step (nnunetv2 2.8): grad scaler, clip norm 12."""
        if backward:
            self.backward(loss)
        if self.grad_scaler is None:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
            return True
        self.grad_scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
        scale = self.grad_scaler.get_scale()
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        return self.grad_scaler.get_scale() >= scale  # the scale drops when the step was skipped (inf)

    def step_outputs(self, terms: LossTerms, unlabeled: UnlabeledBatch | None) -> dict:
        """What the epoch's log collects: the loss, its terms and the pseudo-label statistics, moved to the host
        in one transfer (one sync per step, as nnU-Net's own train_step)."""
        num_classes = self.label_manager.num_segmentation_heads
        stats = pseudo_label_statistics(unlabeled.pseudo_labels, num_classes, num_classes) if unlabeled is not None \
            else torch.full((num_classes + 1,), float("nan"), dtype=torch.float64, device=self.device)
        values = torch.stack([terms.total.detach(), terms.supervised.detach(), terms.pseudo_label.detach(),
                              terms.contrastive.detach()]).float()  # [4], float32 as logged
        host = torch.cat([values.double(), stats.to(values.device)]).cpu().numpy()  # float32 -> float64 is exact
        values = host[:4].astype(np.float32)
        return {"loss": values[0], "tak_terms": values[1:], "tak_pl": host[4:]}

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._iteration_in_epoch = 0

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        outputs = collate_outputs(train_outputs)
        terms = np.mean(outputs["tak_terms"], axis=0)  # [sup, unsup, contrast]
        pl = outputs["tak_pl"][0]  # NaN without unlabeled data
        if self.use_unlabeled:  # coverage: mean; class shares: weighted by each iteration's confident voxels
            coverage = outputs["tak_pl"][:, 0]
            shares = (outputs["tak_pl"][:, 1:] * coverage[:, None]).sum(0) / max(coverage.sum(), 1e-12)
            pl = np.concatenate([[coverage.mean()], shares])
        if self.is_ddp:
            stacked = torch.tensor(np.concatenate([terms, pl]), device=self.device, dtype=torch.float64)
            dist.all_reduce(stacked)
            stacked /= dist.get_world_size()
            terms, pl = np.split(stacked.cpu().numpy(), [3])
        weights = self.ssl_weights(self.current_epoch)
        epoch = self.current_epoch
        for key, value in (("tak_sup_loss", terms[0]), ("tak_unsup_loss", terms[1]), ("tak_contrast_loss", terms[2]),
                           ("tak_unsup_weight", weights["unsup"]), ("tak_contrast_weight", weights["contrast"]),
                           ("tak_entropy_threshold", weights["threshold"] if self.use_unlabeled else np.nan),
                           ("tak_pl_coverage", pl[0]), ("tak_pl_share", [float(v) for v in pl[1:]])):
            self.logger.log(key, value, epoch)
        self.print_to_log_file(
            f"TAK losses: supervised {terms[0]:.4f}, pseudo-label {terms[1]:.4f} (weight {weights['unsup']:.4f}), "
            f"contrastive {terms[2]:.4f} (weight {weights['contrast']:.3f})")
        if self.use_unlabeled:
            order = np.argsort(-pl[1:])
            share = ", ".join(f"{self.class_names[c]} {pl[1 + c]:.3f}" for c in order)
            self.print_to_log_file(f"TAK pseudo-labels: {pl[0]:.3f} of voxels confident "
                                   f"(entropy < {weights['threshold']:.3f}); share: {share}")

    # --- checkpoints ------------------------------------------------------------------------
    def ssl_settings(self) -> dict:
        """The values a resumed run must keep: every knob declared ``Checked`` and nnU-Net's schedule length."""
        names = (*checked_knobs(type(self)), "num_epochs", "num_iterations_per_epoch")
        return {name: list(v) if isinstance(v := getattr(self, name), tuple) else v for name in names}

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus 'tak_ssl' (teacher, settings, unlabeled case digest, loss state), written to
        a temporary file, synced and moved into place (a crash never leaves half a checkpoint)."""
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        # the keys of nnUNetTrainer.save_checkpoint (nnunetv2 2.8), which offers no way to add one
        checkpoint = {
            "network_weights": unwrap_network(self.network).state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            CHECKPOINT_KEY: {
                "settings": self.ssl_settings(),
                "teacher": self.teacher.state_dict() if self.teacher is not None else None,
                "unlabeled_digest": self.unlabeled_digest() if self.use_unlabeled else None,
                "num_unlabeled": len(self.unlabeled_cases),
                "loss_state": self.loss.state_dict(),
            },
        }

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())

        atomic_write(filename, write)

    def stored_settings(self, ssl: dict) -> dict:
        """The settings a checkpoint's 'tak_ssl' entry was trained with."""
        return dict(ssl["settings"])

    def check_resumable(self, checkpoint: dict, name: str) -> None:
        """Checks beyond the settings before anything is loaded (none here)."""

    def settings_hint(self, differing: dict[str, tuple]) -> str:
        """More advice for a refused resume, by the settings that differ."""
        return ""

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """nnU-Net's resume (--c, --val) with the teacher and the semi-supervised state; refuses (and changes
        nothing) when the checkpoint was trained with other settings."""
        if not self.was_initialized:
            self.initialize()
        # The file is read here and again by nnU-Net: nnunetv2 2.8's load_checkpoint fails when handed a
        # dict, and checking before it loads keeps the network untouched when something does not match.
        name = filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else "the checkpoint"
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            checkpoint = read_checkpoint(checkpoint)  # CheckpointError naming the file and the intact ones
        ssl = checkpoint.get(CHECKPOINT_KEY)
        if ssl is None:
            raise SSLSettingsError(f"{name} has no semi-supervised state ({CHECKPOINT_KEY!r}); it was written by "
                                   f"{checkpoint.get('trainer_name')}. Resume with that trainer or start a new run.")
        self.check_resumable(checkpoint, name)
        stored = self.stored_settings(ssl)
        allow_extend = extension_allowed(self.allow_extend_epochs)
        differing, extending = changed_settings(self.ssl_settings(), stored, allow_extend)
        if differing:
            raise refuse_changed_settings(name, type(self).__name__, checkpoint.get("trainer_name"), differing,
                                          stored.get("num_epochs"), self.num_epochs, self.settings_hint(differing))
        super().load_checkpoint(filename_or_checkpoint)
        if extending:
            self._log_extension(stored["num_epochs"])
            self._retire_final_checkpoint(filename_or_checkpoint, stored["num_epochs"])
        if self.teacher is not None:
            self.teacher.load_state_dict(ssl["teacher"])
        self.loss.load_state_dict(ssl["loss_state"])
        self._restored_unlabeled_digest = ssl["unlabeled_digest"]

    def _retire_final_checkpoint(self, filename: str | dict, old_epochs: int) -> None:
        if not isinstance(filename, str) or os.path.basename(filename) != "checkpoint_final.pth":
            return
        if self.is_ddp:
            dist.barrier()  # every rank has read the file
        if self.local_rank == 0:
            kept = retire_final_checkpoint(filename, old_epochs)
            self.print_to_log_file(f"TAK: the finished run's checkpoint_final.pth is kept as {os.path.basename(kept)}; "
                                   "checkpoint_latest.pth now carries the extended run")

    def _log_extension(self, old_epochs: int) -> None:
        """Log the schedules at the resume epoch under the old and the new length (they are recomputed)."""
        new_epochs, epoch = self.num_epochs, self.current_epoch
        self.num_epochs = old_epochs
        try:
            before = self.ssl_weights(epoch)
        finally:
            self.num_epochs = new_epochs
        self.print_to_log_file(describe_extension(
            type(self).__name__, epoch, old_epochs, new_epochs, before, self.ssl_weights(epoch),
            poly_lr(self.lr_scheduler, epoch, old_epochs), poly_lr(self.lr_scheduler, epoch, new_epochs)))
