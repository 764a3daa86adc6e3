"""ComfyUI adapter for adaptive block-sparse attention (:class:`hasten.kernels.adaspa.AdaSpa`).

Wiring only, through ComfyUI's own extension points on a cloned ModelPatcher, so it serves every model
whose attention goes through ComfyUI's ``optimized_attention`` with its ``transformer_options`` (Wan, Flux,
SD 1.x/SDXL, SD3, HunyuanVideo, LTX, Qwen-Image, Chroma, ... in 0.3.75 and 0.33):
- ``transformer_options["optimized_attention_override"]``: every such attention call reaches it;
  self/joint attention (as many keys as queries) goes to the policy, which answers with a sparse/search
  output or None (then ComfyUI's own attention runs, bit-identical); cross-attention passes through;
  key-padding masks are handled, other masks run dense and are counted;
- an ``OUTER_SAMPLE`` wrapper gives each sampling run a fresh policy and logs once what it did (a run in
  which no attention call reached the override is a warning naming what is supported);
- an ``APPLY_MODEL`` wrapper tells the policy the step (sigma's position in the run's schedule) and the
  branch of each batch row (ComfyUI's uuids / cond_or_uncond), and numbers the attention calls of one
  forward so each layer keeps its own pattern. Joint-attention models keep their text tokens dense.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..kernels.adaspa import AdaSpa, AdaSpaConfig, AdaSpaStats, key_padding_mask
from ..kernels.eager import eager
from .runs import batch_rows, last_run_stats, rewrap, scoped_run, step_index
from .schema import CATEGORY, advanced, fail, io

log = logging.getLogger("hasten")

NODE_NAME = "Sparse Attention (hasten)"
WRAPPER_KEY = "hasten_sparse_attention"
HOLDER_KEY = "hasten_sparse_attention"  # transformer_options: the node's settings and last stats
RUN_KEY = "hasten_sparse_attention_run"  # transformer_options: present only during a sampling run
CALL_KEY = "hasten_sparse_attention_call"  # transformer_options: present only inside one model call
OVERRIDE_KEY = "optimized_attention_override"
SUPPORTED = ("models whose attention goes through ComfyUI's optimized_attention with transformer_options "
             "(Wan 2.1/2.2, Flux, Chroma, SD 1.x, SDXL, SD3, HunyuanVideo, LTX, Qwen-Image, ...)")
# attributes of joint text+image models (text tokens share the attention sequence and stay dense)
JOINT_MARKERS = ("txt_in", "context_embedder", "txt_norm")
_DEFAULTS = AdaSpaConfig()


@dataclass
class SparseHolder:
    """Settings of one node instance, the override it replaced (if any), and the last run's stats."""

    config: AdaSpaConfig
    previous_override: Any = None
    last_run: AdaSpaStats | None = None
    model_name: str = ""
    joint: bool = False  # text tokens share the attention sequence (they are kept dense)
    warning: str | None = None

    def stats_text(self) -> str | None:
        if self.warning:
            return f"{NODE_NAME}: {self.warning}"
        if self.last_run is None:
            return None
        return f"{NODE_NAME}: {self.last_run.summary()}"


@dataclass
class _Run:
    holder: SparseHolder
    policy: AdaSpa
    sample_sigmas: torch.Tensor
    joint: bool = False


@dataclass
class _Call:
    run: _Run
    step: int
    rows: list[Any]
    text_len: int = 0
    counter: list[int] = field(default_factory=lambda: [0])


def stats(model: Any) -> AdaSpaStats | None:
    """Statistics of the last sampling run of a MODEL patched by the node (None if never run)."""
    return last_run_stats(model, HOLDER_KEY)


def outer_sample_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
    """A fresh policy (patterns, stats) for every sampling run; what it did is logged once afterwards."""

    def start(holder: SparseHolder, sigmas: torch.Tensor) -> tuple[_Run, Any]:
        policy = AdaSpa(holder.config)
        policy.begin_run(max(len(sigmas) - 1, 1) if isinstance(sigmas, torch.Tensor) else None)
        run = _Run(holder, policy, sigmas, joint=holder.joint)

        def finish() -> None:
            done = policy.end_run()
            holder.warning = None
            if holder.config.off:
                return
            if done is None:
                holder.warning = (f"no effect: no attention call of {holder.model_name} reached "
                                  f"ComfyUI's attention override; supported: {SUPPORTED}")
                log.warning("%s: %s", NODE_NAME, holder.warning)
                return
            holder.last_run = done
            reason = done.no_effect_reason(holder.config)
            if reason is None:
                log.info("%s: %s", NODE_NAME, done.summary())
            else:
                holder.warning = f"no effect in this run ({done.summary()}): {reason}"
                log.warning("%s: %s", NODE_NAME, holder.warning)

        return run, finish

    return scoped_run(executor, args, kwargs, HOLDER_KEY, RUN_KEY, start)


