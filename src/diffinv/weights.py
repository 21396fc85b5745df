"""Where the metric networks' pretrained weights come from: a local folder first, then the hubs.

A weights folder (``--weights DIR`` or ``DIFFINV_WEIGHTS=DIR``; filled by ``diffinv weights download --dir DIR``)
holds one sub-folder per backbone::

    DIR/dino-vitb8/                 ViTModel.save_pretrained of facebook/dino-vitb8      (structure_distance)
    DIR/clip-vit-large-patch14/     CLIPModel + CLIPProcessor.save_pretrained of
                                    openai/clip-vit-large-patch14                         (clip_whole, clip_edited)
    DIR/lpips-squeeze/squeezenet1_1.pth   torchvision's squeezenet1_1 ImageNet state dict (lpips)
    DIR/lpips-squeeze/squeeze.pth         the LPIPS linear heads (as shipped in the torchmetrics wheel)

A backbone missing from the folder is looked up in the local hub caches (Hugging Face, torch hub) and then
downloaded, but only when the hub answers: ``HF_HUB_OFFLINE=1`` or no network is reported at once, not after
minutes of retries.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

__all__ = [
    "BACKBONES",
    "ENV",
    "Backbone",
    "WeightsUnavailable",
    "check_weights",
    "download_weights",
    "hub_offline_reason",
    "load_clip",
    "load_dino",
    "load_lpips_net",
    "missing_files",
    "resolve_weights_dir",
]

ENV = "DIFFINV_WEIGHTS"
DINO_ID = "facebook/dino-vitb8"
CLIP_ID = "openai/clip-vit-large-patch14"
# torchvision's ``squeezenet1_1`` ImageNet weights (the LPIPS backbone), as torch hub caches them.
SQUEEZENET_URL = "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"
SQUEEZENET_FILE = "squeezenet1_1.pth"
LPIPS_HEADS_FILE = "squeeze.pth"
_MODEL_FILES = ("model.safetensors", "pytorch_model.bin")


class WeightsUnavailable(RuntimeError):
    """A backbone's weights are neither in the weights folder, nor cached, nor downloadable now."""


@dataclass(frozen=True)
class Backbone:
    """One metric network: its folder in the layout, where it comes from, and the metrics that need it."""

    name: str
    folder: str
    source: str
    metrics: tuple[str, ...]
    required: tuple[tuple[str, ...], ...]  # each entry: alternatives, one of which must exist


BACKBONES = {
    "dino": Backbone("DINO ViT-B/8", "dino-vitb8", DINO_ID, ("structure_distance",), (("config.json",), _MODEL_FILES)),
    "clip": Backbone(
        "CLIP ViT-L/14",
        "clip-vit-large-patch14",
        CLIP_ID,
        ("clip_whole", "clip_edited"),
        (
            ("config.json",),
            _MODEL_FILES,
            ("preprocessor_config.json", "processor_config.json"),
            ("tokenizer_config.json",),
            ("vocab.json", "tokenizer.json"),
        ),
    ),
    "lpips": Backbone(
        "LPIPS SqueezeNet + heads",
        "lpips-squeeze",
        f"{SQUEEZENET_URL} + torchmetrics' lpips_models/squeeze.pth",
        ("lpips",),
        ((SQUEEZENET_FILE,), (LPIPS_HEADS_FILE,)),
    ),
}


def resolve_weights_dir(weights: str | Path | None = None) -> Path | None:
    """The weights folder: ``weights`` if given, else ``$DIFFINV_WEIGHTS``, else None (hub only)."""
    if weights is None or str(weights) == "":
        weights = os.environ.get(ENV) or None
    return None if weights is None else Path(weights).expanduser()


def missing_files(root: Path, key: str) -> list[str]:
    """The files of backbone ``key`` that ``root`` lacks (``a|b``: neither alternative is there)."""
    folder = root / BACKBONES[key].folder
    return ["|".join(alt) for alt in BACKBONES[key].required if not any((folder / f).is_file() for f in alt)]


def check_weights(root: str | Path) -> dict[str, list[str]]:
    """``{backbone key: missing files}`` for every backbone (an empty list: present)."""
    return {key: missing_files(Path(root), key) for key in BACKBONES}


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline_reason(host: str | None = None, timeout: float = 3.0) -> str | None:
    """Why ``host`` (default: ``$HF_ENDPOINT``'s, else huggingface.co) cannot be reached now, as one short
    phrase, or None when it answers a TCP connect (or a proxy is configured: the hub client then decides)."""
    if _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE"):
        return "the hub is off (HF_HUB_OFFLINE=1)"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    if host is None:
        host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as err:
        return f"{host} is unreachable ({err.strerror or type(err).__name__})"
    return None


