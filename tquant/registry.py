"""Which module class implements each config enum member: filled by the implementing modules.

``config.py`` defines the enums (``RangeEstimators``, ``QMethods``) and must not import the
modules that implement them (they import the config); each implementing class registers itself
instead, as torchao's ``register_quantize_module_handler`` does::

    @register_range_estimator(RangeEstimators.running_minmax)
    class RunningMinMaxEstimator(RangeEstimatorBase): ...

``RangeEstimators.X.cls`` and ``QMethods.X.cls`` look the class up here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

_CLASSES: dict[enum.Enum, type] = {}


def _register(member: enum.Enum) -> Callable[[type], type]:
    def decorator(cls: type) -> type:
        if member in _CLASSES and _CLASSES[member] is not cls:
            raise ValueError(f"{member} is already implemented by {_CLASSES[member].__name__}")
        _CLASSES[member] = cls
        return cls

    return decorator


register_range_estimator = _register
"""Class decorator: the range estimator module of a ``RangeEstimators`` member."""
register_quantizer = _register
"""Class decorator: the quantizer module of a ``QMethods`` member."""


def implementation(member: enum.Enum) -> type:
    """The class registered for ``member``; ``LookupError`` naming it when there is none."""
    try:
        return _CLASSES[member]
    except KeyError:
        raise LookupError(f"no module class is registered for {member}") from None
