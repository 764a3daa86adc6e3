"""``hasten demo``: a Gradio app comparing the baseline with up to three accelerated configurations.

Only drawing and wiring live here; what is run and measured is in :mod:`hasten.web.compare` and the
per-family settings panels in :mod:`hasten.web.panels`.
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Any

from .compare import (
    DEFAULT_SWEEP,
    EMBEDDED,
    GUIDANCE_RANGE,
    MAX_CONFIGS,
    SEED_RANGE,
    SIZE_RANGE,
    STEPS_RANGE,
    TABLE_HEADERS,
    Comparison,
    GenerationRequest,
    ModelCache,
    ModelHandle,
    ModelLoadError,
    OutOfMemory,
    digit_classifier,
    display_image,
    metrics_table,
    parse_thresholds,
    run_comparison,
    run_sweep,
    sweep_figure,
    timeline_figure,
)
from .panels import Control, configuration, panels

SLOTS = ("A", "B", "C")[:MAX_CONFIGS]
INTRO = """# hasten: baseline vs. accelerated, same seed
Pick a model and what to generate, switch accelerations on in configurations **A-C**, press **Run comparison**.
Every configuration runs on the same seed as the baseline; quality is measured against that baseline."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--model", default=EMBEDDED, help="model shown first: 'embedded', a diffusers folder or hub id")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _close(fig: Any) -> Any:
    """Detach a figure from pyplot (gradio still renders it) so figures do not pile up across requests."""
    import matplotlib.pyplot as plt

    plt.close(fig)
    return fig


def _control(gr: Any, c: Control, value: Any, elem_id: str) -> Any:
    if c.kind == "slider":
        return gr.Slider(c.minimum, c.maximum, value=value, step=c.step, label=c.label, info=c.info,
                         elem_id=elem_id)
    if c.kind == "checkbox":
        return gr.Checkbox(value=bool(value), label=c.label, info=c.info, elem_id=elem_id)
    if c.kind == "dropdown":
        return gr.Dropdown(list(c.choices), value=value, label=c.label, info=c.info, elem_id=elem_id)
    return gr.Number(value=value, label=c.label, info=c.info, minimum=c.minimum, maximum=c.maximum,
                     elem_id=elem_id)


