"""Exceptions shared by every hasten layer."""

from __future__ import annotations


class UnsupportedModelError(ValueError):
    """Raised when an accelerator is asked to run on a model or pipeline it cannot handle.

    The message always names what is supported, so the user knows what to do instead.
    """
