"""hasten.check(pipe): its prediction (before any run) must agree with what each feature then does.

The outcomes come from the coverage matrix (``hasten.bench.coverage.cell``, memoised, so the matrix
test reuses these runs): a feature predicted to engage must work, a feature predicted unsupported must
raise ``UnsupportedModelError`` when used.
"""

from __future__ import annotations

import json

import families
import pytest

from hasten.bench import coverage
from hasten.pipelines import features
from hasten.pipelines.check import FEATURES, CheckReport, check, check_path

CELLS = [(f, x) for f in families.NAMES for x in coverage.FEATURES]


@pytest.mark.parametrize(("family", "feature"), CELLS, ids=[f"{f}-{x}" for f, x in CELLS])
def test_check_predicts_the_matrix(family: str, feature: str) -> None:
    cell = coverage.cell(family, feature)
    if not cell.ok:
        pytest.skip(f"the feature itself fails here ({cell.status}: {cell.detail[:120]}); "
                    "tests/test_coverage_matrix.py reports it")
    assert cell.agrees, (f"{family} x {feature}: hasten.check predicted {cell.predicted!r} but the feature "
                         f"{'works' if cell.status == coverage.WORKS else 'refused: ' + cell.detail}")


def test_report_shape_and_no_side_effects() -> None:
    pipe, kw = families.build("sd3")
    before = families.call(pipe, kw, steps=2)
    rep = check(pipe)
    assert isinstance(rep, CheckReport) and set(rep.features) == set(FEATURES)
    d = rep.to_dict()
    json.dumps(d)  # plain data
    assert d["pipeline"] == "StableDiffusion3Pipeline" and d["facts"]["denoisers"] == {
        "transformer": "SD3Transformer2DModel"}
    text = str(rep)
    for name in FEATURES:
        assert f"| {name} |" in text
    assert rep.will_engage("easycache")
    after = families.call(pipe, kw, steps=2)
    assert before.equal(after)  # check() enabled and disabled features: the pipeline is exactly as it was
    assert not features(pipe)


def test_already_enabled_feature_is_left_alone() -> None:
    pipe, _ = families.build("sd3")
    pipe.enable_easycache(threshold=0.3)
    rep = check(pipe)
    assert rep.features["easycache"].status == "enabled"
    assert features(pipe)["easycache"].config.threshold == 0.3
    pipe.disable_easycache()


def test_no_denoiser_is_unsupported_everywhere() -> None:
    from diffusers import DDPMPipeline, DDPMScheduler

    class NoDenoiser(DDPMPipeline):
        pass

    pipe = NoDenoiser.__new__(NoDenoiser)
    pipe.scheduler = DDPMScheduler()
    rep = check(pipe)
    assert all(not f.engages for f in rep.features.values())
    assert "no transformer or unet" in rep.features["easycache"].reason


def test_check_path_loads_a_local_folder(tmp_path) -> None:
    pipe, _ = families.build("sd3")
    pipe.save_pretrained(tmp_path)
    rep = check_path(tmp_path)  # text encoders / tokenizers are left out (saved as None here anyway)
    assert rep.facts["path"] == str(tmp_path) and rep.pipeline == "StableDiffusion3Pipeline"
    assert rep.will_engage("quantization")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        check_path(tmp_path / "nope")