def build_app(pipeline_factory: Any = None, device: str = "cpu", default_model: str = EMBEDDED):
    """The demo as a ``gr.Blocks`` (queued, one request at a time per event).

    ``pipeline_factory(name)`` returns a :class:`~hasten.web.compare.ModelHandle` or a diffusers pipeline for a
    model name (default: :func:`~hasten.web.compare.load_model`); tests inject tiny pipelines through it.
    """
    import gradio as gr

    cache = ModelCache(pipeline_factory, device)

    with gr.Blocks(title="hasten demo", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        with gr.Tabs():
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=340):
                        with gr.Row(equal_height=True):
                            model = gr.Dropdown([EMBEDDED], value=default_model, allow_custom_value=True,
                                                label="model", scale=4, elem_id="model",
                                                info="'embedded' (the trained digit model), a local diffusers "
                                                     "pipeline folder, or a hub id")
                            load_btn = gr.Button("Load", scale=1, elem_id="load")
                        model_status = gr.Markdown(elem_id="model-status")
                        digit = gr.Radio([str(i) for i in range(10)], value="3", label="digit", elem_id="digit")
                        prompt = gr.Textbox(label="prompt", visible=False, lines=2, elem_id="prompt")
                        negative = gr.Textbox(label="negative prompt", value="", elem_id="negative")
                        with gr.Row():
                            seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed",
                                             info=f"{SEED_RANGE[0]}..{SEED_RANGE[1]}")
                            steps = gr.Slider(*STEPS_RANGE, value=20, step=1, label="steps", elem_id="steps")
                        guidance = gr.Slider(*GUIDANCE_RANGE, value=4.0, step=0.5, label="guidance scale (CFG)",
                                             elem_id="guidance")
                        size = gr.Slider(*SIZE_RANGE, value=512, step=16, label="size (px, square)", visible=False,
                                         elem_id="size")
                        slots: list[tuple[str, list[tuple[Any, Any, dict[str, Any]]]]] = []
                        for i, slot in enumerate(SLOTS):
                            fams = []
                            with gr.Accordion(f"configuration {slot}", open=i == 0, elem_id=f"cfg-{slot}"):
                                for spec in panels():
                                    on = gr.Checkbox(value=spec.enabled_by_default(i), label=f"use {spec.title}",
                                                     info=spec.description, elem_id=f"cfg-{slot}-{spec.family}")
                                    defaults = spec.defaults(i)
                                    comps = {c.name: _control(gr, c, defaults[c.name],
                                                              f"cfg-{slot}-{spec.family}-{c.name}")
                                             for c in spec.controls}
                                    fams.append((spec, on, comps))
                            slots.append((slot, fams))
                        timing = gr.Slider(1, 10, value=3, step=1, label="timing repeats",
                                           info="interleaved runs per configuration; the median time is shown",
                                           elem_id="timing-repeats")
                        run_btn = gr.Button("Run comparison", variant="primary", elem_id="run")
                    with gr.Column(scale=2):
                        gallery = gr.Gallery(label="same seed: baseline and accelerated", columns=4, height="auto",
                                             object_fit="contain", format="png", elem_id="images")
                        table = gr.Dataframe(headers=TABLE_HEADERS, label="metrics", interactive=False, wrap=True,
                                             elem_id="metrics")
                        notes = gr.Markdown(elem_id="notes")
                        with gr.Row():
                            pair = gr.Dropdown([], label="before/after slider: baseline vs.", elem_id="pair")
                        slider = gr.ImageSlider(label="baseline | accelerated", type="pil", format="png", max_height=320,
                                              elem_id="slider")
                        timeline = gr.Plot(label="per-step timeline", elem_id="timeline")
                        shown = gr.State({})
            with gr.Tab("Sweep", id="sweep"):
                gr.Markdown("EasyCache threshold sweep with the **Compare** tab's model and settings, measured by "
                            "`hasten bench`'s runner (interleaved repeats, median wall time). The embedded model "
                            "generates all ten digits per run.")
                with gr.Row():
                    thresholds = gr.Textbox(DEFAULT_SWEEP, label="thresholds", elem_id="thresholds", scale=3)
                    repeats = gr.Slider(1, 5, value=1, step=1, label="interleaved repeats", elem_id="repeats")
                sweep_btn = gr.Button("Run sweep", variant="primary", elem_id="run-sweep")
                pareto = gr.Plot(label="speed-up vs. PSNR", elem_id="pareto")
                sweep_table = gr.Code(label="bench table", language=None, elem_id="sweep-table")

        gen_inputs = {model, digit, prompt, negative, seed, steps, guidance, size}
        cfg_inputs = {c for _, fams in slots for _, on, comps in fams for c in (on, *comps.values())}

        def request_of(data: dict) -> tuple[ModelHandle, GenerationRequest]:
            handle = cache.get(data[model])
            for name, comp in (("seed", seed), ("steps", steps), ("guidance scale", guidance)):
                if data[comp] is None:
                    raise ValueError(f"{name} is empty")
            req = GenerationRequest(
                prompt=data[prompt] or "", negative_prompt=data[negative] or "", seed=data[seed],
                steps=data[steps], guidance=data[guidance],
                size=None if handle.size_fixed else data[size],
                digit=int(data[digit]) if handle.digits and data[digit] is not None else None,
            )
            return handle, req

        def on_load(name: str):
            try:
                h = cache.get(name)
            except ModelLoadError as exc:
                gr.Warning(str(exc))
                return {model_status: f"**could not load** `{name}`: {exc}"}
            what = (f"digits 0-9 at {h.default_size} px" if h.digits
                    else f"free prompt, default {h.default_size} px")
            return {
                model_status: f"loaded `{h.name}` ({type(h.pipe).__name__}; {what})",
                digit: gr.update(visible=h.digits),
                prompt: gr.update(visible=not h.digits),
                size: gr.update(visible=False) if h.size_fixed or not h.default_size else
                gr.update(visible=True, value=min(max(h.default_size, SIZE_RANGE[0]), SIZE_RANGE[1])),
                steps: gr.update(value=h.default_steps),
                guidance: gr.update(value=h.default_guidance),
            }

        load_outputs = [model_status, digit, prompt, size, steps, guidance]
        load_btn.click(on_load, model, load_outputs, concurrency_limit=4, api_name="load")  # ModelCache locks
        demo.load(on_load, model, load_outputs, concurrency_limit=4, api_visibility="private")

        def on_compare(data: dict, progress=gr.Progress()):  # noqa: B008 - gradio's progress injection
            try:
                handle, req = request_of(data)
                configs = []
                for slot, fams in slots:
                    choices = {spec.family: ({k: data[c] for k, c in comps.items()} if data[on] else None)
                               for spec, on, comps in fams}
                    cfg = configuration(slot, choices)
                    if cfg is not None:
                        configs.append(cfg)
                if not configs:
                    gr.Warning("no acceleration is switched on in configurations A-C: showing the baseline only")
                comp = run_comparison(handle, req, configs, on_progress=lambda f, d: progress(f, desc=d),
                                      repeats=int(data[timing] or 1))
            except (ValueError, ModelLoadError, OutOfMemory) as exc:
                raise gr.Error(str(exc)) from exc
            except Exception as exc:  # noqa: BLE001 - a readable message instead of gradio's bare "Error"
                raise gr.Error(f"generation failed: {type(exc).__name__}: {exc}") from exc
            return render(comp)

        def render(comp: Comparison) -> dict:
            for r in comp.runs[1:]:
                if r.error:
                    gr.Warning(f"{r.name} did not run: {r.error}")
            ok = [r for r in comp.runs if r.image is not None]
            pics = {r.name: display_image(r.image) for r in ok}
            caption = {r.name: r.name + (f" ({r.speedup:.2f}x)" if r.speedup and r is not comp.baseline else "")
                       for r in ok}
            headers, rows = metrics_table(comp)
            others = [r.name for r in ok[1:]]
            req = comp.request
            what = f"digit {req.digit}" if req.digit is not None else f"“{req.prompt}”"
            note = (f"{comp.model}: {what}, seed {req.seed}, {req.steps} steps, CFG {req.guidance:g}"
                    + (f", {req.size} px" if req.size else "") + ". Speed-up = baseline wall time / this one's "
                    "(median of the interleaved repeats); "
                    "forwards count cond + uncond passes through every transformer block.")
            return {
                gallery: [(pics[r.name], caption[r.name]) for r in ok],
                table: gr.update(value=rows, headers=headers),
                notes: note,
                timeline: _close(timeline_figure(comp)),
                pair: gr.update(choices=others, value=others[0] if others else None),
                slider: (pics[ok[0].name], pics[others[0]]) if others else None,
                shown: pics,
            }

        run_btn.click(on_compare, gen_inputs | cfg_inputs | {timing},
                      [gallery, table, notes, timeline, pair, slider, shown], concurrency_id="pipeline",
                      api_name="compare")

        def on_pair(name: str | None, pics: dict):
            if not name or name not in pics or "baseline" not in pics:
                return gr.update()
            return (pics["baseline"], pics[name])

        pair.input(on_pair, [pair, shown], slider, api_visibility="private")

        def on_sweep(data: dict, progress=gr.Progress()):  # noqa: B008
            try:
                handle, req = request_of(data)
                ts = parse_thresholds(data[thresholds])
                rows = run_sweep(handle, req, ts, int(data[repeats]), on_progress=lambda f, d: progress(f, desc=d))
            except (ValueError, ModelLoadError, OutOfMemory) as exc:
                raise gr.Error(str(exc)) from exc
            except Exception as exc:  # noqa: BLE001 - a readable message instead of gradio's bare "Error"
                raise gr.Error(f"generation failed: {type(exc).__name__}: {exc}") from exc
            from ..bench.report import table as bench_table

            return _close(sweep_figure(rows, handle, req)), bench_table(rows)

        sweep_btn.click(on_sweep, gen_inputs | {thresholds, repeats}, [pareto, sweep_table],
                        concurrency_id="pipeline", api_name="sweep")

    demo.queue(default_concurrency_limit=1)
    return demo


def run(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("`hasten demo` needs gradio: pip install 'hasten[demo]'", file=sys.stderr)
        return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.model == EMBEDDED:  # fit the digit classifier while the user looks at the page
        threading.Thread(target=digit_classifier, name="hasten-digit-classifier", daemon=True).start()
    demo = build_app(device=device, default_model=args.model)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0
