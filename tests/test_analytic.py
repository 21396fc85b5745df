"""The toy-scene model: exact eps against autograd of an independent log-density, guidance, masks,
samples and likelihoods."""

import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from diffinv.analytic import GaussianMixture, ToyScenes

TIMES = (3.0, 150.0, 600.0, 990.0)


@pytest.fixture(scope="module")
def scenes() -> ToyScenes:
    return ToyScenes(size=8)


def marginal_log_density(mu: torch.Tensor, var: torch.Tensor, log_w: torch.Tensor, alpha, sigma):
    """``log p_t`` of a diagonal Gaussian mixture written with torch.distributions (independent of analytic.py)."""
    scale = torch.sqrt(alpha**2 * var + sigma**2)
    return MixtureSameFamily(Categorical(logits=log_w), Independent(Normal(alpha * mu, scale), 1))


def autograd_eps(dist_of_t, schedule, x: torch.Tensor, t: float) -> torch.Tensor:
    """``-sigma_t * grad_x log p_t(x)`` by autograd."""
    alpha, sigma = schedule.alpha(t).item(), schedule.sigma(t).item()
    xf = x.reshape(x.shape[0], -1).clone().requires_grad_(True)
    logp = dist_of_t(alpha, sigma).log_prob(xf).sum()
    (grad,) = torch.autograd.grad(logp, xf)
    return (-sigma * grad).reshape(x.shape)


def prompt_dist(scenes: ToyScenes, prompt):
    mix = scenes.model(prompt)
    return lambda a, s: marginal_log_density(mix.mu, mix.var, mix.log_w, a, s)


