"""PIE-Bench metrics: exact values against independent computations, and every network path with random weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffinv import metrics as M
from diffinv import weights as W


def _images(size=48, seed=0):
    from skimage import data

    a = np.asarray(Image.fromarray(data.astronaut()).resize((size, size), Image.Resampling.BICUBIC))
    rng = np.random.default_rng(seed)
    b = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((size, size), dtype=bool)
    mask[8:30, 12:40] = True
    return a, b, mask


def _masked(a, b, mask):
    keep = (1 - mask.astype(np.float64))[:, :, None]
    return a / 255.0 * keep, b / 255.0 * keep


def _ssim_numpy(x, y, border=5):
    """SSIM computed independently: 11-tap Gaussian (sigma 1.5) over reflect-padded images, C1 = 0.01², C2 = 0.03²
    for data range 1, the SSIM map averaged over every channel and every pixel but a ``border`` (5: torchmetrics
    <= 1.4.1, the official evaluation's; 0: torchmetrics >= 1.4.2)."""
    from scipy.ndimage import gaussian_filter

    def blur(z):
        return np.stack([gaussian_filter(z[..., c], sigma=1.5, truncate=3.5, mode="mirror") for c in range(3)], -1)

    mx, my = blur(x), blur(y)
    vx = np.maximum(blur(x * x) - mx**2, 0)
    vy = np.maximum(blur(y * y) - my**2, 0)
    cxy = blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    full = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(np.mean(full[border : full.shape[0] - border, border : full.shape[1] - border]))


@pytest.mark.parametrize("seed", [0, 1])
def test_background_metrics_exact(seed):
    a, b, mask = _images(seed=seed)
    x, y = _masked(a, b, mask)
    mse = np.mean((x - y) ** 2)
    assert M.background_mse(a, b, mask) == pytest.approx(mse, rel=1e-5)
    assert M.background_psnr(a, b, mask) == pytest.approx(10 * np.log10(1 / mse), rel=1e-5)
    assert M.background_ssim(a, b, mask) == pytest.approx(_ssim_numpy(x, y), abs=2e-5)
    # The edited region does not count: changing it leaves every background metric unchanged.
    c = b.copy()
    c[mask] = 255 - c[mask]
    for fn in (M.background_mse, M.background_psnr, M.background_ssim):
        assert fn(a, c, mask) == fn(a, b, mask)
    # A mask covering everything: "nan", as the official script.
    full = np.ones_like(mask)
    assert all(math.isnan(fn(a, b, full)) for fn in (M.background_mse, M.background_psnr, M.background_ssim))


def test_squeeze_lpips_matches_torchmetrics(monkeypatch):
    """Our SqueezeNet LPIPS equals torchmetrics' own LPIPS network given the same backbone (random) and
    the shipped linear heads; torchvision is replaced by our torchvision-compatible feature extractor."""
    import torchmetrics.functional.image.lpips as tl

    torch.manual_seed(0)
    net = M.SqueezeLPIPS()
    for p in net.features.parameters():
        p.data.normal_(0, 0.1)
    heads = torch.load(M.lpips_heads_path(), map_location="cpu", weights_only=True)
    net.load_heads(heads)
    monkeypatch.setattr(tl, "_get_tv_model_features", lambda name, pretrained=False: net.features)
    reference = tl._LPIPS(pretrained=True, net="squeeze")
    a, b = torch.rand(2, 3, 40, 40) * 2 - 1, torch.rand(2, 3, 40, 40) * 2 - 1
    with torch.no_grad():
        ours, theirs = net(a, b), reference(a, b).reshape(-1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    assert (ours > 0).all() and torch.equal(net(a, a), torch.zeros(2))
    assert net.lin3.model[1].weight.equal(heads["lin3.model.1.weight"])


def _squeeze_lpips_reference(features, heads, a, b):
    """LPIPS-SqueezeNet written from torchvision's ``squeezenet1_1().features`` layer list (0: conv 3x3/2 + ReLU,
    2/5/8: max-pool 3/2 ceil, the rest Fire modules: squeeze 1x1, then expand 1x1 and 3x3 concatenated, all ReLU)
    and torchmetrics' LPIPS (scaling layer, taps after layers 1, 4, 7, 9, 10, 11, 12, channel-unit features,
    1x1 heads, spatial mean, summed)."""
    F = torch.nn.functional

    def conv(z, key, **options):
        return F.relu(F.conv2d(z, features[f"{key}.weight"], features[f"{key}.bias"], **options))

    def fire(z, i):
        z = conv(z, f"{i}.squeeze")
        return torch.cat([conv(z, f"{i}.expand1x1"), conv(z, f"{i}.expand3x3", padding=1)], 1)

    def pool(z):
        return F.max_pool2d(z, kernel_size=3, stride=2, ceil_mode=True)

    def taps(z):
        shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
        scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        z = conv((z - shift) / scale, "0", stride=2)
        out = [z]
        z = fire(fire(pool(z), 3), 4)
        out.append(z)
        z = fire(fire(pool(z), 6), 7)
        out.append(z)
        z = fire(pool(z), 9)
        out.append(z)
        for i in (10, 11, 12):
            z = fire(z, i)
            out.append(z)
        return out

    total = 0
    for i, (x, y) in enumerate(zip(taps(a), taps(b), strict=True)):
        x = x / torch.sqrt(1e-8 + (x**2).sum(1, keepdim=True))
        y = y / torch.sqrt(1e-8 + (y**2).sum(1, keepdim=True))
        total = total + F.conv2d((x - y) ** 2, heads[f"lin{i}.model.1.weight"]).mean(dim=(2, 3))
    return total.reshape(-1)


def test_squeeze_lpips_matches_an_independent_squeezenet():
    torch.manual_seed(2)
    net = M.SqueezeLPIPS()
    for p in net.features.parameters():
        p.data.normal_(0, 0.1)
    heads = torch.load(M.lpips_heads_path(), map_location="cpu", weights_only=True)
    net.load_heads(heads)
    a, b = torch.rand(2, 3, 45, 37) * 2 - 1, torch.rand(2, 3, 45, 37) * 2 - 1  # odd sizes: the ceil-mode pools
    with torch.no_grad():
        ours, ref = net(a, b), _squeeze_lpips_reference(net.features.state_dict(), heads, a, b)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    assert (ref > 0).all()


def test_squeezenet_keys_match_torchvision():
    keys = set(M.squeezenet1_1_features().state_dict())
    expected = {"0.weight", "0.bias"} | {
        f"{i}.{conv}.{p}"
        for i in (3, 4, 6, 7, 9, 10, 11, 12)
        for conv in ("squeeze", "expand1x1", "expand3x3")
        for p in ("weight", "bias")
    }
    assert keys == expected
    assert sum(v.numel() for v in M.squeezenet1_1_features().state_dict().values()) == 1235496 - 513000  # - classifier


def test_load_lpips_from_torch_hub_cache(tmp_path, monkeypatch):
    """The loading path a user takes: torchvision's squeezenet1_1 file in torch's hub cache + the torchmetrics heads."""
    torch.manual_seed(1)
    features = M.squeezenet1_1_features().state_dict()
    state = {f"features.{k}": v for k, v in features.items()}
    state |= {"classifier.1.weight": torch.zeros(1000, 512, 1, 1), "classifier.1.bias": torch.zeros(1000)}
    (tmp_path / "checkpoints").mkdir()
    torch.save(state, tmp_path / "checkpoints" / W.SQUEEZENET_URL.rsplit("/", 1)[1])
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    net = M.load_lpips("cpu")
    assert isinstance(net, M.SqueezeLPIPS)
    assert net.features[12].expand3x3.weight.equal(features["12.expand3x3.weight"])
    a, b, mask = _images()
    value = M.background_lpips(a, b, mask, net)
    assert 0 < value < 10 and M.background_lpips(a, a, mask, net) == 0.0
    assert math.isnan(M.background_lpips(a, b, np.ones_like(mask), net))


def tiny_vit():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, patch_size=16)
    return ViTModel(config, add_pooling_layer=False).eval()


def _vit_last_block(vit, inputs, outputs):
    """The last ViT block's keys ``(B, T, D)`` from its weights (state-dict names of transformers 5 or 4), after
    checking that the block recomputed with them (attention ``softmax(q k^T / sqrt(d)) v``, MLP) gives ``outputs``:
    that is what makes these weights the keys, whatever the model calls them."""
    F = torch.nn.functional
    state, cfg = vit.state_dict(), vit.config
    last = cfg.num_hidden_layers - 1
    if f"layers.{last}.attention.k_proj.weight" in state:
        at = f"layers.{last}."
        names = {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj", "o": "attention.o_proj"}
        names |= {"fc1": "mlp.fc1", "fc2": "mlp.fc2"}
    else:
        at = f"encoder.layer.{last}."
        names = {"q": "attention.attention.query", "k": "attention.attention.key", "v": "attention.attention.value"}
        names |= {"o": "attention.output.dense", "fc1": "intermediate.dense", "fc2": "output.dense"}

    def linear(name, z):
        return F.linear(z, state[f"{at}{names[name]}.weight"], state[f"{at}{names[name]}.bias"])

    def norm(name, z):
        return F.layer_norm(
            z, (cfg.hidden_size,), state[f"{at}{name}.weight"], state[f"{at}{name}.bias"], cfg.layer_norm_eps
        )

    heads, (b, t, d) = cfg.num_attention_heads, inputs.shape
    h = norm("layernorm_before", inputs)
    q, k, v = (linear(n, h).view(b, t, heads, d // heads).transpose(1, 2) for n in "qkv")
    attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
    mid = inputs + linear("o", attention.transpose(1, 2).reshape(b, t, d))
    out = mid + linear("fc2", F.gelu(linear("fc1", norm("layernorm_after", mid))))
    torch.testing.assert_close(out, outputs, rtol=1e-4, atol=1e-5)
    return linear("k", h)


def test_structure_distance_keys_self_similarity():
    vit = tiny_vit()
    dino = M.DinoStructure(vit)
    a, b, _ = _images(size=64)
    sim = dino.self_similarity(a)
    assert sim.shape == (1 + (224 // 16) ** 2,) * 2
    torch.testing.assert_close(torch.diagonal(sim), torch.ones(sim.shape[0]))
    # Independently: the last block's keys from the ViT's weights, with the official preprocessing
    # (0-255 floats resized to 224 then ImageNet-normalised).
    x = torch.from_numpy(a.astype(np.float32)).permute(2, 0, 1)[None]
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    x = (x - torch.tensor(M.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(M.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = vit(pixel_values=x, output_hidden_states=True).hidden_states
        keys = _vit_last_block(vit, hidden[-2], hidden[-1])[0]
    ref = torch.nn.functional.cosine_similarity(keys[:, None], keys[None], dim=-1, eps=1e-8)
    torch.testing.assert_close(sim, ref, rtol=1e-4, atol=1e-5)
    d = M.structure_distance(a, b, vit)
    assert d > 0 and d == pytest.approx(M.structure_distance(b, a, dino), rel=1e-6)
    assert M.structure_distance(a, a, dino) == 0.0


def test_resize_shape_as_torchvision():
    assert M._resize_shape(512, 512) == (224, 224)
    assert M._resize_shape(300, 451) == (224, 336)
    assert M._resize_shape(1200, 400) == (480, 160)


def tiny_clip():
    import sys
    from pathlib import Path

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, patch_size=8)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={**text, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={**vision, "image_size": 32},
        projection_dim=16,
    )
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
    )
    return CLIPModel(config).eval(), processor


def test_clip_scores():
    model, processor = tiny_clip()
    clip = M.ClipScorer(model, processor)
    a, _, mask = _images(size=48)
    whole = M.clip_whole(a, "a woman in a space suit", clip)
    # Independently: projected, normalised embeddings, 100 * max(cos, 0).
    inputs = processor(text=["a woman in a space suit"], images=[Image.fromarray(a)], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).item()
    assert whole == pytest.approx(100 * max(cos, 0.0), rel=1e-5, abs=1e-5)
    assert 0 <= whole <= 100
    edited = M.clip_edited(a, mask, "a woman in a space suit", clip)
    assert edited == pytest.approx(clip(np.where(mask[:, :, None], a, 0).astype(np.uint8), "a woman in a space suit"))
    assert M.clip_edited(a, np.ones_like(mask), "x", clip) == pytest.approx(M.clip_whole(a, "x", clip))
    # Prompts longer than CLIP's context are truncated, not an error.
    assert 0 <= clip(a, "word " * 200) <= 100


def test_suite_runs_every_metric_and_errors(monkeypatch):
    suite = M.MetricSuite(device="cpu", dino=tiny_vit(), clip=tiny_clip(), lpips=M.SqueezeLPIPS())
    a, b, mask = _images(size=48)
    values = suite(a, b, mask, "a robot in a space suit")
    assert list(values) == list(M.METRICS) and all(np.isfinite(v) for v in values.values())
    full = suite(a, b, np.ones_like(mask), "a robot")
    assert [k for k, v in full.items() if math.isnan(v)] == list(M.BACKGROUND_METRICS)

    assert M.MetricSuite("psnr,mse", device="cpu")(a, b, mask, "x").keys() == {"psnr", "mse"}
    assert M.parse_metrics("ssim,psnr,ssim") == ("psnr", "ssim")
    with pytest.raises(ValueError, match="unknown metric"):
        M.parse_metrics("psnr,fid")
    # Offline with no cached weights: a clear error naming the option that leaves the metric out.
    with pytest.raises(M.MetricWeightsError, match=r"structure_distance.*--metrics psnr,ssim$"):
        M.MetricSuite("structure_distance,psnr,ssim", device="cpu")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: "/nonexistent-hub-dir")
    with pytest.raises(M.MetricWeightsError, match=r"metric\(s\) lpips .*--metrics psnr$"):
        M.MetricSuite("psnr,lpips", device="cpu")
    with pytest.raises(ValueError, match="differ in size"):
        M.background_psnr(a, b[:10], mask)


# -- official conventions -------------------------------------------------------------------------------------


def _ssim_torchmetrics_141(preds, target, data_range=1.0):
    """Transcription of torchmetrics 1.4.1 ``_ssim_update`` (2-D, Gaussian kernel, sigma 1.5, float data range)
    followed by the per-image mean, as ``StructuralSimilarityIndexMeasure(data_range=1.0)`` in the official code."""
    sigma = [1.5, 1.5]
    gauss_kernel_size = [int(3.5 * s + 0.5) * 2 + 1 for s in sigma]
    pad_h = (gauss_kernel_size[0] - 1) // 2
    pad_w = (gauss_kernel_size[1] - 1) // 2
    c1, c2 = pow(0.01 * data_range, 2), pow(0.03 * data_range, 2)
    channel, dtype = preds.size(1), preds.dtype

    def gaussian(size, s):  # torchmetrics.functional.image.helper._gaussian
        dist = torch.arange((1 - size) / 2, (1 + size) / 2, 1, dtype=dtype)
        gauss = torch.exp(-torch.pow(dist / s, 2) / 2)
        return (gauss / gauss.sum()).unsqueeze(dim=0)

    kernel_x, kernel_y = gaussian(gauss_kernel_size[0], sigma[0]), gaussian(gauss_kernel_size[1], sigma[1])
    kernel = torch.matmul(kernel_x.t(), kernel_y).expand(channel, 1, *gauss_kernel_size)
    preds = torch.nn.functional.pad(preds, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
    target = torch.nn.functional.pad(target, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
    input_list = torch.cat((preds, target, preds * preds, target * target, preds * target))
    output_list = torch.nn.functional.conv2d(input_list, kernel, groups=channel).split(preds.shape[0])
    mu_pred_sq, mu_target_sq = output_list[0].pow(2), output_list[1].pow(2)
    mu_pred_target = output_list[0] * output_list[1]
    sigma_pred_sq = torch.clamp(output_list[2] - mu_pred_sq, min=0.0)
    sigma_target_sq = torch.clamp(output_list[3] - mu_target_sq, min=0.0)
    sigma_pred_target = output_list[4] - mu_pred_target
    upper = 2 * sigma_pred_target.to(dtype) + c2
    lower = (sigma_pred_sq + sigma_target_sq).to(dtype) + c2
    ssim_idx_full_image = ((2 * mu_pred_target + c1) * upper) / ((mu_pred_sq + mu_target_sq + c1) * lower)
    ssim_idx = ssim_idx_full_image[..., pad_h:-pad_h, pad_w:-pad_w]
    return float(ssim_idx.reshape(ssim_idx.shape[0], -1).mean(-1).mean())


@pytest.mark.parametrize("seed", [0, 1])
def test_ssim_is_the_official_cropped_definition(seed):
    import torchmetrics
    from packaging.version import Version
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b, mask = _images(size=64, seed=seed)
    x, y = (torch.from_numpy(v.astype(np.float32)).permute(2, 0, 1)[None] for v in _masked(a, b, mask))
    official = _ssim_torchmetrics_141(x, y)
    assert M.ssim_official(x, y) == pytest.approx(official, abs=1e-6)
    assert M.background_ssim(a, b, mask) == pytest.approx(official, abs=1e-6)
    installed = float(structural_similarity_index_measure(x, y, data_range=1.0))
    if Version(torchmetrics.__version__) >= Version("1.4.2"):  # whole-map average: not the paper's number
        assert abs(installed - official) > 1e-3
        assert installed == pytest.approx(_ssim_numpy(*_masked(a, b, mask), border=0), abs=2e-5)
    else:
        assert installed == pytest.approx(official, abs=1e-6)


def test_align_edit_official_crop():
    rng = np.random.default_rng(0)
    panels = Image.fromarray(rng.integers(0, 256, (512, 512 * 4, 3), dtype=np.uint8))  # src | recon | ... | edit
    edit = M.align_edit(panels, (512, 512))
    assert edit.size == (512, 512)
    assert np.array_equal(np.asarray(edit), np.asarray(panels)[:, -512:])  # the right-most 512x512
    tall = Image.fromarray(rng.integers(0, 256, (600, 512, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(M.align_edit(tall, (512, 512))), np.asarray(tall)[-512:])  # bottom 512 rows
    same = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert M.align_edit(same, (64, 64)) is same
    with pytest.raises(ValueError, match="1024x1024, source is 512x512"):
        M.align_edit(Image.new("RGB", (1024, 1024)), (512, 512))
    with pytest.raises(ValueError, match="bottom-right 512x512"):
        M.align_edit(Image.new("RGB", (300, 200)), (512, 512))
    small = Image.fromarray(rng.integers(0, 256, (64, 192, 3), dtype=np.uint8))  # a 64x64 data set's panels
    assert np.array_equal(np.asarray(M.align_edit(small, (64, 64))), np.asarray(small)[:, -64:])


def test_summarize_counts_inf_apart_from_nan():
    a, _, mask = _images()
    psnr_same = M.background_psnr(a, a, mask)  # untouched background
    assert math.isinf(psnr_same) and psnr_same > 0
    values = [30.0, psnr_same, math.nan, 20.0, None]
    s = M.summarize(values)
    assert s == {"mean": 25.0, "n": 2, "n_inf": 1, "n_nan": 2}
    assert math.isnan(M.summarize([math.nan])["mean"]) and M.summarize([])["n"] == 0


def test_official_totals():
    rows = [{"image_id": str(i), "editing_type_id": str(i % 10)} for i in range(70)]
    totals = M.official_totals(rows)
    assert len(totals["all"]) == 70 and len(totals["no_style"]) == 63
    assert all(r["editing_type_id"] != "9" for r in totals["no_style"])
