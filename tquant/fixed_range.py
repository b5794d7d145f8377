"""A quantizer with a range fixed by the op, not by the data: softmax probabilities on the 1/2^b grid.

onnxruntime's ``QLinearSoftmax`` requantizes with an integer reciprocal of the output scale
(``floor(1 / y_scale)``): any scale whose reciprocal is not an integer moves codes by one in a large
share of the outputs (seen: agreement with PyTorch 63 % at a transformer's logits). A probability
quantized with scale ``1 / 2^b`` and zero point 0 (range ``[0, (2^b - 1) / 2^b]``; 1/256 at 8 bits,
what onnxruntime's own quantizer and TFLite give a softmax) is requantized exactly.

:class:`FixedRangeQuantizationManager` holds such a range from construction on; the state helpers
(``estimate_ranges``, ``learn_ranges``, ``reset_act_ranges``...) leave it fixed.
"""

from __future__ import annotations

from .quantization_manager import QuantizationManager

__all__ = ["FixedRangeQuantizationManager", "probability_quantizer"]


class FixedRangeQuantizationManager(QuantizationManager):
    """A :class:`~tquant.QuantizationManager` whose range ``[x_min, x_max]`` never changes."""

    def __init__(self, x_min: float, x_max: float, **kwargs):
        super().__init__(x_min=x_min, x_max=x_max, **kwargs)
        self._fixed = (x_min, x_max)

    def estimate_ranges(self) -> None:
        self.fix_ranges()

    def estimate_ranges_train(self) -> None:
        self.fix_ranges()

    def learn_ranges(self) -> None:
        self.fix_ranges()

    def reset_ranges(self) -> None:
        self.set_quant_range(*self._fixed)
        self.fix_ranges()


def probability_quantizer(manager: QuantizationManager) -> FixedRangeQuantizationManager:
    """A fixed-range replacement of ``manager`` (same method and bits) for values in ``[0, 1]``: scale ``2^-b``."""
    n_bits = manager.n_bits
    return FixedRangeQuantizationManager(
        0.0, (2**n_bits - 1) / 2**n_bits, qmethod=manager.qmethod, qparams=dict(manager.qparams),
    ).to(manager.quantizer._delta.device)
