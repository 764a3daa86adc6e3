"""``hasten demo``: a Gradio app comparing the baseline with up to three accelerated configurations.

Only drawing and wiring live here; what is run and measured is in :mod:`hasten.web.compare` and the
per-family settings panels in :mod:`hasten.web.panels`.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import threading
import time
from typing import Any

from .compare import (
    DEFAULT_SWEEP,
    EMBEDDED,
    EMBEDDED_VIDEO,
    GUIDANCE_RANGE,
    MAX_CONFIGS,
    MODEL_CHOICES,
    SEED_RANGE,
    SIZE_RANGE,
    STEPS_RANGE,
    TABLE_HEADERS,
    Cancelled,
    Comparison,
    GenerationRequest,
    ModelCache,
    ModelHandle,
    ModelLoadError,
    OutOfMemory,
    digit_classifier,
    display_clip,
    display_image,
    filmstrip,
    metrics_table,
    parse_thresholds,
    run_comparison,
    run_sweep,
    sweep_figure,
    timeline_figure,
)
from .panels import CalibrationStore, Control, PanelContext, configuration, panels

log = logging.getLogger("hasten.web")
SLOTS = ("A", "B", "C")[:MAX_CONFIGS]
INTRO = """## hasten: baseline vs. accelerated, same seed
Pick a model (the embedded **image** model, the embedded **video** model, or your own) and what to generate,
switch configurations **A-C** on and tick their accelerations, press **Run comparison**. Every configuration runs
on the baseline's seed; quality is measured against that baseline."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--model", default=EMBEDDED,
                   help=f"model shown first: '{EMBEDDED}' (image), '{EMBEDDED_VIDEO}', a diffusers folder or hub id")
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
    return gr.Number(value=value, label=c.label, info=c.info, elem_id=elem_id)


SHORT_LABELS = {"easycache": "EasyCache", "guidance": "Adaptive guidance", "bottleneck": "Bottleneck",
                "sparse": "Sparse attention", "quant": "Quantization"}


def _short(family: str, title: str) -> str:
    """A family's checkbox label: a short name, else its title up to the parenthesis."""
    return SHORT_LABELS.get(family) or title.split(" (")[0]


# Pixelated upscaling of 32 px digits; images keep a fixed size instead of stretching to the column.
CSS = """
#images img, #slider img { image-rendering: pixelated; }
#images { max-width: 1100px; }
#run-status { min-height: 2.5em; }
.hasten-switches, .hasten-switches .form { flex-wrap: wrap !important; }
.hasten-switches .form > * { flex: 1 1 140px !important; min-width: 140px !important; }
"""


def _user_error(gr: Any, exc: BaseException) -> Exception:
    """A message for the page; the server log gets one line, not a traceback (it is the user's input)."""
    log.info("demo request refused: %s", exc)
    return gr.Error(str(exc), print_exception=False)


def _key(request: Any) -> str:
    return getattr(request, "session_hash", None) or "no-session"


