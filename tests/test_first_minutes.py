"""The first five minutes of a new user: light import, the shortest call, and a CLI that fails early and clearly."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import hasten
from hasten import cli
from hasten.embedded import WEIGHTS_DIR

HEAVY = ("torch", "diffusers", "transformers", "gradio", "sklearn", "matplotlib", "scipy", "comfy", "triton")


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_hasten_and_cli_help_load_nothing_heavy():
    loaded = _python(f"""
        import sys, contextlib, io
        import hasten
        from hasten.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                main(["--help"])
            except SystemExit:
                pass
        print(",".join(m for m in {HEAVY!r} if m in sys.modules))
    """)
    assert loaded == "", f"`import hasten` / `hasten --help` imported: {loaded}"


@pytest.mark.parametrize("diffusers_first", [False, True])
def test_pipeline_methods_appear_whenever_diffusers_loads(diffusers_first):
    first, second = ("import diffusers", "import hasten") if diffusers_first else ("import hasten", "import diffusers")
    out = _python(f"""
        {first}
        {second}
        from diffusers import DiffusionPipeline, WanPipeline
        print(all(hasattr(c, m) for c in (DiffusionPipeline, WanPipeline)
                  for m in ("enable_easycache", "disable_easycache", "quantize", "enable_adaptive_guidance",
                            "enable_sparse_attention", "enable_bottleneck_sampling", "hasten_summary")))
    """)
    assert out == "True"


def test_public_names_resolve():
    for name in hasten.__all__:
        assert getattr(hasten, name) is not None, name
    with pytest.raises(AttributeError):
        hasten.no_such_thing  # noqa: B018


@pytest.fixture(scope="module")
def pipe():
    return hasten.load_embedded()


def test_shortest_call_uses_the_trained_defaults(pipe):
    """`pipe(prompt="digit 3")` alone works and equals the call with every trained setting spelled out."""
    short = pipe(prompt="digit 3", generator=torch.Generator().manual_seed(5), output_type="pt").frames
    full = pipe(prompt="digit 3", negative_prompt="", height=32, width=32, num_frames=1, num_inference_steps=20,
                guidance_scale=4.0, generator=torch.Generator().manual_seed(5), output_type="pt").frames
    assert short.shape == (1, 1, 3, 32, 32)
    assert torch.equal(short, full)
    # what the caller passes wins over the defaults
    few = pipe(prompt="digit 3", num_inference_steps=3, generator=torch.Generator().manual_seed(5), output_type="pt").frames
    assert not torch.equal(few, short)


def test_shortest_call_draws_the_digit(pipe):
    from hasten import metrics

    imgs = torch.cat([pipe(prompt=f"digit {d}", generator=torch.Generator().manual_seed(d), output_type="pt").frames[:, 0]
                      for d in range(10)])
    assert metrics.digit_accuracy(imgs, list(range(10)))["accuracy"] >= 0.8


# ----------------------------------------------------------------------------------------- the CLI

@pytest.mark.parametrize("argv", [
    ["bench", "--steps", "0"], ["bench", "--seeds", "0"], ["bench", "--guidance", "nan"],
    ["bench", "--preset", "nope"], ["bench", "--digits", "3a"], ["generate", "--steps", "2.5"],
    ["generate", "--guidance", "inf"], ["generate", "--seed", "-1"], ["train-embedded", "--steps", "0"],
])
def test_bad_arguments_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_help_lists_every_preset(capsys):
    from hasten.bench.cli import PRESETS
    from hasten.bench.variants import preset

    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = capsys.readouterr().out
    for name in PRESETS:
        assert name in text
        assert preset(name, 20)  # every advertised preset exists
    assert "``" not in text  # no reStructuredText markup in help


def test_unwritable_output_fails_before_any_work(monkeypatch, capsys, tmp_path):
    import hasten.embedded as emb

    def boom(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(emb, "load_embedded", boom)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["generate", "--out", str(blocker / "sub" / "x.png")]) == 2
    assert cli.main(["bench", "--out", str(blocker / "sub"), "--comfyui", "off"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 2


def test_train_embedded_never_overwrites_the_shipped_weights_by_default(capsys):
    assert cli.main(["train-embedded", "--out", str(WEIGHTS_DIR)]) == 2
    assert "shipped" in capsys.readouterr().err


def test_generate_reports_where_it_wrote(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert cli.main(["generate", "--digits", "37", "--steps", "4", "--out", str(out), "--no-progress"]) == 0
    from PIL import Image

    assert Image.open(out).size == (64, 32)
    assert str(out.resolve()) in capsys.readouterr().out


def test_one_image_bench_completes(tmp_path):
    """A one-image bench measures every row (no Fréchet distance: it needs two images) instead of failing."""
    import json

    assert cli.main(["bench", "--preset", "quick", "--digits", "3", "--seeds", "1", "--repeats", "1", "--steps", "3",
                     "--comfyui", "off", "--no-progress", "--out", str(tmp_path)]) == 0
    rows = {r["name"]: r for r in json.loads(Path(tmp_path / "bench.json").read_text())["rows"]}
    assert "baseline" in rows and len(rows) >= 3
    for name, r in rows.items():
        assert r["error"] is None, (name, r["error"])
        assert r["frechet"] is None and r["accuracy"] in (0.0, 1.0) and r["speedup"] > 0
        assert r["forwards_per_image"] <= rows["baseline"]["forwards_per_image"]
        if name != "baseline":
            assert r["psnr"] is not None and float(r["psnr"]) > 10  # vs. the same-seed baseline ("inf": identical)
