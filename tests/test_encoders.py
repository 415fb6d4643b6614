"""Text encoders beyond the built-in CLIP ViT-B/32: open_clip's ``local-dir:/path`` and ``hf-hub:org/repo``
models through the real open_clip loader, offline. Each test writes its own tiny open_clip model (a small
config and random weights, seeded) instead of downloading one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_text_dataset

from nnunetv2_tak.cli.encode_prompts import main as encode_main
from nnunetv2_tak.text.embeddings import (
    CACHE_FILENAME,
    DEFAULT_PRETRAINED,
    RANDOM_WEIGHTS,
    TextEmbeddingError,
    cache_mismatch,
    load_cache,
    model_schema,
    normalize_model_name,
)
from nnunetv2_tak.text.source import dataset_prompts, dataset_text_embeddings

LABELS = {"background": 0, "liver": 1, "Kidney (R)": 2, "arota": 3}
DATASET = "Dataset778_EncoderTest"
# a tiny CLIP: 16-dim embeddings, one 32-wide transformer layer per tower, the standard BPE tokenizer
TINY_MODEL_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_tiny_open_clip_model(folder: Path, seed: int) -> torch.nn.Module:
    """An open_clip model folder (open_clip_config.json + open_clip_pytorch_model.bin) holding the tiny
    config with random weights drawn from ``seed``; returns the model whose weights were written."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TINY_MODEL_CFG).eval()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_MODEL_CFG, "preprocess_cfg": {}}))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return model


def expected_embeddings(model: torch.nn.Module, prompts) -> torch.Tensor:
    """E [C, K, D] computed directly from ``model``: mean of encode_text over each kind's sentences."""
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # the tiny config has no HF tokenizer: same BPE tokenizer
    with torch.no_grad():
        return torch.stack([torch.stack([model.encode_text(tokenizer(sentences)).float().mean(0)
                                         for sentences in per_class]) for per_class in prompts.sentences])


@pytest.fixture
def dataset(tmp_path, monkeypatch):
    """A dataset known to nnU-Net (raw + preprocessed folders with dataset.json); no images needed."""
    _, pre, dataset_json = make_text_dataset(tmp_path, monkeypatch, DATASET, LABELS)
    return pre, dataset_json


