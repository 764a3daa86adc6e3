"""SADA's token-level sparsity: the core (scores, kept-token choice, pruned-token fill, per-branch state), the
diffusers wiring on the embedded Wan models (fewer rows through block 0's MLP, close to the baseline, tokens=None
bit-identical to step-level SADA, restore-exact, unsupported models refused)."""

from __future__ import annotations

import pytest
import torch
from conftest import EMBEDDED_DIGITS

import hasten
from hasten import metrics
from hasten.caches.sada import SADA, SADAConfig
from hasten.caches.sada_tokens import choose_tokens, latent_mask, spread_tokens, token_grid, token_scores
from hasten.errors import UnsupportedModelError

PATCH = (1, 2, 2)


# -- core ----------------------------------------------------------------------------------------
def test_grid_spread_and_choice():
    assert token_grid((1, 16, 1, 16, 16), PATCH) == (1, 8, 8)
    assert token_grid((1, 4, 16, 16), PATCH) == (1, 8, 8)  # images: one frame
    spread = spread_tokens((2, 8, 8), 2)
    assert spread.numel() == 2 * 4 * 4 and len(set(spread.tolist())) == spread.numel()
    rows = {(int(i) % 64) // 8 for i in spread}  # every other row and column of both frames is covered
    assert rows == {0, 2, 4, 6}
    scores = torch.zeros(64)
    scores[[1, 3, 5, 7, 9, 11, 13, 15]] = torch.arange(1.0, 9.0)
    kept = choose_tokens(scores, (1, 8, 8), 0.5, 2)
    assert kept.numel() == 32 and torch.equal(kept, kept.sort().values)
    assert set(spread_tokens((1, 8, 8), 2).tolist()) <= set(kept.tolist())  # no region starves
    assert set([1, 3, 5, 7, 9, 11, 13, 15]) <= set(kept.tolist())  # then the fastest-moving tokens


def test_scores_follow_each_token_and_mask_covers_its_patch():
    f1 = torch.zeros(1, 4, 1, 4, 4)
    f2 = f1.clone()
    f2[..., 0:2, 2:4] = 1.0  # only token (row 0, col 1) moves
    s = token_scores([(0, f1), (1, f2)], PATCH)
    assert s.shape == (4,) and int(s.argmax()) == 1 and s[[0, 2, 3]].abs().max() == 0
    assert token_scores([(0, f1)], PATCH) is None
    m = latent_mask(torch.tensor([1]), (1, 2, 2), PATCH, f1)
    assert m.shape == (1, 1, 1, 4, 4) and m.sum() == 4 and m[..., 0:2, 2:4].all()


def _drive(cache: SADA, traj, steps: int, keys=("a",), shape=(1, 4, 1, 8, 8)):
    """Computed calls return traj(key, step); token-level calls keep only the kept tokens' true values."""
    cache.begin_run(steps)
    x = torch.ones(shape)
    kinds, outs = {k: [] for k in keys}, {k: [] for k in keys}
    for s in range(steps):
        for key in keys:
            if not cache.should_compute(key, x, s, steps):
                kinds[key].append("skip")
                outs[key].append(cache.reuse(key, x))
                continue
            plan = cache.token_plan([key], [x], PATCH)
            out = cache.fill(key, traj(key, s).clone())
            kinds[key].append("full" if plan is None else "tokens")
            cache.remember(key, x, out)
            outs[key].append(out)
    return kinds, outs


def test_off_and_token_free_settings_never_prune():
    traj = lambda k, s: torch.full((1, 4, 1, 8, 8), float(s))  # noqa: E731
    for cfg in (SADAConfig(max_interval=0), SADAConfig(max_interval=2), SADAConfig(max_interval=0, tokens=1.0)):
        kinds, _ = _drive(SADA(cfg), traj, 12)
        assert "tokens" not in kinds["a"]
    assert SADAConfig(max_interval=0).is_off and not SADAConfig(max_interval=0, tokens=0.5).is_off


def test_token_level_calls_keep_fast_tokens_and_reuse_stable_ones():
    def traj(key, s):
        f = torch.zeros(1, 4, 1, 8, 8)
        f[..., :4, :] = float(s)  # the top half moves, the bottom half is still
        return f

    # 4x4 tokens: 8 moving ones + the one spread token (stride 8: a single cell) = 9 of 16
    cache = SADA(SADAConfig(max_interval=0, tokens=9 / 16, token_stride=8, start=0.2, end=1.0, token_interval=1))
    kinds, outs = _drive(cache, traj, 12)
    k = kinds["a"]
    assert k[:3] == ["full"] * 3 and k[-1] == "full" and k.count("tokens") >= 3
    assert all(not (a == b == "tokens") for a, b in zip(k, k[1:], strict=False))  # token_interval=1
    for s in range(len(k)):  # the moving half is always computed, the still half reused exactly
        torch.testing.assert_close(outs["a"][s], traj("a", s))
    assert cache.token_calls == k.count("tokens") and cache.tokens_kept == 9 * cache.token_calls


def test_branches_have_their_own_tokens_and_runs_reset():
    def traj(key, s):
        f = torch.zeros(1, 4, 1, 8, 8)
        if key == "a":
            f[..., :4, :] = float(s)
        else:
            f[..., 4:, :] = float(s)
        return f

    cache = SADA(SADAConfig(max_interval=0, tokens=9 / 16, token_stride=8, start=0.2, end=1.0))
    x = torch.ones(1, 4, 1, 8, 8)
    cache.begin_run(10)
    for s in range(4):
        for key in "ab":
            cache.should_compute(key, x, s, 10)
            cache.token_plan([key], [x], PATCH)
            cache.remember(key, x, traj(key, s))
    for key in "ab":
        cache.should_compute(key, x, 4, 10)
    plans = cache.token_plan(["a", "b"], [x, x], PATCH)
    assert plans is not None
    a, b = (set(p.tolist()) for p in plans)
    assert set(range(8)) <= a and len(a - set(range(8))) == 1  # each branch keeps its own moving half
    assert set(range(8, 16)) <= b and len(b & set(range(8))) == 1  # (+ one more: spread token / tie)
    cache.end_run()
    cache.begin_run(10)
    cache.should_compute("a", x, 4, 10)
    assert cache.token_plan(["a"], [x], PATCH) is None  # nothing carried into the next run


@pytest.mark.parametrize("bad", [dict(tokens=0.0), dict(tokens=1.5), dict(token_stride=0), dict(token_interval=0),
                                 dict(token_order=2)])
def test_bad_token_settings_are_rejected(bad):
    with pytest.raises((TypeError, ValueError)):
        SADAConfig(**bad)


# -- the embedded image model (diffusers) --------------------------------------------------------
def _ffn_rows(pipe):
    """Rows (tokens x batch) entering block 0's MLP: the real work below every hook."""
    rows = [0]
    lin = pipe.transformer.blocks[0].ffn.net[0].proj
    handle = lin.register_forward_pre_hook(lambda m, a: rows.__setitem__(0, rows[0] + a[0].numel() // a[0].shape[-1]))
    return rows, handle


def _run(pipe, gen, **kw):
    rows, handle = _ffn_rows(pipe)
    if kw:
        pipe.enable_sada(**kw)
    try:
        img, _ = gen()
        st = hasten.stats(pipe).get("sada") if kw else None
    finally:
        handle.remove()
        if kw:
            pipe.disable_sada()
    return img, rows[0], st


def test_tokens_prune_rows_below_the_hooks_and_stay_close(embedded, caplog):
    pipe, gen, (base, _) = embedded
    blocks = [b.forward for b in pipe.transformer.blocks] + [b.attn1.forward for b in pipe.transformer.blocks]
    _, base_rows, _ = _run(pipe, gen)
    step_img, step_rows, _ = _run(pipe, gen, max_interval=2)
    with caplog.at_level("INFO", logger="hasten"):
        tok_img, tok_rows, _ = _run(pipe, gen, max_interval=1, tokens=0.25)
    assert tok_rows < step_rows < base_rows, (tok_rows, step_rows, base_rows)  # measured 0.62 vs 0.68 of base
    assert any("token-level" in r.getMessage() for r in caplog.records)
    p_tok, p_step = metrics.psnr(tok_img, base), metrics.psnr(step_img, base)
    assert p_tok > max(p_step, 40.0), (p_tok, p_step)  # measured 45.7 vs 39.0 dB
    read_base, read_tok = metrics.read_digits(base), metrics.read_digits(tok_img)
    assert sum(a == b for a, b in zip(read_base, read_tok, strict=True)) >= len(EMBEDDED_DIGITS) - 1
    assert [b.forward for b in pipe.transformer.blocks] + [b.attn1.forward for b in pipe.transformer.blocks] == blocks


def test_tokens_none_is_step_level_sada_bit_for_bit(embedded):
    pipe, gen, _ = embedded
    a, rows_a, _ = _run(pipe, gen, max_interval=1)
    b, rows_b, _ = _run(pipe, gen, max_interval=1, tokens=None)
    c, rows_c, _ = _run(pipe, gen, max_interval=1, tokens=1.0)  # every token kept: no token wiring at all
    assert torch.equal(a, b) and torch.equal(a, c) and rows_a == rows_b == rows_c


def test_token_silent_no_op_would_fail(embedded):
    """Token-only SADA (no step skipped) must still cut block-0 MLP rows: a token path doing nothing fails here."""
    pipe, gen, (base, _) = embedded
    _, base_rows, _ = _run(pipe, gen)
    img, rows, _ = _run(pipe, gen, max_interval=0, tokens=0.25)
    assert rows <= 0.85 * base_rows, (rows, base_rows)  # every other computed step in the range at 1/4 of the tokens
    assert not torch.equal(img, base) and metrics.psnr(img, base) > 28.0


def test_unsupported_family_is_refused_and_left_untouched():
    from tiny_pipes import flux

    pipe, _ = flux()
    fwd = pipe.transformer.forward
    with pytest.raises(UnsupportedModelError, match="Wan"):
        pipe.enable_sada(tokens=0.5)
    assert pipe.transformer.forward == fwd and "sada" not in hasten.features(pipe)
    pipe.enable_sada(max_interval=1)  # step-level SADA still works on it
    pipe.disable_sada()
