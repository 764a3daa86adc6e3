"""SADA's token-level sparsity in the ComfyUI node ("SADA (hasten)", ``tokens`` input), in the real engine on the
embedded Wan model: fewer rows through block 0's MLP than step-level SADA, close to the no-SADA baseline,
tokens=0 bit-identical to step-level SADA with nothing wired, runs independent, non-Wan models refused."""

from __future__ import annotations

import pytest
import torch

from hasten import metrics

import comfy_env as ce

DIGITS = [0, 1, 2, 3, 4, 5]
STEPS = 20


@pytest.fixture(scope="module")
def setup(comfy):
    """(env, embedded MODEL, sample(model) -> (images, rows into block 0's MLP), baseline (images, rows))."""
    from hasten.nodes.embedded import (
        HastenDecodeDigits,
        HastenDigitPrompt,
        HastenEmptyDigitLatent,
        load_comfy_model,
    )

    torch.set_num_threads(1)
    model = load_comfy_model()
    pos = [[torch.cat([ce.call_node(HastenDigitPrompt, f"digit {d}")[0][0][0] for d in DIGITS]), {}]]
    neg = [[torch.cat([ce.call_node(HastenDigitPrompt, "")[0][0][0]] * len(DIGITS)), {}]]
    lat = ce.call_node(HastenEmptyDigitLatent, 32, len(DIGITS))[0]

    def sample(m):
        rows = [0]
        mlp_in = m.model.diffusion_model.blocks[0].ffn[0]  # the real work below every hook
        handle = mlp_in.register_forward_pre_hook(
            lambda mod, a: rows.__setitem__(0, rows[0] + a[0].numel() // a[0].shape[-1]))
        try:
            (out,) = comfy.nodes.KSampler().sample(m, 0, STEPS, 4.0, "euler", "simple", pos, neg, lat, denoise=1.0)
        finally:
            handle.remove()
        return ce.call_node(HastenDecodeDigits, out)[0].permute(0, 3, 1, 2), rows[0]

    return comfy, model, sample, sample(model)


@pytest.fixture(scope="module")
def step_level(setup):
    """Today's node (no tokens input given), step-level at max_interval=1: (images, rows), sampled once."""
    env, model, sample, _ = setup
    return sample(_sada(env, model, max_interval=1))


def _sada(env, model, **kw):
    return ce.call_node(env.node_classes["HastenSADA"], model, **kw)[0]


def _wiring(m) -> tuple[int, bool, int]:
    """(block replacements, attention override present, DIFFUSION_MODEL wrappers) on a patched MODEL."""
    import comfy.patcher_extension as pe

    topts = m.model_options.get("transformer_options", {})
    dit = topts.get("patches_replace", {}).get("dit", {})
    return len(dit), "optimized_attention_override" in topts, len(m.get_all_wrappers(pe.WrappersMP.DIFFUSION_MODEL))


def test_tokens_prune_rows_below_the_hooks_and_stay_close(setup, step_level, caplog):
    env, model, sample, (base, base_rows) = setup
    step_img, step_rows = step_level
    tok_model = _sada(env, model, max_interval=1, tokens=0.25)
    assert _wiring(tok_model)[0] == len(model.model.diffusion_model.blocks) and _wiring(tok_model)[1]
    with caplog.at_level("INFO", logger="hasten"):
        tok_img, tok_rows = sample(tok_model)
    # measured (20 steps, 6 digits): 0.61 of the baseline rows vs 0.82 step-level; 52.0 vs 52.4 dB
    assert tok_rows < 0.7 * base_rows and tok_rows < step_rows < base_rows, (tok_rows, step_rows, base_rows)
    assert any("token-level" in r.getMessage() for r in caplog.records)
    text = tok_model.model_options["transformer_options"]["hasten_sada"].stats_text()
    assert "computed token-level (25% of their tokens)" in text
    p_tok, p_step = metrics.psnr(tok_img, base), metrics.psnr(step_img, base)
    assert p_tok > 48.0 and p_step > 48.0, (p_tok, p_step)
    assert metrics.read_digits(tok_img) == metrics.read_digits(base)
    again, again_rows = sample(tok_model)  # per-run state: a second run starts fresh and repeats exactly
    assert torch.equal(again, tok_img) and again_rows == tok_rows


def test_token_only_is_not_a_silent_no_op(setup):
    """No step skipped (max_interval=0): only the token path can cut rows; measured 0.74 of the rows, 45.1 dB."""
    env, model, sample, (base, base_rows) = setup
    img, rows = sample(_sada(env, model, max_interval=0, tokens=0.25))
    assert rows <= 0.8 * base_rows, (rows, base_rows)
    assert not torch.equal(img, base) and metrics.psnr(img, base) > 41.0


def test_tokens_zero_is_step_level_sada_bit_for_bit(setup, step_level):
    env, model, sample, _ = setup
    zero = _sada(env, model, max_interval=1, tokens=0.0)
    assert _wiring(zero) == _wiring(_sada(env, model, max_interval=1)) == _wiring(model)  # nothing token-level wired
    a, rows_a = step_level
    b, rows_b = sample(zero)
    assert torch.equal(a, b) and rows_a == rows_b
    # re-patching a token-level MODEL with tokens=0 removes the token wiring (it replaces, never stacks)
    back = _sada(env, _sada(env, model, max_interval=1, tokens=0.25), max_interval=1, tokens=0.0)
    assert _wiring(back) == _wiring(model)


def test_non_wan_models_and_block_caches_are_refused(setup):
    env, model, _, _ = setup
    sd15 = ce.tiny_sd15()
    with pytest.raises(Exception, match="Wan") as err:
        _sada(env, sd15, tokens=0.25)
    assert "tokens = 0" in str(err.value)
    _sada(env, sd15, max_interval=1)  # step-level SADA still works on it
    delta = ce.call_node(env.node_classes["HastenDeltaDiT"], model)[0]
    with pytest.raises(Exception, match="replaced"):
        _sada(env, delta, tokens=0.25)
    sparse = ce.call_node(env.node_classes["HastenSparseAttention"], model, target_mass=0.95, warmup_steps=2)[0]
    with pytest.raises(Exception, match="Sparse Attention"):
        _sada(env, sparse, tokens=0.25)


def test_per_frame_modulation_is_spread_like_the_block_does(comfy):
    """Wan 2.2's per-frame timestep modulation (vec ``(B, F, 6, C)``) is spread to tokens exactly as the block's
    ``repeat_e`` spreads it, before the kept tokens are taken from it."""
    import sys

    from comfy.ldm.wan.model import repeat_e

    mod = sys.modules[comfy.node_classes["HastenSADA"].__module__]
    for frames, n in ((3, 12), (3, 10), (5, 5)):
        vec = torch.randn(2, frames, 6, 4)
        got = mod._per_token(vec, n)
        x = torch.zeros(2, n, 4)
        for c in range(6):
            torch.testing.assert_close(got[:, :, c], repeat_e(vec[:, :, c], x))


def test_video_model_frames_and_rotary_tables_follow_the_tokens(comfy):
    """The embedded video model (17 latent frames of 8x8, 1088 tokens): the kept tokens span frames, the rotary
    table is sliced per token. Measured (12 steps): 0.65 of the rows at 46.2 dB latent PSNR vs step-level SADA's
    0.75 at 47.2 dB; token-only 0.75 at 43.7 dB."""
    from hasten.embedded.video import VIDEO_WEIGHTS_DIR
    from hasten.nodes.embedded import HastenEmptyDigitVideoLatent, HastenMovingDigitPrompt, load_comfy_model

    if not (VIDEO_WEIGHTS_DIR / "model_index.json").exists():
        pytest.skip(f"no embedded video model at {VIDEO_WEIGHTS_DIR}")
    torch.set_num_threads(1)
    model = load_comfy_model(model="video")
    pos, neg = ce.call_node(HastenMovingDigitPrompt, 3, "left")
    lat = ce.call_node(HastenEmptyDigitVideoLatent, 17, 16, 1)[0]

    def sample(m):
        rows = [0]
        handle = m.model.diffusion_model.blocks[0].ffn[0].register_forward_pre_hook(
            lambda mod, a: rows.__setitem__(0, rows[0] + a[0].numel() // a[0].shape[-1]))
        try:
            (out,) = comfy.nodes.KSampler().sample(m, 5, 12, 4.0, "euler", "simple", pos, neg, lat, denoise=1.0)
        finally:
            handle.remove()
        return out["samples"], rows[0]

    def psnr(a, b):
        return 10 * torch.log10((b.max() - b.min()) ** 2 / (a - b).pow(2).mean()).item()

    base, base_rows = sample(model)
    _, step_rows = sample(_sada(comfy, model, max_interval=1))
    tok, tok_rows = sample(_sada(comfy, model, max_interval=1, tokens=0.25))
    only, only_rows = sample(_sada(comfy, model, max_interval=0, tokens=0.25))
    assert tok_rows < step_rows < base_rows and only_rows < base_rows, (tok_rows, step_rows, only_rows, base_rows)
    assert psnr(tok, base) > 42.0 and psnr(only, base) > 40.0, (psnr(tok, base), psnr(only, base))


def test_a_later_node_replacing_the_wiring_is_reported_not_silent(comfy, caplog):
    """Loader-detected tiny Wan 2.1: token-level works; a node applied *after* SADA that replaces its block patches
    (Δ-DiT) or attention override (Sparse Attention) turns the token level off for the run with a warning."""
    wan = ce.tiny_wan()

    def rows(m):
        n = [0]
        handle = m.model.diffusion_model.blocks[0].ffn[0].register_forward_pre_hook(
            lambda mod, a: n.__setitem__(0, n[0] + a[0].numel() // a[0].shape[-1]))
        try:
            out = ce.run_ksampler(comfy, m, "wan", steps=12)
        finally:
            handle.remove()
        assert torch.isfinite(out).all()
        return n[0]

    base = rows(wan)
    tok = _sada(comfy, wan, max_interval=0, tokens=0.5)
    assert rows(tok) < base
    later = {"HastenDeltaDiT": {}, "HastenSparseAttention": dict(target_mass=0.95, warmup_steps=2)}
    for node_id, kw in later.items():
        caplog.clear()
        m = ce.call_node(comfy.node_classes[node_id], tok, **kw)[0]
        with caplog.at_level("WARNING", logger="hasten"):
            n = rows(m)
        assert any("step-level SADA only" in r.getMessage() for r in caplog.records), node_id
        assert n <= base  # (Δ-DiT may skip blocks itself; nothing is pruned token-level)
