"""Exceptions shared by every hasten layer."""

from __future__ import annotations


class UnsupportedModelError(ValueError):
    """Raised when an accelerator is asked to run on a model or pipeline it cannot handle.

    The message always names what is supported, so the user knows what to do instead.
    """


class QuantFileError(ValueError):
    """A quantized checkpoint that cannot be used (unreadable, corrupted, tampered with, or made for another
    model), or a quantized model asked to save itself in a format that could not be read back. Raised
    before the model is touched: a failed load leaves it exactly as it was."""
