"""``eager``: ``torch.compiler.disable`` applied on first call, so importing a module stays light."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def eager(fn: F) -> F:
    """Run ``fn`` outside any compiled region; decorating at import would load dynamo (and triton)."""
    compiled: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not compiled:
            import torch

            compiled.append(torch.compiler.disable(fn))
        return compiled[0](*args, **kwargs)

    return wrapper  # type: ignore[return-value]