def apply_model_wrapper(executor: Any, x: torch.Tensor, t: torch.Tensor, c_concat: Any = None,
                        c_crossattn: Any = None, control: Any = None, transformer_options: dict | None = None,
                        **kwargs: Any) -> torch.Tensor:
    """Tell the attention override which step and branches this model call is (and the text length)."""
    topts = transformer_options if transformer_options is not None else {}
    run: _Run | None = topts.get(RUN_KEY)
    if run is None:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    batch = x.shape[0]
    rows = batch_rows(topts, batch) or [("row", batch, i) for i in range(batch)]
    text = c_crossattn.shape[1] if run.joint and isinstance(c_crossattn, torch.Tensor) and c_crossattn.ndim == 3 \
        else 0
    call_opts = dict(topts)
    call_opts[CALL_KEY] = _Call(run, step_index(run.sample_sigmas, t[0]), rows, text)
    return executor(x, t, c_concat, c_crossattn, control, call_opts, **kwargs)


def attention_override(func: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                       mask: Any = None, attn_precision: Any = None, skip_reshape: bool = False,
                       skip_output_reshape: bool = False, **kwargs: Any) -> torch.Tensor:
    """ComfyUI attention override: self/joint attention through the policy, everything else unchanged."""
    topts = kwargs.get("transformer_options") or {}
    call: _Call | None = topts.get(CALL_KEY)
    holder: SparseHolder | None = topts.get(HOLDER_KEY)
    previous = holder.previous_override if holder is not None else None

    def original() -> torch.Tensor:
        args = (q, k, v, heads, mask, attn_precision, skip_reshape, skip_output_reshape)
        if previous is not None:
            return previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    if call is None or call.run.policy.config.off:
        return original()
    out = _policy_attention(call, q, k, v, heads, mask, skip_reshape, skip_output_reshape)
    return original() if out is None else out


@eager  # per-layer/per-step decisions run eagerly: under ComfyUI's compile node the model compiles once
def _policy_attention(call: _Call, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: Any,
                      skip_reshape: bool, skip_output_reshape: bool) -> torch.Tensor | None:
    """The policy's answer for one attention call (None: run ComfyUI's own attention)."""
    layer = call.counter[0]
    call.counter[0] += 1
    if skip_reshape:  # (B, H, S, D)
        qh, kh, vh = q, k, v
    else:  # (B, S, H*D); some models hand v over as (B, S, H, D) (SD3's MMDiT)
        d_ = q.shape[-1] // heads
        qh, kh, vh = (t.reshape(t.shape[0], -1, heads, d_).transpose(1, 2) for t in (q, k, v))
    b, _, s, d = qh.shape
    if kh.shape != (b, heads, s, d) or vh.shape != kh.shape:  # cross-attention: not a target
        return None
    policy = call.run.policy
    kv_mask = q_valid = None
    if mask is not None:
        m = mask if isinstance(mask, torch.Tensor) else None
        if m is not None and m.ndim == 3:  # ComfyUI reads a 3-D mask as (B, S_q, S_k)
            m = m.unsqueeze(1)
        split = key_padding_mask(m, (b, heads, s, s)) if m is not None else None
        if split is None:
            policy.fallback("attention mask other than key padding")
            return None
        kv_mask, q_valid = split
    t_len = call.text_len if 0 < call.text_len < s else 0
    ranges = ((0, t_len), (s - t_len, s)) if t_len else ()
    out = policy.attend(layer, call.rows, call.step, qh, kh, vh, dense_ranges=ranges, kv_mask=kv_mask)
    if out is None:
        return None
    if q_valid is not None:
        out = out * q_valid[..., None].to(out.dtype)
    out = out.to(q.dtype)
    return out if skip_output_reshape else out.transpose(1, 2).reshape(b, -1, heads * d)


