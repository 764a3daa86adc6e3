"""Task quality of the embedded model: prompted-digit accuracy and Fréchet distance on a per-class sample."""

from __future__ import annotations

from typing import Any

from . import DEFAULT_GUIDANCE, DEFAULT_STEPS, generate_digits


def evaluate_digits(
    pipe: Any,
    per_class: int = 10,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    batch: int = 50,
) -> dict[str, Any]:
    """Generate ``per_class`` images of each digit 0..9 and score them with :mod:`hasten.metrics`."""
    import torch

    from ..metrics import digit_accuracy, frechet_distance

    digits = [d for d in range(10) for _ in range(per_class)]
    images = torch.cat(
        [
            generate_digits(pipe, digits[i : i + batch], seed=seed + i, steps=steps, guidance=guidance)
            for i in range(0, len(digits), batch)
        ]
    )
    acc = digit_accuracy(images, digits)
    return {
        "accuracy": acc["accuracy"],
        "per_class": acc["per_class"],
        "frechet": frechet_distance(images),
        "samples": len(digits),
        "steps": steps,
        "guidance": guidance,
    }