def build_app(pipeline_factory: Any = None, device: str = "cpu", default_model: str = EMBEDDED):
    """The demo as a ``gr.Blocks`` (queued, one request at a time per event).

    ``pipeline_factory(name)`` returns a :class:`~hasten.web.compare.ModelHandle` or a diffusers pipeline for a
    model name (default: :func:`~hasten.web.compare.load_model`); tests inject tiny pipelines through it.

    First screen: model, what to generate, the configurations' on/off switches and Run / Cancel with the
    run's progress next to them. A configuration's families appear when it is on, a family's settings when
    that family is on. Cancel, or closing the page, stops the run after the current denoising step.
    """
    import gradio as gr

    cache = ModelCache(pipeline_factory, device)
    calibrations = CalibrationStore()  # CacheQuant: calibrated once per model, method and steps, then reused
    stops: dict[str, threading.Event] = {}  # session -> "stop the run in progress"
    refused: dict[str, str] = {}  # session -> the last error message, shown next to Run
    stops_lock = threading.Lock()

    def needs_request(fn: Any) -> Any:
        """Make gradio pass ``request``: with postponed annotations it cannot resolve the string 'gr.Request'."""
        fn.__annotations__["request"] = gr.Request
        return fn

    def stop_event(request: Any) -> threading.Event:
        with stops_lock:
            return stops.setdefault(_key(request), threading.Event())

    with gr.Blocks(title="hasten demo", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        with gr.Tabs():
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    with gr.Column(scale=4, min_width=420):
                        with gr.Row():
                            model = gr.Dropdown(list(MODEL_CHOICES), value=default_model, allow_custom_value=True,
                                                label="model", scale=4, elem_id="model",
                                                info=f"'{EMBEDDED}' (the trained digit image model), "
                                                     f"'{EMBEDDED_VIDEO}' (the trained moving-digit video model), "
                                                     "a local diffusers pipeline folder, or a hub id already in "
                                                     "the local cache")
                            load_btn = gr.Button("Load", scale=1, elem_id="load", size="sm", min_width=80)
                        model_status = gr.Markdown(elem_id="model-status")
                        digit = gr.Radio([str(i) for i in range(10)], value="3", label="digit", elem_id="digit")
                        direction = gr.Radio(["left", "right", "up", "down"], value="left", label="moving",
                                             visible=False, elem_id="direction")
                        prompt = gr.Textbox(label="prompt", visible=False, lines=2, elem_id="prompt")
                        negative = gr.Textbox(label="negative prompt", value="", visible=False, elem_id="negative")
                        with gr.Row():
                            # number boxes, not sliders: the browser must not clamp 0 to 1 or 100000 to 150
                            # silently; the server refuses out-of-range values with a message
                            seed = gr.Number(value=0, label="seed", elem_id="seed",
                                             info=f"{SEED_RANGE[0]}..{SEED_RANGE[1]}", min_width=90)
                            steps = gr.Number(value=20, label="steps", elem_id="steps",
                                              info=f"{STEPS_RANGE[0]}..{STEPS_RANGE[1]}", min_width=90)
                            guidance = gr.Number(value=4.0, label="guidance (CFG)", elem_id="guidance",
                                                 info=f"{GUIDANCE_RANGE[0]:g}..{GUIDANCE_RANGE[1]:g}", min_width=90)
                            timing = gr.Number(value=3, label="timing repeats", elem_id="timing-repeats",
                                               info="1..10, interleaved", min_width=90)
                        size = gr.Number(value=512, label="size (px, square)", visible=False, elem_id="size",
                                         info=f"{SIZE_RANGE[0]}..{SIZE_RANGE[1]}, a multiple of 16")
                        with gr.Row(elem_classes="hasten-switches"):
                            slot_on = [gr.Checkbox(value=i < 2, label=f"configuration {slot}",
                                                   elem_id=f"cfg-{slot}-on", min_width=120)
                                       for i, slot in enumerate(SLOTS)]
                        with gr.Row(equal_height=True):
                            run_btn = gr.Button("Run comparison", variant="primary", elem_id="run", scale=3)
                            cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel", scale=1,
                                                   interactive=False)
                        status = gr.Markdown("", elem_id="run-status")
                        slots: list[tuple[str, list[tuple[Any, Any, dict[str, Any]]]]] = []
                        for i, slot in enumerate(SLOTS):
                            fams = []
                            with gr.Group(visible=i < 2, elem_id=f"cfg-{slot}") as box:
                                gr.Markdown(f"**configuration {slot}**: tick the accelerations to combine")
                                with gr.Row(elem_classes="hasten-switches"):
                                    switches = [gr.Checkbox(value=spec.enabled_by_default(i), label=_short(spec.family, spec.title),
                                                            elem_id=f"cfg-{slot}-{spec.family}", min_width=150)
                                                for spec in panels()]
                                for spec, on in zip(panels(), switches):
                                    defaults = spec.defaults(i)
                                    with gr.Group(visible=spec.enabled_by_default(i),
                                                  elem_id=f"cfg-{slot}-{spec.family}-details") as details:
                                        gr.Markdown(f"*{spec.title}*: {spec.description}")
                                        comps = {c.name: _control(gr, c, defaults[c.name],
                                                                  f"cfg-{slot}-{spec.family}-{c.name}")
                                                 for c in spec.controls}
                                    on.change(lambda v: gr.update(visible=bool(v)), on, details, queue=False,
                                              api_visibility="private")
                                    fams.append((spec, on, comps))
                            slot_on[i].change(lambda v: gr.update(visible=bool(v)), slot_on[i], box, queue=False,
                                              api_visibility="private")
                            slots.append((slot, fams))
                    with gr.Column(scale=6):
                        gallery = gr.Gallery(label="same seed: baseline and accelerated", columns=4, height=330,
                                             object_fit="contain", format="png", elem_id="images",
                                             allow_preview=False)
                        table = gr.Dataframe(headers=TABLE_HEADERS, label="metrics", interactive=False, wrap=True,
                                             elem_id="metrics")
                        notes = gr.Markdown(elem_id="notes")
                        with gr.Row():
                            pair = gr.Dropdown([], label="before/after slider: baseline vs.", elem_id="pair")
                        slider = gr.ImageSlider(label="baseline | accelerated", type="pil", format="png",
                                                max_height=320, elem_id="slider")
                        timeline = gr.Plot(label="per-step timeline", elem_id="timeline")
                        shown = gr.State({})
            with gr.Tab("Sweep", id="sweep"):
                gr.Markdown("EasyCache threshold sweep with the **Compare** tab's model and settings, measured by "
                            "`hasten bench`'s runner (interleaved repeats, median wall time). The embedded model "
                            "generates all ten digits per run, the video model the chosen digit moving each of "
                            "the four ways, so digit (and motion) accuracy here is over a set.")
                with gr.Row():
                    thresholds = gr.Textbox(DEFAULT_SWEEP, label="thresholds", elem_id="thresholds", scale=3)
                    repeats = gr.Slider(1, 5, value=1, step=1, label="interleaved repeats", elem_id="repeats")
                with gr.Row(equal_height=True):
                    sweep_btn = gr.Button("Run sweep", variant="primary", elem_id="run-sweep", scale=3)
                    sweep_cancel = gr.Button("Cancel", variant="stop", elem_id="cancel-sweep", scale=1,
                                             interactive=False)
                sweep_status = gr.Markdown("", elem_id="sweep-status")
                pareto = gr.Plot(label="speed-up vs. PSNR", elem_id="pareto")
                sweep_table = gr.Code(label="bench table", language=None, elem_id="sweep-table")

        gen_inputs = {model, digit, direction, prompt, negative, seed, steps, guidance, size}
        cfg_inputs = {c for _, fams in slots for _, on, comps in fams for c in (on, *comps.values())} | set(slot_on)

        def request_of(data: dict) -> tuple[ModelHandle, GenerationRequest]:
            handle = cache.get(data[model])
            for name, comp in (("seed", seed), ("steps", steps), ("guidance scale", guidance)):
                if data[comp] is None:
                    raise ValueError(f"{name} is empty")
            req = GenerationRequest(
                prompt=data[prompt] or "", negative_prompt=data[negative] or "", seed=data[seed],
                steps=data[steps], guidance=data[guidance],
                size=None if handle.size_fixed or data[size] is None else data[size],
                digit=int(data[digit]) if handle.digits and data[digit] is not None else None,
                direction=data[direction] if handle.directions else None,
            )
            return handle, req

        def on_load(name: str):
            try:
                h = cache.get(name)
            except ModelLoadError as exc:
                log.info("model not loaded: %s", exc)
                gr.Warning(str(exc))
                return {model_status: f"**could not load** `{name}`: {exc}"}
            what = (f"digits 0-9 moving {'/'.join(h.directions)}, {h.frames} frames at {h.default_size} px"
                    if h.directions else f"digits 0-9 at {h.default_size} px" if h.digits
                    else f"free prompt, default {h.default_size} px")
            return {
                model_status: f"loaded `{h.name}` ({type(h.pipe).__name__}; {what})",
                digit: gr.update(visible=h.digits),
                direction: gr.update(visible=bool(h.directions),
                                     **({"choices": list(h.directions)} if h.directions else {})),
                prompt: gr.update(visible=not h.digits),
                negative: gr.update(visible=not h.digits),
                size: gr.update(visible=False) if h.size_fixed or not h.default_size else
                gr.update(visible=True, value=min(max(h.default_size, SIZE_RANGE[0]), SIZE_RANGE[1])),
                steps: gr.update(value=h.default_steps),
                guidance: gr.update(value=h.default_guidance),
            }

        load_outputs = [model_status, digit, direction, prompt, negative, size, steps, guidance]
        load_btn.click(on_load, model, load_outputs, concurrency_limit=4, api_name="load")  # ModelCache locks
        demo.load(on_load, model, load_outputs, concurrency_limit=4, api_visibility="private")

        @needs_request
        def busy(request: gr.Request):
            stop_event(request).clear()
            return (gr.update(interactive=False, value="Running…"), gr.update(interactive=True),
                    "starting… (waiting for the model if another run is using it)")

        def idle():
            return gr.update(interactive=True, value="Run comparison"), gr.update(interactive=False)

        @needs_request
        def on_compare(data: dict, request: gr.Request, progress=gr.Progress()):  # noqa: B008 - gradio injects
            stop = stop_event(request)
            t0 = time.perf_counter()
            try:
                handle, req = request_of(data)
                context = PanelContext(handle, handle.validate(req), calibrations,
                                       progress=lambda f, d: progress(f, desc=d))
                configs = []
                for slot, fams, on_slot in zip(SLOTS, (f for _, f in slots), slot_on):
                    if not data[on_slot]:
                        continue
                    choices = {spec.family: ({k: data[c] for k, c in comps.items()} if data[on] else None)
                               for spec, on, comps in fams}
                    cfg = configuration(slot, choices, context)
                    if cfg is not None:
                        configs.append(cfg)
                if not configs:
                    gr.Warning("no acceleration is switched on in configurations A-C: showing the baseline only")
                _check_whole("timing repeats", data[timing])
                comp = run_comparison(handle, req, configs, on_progress=lambda f, d: progress(f, desc=d),
                                      repeats=int(data[timing] or 1), should_stop=stop.is_set)
            except Cancelled as exc:
                log.info("demo run stopped: %s", exc)
                return {status: f"**cancelled** ({exc}) after {time.perf_counter() - t0:.1f} s"}
            except (ValueError, ModelLoadError, OutOfMemory) as exc:
                refused[_key(request)] = str(exc)
                raise _user_error(gr, exc) from None
            except Exception as exc:  # noqa: BLE001 - a readable message instead of gradio's bare "Error"
                log.exception("demo run failed")
                refused[_key(request)] = f"generation failed: {type(exc).__name__}: {exc}"
                raise gr.Error(refused[_key(request)], print_exception=False) from exc
            finally:
                stop.clear()
            out = render(comp)
            out[status] = f"done in {time.perf_counter() - t0:.1f} s"
            return out

        def render(comp: Comparison) -> dict:
            for r in comp.runs[1:]:
                if r.error:
                    gr.Warning(f"{r.name} did not run: {r.error}")
            ok = [r for r in comp.runs if r.image is not None]
            clips = any(r.image.ndim == 4 for r in ok)
            # clips play as looping GIFs side by side; the before/after slider compares their filmstrips
            shows = {r.name: display_clip(r.image) if clips else display_image(r.image) for r in ok}
            pics = {r.name: filmstrip(r.image) if clips else shows[r.name] for r in ok}
            caption = {r.name: r.name + (f" ({r.speedup:.2f}x)" if r.speedup and r is not comp.baseline else "")
                       + (f", reads as {r.digit_read}" if r.digit_read is not None else "")
                       + (f", moves {r.motion_read}" if r.motion_read is not None else "") for r in ok}
            headers, rows = metrics_table(comp)
            others = [r.name for r in ok[1:]]
            req = comp.request
            what = f"digit {req.digit}" if req.digit is not None else f"“{req.prompt}”"
            if req.direction is not None:
                what += f" moving {req.direction}"
            n = max((len(r.speedups) for r in ok), default=1)
            note = (f"{comp.model}: {what}, seed {req.seed}, {req.steps} steps, CFG {req.guidance:g}"
                    + (f", {req.size} px" if req.size else "") + ". Speed-up = baseline time / this one's in the "
                    f"same round, median and min-max over {n} interleaved round(s): on a shared machine single "
                    "runs vary a lot. Forwards count cond + uncond passes through every transformer block. "
                    + ("'reads as N' is what the digit classifier sees in that one image; accuracy over a set of "
                       "digits is in the Sweep tab and `hasten bench`." if req.digit is not None else "")
                    + (f" Clips: {ok[0].image.shape[0]} frames at 8 fps; PSNR over the whole clip, SSIM per frame; "
                       "'reads as N' is the majority over the frames, 'moves X' where the digit's centroid went from "
                       "the first frame to the last (the slider shows every 4th frame)." if clips else ""))
            return {
                gallery: [(shows[r.name], caption[r.name]) for r in ok],
                table: gr.update(value=rows, headers=headers),
                notes: note,
                timeline: _close(timeline_figure(comp)),
                pair: gr.update(choices=others, value=others[0] if others else None),
                slider: (pics[ok[0].name], pics[others[0]]) if others else None,
                shown: pics,
            }

        run_outputs = [gallery, table, notes, timeline, pair, slider, shown, status]
        started = run_btn.click(busy, None, [run_btn, cancel_btn, status], queue=False, api_visibility="private")
        compare_evt = started.then(on_compare, gen_inputs | cfg_inputs | {timing}, run_outputs,
                                   concurrency_id="pipeline", api_name="compare", show_progress_on=[status])
        compare_evt.then(idle, None, [run_btn, cancel_btn], queue=False, api_visibility="private")

        @needs_request
        def after_error(request: Any):
            """gradio's front end skips ``.then`` after an error: restore Run and say why next to it."""
            msg = refused.pop(_key(request), None)  # None: cancelled, whose message is already shown
            return (*idle(), gr.update() if msg is None else f"**refused**: {msg}")

        compare_evt.failure(after_error, None, [run_btn, cancel_btn, status], queue=False, api_visibility="private")

        @needs_request
        def on_cancel(request: gr.Request):
            stop_event(request).set()
            log.info("demo run cancelled by the user")
            return (*idle(), "**cancelled**: the run stops after the current denoising step")

        cancel_btn.click(on_cancel, None, [run_btn, cancel_btn, status], cancels=[compare_evt], queue=False,
                         api_visibility="private")

        @needs_request
        def on_close(request: gr.Request):
            """The page was closed or reloaded: stop that session's run so the model is free for others."""
            with stops_lock:
                ev = stops.pop(_key(request), None)
            refused.pop(_key(request), None)
            if ev is not None:
                ev.set()
                log.info("demo page closed: stopping its run")

        demo.unload(on_close)

        pair.input(lambda name, pics: gr.update() if not name or name not in pics or "baseline" not in pics
                   else (pics["baseline"], pics[name]), [pair, shown], slider, api_visibility="private")

        @needs_request
        def on_sweep(data: dict, request: gr.Request, progress=gr.Progress()):  # noqa: B008
            stop = stop_event(request)

            def report(f: float, d: str) -> None:
                if stop.is_set():
                    raise Cancelled(f"cancelled at {d}")
                progress(f, desc=d)

            try:
                handle, req = request_of(data)
                ts = parse_thresholds(data[thresholds])
                rows = run_sweep(handle, req, ts, int(data[repeats]), on_progress=report)
            except Cancelled as exc:
                return {sweep_status: f"**cancelled** ({exc})"}
            except (ValueError, ModelLoadError, OutOfMemory) as exc:
                refused[_key(request)] = str(exc)
                raise _user_error(gr, exc) from None
            except Exception as exc:  # noqa: BLE001 - a readable message instead of gradio's bare "Error"
                log.exception("demo sweep failed")
                raise gr.Error(f"generation failed: {type(exc).__name__}: {exc}", print_exception=False) from exc
            finally:
                stop.clear()
            from ..bench.report import table as bench_table

            return {pareto: _close(sweep_figure(rows, handle, req)), sweep_table: bench_table(rows),
                    sweep_status: "done"}

        @needs_request
        def sweep_busy(request: gr.Request):
            stop_event(request).clear()
            return gr.update(interactive=False, value="Running…"), gr.update(interactive=True), "starting…"

        def sweep_idle():
            return gr.update(interactive=True, value="Run sweep"), gr.update(interactive=False)

        sweep_started = sweep_btn.click(sweep_busy, None, [sweep_btn, sweep_cancel, sweep_status], queue=False,
                                        api_visibility="private")
        sweep_evt = sweep_started.then(on_sweep, gen_inputs | {thresholds, repeats},
                                       [pareto, sweep_table, sweep_status], concurrency_id="pipeline",
                                       api_name="sweep", show_progress_on=[sweep_status])
        sweep_evt.then(sweep_idle, None, [sweep_btn, sweep_cancel], queue=False, api_visibility="private")

        @needs_request
        def after_sweep_error(request: Any):
            msg = refused.pop(_key(request), None)
            return (*sweep_idle(), gr.update() if msg is None else f"**refused**: {msg}")

        sweep_evt.failure(after_sweep_error, None, [sweep_btn, sweep_cancel, sweep_status], queue=False,
                          api_visibility="private")

        @needs_request
        def on_sweep_cancel(request: gr.Request):
            stop_event(request).set()
            return (*sweep_idle(), "**cancelled**")

        sweep_cancel.click(on_sweep_cancel, None, [sweep_btn, sweep_cancel, sweep_status], cancels=[sweep_evt],
                           queue=False, api_visibility="private")

    demo.queue(default_concurrency_limit=1)
    demo.launch = functools.partial(demo.launch, css=CSS)  # gradio 6 takes css at launch, not in Blocks()
    return demo


def _check_whole(name: str, value: Any) -> None:
    if value is None or isinstance(value, bool) or not float(value).is_integer():
        raise ValueError(f"{name} must be a whole number, got {value!r}")


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
    if args.model in (EMBEDDED, EMBEDDED_VIDEO):  # fit the digit classifier while the user looks at the page
        threading.Thread(target=digit_classifier, name="hasten-digit-classifier", daemon=True).start()
    demo = build_app(device=device, default_model=args.model)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0
