"""Shrink an nnU-Net plans file for CPU runs (quickstart, tests, CPU benchmark profiles).

Changes only the network width, and optionally batch and patch size, of one configuration; the
preprocessed data stays valid (the data identifier is kept), so no re-preprocessing is needed.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def shrink_configuration(plans: dict, configuration: str, base_features: int = 8, max_features: int = 64,
                         batch_size: int | None = None, patch_size: Sequence[int] | None = None) -> dict:
    """Edit ``plans`` in place: features_per_stage = min(base * 2**i, max); return the configuration."""
    if configuration not in plans["configurations"]:
        raise KeyError(f"configuration '{configuration}' is not in the plans; available: "
                       f"{list(plans['configurations'])}")
    cfg = plans["configurations"][configuration]
    if "architecture" not in cfg:
        raise ValueError(f"configuration '{configuration}' inherits its architecture; shrink its parent instead")
    arch = cfg["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [min(base_features * 2 ** i, max_features) for i in range(arch["n_stages"])]
    if batch_size is not None:
        cfg["batch_size"] = int(batch_size)
    if patch_size is not None:
        patch_size = [int(p) for p in patch_size]
        strides = np.prod(np.array(arch["strides"]), axis=0)
        if len(patch_size) != len(strides) or any(p % int(s) for p, s in zip(patch_size, strides, strict=True)):
            raise ValueError(f"patch size {patch_size} must have {len(strides)} dims, each divisible by "
                             f"the network's total stride {strides.tolist()}")
        cfg["patch_size"] = patch_size
    return cfg


def shrink_plans_file(plans_file: str | os.PathLike, configuration: str, output_plans_name: str | None = None,
                      **kwargs) -> Path:
    """Shrink a configuration of ``plans_file``; write in place or as ``<output_plans_name>.json`` beside it."""
    plans_file = Path(plans_file)
    plans = json.loads(plans_file.read_text())
    shrink_configuration(plans, configuration, **kwargs)
    target = plans_file
    if output_plans_name:
        plans["plans_name"] = output_plans_name
        target = plans_file.with_name(f"{output_plans_name}.json")
    target.write_text(json.dumps(plans, indent=4))
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nnUNetv2_tak_shrink_plans", description=__doc__)
    p.add_argument("plans_file", help="e.g. $nnUNet_preprocessed/Dataset501_X/nnUNetPlans.json")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("--base-features", type=int, default=8)
    p.add_argument("--max-features", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--patch-size", type=int, nargs="+", default=None)
    p.add_argument("-o", "--output-plans-name", default=None, help="write a copy under this plans name")
    a = p.parse_args(argv)
    target = shrink_plans_file(a.plans_file, a.configuration, a.output_plans_name, base_features=a.base_features,
                               max_features=a.max_features, batch_size=a.batch_size, patch_size=a.patch_size)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
