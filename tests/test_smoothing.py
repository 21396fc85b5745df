"""Smoothing strategies against formulas written out here: proximal thresholds, masks, LoRA merges."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy.ndimage import maximum_filter
from tiny import tiny_unet

from diffinv.smoothing import ProximalGuidance, load_lora, parse_smoothing, proximal_delta


def _delta(seed: int = 0, shape=(3, 4, 6, 6)) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_parse_smoothing():
    assert parse_smoothing(["proximal", "smooth_lora", "npi", "npi"]) == ("npi", "proximal", "smooth-lora")
    assert parse_smoothing("npi,proximal") == ("npi", "proximal")
    assert parse_smoothing(None) == ()
    with pytest.raises(ValueError, match="blur"):
        parse_smoothing(["blur"])


def test_l0_is_a_soft_threshold_at_the_batch_quantile():
    d = _delta(1)
    got, tau = proximal_delta(d, 0.75, "l0")
    a = d.numpy()
    want_tau = np.quantile(np.abs(a).ravel(), 0.75)  # one threshold for the whole batch
    assert tau.item() == pytest.approx(want_tau, rel=1e-6)
    want = np.sign(a) * np.maximum(np.abs(a) - tau.item(), 0.0)
    assert np.abs(got.numpy() - want).max() <= 1e-15


def test_l1_copies_the_reference_piecewise_map():
    d = _delta(2)
    got, tau = proximal_delta(d, -0.5, "l1")  # negative quantile: fixed threshold 0.5
    assert tau.item() == 0.5
    t, a = 0.5, d.numpy()
    want = np.select(
        [np.abs(a) <= t, (a > t) & (a < 2 * t), a >= 2 * t, a < -t],
        [0.0, a - t, a - 2 * t, a + 2 * t],
    )
    assert np.abs(got.numpy() - want).max() <= 1e-15
    assert ((a > -2 * t) & (a < -t) & (got.numpy() > 0)).any()  # the sign flip the reference has


def test_guide_mask_and_blend():
    u, c = _delta(3), _delta(4)
    prox = ProximalGuidance(quantile=0.8, prox="l0", dilate_mask=1)
    eps, mask = prox.guide(u, c, 7.5)
    d = (c - u).numpy()
    tau = np.quantile(np.abs(d).ravel(), 0.8)
    soft = np.sign(d) * np.maximum(np.abs(d) - tau, 0)
    assert np.abs(eps.numpy() - (u.numpy() + 7.5 * soft)).max() <= 1e-12
    raw = (np.abs(soft) > tau).astype(float)  # |Delta'| > tau, i.e. |Delta| > 2 tau for l0
    want = maximum_filter(raw, size=(1, 1, 3, 3), mode="constant")  # per channel, radius 1
    assert np.array_equal(mask.numpy(), want)
    x, star = _delta(5), _delta(6)
    lr = ProximalGuidance(recon_lr=0.3)
    assert torch.allclose(lr.blend(x, star, mask), x - 0.3 * (x - star) * (1 - mask), atol=0, rtol=0)
    assert prox.active(399.0) and not prox.active(400.0)
    with pytest.raises(ValueError):
        ProximalGuidance(prox="l2")
    with pytest.raises(ValueError):
        ProximalGuidance(dilate_mask=-1)


def _attention_modules(unet):
    return [n for n, m in unet.named_modules() if n.endswith((".attn1", ".attn2"))]


def _old_format_lora(unet, rank=2, seed=0):
    """A LoRA in the authors' (diffusers <= 0.20 attention-processor) key format for every attention layer."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    sd = {}
    for name in _attention_modules(unet):
        for proj, sub in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
            lin = modules[f"{name}.{sub}"]
            sd[f"{name}.processor.{proj}_lora.down.weight"] = torch.randn(rank, lin.in_features, generator=gen)
            sd[f"{name}.processor.{proj}_lora.up.weight"] = torch.randn(lin.out_features, rank, generator=gen)
    return sd


def test_smooth_diffusion_lora_file_merges_exactly(tmp_path):
    unet = tiny_unet(dtype=torch.float64)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    sd = _old_format_lora(unet)
    path = tmp_path / "smooth_lora.safetensors"
    save_file(sd, str(path))
    changed = load_lora(unet, path, scale=0.7)
    assert len(changed) == 4 * len(_attention_modules(unet)) > 0
    after = unet.state_dict()
    for key, down in sd.items():
        if not key.endswith("down.weight"):
            continue
        up = sd[key.replace("down.weight", "up.weight")].double()
        name, proj = key.split(".processor.")
        sub = proj.split("_lora")[0]
        wkey = f"{name}.{'to_out.0' if sub == 'to_out' else sub}.weight"
        assert (after[wkey] - (before[wkey] + 0.7 * (up @ down.double()))).abs().max().item() <= 1e-14
    untouched = [k for k in before if not any(k.startswith(f"{m}.") for m in changed)]
    assert untouched and all(torch.equal(before[k], after[k]) for k in untouched)


