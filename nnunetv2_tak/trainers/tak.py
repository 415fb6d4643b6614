"""nnU-Net trainers of nnunetv2_tak. Thin: the maths lives in the network, teacher, losses, unlabeled
and text modules.

Every knob is a typed class attribute, so a variant is a three-line subclass::

    class MyTrainer(nnUNetTrainerTAK):
        text_model = "ViT-L-14"
        unsup_weight = 0.2
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import sys
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
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunetv2_tak.model.network import TextPriorConfig, TextPriorUNet, unwrap_network
from nnunetv2_tak.semisupervised.losses import GADiceLoss, GALoss, text_visual_contrastive_loss
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
from nnunetv2_tak.text.embeddings import (
    RANDOM_WEIGHTS,
    TextEmbeddingError,
    TextEmbeddings,
    how_to_provide,
    random_text_embeddings,
)
from nnunetv2_tak.text.prompts import dataset_class_names
from nnunetv2_tak.text.source import dataset_text_embeddings, raw_dataset_folder
from nnunetv2_tak.trainers.distributed import DistributedTrainerMixin
from nnunetv2_tak.trainers.progress import TAKLocalLogger
from nnunetv2_tak.trainers.resume import (
    describe_extension,
    extension_allowed,
    how_to_extend,
    poly_lr,
    read_checkpoint,
    stored_text_centering,
)
from nnunetv2_tak.unlabeled import (
    UNLABELED_DIR,
    ImageOnlyDataset,
    UnlabeledDataError,
    preprocess_unlabeled,
    preprocessed_unlabeled_cases,
    shard_for_rank,
    split_unlabeled_cases,
)

__all__ = ["CHECKPOINT_KEY", "PLANS_KEY", "SSLSettingsError", "nnUNetTrainerTAK"]

PLANS_KEY = "tak_text_prior"  # per-configuration entry in plans.json: head geometry + text provenance
CHECKPOINT_KEY = "tak_ssl"  # extra checkpoint entry: teacher, SSL settings, unlabeled set, loss state


class SSLSettingsError(RuntimeError):
    """A resumed run whose semi-supervised settings or unlabeled data differ from its checkpoint's."""


