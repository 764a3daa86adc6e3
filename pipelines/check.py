"""``hasten.check(pipe)``: which accelerators will engage on a pipeline, and why not — before any GPU time.

Nothing here runs the model. The report combines static facts (denoiser components, how the pipeline
lays out its CFG branches, whether attention goes through diffusers' dispatcher, packed latents, the
scheduler, the quantizable linear layers) with each feature's own validation: the feature is enabled
and at once disabled again (hooks and scheduler patches are installed and removed; nothing runs), and
an :class:`~hasten.errors.UnsupportedModelError` it raises is the reason reported. Quantization is
predicted from the linear layers alone (quantizing would cost real time and memory). A feature the
user already enabled is reported as such and left untouched.

    report = hasten.check(pipe)
    print(report)                  # a table
    report.to_dict()               # for JSON
    report.will_engage("easycache")

``check_path(path)`` loads a local diffusers model folder (``local_files_only``, on CPU, the denoiser
weights are loaded too) and checks it.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UnsupportedModelError

READY, UNSUPPORTED, ENABLED, ERROR = "ready", "unsupported", "enabled", "error"
FEATURES = ("easycache", "adaptive_guidance", "sparse_attention", "quantization", "bottleneck", "block_cache")
# registry name of each feature (hasten.stats keys) and its enable/disable pipeline methods
_REGISTRY = {"easycache": "easycache", "adaptive_guidance": "guidance", "sparse_attention": "sparse_attention",
             "quantization": "quant", "bottleneck": "bottleneck", "block_cache": "delta_dit"}


@dataclass
class FeatureCheck:
    """The prediction for one feature: ``status`` is ready / unsupported / enabled / error."""

    feature: str
    status: str
    reason: str = ""

    @property
    def engages(self) -> bool:
        return self.status in (READY, ENABLED)

    def to_dict(self) -> dict[str, str]:
        return {"feature": self.feature, "status": self.status, "reason": self.reason}


@dataclass
class CheckReport:
    """What :func:`check` found: facts about the pipeline and one :class:`FeatureCheck` per feature."""

    pipeline: str
    facts: dict[str, Any] = field(default_factory=dict)
    features: dict[str, FeatureCheck] = field(default_factory=dict)

    def will_engage(self, feature: str) -> bool:
        """True if ``feature`` (a name of :data:`FEATURES`) is predicted to engage on this pipeline."""
        if feature not in self.features:
            raise KeyError(f"unknown feature {feature!r}; known: {list(self.features)}")
        return self.features[feature].engages

    def to_dict(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "facts": dict(self.facts),
                "features": {k: v.to_dict() for k, v in self.features.items()}}

    def table(self) -> str:
        """Markdown: the facts, then one row per feature."""
        lines = [f"hasten check: {self.pipeline}", "", "| fact | value |", "|---|---|"]
        for k, v in self.facts.items():
            lines.append(f"| {k} | {_cell(v)} |")
        lines += ["", "| feature | will engage | why / why not |", "|---|---|---|"]
        for f in self.features.values():
            mark = {READY: "yes", ENABLED: "yes (already enabled)", UNSUPPORTED: "no", ERROR: "no (error)"}
            lines.append(f"| {f.feature} | {mark.get(f.status, f.status)} | {_cell(f.reason)} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _cell(v: Any) -> str:
    if isinstance(v, dict):
        v = ", ".join(f"{k}: {x}" for k, x in v.items())
    elif isinstance(v, (list, tuple)):
        v = ", ".join(str(x) for x in v)
    return " ".join(str(v).split()).replace("|", "/")


# --------------------------------------------------------------------------- static facts
def _call_source(pipe: Any) -> str:
    try:
        return inspect.getsource(type(pipe).__call__)
    except (OSError, TypeError):
        return ""


def cfg_layout(pipe: Any) -> str:
    """How the pipeline's ``__call__`` lays out guidance branches, read from its source (no run)."""
    src = _call_source(pipe)
    comps = getattr(pipe, "components", {}) or {}
    kinds = []
    if comps.get("guider") is not None or "self.guider" in src:
        kinds.append("guider component")
    if "perturbed" in src or "pag_scale" in src:
        kinds.append("PAG extra branch")
    if re.search(r"cache_context\(\s*[\"']uncond", src):
        kinds.append("sequential cond/uncond calls under cache_context")
    elif re.search(r"cache_context\(\s*[\"']cond_uncond", src):
        kinds.append("batched [uncond, cond] under cache_context")
    elif re.search(r"\[\s*\w*latent\w*\s*\]\s*\*\s*2|\]\s*\*\s*2\s*\)|\.repeat\(\s*2", src):
        kinds.append("batched [uncond, cond]")
    else:
        calls = len(re.findall(r"self\.(?:transformer|unet|transformer_2)\s*\(", src))
        if calls >= 2 and ("negative" in src or "uncond" in src):
            kinds.append("sequential cond/uncond calls")
    if "true_cfg_scale" in src:
        kinds.append("true-CFG option (negative prompt)")
    return "; ".join(kinds) if kinds else "no CFG pattern recognised"


