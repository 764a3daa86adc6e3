"""Branches from the call pattern: every diffusers CFG layout gets one cache per branch, and adaptive
guidance really drops unconditional work on each of them (counted at the first block, outputs compared).

Layouts covered (tiny pipelines built the way diffusers' own fixtures build them, see families.py):
sequential calls without cache_context (Chroma, Lumina2), batched ``cache_context("cond_uncond")``
(CogVideoX, LTX), batched rows with no CFG flag on the pipeline (PixArt), PAG's 3-row / 2-row batches,
AnimateDiff's frame-folded batch, and ``BaseOutput`` types other than ``.sample`` (PriorTransformer).
"""

from __future__ import annotations

import logging

import families as fam
import pytest
import torch

import hasten

import tiny_pipes as tp

STEPS = fam.STEPS


def _same_negative(kw: dict) -> dict:
    """Negative prompt = positive prompt: cos(cond, uncond) = 1, so dropping uncond changes nothing."""
    kw = dict(kw)
    for pos, neg in (("prompt_embeds", "negative_prompt_embeds"), ("prompt_attention_mask",
                                                                   "negative_prompt_attention_mask")):
        if neg in kw and pos in kw:
            kw[neg] = [t.clone() for t in kw[pos]] if isinstance(kw[pos], list) else kw[pos].clone()
    return kw


class OutputRecorder:
    """What the pipeline receives from each denoiser call (a torch forward hook sits outside hasten's)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.outs: list[torch.Tensor] = []
        self._h = module.register_forward_hook(self._hook)

    def _hook(self, module, args, out) -> None:
        t = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
        self.outs.append(t.detach().clone())

    def remove(self) -> None:
        self._h.remove()


def _ec_stats(pipe):
    return next(iter(hasten.stats(pipe)["easycache"].values()))


def _ag_stats(pipe):
    return next(iter(hasten.stats(pipe)["guidance"].values()))


# -- sequential CFG calls (no cache_context) ----------------------------------------------------------
@pytest.mark.parametrize("name", ["chroma", "lumina2"])
def test_sequential_calls_get_separate_branches(name):
    pipe, kw = fam.build(name)
    base, rows0, calls0 = fam.counted(pipe, kw)
    assert calls0 == 2 * STEPS  # cond call + uncond call per step
    pipe.enable_easycache(0)
    out, rows, _ = fam.counted(pipe, kw)
    assert torch.equal(out, base) and rows == rows0
    pipe.enable_easycache(threshold=5.0, warmup=0.2, max_consecutive_reuse=0)  # loose: reuse a lot
    rec = OutputRecorder(fam.denoisers(pipe)["transformer"])
    out, rows, _ = fam.counted(pipe, kw)
    rec.remove()
    st = _ec_stats(pipe)
    assert set(st.branches) == {"cond[0]", "uncond[0]"}, st.branches
    assert rows < rows0 and st.reused > 0
    # a merged cache answered the uncond call with the cond output: never again
    for step in range(STEPS):
        assert not torch.equal(rec.outs[2 * step], rec.outs[2 * step + 1]), f"step {step}: uncond == cond"
    # cond and uncond of one step decide together (sync_branches), as in batched CFG
    assert st.branches["cond[0]"].decisions == st.branches["uncond[0]"].decisions
    pipe.disable_easycache()
    assert torch.equal(fam.call(pipe, kw), base)


@pytest.mark.parametrize("name", ["chroma", "lumina2"])
def test_guidance_skips_the_uncond_call(name):
    pipe, kw = fam.build(name)
    kw = _same_negative(kw)
    base, rows0, calls0 = fam.counted(pipe, kw)
    pipe.enable_adaptive_guidance(threshold=1.5)  # off
    out, rows, calls = fam.counted(pipe, kw)
    assert torch.equal(out, base) and calls == calls0
    pipe.enable_adaptive_guidance(threshold=0.99)
    out, rows, calls = fam.counted(pipe, kw)
    assert calls == STEPS + 1, "the uncond CALL must be skipped after the first step"
    assert "".join(_ag_stats(pipe).uncond["0"]) == "C" + "." * (STEPS - 1)
    torch.testing.assert_close(out, base, atol=1e-4, rtol=1e-4)  # uncond == cond: CFG == cond exactly
    pipe.disable_adaptive_guidance()


# -- batched under cache_context("cond_uncond"), and Z-Image's [cond, uncond] list batch ------------------
@pytest.mark.parametrize("name", ["cogvideox", "ltx", "z_image"])
def test_cond_uncond_context_rows_dropped(name):
    pipe, kw = fam.build(name)
    kw = _same_negative(kw)
    base, rows0, _ = fam.counted(pipe, kw)
    assert rows0 == 2 * STEPS
    pipe.enable_adaptive_guidance(threshold=0.99)
    out, rows, _ = fam.counted(pipe, kw)
    assert rows == STEPS + 1  # one uncond row at step 0, then cond rows only
    st = _ag_stats(pipe)
    assert st.forwards == rows and st.saved_fraction > 0.4
    torch.testing.assert_close(out, base, atol=1e-4, rtol=1e-4)
    pipe.disable_adaptive_guidance()
    pipe.enable_easycache(threshold=1.0)
    fam.call(pipe, kw)
    assert set(_ec_stats(pipe).branches) == {"cond[0]", "uncond[0]"}
    pipe.disable_easycache()


# -- batched rows without a CFG flag on the pipeline (PixArt) --------------------------------------------
NO_CFG = {"z_image": 0.0}  # guidance_scale that switches CFG off (default 1.0)


@pytest.mark.parametrize("name", ["sd15", "pixart_sigma", "chroma", "lumina2", "cogvideox", "ltx", "z_image",
                                  "wan21", "animatediff"])
def test_dropping_every_uncond_equals_the_cond_only_run(name):
    """The rows/call dropped are really the uncond ones: with uncond dropped at every step, the output equals
    the pipeline's own CFG-off run (cond only). Dropping the cond half instead would give another image."""
    pipe, kw = fam.build(name)
    cond_only = fam.call(pipe, {**kw, "guidance_scale": NO_CFG.get(name, 1.0)})
    base = fam.call(pipe, kw)
    assert not torch.allclose(base, cond_only, atol=1e-3)
    pipe.enable_adaptive_guidance(mode="truncate", truncate=0.0)
    out, rows, calls = fam.counted(pipe, kw)
    assert "".join(_ag_stats(pipe).uncond["0"]) == "." * STEPS
    pipe.disable_adaptive_guidance()
    _, rows1, calls1 = fam.counted(pipe, {**kw, "guidance_scale": NO_CFG.get(name, 1.0)})
    assert (rows, calls) == (rows1, calls1)  # exactly the cond-only work
    torch.testing.assert_close(out, cond_only, atol=1e-4, rtol=1e-4)


