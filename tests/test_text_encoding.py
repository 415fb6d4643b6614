"""Encoding prompts with a real open_clip model (random weights: no download), the provenance cache,
imported embedding files and the errors when no text source is available."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_text_dataset

from nnunetv2_tak.cli.encode_prompts import main as encode_main
from nnunetv2_tak.text.embeddings import (
    CACHE_FILENAME,
    RANDOM_WEIGHTS,
    TextEmbeddingError,
    load_cache,
    load_embedding_file,
)
from nnunetv2_tak.text.source import dataset_text_embeddings

LABELS = {"background": 0, "liver": 1, "Kidney (R)": 2, "arota": 3}
DATASET = "Dataset777_TextTest"


@pytest.fixture
def dataset(tmp_path, monkeypatch):
    """A dataset known to nnU-Net (raw + preprocessed folders with dataset.json); no images needed."""
    return make_text_dataset(tmp_path, monkeypatch, DATASET, LABELS)


def test_encode_cli_with_random_weight_open_clip_caches_and_reuses(dataset, capsys):
    raw, pre, dataset_json = dataset
    assert encode_main(["-d", "777", "--pretrained", RANDOM_WEIGHTS]) == 0
    cache = load_cache(pre)
    assert cache.tensor.shape == (4, 2, 512)
    p = cache.provenance
    assert (p["source"], p["model"], p["pretrained"]) == ("open_clip", "ViT-B-32", RANDOM_WEIGHTS)
    assert p["class_names"] == list(LABELS) and p["kinds"] == ["shape", "location"]
    assert p["matched_prompt_classes"] == ["background", "liver", "kidney_right", "aorta"]
    assert json.loads((pre / "tak_text_embeddings.json").read_text())["shape"] == [4, 2, 512]
    # distinct prompts give distinct embeddings, also between kinds
    flat = cache.tensor.reshape(8, -1)
    assert torch.cdist(flat, flat).add(torch.eye(8)).min() > 0
    assert "random open_clip weights" in capsys.readouterr().out

    mtime = (pre / CACHE_FILENAME).stat().st_mtime_ns
    assert encode_main(["-d", DATASET, "--pretrained", RANDOM_WEIGHTS]) == 0
    assert "up to date" in capsys.readouterr().out
    assert (pre / CACHE_FILENAME).stat().st_mtime_ns == mtime

    # the trainer-side resolution uses the same cache without encoding again
    reused = dataset_text_embeddings(dataset_json, DATASET, pre)
    assert torch.equal(reused.tensor, cache.tensor)

    # a dataset prompt file changes the liver's prompts -> cache is stale and gets rebuilt
    (raw / "tak_prompts.json").write_text(json.dumps({
        "format": "nnunetv2_tak.text.prompts/1", "kinds": ["shape", "location"],
        "classes": [{"name": "liver", "prompts": {"shape": ["a huge wedge."], "location": ["right upper."]}}]}))
    rebuilt = dataset_text_embeddings(dataset_json, DATASET, pre)
    assert rebuilt.provenance["prompt_sha256"] != p["prompt_sha256"]
    assert not torch.allclose(rebuilt.tensor[1], cache.tensor[1])
    torch.testing.assert_close(rebuilt.tensor[[0, 2, 3]], cache.tensor[[0, 2, 3]])  # same weights, same prompts
    # training never overwrites a cache other runs may use; the CLI updates it
    assert load_cache(pre).provenance["prompt_sha256"] == p["prompt_sha256"]
    assert encode_main(["-d", "777", "--pretrained", RANDOM_WEIGHTS]) == 0
    assert load_cache(pre).provenance["prompt_sha256"] == rebuilt.provenance["prompt_sha256"]


def test_no_weights_and_no_file_stops_with_instructions(dataset, tmp_path):
    _, pre, dataset_json = dataset
    missing = str(tmp_path / "no_such_checkpoint.bin")
    with pytest.raises(TextEmbeddingError) as info:
        dataset_text_embeddings(dataset_json, DATASET, pre, pretrained=missing)
    message = str(info.value)
    assert missing in message
    assert "nnUNetv2_tak_encode_prompts -d Dataset777_TextTest" in message and "--embeddings" in message
    assert not (pre / CACHE_FILENAME).exists()  # nothing half-written


def test_encode_cli_reports_missing_weights(dataset, tmp_path, capsys):
    assert encode_main(["-d", "777", "--pretrained", str(tmp_path / "none.bin")]) == 2
    assert "none.bin" in capsys.readouterr().err


def test_import_embedding_file_kinds_stacked(dataset, tmp_path, capsys):
    _, pre, dataset_json = dataset
    shape_rows, location_rows = torch.randn(4, 16), torch.randn(4, 16)
    path = tmp_path / "emb.pt"
    torch.save(torch.cat([shape_rows, location_rows]), path)  # [K*C, D], kinds stacked like TAK's release
    assert encode_main(["-d", "777", "--embeddings", str(path)]) == 0
    cache = load_cache(pre)
    assert cache.tensor.shape == (4, 2, 16)
    torch.testing.assert_close(cache.tensor[:, 0], shape_rows)
    torch.testing.assert_close(cache.tensor[:, 1], location_rows)
    assert cache.provenance["source"] == "file" and cache.provenance["kinds"] == ["shape", "location"]
    # training uses an imported file as is
    assert torch.equal(dataset_text_embeddings(dataset_json, DATASET, pre).tensor, cache.tensor)
    # ... unless an explicit open_clip encoder is requested, which says so
    with pytest.raises(TextEmbeddingError, match="imported from"):
        dataset_text_embeddings(dataset_json, DATASET, pre, model_name="ViT-B-32")


@pytest.mark.parametrize("tensor, message", [
    (torch.randn(5, 2, 8), r"shape \[5, 2, 8\]; expected \[4, 2, D\] or \[8, D\]"),
    (torch.randn(10, 8), r"shape \[10, 8\]"),
    (torch.randn(4, 8), r"shape \[4, 8\]"),
    (torch.randn(4, 2, 8, 1), r"shape \[4, 2, 8, 1\]"),
])
def test_embedding_file_shape_checks(tmp_path, tensor, message):
    path = tmp_path / "e.pt"
    torch.save(tensor, path)
    with pytest.raises(TextEmbeddingError, match=message) as info:
        load_embedding_file(path, list(LABELS))
    assert str(path) in str(info.value) and "'Kidney (R)'" in str(info.value)


def test_embedding_file_formats(tmp_path):
    import numpy as np

    tensor = torch.randn(4, 2, 8)
    np.save(tmp_path / "e.npy", tensor.numpy())
    torch.save({"embeddings": tensor}, tmp_path / "e.pth")
    for name in ("e.npy", "e.pth"):
        torch.testing.assert_close(load_embedding_file(tmp_path / name, list(LABELS)).tensor, tensor)
    torch.save(torch.full((4, 2, 8), float("nan")), tmp_path / "nan.pt")
    with pytest.raises(TextEmbeddingError, match="NaN"):
        load_embedding_file(tmp_path / "nan.pt", list(LABELS))


def test_class_count_mismatch_via_cli_names_file_and_labels(dataset, tmp_path, capsys):
    path = tmp_path / "amos.pt"
    torch.save(torch.randn(32, 8), path)  # 16 classes x 2 kinds, dataset has 4 classes
    assert encode_main(["-d", "777", "--embeddings", str(path)]) == 2
    err = capsys.readouterr().err
    assert "amos.pt" in err and "has shape [32, 8]; expected [4, 2, D] or [8, D]" in err


def test_print_prompts_shows_resolution(dataset, capsys):
    assert encode_main(["-d", "777", "--print-prompts"]) == 0
    out = capsys.readouterr().out
    assert "'Kidney (R)' -> kidney_right" in out and "'arota' -> aorta" in out
    assert out.count("[shape]") == 12 and out.count("[location]") == 12


def test_missing_prompt_via_cli_names_the_label(dataset, capsys):
    _, pre, dataset_json = dataset
    dataset_json["labels"]["hepatic cyst"] = 4
    (pre / "dataset.json").write_text(json.dumps(dataset_json))
    assert encode_main(["-d", "777", "--pretrained", RANDOM_WEIGHTS]) == 2
    assert "no prompts for label(s) ['hepatic cyst']" in capsys.readouterr().err
    assert not (pre / CACHE_FILENAME).exists()


def test_changed_local_checkpoint_makes_the_cache_stale(dataset, tmp_path):
    from nnunetv2_tak.text.embeddings import cache_mismatch

    pre = dataset[1]
    assert encode_main(["-d", "777", "--pretrained", RANDOM_WEIGHTS]) == 0
    cache = load_cache(pre)
    weights = tmp_path / "encoder.bin"
    weights.write_bytes(b"v1")
    cache.provenance.update({"pretrained": str(weights), "pretrained_file": {"size": 2,
                                                                              "mtime": int(weights.stat().st_mtime)}})
    assert cache_mismatch(cache, list(LABELS), None) is None
    weights.write_bytes(b"version 2")
    assert "changed since the cache was encoded" in cache_mismatch(cache, list(LABELS), None)


def _unsafe_advice(message: str) -> bool:
    return any(word in message for word in ("weights_only", "allow_pickle", "unsafe", "trust"))


class _NotATensor:
    pass


@pytest.mark.parametrize("content, reason", [
    (b"", r"is empty \(0 bytes\)"),
    (b"\x07" + bytes(range(200)), r"is neither a torch.save archive nor a .npy array \(it starts with the bytes "),
    ("half.pt", r"is a truncated torch.save archive \(\d+ bytes, its zip directory at the end is missing"),
    ("half.npy", r"is truncated: its header announces a float32 array of shape \[4, 2, 8\] \(\d+ bytes with the "
                 r"header\), the file holds \d+"),
    ("object.pt", r"holds Python objects other than tensors, dicts, lists and numbers, which are not read"),
    ("object.npy", r"holds a numpy array of Python objects \(dtype object\), not numbers"),
])
def test_unreadable_embedding_file_is_named_with_its_reason_and_no_unsafe_advice(dataset, tmp_path, content, reason,
                                                                                capsys):
    import numpy as np

    path = tmp_path / (content if isinstance(content, str) else "embeddings.pt")
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content.startswith("half"):
        whole = tmp_path / f"whole{path.suffix}"
        if path.suffix == ".npy":
            np.save(whole, np.zeros((4, 2, 8), np.float32))
        else:
            torch.save(torch.zeros(4, 2, 8), whole)
        path.write_bytes(whole.read_bytes()[:whole.stat().st_size - 20])
    elif path.suffix == ".pt":
        torch.save({"embeddings": torch.zeros(4, 2, 8), "extra": _NotATensor()}, path)
    else:
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(TextEmbeddingError, match=rf"^embedding file {path} {reason}") as info:
        load_embedding_file(path, list(LABELS))
    assert not _unsafe_advice(str(info.value)) and info.value.__cause__ is None
    assert encode_main(["-d", "777", "--embeddings", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and not _unsafe_advice(err)
    assert not (dataset[1] / CACHE_FILENAME).exists()


def test_damaged_cache_is_named_and_a_failed_write_keeps_the_previous_cache(dataset, tmp_path, monkeypatch):
    import errno
    import os

    import nnunetv2_tak.text.embeddings as embeddings

    _, pre, dataset_json = dataset
    first = torch.randn(4, 2, 8)
    torch.save(first, tmp_path / "first.pt")
    assert encode_main(["-d", "777", "--embeddings", str(tmp_path / "first.pt")]) == 0
    before = {p.name: p.read_bytes() for p in pre.iterdir()}

    def save_halfway(obj, target):  # writes part of the file, then the disk is full
        Path(target).write_bytes(b"PK\x03\x04" + b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    torch.save(torch.randn(4, 2, 8), tmp_path / "second.pt")
    with monkeypatch.context() as patch:
        patch.setattr(embeddings.torch, "save", save_halfway)
        with pytest.raises(TextEmbeddingError, match=rf"could not write the text embedding cache {pre / CACHE_FILENAME}"
                                                     r" \(OSError: \[Errno 28\] No space left on device"):
            embeddings.save_cache(pre, load_embedding_file(tmp_path / "second.pt", list(LABELS)))
    assert {p.name: p.read_bytes() for p in pre.iterdir()} == before  # the previous cache, no temporary left
    torch.testing.assert_close(load_cache(pre).tensor, first)

    cache = pre / CACHE_FILENAME
    cache.write_bytes(cache.read_bytes()[:cache.stat().st_size // 2])
    with pytest.raises(TextEmbeddingError, match=rf"^text embedding cache {cache} is a truncated torch.save archive "
                                                 r".*; delete it and run nnUNetv2_tak_encode_prompts again"):
        dataset_text_embeddings(dataset_json, DATASET, pre)


def test_text_source_is_reported_through_the_given_log(dataset, tmp_path):
    _, pre, dataset_json = dataset
    torch.save(torch.randn(4, 2, 8), tmp_path / "e.pt")
    assert encode_main(["-d", "777", "--embeddings", str(tmp_path / "e.pt")]) == 0
    lines: list[str] = []
    dataset_text_embeddings(dataset_json, DATASET, pre, log=lines.append)
    assert lines == [f"using cached text embeddings: embedding file {tmp_path / 'e.pt'}, shape [4, 2, 8], classes "
                     f"{list(LABELS)}"]
