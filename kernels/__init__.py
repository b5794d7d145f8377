"""tquant.kernels: the quantizer ops (Triton kernels, torch fast path, eager references).

Every op has an eager reference in :mod:`tquant.kernels.reference` (group-wise: ``group_reference``,
FP8: ``fp8_reference``) that defines its numerics;
the torch path and the Triton kernels reproduce it bit for bit. Which implementation runs
is chosen in one place, :mod:`tquant.kernels.backend` (``TQUANT_BACKEND=auto|torch|triton|reference``).
This package imports only torch and numpy (Triton when it is installed; numba, for the CPU host lane's
compiled kernels, on first use when it is installed).
"""

from . import qdq, reference
from .backend import BACKENDS, get_backend, set_backend, use_backend
from .fake_quant import fake_quant, fake_quant_forward, fake_quant_range_grads
from .fp8 import fp8_fake_quant, fp8_update_range
from .group_quant import group_fake_quant, group_minmax, group_update_range
from .range_update import (
    ESTIMATOR_ALL,
    ESTIMATOR_CURRENT,
    ESTIMATOR_RUNNING,
    batch_minmax,
    finalize_range,
    range_workspace,
    update_range,
)
from .reference import EPS, qparams_from_range

__all__ = [
    "BACKENDS",
    "EPS",
    "ESTIMATOR_ALL",
    "ESTIMATOR_CURRENT",
    "ESTIMATOR_RUNNING",
    "batch_minmax",
    "fake_quant",
    "fake_quant_forward",
    "fake_quant_range_grads",
    "finalize_range",
    "fp8_fake_quant",
    "fp8_update_range",
    "get_backend",
    "group_fake_quant",
    "group_minmax",
    "group_update_range",
    "qdq",
    "qparams_from_range",
    "range_workspace",
    "reference",
    "set_backend",
    "update_range",
    "use_backend",
]