def test_unmerged_lora_equals_merged_and_can_be_removed():
    merged, hooked = tiny_unet(dtype=torch.float64), tiny_unet(dtype=torch.float64)
    sd = _old_format_lora(merged, seed=1)
    weights = {k: v.clone() for k, v in hooked.state_dict().items()}
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(2, 77, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(500.0, dtype=torch.float64)
    plain = hooked(x, t, encoder_hidden_states=ctx).sample
    load_lora(merged, sd, scale=0.7)
    hooks = load_lora(hooked, sd, scale=0.7, merge=False)
    assert all(torch.equal(weights[k], v) for k, v in hooked.state_dict().items())  # weights untouched
    want = merged(x, t, encoder_hidden_states=ctx).sample
    got = hooked(x, t, encoder_hidden_states=ctx).sample
    assert (want - plain).abs().max() > 1e-3
    assert (got - want).abs().max() < 1e-10
    hooks.remove()
    assert torch.equal(hooked(x, t, encoder_hidden_states=ctx).sample, plain)


def test_peft_format_with_alpha():
    unet = tiny_unet(dtype=torch.float64)
    name = _attention_modules(unet)[0] + ".to_k"
    lin = dict(unet.named_modules())[name]
    down, up = torch.randn(4, lin.in_features), torch.randn(lin.out_features, 4)
    w0 = lin.weight.detach().clone()
    sd = {f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up, f"unet.{name}.alpha": torch.tensor(2.0)}
    assert load_lora(unet, sd, scale=1.5) == [name]
    want = w0 + 1.5 * (2.0 / 4) * (up.double() @ down.double())
    assert (lin.weight - want).abs().max().item() <= 1e-14


@pytest.mark.parametrize(
    "mutate, key_part",
    [
        (lambda sd: sd.update({"mid_block.nothing.processor.to_q_lora.down.weight": torch.zeros(2, 32)}), "nothing"),
        (lambda sd: sd.update({"some.weird.key": torch.zeros(1)}), "some.weird.key"),
        (lambda sd: sd.pop(sorted(k for k in sd if k.endswith("up.weight"))[0]), "down.weight"),
    ],
)
def test_bad_lora_keys_are_named_and_nothing_changes(tmp_path, mutate, key_part):
    unet = tiny_unet(dtype=torch.float64)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    sd = _old_format_lora(unet)
    mutate(sd)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=key_part.replace(".", r"\.")):
        load_lora(unet, path)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_bad_lora_shape_is_named():
    unet = tiny_unet(dtype=torch.float64)
    sd = _old_format_lora(unet)
    key = sorted(k for k in sd if k.endswith("to_v_lora.down.weight"))[0]
    sd[key] = torch.zeros(2, 7)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_lora(unet, sd)


def test_lora_files_load_only_tensors(tmp_path):
    unet = tiny_unet()
    good = tmp_path / "lora.bin"
    torch.save(_old_format_lora(unet), good)
    with pytest.raises(ValueError, match="allow_pickle"):  # pickles only on request
        load_lora(unet, good)
    assert load_lora(unet, good, allow_pickle=True)
    evil = tmp_path / "evil.bin"
    torch.save({"x": ValueError("not a tensor")}, evil)  # unpickling needs more than tensors
    with pytest.raises(ValueError, match="cannot read LoRA file"):
        load_lora(unet, evil, allow_pickle=True)
    with pytest.raises(ValueError, match="not found"):
        load_lora(unet, tmp_path / "missing.safetensors")


def test_grouped_threshold_is_each_images_own():
    d = _delta(7, shape=(6, 4, 6, 6))  # 3 images x 2 rows (e.g. 2 targets each)
    got, tau = proximal_delta(d, 0.75, "l1", groups=3)
    assert tau.shape == (6, 1, 1, 1)
    for i in range(3):
        rows = slice(2 * i, 2 * i + 2)
        want, want_tau = proximal_delta(d[rows], 0.75, "l1")  # the image edited alone
        assert torch.equal(got[rows], want) and torch.equal(tau[rows].flatten(), want_tau.expand(2))
    assert not torch.equal(got, proximal_delta(d, 0.75, "l1")[0])  # one shared threshold differs
    with pytest.raises(ValueError, match="6 rows do not split into 4 equal groups"):
        proximal_delta(d, 0.75, groups=4)