def attention_routes(denoisers: dict[str, torch.nn.Module]) -> dict[str, int]:
    """Attention processors by route: diffusers' dispatcher, torch SDPA directly, or other."""
    routes = {"dispatcher": 0, "sdpa": 0, "other": 0}
    for den in denoisers.values():
        procs = getattr(den, "attn_processors", None)
        if not isinstance(procs, dict):
            continue
        for proc in procs.values():
            names = set(getattr(getattr(type(proc).__call__, "__code__", None), "co_names", ()))
            inner = getattr(proc, "inner", None)  # a wrapper (e.g. hasten's own) around an original processor
            if inner is not None:
                names |= set(getattr(getattr(type(inner).__call__, "__code__", None), "co_names", ()))
            if "dispatch_attention_fn" in names:
                routes["dispatcher"] += 1
            elif "scaled_dot_product_attention" in names:
                routes["sdpa"] += 1
            else:
                routes["other"] += 1
    return routes


def quantizable_linears(denoisers: dict[str, torch.nn.Module]) -> tuple[int, int]:
    """(nn.Linear layers in the denoisers, of which kept in high precision by the default rules)."""
    from ..quant import DEFAULT_KEEP_PATTERNS

    total = kept = 0
    for den in denoisers.values():
        for name, mod in den.named_modules():
            if isinstance(mod, torch.nn.Linear):
                total += 1
                low = name.lower()
                if any(re.search(p, low) for p in DEFAULT_KEEP_PATTERNS):
                    kept += 1
    return total, kept


def _facts(pipe: Any, denoisers: dict[str, torch.nn.Module]) -> dict[str, Any]:
    sched = getattr(pipe, "scheduler", None)
    facts: dict[str, Any] = {
        "denoisers": {k: type(v).__name__ for k, v in denoisers.items()} or "none found",
        "CFG layout": cfg_layout(pipe),
        "scheduler": type(sched).__name__ if sched is not None else "none",
    }
    if sched is not None and hasattr(sched, "set_timesteps"):
        params = inspect.signature(sched.set_timesteps).parameters
        facts["scheduler accepts custom sigmas"] = "sigmas" in params
    facts["packed latents"] = hasattr(type(pipe), "_pack_latents")
    facts["attention processors"] = attention_routes(denoisers)
    total, kept = quantizable_linears(denoisers)
    facts["linear layers"] = f"{total} ({kept} kept in high precision by default rules)"
    return facts


# --------------------------------------------------------------------------- the features' own validation
def _trial(pipe: Any, feature: str) -> FeatureCheck:
    """Enable ``feature`` with default settings and disable it again at once; no model call."""
    from . import blockcache, bottleneck, easycache, guidance, sparse_attention

    enable, disable = {
        "easycache": (easycache.enable_easycache, easycache.disable_easycache),
        "adaptive_guidance": (guidance.enable_adaptive_guidance, guidance.disable_adaptive_guidance),
        "sparse_attention": (sparse_attention.enable_sparse_attention, sparse_attention.disable_sparse_attention),
        "bottleneck": (bottleneck.enable_bottleneck_sampling, bottleneck.disable_bottleneck_sampling),
        "block_cache": (blockcache.enable_delta_dit, blockcache.disable_delta_dit),  # Δ-DiT and ProfilingDiT
    }[feature]
    try:
        enable(pipe)
    except UnsupportedModelError as exc:
        return FeatureCheck(feature, UNSUPPORTED, str(exc))
    except Exception as exc:  # noqa: BLE001 - reported, never raised: check() must not fail
        return FeatureCheck(feature, ERROR, f"{type(exc).__name__}: {exc}")
    finally:
        try:
            disable(pipe)
        except Exception:  # noqa: BLE001 - nothing was installed
            pass
    return FeatureCheck(feature, READY, "")