def patch_model(model: Any, config: AdaSpaConfig) -> Any:
    """A clone of ``model`` whose self/joint attention goes through AdaSpa (re-patching replaces, never stacks)."""
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(dm, torch.nn.Module) or not hasattr(model, "add_wrapper_with_key"):
        raise UnsupportedModelError(f"{NODE_NAME} needs a diffusion MODEL (a ComfyUI ModelPatcher), got "
                                    f"{type(model).__name__}; it supports {SUPPORTED}.")
    import comfy.patcher_extension as pe

    m = rewrap(model, WRAPPER_KEY, {pe.WrappersMP.OUTER_SAMPLE: outer_sample_wrapper,
                                     pe.WrappersMP.APPLY_MODEL: apply_model_wrapper})
    topts = m.model_options.setdefault("transformer_options", {})
    old = topts.get(HOLDER_KEY)
    previous = old.previous_override if old is not None else topts.get(OVERRIDE_KEY)
    joint = any(hasattr(dm, a) for a in JOINT_MARKERS)
    topts[HOLDER_KEY] = SparseHolder(config, previous_override=previous, model_name=type(dm).__name__, joint=joint)
    topts[OVERRIDE_KEY] = attention_override
    return m


class HastenSparseAttention(io.ComfyNode):
    """Node "Sparse Attention (hasten)": AdaSpa adaptive block-sparse attention for any model whose
    attention goes through ComfyUI's attention function."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HastenSparseAttention",
            display_name=NODE_NAME,
            category=CATEGORY,
            description=("AdaSpa-style adaptive sparse attention: after the dense warm-up steps, each head keeps "
                         "only the key blocks holding the target share of its attention mass (checked exactly) "
                         "and reuses that pattern across steps. Pays off on long sequences (video, large "
                         "images). Works on " + SUPPORTED + "; text tokens of joint attention stay dense. "
                         "target_mass 1.0 = off (bit-identical)."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion MODEL whose attention becomes sparse."),
                io.Float.Input("target_mass", default=_DEFAULTS.target_mass, min=0.5, max=1.0, step=0.01,
                               tooltip="Share of each query block's attention mass the kept key blocks must "
                                       "cover. Lower = sparser and faster, less exact. 1.0 = off."),
                io.Int.Input("warmup_steps", default=_DEFAULTS.warmup_steps, min=0, max=1000,
                             tooltip="The first steps stay dense; the pattern is searched right after them."),
                io.Int.Input("block_size", default=_DEFAULTS.block_size, min=16, max=256, step=16,
                             tooltip="Tokens per attention block (a power of two; 64 or 128 on GPUs).",
                             **advanced()),
                io.Int.Input("refresh_every", default=_DEFAULTS.refresh_every, min=0, max=1000,
                             tooltip="Search the pattern again every N steps (0 = never).", **advanced()),
                io.Int.Input("min_seq_len", default=_DEFAULTS.min_seq_len, min=0, max=1 << 20,
                             tooltip="Attention over fewer tokens than this stays dense.", **advanced()),
                io.Combo.Input("remainder", options=["drop", "pooled"], default=_DEFAULTS.remainder,
                               tooltip="Skipped key blocks: 'drop' (AdaSpa) or 'pooled' (each still contributes "
                                       "through its mean key and value; far more exact where attention is "
                                       "spread out, as in video models).", optional=True, **advanced()),
                io.Int.Input("dense_final_steps", default=_DEFAULTS.dense_final_steps, min=0, max=1000,
                             tooltip="The last N steps of the run stay dense.", optional=True, **advanced()),
            ],
            outputs=[io.Model.Output(tooltip="A patched copy of the MODEL (the input MODEL is unchanged). "
                                             "Its statistics appear in the log and in Run Stats (hasten).")],
        )

    @classmethod
    def execute(cls, model: Any, target_mass: float, warmup_steps: int, block_size: int = _DEFAULTS.block_size,
                refresh_every: int = _DEFAULTS.refresh_every, min_seq_len: int = _DEFAULTS.min_seq_len,
                remainder: str = _DEFAULTS.remainder, dense_final_steps: int = _DEFAULTS.dense_final_steps
                ) -> io.NodeOutput:
        try:
            config = AdaSpaConfig(target_mass=target_mass, block_size=block_size, warmup_steps=warmup_steps,
                                  refresh_every=refresh_every, min_seq_len=min_seq_len, remainder=remainder,
                                  dense_final_steps=dense_final_steps)
        except (TypeError, ValueError) as e:
            fail(NODE_NAME, str(e), exc=ValueError)
        try:
            return io.NodeOutput(patch_model(model, config))
        except UnsupportedModelError as e:
            fail(NODE_NAME, str(e))


NODES = [HastenSparseAttention]