def test_pixart_pairs_uncond_and_cond_of_each_item():
    pipe, kw = tp.pixart_sigma(batch=2)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_easycache(threshold=0.5, warmup=0.2)
    tp.run(pipe, kw, seed=[1, 2])
    st = _ec_stats(pipe)
    assert set(st.branches) == {"uncond[0]", "uncond[1]", "cond[0]", "cond[1]"}, st.branches
    for i in range(2):  # sync_branches pairs uncond[i] with cond[i]
        assert st.branches[f"uncond[{i}]"].decisions == st.branches[f"cond[{i}]"].decisions
    assert st.reused > 0
    pipe.disable_easycache()


# -- PAG -----------------------------------------------------------------------------------------------
def test_pag_with_cfg_keeps_the_perturbed_rows():
    pipe, kw = fam.build("sd_pag")
    base, rows0, _ = fam.counted(pipe, kw)
    assert rows0 == 3 * STEPS
    pipe.enable_easycache(0)
    out, rows, _ = fam.counted(pipe, kw)
    assert torch.equal(out, base) and rows == rows0
    pipe.enable_easycache(threshold=2.0, sync_branches=False)
    fam.call(pipe, kw)
    assert set(_ec_stats(pipe).branches) == {"uncond[0]", "cond[0]", "perturbed[0]"}
    pipe.disable_easycache()
    pipe.enable_adaptive_guidance(threshold=0.3)
    out, rows, _ = fam.counted(pipe, kw)
    assert rows == 3 + 2 * (STEPS - 1)  # uncond dropped, cond and perturbed kept
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    pipe.disable_adaptive_guidance()
    assert torch.equal(fam.call(pipe, kw), base)


def test_pag_without_cfg_is_cond_and_perturbed(caplog):
    pipe, kw = fam.build("sd_pag")
    kw = {**kw, "guidance_scale": 1.0}
    base, rows0, _ = fam.counted(pipe, kw)
    assert rows0 == 2 * STEPS
    pipe.enable_easycache(threshold=2.0)
    fam.call(pipe, kw)
    assert set(_ec_stats(pipe).branches) == {"cond[0]", "perturbed[0]"}
    pipe.disable_easycache()
    pipe.enable_adaptive_guidance(threshold=0.3)
    with caplog.at_level(logging.WARNING, logger="hasten"):
        out, rows, _ = fam.counted(pipe, kw)
    assert torch.equal(out, base) and rows == rows0  # nothing to drop ...
    assert sum("does nothing" in r.message for r in caplog.records) == 1  # ... and it says so, once
    pipe.disable_adaptive_guidance()


# -- frame-folded batch and other output types -----------------------------------------------------------
def test_animatediff_guidance_slices_frame_folded_conditioning():
    pipe, kw = fam.build("animatediff")
    kw = _same_negative(kw)
    base, rows0, _ = fam.counted(pipe, kw)
    pipe.enable_adaptive_guidance(threshold=0.99)
    out, rows, _ = fam.counted(pipe, kw)
    assert rows < rows0
    torch.testing.assert_close(out, base, atol=1e-4, rtol=1e-4)
    pipe.disable_adaptive_guidance()


