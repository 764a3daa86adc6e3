"""ComfyUI adapter for hasten's quantization: node "Quantize Model (hasten)" (V3 schema).

The core (:func:`hasten.quant.plan_quantization`) decides which linear layers of the MODEL's diffusion
model to quantize and builds their replacements; this adapter installs them as *object patches* on a
cloned ModelPatcher, so ComfyUI swaps them in when the patched model is loaded and puts the original
layers back when it is unpatched (the original MODEL and its weights are never modified).

The quantized layers are real ``nn.Linear`` subclasses whose ``.weight`` is a quantized tensor, so model
code that reads ``linear.weight`` (ComfyUI's Wan / LTX feed-forward since August 2026) keeps working.
The plan is always made from the ORIGINAL layers: when a quantized clone of the same model is still
patched in (ComfyUI unpatches lazily), its originals are taken from the patcher's backup, so a second
Quantize node, or a re-run after a quantized run, quantizes the original weights, never quantized ones.
Layers carrying weight patches (LoRA) are left in float. Zero quantized layers is a node error.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

from ..quant import (
    CalibrationData,
    Int4WeightOnlyConfig,
    Int8WeightOnlyConfig,
    QuantConfig,
    QuantReport,
    W8A8Config,
    check_not_empty,
    is_quant_linear,
    plan_quantization,
)
from .schema import CATEGORY, advanced, fail, io, output, stats_output

log = logging.getLogger("hasten")

NAME = "Quantize Model (hasten)"
HOLDER_KEY = "hasten_quant"  # model_options["transformer_options"] entry: the node's report
PREFIX = "diffusion_model."
METHODS = ("int8_weight_only", "int4_weight_only", "w8a8")


def report(model: Any) -> QuantReport | None:
    """The quantization report of a MODEL patched by the node (None if it is not)."""
    return model.model_options.get("transformer_options", {}).get(HOLDER_KEY)


def make_config(method: str, group_size: int = 64, keep_budget: float = 0.05) -> QuantConfig:
    if method == "int8_weight_only":
        return Int8WeightOnlyConfig(keep_budget=keep_budget)
    if method == "int4_weight_only":
        return Int4WeightOnlyConfig(group_size=group_size, keep_budget=keep_budget)
    if method == "w8a8":
        return W8A8Config(keep_budget=keep_budget)
    raise ValueError(f"unknown quantization method {method!r}; choose one of {METHODS}")


def _originals(m: Any, dm: Any) -> dict[str, Any]:
    """Path -> original ``nn.Linear`` of every layer of ``dm`` that is currently a hasten quantized linear
    patched in by ComfyUI (from the shared ``object_patches_backup``)."""
    backup = getattr(m, "object_patches_backup", {}) or {}
    out = {}
    for name, sub in dm.named_modules():
        if is_quant_linear(sub):
            orig = backup.get(PREFIX + name)
            if orig is None or is_quant_linear(orig):
                fail(NAME, f"layer {name!r} of this model is already quantized in place and its original "
                           "weights are unknown; load the model again (unquantized) before this node", ValueError)
            out[name] = orig
    return out


@contextlib.contextmanager
def _unpatched_weights(m: Any, dm: Any) -> Iterator[None]:
    """Quantize original weights, never another clone's lazily left weight patches: ComfyUI unpatches
    lazily, so after a LoRA'd clone of this model sampled, the shared module still holds its LoRA'd weights
    (originals in the clones' shared ``backup``). They are swapped out for the duration of planning."""
    swapped = []
    for key, bk in list((getattr(m, "backup", None) or {}).items()):
        if key.startswith(PREFIX):
            owner, _, attr = key[len(PREFIX):].rpartition(".")
            t = getattr(dm.get_submodule(owner), attr, None)
            if torch.is_tensor(t) and t.shape == bk.weight.shape:
                swapped.append((t, t.data))
                t.data = bk.weight.to(t.device, t.dtype)
    try:
        yield
    finally:
        for t, data in swapped:
            t.data = data


def _refuse_later_weight_patches(executor: Any, *args: Any, **kwargs: Any) -> Any:
    """OUTER_SAMPLE: a LoRA loaded AFTER this node would patch quantized layers, which ignore float weight
    patches (a silent no-op): refuse, naming the order that works. Afterwards, forget the swapped-out
    layers' "weights patched" marks (see :func:`_forget_patched_marks`)."""
    patcher = executor.class_obj.model_patcher
    rep = report(patcher)
    late = sorted({k[len(PREFIX):].rpartition(".")[0] for k in getattr(patcher, "patches", {})
                   if k.startswith(PREFIX)} & set(rep.quantized if rep is not None else ()))
    if late:
        fail(NAME, f"{len(late)} quantized layers (e.g. {late[0]!r}) got weight patches (a LoRA loaded after this "
                   "node), which quantized layers cannot apply; load LoRAs BEFORE Quantize Model (hasten) (their "
                   "layers are then kept in float)")
    try:
        return executor(*args, **kwargs)
    finally:
        _forget_patched_marks(patcher)


def _forget_patched_marks(patcher: Any) -> None:
    """ComfyUI marks each module whose weights it patched (``comfy_patched_weights``) and clears the marks only
    on the modules in the model when it unpatches; the original layers our object patches swapped out keep
    theirs, so once put back, a LoRA clone loaded next skipped them as "already patched" (measured: LoRA run,
    plain run, quantized run, then a LoRA'd quantized clone sampled without its LoRA). Clear them."""
    backup = getattr(patcher, "object_patches_backup", None) or {}
    rep = report(patcher)
    for name in [*rep.quantized, *rep.precision] if rep is not None else []:
        orig = backup.get(PREFIX + name)
        if isinstance(orig, torch.nn.Module):
            for mod in orig.modules():
                if hasattr(mod, "comfy_patched_weights"):
                    del mod.comfy_patched_weights


def patch_model(model: Any, config: QuantConfig, calibration: CalibrationData | None = None) -> Any:
    """A clone of ``model`` whose diffusion model's selected linears are quantized (as object patches)."""
    inner = getattr(model, "model", None)
    dm = getattr(inner, "diffusion_model", None)
    if dm is None or not hasattr(model, "add_object_patch"):
        fail(NAME, f"needs a ComfyUI diffusion MODEL (a ModelPatcher whose model has a diffusion_model, e.g. "
                   f"Wan/Flux/SD3/SDXL/LTX); got {type(inner).__name__}")
    m = model.clone()
    prev = report(m)
    if prev is not None:  # re-quantizing a quantized MODEL replaces the previous patches, never stacks
        for name in [*prev.quantized, *prev.precision]:
            m.object_patches.pop(PREFIX + name, None)
    originals = _originals(m, dm)
    patched = {k[len(PREFIX):].rpartition(".")[0] for k in getattr(m, "patches", {}) if k.startswith(PREFIX)}
    skip = {n: "has weight patches (e.g. a LoRA): left in float" for n in patched}
    with _unpatched_weights(m, dm):
        plan, rep = plan_quantization(dm, config, calibration, originals=originals, skip=skip)
    try:
        check_not_empty(rep, NAME)
    except ValueError as exc:
        fail(NAME, str(exc).removeprefix(NAME + ": "))
    for name, ql in plan.items():
        m.add_object_patch(PREFIX + name, ql)
    m.model_options.setdefault("transformer_options", {})[HOLDER_KEY] = rep
    import comfy.patcher_extension as pe

    m.remove_wrappers_with_key(pe.WrappersMP.OUTER_SAMPLE, HOLDER_KEY)
    m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, HOLDER_KEY, _refuse_later_weight_patches)
    return m