def _reason_ready(feature: str, facts: dict[str, Any]) -> str:
    if feature in ("easycache", "adaptive_guidance"):
        den = facts["denoisers"]
        where = ", ".join(den) if isinstance(den, dict) else den
        tail = "" if feature == "easycache" else " (needs CFG at call time: guidance_scale > 1 / a negative prompt)"
        return f"hooks the denoiser forward of {where}; CFG layout: {facts['CFG layout']}{tail}"
    if feature == "sparse_attention":
        r = facts["attention processors"]
        from ..kernels.adaspa import AdaSpaConfig

        d = AdaSpaConfig()
        return (f"attention processors: {r['dispatcher']} via the dispatcher, {r['sdpa']} via SDPA, {r['other']} other; "
                f"engages on sequences >= min_seq_len (default {d.min_seq_len} tokens) after warmup_steps "
                f"(default {d.warmup_steps})")
    if feature == "bottleneck":
        return f"scheduler {facts['scheduler']}; packed latents: {facts['packed latents']}"
    return ""


def check(pipe: Any) -> CheckReport:
    """Predict, without running the model, which hasten features will engage on ``pipe`` and why not."""
    from .denoiser import find_denoisers
    from .registry import features as enabled_features

    report = CheckReport(type(pipe).__name__)
    try:
        denoisers = find_denoisers(pipe)
        no_denoiser = ""
    except UnsupportedModelError as exc:
        denoisers, no_denoiser = {}, str(exc)
    report.facts = _facts(pipe, denoisers)
    on = enabled_features(pipe) if denoisers else {}
    for feature in FEATURES:
        if _REGISTRY[feature] in on:
            report.features[feature] = FeatureCheck(feature, ENABLED, "already enabled on this pipeline")
            continue
        if no_denoiser:
            report.features[feature] = FeatureCheck(feature, UNSUPPORTED, no_denoiser)
            continue
        if feature == "quantization":
            total, kept = quantizable_linears(denoisers)
            if total - kept > 0:
                fc = FeatureCheck(feature, READY, f"{total - kept} of {total} nn.Linear layers will be quantized "
                                  "(more may be kept by the error budget)")
            else:
                fc = FeatureCheck(feature, UNSUPPORTED, f"no quantizable nn.Linear layer in the denoiser(s) "
                                  f"({total} linear, {kept} kept by rule)")
        else:
            fc = _trial(pipe, feature)
            if fc.status == READY:
                fc.reason = _reason_ready(feature, report.facts)
        report.features[feature] = fc
    return report


SKIPPED_COMPONENTS = ("text_encoder", "tokenizer", "image_encoder", "feature_extractor", "safety_checker",
                      "image_processor", "processor", "watermarker")


def check_path(path: str | Path, light: bool = True, **load_kwargs: Any) -> CheckReport:
    """Load the local diffusers model folder ``path`` (``local_files_only``, no download) and check it.

    ``light`` (default) leaves out the components no feature touches (text/image encoders, tokenizers,
    safety checkers), so only the denoiser(s), the VAE and the scheduler are loaded; ``load_kwargs``
    go to ``DiffusionPipeline.from_pretrained`` (e.g. ``torch_dtype=torch.bfloat16``) and win.
    """
    import json

    from diffusers import DiffusionPipeline

    p = Path(path)
    index = p / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{p} is not a diffusers model folder (no model_index.json)")
    load_kwargs.setdefault("local_files_only", True)
    if light:
        names = [k for k in json.loads(index.read_text()) if not k.startswith("_")]
        for name in names:
            if name.startswith(SKIPPED_COMPONENTS):
                load_kwargs.setdefault(name, None)
    pipe = DiffusionPipeline.from_pretrained(str(p), **load_kwargs)
    report = check(pipe)
    report.facts = {"path": str(p), **report.facts}
    return report
