"""nnU-Net's per-epoch logger with the TAK terms: loss terms, their weights, pseudo-label coverage,
entropy threshold and per-class pseudo-label share; progress.png gets panels for them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from nnunetv2.training.logging.nnunet_logger import LocalLogger

TAK_KEYS = (
    "tak_sup_loss",  # supervised Dice+CE
    "tak_unsup_loss",  # unweighted pseudo-label loss
    "tak_contrast_loss",  # unweighted text-visual contrastive loss
    "tak_unsup_weight",
    "tak_contrast_weight",
    "tak_entropy_threshold",
    "tak_pl_coverage",  # fraction of unlabeled voxels with a confident pseudo-label
    "tak_pl_share",  # [C] class distribution among confident pseudo-labels
)


class TAKLocalLogger(LocalLogger):
    """nnU-Net's LocalLogger (one value per key and epoch) with the TAK keys and a taller progress.png.

    ``class_names``: the dataset's label names in label-value order (background first), which name the curves of
    the pseudo-label panel; may also be set later as the attribute of that name. Without them the curves are
    "class 0", "class 1", ...
    """

    def __init__(self, verbose: bool = False, class_names: Sequence[str] | None = None):
        super().__init__(verbose)
        self.class_names = list(class_names) if class_names is not None else None
        for key in TAK_KEYS:
            self.my_fantastic_logging[key] = []

    def load_checkpoint(self, checkpoint: dict):
        super().load_checkpoint(checkpoint)
        for key in TAK_KEYS:  # checkpoints of runs without these keys
            self.my_fantastic_logging.setdefault(key, [np.nan] * len(checkpoint.get("train_losses", [])))

    def plot_progress_png(self, output_folder):
        import matplotlib.pyplot as plt
        import seaborn as sns
        from batchgenerators.utilities.file_and_folder_operations import join

        log = self.my_fantastic_logging
        epoch = min(len(v) for v in log.values()) - 1
        if epoch < 0:
            return
        x = list(range(epoch + 1))
        sns.set(font_scale=2.0)
        fig, axes = plt.subplots(5, 1, figsize=(30, 75))

        ax = axes[0]  # nnU-Net's panel
        ax2 = ax.twinx()
        ax.plot(x, log["train_losses"][:epoch + 1], color="b", label="loss_tr (total)", linewidth=4)
        ax.plot(x, log["val_losses"][:epoch + 1], color="r", label="loss_val", linewidth=4)
        ax2.plot(x, log["mean_fg_dice"][:epoch + 1], color="g", ls="dotted", label="pseudo dice", linewidth=3)
        ax2.plot(x, log["ema_fg_dice"][:epoch + 1], color="g", label="pseudo dice (mov. avg.)", linewidth=4)
        ax.set(xlabel="epoch", ylabel="loss")
        ax2.set_ylabel("pseudo dice")
        ax.legend(loc=(0, 1))
        ax2.legend(loc=(0.2, 1))

        ax = axes[1]  # TAK loss terms
        ax2 = ax.twinx()
        for key, color, label in (("tak_sup_loss", "b", "supervised"), ("tak_unsup_loss", "m", "pseudo-label"),
                                  ("tak_contrast_loss", "c", "contrastive")):
            ax.plot(x, log[key][:epoch + 1], color=color, label=f"{label} (unweighted)", linewidth=4)
        ax2.plot(x, log["tak_unsup_weight"][:epoch + 1], color="m", ls="dotted", label="pseudo-label weight",
                 linewidth=3)
        ax2.plot(x, log["tak_contrast_weight"][:epoch + 1], color="c", ls="dotted", label="contrastive weight",
                 linewidth=3)
        ax.set(xlabel="epoch", ylabel="loss term")
        ax2.set_ylabel("weight")
        ax.legend(loc=(0, 1))
        ax2.legend(loc=(0.4, 1))

        ax = axes[2]  # pseudo-label confidence
        ax2 = ax.twinx()
        ax.plot(x, log["tak_pl_coverage"][:epoch + 1], color="k", label="confident voxel fraction", linewidth=4)
        ax2.plot(x, log["tak_entropy_threshold"][:epoch + 1], color="orange", ls="dotted",
                 label="entropy threshold (nats)", linewidth=3)
        ax.set(xlabel="epoch", ylabel="coverage", ylim=(0, 1.02))
        ax2.set_ylabel("threshold")
        ax.legend(loc=(0, 1))
        ax2.legend(loc=(0.4, 1))

        ax = axes[3]  # per-class share of confident pseudo-labels (log scale: organs differ 100-fold)
        shares = [s for s in log["tak_pl_share"][:epoch + 1]]
        width = max((len(s) for s in shares if s is not None and np.ndim(s) == 1), default=0)
        if width:
            table = np.array([s if s is not None and np.ndim(s) == 1 and len(s) == width else [np.nan] * width
                              for s in shares], dtype=float)
            labels = self.curve_labels(width)
            for c in range(width):
                ax.plot(x, np.clip(table[:, c], 1e-6, None), label=labels[c], linewidth=3)
            ax.set_yscale("log")
            ax.legend(loc=(0, 1), ncol=min(width, 8), fontsize="small")
        ax.set(xlabel="epoch", ylabel="share of confident pseudo-labels")

        ax = axes[4]  # epoch time and learning rate
        ax2 = ax.twinx()
        durations = [e - s for e, s in zip(log["epoch_end_timestamps"][:epoch + 1],
                                           log["epoch_start_timestamps"][:epoch + 1], strict=False)]
        ax.plot(x[:len(durations)], durations, color="b", label="epoch duration", linewidth=4)
        ax2.plot(x, log["lrs"][:epoch + 1], color="r", ls="dotted", label="learning rate", linewidth=3)
        ax.set(xlabel="epoch", ylabel="time [s]")
        ax2.set_ylabel("learning rate")
        ax.legend(loc=(0, 1))
        ax2.legend(loc=(0.3, 1))

        plt.tight_layout()
        fig.savefig(join(output_folder, "progress.png"))
        plt.close(fig)

    def curve_labels(self, width: int) -> list[str]:
        """Legend entries of the ``width`` classes of the pseudo-label panel."""
        if self.class_names is None:
            return [f"class {c}" for c in range(width)]
        if len(self.class_names) != width:
            raise ValueError(f"TAKLocalLogger.class_names has {len(self.class_names)} names {self.class_names}, but "
                             f"the logged pseudo-label shares have {width} classes; pass the dataset's label names "
                             "in label-value order, background included")
        return list(self.class_names)
