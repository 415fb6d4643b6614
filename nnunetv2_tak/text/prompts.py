"""Organ knowledge as data: prompt libraries (JSON), validation, and label-name resolution.

A prompt library lists classes; each has a canonical name, aliases and, for every prompt kind
(``shape``, ``location``, ...), several sentences. A dataset's labels (dataset.json order) resolve
against a stack of libraries: the dataset's own ``tak_prompts.json`` first, then the shipped one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

FORMAT = "nnunetv2_tak.prompts/1"  # the data format's name (the shipped files carry it), not a module path
_ACCEPTED_FORMATS = (FORMAT, "nnunetv2_tak.text.prompts/1")  # the second: an alias some files carry
DATASET_PROMPTS_FILENAME = "tak_prompts.json"
_SIDE_ABBREVIATIONS = {"r": "right", "rt": "right", "l": "left", "lt": "left"}


class PromptError(ValueError):
    """A prompt file is malformed or a dataset label has no prompts."""


def shipped_prompts_dir() -> Path:
    """Folder of the prompt libraries shipped with the package (wheel) or the source checkout."""
    package = Path(__file__).resolve().parent.parent  # nnunetv2_tak/
    for candidate in (package / "prompts", package.parent / "prompts"):  # wheel, source checkout
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"shipped prompts folder not found next to {package}; reinstall nnunetv2-tak")


def shipped_prompt_files() -> list[Path]:
    return sorted(shipped_prompts_dir().glob("*.json"))


def normalize_label_name(name: str) -> str:
    """Case-, punctuation- and word-order-insensitive key: 'Kidney (R)' -> 'kidney right'."""
    tokens = [t for t in re.split(r"[^0-9a-z]+", name.lower()) if t]
    return " ".join(sorted(_SIDE_ABBREVIATIONS.get(t, t) for t in tokens))


@dataclass(frozen=True)
class ClassKnowledge:
    name: str
    aliases: tuple[str, ...]
    prompts: Mapping[str, tuple[str, ...]]  # kind -> sentences
    source: str  # file it came from


@dataclass(frozen=True)
class PromptLibrary:
    path: str
    kinds: tuple[str, ...]
    classes: tuple[ClassKnowledge, ...]
    label_orders: Mapping[str, tuple[str, ...]]

    def index(self) -> dict[str, ClassKnowledge]:
        """normalized name or alias -> class."""
        out: dict[str, ClassKnowledge] = {}
        for cls in self.classes:
            for key in {normalize_label_name(n) for n in (cls.name, *cls.aliases)}:
                out[key] = cls
        return out


def _fail(path: str | os.PathLike, msg: str) -> PromptError:
    return PromptError(f"prompt file {path}: {msg}")


def load_prompt_library(path: str | os.PathLike) -> PromptLibrary:
    """Read and validate one prompt file; errors name the file and the class at fault."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, json.JSONDecodeError) as e:
        raise _fail(path, f"cannot be read as JSON ({e})") from e
    if not isinstance(data, dict) or data.get("format") not in _ACCEPTED_FORMATS:
        raise _fail(path, f"expected a JSON object with \"format\": \"{FORMAT}\"")
    kinds = data.get("kinds")
    if not (isinstance(kinds, list) and kinds and all(isinstance(k, str) and k for k in kinds)):
        raise _fail(path, "'kinds' must be a non-empty list of names, e.g. [\"shape\", \"location\"]")
    if len(set(kinds)) != len(kinds):
        raise _fail(path, f"'kinds' has duplicates: {kinds}")
    raw_classes = data.get("classes")
    if not isinstance(raw_classes, list) or not raw_classes:
        raise _fail(path, "'classes' must be a non-empty list")
    classes: list[ClassKnowledge] = []
    seen: dict[str, str] = {}
    for i, entry in enumerate(raw_classes):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name:
            raise _fail(path, f"class #{i} has no 'name'")
        aliases = entry.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
            raise _fail(path, f"class '{name}': 'aliases' must be a list of non-empty strings")
        prompts = entry.get("prompts")
        if not isinstance(prompts, dict):
            raise _fail(path, f"class '{name}': 'prompts' must map each kind {kinds} to a list of sentences")
        missing = [k for k in kinds if k not in prompts]
        extra = [k for k in prompts if k not in kinds]
        if missing or extra:
            raise _fail(path, f"class '{name}': prompt kinds must be exactly {kinds} (missing {missing}, "
                              f"unknown {extra})")
        for kind in kinds:
            sentences = prompts[kind]
            if not (isinstance(sentences, list) and sentences
                    and all(isinstance(s, str) and s.strip() for s in sentences)):
                raise _fail(path, f"class '{name}', kind '{kind}': needs a non-empty list of non-empty sentences")
        for key in {normalize_label_name(n) for n in (name, *aliases)}:
            if key in seen and seen[key] != name:
                raise _fail(path, f"name/alias '{key}' of class '{name}' is also used by class '{seen[key]}'")
            seen[key] = name
        classes.append(ClassKnowledge(
            name=name, aliases=tuple(aliases),
            prompts={k: tuple(s.strip() for s in prompts[k]) for k in kinds}, source=str(path),
        ))
    names = {c.name for c in classes}
    orders = data.get("label_orders", {})
    if not isinstance(orders, dict) or not all(isinstance(v, list) for v in orders.values()):
        raise _fail(path, "'label_orders' must map a name to a list of class names")
    for order_name, order in orders.items():
        unknown = [n for n in order if n not in names]
        if unknown:
            raise _fail(path, f"label_orders['{order_name}'] names unknown classes {unknown}")
    return PromptLibrary(str(path), tuple(kinds), tuple(classes), {k: tuple(v) for k, v in orders.items()})