class nnUNetTrainerTAK(DistributedTrainerMixin, nnUNetTrainer):
    """TAK: nnU-Net + text-prior head + unlabeled stream with an EMA teacher, entropy-filtered
    pseudo-labels and the text-visual contrastive term (DESIGN.md, "Semi-supervised training")."""

    # --- text knowledge -------------------------------------------------------------------
    text_source: ClassVar[str] = "prompts"  # "prompts": cache/open_clip; "random": ablation; "learned": no text
    text_model: ClassVar[str | None] = None  # open_clip model; None: the cache's, else ViT-B-32
    text_pretrained: ClassVar[str | None] = None  # tag or local checkpoint; None: the cache's, else openai
    random_text_seed: ClassVar[int] = 0
    allow_random_text_encoder: ClassVar[bool] = False  # accept a cache encoded with --pretrained random-init
    # head geometry (K and D come from the text). The text is centred across classes per prompt kind and
    # rescaled ("center_scale"): the validation rule of examples/EVIDENCE.md chose it over the reference's
    # raw CLIP text (nnUNetTrainerTAK_RawText)
    text_prior: ClassVar[TextPriorConfig] = TextPriorConfig(text_centering="center_scale")
    # --- semi-supervised training (defaults of the paper's reference code; README "Reference vs ours") ---
    use_unlabeled: ClassVar[bool] = True  # False: labeled data only (no teacher, no pseudo-labels)
    unlabeled_batch_size: ClassVar[int | None] = None  # None: the planned batch size
    ema_decay: ClassVar[float] = 0.99  # teacher decay, warm-up min(1 - 1/(step + 1), decay)
    teacher_noise_std: ClassVar[float] = 0.1  # Gaussian noise on the teacher's input ...
    teacher_noise_clip: ClassVar[float] = 0.2  # ... clipped to +-this
    entropy_threshold_base: ClassVar[float] = LN2  # tau(t) = base * (start + (1 - start) * rampup(t))
    entropy_threshold_start: ClassVar[float] = 0.75
    entropy_rampup_fraction: ClassVar[float] = 0.625  # threshold ramps over this fraction of training (100/160)
    unsup_weight: ClassVar[float] = 0.1  # pseudo-label loss weight * sigmoid_rampup(epoch, ramp length)
    unsup_rampup_fraction: ClassVar[float] = 1.0  # the weight ramps over this fraction of training (160/160)
    unsup_loss: ClassVar[str] = "ga_dice"  # "ga_dice": every voxel, background included (reference);
    #                                        "dice_ce_confident": nnU-Net Dice+CE on confident voxels only
    contrastive_weight: ClassVar[float] = 0.1  # 0 switches the contrastive term off
    contrastive_stage_reduction: ClassVar[str] = "sum"  # "sum" of the stage losses (reference) or "mean"
    contrastive_start_fraction: ClassVar[float] = 0.12  # contrastive term on after this fraction of training
    contrastive_temperature: ClassVar[float] = 0.07
    contrastive_anchors: ClassVar[tuple[int, ...]] = (40, 20, 10)  # per sample and class, shallow -> deepest
    contrastive_on_unlabeled: ClassVar[bool] = True  # anchors also from confident pseudo-labels
    supervised_loss: ClassVar[str] = "dice_ce"  # "dice_ce" (nnU-Net's, deep supervision) or "ga" (GACE + GADice)
    ga_top_fraction: ClassVar[float] = 0.1  # GACE keeps this fraction of voxels with the largest CE
    ga_gamma: ClassVar[float] = 0.5  # GACE class normalisation n_c^(1-g) * M^g
    # --- schedule (None keeps nnU-Net's default) --------------------------------------------
    epochs: ClassVar[int | None] = None
    iterations_per_epoch: ClassVar[int | None] = None
    val_iterations_per_epoch: ClassVar[int | None] = None
    initial_learning_rate: ClassVar[float | None] = None
    allow_extend_epochs: ClassVar[bool] = False  # --c may continue a run for more epochs (or TAK_ALLOW_EXTEND=1)

    # settings that must match when a run is resumed (--c)
    SSL_SETTINGS: ClassVar[tuple[str, ...]] = (
        "text_source", "use_unlabeled", "unlabeled_batch_size", "ema_decay", "teacher_noise_std",
        "teacher_noise_clip", "entropy_threshold_base", "entropy_threshold_start", "entropy_rampup_fraction",
        "unsup_weight", "unsup_rampup_fraction", "unsup_loss", "contrastive_weight", "contrastive_stage_reduction",
        "contrastive_start_fraction", "contrastive_temperature", "contrastive_anchors", "contrastive_on_unlabeled",
        "supervised_loss", "ga_top_fraction", "ga_gamma", "num_epochs",
        "num_iterations_per_epoch")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.class_names = dataset_class_names(dataset_json)  # fails early on region-based labels
        for knob, target in (("epochs", "num_epochs"), ("iterations_per_epoch", "num_iterations_per_epoch"),
                             ("val_iterations_per_epoch", "num_val_iterations_per_epoch"),
                             ("initial_learning_rate", "initial_lr")):
            if getattr(self, knob) is not None:
                setattr(self, target, getattr(self, knob))
        self.logger.local_logger = TAKLocalLogger(self.logger.local_logger.verbose)
        self.text_embeddings: TextEmbeddings | None = None
        self.teacher: EMATeacher | None = None
        self.unsup_criterion: torch.nn.Module | None = None
        self.dataloader_unlabeled = None
        self.unlabeled_cases: list[str] = []
        self._restored_unlabeled_digest: str | None = None
        self._iteration_in_epoch = 0

    # --- network --------------------------------------------------------------------------
    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> TextPriorUNet:
        """The planned nnU-Net UNet with the text-prior head; geometry from the plans' 'tak_text_prior'."""
        backbone = nnUNetTrainer.build_network_architecture(
            plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision)
        stored = configuration_manager.configuration.get(PLANS_KEY)
        config = TextPriorConfig.from_dict(stored["head"]) if stored else cls.text_prior
        return TextPriorUNet(backbone, num_output_channels, config)

    def initialize(self):
        if not self.was_initialized:
            if self.text_source == "learned":
                self._record_in_plans(dataclasses.replace(self.text_prior, learned_embeddings=True),
                                      {"source": "learned", "note": "no text: class embeddings trained"})
                self.print_to_log_file("TAK text source: none (learned class embeddings, the no-text ablation)")
            else:
                self.text_embeddings = self._resolve_text_embeddings_once()
                _, k, d = self.text_embeddings.shape
                self._record_in_plans(dataclasses.replace(self.text_prior, num_kinds=k, embed_dim=d),
                                      self.text_embeddings.provenance)
        super().initialize()
        if self.text_embeddings is not None:
            unwrap_network(self.network).set_text_embeddings(self.text_embeddings.tensor.to(self.device))
        if self.use_unlabeled and self.teacher is None:
            # after DDP has broadcast rank 0's weights: every rank starts from the same teacher
            self.teacher = EMATeacher(unwrap_network(self.network), self.ema_decay)
            self.teacher.module.decoder.deep_supervision = False
        if self.use_unlabeled and self.unsup_criterion is None:
            self.unsup_criterion = self._build_unsup_loss()

    def _resolve_text_embeddings_once(self) -> TextEmbeddings:
        # under DDP rank 0 encodes/caches first, the others then read the cache
        if self.is_ddp and self.local_rank != 0:
            dist.barrier()
        embeddings = self.resolve_text_embeddings()
        if self.is_ddp and self.local_rank == 0:
            dist.barrier()
        self.print_to_log_file(f"TAK text source: {embeddings.describe()}")
        return embeddings

    def resolve_text_embeddings(self) -> TextEmbeddings:
        """E [C, K, D] for this dataset, as configured by ``text_source``."""
        if self.text_source == "random":
            return random_text_embeddings(self.class_names, self.text_prior.num_kinds, self.text_prior.embed_dim,
                                          seed=self.random_text_seed)
        if self.text_source != "prompts":
            raise ValueError(f"{type(self).__name__}.text_source must be 'prompts', 'random' or 'learned', "
                             f"not {self.text_source!r}")
        embeddings = dataset_text_embeddings(self.dataset_json, self.plans_manager.dataset_name,
                                             self.preprocessed_dataset_folder_base, self.text_model,
                                             self.text_pretrained)
        if embeddings.provenance.get("pretrained") == RANDOM_WEIGHTS and not self.allow_random_text_encoder:
            raise TextEmbeddingError(
                f"the text embeddings of {self.plans_manager.dataset_name} were encoded with RANDOM open_clip weights "
                f"(--pretrained {RANDOM_WEIGHTS}), which carry no textual knowledge; {type(self).__name__} does not "
                "accept them.\n" + how_to_provide(self.plans_manager.dataset_name))
        return embeddings

    def _record_in_plans(self, head: TextPriorConfig, provenance: dict) -> None:
        """Store head geometry and text provenance in the plans (copied to the results folder), so the
        predictor rebuilds the same network from plans.json and the checkpoint alone."""
        entry = {"head": head.to_dict(), "text": provenance}
        self.plans_manager.plans["configurations"][self.configuration_name][PLANS_KEY] = entry
        self.configuration_manager.configuration[PLANS_KEY] = entry

    # --- losses ---------------------------------------------------------------------------
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
        contrast_on = t >= self.contrastive_start_fraction * self.num_epochs
        unsup_ramp = sigmoid_rampup(t, self.unsup_rampup_fraction * self.num_epochs)
        return {
            "unsup": self.unsup_weight * unsup_ramp if self.use_unlabeled else 0.0,
            "contrast": self.contrastive_weight if contrast_on else 0.0,
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
                "train the labeled-only variant nnUNetTrainerTAK_NoUnlabeled.")
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
                                                 self.configuration_name, self.dataset_json)
            if found is not None:
                self.print_to_log_file(f"TAK: nnUNet_raw/{self.plans_manager.dataset_name}/{UNLABELED_DIR} not found; "
                                       f"using the preprocessed unlabeled cases in {found[0]}")
                sources.append(found)
        split_cases = split_unlabeled_cases(os.path.join(self.preprocessed_dataset_folder_base, "splits_final.json"),
                                            self.fold)
        if split_cases:  # checked against the fold's train/val cases by split_unlabeled_cases
            sources.append((self.preprocessed_dataset_folder, split_cases))
        return sources

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
        """nnU-Net's loader and training augmentation on images only (random patches, no oversampling)."""
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        transforms = self.get_training_transforms(
            self.configuration_manager.patch_size, rotation, None, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels, regions=None, ignore_label=None)
        loader = nnUNetDataLoader(dataset, self.unlabeled_batch_size or self.batch_size, initial_patch_size,
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
        network = unwrap_network(self.network)
        # -pretrained_weights may have brought another dataset's text: this dataset's text wins
        if self.text_embeddings is not None and not torch.equal(network.text_prior.text_embeddings,
                                                                self.text_embeddings.tensor.to(self.device)):
            self.print_to_log_file("TAK: the loaded weights carried other text embeddings; using this dataset's.")
            network.set_text_embeddings(self.text_embeddings.tensor.to(self.device))
        if self.teacher is not None and self.teacher.step == 0:  # fresh run (maybe -pretrained_weights)
            self.teacher.module.load_state_dict(network.state_dict())

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
        """Labeled batch (nnU-Net's) + an unlabeled batch of the same size: one student forward on both,
        one teacher forward on the (noisy) unlabeled half, then supervised + weighted pseudo-label +
        weighted contrastive loss; the teacher is updated after the optimizer step."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        full_target = target[0] if isinstance(target, list) else target
        n_labeled = data.shape[0]
        weights = self.ssl_weights(self.training_progress(self._iteration_in_epoch))
        self._iteration_in_epoch += 1
        network = unwrap_network(self.network)
        num_classes = self.label_manager.num_segmentation_heads

        self.optimizer.zero_grad(set_to_none=True)
        amp = torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()
        with amp:
            labels = full_target.long()
            pseudo = None
            if self.use_unlabeled:
                unlabeled = next(self.dataloader_unlabeled)["data"].to(self.device, non_blocking=True)
                with torch.no_grad():
                    teacher_logits = self.teacher.module(
                        clipped_noise(unlabeled, self.teacher_noise_std, self.teacher_noise_clip))
                    argmax, entropy = teacher_predictions(teacher_logits)
                    del teacher_logits
                    pseudo = mask_unconfident(argmax, entropy, weights["threshold"], ignore_index=num_classes)
                    unsup_target = argmax if self.unsup_loss == "ga_dice" else pseudo
                data = torch.cat([data, unlabeled])
                if self.contrastive_on_unlabeled:
                    labels = torch.cat([labels, pseudo])
            output, deep = self.network(data, return_deep_features=True)
            output_labeled = [o[:n_labeled] for o in output] if isinstance(output, list) else output[:n_labeled]
            sup = self.loss(output_labeled, target)
            loss = sup
            unsup = torch.zeros((), device=self.device)
            if pseudo is not None:
                full = output[0] if isinstance(output, list) else output
                unsup = self.unsup_criterion(full[n_labeled:], unsup_target)
                loss = loss + weights["unsup"] * unsup
            contrast = torch.zeros((), device=self.device)
            if weights["contrast"] > 0:
                if labels.shape[0] < data.shape[0]:  # pseudo-labels not used as anchors: labeled half only
                    deep = [f[:labels.shape[0]] for f in deep]
                contrast = text_visual_contrastive_loss(
                    deep, labels, network.contrast.voxel, network.contrast.text,
                    network.text_prior.prepared_text_embeddings(), self.contrastive_anchors,
                    self.contrastive_temperature, self.contrastive_stage_reduction)
                loss = loss + weights["contrast"] * contrast
            elif self.is_ddp:  # DDP needs every parameter in the graph
                loss = loss + 0.0 * sum(p.sum() for p in network.contrast.parameters())

        stepped = True
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            scale = self.grad_scaler.get_scale()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
            stepped = self.grad_scaler.get_scale() >= scale  # the scale drops when the step was skipped (inf)
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        if self.teacher is not None and stepped:
            self.teacher.update(network)

        stats = pseudo_label_statistics(pseudo, num_classes, num_classes) if pseudo is not None \
            else torch.full((num_classes + 1,), float("nan"), dtype=torch.float64)
        terms = torch.stack([loss.detach(), sup.detach(), unsup.detach(), contrast.detach()]).float().cpu().numpy()
        return {"loss": terms[0], "tak_terms": terms[1:], "tak_pl": stats.cpu().numpy()}

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
        settings = {name: list(v) if isinstance(v := getattr(self, name), tuple) else v for name in self.SSL_SETTINGS}
        settings["text_centering"] = self.text_prior.text_centering
        return settings

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus 'tak_ssl': teacher, SSL settings, unlabeled case digest, loss state."""
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
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
        tmp = f"{filename}.tmp"  # written in full and synced before it replaces the previous file
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, filename)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """nnU-Net's resume (--c, --val) with the teacher and SSL state; refuses (and changes nothing) when
        the checkpoint was trained with other text or other semi-supervised settings."""
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
            raise SSLSettingsError(f"{name} has no TAK semi-supervised state ({CHECKPOINT_KEY!r}); it was written by "
                                   f"{checkpoint.get('trainer_name')}. Resume with that trainer or start a new run.")
        self._check_text(checkpoint, name)
        stored = dict(ssl["settings"])
        if "text_centering" not in stored:  # written before the setting was checked: the run's plans.json says
            stored["text_centering"] = stored_text_centering(os.path.join(self.output_folder_base, "plans.json"),
                                                             self.configuration_name, PLANS_KEY)
        differing = {k: (v, stored.get(k)) for k, v in self.ssl_settings().items() if stored.get(k) != v}
        old_epochs = stored.get("num_epochs")
        extending = "num_epochs" in differing and isinstance(old_epochs, int) and self.num_epochs > old_epochs \
            and extension_allowed(self.allow_extend_epochs)
        if extending:
            del differing["num_epochs"]
        if differing:
            listed = "; ".join(f"{k}: checkpoint {old!r}, now {new!r}" for k, (new, old) in differing.items())
            hint = f" {how_to_extend(type(self).__name__, old_epochs, self.num_epochs)}" \
                if "num_epochs" in differing and isinstance(old_epochs, int) else ""
            if "text_centering" in differing:
                hint += (f" The text centring is part of the head: a run started with the raw text "
                         f"(text_centering 'none', the default up to 0.1) continues as nnUNetTrainerTAK_RawText: "
                         f"rename its results folder {os.path.basename(self.output_folder_base)} to the "
                         f"nnUNetTrainerTAK_RawText one and resume with -tr nnUNetTrainerTAK_RawText.")
            raise SSLSettingsError(
                f"{name} was trained with other semi-supervised settings ({listed}). Resume with the trainer "
                f"and settings it started with ({checkpoint.get('trainer_name')}) or train into a new output folder; "
                f"nothing was loaded or changed.{hint}")
        super().load_checkpoint(filename_or_checkpoint)
        if extending:
            self._log_extension(old_epochs)
            self._retire_final_checkpoint(filename_or_checkpoint, old_epochs)
        if self.teacher is not None:
            self.teacher.load_state_dict(ssl["teacher"])
        self.loss.load_state_dict(ssl["loss_state"])
        self._restored_unlabeled_digest = ssl["unlabeled_digest"]

    def _retire_final_checkpoint(self, filename: str | dict, old_epochs: int) -> None:
        """nnU-Net's --c always prefers checkpoint_final.pth. Once a finished run is extended, its final
        checkpoint becomes checkpoint_final_epoch<N>.pth and a copy of it checkpoint_latest.pth, so a later
        --c (after preemption) resumes the extended run instead of restarting it at the old end."""
        if not isinstance(filename, str) or os.path.basename(filename) != "checkpoint_final.pth":
            return
        if self.is_ddp:
            dist.barrier()  # every rank has read the file
        if self.local_rank == 0:
            folder = os.path.dirname(os.path.abspath(filename))
            kept = os.path.join(folder, f"checkpoint_final_epoch{old_epochs}.pth")
            shutil.copyfile(filename, os.path.join(folder, "checkpoint_latest.pth"))
            os.replace(filename, kept)
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

    def _check_text(self, checkpoint: dict, name: str) -> None:
        if self.text_embeddings is None:
            return
        restored = checkpoint["network_weights"]["text_prior.text_embeddings"]
        current = self.text_embeddings.tensor
        if restored.shape != current.shape or not torch.allclose(restored.float().cpu(), current):
            raise TextEmbeddingError(
                f"{name} was trained with other text embeddings (shape {list(restored.shape)}) than the current "
                f"text source ({self.text_embeddings.describe()}). Restore the prompts/embedding cache the run started "
                "with (its provenance is in plans.json 'tak_text_prior' of the results folder) or train into another "
                "output folder. Nothing was changed."
            )
