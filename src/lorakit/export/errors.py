"""The error every export refusal raises."""

from __future__ import annotations


class ExportError(ValueError):
    """The adapter or base cannot be exported as asked; the message says why and what to do instead."""