def test_local_dir_tiny_model_random_weights_encodes_with_its_own_weights(dataset, tmp_path, monkeypatch, capsys):
    pre, dataset_json = dataset
    folder = tmp_path / "tiny_clip_random_weights"
    model = write_tiny_open_clip_model(folder, seed=123)
    assert encode_main(["-d", "778", "--model", f"local-dir:{folder}"]) == 0
    cache = load_cache(pre)
    p = cache.provenance
    assert (p["source"], p["model"], p["pretrained"]) == ("open_clip", f"local-dir:{folder.resolve()}", None)
    assert set(p["model_files"]) == {"open_clip_config.json", "open_clip_pytorch_model.bin"}
    assert "weights of the model itself" in cache.describe()
    # the folder's weights were loaded (not open_clip's random init): E equals the written model's encoding
    prompts = dataset_prompts(dataset_json, DATASET, pre)
    assert cache.tensor.shape == (4, 2, 16)
    torch.testing.assert_close(cache.tensor, expected_embeddings(model, prompts), rtol=1e-4, atol=1e-5)

    # same folder, given relative to the working directory: the cache is up to date
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert encode_main(["-d", "778", "--model", "local-dir:tiny_clip_random_weights"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert cache_mismatch(load_cache(pre), prompts.class_names, prompts, "local-dir:tiny_clip_random_weights",
                          DEFAULT_PRETRAINED) is None

    # new weights in the folder make the cache stale; encoding again picks them up
    other = write_tiny_open_clip_model(folder, seed=7)
    os.utime(folder / "open_clip_pytorch_model.bin", (1, 1))  # a different fingerprint even within one second
    reason = cache_mismatch(load_cache(pre), prompts.class_names, prompts, f"local-dir:{folder}", None)
    assert reason is not None and "changed" in reason and str(folder.resolve()) in reason
    assert encode_main(["-d", "778", "--model", f"local-dir:{folder}"]) == 0
    torch.testing.assert_close(load_cache(pre).tensor, expected_embeddings(other, prompts), rtol=1e-4, atol=1e-5)

    # random weights of the same architecture are recorded as such, and differ from the cache's model
    assert encode_main(["-d", "778", "--model", f"local-dir:{folder}", "--pretrained", RANDOM_WEIGHTS]) == 0
    assert load_cache(pre).provenance["pretrained"] == RANDOM_WEIGHTS
    assert "random open_clip weights" in capsys.readouterr().out


def test_local_dir_errors_name_the_folder_and_never_fall_back_to_random(dataset, tmp_path, capsys):
    pre, _ = dataset
    missing = tmp_path / "no_such_model"
    assert encode_main(["-d", "778", "--model", f"local-dir:{missing}"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "open_clip_config.json" in err

    no_weights = tmp_path / "config_only"
    write_tiny_open_clip_model(no_weights, seed=0)
    (no_weights / "open_clip_pytorch_model.bin").unlink()
    assert encode_main(["-d", "778", "--model", f"local-dir:{no_weights}"]) == 2
    assert "holds no weights file" in capsys.readouterr().err

    bad_config = tmp_path / "bad_config"
    write_tiny_open_clip_model(bad_config, seed=0)
    (bad_config / "open_clip_config.json").write_text(json.dumps(TINY_MODEL_CFG))  # no 'model_cfg' key
    assert encode_main(["-d", "778", "--model", f"local-dir:{bad_config}"]) == 2
    assert "'model_cfg'" in capsys.readouterr().err

    good = tmp_path / "good"
    write_tiny_open_clip_model(good, seed=0)
    assert encode_main(["-d", "778", "--model", f"local-dir:{good}", "--pretrained", "openai"]) == 2
    assert "brings its own weights" in capsys.readouterr().err
    assert load_cache(pre) is None  # nothing was written by any of the failures


def test_model_schema_and_names():
    assert model_schema("ViT-B-32") is None
    assert model_schema("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224") == "hf-hub"
    assert model_schema("local-dir:/models/x") == "local-dir"
    assert normalize_model_name("hf-hub:org/repo") == "hf-hub:org/repo"
    assert normalize_model_name("local-dir:/a/b/../c") == "local-dir:/a/c"
    with pytest.raises(TextEmbeddingError, match="hf-hub:org/repo"):
        model_schema("hf-hub:")


def _write_hf_cache_snapshot(cache: Path, repo: str, revision: str, seed: int) -> torch.nn.Module:
    """A Hugging Face hub cache entry for ``repo`` (refs/main -> snapshots/<revision>/...) as
    huggingface_hub lays it out after a download; returns the model whose weights it holds."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(revision)
    return write_tiny_open_clip_model(entry / "snapshots" / revision, seed)


def test_hf_hub_model_from_the_offline_hub_cache(dataset, tmp_path):
    """hf-hub:org/repo through open_clip and huggingface_hub with HF_HUB_OFFLINE=1, read from a hub cache that
    the test fills itself (the download itself needs the internet and is not tested here)."""
    pre, dataset_json = dataset
    revision = "0123456789abcdef0123456789abcdef01234567"
    model = _write_hf_cache_snapshot(tmp_path / "hf_cache", "tak-test/tiny-clip", revision, seed=5)
    script = (
        "import sys\n"
        "from nnunetv2_tak.cli.encode_prompts import main\n"
        "assert main(['-d', '778', '--model', 'hf-hub:tak-test/not-in-the-cache']) == 2\n"
        "sys.exit(main(['-d', '778', '--model', 'hf-hub:tak-test/tiny-clip']))\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf_cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "hf-hub:tak-test/not-in-the-cache" in proc.stderr and "local-dir:" in proc.stderr
    cache = load_cache(pre)
    p = cache.provenance
    assert (p["model"], p["pretrained"], p["hf_hub_revision"]) == ("hf-hub:tak-test/tiny-clip", None, revision)
    prompts = dataset_prompts(dataset_json, DATASET, pre)
    torch.testing.assert_close(cache.tensor, expected_embeddings(model, prompts), rtol=1e-4, atol=1e-5)


def test_cache_that_no_longer_fits_is_reported_through_the_given_log(dataset, tmp_path):
    pre, dataset_json = dataset
    cached, requested = tmp_path / "cached_model", tmp_path / "requested_model"
    write_tiny_open_clip_model(cached, seed=1)
    write_tiny_open_clip_model(requested, seed=2)
    assert encode_main(["-d", "778", "--model", f"local-dir:{cached}"]) == 0
    lines: list[str] = []
    dataset_text_embeddings(dataset_json, DATASET, pre, model_name=f"local-dir:{requested}", log=lines.append)
    cache = pre / CACHE_FILENAME
    assert lines[0] == (f"WARNING: text embedding cache {cache} does not fit (model local-dir:{cached.resolve()} in "
                        f"the cache, local-dir:{requested} requested): encoding for this run only; update the cache "
                        "with nnUNetv2_tak_encode_prompts -d Dataset778_EncoderTest --force")
    assert lines[1].startswith(f"encoded text embeddings for this run (the cache {cache} is left as it is): open_clip "
                               f"local-dir:{requested.resolve()}")
    assert len(lines) == 2 and load_cache(pre).provenance["model"] == f"local-dir:{cached.resolve()}"
