"""A small byte-level language model for tquant's LM example and benchmark (the face of tquant:
nothing in the core imports it)."""

from __future__ import annotations

from .model import ByteLM, DecodeStep, LMConfig, count_parameters

__all__ = ["ByteLM", "DecodeStep", "LMConfig", "count_parameters"]
