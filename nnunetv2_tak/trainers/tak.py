"""``nnUNetTrainerTAK``: the mean teacher of ``mean_teacher`` plus TAK's text knowledge: the text-prior
segmentation head (``nnunetv2_tak.model``) whose parameters come from frozen text embeddings
(``nnunetv2_tak.text``), and the text-visual contrastive term (``nnunetv2_tak.semisupervised.losses``).

Every knob is a typed class attribute, so a variant is a three-line subclass::

    class MyTrainer(nnUNetTrainerTAK):
        text_model = "ViT-L-14"
        unsup_weight = 0.2
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

import torch
import torch.distributed as dist
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunetv2_tak.model.network import TextPriorConfig, TextPriorUNet, unwrap_network
from nnunetv2_tak.semisupervised.losses import text_visual_contrastive_loss
from nnunetv2_tak.text.embeddings import (
    RANDOM_WEIGHTS,
    TextEmbeddingError,
    TextEmbeddings,
    how_to_provide,
    random_text_embeddings,
)
from nnunetv2_tak.text.source import dataset_text_embeddings
from nnunetv2_tak.trainers.mean_teacher import CHECKPOINT_KEY, LossTerms, UnlabeledBatch, nnUNetTrainerMeanTeacher
from nnunetv2_tak.trainers.resume import SSLSettingsError, stored_text_centering
from nnunetv2_tak.trainers.settings import Checked

__all__ = ["CHECKPOINT_KEY", "PLANS_KEY", "SSLSettingsError", "nnUNetTrainerTAK"]

PLANS_KEY = "tak_text_prior"  # per-configuration entry in plans.json: head geometry + text provenance


class nnUNetTrainerTAK(nnUNetTrainerMeanTeacher):
    """TAK: nnU-Net + text-prior head + unlabeled stream with an EMA teacher, entropy-filtered pseudo-labels
    and the text-visual contrastive term."""

    # --- text knowledge -------------------------------------------------------------------
    text_source: ClassVar[Checked[str]] = "prompts"  # "prompts": cache/open_clip; "random": ablation; "learned"
    text_model: ClassVar[str | None] = None  # open_clip model; None: the cache's, else ViT-B-32
    text_pretrained: ClassVar[str | None] = None  # tag or local checkpoint; None: the cache's, else openai
    random_text_seed: ClassVar[int] = 0
    allow_random_text_encoder: ClassVar[bool] = False  # accept a cache encoded with --pretrained random-init
    # head geometry (K and D come from the text). The text is centred across classes per prompt kind and
    # rescaled ("center_scale"), chosen over the reference's raw CLIP text (nnUNetTrainerTAK_RawText) on the
    # validation split (examples/EVIDENCE.md)
    text_prior: ClassVar[TextPriorConfig] = TextPriorConfig(text_centering="center_scale")
    # --- the contrastive term (defaults of the paper's reference code) ------------------------
    contrastive_weight: ClassVar[Checked[float]] = 0.1  # 0 switches the contrastive term off
    contrastive_stage_reduction: ClassVar[Checked[str]] = "sum"  # "sum" of the stage losses (reference) or "mean"
    contrastive_start_fraction: ClassVar[Checked[float]] = 0.12  # on after this fraction of training
    contrastive_temperature: ClassVar[Checked[float]] = 0.07
    contrastive_anchors: ClassVar[Checked[tuple[int, ...]]] = (40, 20, 10)  # per sample and class, shallow -> deep
    contrastive_on_unlabeled: ClassVar[Checked[bool]] = True  # anchors also from confident pseudo-labels

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.text_embeddings: TextEmbeddings | None = None

    # --- network and text -------------------------------------------------------------------
    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> TextPriorUNet:
        """The planned nnU-Net UNet with the text-prior head; geometry from the plans' 'tak_text_prior' entry
        (training writes it before it builds the network), else the class's ``text_prior``."""
        backbone = nnUNetTrainer.build_network_architecture(
            plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision)
        stored = configuration_manager.configuration.get(PLANS_KEY)
        network = TextPriorUNet(backbone, num_output_channels,
                                TextPriorConfig.from_dict(stored["head"]) if stored else cls.text_prior)
        if not stored:  # an untrained network from the class's settings; a trained model's weights are refused
            network.missing_settings_entry = PLANS_KEY
        return network

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

    def on_network_built(self, network: torch.nn.Module) -> None:
        if self.text_embeddings is not None:
            network.set_text_embeddings(self.text_embeddings.tensor.to(self.device))

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
                                             self.text_pretrained, log=self.print_to_log_file)
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

    def on_train_start(self):
        super().on_train_start()
        if self.text_embeddings is None:
            return
        # -pretrained_weights may have brought another dataset's text: this dataset's text wins
        text = self.text_embeddings.tensor.to(self.device)
        network = unwrap_network(self.network)
        if not torch.equal(network.text_prior.text_embeddings, text):
            self.print_to_log_file("TAK: the loaded weights carried other text embeddings; using this dataset's.")
            network.set_text_embeddings(text)
            if self.teacher is not None and self.teacher.step == 0:  # a fresh teacher is the student's copy
                self.teacher.module.set_text_embeddings(text)

    # --- the contrastive term -----------------------------------------------------------------
    def ssl_weights(self, t: float) -> dict[str, float]:
        weights = super().ssl_weights(t)
        weights["contrast"] = self.contrastive_weight if t >= self.contrastive_start_fraction * self.num_epochs \
            else 0.0
        return weights

    def student_forward(self, inputs: torch.Tensor, labeled: int | None = None
                        ) -> tuple[torch.Tensor | list[torch.Tensor], list]:
        """Logits (or the deep-supervision list; its lower-resolution outputs for the first ``labeled`` samples
        only: the text-prior head does not run where no loss reads it) and the deepest encoder stages for the
        contrastive term."""
        return self.network(inputs, return_deep_features=True, deep_supervision_samples=labeled)

    def loss_terms(self, data: torch.Tensor, target: torch.Tensor | list[torch.Tensor],
                   unlabeled: UnlabeledBatch | None, weights: dict[str, float]) -> LossTerms:
        """The mean teacher's terms plus the weighted text-visual contrastive term."""
        terms = super().loss_terms(data, target, unlabeled, weights)
        if terms.backward_done:  # sequential halves: the term was part of the passes (deep_feature_gradients)
            return terms
        active = weights["contrast"] > 0
        contrast = self.contrastive_term(terms.deep_features, target, unlabeled, active)
        total = terms.total + (weights["contrast"] * contrast if active else contrast)  # inactive: 0 (DDP: in graph)
        return dataclasses.replace(terms, total=total, contrastive=contrast, deep_features=None)

    def deep_feature_gradients(self, data: torch.Tensor, target: torch.Tensor | list[torch.Tensor],
                               unlabeled: UnlabeledBatch, weights: dict[str, float]
                               ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """The contrastive term on both halves' deepest encoder stages from one no-grad encoder pass; its
        gradients with respect to those stages go into each half's backward (sequential halves)."""
        if weights["contrast"] <= 0:
            return torch.zeros((), device=self.device), None
        network = unwrap_network(self.network)
        with torch.no_grad():
            skips = network.encoder(torch.cat([data, unlabeled.images]))
        leaves = [f.detach().requires_grad_() for f in skips[-network.num_image_stages:]]
        del skips
        contrast = self.contrastive_term(leaves, target, unlabeled, True)
        self.backward(weights["contrast"] * contrast)
        return contrast.detach(), [torch.zeros_like(leaf) if leaf.grad is None else leaf.grad for leaf in leaves]

    def contrastive_term(self, deep: list[torch.Tensor], target: torch.Tensor | list[torch.Tensor],
                         unlabeled: UnlabeledBatch | None, active: bool) -> torch.Tensor:
        """Voxel anchors of the deepest stages [B, ch_i, *S_i] against the text anchors, labelled by the ground
        truth (and by the confident pseudo-labels with ``contrastive_on_unlabeled``); 0 while inactive."""
        network = unwrap_network(self.network)
        if not active:
            if self.is_ddp:  # DDP needs every parameter in the graph
                return 0.0 * sum(p.sum() for p in network.contrast.parameters())
            return torch.zeros((), device=self.device)
        labels = (target[0] if isinstance(target, list) else target).long()
        if unlabeled is not None and self.contrastive_on_unlabeled:
            labels = torch.cat([labels, unlabeled.pseudo_labels])
        deep = [f[:labels.shape[0]] for f in deep]  # pseudo-labels not used as anchors: labeled half only
        return text_visual_contrastive_loss(
            deep, labels, network.contrast.voxel, network.contrast.text, network.text_prior.prepared_text_embeddings(),
            self.contrastive_anchors, self.contrastive_temperature, self.contrastive_stage_reduction)

    # --- resume -------------------------------------------------------------------------------
    def ssl_settings(self) -> dict:
        return {**super().ssl_settings(), "text_centering": self.text_prior.text_centering}

    def stored_settings(self, ssl: dict) -> dict:
        stored = super().stored_settings(ssl)
        if "text_centering" not in stored:  # checkpoints that predate the setting: the run's plans.json says
            stored["text_centering"] = stored_text_centering(os.path.join(self.output_folder_base, "plans.json"),
                                                             self.configuration_name, PLANS_KEY)
        return stored

    def settings_hint(self, differing: dict[str, tuple]) -> str:
        if "text_centering" not in differing:
            return ""
        return (f" The text centring is part of the head: a run started with the raw text (text_centering 'none') "
                f"continues as nnUNetTrainerTAK_RawText: rename its results folder "
                f"{os.path.basename(self.output_folder_base)} to the nnUNetTrainerTAK_RawText one and resume with "
                "-tr nnUNetTrainerTAK_RawText.")

    def check_resumable(self, checkpoint: dict, name: str) -> None:
        """The checkpoint's text must be the text this run resolved."""
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
