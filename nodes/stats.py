"""Node "Run Stats (hasten)": what every hasten patch on a MODEL did in its last sampling run, as STRING.

Patch nodes (EasyCache, Adaptive Guidance, Sparse Attention) act later, inside the sampler, so their
statistics exist only after sampling. Each keeps a *holder* under
``model_options["transformer_options"]["hasten_*"]`` with a ``stats_text() -> str | None`` method
(None = not run yet); this node, wired after the sampler (its ``latent`` input orders it), collects them.
"""

from __future__ import annotations

from typing import Any

from .schema import CATEGORY, io, output, stats_output


def collect(model: Any) -> list[str]:
    """The ``stats_text()`` of every hasten holder on ``model`` (in the order they were added)."""
    topts = getattr(model, "model_options", {}).get("transformer_options", {})
    lines = []
    for key, holder in topts.items():
        if not str(key).startswith("hasten_") or not callable(getattr(holder, "stats_text", None)):
            continue
        text = holder.stats_text()
        lines.append(text if text else f"{key}: not run yet (connect this node after the sampler)")
    return lines


class HastenRunStats(io.ComfyNode):
    """Shows the statistics of the hasten patches on a MODEL after a sampler used it."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HastenRunStats",
            display_name="Run Stats (hasten)",
            category=CATEGORY,
            description=("Reports what the hasten patches on a MODEL (EasyCache, Adaptive Guidance, Sparse "
                         "Attention, ...) did in the last sampling run: forwards computed/reused, uncond "
                         "passes saved. Connect the patched MODEL and the sampler's LATENT output."),
            inputs=[
                io.Model.Input("model", tooltip="The MODEL the hasten nodes patched (the one given to the sampler)."),
                io.Latent.Input("latent", tooltip="The sampler's output: makes this node run after sampling."),
            ],
            outputs=[stats_output("One line per hasten patch on the MODEL.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model: Any, latent: Any) -> io.NodeOutput:
        lines = collect(model)
        text = "\n".join(lines) if lines else "no hasten patch on this MODEL"
        return output(stats=text)

    @classmethod
    def fingerprint_inputs(cls, model: Any, latent: Any) -> float:
        return float("nan")  # always re-run: the holders change without the inputs changing


NODES = [HastenRunStats]
