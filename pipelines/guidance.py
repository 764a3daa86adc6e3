"""diffusers adapter for adaptive guidance: a denoiser hook that really drops converged uncond rows.

Two CFG layouts are handled:

* batched (SD 1.5, SDXL, SD3, PixArt): one call with rows ``[uncond..., cond...]``; rows of samples
  whose uncond pass is no longer needed are sliced out before the model runs;
* separate calls under diffusers' ``cache_context`` ("cond" then "uncond": Wan, the embedded model,
  Flux true-CFG): the cond output is kept and the uncond call runs only for the samples that need it.

Dropped uncond rows are answered with the cond output (so CFG reduces to cond exactly) or the LinearAG
estimate. The hook must be the outermost hasten hook: it tells hooks below (EasyCache) which branch
each remaining row is via :class:`row_keys`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..samplers.guidance import (
    AdaptiveGuidance,
    GuidanceConfig,
    GuidanceStats,
    LinearAGCoefficients,
    cache_dir,
    find_coefficients,
    fit_linear_ag,
    model_key,
)
from .denoiser import (
    DenoiserHook,
    branch_keys,
    find_denoisers,
    main_tensor,
    row_keys,
    slice_batch,
    split_input,
)
from .registry import HookFeature, features, install, make_config, uninstall

HOOK_NAME = "hasten_guidance"
PRIORITY = 100  # outermost hasten hook: it drops rows, the hooks below key their state by row


class GuidanceHook(DenoiserHook):
    """Asks :class:`AdaptiveGuidance` per sample whether the uncond row must run, and runs only those."""

    def __init__(self, pipe: Any, config: GuidanceConfig, record: bool = False) -> None:
        super().__init__(pipe)
        self.policy = AdaptiveGuidance(config, record=record)
        self._pending: dict[int, tuple[int, torch.Tensor]] = {}  # item -> (step, cond output) for "uncond" calls

    def on_run_end(self) -> None:
        self.policy.end_run()
        self._pending = {}

    def _start_if_new(self, keys: list) -> None:
        if self.tracker.new_run_needed(keys):
            self.on_run_end()
            self.tracker.start()
            self.policy.begin_run(self.tracker.num_steps)

    def _run(self, module: torch.nn.Module, args: tuple, kwargs: dict, rows: list[int], keys: list,
             batch: int) -> torch.Tensor:
        a, kw = slice_batch(args, kwargs, rows, batch)
        with row_keys(module, [keys[r] for r in rows]):
            result = self.original()(*a, **kw)
        self.packer.learn(result)
        return main_tensor(result)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        x = split_input(args, kwargs)
        batch = x.shape[0]
        keys, _ = branch_keys(self.pipe_ref, self.context.name, batch, module)
        keys = self._infer_cfg_layout(keys, x)
        names = {k[0] for k in keys}
        if names == {"cond", "uncond"}:
            return self._batched(module, args, kwargs, keys, batch)
        if names == {"uncond"}:
            return self._uncond_call(module, args, kwargs, keys, batch)
        # a cond-only call (separate CFG calls, or no CFG at all)
        self._start_if_new(keys)
        steps = self.tracker.steps_for(keys)
        result = self.original()(*args, **kwargs)
        self.packer.learn(result)
        if self.context.name == "cond":
            out = main_tensor(result)
            self._pending = {k[1]: (s, out[i : i + 1]) for i, (k, s) in enumerate(zip(keys, steps))}
        return result

    def _infer_cfg_layout(self, keys: list, x: torch.Tensor) -> list:
        """PixArt-style pipelines keep ``do_classifier_free_guidance`` local: recognise their CFG batch
        ``cat([latents] * 2)`` by its two identical halves."""
        pipe = self.pipe_ref() if self.pipe_ref is not None else None
        batch = x.shape[0]
        if (self.context.name is not None or batch % 2 or any(k[0] != "cond" for k in keys)
                or pipe is None or hasattr(pipe, "do_classifier_free_guidance")):
            return keys
        half = batch // 2
        if not torch.equal(x[:half], x[half:]):
            return keys
        return [("uncond", i) for i in range(half)] + [("cond", i) for i in range(half)]

    def _batched(self, module, args, kwargs, keys, batch) -> Any:
        self._start_if_new(keys)
        steps = self.tracker.steps_for(keys)
        cond_row = {k[1]: i for i, k in enumerate(keys) if k[0] == "cond"}
        uncond_row = {k[1]: i for i, k in enumerate(keys) if k[0] == "uncond"}
        need = {item: self.policy.needs_uncond(item, steps[cond_row[item]]) for item in cond_row}
        if all(need.values()):
            result = self.original()(*args, **kwargs)
            self.packer.learn(result)
            out = main_tensor(result)
            for item, r in cond_row.items():
                self.policy.observe(item, steps[r], out[r : r + 1], out[uncond_row[item] : uncond_row[item] + 1])
            return result
        rows = sorted([uncond_row[i] for i, n in need.items() if n] + list(cond_row.values()))
        sub = self._run(module, args, kwargs, rows, keys, batch)
        got = {r: sub[j : j + 1] for j, r in enumerate(rows)}
        for item, r in cond_row.items():
            cond, ur = got[r], uncond_row[item]
            if need[item]:
                self.policy.observe(item, steps[r], cond, got[ur])
            else:
                got[ur] = self.policy.estimate_uncond(item, steps[r], cond)
                self.policy.observe(item, steps[r], cond, None, got[ur])
        out = torch.cat([got[r] for r in range(batch)], dim=0)
        return self.packer.pack(out, kwargs.get("return_dict"))

    def _uncond_call(self, module, args, kwargs, keys, batch) -> Any:
        items = [k[1] for k in keys]
        if not self._pending or any(i not in self._pending for i in items):
            # an uncond call without a preceding cond call: nothing to decide with, run it as is
            return self.original()(*args, **kwargs)
        self.tracker.steps_for(keys)
        need = {i: self.policy.needs_uncond(i, self._pending[i][0]) for i in items}
        if all(need.values()):
            result = self.original()(*args, **kwargs)
            self.packer.learn(result)
            out = main_tensor(result)
            for j, i in enumerate(items):
                self.policy.observe(i, self._pending[i][0], self._pending[i][1], out[j : j + 1])
            self._pending = {}
            return result
        rows = [j for j, i in enumerate(items) if need[i]]
        got: dict[int, torch.Tensor] = {}
        if rows:
            sub = self._run(module, args, kwargs, rows, keys, batch)
            got = {r: sub[j : j + 1] for j, r in enumerate(rows)}
        for j, i in enumerate(items):
            step, cond = self._pending[i]
            if need[i]:
                self.policy.observe(i, step, cond, got[j])
            else:
                got[j] = self.policy.estimate_uncond(i, step, cond)
                self.policy.observe(i, step, cond, None, got[j])
        self._pending = {}
        out = torch.cat([got[j] for j in range(batch)], dim=0)
        return self.packer.pack(out, kwargs.get("return_dict"))


def _model_dir(pipe: Any) -> str | None:
    path = getattr(getattr(pipe, "config", None), "_name_or_path", None) or getattr(pipe, "name_or_path", None)
    return path if path and Path(path).is_dir() else None


class GuidanceFeature(HookFeature):
    name = "guidance"
    hook_name = HOOK_NAME
    priority = PRIORITY

    def __init__(self, pipe: Any, config: GuidanceConfig, record: bool = False) -> None:
        self.config = config
        super().__init__(pipe, lambda: GuidanceHook(pipe, config, record=record))

    def run_stats(self, hook: GuidanceHook) -> tuple[GuidanceStats | None, GuidanceStats | None]:
        cur = hook.policy.current_stats()
        return (cur if cur.cond_forwards else None), hook.policy.last_run


def denoiser_key(pipe: Any) -> str:
    """The LinearAG calibration key of ``pipe``: a hash of its (first) denoiser's config."""
    den = next(iter(find_denoisers(pipe).values()))
    return model_key(getattr(den, "config", {}))


