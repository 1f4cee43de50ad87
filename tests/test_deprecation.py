"""Renamed arguments keep working for a while: the old name warns (DeprecationWarning) and gives the same
result as the new one; giving both is an error."""
from __future__ import annotations

import pytest
import torch

from imgmw.barycentre import barycentre_flow, demo_targets
from imgmw.colour import transfer_colours
from imgmw.deprecation import generator_from_seed, renamed_parameters
from imgmw.flow import run_flow


def test_renamed_parameter_maps_old_to_new_with_a_warning():
    @renamed_parameters(k="n_components")
    def f(x: int, *, n_components: int = 1) -> int:
        return x * n_components

    assert f(2, n_components=3) == 6
    with pytest.warns(DeprecationWarning, match="'k' is renamed 'n_components'"):
        assert f(2, k=3) == 6
    with pytest.raises(TypeError, match="both"):
        f(2, k=3, n_components=3)


def test_seed_becomes_a_generator():
    with pytest.warns(DeprecationWarning, match="'seed' is replaced by 'generator'"):
        g = generator_from_seed(5, None, "cpu", "f")
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(5)))
    given = torch.Generator()
    assert generator_from_seed(None, given, "cpu", "f") is given
    with pytest.raises(TypeError, match="both"):
        generator_from_seed(1, given, "cpu", "f")


def test_run_flow_and_barycentre_flow_accept_their_old_names():
    x0 = torch.ones(3, 2, dtype=torch.float64)
    new = run_flow(x0, lambda x, _: (x ** 2).sum()[None], n_iter=4, lr=0.1)
    with pytest.warns(DeprecationWarning, match="iters"):
        old = run_flow(x0, lambda x, _: (x ** 2).sum()[None], iters=4, lr=0.1)
    assert torch.equal(new.x, old.x) and new.n_steps == old.n_steps == 4
    targets = demo_targets()
    a = barycentre_flow(targets, None, 50, n_components=2, n_iter=3, generator=torch.Generator().manual_seed(0))[0]
    with pytest.warns(DeprecationWarning):
        b = barycentre_flow(targets, None, 50, k=2, iters=3, generator=torch.Generator().manual_seed(0))[0]
    assert torch.equal(a, b)


def test_transfer_colours_seed_equals_a_seeded_generator():
    g = torch.Generator().manual_seed(0)
    source, target = torch.rand(3, 12, 12, generator=g), torch.rand(3, 10, 10, generator=g)
    kw = dict(n_components=3, n_iter=3, regrain=False, diagnose=False)
    new = transfer_colours(source, target, generator=torch.Generator().manual_seed(4), **kw).image
    with pytest.warns(DeprecationWarning, match="seed"):
        old = transfer_colours(source, target, seed=4, **kw).image
    assert torch.equal(new, old)
