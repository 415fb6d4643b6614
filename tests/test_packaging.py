"""Packaging: the wheel ships the start-up hook, the trainer shim and the prompts; the hook keeps
the user's nnUNet_extTrainer and is idempotent."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

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


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(REPO)], check=True, timeout=300)
    return next(out.glob("nnunetv2_tak-*.whl"))


def test_wheel_contents(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "nnunetv2_tak.pth" in names  # at the root of site-packages
        assert zf.read("nnunetv2_tak.pth").decode().startswith("import nnunetv2_tak._discovery")
        assert "nnunetv2_tak/_trainer_shim/nnunetv2_tak_trainers.py" in names
        assert "nnunetv2_tak/prompts/abdomen.json" in names
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for script in ("nnUNetv2_tak_encode_prompts", "nnUNetv2_tak_make_synthetic", "nnUNetv2_tak_shrink_plans",
                   "nnUNetv2_tak_make_splits", "nnUNetv2_tak_preprocess_unlabeled", "nnUNetv2_tak_train_torchrun"):
        assert script in entry_points
    assert not any(n.startswith("tests/") for n in names)


def test_installed_wheel_registers_trainers_and_ships_prompts(wheel, tmp_path):
    """A non-editable install: the wheel unpacked into a site directory of its own, whose .pth hook
    alone registers the trainers; the package, shim and prompts all come from that directory."""
    site_dir = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site_dir),
                    str(wheel)], check=True, timeout=300)
    script = textwrap.dedent(f"""
        import os, site, sys
        site.addsitedir({str(site_dir)!r})  # processes nnunetv2_tak.pth like site-packages does
        for path in {[p for p in sys.path if p.endswith("site-packages")]!r}:
            sys.path.append(path)  # torch, nnunetv2, ... (not the source checkout)
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        cls = recursive_find_trainer_class_by_name("nnUNetTrainerTAK")
        import nnunetv2_tak
        from nnunetv2_tak.text.prompts import shipped_prompts_dir
        print("FILE=" + nnunetv2_tak.__file__)
        print("PROMPTS=" + str(shipped_prompts_dir()))
        print("EXT=" + os.environ["nnUNet_extTrainer"])
    """)
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    proc = subprocess.run([sys.executable, "-S", "-c", script], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line and line[:1].isupper())
    assert out["FILE"].startswith(str(site_dir))
    assert out["PROMPTS"] == str(site_dir / "nnunetv2_tak" / "prompts")
    assert out["EXT"] == str(site_dir / "nnunetv2_tak" / "_trainer_shim")
