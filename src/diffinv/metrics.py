"""The seven PIE-Bench metrics, computed as the official evaluation script does.

The definitions and their quirks follow ``cure-lab/PnPInversion`` ``evaluation/matrics_calculator.py`` and
``evaluate.py`` (see the notes in the README):

* ``structure_distance``: DINO ViT-B/8 (``facebook/dino-vitb8``), cosine self-similarity of the last block's
  keys (CLS token included), MSE between source and edit, on the whole image. The image enters the network
  as float 0-255 and is then ImageNet-normalised (the official quirk, kept so the numbers match), resized
  with ``Resize(224, max_size=480)``.
* ``psnr``, ``lpips``, ``mse``, ``ssim``: background preservation. Both images (in [0, 1]) are multiplied
  by ``1 - mask`` and compared over the whole image (zeros included); ``nan`` when the mask covers the
  whole image. PSNR/MSE come from torchmetrics (data range 1); SSIM is computed here as torchmetrics <= 1.4.1
  did (11x11 Gaussian window, sigma 1.5, map averaged without its 5-pixel border: :func:`ssim_official`),
  whatever torchmetrics is installed; LPIPS uses the SqueezeNet backbone, inputs in [-1, 1]. PSNR is ``inf``
  for a bit-identical background (:func:`summarize` counts those apart from ``nan``).
* ``clip_whole``, ``clip_edited``: CLIP ViT-L/14 (``openai/clip-vit-large-patch14``) score of the edited
  image, and of the edited image with its background zeroed, against the target prompt:
  ``100 * max(cos, 0)``.

* ``recon_psnr``, ``recon_mse``, ``recon_ssim``, ``recon_lpips``: the reconstruction against the source with
  the same four definitions over the whole image (nothing zeroed): :func:`reconstruction_metrics`.
* The edit is compared at the source's size (:func:`align_edit`: the official bottom-right 512x512 crop of a
  non-square output, else the same size or refused); prompts lose their ``[ ]`` markers
  (:func:`diffinv.bench.piebench.strip_markers`); totals are over all 700 images and over the 620 without the
  style category (:func:`official_totals`).

Every function takes the networks it needs as arguments, so tests pass small random-initialised ones and
users the pretrained weights (``MetricSuite`` loads them, see :mod:`diffinv.weights`).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .weights import (
    BACKBONES,
    WeightsUnavailable,
    load_clip,
    load_dino,
    load_lpips_net,
    missing_files,
    resolve_weights_dir,
)

__all__ = [
    "BACKGROUND_METRICS",
    "METRICS",
    "RECON_METRICS",
    "ClipScorer",
    "DinoStructure",
    "MetricSuite",
    "MetricWeightsError",
    "SqueezeLPIPS",
    "align_edit",
    "as_uint8",
    "background_lpips",
    "background_mse",
    "background_psnr",
    "background_ssim",
    "clip_edited",
    "clip_whole",
    "official_totals",
    "parse_metrics",
    "reconstruction_metrics",
    "ssim_official",
    "structure_distance",
    "summarize",
]

METRICS = ("structure_distance", "psnr", "lpips", "mse", "ssim", "clip_whole", "clip_edited")
BACKGROUND_METRICS = ("psnr", "lpips", "mse", "ssim")
# The reconstruction (invert, then regenerate with the source prompt) against the source, whole image.
RECON_METRICS = ("recon_psnr", "recon_mse", "recon_ssim", "recon_lpips")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# NOTE: the official script resizes a float tensor with torchvision's Resize; the torchvision of the
# authors' environments (torch 1.12) did not antialias tensors. Newer torchvision does; set this to match.
DINO_ANTIALIAS = False


class MetricWeightsError(RuntimeError):
    """The pretrained weights of a metric could not be loaded."""


def parse_metrics(metrics: str | Sequence[str] | None) -> tuple[str, ...]:
    """Metric names from a list or a comma-separated string (``None`` or ``"all"``: all seven)."""
    if metrics is None or metrics == "all":
        return METRICS
    items = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    names = [m.strip() for m in items if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        bad = ", ".join(map(repr, unknown)) or "(none)"
        raise ValueError(f"unknown metric(s) {bad}; choose from {', '.join(METRICS)}")
    return tuple(m for m in METRICS if m in names)  # canonical order, no repeats


# -- images ------------------------------------------------------------------------------------


def as_uint8(image: Image.Image | np.ndarray) -> np.ndarray:
    """An RGB image as a ``(H, W, 3)`` uint8 array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image must be a PIL image or a (H, W, 3) uint8 array, got {array.dtype} {array.shape}")
    return array


