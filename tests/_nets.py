"""Small nnU-Net backbones and configuration managers for network tests (no planning needed)."""

from __future__ import annotations

from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

_NORM = {2: "torch.nn.InstanceNorm2d", 3: "torch.nn.InstanceNorm3d"}
_CONV = {2: "torch.nn.Conv2d", 3: "torch.nn.Conv3d"}
ARCH = {
    "plain": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "resenc": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
}


def configuration_manager(arch: str, dim: int, features=(8, 16, 32, 64), extra: dict | None = None
                          ) -> ConfigurationManager:
    """A configuration as nnU-Net's planners write it (4 stages, tiny widths)."""
    n = len(features)
    kwargs = {
        "n_stages": n,
        "features_per_stage": list(features),
        "conv_op": _CONV[dim],
        "kernel_sizes": [[3] * dim] * n,
        "strides": [[1] * dim] + [[2] * dim] * (n - 1),
        "n_conv_per_stage_decoder": [1] * (n - 1),
        "conv_bias": True,
        "norm_op": _NORM[dim],
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    kwargs["n_conv_per_stage" if arch == "plain" else "n_blocks_per_stage"] = [1] * n
    cfg = {
        "patch_size": [32] * dim,
        "architecture": {
            "network_class_name": ARCH[arch],
            "arch_kwargs": kwargs,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
    }
    cfg.update(extra or {})
    return ConfigurationManager(cfg)