def stats_line(rep: QuantReport) -> str:
    mem = f"; weights {rep.memory_after}" if rep.memory_after is not None else ""
    return (f"{NAME}: {rep.method}: {len(rep.quantized)} linear layers quantized, {len(rep.kept)} kept "
            f"({len(rep.precision)} of them as int8; {'calibrated' if rep.calibrated else 'no calibration'}){mem}")


class HastenQuantize(io.ComfyNode):
    """Node "Quantize Model (hasten)": low-bit linear layers for the diffusion model."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HastenQuantize",
            display_name=NAME,
            category=CATEGORY,
            description=("Quantizes the diffusion model's linear layers (int8 or group-wise int4 weight-only, or "
                         "W8A8 int8 weights and activations), keeping timestep/modulation layers and the most "
                         "error-sensitive ones in higher precision. Applied as model patches: the input MODEL "
                         "is unchanged and the original weights come back when the patch is removed. Works on "
                         "any diffusion model built from linear layers (Wan, Flux, SD3, SDXL, LTX...)."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion MODEL to quantize (it is cloned, not changed)."),
                io.Combo.Input("method", options=list(METHODS), default="int8_weight_only",
                               tooltip="int8_weight_only: ~half the bf16 weight bytes, near-lossless. "
                                       "int4_weight_only: ~a third, some quality cost. w8a8: int8 weights and "
                                       "activations (int8 GEMM; fastest where int8 kernels exist)."),
                io.Int.Input("group_size", default=64, min=8, max=1024, step=8,
                             tooltip="int4 only: input channels sharing one scale/zero (smaller = more "
                                     "accurate, slightly larger). Layers whose width is not a multiple stay int8.",
                             **advanced()),
                io.Float.Input("keep_budget", default=0.05, min=0.0, max=0.99, step=0.01,
                               tooltip="Fraction of the layers with the largest measured error kept in higher "
                                       "precision.", **advanced()),
                io.String.Input("calibration_file", default="", optional=True,
                                tooltip="A hasten calibration .safetensors (CalibrationData.save); empty = no "
                                        "calibration (no activation-aware scaling, W8A8 uses per-token scales).",
                                **advanced()),
            ],
            outputs=[
                io.Model.Output(tooltip="The quantized MODEL; connect it to any sampler."),
                stats_output("How many layers were quantized and kept, and the weight bytes vs. bf16."),
            ],
        )

    @classmethod
    def execute(cls, model: Any, method: str, group_size: int = 64, keep_budget: float = 0.05,
                calibration_file: str = "") -> io.NodeOutput:
        try:
            config = make_config(method, group_size, keep_budget)
        except (TypeError, ValueError) as exc:
            fail(NAME, str(exc), ValueError)
        calibration = None
        if calibration_file:
            if not os.path.isfile(calibration_file):
                fail(NAME, f"no calibration file at {calibration_file!r}", FileNotFoundError)
            try:
                calibration = CalibrationData.load(calibration_file)
            except Exception as exc:  # noqa: BLE001 - a damaged file: say which and why
                fail(NAME, f"cannot read calibration file {calibration_file!r}: {exc}", ValueError)
        m = patch_model(model, config, calibration)
        rep = report(m)
        assert rep is not None
        text = stats_line(rep)
        log.info("%s", text)
        return output(m, stats=text)


NODES = [HastenQuantize]