@dataclass(frozen=True)
class ResolvedPrompts:
    """Prompts for one dataset in class order: sentences[c][k] is the list of sentences."""

    class_names: tuple[str, ...]  # dataset.json names, in label order
    matched: tuple[str, ...]  # canonical class each label resolved to
    kinds: tuple[str, ...]
    sentences: tuple[tuple[tuple[str, ...], ...], ...]
    sources: tuple[str, ...]  # prompt file each class came from

    def digest(self) -> str:
        """sha256 over class order, kinds and every sentence: identifies what gets encoded."""
        payload = json.dumps({"classes": self.class_names, "kinds": self.kinds, "sentences": self.sentences})
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def dataset_class_names(dataset_json: Mapping) -> list[str]:
    """Label names of dataset.json in label-value order (0..C-1), without the ignore label.

    Region-based training (labels mapping to lists) is not supported by the text-prior head.
    """
    labels = dataset_json.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        raise ValueError("dataset.json has no 'labels' mapping")
    regions = [k for k, v in labels.items() if isinstance(v, list | tuple)]
    if regions:
        raise ValueError(
            f"dataset.json defines region-based labels {regions}; nnunetv2_tak's text-prior head needs one "
            "class per label value (one prompt set per class). Train region-based datasets with the stock trainer."
        )
    named = sorted(((int(v), k) for k, v in labels.items() if k != "ignore"), key=lambda t: t[0])
    values = [v for v, _ in named]
    if values != list(range(len(values))):
        raise ValueError(f"dataset.json label values must be consecutive from 0 (background); got {values}")
    return [k for _, k in named]


def resolve_prompts(class_names: Sequence[str], libraries: Sequence[PromptLibrary]) -> ResolvedPrompts:
    """Resolve every label against the libraries (first match wins). Every label must resolve."""
    if not libraries:
        raise PromptError("no prompt library given")
    kinds = libraries[0].kinds
    indexes = [(lib, lib.index()) for lib in libraries]
    matched, sentences, sources, missing = [], [], [], []
    for label in class_names:
        key = normalize_label_name(label)
        hit = next((cls for _, idx in indexes if (cls := idx.get(key)) is not None), None)
        if hit is None:
            missing.append(label)
            continue
        lacking = [k for k in kinds if k not in hit.prompts]
        if lacking:
            raise PromptError(f"label '{label}' resolved to class '{hit.name}' in {hit.source}, which has no "
                              f"prompts of kind(s) {lacking} required by {libraries[0].path}")
        matched.append(hit.name)
        sentences.append(tuple(hit.prompts[k] for k in kinds))
        sources.append(hit.source)
    if missing:
        searched = ", ".join(lib.path for lib in libraries)
        raise PromptError(
            f"no prompts for label(s) {missing} of dataset.json (searched: {searched}). Add a class with these "
            f"names or aliases and {list(kinds)} sentences to a '{DATASET_PROMPTS_FILENAME}' next to the "
            "dataset's dataset.json (see README, 'Bring your own prompts'), or provide a precomputed "
            "embedding file with nnUNetv2_tak_encode_prompts --embeddings FILE."
        )
    return ResolvedPrompts(tuple(class_names), tuple(matched), tuple(kinds), tuple(sentences), tuple(sources))


def libraries_for_dataset(dataset_folders: Sequence[str | os.PathLike | None] = ()) -> list[PromptLibrary]:
    """The dataset's own prompt file (first existing ``tak_prompts.json`` in the given folders), then
    the shipped libraries."""
    libs = []
    for folder in dataset_folders:
        if folder is not None and (Path(folder) / DATASET_PROMPTS_FILENAME).is_file():
            libs.append(load_prompt_library(Path(folder) / DATASET_PROMPTS_FILENAME))
            break
    libs.extend(load_prompt_library(p) for p in shipped_prompt_files())
    return libs
