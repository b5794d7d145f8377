"""Exceptions raised by tquant. Every message names the layer and the field at fault."""

from __future__ import annotations


class QuantizerNotInitializedError(RuntimeError):
    """A quantizer was used (or fixed) before any range was estimated or set.

    ``layer`` names the quantizer (its path in the model, e.g. ``"fc1.activation_quantizer"``).
    """

    def __init__(self, layer: str = "", hint: str = ""):
        where = f" in layer '{layer}'" if layer else ""
        hint = hint or (
            "run a training forward (estimate_ranges_train) or calibrate with estimate_ranges() "
            "before evaluating, fixing or exporting"
        )
        super().__init__(f"Quantizer has not been initialized yet{where}: {hint}")
        self.layer = layer


class QuantizationConfigError(ValueError):
    """A configuration value is out of range or of the wrong kind (names the field)."""
