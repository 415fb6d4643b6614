"""progress.png's pseudo-label panel names each curve after its class."""

from __future__ import annotations

import matplotlib
import pytest

from nnunetv2_tak.trainers.progress import TAKLocalLogger

matplotlib.use("Agg")

NAMES = ["background", "liver", "kidney_right"]


def _logged(logger: TAKLocalLogger, epochs: int = 2) -> TAKLocalLogger:
    for epoch in range(epochs):
        for key, value in (("train_losses", 1.0), ("val_losses", 1.0), ("mean_fg_dice", 0.5), ("ema_fg_dice", 0.5),
                           ("dice_per_class_or_region", [0.5, 0.5]), ("lrs", 0.01), ("tak_sup_loss", 1.0),
                           ("tak_unsup_loss", 0.5), ("tak_contrast_loss", 0.2), ("tak_unsup_weight", 0.1),
                           ("tak_contrast_weight", 0.1), ("tak_entropy_threshold", 0.5), ("tak_pl_coverage", 0.8),
                           ("tak_pl_share", [0.9, 0.08, 0.02]), ("epoch_start_timestamps", float(epoch)),
                           ("epoch_end_timestamps", epoch + 1.0)):
            logger.log(key, value, epoch)
    return logger


def _legend_of_pseudo_label_panel(logger: TAKLocalLogger, folder, monkeypatch) -> list[str]:
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig) or close(fig))
    logger.plot_progress_png(str(folder))
    assert (folder / "progress.png").is_file()
    return [text.get_text() for text in figures[-1].axes[3].get_legend().get_texts()]


def test_pseudo_label_curves_carry_the_class_names(tmp_path, monkeypatch):
    logger = _logged(TAKLocalLogger())
    assert _legend_of_pseudo_label_panel(logger, tmp_path, monkeypatch) == ["class 0", "class 1", "class 2"]
    logger.class_names = NAMES  # as an attribute, or as the constructor's argument
    assert _legend_of_pseudo_label_panel(logger, tmp_path, monkeypatch) == NAMES
    assert TAKLocalLogger(class_names=NAMES).curve_labels(3) == NAMES
    with pytest.raises(ValueError, match=r"2 names \['background', 'liver'\], but the logged pseudo-label shares "
                                         "have 3 classes"):
        TAKLocalLogger(class_names=NAMES[:2]).curve_labels(3)
