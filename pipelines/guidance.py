"""diffusers adapter for adaptive guidance: a denoiser hook that really drops converged uncond work.

Branches come from the call pattern (:class:`hasten.pipelines.denoiser.CallPattern`), so every CFG
layout diffusers uses is handled:

* batched rows ``[uncond..., cond...]`` (SD 1.5, SDXL, SD3, PixArt, CogVideoX/LTX/Mochi under
  ``cache_context("cond_uncond")``, AnimateDiff's frame-folded batch, Z-Image's ``[cond, uncond]`` list):
  the uncond rows of samples that no longer need them are sliced out before the model runs; PAG's
  ``[uncond, cond, perturbed]`` keeps its perturbed rows (all samples decide together, PAG's processors
  switch to their no-CFG variant for that call);
* separate calls, cond first then uncond in the same step: ``cache_context`` "cond"/"uncond" (Wan, Flux
  true-CFG, Qwen-Image), guider identifiers "pred_cond"/"pred_uncond" (HunyuanImage 2.1, MotifVideo), or
  two calls on the same latent without any context (Chroma, Lumina2, Flux ControlNet/Kontext, Cosmos):
  the uncond CALL is skipped for the samples that no longer need it.

Dropped uncond predictions are answered with the cond output (so the pipeline's own CFG reduces to cond
exactly) or the LinearAG estimate. A batch whose unconditional rows cannot be told apart
(InstructPix2Pix's 3-way batch) raises :class:`UnsupportedModelError`; a run without any uncond branch
(CFG off, distilled models) logs a warning once. The hook is the outermost hasten hook: it tells hooks
below it (EasyCache) which branch each remaining row is via :class:`row_keys`.
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
    CallInfo,
    DenoiserHook,
    find_denoisers,
    in_flight,
    log,
    main_tensor,
    pag_rows_without_cfg,
    row_keys,
    slice_batch,
)
from .registry import HookFeature, features, install, make_config, uninstall

HOOK_NAME = "hasten_guidance"
PRIORITY = 100  # outermost hasten hook: it drops rows, the hooks below key their state by row


class GuidanceHook(DenoiserHook):
    """Asks :class:`AdaptiveGuidance` per sample whether the uncond branch must run, and runs only those.

    Layouts (see :class:`hasten.pipelines.denoiser.CallPattern`): batched rows ``[uncond, cond]`` (and
    PAG's ``[uncond, cond, perturbed]``: the perturbed rows always run), or a cond call followed by an
    uncond call in the same step (``cache_context`` "cond"/"uncond", guider "pred_cond"/"pred_uncond",
    or two calls on the same latent). A dropped uncond is answered with the cond output (CFG then
    yields cond exactly) or the LinearAG estimate.
    """

    def __init__(self, pipe: Any, config: GuidanceConfig, record: bool = False) -> None:
        super().__init__(pipe)
        self.policy = AdaptiveGuidance(config, record=record)
        self._pending: dict[int, tuple[int, torch.Tensor]] = {}  # item -> (step, cond output) of this step
        self._run_info: dict[str, Any] = {}

    def on_run_start(self, num_steps: int | None) -> None:
        self.policy.begin_run(num_steps)
        self._pending = {}
        self._run_info = {"uncond_seen": False, "warned": False, "reported": False, "max_step": 0}

    def on_run_end(self) -> None:
        self._warn_no_cfg()
        self.report()
        self.policy.end_run()
        self._pending = {}

    # -- logging --------------------------------------------------------------------------------
    def _warn_no_cfg(self) -> None:
        ri = self._run_info
        if ri and not ri["uncond_seen"] and not ri["warned"] and ri["max_step"] >= 1:
            ri["warned"] = True
            log.warning("hasten adaptive guidance does nothing on %s in this run: the pipeline runs no "
                        "unconditional branch (guidance_scale <= 1, CFG switched off, or a guidance-distilled "
                        "model)", self.pattern.pipe_name)

    def report(self) -> None:
        ri = self._run_info
        st = self.policy.current_stats()
        if not ri or ri["reported"] or not st.cond_forwards:
            return
        ri["reported"] = True
        log.info("hasten adaptive guidance (%s) on %s: %d/%d cond+uncond rows computed, %d uncond rows dropped "
                 "(%.0f%% saved)", self.policy.config.mode, self.pattern.pipe_name, st.forwards,
                 st.baseline_forwards, st.baseline_forwards - st.forwards, 100 * st.saved_fraction)

    # -- calls ----------------------------------------------------------------------------------
    def _run(self, module: torch.nn.Module, args: tuple, kwargs: dict, rows: list[int], keys: list,
             batch: int) -> torch.Tensor:
        a, kw = slice_batch(args, kwargs, rows, batch)
        with row_keys(module, [keys[r] for r in rows]):
            result = self.original()(*a, **kw)
        self.packer.learn(result)
        return main_tensor(result)

    def _full(self, module: torch.nn.Module, args: tuple, kwargs: dict, keys: list) -> Any:
        with row_keys(module, keys):
            result = self.original()(*args, **kwargs)
        self.packer.learn(result)
        return result

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        with in_flight(self):
            info = self.identify(module, args, kwargs)
            self._run_info["max_step"] = max(self._run_info.get("max_step", 0), info.step)
            if info.step >= 1 and info.position == 0:
                self._warn_no_cfg()
            out = self._forward(module, info, args, kwargs)
            if self.pattern.last_call(info):
                self.report()
            return out

    def _forward(self, module: torch.nn.Module, info: CallInfo, args: tuple, kwargs: dict) -> Any:
        keys = info.keys
        names = {k[0] for k in keys}
        if "uncond" in names:
            self._run_info["uncond_seen"] = True
        unknown = sorted(n for n in names if n.startswith("part"))
        if unknown:
            raise UnsupportedModelError(
                f"adaptive guidance cannot tell which rows of {info.pipe_name}'s {len(unknown)}-way guidance batch "
                "are the unconditional ones (e.g. InstructPix2Pix's [text, image, none]); it supports batched "
                "[uncond, cond] (and PAG's [uncond, cond, perturbed]), cache_context/guider 'cond'/'uncond' calls "
                "and sequential cond-then-uncond calls. EasyCache still works on this pipeline.")
        if "uncond" in names and names != {"uncond"}:
            return self._batched(module, args, kwargs, info)
        if names == {"uncond"}:
            return self._uncond_call(module, args, kwargs, info)
        result = self._full(module, args, kwargs, keys)
        if names == {"cond"}:  # a cond call: its output answers a following uncond call of this step
            out = main_tensor(result)
            self._pending = {k[1]: (info.step, out[i : i + 1]) for i, k in enumerate(keys)}
        return result

    def _batched(self, module: torch.nn.Module, args: tuple, kwargs: dict, info: CallInfo) -> Any:
        keys, step = info.keys, info.step
        batch = len(keys)
        cond_row = {k[1]: i for i, k in enumerate(keys) if k[0] == "cond"}
        uncond_row = {k[1]: i for i, k in enumerate(keys) if k[0] == "uncond"}
        if set(uncond_row) - set(cond_row):
            raise UnsupportedModelError(f"adaptive guidance: {info.pipe_name} batches uncond rows without matching "
                                        "cond rows; cannot pair them")
        need = {item: self.policy.needs_uncond(item, step) for item in uncond_row}
        pag = any(k[0] == "perturbed" for k in keys)
        if pag and any(need.values()):  # PAG's processors split the batch in equal parts: all items or none
            need = dict.fromkeys(need, True)
        if all(need.values()):
            result = self._full(module, args, kwargs, keys)
            out = main_tensor(result)
            for item, r in uncond_row.items():
                c = cond_row[item]
                self.policy.observe(item, step, out[c : c + 1], out[r : r + 1])
            return result
        dropped = {uncond_row[i] for i, n in need.items() if not n}
        rows = [r for r in range(batch) if r not in dropped]
        if pag:
            with pag_rows_without_cfg(info.pipe, module):
                sub = self._run(module, args, kwargs, rows, keys, batch)
        else:
            sub = self._run(module, args, kwargs, rows, keys, batch)
        got = {r: sub[j : j + 1] for j, r in enumerate(rows)}
        for item, ur in uncond_row.items():
            cond = got[cond_row[item]]
            if need[item]:
                self.policy.observe(item, step, cond, got[ur])
            else:
                got[ur] = self.policy.estimate_uncond(item, step, cond)
                self.policy.observe(item, step, cond, None, got[ur])
        out = torch.cat([got[r] for r in range(batch)], dim=0)
        return self.packer.pack(out, kwargs.get("return_dict"))

    def _uncond_call(self, module: torch.nn.Module, args: tuple, kwargs: dict, info: CallInfo) -> Any:
        keys, step = info.keys, info.step
        batch = len(keys)
        items = [k[1] for k in keys]
        pending = {i: v for i, v in self._pending.items() if v[0] == step}
        if any(i not in pending for i in items):
            # an uncond call without a cond call before it in this step: nothing to decide with, run it as is
            return self._full(module, args, kwargs, keys)
        need = {i: self.policy.needs_uncond(i, step) for i in items}
        if all(need.values()):
            result = self._full(module, args, kwargs, keys)
            out = main_tensor(result)
            for j, i in enumerate(items):
                self.policy.observe(i, step, pending[i][1], out[j : j + 1])
            self._pending = {}
            return result
        rows = [j for j, i in enumerate(items) if need[i]]
        got: dict[int, torch.Tensor] = {}
        if rows:
            sub = self._run(module, args, kwargs, rows, keys, batch)
            got = {r: sub[j : j + 1] for j, r in enumerate(rows)}
        for j, i in enumerate(items):
            cond = pending[i][1]
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