def enable_adaptive_guidance(pipe: Any, config: GuidanceConfig | None = None, **kwargs: Any) -> Any:
    """Turn on adaptive guidance (settings as in :class:`GuidanceConfig`, e.g. ``threshold``, ``mode``).

    Mode "linear" without ``coefficients`` loads the calibration made by ``hasten calibrate-guidance``
    for this model (next to the model or in the user cache dir) and raises if there is none. The hook
    is (re-)registered outermost so it composes with EasyCache enabled before or after. Returns ``pipe``.
    """
    config = make_config(GuidanceConfig, config, kwargs)
    if config.mode == "linear" and config.coefficients is None:
        key = denoiser_key(pipe)
        coeffs = find_coefficients(key, _model_dir(pipe))
        if coeffs is None:
            raise UnsupportedModelError(
                f"LinearAG needs coefficients calibrated for this model (key {key}); run "
                "`hasten calibrate-guidance` first, or pass coefficients=LinearAGCoefficients(...), or use "
                "mode='ag' / 'truncate', which need no calibration."
            )
        config.coefficients = coeffs
    return install(pipe, "guidance", lambda: GuidanceFeature(pipe, config))


def disable_adaptive_guidance(pipe: Any) -> Any:
    """Remove adaptive guidance; the denoiser's forward is restored exactly. Returns ``pipe``."""
    return uninstall(pipe, "guidance")


def calibrate_pipeline(pipe: Any, runner: Any, seeds: list[int], out: str | Path | None = None,
                       ) -> tuple[LinearAGCoefficients, Path]:
    """Fit LinearAG coefficients for ``pipe``: ``runner(seed)`` runs one full-CFG generation per seed.

    A recording guidance hook (never dropping anything) collects every sample's (cond, uncond)
    trajectory; the least-squares fit is saved to ``out`` or the user cache dir under the model key,
    where ``enable_adaptive_guidance(mode="linear")`` finds it. Returns the coefficients and the path.
    """
    reg = features(pipe)
    if "guidance" in reg:
        raise RuntimeError("disable adaptive guidance before calibrating (calibration needs full CFG runs)")
    feat = GuidanceFeature(pipe, GuidanceConfig(threshold=2.0), record=True)
    try:
        for seed in seeds:
            runner(seed)
        trajectories = []
        for hook in feat.hooks.values():
            hook.policy.end_run()
            trajectories.extend(hook.policy.recorded)
    finally:
        feat.remove()
    if not trajectories:
        raise UnsupportedModelError("calibration saw no CFG denoiser calls: run the pipeline with guidance "
                                    "(guidance_scale > 1 and a negative prompt)")
    key = denoiser_key(pipe)
    coeffs = fit_linear_ag(trajectories, model_key=key)
    path = Path(out) if out is not None else cache_dir() / f"{key}.json"
    coeffs.save(path)
    return coeffs, path
