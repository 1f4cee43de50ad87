"""Bad inputs get a clear error, never a silent repair or a non-finite result (a start on the hardening corpus)."""
from __future__ import annotations

import json

import pytest
import torch

from apps._cli import run, write_json
from imgmw import GMM, fit_gmm, gmm_ot_map, mw2
from tests.app_checks import assert_clean_failure


def _gmm(cov: torch.Tensor) -> GMM:
    return GMM(torch.ones(1, dtype=cov.dtype), torch.zeros(1, 2, dtype=cov.dtype), cov[None])


GOOD = torch.eye(2)
LIBRARY_CASES = {
    "mw2: -I covariance": (lambda dt: mw2(_gmm(-GOOD.to(dt)), _gmm(GOOD.to(dt))), ValueError, "positive definite"),
    "mw2: indefinite covariance": (lambda dt: mw2(_gmm(torch.diag(torch.tensor([1.0, -5.0], dtype=dt))),
                                                  _gmm(GOOD.to(dt))), ValueError, "eigenvalue"),
    "mw2: huge unbalanced penalty": (lambda dt: mw2(_gmm(GOOD.to(dt)), _gmm(GOOD.to(dt)), unbalanced=(1e300, 1e-300)),
                                     ValueError, "lam_a"),
    "gmm_ot_map: NaN point": (lambda dt: gmm_ot_map(torch.tensor([[float("nan"), 0.0]], dtype=dt), _gmm(GOOD.to(dt)),
                                                    _gmm(GOOD.to(dt))), ValueError, "finite"),
    "gmm_ot_map: no point": (lambda dt: gmm_ot_map(torch.zeros(0, 2, dtype=dt), _gmm(GOOD.to(dt)), _gmm(GOOD.to(dt))),
                             ValueError, "at least one point"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", sorted(LIBRARY_CASES))
def test_library_rejects_bad_input_in_every_dtype(case, dtype):
    call, error, fragment = LIBRARY_CASES[case]
    with pytest.raises(error, match=fragment):
        call(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_a_type_error(dtype):
    with pytest.raises(TypeError, match="float32 or float64"):
        fit_gmm(torch.randn(50, 2).to(dtype), 2, n_iter=2)


@pytest.mark.parametrize("app", ["color_transfer", "texture_synth", "barycenter"])
@pytest.mark.parametrize("value", ["99999999999999999999", "-1", "x"])
def test_an_out_of_range_seed_names_the_flag(app, value, tmp_path, capsys):
    import importlib

    module = importlib.import_module(f"apps.{app}")
    assert_clean_failure(lambda a: run(app, module.main, a), capsys, ["--seed", value], tmp_path / "out", "--seed")


def test_metrics_json_is_strict(tmp_path):
    path = tmp_path / "metrics.json"
    write_json({"loss": float("nan"), "curve": [1.0, float("inf")], "nested": {"x": -float("inf")}}, path)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": None, "curve": [1.0, None], "nested": {"x": None}}
