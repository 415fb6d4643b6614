"""Packaging: the wheel ships the start-up hook, the trainer shim and the prompts; the hook keeps
the user's nnUNet_extTrainer and is idempotent."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from nnunetv2_tak import _discovery

REPO = Path(__file__).resolve().parents[1]


def test_register_appends_once_and_keeps_user_paths():
    env = {"nnUNet_extTrainer": os.pathsep.join(["/my/trainers", "/other"])}
    first = _discovery.register(env)
    assert first.split(os.pathsep) == ["/my/trainers", "/other", _discovery.SHIM_FOLDER]
    assert _discovery.register(env) == first
    assert _discovery.register({}) == _discovery.SHIM_FOLDER


def test_shim_folder_holds_only_the_reexport_module():
    files = sorted(p.name for p in Path(_discovery.SHIM_FOLDER).iterdir() if p.suffix == ".py")
    assert files == ["nnunetv2_tak_trainers.py"]


def test_wheel_contents(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(REPO)], check=True, timeout=300)
    wheel = next(tmp_path.glob("nnunetv2_tak-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "nnunetv2_tak.pth" in names  # at the root of site-packages
        assert zf.read("nnunetv2_tak.pth").decode().startswith("import nnunetv2_tak._discovery")
        assert "nnunetv2_tak/_trainer_shim/nnunetv2_tak_trainers.py" in names
        assert "nnunetv2_tak/prompts/abdomen.json" in names
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for script in ("nnUNetv2_tak_encode_prompts", "nnUNetv2_tak_make_synthetic", "nnUNetv2_tak_shrink_plans"):
        assert script in entry_points
    assert not any(n.startswith("tests/") for n in names)
