"""nnunetv2_tak: TAK (textual anatomical knowledge) for nnU-Net v2.

The stock CLI finds the trainers by name (``-tr nnUNetTrainerTAK``). Packages: ``model`` (text-prior
network, dynamic head, fused kernels), ``semisupervised`` (EMA teacher, losses), ``text`` (prompts,
embeddings), ``unlabeled`` (unlabeled data), ``trainers`` (the nnU-Net trainers), ``cli``. Library API::

    from nnunetv2_tak import TextPriorUNet, encode_prompts, load_prompt_library

Attributes are imported lazily: this package is imported at interpreter start-up by the
discovery hook, which must not pull in torch or nnU-Net.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_API = {
    "TextPriorConfig": "nnunetv2_tak.model.network",
    "TextPriorUNet": "nnunetv2_tak.model.network",
    "apply_dynamic_head": "nnunetv2_tak.model.dynamic_head",
    "PromptError": "nnunetv2_tak.text.prompts",
    "load_prompt_library": "nnunetv2_tak.text.prompts",
    "resolve_prompts": "nnunetv2_tak.text.prompts",
    "dataset_class_names": "nnunetv2_tak.text.prompts",
    "TextEmbeddings": "nnunetv2_tak.text.embeddings",
    "TextEmbeddingError": "nnunetv2_tak.text.embeddings",
    "encode_prompts": "nnunetv2_tak.text.embeddings",
    "load_embedding_file": "nnunetv2_tak.text.embeddings",
    "dataset_text_embeddings": "nnunetv2_tak.text.source",
    "nnUNetTrainerTAK": "nnunetv2_tak.trainers",
    "nnUNetTrainerMeanTeacher": "nnunetv2_tak.trainers",
}

__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'nnunetv2_tak' has no attribute {name!r}")
