"""nnunetv2_tak: TAK (textual anatomical knowledge) for nnU-Net v2.

The stock CLI finds the trainers by name (``-tr nnUNetTrainerTAK``). Library API::

    from nnunetv2_tak import TextPriorUNet, encode_prompts, load_prompt_library

Attributes are imported lazily: this package is imported at interpreter start-up by the
discovery hook, which must not pull in torch or nnU-Net.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_API = {
    "TextPriorConfig": "nnunetv2_tak.network",
    "TextPriorUNet": "nnunetv2_tak.network",
    "apply_dynamic_head": "nnunetv2_tak.network",
    "PromptError": "nnunetv2_tak.prompts",
    "load_prompt_library": "nnunetv2_tak.prompts",
    "resolve_prompts": "nnunetv2_tak.prompts",
    "dataset_class_names": "nnunetv2_tak.prompts",
    "TextEmbeddings": "nnunetv2_tak.text",
    "TextEmbeddingError": "nnunetv2_tak.text",
    "encode_prompts": "nnunetv2_tak.text",
    "load_embedding_file": "nnunetv2_tak.text",
    "dataset_text_embeddings": "nnunetv2_tak.text_source",
    "nnUNetTrainerTAK": "nnunetv2_tak.trainers",
}

__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'nnunetv2_tak' has no attribute {name!r}")
