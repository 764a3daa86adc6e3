"""ComfyUI plumbing shared by hasten's model-patch nodes: per-sampling-run state and the step index.

Each node keeps its settings in a *holder* under ``model_options["transformer_options"][holder_key]``; an
OUTER_SAMPLE wrapper gives every sampling run its own policy under ``run_key`` (in a cloned options dict,
so nothing leaks into the next run or into other users of the same MODEL) and keeps its statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Start = Callable[[Any, torch.Tensor], tuple[Any, Callable[[], None]]]

# transformer_options entry set by a node that runs a partial batch (EasyCache computing only some rows):
# the original in-chunk row index of each row kept in every chunk, so per-row state below stays per branch.
ROWS_KEY = "hasten_rows"


def batch_rows(topts: dict, batch: int) -> list[tuple[Any, int]] | None:
    """(chunk uuid, in-chunk row) of each row of an ``apply_model`` batch, or None if it cannot be told.

    ComfyUI batches [chunk 0 rows | chunk 1 rows | ...], one equal-sized chunk per cond/uncond entry of
    ``uuids``; a partial batch from an outer hasten node names its original rows under :data:`ROWS_KEY`.
    """
    uuids = list(topts.get("uuids") or [])
    if not uuids or batch % len(uuids) != 0:
        return None
    per = batch // len(uuids)
    inner = list(topts.get(ROWS_KEY) or range(per))
    if len(inner) != per:
        inner = list(range(per))
    return [(uuids[i // per], inner[i % per]) for i in range(batch)]


def rewrap(model: Any, key: str, wrappers: dict[str, Callable]) -> Any:
    """A clone of ``model`` carrying exactly ``wrappers`` (WrappersMP kind -> function) under ``key``: whatever
    an earlier patch put under that key is removed first, so re-patching replaces and never stacks."""
    import comfy.patcher_extension as pe

    m = model.clone()
    for kind in (pe.WrappersMP.OUTER_SAMPLE, pe.WrappersMP.CALC_COND_BATCH, pe.WrappersMP.APPLY_MODEL):
        m.remove_wrappers_with_key(kind, key)
    for kind, fn in wrappers.items():
        m.add_wrapper_with_key(kind, key, fn)
    return m


def scoped_run(executor: Any, args: tuple, kwargs: dict, holder_key: str, run_key: str, start: Start) -> Any:
    """Run one sampling (OUTER_SAMPLE) with fresh per-run state.

    ``start(holder, sigmas)`` returns ``(run, finish)``: ``run`` is visible to the inner wrappers under
    ``transformer_options[run_key]`` for this run only; ``finish()`` runs afterwards, even on error.
    """
    import comfy.model_patcher  # ComfyUI is importable whenever this wrapper runs

    guider = executor.class_obj
    orig = guider.model_options
    holder = orig["transformer_options"][holder_key]
    sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
    run, finish = start(holder, sigmas)
    guider.model_options = comfy.model_patcher.create_model_options_clone(orig)
    guider.model_options["transformer_options"][run_key] = run
    try:
        return executor(*args, **kwargs)
    finally:
        guider.model_options = orig
        finish()


def num_steps_of(sigmas: torch.Tensor) -> int:
    """Steps of a sampling run from its sigma schedule (one fewer than the sigmas)."""
    return max(int(sigmas.shape[-1]) - 1, 1)


def step_index(sample_sigmas: torch.Tensor | None, sigma: torch.Tensor | float, num_steps: int | None = None) -> int:
    """The step a model call belongs to: the largest i with sample_sigmas[i] >= sigma (2nd-order samplers'
    intermediate sigmas map to the step they are part of)."""
    if sample_sigmas is None:
        return 0
    ss = sample_sigmas.detach().double().cpu().flatten()
    s = float(sigma)
    hit = torch.nonzero(ss >= s - 1e-6 * max(1.0, abs(s))).flatten()
    i = int(hit[-1]) if hit.numel() else 0
    return min(i, num_steps - 1) if num_steps else i


def last_run_stats(model: Any, holder_key: str) -> Any:
    """Statistics of the last sampling run of a MODEL patched by a node (None if never run)."""
    holder = model.model_options.get("transformer_options", {}).get(holder_key)
    return holder.last_run if holder is not None else None
