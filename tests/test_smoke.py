"""The public API as written in the README works end to end on the exact Gaussian model."""

import torch

import diffinv
from diffinv.analytic import GaussianModel


def test_readme_api_round_trip():
    sched = diffinv.NoiseSchedule.scaled_linear()
    model = GaussianModel(sched, torch.full((3, 4, 4), 0.3), 0.05)
    x0 = model.sample(2, generator=torch.Generator().manual_seed(0))
    inv = diffinv.invert(model, x0, sched, solver="ees27", steps=50, spacing="lambda")
    assert isinstance(inv, diffinv.Inversion)
    assert inv.nfe == 50 * 4
    x0_hat = diffinv.generate(model, inv)
    assert x0_hat.dtype == x0.dtype and x0_hat.shape == x0.shape
    assert (x0_hat - x0).abs().max() < 1e-8
    assert "ees27" in diffinv.list_solvers()
