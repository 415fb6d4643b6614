"""nnUNetv2_tak_encode_prompts: encode a dataset's organ prompts once (or import an embedding file)
into the text-embedding cache beside its preprocessed data."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from nnunetv2_tak.cli._common import dataset_name as _dataset_name
from nnunetv2_tak.cli._common import nnunet_folder
from nnunetv2_tak.text.embeddings import (
    CACHE_FILENAME,
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    RANDOM_WEIGHTS,
    TextEmbeddingError,
    cache_mismatch,
    encode_prompts,
    load_cache,
    load_embedding_file,
    model_schema,
    normalize_model_name,
    save_cache,
)
from nnunetv2_tak.text.prompts import dataset_class_names
from nnunetv2_tak.text.source import dataset_prompts, raw_dataset_folder

logger = logging.getLogger(__name__)


def _dataset_json(dataset_name: str, preprocessed: Path) -> dict:
    for folder in (preprocessed, raw_dataset_folder(dataset_name)):
        if folder is not None and (folder / "dataset.json").is_file():
            return json.loads((folder / "dataset.json").read_text())
    raise TextEmbeddingError(f"no dataset.json for {dataset_name} in {preprocessed} or nnUNet_raw")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_tak_encode_prompts",
        description="Encode the dataset's organ prompts with open_clip (or import precomputed embeddings) into "
                    f"nnUNet_preprocessed/<dataset>/{CACHE_FILENAME}, which nnUNetTrainerTAK uses.")
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name, e.g. 501 or Dataset501_Abdomen")
    p.add_argument("--model", default=None,
                   help=f"open_clip model (default {DEFAULT_MODEL}): a built-in name, hf-hub:org/repo (a model on "
                        "the Hugging Face Hub, e.g. BiomedCLIP; downloaded once when online) or local-dir:/path (a "
                        "folder with open_clip_config.json and the weights); hf-hub/local-dir models bring their "
                        "own weights")
    p.add_argument("--pretrained", default=None,
                   help=f"for built-in models: open_clip pretrained tag (online, downloads once), or a local "
                        f"checkpoint path for offline use (default {DEFAULT_PRETRAINED}); '{RANDOM_WEIGHTS}' encodes "
                        "with random weights (tests only)")
    p.add_argument("--embeddings", default=None,
                   help="import a precomputed tensor file [C, K, D] or [K*C, D] (kinds stacked) instead of encoding")
    p.add_argument("--kinds", default="shape,location",
                   help="comma-separated prompt kinds of the --embeddings file, in order (default shape,location)")
    p.add_argument("--force", action="store_true", help="re-encode even if the cache is up to date")
    p.add_argument("--print-prompts", action="store_true", help="show how each label resolved, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        dataset_name = _dataset_name(args.dataset)
        preprocessed = nnunet_folder("nnUNet_preprocessed", dataset_name, TextEmbeddingError)
        dataset_json = _dataset_json(dataset_name, preprocessed)
        if args.embeddings:
            if args.model or args.pretrained:
                raise TextEmbeddingError("--embeddings imports a file; do not combine it with --model/--pretrained")
            kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
            embeddings = load_embedding_file(args.embeddings, dataset_class_names(dataset_json), kinds)
            path = save_cache(preprocessed, embeddings)
            print(f"imported {args.embeddings} -> {path}: {embeddings.describe()}")
            return 0
        prompts = dataset_prompts(dataset_json, dataset_name, preprocessed)
        if args.print_prompts:
            for label, cls, per_kind, src in zip(prompts.class_names, prompts.matched, prompts.sentences,
                                                 prompts.sources, strict=True):
                print(f"{label!r} -> {cls} ({src})")
                for kind, sentences in zip(prompts.kinds, per_kind, strict=True):
                    for s in sentences:
                        print(f"    [{kind}] {s}")
            return 0
        model = normalize_model_name(args.model or DEFAULT_MODEL)
        if model_schema(model) and args.pretrained not in (None, RANDOM_WEIGHTS):
            raise TextEmbeddingError(
                f"--pretrained {args.pretrained} cannot be combined with --model {args.model}: an hf-hub:/local-dir: "
                f"model brings its own weights; leave --pretrained out (or pass {RANDOM_WEIGHTS} for random weights)")
        pretrained = args.pretrained or DEFAULT_PRETRAINED  # hf-hub/local-dir: the default means the model's own
        cached = load_cache(preprocessed)
        if cached is not None and not args.force and \
                cache_mismatch(cached, prompts.class_names, prompts, model, pretrained) is None:
            print(f"cache {preprocessed / CACHE_FILENAME} is up to date: {cached.describe()}")
            return 0
        embeddings = encode_prompts(prompts, model, pretrained)
        path = save_cache(preprocessed, embeddings)
        print(f"encoded {sum(len(s) for c in prompts.sentences for s in c)} sentences -> {path}: "
              f"{embeddings.describe()}")
        if pretrained == RANDOM_WEIGHTS:
            print("WARNING: random open_clip weights were used: these embeddings carry no textual knowledge.")
        return 0
    except (TextEmbeddingError, ValueError, FileNotFoundError, RuntimeError) as e:  # RuntimeError: unknown dataset
        print(f"nnUNetv2_tak_encode_prompts: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
