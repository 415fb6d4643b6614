"""Text embeddings E [C, K, D]: encoding with open_clip, user-provided files, and the provenance cache.

The cache lives beside the preprocessed data (``nnUNet_preprocessed/DatasetXXX/tak_text_embeddings.pt``)
and records where E came from: source (open_clip / file / random), model, pretrained tag or path,
prompt hash and class order. Nothing here ever substitutes random text for missing weights.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import pickle
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nnunetv2_tak.fileio import atomic_write, atomic_write_text, file_sha256
from nnunetv2_tak.text.prompts import ResolvedPrompts

logger = logging.getLogger(__name__)

CACHE_FILENAME = "tak_text_embeddings.pt"
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"
RANDOM_WEIGHTS = "random-init"  # --pretrained value for an open_clip model with random weights (tests)
HF_HUB_PREFIX = "hf-hub:"  # open_clip model names that bring their own config and weights
LOCAL_DIR_PREFIX = "local-dir:"


class TextEmbeddingError(RuntimeError):
    """Text embeddings are missing, stale, or do not fit the dataset."""


@dataclass
class TextEmbeddings:
    tensor: torch.Tensor  # [C, K, D] float32
    provenance: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.tensor.shape)  # type: ignore[return-value]

    def describe(self) -> str:
        p = self.provenance
        if p.get("source") == "open_clip":
            what = f"open_clip {p.get('model')} / {p.get('pretrained') or 'weights of the model itself'}"
            if p.get("pretrained") == RANDOM_WEIGHTS:
                what += " (RANDOM encoder weights: no textual knowledge)"
        elif p.get("source") == "file":
            what = f"embedding file {p.get('file')}"
        else:
            what = f"RANDOM text embeddings (seed {p.get('seed')}) - no textual knowledge"
        if "class_permutation" in p:
            what += f", classes PERMUTED (class c gets the text of class order[c], order {p['class_permutation']})"
        return f"{what}, shape {list(self.shape)}, classes {p.get('class_names')}"


def how_to_provide(dataset: str) -> str:
    return (
        f"Provide text embeddings for {dataset} in one of these ways:\n"
        f"  1. encode the prompts with open_clip weights available offline:\n"
        f"     nnUNetv2_tak_encode_prompts -d {dataset} --model {DEFAULT_MODEL} "
        f"--pretrained /path/to/open_clip_model.bin\n"
        f"     (or, online once: --pretrained {DEFAULT_PRETRAINED}, which downloads and caches the weights)\n"
        f"  2. import precomputed embeddings [C, K, D] or [K*C, D]:\n"
        f"     nnUNetv2_tak_encode_prompts -d {dataset} --embeddings FILE.pt\n"
        f"  3. for tests/ablations only, train with random text explicitly: -tr nnUNetTrainerTAK_RandomText"
    )


def _file_fingerprint(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime": int(st.st_mtime)}


def model_schema(model_name: str) -> str | None:
    """``"hf-hub"`` or ``"local-dir"`` for open_clip models that bring their own config and weights
    (``hf-hub:org/repo``, ``local-dir:/path``); None for built-in names such as ``ViT-B-32``."""
    for prefix in (HF_HUB_PREFIX, LOCAL_DIR_PREFIX):
        if model_name.startswith(prefix):
            if not model_name[len(prefix):].strip():
                example = "org/repo" if prefix == HF_HUB_PREFIX else "/path/to/model_folder"
                raise TextEmbeddingError(f"model '{model_name}' names nothing after '{prefix}'; use {prefix}{example}")
            return prefix[:-1]
    return None


def normalize_model_name(model_name: str) -> str:
    """``local-dir:`` with an absolute path (the cache records where the model came from); others unchanged."""
    if model_schema(model_name) == "local-dir":
        return LOCAL_DIR_PREFIX + str(Path(model_name[len(LOCAL_DIR_PREFIX):]).expanduser().resolve())
    return model_name


def _model_files(folder: Path) -> dict[str, dict]:
    """Fingerprint (size, mtime) of every file of a local-dir model folder."""
    return {f.name: _file_fingerprint(str(f)) for f in sorted(folder.iterdir()) if f.is_file()}


def _check_local_dir(folder: Path, random_init: bool) -> None:
    """A local-dir model folder must hold open_clip_config.json (with 'model_cfg') and, unless random
    weights are asked for, a weights file: open_clip would otherwise build the model with random weights."""
    layout = ("it must hold open_clip_config.json (with a 'model_cfg' entry, as written by open_clip's "
              "push_to_hf_hub) and the weights (open_clip_model.safetensors or open_clip_pytorch_model.bin)")
    if not folder.is_dir():
        raise TextEmbeddingError(f"local-dir model folder {folder} does not exist; {layout}")
    config = folder / "open_clip_config.json"
    if not config.is_file():
        raise TextEmbeddingError(f"local-dir model folder {folder} has no open_clip_config.json; {layout}")
    try:
        has_cfg = "model_cfg" in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise TextEmbeddingError(f"{config} is not valid JSON ({e}); {layout}") from e
    if not has_cfg:
        raise TextEmbeddingError(f"{config} has no 'model_cfg' entry; {layout}")
    weights = [f for f in folder.iterdir() if f.is_file() and f.suffix in (".safetensors", ".bin", ".pth")]
    if not weights and not random_init:
        raise TextEmbeddingError(f"local-dir model folder {folder} holds no weights file (*.safetensors, *.bin, "
                                 f"*.pth); {layout}")


def _hf_hub_revision(repo_id: str) -> str | None:
    """Commit of the cached hf-hub snapshot that was loaded (None if it cannot be told)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "open_clip_config.json")
    return Path(found).parent.name if isinstance(found, str) else None


