"""Text knowledge: organ prompts as data (``prompts``), their encoding with open_clip and the embedding
files and cache (``embeddings``), and where a dataset's text comes from (``source``)."""

from nnunetv2_tak.text.embeddings import (
    TextEmbeddingError,
    TextEmbeddings,
    encode_prompts,
    load_embedding_file,
    random_text_embeddings,
)
from nnunetv2_tak.text.prompts import PromptError, dataset_class_names, load_prompt_library, resolve_prompts
from nnunetv2_tak.text.source import dataset_text_embeddings

__all__ = [
    "PromptError",
    "TextEmbeddingError",
    "TextEmbeddings",
    "dataset_class_names",
    "dataset_text_embeddings",
    "encode_prompts",
    "load_embedding_file",
    "load_prompt_library",
    "random_text_embeddings",
    "resolve_prompts",
]
