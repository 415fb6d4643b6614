"""Where a dataset's text embeddings come from: the cache beside the preprocessed data, an
open_clip encoding on first use, an imported file, or (only when asked by name) random text."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from nnunetv2_tak.text.embeddings import (
    CACHE_FILENAME,
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    TextEmbeddingError,
    TextEmbeddings,
    cache_mismatch,
    encode_prompts,
    how_to_provide,
    load_cache,
    save_cache,
)
from nnunetv2_tak.text.prompts import (
    PromptError,
    ResolvedPrompts,
    dataset_class_names,
    libraries_for_dataset,
    resolve_prompts,
)

logger = logging.getLogger(__name__)


def raw_dataset_folder(dataset_name: str) -> Path | None:
    """nnUNet_raw/<dataset_name> if the variable is set and the folder exists."""
    root = os.environ.get("nnUNet_raw")
    folder = Path(root) / dataset_name if root else None
    return folder if folder is not None and folder.is_dir() else None


def dataset_prompts(dataset_json: Mapping, dataset_name: str,
                    preprocessed_folder: str | os.PathLike) -> ResolvedPrompts:
    """Resolve the dataset's labels against its own tak_prompts.json (raw folder first, then the
    preprocessed folder) and the shipped prompt libraries."""
    libraries = libraries_for_dataset([raw_dataset_folder(dataset_name), preprocessed_folder])
    return resolve_prompts(dataset_class_names(dataset_json), libraries)


def dataset_text_embeddings(
    dataset_json: Mapping,
    dataset_name: str,
    preprocessed_folder: str | os.PathLike,
    model_name: str | None = None,
    pretrained: str | None = None,
    log: Callable[[str], None] | None = None,
) -> TextEmbeddings:
    """E [C, K, D] for training.

    Uses the cache if it fits the dataset (class order; for encoded caches also the prompt hash and,
    when given, the requested model/pretrained). With no cache, encodes the prompts with open_clip
    (``model_name``/``pretrained`` or the defaults) and writes the cache. A cache that does not fit is
    never overwritten here (other runs may use it): the prompts are encoded for this run only and the
    log says how to update the cache. If no embeddings can be had, raises TextEmbeddingError saying
    how to provide them. What is used, and why a cache is not, is reported through ``log`` (e.g. a trainer's
    ``print_to_log_file``; default: this module's logger), warnings prefixed with ``WARNING:``.
    """
    info, warning = (log, lambda message: log(f"WARNING: {message}")) if log else (logger.info, logger.warning)
    class_names = dataset_class_names(dataset_json)
    cached = load_cache(preprocessed_folder)
    cache_path = Path(preprocessed_folder) / CACHE_FILENAME
    prompts: ResolvedPrompts | None = None
    if cached is not None and cached.provenance.get("source") == "open_clip":
        try:
            prompts = dataset_prompts(dataset_json, dataset_name, preprocessed_folder)
        except PromptError as e:
            if cache_mismatch(cached, class_names, None, model_name, pretrained) is None:
                warning(f"prompts cannot be resolved here ({e}); using the cache {cache_path} as it is")
                return cached
            raise
    if cached is not None:
        reason = cache_mismatch(cached, class_names, prompts, model_name, pretrained)
        if reason is None:
            info(f"using cached text embeddings: {cached.describe()}")
            return cached
        if cached.provenance.get("source") == "file":
            raise TextEmbeddingError(f"text embedding cache {cache_path} does not fit: {reason}.\n"
                                     + how_to_provide(dataset_name))
        model_name = model_name or cached.provenance.get("model")
        pretrained = pretrained or cached.provenance.get("pretrained")
        warning(f"text embedding cache {cache_path} does not fit ({reason}): encoding for this run only; update the "
                f"cache with nnUNetv2_tak_encode_prompts -d {dataset_name} --force")
    if prompts is None:
        prompts = dataset_prompts(dataset_json, dataset_name, preprocessed_folder)
    try:
        embeddings = encode_prompts(prompts, model_name or DEFAULT_MODEL, pretrained or DEFAULT_PRETRAINED)
    except TextEmbeddingError as e:
        raise TextEmbeddingError(
            f"no usable text embeddings for {dataset_name}: {e}\n{how_to_provide(dataset_name)}") from e
    if cached is None:
        save_cache(preprocessed_folder, embeddings)
        info(f"encoded and cached text embeddings: {embeddings.describe()}")
    else:
        info(f"encoded text embeddings for this run (the cache {cache_path} is left as it is): "
             f"{embeddings.describe()}")
    return embeddings