def test_prior_transformer_output_is_understood():
    from diffusers.models.transformers.prior_transformer import PriorTransformerOutput

    from hasten.pipelines.denoiser import OutputPacker, main_tensor

    t = torch.randn(2, 3)
    res = PriorTransformerOutput(predicted_image_embedding=t)
    assert main_tensor(res) is t
    p = OutputPacker()
    p.learn(res)
    packed = p.pack(t * 2, None)
    assert isinstance(packed, PriorTransformerOutput) and torch.equal(packed.predicted_image_embedding, t * 2)
    with pytest.raises(hasten.UnsupportedModelError, match="output type"):
        main_tensor(object())


def test_guidance_logs_once_per_run(caplog):
    pipe, kw = fam.build("chroma")
    pipe.enable_adaptive_guidance(threshold=0.3)
    with caplog.at_level(logging.INFO, logger="hasten"):
        fam.call(pipe, kw)
        fam.call(pipe, kw)
    msgs = [r.message for r in caplog.records if "adaptive guidance (ag)" in r.message]
    assert len(msgs) == 2 and "uncond rows dropped" in msgs[0], msgs
    pipe.disable_adaptive_guidance()


def test_easycache_logs_each_run_with_all_its_calls(caplog):
    pipe, kw = fam.build("lumina2")  # two sequential calls per step: the log must count the last uncond call too
    pipe.enable_easycache(threshold=5.0)
    with caplog.at_level(logging.INFO, logger="hasten"):
        fam.call(pipe, kw)
        fam.call(pipe, kw)
    msgs = [r.message for r in caplog.records if "EasyCache" in r.message]
    assert len(msgs) == 2 and f"/{2 * STEPS} branch forwards" in msgs[0], msgs
    pipe.disable_easycache()


def test_unknown_three_way_batch_cached_apart_and_guidance_refuses():
    """InstructPix2Pix batches [text, image, none]: EasyCache keeps three branches; AG says it cannot pair them."""
    import diffusers

    pipe = diffusers.StableDiffusionInstructPix2PixPipeline(**fam._sd_parts(fam._sd_unet(7, in_channels=8)))
    pipe.set_progress_bar_config(disable=True)
    kw = {**fam._sd_embeds(), "image": fam._image(), "output_type": "latent"}
    base, rows0, _ = fam.counted(pipe, kw)
    assert rows0 == 3 * STEPS
    pipe.enable_easycache(0)
    assert torch.equal(fam.call(pipe, kw), base)
    pipe.enable_easycache(threshold=2.0)
    fam.call(pipe, kw)
    assert set(_ec_stats(pipe).branches) == {"part0[0]", "part1[0]", "part2[0]"}
    pipe.disable_easycache()
    pipe.enable_adaptive_guidance(threshold=0.5)
    with pytest.raises(hasten.UnsupportedModelError, match="StableDiffusionInstructPix2PixPipeline"):
        fam.call(pipe, kw)
    pipe.disable_adaptive_guidance()
    assert torch.equal(fam.call(pipe, kw), base)


class _GuiderLoop:
    """A minimal pipeline in the style of diffusers' guider pipelines (HunyuanImage 2.1, MotifVideo): each
    prediction runs under ``cache_context(<guider identifier>)``, "pred_cond" then "pred_uncond"."""

    def __init__(self, transformer, scheduler) -> None:
        self.transformer, self.scheduler = transformer, scheduler

    def __call__(self, x, cond, uncond, steps: int = STEPS, scale: float = 5.0):
        self.scheduler.set_timesteps(steps)
        for t in self.scheduler.timesteps:
            preds = {}
            for name, emb in (("pred_cond", cond), ("pred_uncond", uncond)):
                with self.transformer.cache_context(name):
                    preds[name] = self.transformer(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=emb,
                                                   return_dict=False)[0]
            pred = preds["pred_uncond"] + scale * (preds["pred_cond"] - preds["pred_uncond"])
            x = self.scheduler.step(pred, t, x, return_dict=False)[0]
        return x


def test_guider_identifiers_are_branches():
    pipe, kw = tp.wan()
    loop = _GuiderLoop(pipe.transformer, pipe.scheduler)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 1, 2, 2, generator=g)
    cond, uncond = kw["prompt_embeds"], kw["negative_prompt_embeds"]
    with fam.FirstBlockCounter(pipe) as c:
        base = loop(x, cond, uncond)
        cond_only = loop(x, cond, cond)
        assert c.take() == (4 * STEPS, 4 * STEPS)
        pipe.enable_easycache(threshold=1.0)
        loop(x, cond, uncond)
        assert set(_ec_stats(pipe).branches) == {"cond[0]", "uncond[0]"}
        pipe.disable_easycache()
        c.take()
        pipe.enable_adaptive_guidance(mode="truncate", truncate=0.0)
        out = loop(x, cond, uncond)
        assert c.take() == (STEPS, STEPS)  # every pred_uncond call skipped
    pipe.disable_adaptive_guidance()
    assert not torch.allclose(base, cond_only)
    torch.testing.assert_close(out, cond_only, atol=1e-5, rtol=1e-5)
