"""Drop third-party import chatter around the export; real warnings pass.

torch.onnx's dynamo exporter logs ``torchvision is not installed. Skipping torchvision::nms`` (and
``roi_align``, ``roi_pool``, ``deform_conv2d``) at WARNING level on every export in a process
without torchvision: its registry of optional op libraries, not anything about the user's model.
:func:`quiet_third_party_logs` puts a filter on the loggers that emit such lines which drops
exactly the "<package> is not installed. Skipping <op>" records and keeps every other record.
"""

from __future__ import annotations

import logging
import re

CHATTY_LOGGERS = ("torch.onnx._internal.exporter._registration",)
"""Loggers whose "not installed, skipping" lines are dropped."""

_NOT_INSTALLED = re.compile(r"\b\w+ is not installed\. Skipping\b")


class NotInstalledFilter(logging.Filter):
    """Drops "<package> is not installed. Skipping <op>" records; passes every other record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed record is someone else's to report
            return True
        return _NOT_INSTALLED.search(message) is None


def quiet_third_party_logs() -> None:
    """Install :class:`NotInstalledFilter` on :data:`CHATTY_LOGGERS` (once; idempotent)."""
    for name in CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, NotInstalledFilter) for f in logger.filters):
            logger.addFilter(NotInstalledFilter())
