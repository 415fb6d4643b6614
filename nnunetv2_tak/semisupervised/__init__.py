"""The semi-supervised machinery, free of nnU-Net's trainer: the EMA teacher, its noise, ramps and
pseudo-labels (``teacher``) and the loss terms (``losses``: GALoss, GADice, the text-visual contrastive term)."""
