"""Found by nnU-Net's external trainer lookup (see nnunetv2_tak/_discovery.py).

Only re-exports: the classes keep their home module in ``nnunetv2_tak.trainers`` so they stay
picklable after nnU-Net removes this shim module from ``sys.modules``.
"""


from nnunetv2_tak.trainers import *
