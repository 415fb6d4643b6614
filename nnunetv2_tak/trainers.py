"""nnU-Net trainers of nnunetv2_tak. Thin: the maths lives in network/text/prompts modules.

Every knob is a typed class attribute, so a variant is a three-line subclass::

    class MyTrainer(nnUNetTrainerTAK):
        text_model = "ViT-L-14"
        epochs = 300
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.distributed as dist
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunetv2_tak.network import TextPriorConfig, TextPriorUNet, unwrap_network
from nnunetv2_tak.prompts import dataset_class_names
from nnunetv2_tak.text import (
    RANDOM_WEIGHTS,
    TextEmbeddingError,
    TextEmbeddings,
    how_to_provide,
    random_text_embeddings,
)
from nnunetv2_tak.text_source import dataset_text_embeddings

__all__ = [
    "PLANS_KEY",
    "nnUNetTrainerTAK",
    "nnUNetTrainerTAK_Debug",
    "nnUNetTrainerTAK_Quick",
    "nnUNetTrainerTAK_RandomText",
    "nnUNetTrainerTAK_RandomText_Debug",
]

PLANS_KEY = "tak_text_prior"  # per-configuration entry in plans.json: head geometry + text provenance


class nnUNetTrainerTAK(nnUNetTrainer):
    """nnU-Net training through the text-prior network (labeled data; see DESIGN.md)."""

    # --- text knowledge -------------------------------------------------------------------
    text_source: ClassVar[str] = "prompts"  # "prompts": cache or open_clip encoding; "random": ablation
    text_model: ClassVar[str | None] = None  # open_clip model; None: the cache's, else ViT-B-32
    text_pretrained: ClassVar[str | None] = None  # tag or local checkpoint; None: the cache's, else openai
    random_text_seed: ClassVar[int] = 0
    allow_random_text_encoder: ClassVar[bool] = False  # accept a cache encoded with --pretrained random-init
    text_prior: ClassVar[TextPriorConfig] = TextPriorConfig()  # head geometry (K and D come from the text)
    # --- schedule (None keeps nnU-Net's default) --------------------------------------------
    epochs: ClassVar[int | None] = None
    iterations_per_epoch: ClassVar[int | None] = None
    val_iterations_per_epoch: ClassVar[int | None] = None
    initial_learning_rate: ClassVar[float | None] = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.class_names = dataset_class_names(dataset_json)  # fails early on region-based labels
        for knob, target in (("epochs", "num_epochs"), ("iterations_per_epoch", "num_iterations_per_epoch"),
                             ("val_iterations_per_epoch", "num_val_iterations_per_epoch"),
                             ("initial_learning_rate", "initial_lr")):
            if getattr(self, knob) is not None:
                setattr(self, target, getattr(self, knob))
        self.text_embeddings: TextEmbeddings | None = None

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
            self.text_embeddings = self._resolve_text_embeddings_once()
            self._record_text_in_plans(self.text_embeddings)
        super().initialize()
        unwrap_network(self.network).set_text_embeddings(self.text_embeddings.tensor.to(self.device))

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
            raise ValueError(f"{type(self).__name__}.text_source must be 'prompts' or 'random', "
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

    def _record_text_in_plans(self, embeddings: TextEmbeddings) -> None:
        """Store head geometry and text provenance in the plans (copied to the results folder), so the
        predictor rebuilds the same network from plans.json and the checkpoint alone."""
        _, k, d = embeddings.shape
        head = dataclasses.replace(self.text_prior, num_kinds=k, embed_dim=d).to_dict()
        entry = {"head": head, "text": embeddings.provenance}
        self.plans_manager.plans["configurations"][self.configuration_name][PLANS_KEY] = entry
        self.configuration_manager.configuration[PLANS_KEY] = entry

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """nnU-Net's resume (--c, --val), refusing a checkpoint trained with other text embeddings."""
        if not self.was_initialized:
            self.initialize()
        # The file is read here and again by nnU-Net: nnunetv2 2.8's load_checkpoint fails when handed a
        # dict, and checking before it loads keeps the network untouched when the text does not match.
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
        restored = checkpoint["network_weights"]["text_prior.text_embeddings"]
        current = self.text_embeddings.tensor
        if restored.shape != current.shape or not torch.allclose(restored.float().cpu(), current):
            raise TextEmbeddingError(
                f"checkpoint {filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else ''} was "
                f"trained with other text embeddings (shape {list(restored.shape)}) than the current text source "
                f"({self.text_embeddings.describe()}). Restore the prompts/embedding cache the run started with "
                "(its provenance is in plans.json 'tak_text_prior' of the results folder) or train into another "
                "output folder. Nothing was changed."
            )
        super().load_checkpoint(filename_or_checkpoint)

    def on_train_start(self):
        super().on_train_start()
        # -pretrained_weights may have brought another dataset's text: this dataset's text wins
        network = unwrap_network(self.network)
        if not torch.equal(network.text_prior.text_embeddings, self.text_embeddings.tensor.to(self.device)):
            self.print_to_log_file("TAK: the loaded weights carried other text embeddings; using this dataset's.")
            network.set_text_embeddings(self.text_embeddings.tensor.to(self.device))


class nnUNetTrainerTAK_RandomText(nnUNetTrainerTAK):
    """Ablation: seeded random text embeddings instead of prompts (no textual knowledge)."""

    text_source = "random"


class nnUNetTrainerTAK_Debug(nnUNetTrainerTAK):
    """Plumbing checks: 1 epoch of 2 iterations, 1 validation iteration; accepts random-weight text."""

    allow_random_text_encoder = True

    epochs = 1
    iterations_per_epoch = 2
    val_iterations_per_epoch = 1


class nnUNetTrainerTAK_RandomText_Debug(nnUNetTrainerTAK_Debug):
    text_source = "random"


class nnUNetTrainerTAK_Quick(nnUNetTrainerTAK):
    """CPU quickstart schedule: 20 epochs x 25 iterations; accepts random-weight text (offline quickstart)."""

    allow_random_text_encoder = True

    epochs = 20
    iterations_per_epoch = 25
    val_iterations_per_epoch = 5
