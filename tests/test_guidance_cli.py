"""`hasten calibrate-guidance` on the embedded model: writes coefficients LinearAG then loads by itself."""

from __future__ import annotations

import json

import torch

import hasten
from hasten import metrics
from hasten.cli import main
from hasten.embedded import generate_digits


def test_calibrate_guidance_cli_then_linear_ag(tmp_path, monkeypatch):
    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path / "cache"))
    assert main(["calibrate-guidance", "--seeds", "1", "--steps", "6", "--prompts", "digit 1", "digit 7"]) == 0
    files = list((tmp_path / "cache").rglob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["num_steps"] == 6
    pipe = hasten.load_embedded()
    base = generate_digits(pipe, [1, 7], seed=3, steps=6)
    pipe.enable_adaptive_guidance(mode="linear")  # finds the file by the model's key, no path given
    out = generate_digits(pipe, [1, 7], seed=3, steps=6)
    st = next(iter(hasten.stats(pipe)["guidance"].values()))
    pipe.disable_adaptive_guidance()
    assert st.forwards < st.baseline_forwards
    assert torch.isfinite(out).all() and metrics.psnr(out, base) > 15