def _pair(source: Any, edited: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_uint8(source), as_uint8(edited)
    if a.shape != b.shape:
        raise ValueError(f"source and edited images differ in size: {a.shape[:2]} vs {b.shape[:2]}")
    return a, b


def _keep(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """``1 - mask`` as float32 ``(H, W, 1)``, or None when the mask covers everything (official: "nan")."""
    mask = np.asarray(mask)
    if mask.shape != shape[:2]:
        raise ValueError(f"mask is {mask.shape}, image is {shape[:2]}")
    keep = 1.0 - mask.astype(np.float32)
    return None if keep.sum() == 0 else keep[:, :, None]


def _background(source: Any, edited: Any, mask: np.ndarray) -> tuple[Tensor, Tensor] | None:
    """Both images in [0, 1] (float32, ``(1, 3, H, W)``) with the edited region zeroed, as the official script."""
    a, b = _pair(source, edited)
    keep = _keep(mask, a.shape)
    if keep is None:
        return None
    to_tensor = lambda x: torch.from_numpy((x.astype(np.float32) / 255) * keep).permute(2, 0, 1)[None].contiguous()  # noqa: E731
    return to_tensor(a), to_tensor(b)


# -- background preservation ---------------------------------------------------------------------


def background_psnr(source: Any, edited: Any, mask: np.ndarray) -> float:
    """PSNR (dB, data range 1) of the unedited region; ``nan`` if the mask covers the whole image."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    pair = _background(source, edited, mask)
    return math.nan if pair is None else float(peak_signal_noise_ratio(pair[0], pair[1], data_range=1.0))


def background_mse(source: Any, edited: Any, mask: np.ndarray) -> float:
    """Mean squared error (images in [0, 1]) of the unedited region, averaged over the whole image."""
    from torchmetrics.functional import mean_squared_error

    pair = _background(source, edited, mask)
    return math.nan if pair is None else float(mean_squared_error(pair[0], pair[1]))


def _gaussian_window(size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float32) -> Tensor:
    """The normalised 2-D Gaussian window ``(size, size)`` of torchmetrics' SSIM."""
    dist = torch.arange((1 - size) / 2, (1 + size) / 2, 1, dtype=dtype)
    g = torch.exp(-((dist / sigma) ** 2) / 2)
    g = g / g.sum()
    return g[:, None] @ g[None, :]


def ssim_official(preds: Tensor, target: Tensor, data_range: float = 1.0) -> float:
    """SSIM as torchmetrics <= 1.4.1 computes it (the official PIE-Bench evaluation's era).

    11x11 Gaussian window (sigma 1.5) over reflect-padded ``(1, C, H, W)`` images, C1 = (0.01 R)², C2 = (0.03 R)²,
    and the SSIM map averaged WITHOUT its 5-pixel border (torchmetrics >= 1.4.2 averages the whole map, which
    reads higher). Written here so the number does not depend on the installed torchmetrics.
    """
    channels, pad = preds.shape[1], 5
    kernel = _gaussian_window(dtype=preds.dtype).expand(channels, 1, 11, 11)
    x = F.pad(preds, (pad,) * 4, mode="reflect")
    y = F.pad(target, (pad,) * 4, mode="reflect")
    out = F.conv2d(torch.cat([x, y, x * x, y * y, x * y]), kernel, groups=channels).split(preds.shape[0])
    mu_x, mu_y = out[0], out[1]
    var_x = torch.clamp(out[2] - mu_x**2, min=0.0)
    var_y = torch.clamp(out[3] - mu_y**2, min=0.0)
    cov = out[4] - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    full = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(full[..., pad:-pad, pad:-pad].mean())


def background_ssim(source: Any, edited: Any, mask: np.ndarray) -> float:
    """SSIM (official definition, :func:`ssim_official`, data range 1) of the unedited region."""
    pair = _background(source, edited, mask)
    return math.nan if pair is None else ssim_official(pair[1], pair[0], data_range=1.0)


def background_lpips(source: Any, edited: Any, mask: np.ndarray, net: Callable[[Tensor, Tensor], Tensor]) -> float:
    """LPIPS of the unedited region; ``net(a, b)`` takes images in [-1, 1] (e.g. :class:`SqueezeLPIPS`)."""
    pair = _background(source, edited, mask)
    if pair is None:
        return math.nan
    device = _device_of(net)
    return float(net(pair[0].to(device) * 2 - 1, pair[1].to(device) * 2 - 1).mean())


def reconstruction_metrics(
    source: Any, recon: Any, lpips: Callable[[Tensor, Tensor], Tensor] | None = None
) -> dict[str, float]:
    """``recon_psnr``, ``recon_mse``, ``recon_ssim`` (and ``recon_lpips`` when ``lpips`` is given) of a
    reconstruction against its source over the whole image, with the background metrics' official definitions
    (an empty mask: nothing is zeroed). PSNR is ``inf`` for a bit-identical reconstruction."""
    whole = np.zeros(as_uint8(source).shape[:2], dtype=bool)
    out = {
        "recon_psnr": background_psnr(source, recon, whole),
        "recon_mse": background_mse(source, recon, whole),
        "recon_ssim": background_ssim(source, recon, whole),
    }
    if lpips is not None:
        with torch.inference_mode():
            out["recon_lpips"] = background_lpips(source, recon, whole, lpips)
    return out


class _Fire(nn.Module):
    """SqueezeNet's Fire module, with torchvision's parameter names."""

    def __init__(self, inplanes: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze, kernel_size=1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, kernel_size=1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], 1)


class _Lin(nn.Module):
    """LPIPS' 1x1 linear head; the Dropout keeps the ``model.1.weight`` key of the shipped head files."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def squeezenet1_1_features() -> nn.Sequential:
    """SqueezeNet 1.1's feature extractor, with the state-dict keys of torchvision's ``squeezenet1_1().features``."""
    pool = lambda: nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)  # noqa: E731
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=3, stride=2),
        nn.ReLU(),
        pool(),
        _Fire(64, 16, 64, 64),
        _Fire(128, 16, 64, 64),
        pool(),
        _Fire(128, 32, 128, 128),
        _Fire(256, 32, 128, 128),
        pool(),
        _Fire(256, 48, 192, 192),
        _Fire(384, 48, 192, 192),
        _Fire(384, 64, 256, 256),
        _Fire(512, 64, 256, 256),
    )


class SqueezeLPIPS(nn.Module):
    """LPIPS (Zhang et al., CVPR 2018) with the SqueezeNet-1.1 backbone, as torchmetrics' ``net_type='squeeze'``.

    Written here because torchmetrics' and the ``lpips`` package's versions need torchvision. The backbone
    loads torchvision's ``squeezenet1_1`` ImageNet weights (:meth:`load_backbone`), the seven linear heads
    the ``squeeze.pth`` file that ships inside the torchmetrics wheel (:meth:`load_heads`). Random weights
    until loaded. ``forward(a, b)`` takes ``(N, 3, H, W)`` images in [-1, 1] and returns ``(N,)``.
    """

    CHANNELS = (64, 128, 256, 384, 384, 512, 512)
    TAPS = (1, 4, 7, 9, 10, 11, 12)  # indices in ``features`` after which the seven LPIPS layers are taken

    def __init__(self):
        super().__init__()
        self.features = squeezenet1_1_features()
        for i, c in enumerate(self.CHANNELS):
            self.add_module(f"lin{i}", _Lin(c))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None], persistent=False)
        self.eval().requires_grad_(False)

    def load_backbone(self, state_dict: dict[str, Tensor]) -> None:
        """Load torchvision ``squeezenet1_1`` weights (the classifier's keys are ignored)."""
        features = {k[len("features.") :]: v for k, v in state_dict.items() if k.startswith("features.")}
        self.features.load_state_dict(features, strict=True)

    def load_heads(self, state_dict: dict[str, Tensor]) -> None:
        """Load the LPIPS linear heads (keys ``lin0.model.1.weight`` ... ``lin6.model.1.weight``)."""
        heads = {k: v for k, v in state_dict.items() if k.startswith("lin")}
        expected = {f"lin{i}.model.1.weight" for i in range(len(self.CHANNELS))}
        if set(heads) != expected:
            raise ValueError(f"LPIPS head file has keys {sorted(heads)}, expected {sorted(expected)}")
        self.load_state_dict(heads, strict=False)

    def _taps(self, x: Tensor) -> list[Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                out.append(x)
        return out

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        fa = self._taps((a - self.shift) / self.scale)
        fb = self._taps((b - self.shift) / self.scale)
        total = 0.0
        for i, (x, y) in enumerate(zip(fa, fb)):
            x = x / torch.sqrt(1e-8 + (x**2).sum(dim=1, keepdim=True))
            y = y / torch.sqrt(1e-8 + (y**2).sum(dim=1, keepdim=True))
            total = total + getattr(self, f"lin{i}")((x - y) ** 2).mean(dim=(2, 3))
        return total.reshape(-1)


def lpips_heads_path() -> Path:
    """The SqueezeNet LPIPS heads inside the installed torchmetrics wheel."""
    spec = importlib.util.find_spec("torchmetrics")
    if spec is None or not spec.submodule_search_locations:
        raise MetricWeightsError("torchmetrics is not installed (pip install 'diffinv[bench]')")
    return Path(next(iter(spec.submodule_search_locations))) / "functional" / "image" / "lpips_models" / "squeeze.pth"


def load_lpips(
    device: torch.device | str = "cpu", weights: str | Path | None = None
) -> Callable[[Tensor, Tensor], Tensor]:
    """Pretrained LPIPS-SqueezeNet: from the weights folder when it holds it (:class:`SqueezeLPIPS`), else
    torchmetrics' own when torchvision imports, else :class:`SqueezeLPIPS` from torch's hub (cache first)."""
    root = resolve_weights_dir(weights)
    if root is not None and not missing_files(root, "lpips"):
        return load_lpips_net(root, device)
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent, or present but broken beside this torch build
        return load_lpips_net(root, device)
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    load_lpips_net(root, "cpu")  # the same files torchvision fetches: fails at once when offline and not cached
    return LearnedPerceptualImagePatchSimilarity(net_type="squeeze").to(device)


# -- structure distance -----------------------------------------------------------------------------


def _resize_shape(height: int, width: int, size: int = 224, max_size: int = 480) -> tuple[int, int]:
    """The output size of torchvision's ``Resize(size, max_size=max_size)`` (shorter side to ``size``)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    if new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if width <= height else (new_short, new_long)


class DinoStructure:
    """Structure distance with a ``transformers`` ``ViTModel`` (DINO ViT-B/8 for the official numbers)."""

    def __init__(self, model: nn.Module):
        self.model = model.eval()
        self.key_layer = _last_key_projection(model)

    def self_similarity(self, image: Any) -> Tensor:
        """Cosine self-similarity ``(T, T)`` of the last block's keys (all heads concatenated, CLS included)."""
        x = torch.from_numpy(as_uint8(image).astype(np.float32)).permute(2, 0, 1)[None]  # 0-255: official quirk
        x = F.interpolate(
            x, size=_resize_shape(*x.shape[2:]), mode="bilinear", align_corners=False, antialias=DINO_ANTIALIAS
        )
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x = ((x - mean) / std).to(_device_of(self.model), _dtype_of(self.model))
        captured: list[Tensor] = []
        handle = self.key_layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            self.model(pixel_values=x, interpolate_pos_encoding=True)
        finally:
            handle.remove()
        keys = captured[-1][0].float()  # (T, D)
        norm = keys.norm(dim=1, keepdim=True)
        return (keys @ keys.T) / torch.clamp(norm @ norm.T, min=1e-8)

    def __call__(self, source: Any, edited: Any) -> float:
        a, b = _pair(source, edited)
        with torch.inference_mode():
            return float(F.mse_loss(self.self_similarity(b), self.self_similarity(a)))


def _last_key_projection(model: nn.Module) -> nn.Module:
    layers = getattr(model, "layers", None)  # transformers >= 5
    if layers is not None and hasattr(layers[-1].attention, "k_proj"):
        return layers[-1].attention.k_proj
    encoder = getattr(model, "encoder", None)  # transformers 4.x
    if encoder is not None:
        return encoder.layer[-1].attention.attention.key
    raise ValueError(f"cannot find the last block's key projection in {type(model).__name__}")


def structure_distance(source: Any, edited: Any, dino: DinoStructure | nn.Module) -> float:
    """DINO self-similarity structure distance of two whole images (official ×10³ in tables)."""
    scorer = dino if isinstance(dino, DinoStructure) else DinoStructure(dino)
    return scorer(source, edited)


# -- CLIP ------------------------------------------------------------------------------------------


class ClipScorer:
    """``100 * max(cos(image, text), 0)`` with a ``CLIPModel`` and its processor (as torchmetrics' CLIPScore)."""

    def __init__(self, model: nn.Module, processor: Any):
        self.model, self.processor = model.eval(), processor

    def __call__(self, image: Any, prompt: str) -> float:
        pil = Image.fromarray(as_uint8(image))
        inputs = self.processor(text=[prompt], images=[pil], return_tensors="pt", padding=True)
        limit = self.model.config.text_config.max_position_embeddings  # longer prompts truncated, as torchmetrics
        device = _device_of(self.model)
        with torch.inference_mode():
            out = self.model(
                input_ids=inputs["input_ids"][:, :limit].to(device),
                attention_mask=inputs["attention_mask"][:, :limit].to(device),
                pixel_values=inputs["pixel_values"].to(device, _dtype_of(self.model)),
            )
            image_embeds = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
            text_embeds = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
            return float(100 * torch.clamp((image_embeds * text_embeds).sum(), min=0))


def clip_whole(edited: Any, prompt: str, clip: ClipScorer) -> float:
    """CLIP score of the whole edited image against the target prompt."""
    return clip(edited, prompt)


def clip_edited(edited: Any, mask: np.ndarray, prompt: str, clip: ClipScorer) -> float:
    """CLIP score of the edited region (background zeroed: ``uint8(image * mask)``) against the target prompt."""
    image = as_uint8(edited)
    mask = np.asarray(mask)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask is {mask.shape}, image is {image.shape[:2]}")
    if not mask.any():
        return math.nan
    return clip(np.uint8(image * mask.astype(np.float64)[:, :, None]), prompt)


# -- official conventions: edit size, summaries, totals ----------------------------------------------------


def align_edit(edited: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The edit as the official ``evaluate.py`` compares it with a source of ``size = (width, height)``.

    The official rule: a non-square output (e.g. the authors' side-by-side panels, the edit last) is cropped to
    its bottom-right 512x512, ``crop((W - 512, H - 512, W, H))`` (PIE-Bench's sources are all 512x512; here the
    box is the source's size); a square output is used as it is and must then be the source's size (the official
    script asserts it). Anything else is refused: resizing would change every metric.
    """
    width, height = edited.size
    w, h = size
    if width != height:
        if width < w or height < h:
            raise ValueError(f"edit is {width}x{height}: the official crop takes its bottom-right {w}x{h}")
        edited = edited.crop((width - w, height - h, width, height))
    if edited.size != (w, h):
        raise ValueError(
            f"edit is {edited.size[0]}x{edited.size[1]}, source is {w}x{h}: the official PIE-Bench "
            "evaluation compares same-size images only (generate at the data set's resolution)"
        )
    return edited


def summarize(values: Sequence[float | None]) -> dict[str, float | int]:
    """One metric's column: ``{mean, n, n_inf, n_nan}``; the mean is over the finite values only.

    ``n`` counts the finite values averaged; ``n_nan`` the ``nan`` (official ``"nan"``: a mask covering the whole
    image) and absent values; ``n_inf`` the infinities (PSNR of a background left bit-identical). The
    official script writes ``inf`` into its CSV, so its column mean would be ``inf``: a published finite PSNR
    had none, and a mean here with ``n_inf > 0`` is not comparable with it (report it beside the mean).
    """
    floats = [math.nan if v is None else float(v) for v in values]
    finite = [v for v in floats if math.isfinite(v)]
    return {
        "mean": sum(finite) / len(finite) if finite else math.nan,
        "n": len(finite),
        "n_inf": sum(1 for v in floats if math.isinf(v)),
        "n_nan": sum(1 for v in floats if math.isnan(v)),
    }


STYLE_TYPE = 9  # PIE-Bench's "change style" category, left out of the 620-image totals


def official_totals(rows: Sequence[dict[str, Any]], key: str = "editing_type_id") -> dict[str, list[dict[str, Any]]]:
    """The two totals papers report: ``"all"`` (700 images on the full set) and ``"no_style"`` (620: without
    edit type 9, the style edits that change every pixel, as in the papers' tables that leave them out)."""
    return {"all": list(rows), "no_style": [r for r in rows if int(r[key]) != STYLE_TYPE]}


# -- the suite -----------------------------------------------------------------------------------------


class MetricSuite:
    """The chosen metrics with their networks; ``suite(source, edited, mask, prompt)`` -> ``{name: value}``.

    ``dino``: a ``ViTModel``; ``clip``: ``(CLIPModel, CLIPProcessor)``; ``lpips``: a callable on images
    in [-1, 1]. Networks not given are loaded with their pretrained weights on ``device``: from ``weights``
    (a folder in the :mod:`diffinv.weights` layout; default ``$DIFFINV_WEIGHTS``), else the hub caches, else
    the hubs. When some cannot be loaded, one :class:`MetricWeightsError` names every metric left without
    weights and the fix.
    """

    def __init__(
        self,
        metrics: str | Sequence[str] | None = None,
        device: torch.device | str = "cpu",
        dino: nn.Module | None = None,
        clip: tuple[nn.Module, Any] | None = None,
        lpips: Callable[[Tensor, Tensor], Tensor] | None = None,
        weights: str | Path | None = None,
    ):
        self.names = parse_metrics(metrics)
        self.device = torch.device(device)
        self.weights = resolve_weights_dir(weights)
        failures: dict[str, str] = {}

        def need(key: str, given: Any, loader: Callable[..., Any]) -> Any:
            if given is not None or not set(BACKBONES[key].metrics) & set(self.names):
                return given
            try:
                return loader(self.weights, self.device)
            except Exception as err:
                failures[key] = _first_line(err)
                return None

        dino = need("dino", dino, load_dino)
        clip = need("clip", clip, load_clip)
        lpips = need("lpips", lpips, lambda w, d: load_lpips(d, w))
        if failures:
            raise MetricWeightsError(self._failure_message(failures))
        self.dino = DinoStructure(dino) if dino is not None else None
        self.clip = ClipScorer(*clip) if clip is not None else None
        self.lpips = lpips

    def _failure_message(self, failures: dict[str, str]) -> str:
        lacking = [m for key in failures for m in BACKBONES[key].metrics if m in self.names]
        rest = [m for m in self.names if m not in lacking]
        folder = self.weights if self.weights is not None else "DIR"
        why = "; ".join(failures.values())
        leave = f", or leave them out with --metrics {','.join(rest)}" if rest else ""
        return (
            f"no weights for metric(s) {', '.join(lacking)} ({why}); fix: run 'diffinv weights download --dir "
            f"{folder}' on a machine with internet, then pass --weights {folder} (or set DIFFINV_WEIGHTS){leave}"
        )

    def __call__(self, source: Any, edited: Any, mask: np.ndarray, prompt: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for name in self.names:
            if name == "structure_distance":
                out[name] = self.dino(source, edited)
            elif name == "psnr":
                out[name] = background_psnr(source, edited, mask)
            elif name == "mse":
                out[name] = background_mse(source, edited, mask)
            elif name == "ssim":
                out[name] = background_ssim(source, edited, mask)
            elif name == "lpips":
                with torch.inference_mode():
                    out[name] = background_lpips(source, edited, mask, self.lpips)
            elif name == "clip_whole":
                out[name] = clip_whole(edited, prompt, self.clip)
            elif name == "clip_edited":
                out[name] = clip_edited(edited, mask, prompt, self.clip)
        return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    if isinstance(err, WeightsUnavailable):
        return text.splitlines()[0]
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _device_of(module: Any) -> torch.device:
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _dtype_of(module: Any) -> torch.dtype:
    try:
        return next(module.parameters()).dtype
    except (AttributeError, StopIteration):
        return torch.float32