def encode_prompts(
    prompts: ResolvedPrompts,
    model_name: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> TextEmbeddings:
    """Encode every sentence with open_clip's text tower; sentences of one kind are averaged.

    ``model_name``: a built-in open_clip model (``ViT-B-32``), or a model that brings its own config and
    weights: ``hf-hub:org/repo`` (Hugging Face Hub, e.g. BiomedCLIP; downloads once when online, then
    read from the Hugging Face cache) or ``local-dir:/path`` (a folder with open_clip_config.json and
    the weights). ``pretrained``: for built-in models an open_clip tag (downloads once when online) or a
    local checkpoint path (None: ``openai``); for hf-hub/local-dir models the weights come with the model,
    so only None, the default tag or ``random-init`` are accepted. ``random-init`` gives random weights
    (explicit; used by tests). Returns E [C, K, D].
    """
    import open_clip

    random_init = pretrained == RANDOM_WEIGHTS
    schema = model_schema(model_name)
    model_name = normalize_model_name(model_name)
    if schema is not None:
        if pretrained not in (None, DEFAULT_PRETRAINED, RANDOM_WEIGHTS):
            raise TextEmbeddingError(
                f"pretrained '{pretrained}' cannot be used with {model_name}: an {schema}: model brings its own "
                f"weights (open_clip ignores 'pretrained' for it). Leave --pretrained out (or pass "
                f"'{RANDOM_WEIGHTS}' for random weights), or use a built-in model name with a checkpoint file.")
        if schema == "local-dir":
            _check_local_dir(Path(model_name[len(LOCAL_DIR_PREFIX):]), random_init)
        pretrained = RANDOM_WEIGHTS if random_init else None
    elif pretrained is None:
        pretrained = DEFAULT_PRETRAINED
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # random-init weights are seeded, so they are reproducible
            model = open_clip.create_model(
                model_name, pretrained=None if random_init or schema else pretrained, device=device,
                require_pretrained=not random_init, load_weights=not random_init,
            )
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as e:  # open_clip raises RuntimeError/HF errors/OSError for missing weights
        if schema == "hf-hub":
            hint = ("An hf-hub: model is downloaded once when online and then read from the Hugging Face cache "
                    "(HF_HUB_OFFLINE=1 uses the cache only); offline, download its folder elsewhere and pass "
                    "--model local-dir:/path/to/that/folder. Models with a Hugging Face text tower (e.g. "
                    "BiomedCLIP) also need `pip install transformers`.")
        elif schema == "local-dir":
            hint = "Check the folder's open_clip_config.json and weights file."
        else:
            hint = "Offline, pass a local checkpoint file with --pretrained PATH (or a precomputed --embeddings FILE)."
        raise TextEmbeddingError(
            f"could not load open_clip model '{model_name}'"
            + (f" with pretrained '{pretrained}'" if schema is None or random_init else "")
            + f": {type(e).__name__}: {e}\n{hint}"
        ) from e
    model.eval()
    flat = [s for per_class in prompts.sentences for per_kind in per_class for s in per_kind]
    with torch.no_grad():
        chunks = [
            model.encode_text(tokenizer(flat[i:i + batch_size]).to(device)).float().cpu()
            for i in range(0, len(flat), batch_size)
        ]
    encoded = torch.cat(chunks)  # [n_sentences, D]
    per_kind, start = [], 0
    for per_class in prompts.sentences:
        for sentences in per_class:
            per_kind.append(encoded[start:start + len(sentences)].mean(0))
            start += len(sentences)
    tensor = torch.stack(per_kind).reshape(len(prompts.class_names), len(prompts.kinds), -1)
    provenance = {
        "source": "open_clip",
        "model": model_name,
        "pretrained": pretrained,
        "open_clip_version": open_clip.__version__,
        "aggregation": "mean of encode_text over the sentences of each kind (not normalised)",
    }
    if schema == "local-dir":
        provenance["model_files"] = _model_files(Path(model_name[len(LOCAL_DIR_PREFIX):]))
    elif schema == "hf-hub":
        provenance["hf_hub_revision"] = _hf_hub_revision(model_name[len(HF_HUB_PREFIX):])
    elif os.path.isfile(pretrained):
        provenance["pretrained_file"] = _file_fingerprint(pretrained)
    return TextEmbeddings(tensor.contiguous(), _with_dataset_info(provenance, prompts.class_names, prompts.kinds,
                                                                  prompts.digest(), prompts.matched))


def _with_dataset_info(provenance: dict, class_names: Sequence[str], kinds: Sequence[str],
                       prompt_sha256: str | None, matched: Sequence[str] | None = None) -> dict:
    provenance = dict(provenance)
    provenance.update({
        "class_names": list(class_names),
        "kinds": list(kinds),
        "prompt_sha256": prompt_sha256,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    if matched is not None:
        provenance["matched_prompt_classes"] = list(matched)
    return provenance


NPY_MAGIC = b"\x93NUMPY"  # numpy.save
ZIP_MAGIC = b"PK\x03\x04"  # torch.save (a zip archive since torch 1.6)
PICKLE_MAGIC = b"\x80"  # torch.save(..., _use_new_zipfile_serialization=False): a pickle


def read_tensor_file(path: str | os.PathLike, what: str, fix: str) -> object:
    """What a ``torch.save`` file or a ``.npy`` array holds, read without running code from the file (tensors,
    dicts, lists and numbers only). Anything else raises TextEmbeddingError "``what`` ``path`` <what is wrong>;
    ``fix``": an empty or truncated file says so, and a reader's advice to load the file unsafely is never passed
    on."""
    path = Path(path)

    def fail(reason: str) -> TextEmbeddingError:
        return TextEmbeddingError(f"{what} {path} {reason}; {fix}")

    size = path.stat().st_size
    if size == 0:
        raise fail("is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(NPY_MAGIC):
        return torch.from_numpy(_read_npy(path, size, fail))
    if not head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
        raise fail(f"is neither a torch.save archive nor a .npy array (it starts with the bytes {head!r})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if head.startswith(ZIP_MAGIC) and zipfile.is_zipfile(path):
            raise fail("holds Python objects other than tensors, dicts, lists and numbers, which are not read from "
                       "a file (reading them could run code from it)") from None
        raise fail(f"is not a readable torch.save file ({size} bytes): cut short, damaged, or holding Python "
                   "objects other than tensors") from None
    except Exception as exc:  # torch raises RuntimeError (zip reader), EOFError, ... for damaged files
        if head.startswith(ZIP_MAGIC) and not zipfile.is_zipfile(path):
            raise fail(f"is a truncated torch.save archive ({size} bytes, its zip directory at the end is missing: "
                       "cut short by a copy or a full disk?)") from None
        raise fail(f"is a damaged torch.save file ({type(exc).__name__} while reading it)") from None


def _read_npy(path: Path, size: int, fail: Callable[[str], TextEmbeddingError]):
    import numpy as np

    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
        except ValueError:
            raise fail("has a damaged .npy header") from None
        if dtype.hasobject:
            raise fail("holds a numpy array of Python objects (dtype object), not numbers, which is not read from a "
                       "file (reading it could run code from it)")
        expected = f.tell() + math.prod(shape) * dtype.itemsize
    if size < expected:
        raise fail(f"is truncated: its header announces a {dtype} array of shape {list(shape)} ({expected} bytes "
                   f"with the header), the file holds {size}")
    return np.load(path, allow_pickle=False)


def load_embedding_file(path: str | os.PathLike, class_names: Sequence[str],
                        kinds: Sequence[str] = ("shape", "location")) -> TextEmbeddings:
    """Read a precomputed tensor file (saved with torch.save, or numpy.save's .npy; told apart by content).

    Accepted: [C, K, D], or [K*C, D] with the kinds stacked (rows 0..C-1 = kind 0, ...), or a dict
    with key 'embeddings'. C is the dataset's number of classes (background included), K = len(kinds).
    """
    path = Path(path)
    if not path.is_file():
        raise TextEmbeddingError(f"embedding file {path} does not exist")
    obj = read_tensor_file(path, "embedding file", "save the embeddings with torch.save(tensor, FILE) or "
                                                    "numpy.save(FILE, array)")
    if isinstance(obj, Mapping):
        if "embeddings" not in obj:
            raise TextEmbeddingError(f"embedding file {path} holds a dict without an 'embeddings' entry")
        obj = obj["embeddings"]
    if not isinstance(obj, torch.Tensor):
        raise TextEmbeddingError(f"embedding file {path} holds {type(obj).__name__}, expected a tensor")
    tensor = obj.detach().float().cpu()
    c, k = len(class_names), len(kinds)
    expected = (f"expected [{c}, {k}, D] or [{k * c}, D] (kinds {list(kinds)} stacked) for the dataset's {c} "
                f"classes {list(class_names)} in dataset.json label order, background first")
    if tensor.ndim == 2 and tensor.shape[0] == k * c:
        tensor = tensor.reshape(k, c, -1).transpose(0, 1)
    if tensor.ndim != 3 or tuple(tensor.shape[:2]) != (c, k):
        raise TextEmbeddingError(f"embedding file {path} has shape {list(tensor.shape)}; {expected}")
    if not torch.isfinite(tensor).all():
        raise TextEmbeddingError(f"embedding file {path} contains NaN or infinite values")
    provenance = {"source": "file", "file": str(path.resolve()), "file_sha256": file_sha256(path)}
    return TextEmbeddings(tensor.contiguous(), _with_dataset_info(provenance, class_names, kinds, None))


def random_text_embeddings(class_names: Sequence[str], num_kinds: int = 2, embed_dim: int = 512,
                           seed: int = 0) -> TextEmbeddings:
    """Seeded Gaussian embeddings [C, K, D]: the explicit 'random text' ablation, never a fallback."""
    gen = torch.Generator().manual_seed(seed)
    tensor = torch.randn(len(class_names), num_kinds, embed_dim, generator=gen)
    provenance = {"source": "random", "seed": seed}
    return TextEmbeddings(tensor, _with_dataset_info(provenance, class_names,
                                                     [f"kind{i}" for i in range(num_kinds)], None))


def save_cache(folder: str | os.PathLike, embeddings: TextEmbeddings) -> Path:
    """Write E and its provenance to ``folder/tak_text_embeddings.pt`` (+ a readable .json)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / CACHE_FILENAME
    # a unique temporary file (folds started in parallel never write the same one), moved into place with
    # nnU-Net's file mode (0o666 & ~umask): other users of a shared nnUNet_preprocessed can read it
    try:
        atomic_write(target, lambda tmp: torch.save({"embeddings": embeddings.tensor,
                                                     "provenance": embeddings.provenance}, tmp))
        atomic_write_text(target.with_suffix(".json"), json.dumps(
            {**embeddings.provenance, "shape": list(embeddings.shape)}, indent=2))
    except OSError as exc:  # e.g. a full disk: the previous cache is as it was
        raise TextEmbeddingError(f"could not write the text embedding cache {target} ({type(exc).__name__}: {exc}); "
                                 "the previous cache, if any, is kept. Free space (or fix the folder's permissions) "
                                 "and run again.") from exc
    return target


def load_cache(folder: str | os.PathLike) -> TextEmbeddings | None:
    path = Path(folder) / CACHE_FILENAME
    if not path.is_file():
        return None
    fix = "delete it and run nnUNetv2_tak_encode_prompts again"
    obj = read_tensor_file(path, "text embedding cache", fix)
    try:
        return TextEmbeddings(obj["embeddings"].float(), dict(obj["provenance"]))
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise TextEmbeddingError(f"text embedding cache {path} does not hold embeddings and their provenance "
                                 f"({type(e).__name__}: {e}); {fix}") from e


def cache_mismatch(cached: TextEmbeddings, class_names: Sequence[str], prompts: ResolvedPrompts | None,
                   model_name: str | None = None, pretrained: str | None = None) -> str | None:
    """Why a cached E does not fit the current dataset/prompts/requested encoder; None if it fits."""
    p = cached.provenance
    if list(p.get("class_names", [])) != list(class_names):
        return f"class order changed: cache {p.get('class_names')} vs dataset.json {list(class_names)}"
    if cached.tensor.shape[0] != len(class_names):
        return f"cache has {cached.tensor.shape[0]} classes, dataset has {len(class_names)}"
    if p.get("source") == "open_clip":
        if prompts is not None and p.get("prompt_sha256") != prompts.digest():
            return "the prompts changed since the cache was encoded"
        if model_name is not None and p.get("model") != normalize_model_name(model_name):
            return f"model {p.get('model')} in the cache, {model_name} requested"
        if pretrained is not None:
            own = model_schema(str(p.get("model", ""))) is not None and pretrained == DEFAULT_PRETRAINED
            wanted = None if own else pretrained  # hf-hub/local-dir: the default tag means the model's own weights
            if p.get("pretrained") != wanted:
                return (f"pretrained {p.get('pretrained') or '(weights of the model itself)'} in the cache, "
                        f"{wanted or '(weights of the model itself)'} requested")
        weights = p.get("pretrained") or ""
        if "pretrained_file" in p and os.path.isfile(weights) and _file_fingerprint(weights) != p["pretrained_file"]:
            return f"the encoder checkpoint {weights} changed since the cache was encoded"
        folder = Path(str(p.get("model", ""))[len(LOCAL_DIR_PREFIX):])
        if "model_files" in p and folder.is_dir() and _model_files(folder) != p["model_files"]:
            return f"the files of the model folder {folder} changed since the cache was encoded"
    elif p.get("source") == "file":
        if model_name is not None or pretrained is not None:
            return f"the cache holds embeddings imported from {p.get('file')}, but an open_clip encoder was requested"
    else:
        return f"unknown cache source {p.get('source')!r}"
    return None
