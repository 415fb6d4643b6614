"""Prompt libraries: shipped files validate, aliases resolve, missing/malformed prompts give errors
that name the label or file."""

from __future__ import annotations

import json

import pytest

from nnunetv2_tak.text.prompts import (
    PromptError,
    dataset_class_names,
    libraries_for_dataset,
    load_prompt_library,
    normalize_label_name,
    resolve_prompts,
    shipped_prompt_files,
)


@pytest.fixture(scope="module")
def shipped():
    return [load_prompt_library(p) for p in shipped_prompt_files()]


def test_every_shipped_prompt_file_validates(shipped):
    assert shipped, "no prompt file shipped"
    for lib in shipped:
        assert lib.kinds == ("shape", "location")
        for cls in lib.classes:
            for kind in lib.kinds:
                assert len(cls.prompts[kind]) >= 2, (lib.path, cls.name, kind)
                # CLIP's context is 77 tokens: keep sentences short
                assert all(len(s.split()) <= 30 for s in cls.prompts[kind]), (cls.name, kind)


@pytest.mark.parametrize("order", ["amos", "btcv"])
def test_amos_and_btcv_label_orders_resolve_with_background(shipped, order):
    lib = next(lib for lib in shipped if order in lib.label_orders)
    names = lib.label_orders[order]
    assert names[0] == "background"
    assert len(names) == {"amos": 16, "btcv": 14}[order]
    resolved = resolve_prompts(names, shipped)
    assert resolved.matched == names
    # left and right organs must not share prompts
    by_name = dict(zip(resolved.matched, resolved.sentences, strict=True))
    assert by_name["kidney_left"] != by_name["kidney_right"]
    assert by_name["adrenal_gland_left"] != by_name["adrenal_gland_right"]


@pytest.mark.parametrize("label, expected", [
    ("kidney_right", "kidney_right"),
    ("right kidney", "kidney_right"),
    ("Kidney (R)", "kidney_right"),
    ("RK", "kidney_right"),
    ("Left Kidney", "kidney_left"),
    ("adrenal_gland_left", "adrenal_gland_left"),
    ("Right Adrenal Gland", "adrenal_gland_right"),
    ("arota", "aorta"),  # AMOS's dataset.json spelling
    ("postcava", "inferior_vena_cava"),
    ("IVC", "inferior_vena_cava"),
    ("gall bladder", "gallbladder"),
    ("prostate/uterus", "prostate_uterus"),
    ("prostate", "prostate"),
    ("portal vein and splenic vein", "portal_vein_and_splenic_vein"),
    ("urinary_bladder", "urinary_bladder"),
    ("small_bowel", "small_bowel"),
    ("BACKGROUND", "background"),
])
def test_alias_resolution(shipped, label, expected):
    assert resolve_prompts(["background", label], shipped).matched[1] == expected


def test_normalization_ignores_case_punctuation_order_and_side_abbreviations():
    assert normalize_label_name("Kidney (R)") == normalize_label_name("right_kidney") == "kidney right"
    assert normalize_label_name("L. adrenal-gland") == normalize_label_name("adrenal gland left")


def test_label_without_prompt_is_an_error_naming_it(shipped):
    with pytest.raises(PromptError, match=r"\['hepatic tumour', 'spleen_vessel'\].*tak_prompts.json"):
        resolve_prompts(["background", "liver", "hepatic tumour", "spleen_vessel"], shipped)


def _write_library(path, classes, kinds=("shape", "location")):
    path.write_text(json.dumps({"format": "nnunetv2_tak.text.prompts/1", "kinds": list(kinds), "classes": classes}))
    return path


def test_dataset_prompt_file_overrides_and_extends_shipped(tmp_path):
    _write_library(tmp_path / "tak_prompts.json", [
        {"name": "tumour", "aliases": ["hepatic tumour"],
         "prompts": {"shape": ["a round lesion."], "location": ["inside the liver."]}},
        {"name": "liver", "prompts": {"shape": ["our own liver shape."], "location": ["our own liver place."]}},
    ])
    libs = libraries_for_dataset([None, tmp_path])
    resolved = resolve_prompts(["background", "liver", "hepatic tumour"], libs)
    assert resolved.matched == ("background", "liver", "tumour")
    assert resolved.sentences[1] == (("our own liver shape.",), ("our own liver place.",))
    assert resolved.sources[0].endswith("abdomen.json") and resolved.sources[1].endswith("tak_prompts.json")


@pytest.mark.parametrize("bad_class, message", [
    ({"name": "liver", "prompts": {"shape": ["x"]}}, r"class 'liver'.*missing \['location'\]"),
    ({"name": "liver", "prompts": {"shape": ["x"], "location": []}}, r"class 'liver', kind 'location'"),
    ({"prompts": {"shape": ["x"], "location": ["y"]}}, r"class #0 has no 'name'"),
])
def test_malformed_prompt_file_errors_name_file_and_class(tmp_path, bad_class, message):
    path = _write_library(tmp_path / "bad.json", [bad_class])
    with pytest.raises(PromptError, match=message) as info:
        load_prompt_library(path)
    assert str(path) in str(info.value)


def test_alias_collision_is_rejected(tmp_path):
    p = {"shape": ["x"], "location": ["y"]}
    path = _write_library(tmp_path / "dup.json", [{"name": "a", "aliases": ["RK"], "prompts": p},
                                                  {"name": "b", "aliases": ["rk"], "prompts": p}])
    with pytest.raises(PromptError, match="'rk' of class 'b' is also used by class 'a'"):
        load_prompt_library(path)


def test_dataset_class_names_order_and_unsupported_labels():
    labels = {"background": 0, "liver": 2, "spleen": 1, "ignore": 3}
    assert dataset_class_names({"labels": labels}) == ["background", "spleen", "liver"]
    with pytest.raises(ValueError, match="region-based labels \\['whole'\\]"):
        dataset_class_names({"labels": {"background": 0, "whole": [1, 2], "core": 2}})
    with pytest.raises(ValueError, match="consecutive"):
        dataset_class_names({"labels": {"background": 0, "liver": 2}})


def test_prompt_digest_changes_with_any_sentence(shipped):
    a = resolve_prompts(["background", "liver"], shipped)
    b = resolve_prompts(["background", "spleen"], shipped)
    assert a.digest() != b.digest()
    assert a.digest() == resolve_prompts(["background", "liver"], shipped).digest()
