"""Images in and out of the editor: load any photo as RGB at the model's size, tensors <-> PIL, grids.

The resize rule (``resize=``), applied after EXIF rotation and conversion to RGB:

* ``"crop"`` (default): scale so the image covers the target size, then center-crop (keeps aspect;
  the prompt-to-prompt / PIE-Bench ``load_512`` convention for square models).
* ``"pad"``: scale so the image fits inside the target size, then pad the borders with white (keeps
  aspect and every pixel).
* ``"stretch"``: resize to the target size ignoring the aspect ratio.

Transparent images (RGBA, LA, palette with transparency) are composited over white; 16-bit and
32-bit integer greyscale (``I;16``, ``I``) are scaled to 8 bits; CMYK and other modes go through
Pillow's RGB conversion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from torch import Tensor

__all__ = [
    "RESIZE_MODES",
    "check_output_path",
    "image_grid",
    "load_image",
    "pil_to_tensor",
    "psnr",
    "save_image",
    "tensor_to_pil",
    "to_rgb",
]

RESIZE_MODES = ("crop", "pad", "stretch")
ImageLike = Any  # str | Path | PIL.Image.Image | np.ndarray


def _open(path: str | Path) -> Image.Image:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"image file not found: {p}")
    if p.is_dir():
        raise ValueError(f"image path is a directory, not a file: {p}")
    try:
        with Image.open(p) as img:
            img.load()
            return ImageOps.exif_transpose(img) or img
    except Image.DecompressionBombError as err:  # over Image.MAX_IMAGE_PIXELS: refuse before decoding
        raise ValueError(f"cannot read image {p}: {err} (raise PIL.Image.MAX_IMAGE_PIXELS if you trust it)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise ValueError(f"cannot read image {p}: {err}") from None


def _from_array(arr: np.ndarray) -> Image.Image:
    """An 8-bit RGB image from an (H, W), (H, W, 1|3|4) uint8/uint16/float [0, 1] array."""
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or min(a.shape[:2]) < 1:
        raise ValueError(f"image array must have shape (H, W) or (H, W, 3|4), got {a.shape}")
    if a.dtype == np.uint8:
        u8 = a
    elif a.dtype == np.uint16:
        u8 = np.round(a.astype(np.float64) / 257.0).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError("image array contains NaN or inf")
        u8 = np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise ValueError(f"image array dtype must be uint8, uint16 or float in [0, 1], got {a.dtype}")
    img = Image.fromarray(np.ascontiguousarray(u8))
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB: alpha composited over white, 16/32-bit greyscale scaled to 8 bits."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        grey = np.round(np.clip(a / top, 0.0, 1.0) * 255.0).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode == "F":
        return _from_array(np.asarray(img, dtype=np.float64))
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _fit(img: Image.Image, size: tuple[int, int], resize: str) -> Image.Image:
    height, width = size
    if img.size == (width, height):
        return img
    if resize == "stretch":
        return img.resize((width, height), Image.Resampling.LANCZOS)
    if resize == "crop":
        return ImageOps.fit(img, (width, height), Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    return ImageOps.pad(img, (width, height), Image.Resampling.LANCZOS, color=(255, 255, 255), centering=(0.5, 0.5))


def load_image(image: ImageLike, size: tuple[int, int] | None = None, resize: str = "crop") -> Image.Image:
    """An RGB PIL image from a path, PIL image or array, resized to ``size = (height, width)`` by ``resize``.

    ``size=None`` keeps the image's own size. Missing or unreadable files raise ``ValueError`` naming the path.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r}; choose one of {', '.join(RESIZE_MODES)}")
    if isinstance(image, (str, Path)):
        img = to_rgb(_open(image))
    elif isinstance(image, Image.Image):
        img = to_rgb(ImageOps.exif_transpose(image) or image)
    elif isinstance(image, np.ndarray):
        img = _from_array(image)
    else:
        raise ValueError(f"image must be a path, a PIL image or a numpy array, got {type(image).__name__}")
    if size is not None:
        h, w = (int(s) for s in size)
        if h < 1 or w < 1:
            raise ValueError(f"image size must be positive, got {size!r}")
        img = _fit(img, (h, w), resize)
    return img


def pil_to_tensor(images: Sequence[Image.Image]) -> Tensor:
    """A float32 batch ``(N, 3, H, W)`` in ``[-1, 1]`` from RGB images of one size."""
    arrays = [np.asarray(to_rgb(im), dtype=np.float32) / 127.5 - 1.0 for im in images]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"images must share one size, got {sorted({a.shape[:2] for a in arrays})}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def tensor_to_pil(x: Tensor) -> list[Image.Image]:
    """RGB images from a batch ``(N, 3, H, W)`` in ``[-1, 1]`` (clamped)."""
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in arr]


def image_grid(
    images: Sequence[Image.Image],
    background: tuple[int, int, int] = (255, 255, 255),
    captions: Sequence[str] | None = None,
) -> Image.Image:
    """The images side by side in one row (top-aligned; heights may differ), each with its caption below if given."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"give one caption per image: {len(captions)} captions for {len(images)} images")
    font = ImageFont.load_default() if captions is not None else None
    lines = [_wrap(c, im.width, font) for c, im in zip(captions, images)] if captions is not None else []
    line_height = 12
    text_height = (max(len(ls) for ls in lines) * line_height + 4) if lines else 0
    width = sum(im.width for im in images)
    height = max(im.height for im in images)
    grid = Image.new("RGB", (width, height + text_height), background)
    draw = ImageDraw.Draw(grid)
    x = 0
    for n, im in enumerate(images):
        grid.paste(to_rgb(im), (x, 0))
        for k, line in enumerate(lines[n] if lines else []):
            draw.text((x + 2, height + 2 + k * line_height), line, fill=(0, 0, 0), font=font)
        x += im.width
    return grid


def _wrap(text: str, width: int, font: ImageFont.ImageFont) -> list[str]:
    """``text`` broken into lines that fit ``width`` pixels (words longer than a line are cut)."""
    lines: list[str] = []
    for word in text.split():
        trial = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(trial) <= width - 4:
            lines[-1] = trial
        else:
            while font.getlength(word) > width - 4 and len(word) > 1:
                cut = max(1, int(len(word) * (width - 4) / font.getlength(word)))
                lines.append(word[:cut])
                word = word[cut:]
            lines.append(word)
    return lines or [""]


def psnr(reference: Image.Image, image: Image.Image) -> float:
    """PSNR in dB of two RGB images of one size (8-bit values, peak 255); ``inf`` when they are identical."""
    a = np.asarray(to_rgb(reference), dtype=np.float64)
    b = np.asarray(to_rgb(image), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images differ in size: {a.shape[:2]} vs {b.shape[:2]}")
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def save_image(image: Image.Image, path: str | Path, text: dict[str, str] | None = None) -> Path:
    """Save ``image`` (format from the suffix), creating parent folders; returns the path.

    ``text``: key/value text chunks stored in a PNG (other formats have no such chunks and store none).
    """
    p = Path(path)
    check_output_path(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {}
    if text and Image.registered_extensions().get(p.suffix.lower()) == "PNG":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for key, value in text.items():
            info.add_itxt(key, value)
        options["pnginfo"] = info
    image.save(p, **options)
    return p


def check_output_path(path: str | Path) -> None:
    """Raise ``ValueError`` unless Pillow can write an image with ``path``'s suffix."""
    suffix = Path(path).suffix.lower()
    if Image.registered_extensions().get(suffix) not in Image.SAVE:
        raise ValueError(f"cannot write image {path}: unknown image suffix {suffix or '(none)'!r} (use .png or .jpg)")