def probe(scenes: ToyScenes, n: int = 6, seed: int = 0) -> torch.Tensor:
    """Points near and between the modes: noisy samples of two prompts, scaled like x_t."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([scenes.sample("gray box", n // 2, g), scenes.sample("red box 0.4", n - n // 2, g)])
    return x + 0.5 * torch.randn(x.shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("prompt", [None, "gray box", "red box 0.8", "night scene"])
def test_eps_is_minus_sigma_score(scenes, prompt):
    x = probe(scenes)
    for t in TIMES:
        a = scenes.schedule.alpha(t).item()
        xt = a * x + math.sqrt(1 - a * a) * torch.randn(
            x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
        )
        want = autograd_eps(prompt_dist(scenes, prompt), scenes.schedule, xt, t)
        got = scenes.eps(xt, torch.tensor(t), prompt)
        assert torch.allclose(got, want, rtol=1e-8, atol=1e-9), (prompt, t, (got - want).abs().max())
        assert torch.allclose(scenes.model(prompt).eps(xt, t), want, rtol=1e-8, atol=1e-9)


def test_general_mixture_path_matches_autograd():
    """A mixture with per-pixel variances (no isotropic fast path) against the same autograd check."""
    from diffinv.schedules import NoiseSchedule

    sched = NoiseSchedule.scaled_linear()
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    var = 0.01 + 0.1 * torch.rand(3, 2, 3, 3, generator=g, dtype=torch.float64)
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    mix = GaussianMixture(sched, mu, var, w)
    assert mix._iso is None
    x = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    for t in TIMES:
        want = autograd_eps(lambda a, s: marginal_log_density(mix.mu, mix.var, mix.log_w, a, s), sched, x, t)
        assert torch.allclose(mix.eps(x, t), want, rtol=1e-8, atol=1e-9)


def test_isotropic_fast_path_equals_general_path(scenes):
    x = probe(scenes, 4)
    fast = scenes.model("red box 0.2")
    slow = GaussianMixture(scenes.schedule, fast.mu.reshape(-1, *scenes.shape), fast.var.reshape(-1, *scenes.shape))
    slow._iso = None  # force the (B, K, D) path
    for t in TIMES:
        assert torch.allclose(fast.eps(x, t), slow.eps(x, t), rtol=1e-9, atol=1e-10)
        assert torch.allclose(fast.log_prob(x, t), slow.log_prob(x, t), rtol=1e-10)


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0, 7.5])
def test_guided_eps(scenes, w):
    x = probe(scenes)
    for t in (40.0, 500.0):
        tt = torch.tensor(t)
        cond, uncond = scenes.eps(x, tt, "red box 0.4"), scenes.eps(x, tt)
        assert torch.allclose(scenes.guided("red box 0.4", w)(x, tt), uncond + w * (cond - uncond), atol=1e-10)
        # guided eps = -sigma grad [log p_neg + w (log p_c - log p_neg)], here with a prompt as negative
        neg = scenes.eps(x, tt, "gray box")
        got = scenes.guided("red box 0.4", w, negative="gray box")(x, tt)
        assert torch.allclose(got, neg + w * (cond - neg), atol=1e-10)
        a, s = scenes.schedule.alpha(t).item(), scenes.schedule.sigma(t).item()
        pc, pn = prompt_dist(scenes, "red box 0.4"), prompt_dist(scenes, "gray box")
        xf = x.reshape(x.shape[0], -1).clone().requires_grad_(True)
        lpn, lpc = pn(a, s).log_prob(xf), pc(a, s).log_prob(xf)
        lp = (lpn + w * (lpc - lpn)).sum()
        (grad,) = torch.autograd.grad(lp, xf)
        assert torch.allclose(got, (-s * grad).reshape(x.shape), rtol=1e-7, atol=1e-8)


def test_guided_per_sample_prompts_and_npi(scenes):
    x = probe(scenes, 4)
    tt = torch.tensor(300.0)
    prompts = ["gray box", "red box 0.1", "night scene", "gray box"]
    batched = scenes.guided(prompts, 3.0)(x, tt)
    for i, p in enumerate(prompts):
        assert torch.allclose(batched[i : i + 1], scenes.guided(p, 3.0)(x[i : i + 1], tt), atol=1e-12)
    # negative-prompt inversion: the source as both branches is the plain conditional eps at any w
    npi = scenes.guided("gray box", 3.0, negative="gray box")(x, tt)
    assert torch.allclose(npi, scenes.eps(x, tt, "gray box"), atol=1e-12)


def test_masks(scenes):
    m = scenes.mask("gray box")
    assert m.shape == (8, 8) and set(m.unique().tolist()) == {0.0, 1.0}
    assert m.sum().item() == 16 and m[0].sum() == 0 and m[4, 4] == 1  # a centred square of half the side
    assert scenes.mask("night scene").sum().item() == 64
    assert torch.equal(scenes.edit_mask("gray box", "red box 0.8"), m)
    assert torch.equal(scenes.edit_mask("gray box", "night scene"), torch.ones(8, 8, dtype=torch.float64))
    # a box prompt's distribution differs from the source's only inside its mask
    diff = (scenes.model("red box 0.8").mu - scenes.model("gray box").mu).reshape(-1, *scenes.shape)
    assert diff[..., m == 0].abs().max() == 0 and diff[..., m == 1].abs().min() > 0.1


def test_samples_mean_and_variance(scenes):
    n = 6000
    x = scenes.sample("red box 0.2", n, torch.Generator().manual_seed(0)).reshape(n, -1)
    mu = scenes.model("red box 0.2").mu  # (K, D), equal weights
    mean = mu.mean(0)
    var = scenes.variance + mu.var(0, unbiased=False)  # within + between components
    assert (x.mean(0) - mean).abs().max() < 5 * math.sqrt(var.max() / n) + 1e-3
    assert ((x.var(0) / var) - 1).abs().mean() < 0.05
    # the brightness offset is shared by background and object: pixels are positively correlated
    corr = torch.corrcoef(x[:, [0, 3 * 8 + 3]].T)[0, 1]
    assert corr > 0.5


def test_log_likelihood_prefers_the_right_prompt(scenes):
    g = torch.Generator().manual_seed(5)
    for i, p in enumerate(scenes.names):
        x = scenes.sample(p, 20, g)
        ll = scenes.log_likelihoods(x)
        assert ll.mean(0).argmax() == i, p
    full = ToyScenes()  # 8x8 boxes overlap a little; at the demo's 16x16 every sample is classified correctly
    for i, p in enumerate(full.names):
        assert (full.log_likelihoods(full.sample(p, 20, g)).argmax(-1) == i).all(), p
        assert torch.allclose(ll[:, i], scenes.log_likelihood(x, p), rtol=1e-10)
        assert torch.allclose(scenes.log_likelihood(x, p), scenes.model(p).log_prob(x, 0.0), rtol=1e-10)


def test_bad_input(scenes):
    x = probe(scenes, 2)
    with pytest.raises(ValueError, match="unknown prompt 'cat'"):
        scenes.eps(x, torch.tensor(10.0), "cat")
    with pytest.raises(ValueError, match="unknown prompt"):
        scenes.guided("cat", 3.0)
    with pytest.raises(ValueError, match="3 prompts for a batch of 2"):
        scenes.eps(x, torch.tensor(10.0), ["gray box"] * 3)
    with pytest.raises(ValueError, match="size"):
        ToyScenes(size=2)
    with pytest.raises(ValueError, match="variance"):
        ToyScenes(variance=0.0)
