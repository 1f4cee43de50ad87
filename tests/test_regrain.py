"""Tests of imgmw.regrain (Pitié et al.'s grain-preserving post-process) and the false-edge metric."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from imgmw.image import load_image
from imgmw.metrics import false_edge_map, false_edges
from imgmw.regrain import regrain

ROOT = Path(__file__).resolve().parent.parent


def _u8(img: torch.Tensor) -> np.ndarray:
    return (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _from_u8(arr: np.ndarray, dtype=torch.float64) -> torch.Tensor:
    return torch.from_numpy(arr).permute(2, 0, 1).to(dtype) / 255


@pytest.mark.parametrize("pair", [("coffee.jpg", "rocket.jpg"), ("chelsea.jpg", "hubble.png")])
def test_regrain_matches_python_color_transfer(pair):
    """Against the independent implementation of the `python-color-transfer` package (its `Regrain`, the
    authors' constants), on its own IDT result: in float64 every uint8 output value is identical (measured
    0 difference); float32 stays within one level."""
    ct = pytest.importorskip("python_color_transfer.color_transfer",
                             reason="python-color-transfer is installed by `make test`; this run lacks it")
    source, target = (_u8(load_image(ROOT / "data" / name)) for name in pair)
    np.random.seed(0)
    coloured = ct.ColorTransfer().pdf_transfer(img_arr_in=source, img_arr_ref=target, regrain=False)
    reference = ct.Regrain().regrain(img_arr_in=source, img_arr_col=coloured).astype(int)
    for dtype, tol in ((torch.float64, 0), (torch.float32, 1)):
        ours = regrain(_from_u8(coloured, dtype), _from_u8(source, dtype))
        got = (ours * 255).permute(1, 2, 0).numpy().astype(np.uint8).astype(int)   # the package truncates
        assert np.abs(got - reference).max() <= tol


def test_regrain_keeps_source_gradients_and_result_colours():
    """A source with fine noise and a result that is a flat recolouring (all noise lost): regrain brings
    the noise back (the gradients follow the source) while the mean colour follows the result (measured
    within 0.002 at 256×256; at 64×64 the pyramid has two levels and the constant offset converges only
    halfway, as in the reference code)."""
    g = torch.Generator().manual_seed(0)
    source = (0.5 + 0.05 * torch.randn(3, 256, 256, generator=g, dtype=torch.float64)).clamp(0, 1)
    flat = torch.tensor([0.2, 0.4, 0.7], dtype=torch.float64).view(3, 1, 1).expand(3, 256, 256).contiguous()
    out = regrain(flat, source)
    torch.testing.assert_close(out.mean((1, 2)), flat.mean((1, 2)), atol=0.01, rtol=0)
    dx = lambda x: x[..., 1:] - x[..., :-1]  # noqa: E731
    corr = torch.corrcoef(torch.stack([dx(out).flatten(), dx(source).flatten()]))[0, 1]
    assert corr > 0.9


def test_regrain_batches_and_checks_inputs():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 3, 30, 40, generator=g), torch.rand(2, 3, 30, 40, generator=g)
    batched = regrain(a, b)
    torch.testing.assert_close(batched[1], regrain(a[1], b[1]))
    assert batched.dtype == torch.float32 and batched.min() >= 0 and batched.max() <= 1
    with pytest.raises(ValueError, match="shape"):
        regrain(a, b[..., :-1])
    with pytest.raises(ValueError, match="dtype"):
        regrain(a, b.double())
    with pytest.raises(ValueError, match="smoothness"):
        regrain(a, b, smoothness=0.0)
    with pytest.raises(ValueError, match="finite"):
        regrain(a.clone().fill_(float("nan")), b)


# ------------------------------------------------------------------------------------------ false edges

def _ramp(h: int = 64, w: int = 128) -> torch.Tensor:
    x = torch.linspace(0.1, 0.9, w, dtype=torch.float64)
    return x.view(1, 1, w).expand(3, h, w).contiguous()


def test_false_edges_rise_on_a_posterised_ramp_and_not_on_a_smooth_one():
    ramp = _ramp()
    assert false_edges(ramp, ramp) == 0.0
    darker = 0.8 * ramp                                      # a smooth change of contrast: no new edge
    assert false_edges(darker, ramp) == 0.0
    posterised = (ramp * 6).round() / 6                      # 6 bands: each step is a new edge
    assert false_edges(posterised, ramp) > 0.05
    g = torch.Generator().manual_seed(0)                     # amplified noise in a smooth area
    noisy = (ramp + 0.08 * torch.randn(ramp.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert false_edges(noisy, ramp) > 0.2
    with pytest.raises(ValueError, match="shape"):
        false_edges(ramp, ramp[..., :-1])


def test_false_edge_map_marks_the_band_boundaries():
    """The map's mean is false_edges; on a ramp cut into 6 vertical bands the marked pixels are the columns
    beside the band boundaries (every row alike), and nothing elsewhere."""
    ramp = _ramp()
    posterised = (ramp * 6).round() / 6
    edges = false_edge_map(posterised, ramp)
    assert edges.shape == ramp.shape[-2:] and edges.dtype == torch.bool
    assert float(edges.double().mean()) == false_edges(posterised, ramp)
    columns = edges.any(0)
    assert bool((edges[:, columns] == edges[:1, columns]).all())  # whole columns
    steps = (posterised[0, 0, 1:] != posterised[0, 0, :-1]).nonzero().flatten()
    near = torch.zeros_like(columns)
    for s in steps.tolist():
        near[max(s - 1, 0):s + 3] = True
    assert bool(columns.any()) and not bool((columns & ~near).any())