def _local_dir(weights: str | Path | None, key: str) -> Path | None:
    """The backbone's folder in the weights folder when every file is there, else None."""
    root = resolve_weights_dir(weights)
    if root is None or missing_files(root, key):
        return None
    return root / BACKBONES[key].folder


def _from_hf(key: str, weights: str | Path | None, load: Callable[[str, bool], Any]) -> Any:
    """``load(path_or_id, local_files_only)`` from the weights folder, else the HF cache, else the hub."""
    local = _local_dir(weights, key)
    if local is not None:
        return load(str(local), True)
    try:
        return load(BACKBONES[key].source, True)  # already in the Hugging Face cache
    except Exception:
        pass
    reason = hub_offline_reason()
    if reason is not None:
        raise WeightsUnavailable(_where(key, weights, reason))
    return load(BACKBONES[key].source, False)


def _where(key: str, weights: str | Path | None, reason: str) -> str:
    root = resolve_weights_dir(weights)
    place = f"not in {root / BACKBONES[key].folder}" if root is not None else "no --weights folder"
    return f"{BACKBONES[key].name}: {place}, not cached, and {reason}"


def load_dino(weights: str | Path | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """DINO ViT-B/8 as a ``transformers`` ``ViTModel`` (no pooler)."""
    from transformers import ViTModel

    load = lambda src, local: ViTModel.from_pretrained(src, add_pooling_layer=False, local_files_only=local)  # noqa: E731
    return _from_hf("dino", weights, load).to(device)


def load_clip(weights: str | Path | None = None, device: torch.device | str = "cpu") -> tuple[nn.Module, Any]:
    """CLIP ViT-L/14: ``(CLIPModel, CLIPProcessor)``."""
    from transformers import CLIPModel, CLIPProcessor

    def load(src: str, local: bool) -> tuple[nn.Module, Any]:
        return CLIPModel.from_pretrained(src, local_files_only=local), CLIPProcessor.from_pretrained(
            src, local_files_only=local
        )

    model, processor = _from_hf("clip", weights, load)
    return model.to(device), processor


def _torch_hub_file() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / SQUEEZENET_URL.rsplit("/", 1)[1]


def _squeezenet_state(weights: str | Path | None) -> dict[str, torch.Tensor]:
    local = _local_dir(weights, "lpips")
    if local is not None:
        return torch.load(local / SQUEEZENET_FILE, map_location="cpu", weights_only=True)
    if not _torch_hub_file().is_file():
        reason = hub_offline_reason("download.pytorch.org")
        if reason is not None:
            raise WeightsUnavailable(_where("lpips", weights, reason))
    return torch.hub.load_state_dict_from_url(SQUEEZENET_URL, map_location="cpu", check_hash=True, weights_only=True)


def _heads_file(weights: str | Path | None) -> Path:
    local = _local_dir(weights, "lpips")
    if local is not None:
        return local / LPIPS_HEADS_FILE
    from .metrics import lpips_heads_path

    return lpips_heads_path()


def load_lpips_net(weights: str | Path | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """LPIPS-SqueezeNet (:class:`diffinv.metrics.SqueezeLPIPS`) with pretrained backbone and heads."""
    from .metrics import SqueezeLPIPS

    net = SqueezeLPIPS()
    net.load_backbone(_squeezenet_state(weights))
    net.load_heads(torch.load(_heads_file(weights), map_location="cpu", weights_only=True))
    return net.to(device)


def download_weights(root: str | Path, log: Callable[[str], None] = print) -> dict[str, list[str]]:
    """Fill ``root`` with every backbone (from the hubs the metrics use); returns :func:`check_weights`."""
    from transformers import CLIPModel, CLIPProcessor, ViTModel

    root = Path(root)
    reason = hub_offline_reason()
    if reason is not None:
        raise WeightsUnavailable(f"cannot download the metric weights: {reason}")
    for key in BACKBONES:
        if not missing_files(root, key):
            log(f"present  {BACKBONES[key].folder}")
            continue
        target = root / BACKBONES[key].folder
        target.mkdir(parents=True, exist_ok=True)
        log(f"fetching {BACKBONES[key].folder} from {BACKBONES[key].source}")
        if key == "dino":
            ViTModel.from_pretrained(DINO_ID, add_pooling_layer=False).save_pretrained(target)
        elif key == "clip":
            CLIPModel.from_pretrained(CLIP_ID).save_pretrained(target)
            CLIPProcessor.from_pretrained(CLIP_ID).save_pretrained(target)
        else:
            state = torch.hub.load_state_dict_from_url(
                SQUEEZENET_URL, map_location="cpu", check_hash=True, weights_only=True
            )
            torch.save(state, target / SQUEEZENET_FILE)
            from .metrics import lpips_heads_path

            shutil.copyfile(lpips_heads_path(), target / LPIPS_HEADS_FILE)
    return check_weights(root)
