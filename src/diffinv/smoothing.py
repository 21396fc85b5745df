"""Smoothing strategies for editing: negative-prompt inversion, proximal guidance, Smooth-Diffusion LoRA.

Selected by name (composable): ``"npi"``, ``"proximal"``, ``"smooth-lora"`` (reference/solvers.md §9).

* **NPI** (Miyake et al.): invert with the source prompt alone (no CFG); while editing, the source
  prompt's embedding takes the place of the null embedding, ``eps = eps(c_src) + w (eps(c_tgt) - eps(c_src))``.
  The editor implements it by choosing the conditioning; nothing here.
* **Proximal guidance** (Han et al., ``phymhan/prompt-to-prompt``): the CFG difference is thresholded
  (:func:`proximal_delta`), and below ``recon_t`` the latent outside the edit mask is pulled to the
  stored inversion latent (:meth:`ProximalGuidance.blend`).
* **Smooth Diffusion** (Guo et al.): a rank-8 LoRA on the UNet's attention projections, merged into
  the weights, ``W += scale * up @ down`` (:func:`load_lora`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PROX_KINDS",
    "SMOOTHINGS",
    "SMOOTH_LORA_ID",
    "LoraPair",
    "ProximalGuidance",
    "load_lora",
    "lora_pairs",
    "merge_lora",
    "parse_smoothing",
    "proximal_delta",
    "read_lora_file",
]

SMOOTHINGS = ("npi", "proximal", "smooth-lora")
PROX_KINDS = ("l0", "l1")
# The authors' LoRA on the hub (trained on SD v1.5); file smooth_lora.safetensors.
SMOOTH_LORA_ID = "shi-labs/smooth-diffusion-lora"


def parse_smoothing(smoothing: str | Iterable[str] | None) -> tuple[str, ...]:
    """Validated, de-duplicated smoothing names in a fixed order (``"a,b"`` strings allowed)."""
    if smoothing is None:
        return ()
    names = smoothing.split(",") if isinstance(smoothing, str) else list(smoothing)
    chosen = set()
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"smoothing names must be strings, got {name!r}")
        key = name.strip().lower().replace("_", "-")
        if not key:
            continue
        if key not in SMOOTHINGS:
            raise ValueError(f"unknown smoothing {name!r}; choose from {', '.join(SMOOTHINGS)}")
        chosen.add(key)
    return tuple(n for n in SMOOTHINGS if n in chosen)


# -- proximal guidance -------------------------------------------------------------------------


def proximal_delta(delta: Tensor, quantile: float, prox: str = "l0", groups: int = 1) -> tuple[Tensor, Tensor]:
    """The reference's thresholded CFG difference and its threshold ``tau``.

    ``tau`` is the ``quantile`` of ``|delta|`` over the whole (batched) tensor, as the reference's batch holds
    one image's rows, or over each of ``groups`` equal consecutive row blocks (one per image, so that images
    edited in one batch do not share a threshold; ``tau`` then has one value per row); or ``-quantile`` when
    ``quantile <= 0`` (a fixed threshold). Exactly as ``proximal_guidance_diffusion_step`` computes it
    (the branch names do not match the usual proximal operators):
    ``"l0"``: ``delta - clamp(delta, -tau, tau)`` (a soft threshold);
    ``"l1"``: the same, then ``-tau`` where positive, then ``+tau`` where negative, sequentially.
    """
    if prox not in PROX_KINDS:
        raise ValueError(f"unknown proximal kind {prox!r}; choose one of {', '.join(PROX_KINDS)}")
    if delta.shape[0] % groups:
        raise ValueError(f"{delta.shape[0]} rows do not split into {groups} equal groups")
    if quantile > 0:
        mag = delta.abs() if delta.dtype in (torch.float32, torch.float64) else delta.abs().float()
        if groups == 1:
            tau = mag.quantile(float(quantile)).to(delta.dtype)
        else:
            per_group = mag.reshape(groups, -1).quantile(float(quantile), dim=1).to(delta.dtype)
            tau = per_group.repeat_interleave(delta.shape[0] // groups).view(-1, *[1] * (delta.dim() - 1))
    else:
        tau = torch.as_tensor(-float(quantile), dtype=delta.dtype, device=delta.device)
    out = delta - torch.minimum(torch.maximum(delta, -tau), tau)
    if prox == "l1":
        out = torch.where(out > 0, out - tau, out)
        out = torch.where(out < 0, out + tau, out)
    return out, tau


@dataclass(frozen=True)
class ProximalGuidance:
    """Proximal guidance options (defaults: the ProxNPI reference settings).

    ``quantile``: threshold quantile of ``|delta|`` (``<= 0``: fixed threshold ``-quantile``);
    ``prox``: ``"l0"`` or ``"l1"``; ``recon_t``: apply inversion guidance while the step's model
    timestep is below it (0 disables); ``recon_lr``: pull strength (1 = replace by the inversion
    latent outside the mask); ``dilate_mask``: max-pool radius of the edit mask.
    """

    quantile: float = 0.75
    prox: str = "l0"
    recon_t: float = 400.0
    recon_lr: float = 1.0
    dilate_mask: int = 1

    def __post_init__(self) -> None:
        if self.prox not in PROX_KINDS:
            raise ValueError(f"unknown proximal kind {self.prox!r}; choose one of {', '.join(PROX_KINDS)}")
        if not (math.isfinite(self.quantile) and self.quantile < 1):
            raise ValueError(f"proximal quantile must be < 1 (or <= 0 for a fixed threshold), got {self.quantile!r}")
        if not math.isfinite(self.recon_t) or not math.isfinite(self.recon_lr):
            raise ValueError(f"recon_t and recon_lr must be finite, got {self.recon_t!r}, {self.recon_lr!r}")
        if isinstance(self.dilate_mask, bool) or int(self.dilate_mask) != self.dilate_mask or self.dilate_mask < 0:
            raise ValueError(f"dilate_mask must be a non-negative integer, got {self.dilate_mask!r}")

    def guide(self, eps_uncond: Tensor, eps_cond: Tensor, guidance: float, groups: int = 1) -> tuple[Tensor, Tensor]:
        """Guided noise ``eps_uncond + w * prox(delta)`` and the edit mask ``1[|prox(delta)| > tau]``, dilated;
        ``groups``: the images in the batch, each with its own threshold (:func:`proximal_delta`)."""
        delta, tau = proximal_delta(eps_cond - eps_uncond, self.quantile, self.prox, groups)
        mask = (delta.abs() > tau).to(delta.dtype)
        if self.dilate_mask > 0:
            r = int(self.dilate_mask)
            mask = F.max_pool2d(mask, kernel_size=2 * r + 1, stride=1, padding=r)
        return eps_uncond + guidance * delta, mask

    def active(self, t: float) -> bool:
        """Whether inversion guidance applies after a step whose model timestep is ``t`` (reference rule)."""
        return (self.recon_t > 0 and t < self.recon_t) or (self.recon_t < 0 and t > -self.recon_t)

    def blend(self, x: Tensor, x_star: Tensor, mask: Tensor) -> Tensor:
        """``x - recon_lr * (x - x_star) * (1 - mask)``: pull the unedited region to the inversion latent."""
        return x - self.recon_lr * (x - x_star) * (1 - mask.to(x.dtype))


# -- LoRA --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraPair:
    """One LoRA update of the linear layer ``module``: ``W += scale * alpha_ratio * up @ down``."""

    module: str
    down: Tensor  # (rank, in)
    up: Tensor  # (out, rank)
    alpha_ratio: float  # network_alpha / rank, 1 without an alpha
    key: str  # the down key, for messages


_OLD = re.compile(r"^(?P<mod>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<which>down|up)\.weight$")
_NEW = re.compile(
    r"^(?P<mod>.+?)\.(?:lora_(?P<ab>A|B)(?:\.default)?|lora\.(?P<du>down|up)|lora_(?P<ld>down|up))\.weight$"
)
_ALPHA = re.compile(r"^(?P<mod>.+)\.alpha$")
_PREFIXES = ("base_model.model.", "unet.")


def _module_name(key: str) -> tuple[str, str]:
    """``(module path, "down"|"up")`` of a LoRA weight key in either format; ``ValueError`` otherwise."""
    m = _OLD.match(key)
    if m:
        proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
        return f"{m['mod']}.{proj}", m["which"]
    k = key
    for prefix in _PREFIXES:
        if k.startswith(prefix):
            k = k[len(prefix) :]
    m = _NEW.match(k)
    if m:
        which = {"A": "down", "B": "up"}.get(m["ab"] or "", m["du"] or m["ld"])
        return m["mod"], which
    raise ValueError(f"unrecognised LoRA key {key!r} (expected '...processor.to_q_lora.down.weight' or PEFT 'lora_A')")


def lora_pairs(state_dict: dict[str, Tensor], unet: nn.Module) -> list[LoraPair]:
    """Match a LoRA state dict to ``unet``'s linear layers, checking every key and shape first.

    Accepts the old diffusers attention-processor format (Smooth Diffusion's file) and the
    PEFT / diffusers format (``lora_A``/``lora_B``, ``lora.down``/``lora.up``, optional ``.alpha``).
    Raises ``ValueError`` naming the first bad key.
    """
    if not state_dict:
        raise ValueError("the LoRA file holds no tensors")
    modules = dict(unet.named_modules())
    parts: dict[str, dict[str, tuple[str, Tensor]]] = {}
    alphas: dict[str, float] = {}
    for key in sorted(state_dict):
        value = state_dict[key]
        if not isinstance(value, Tensor):
            raise ValueError(f"LoRA entry {key!r} is not a tensor")
        stripped = key
        for prefix in _PREFIXES:
            if stripped.startswith(prefix):
                stripped = stripped[len(prefix) :]
        m = _ALPHA.match(stripped)
        if m and value.numel() == 1:
            alphas[m["mod"]] = float(value)
            continue
        if key.startswith(("text_encoder", "lora_te")):
            raise ValueError(f"LoRA key {key!r} targets a text encoder; only UNet LoRAs are supported")
        name, which = _module_name(key)
        if which in parts.setdefault(name, {}):
            raise ValueError(f"LoRA key {key!r} duplicates {parts[name][which][0]!r}")
        parts[name][which] = (key, value)
    pairs = []
    for name, got in parts.items():
        first = min(k for k, _ in got.values())
        if set(got) != {"down", "up"}:
            missing = ({"down", "up"} - set(got)).pop()
            raise ValueError(f"LoRA key {first!r} has no matching {missing} weight")
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            what = "no such module" if module is None else f"a {type(module).__name__}, not a Linear layer"
            raise ValueError(f"LoRA key {first!r}: the UNet has {what} at {name!r}")
        (dkey, down), (ukey, up) = got["down"], got["up"]
        # The key at fault first: a size that does not fit the layer, then a rank the pair does not share.
        for key, value, what in ((dkey, down, "down"), (ukey, up, "up")):
            if value.dim() != 2:
                raise ValueError(f"LoRA key {key!r}: a {what} weight must be a matrix, got shape {tuple(value.shape)}")
        if down.shape[1] != module.in_features:
            raise ValueError(
                f"LoRA key {dkey!r}: shape {tuple(down.shape)} does not fit {name} ({module.in_features} in)"
            )
        if up.shape[0] != module.out_features:
            raise ValueError(
                f"LoRA key {ukey!r}: shape {tuple(up.shape)} does not fit {name} ({module.out_features} out)"
            )
        if down.shape[0] != up.shape[1]:
            raise ValueError(f"LoRA key {dkey!r}: down {tuple(down.shape)} and up {tuple(up.shape)} do not chain")
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise ValueError(f"LoRA key {dkey!r}: weights contain NaN or inf")
        rank = down.shape[0]
        pairs.append(LoraPair(name, down, up, alphas.get(name, rank) / rank, dkey))
    unused = sorted(set(alphas) - set(parts))
    if unused:
        raise ValueError(f"LoRA alpha for {unused[0]!r} has no weights")
    return pairs


def merge_lora(unet: nn.Module, pairs: Sequence[LoraPair], scale: float = 1.0) -> None:
    """Add ``scale * alpha_ratio * up @ down`` to each paired weight (computed in float32 or better)."""
    modules = dict(unet.named_modules())
    for p in pairs:
        weight = modules[p.module].weight
        work = torch.float64 if weight.dtype == torch.float64 else torch.float32
        delta = (scale * p.alpha_ratio) * (p.up.to(weight.device, work) @ p.down.to(weight.device, work))
        weight.data.copy_((weight.data.to(work) + delta).to(weight.dtype))  # outside any autograd graph


def read_lora_file(path: str | Path, allow_pickle: bool = False) -> dict[str, Tensor]:
    """Tensors of a LoRA file: safetensors, or with ``allow_pickle`` a torch pickle loaded with ``weights_only=True``.

    Without ``allow_pickle`` a pickled checkpoint (``.bin``, ``.pt``) is refused before it is opened; with it,
    only tensors and plain containers are unpickled (never arbitrary objects).
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"LoRA file not found: {p}")
    with open(p, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header
    is_safetensors = len(head) == 9 and head[8:9] == b"{"
    if not is_safetensors and not allow_pickle:
        raise ValueError(
            f"LoRA file {p} is not a safetensors file; a pickled checkpoint loads only with allow_pickle=True "
            "(diffinv edit --allow-pickle), and then as tensors only (torch.load weights_only=True)"
        )
    try:
        if is_safetensors:
            from safetensors.torch import load_file

            return load_file(str(p), device="cpu")
        data = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read LoRA file {p}: {str(err).splitlines()[0] if str(err) else err!r}") from None
    if not isinstance(data, dict):
        raise ValueError(f"LoRA file {p} does not hold a dict of tensors")
    return data


def _resolve_lora(source: str | Path) -> Path:
    """A local LoRA file from a file path, a folder holding one, or a hub repo id."""
    p = Path(source)
    if p.is_file():
        return p
    if p.is_dir():
        files = sorted(p.glob("*.safetensors")) or sorted([*p.glob("*.bin"), *p.glob("*.pt")])
        if len(files) != 1:
            raise ValueError(f"LoRA folder {p} must hold exactly one weights file, found {len(files)}")
        return files[0]
    if p.suffix in (".safetensors", ".bin", ".pt", ".pth") or str(source).startswith((".", "/", "~")):
        raise ValueError(f"LoRA file not found: {p}")
    from huggingface_hub import hf_hub_download, list_repo_files

    try:
        files = list_repo_files(str(source))
    except Exception as err:
        raise ValueError(f"cannot find LoRA {source!r} locally or on the hub: {err}") from None
    safes = [f for f in files if f.endswith(".safetensors")]
    preferred = [f for f in safes if Path(f).name in ("smooth_lora.safetensors", "pytorch_lora_weights.safetensors")]
    choice = (preferred or safes or [None])[0]
    if choice is None:
        raise ValueError(f"hub repo {source!r} has no .safetensors LoRA file")
    return Path(hf_hub_download(str(source), choice))


class LoraHooks:
    """An unmerged LoRA: forward hooks that add ``scale * alpha_ratio * up(down(x))`` to each paired layer.

    The UNet's weights stay untouched; :meth:`remove` detaches the LoRA again.
    """

    def __init__(self, unet: nn.Module, pairs: Sequence[LoraPair], scale: float = 1.0):
        modules = dict(unet.named_modules())
        self.layers = [p.module for p in pairs]
        self._handles = [modules[p.module].register_forward_hook(self._hook(p, scale)) for p in pairs]

    @staticmethod
    def _hook(pair: LoraPair, scale: float):
        cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

        def add_lora(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
            x = args[0]
            key = (x.device, x.dtype)
            if key not in cache:
                cache[key] = (
                    pair.down.to(x.device, x.dtype),
                    (scale * pair.alpha_ratio) * pair.up.to(x.device, x.dtype),
                )
            down, up = cache[key]
            return out + nn.functional.linear(nn.functional.linear(x, down), up)

        return add_lora

    def remove(self) -> None:
        """Detach the LoRA from the UNet."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def load_lora(
    unet: nn.Module,
    source: str | Path | dict[str, Tensor] = SMOOTH_LORA_ID,
    scale: float = 1.0,
    merge: bool = True,
    allow_pickle: bool = False,
) -> list[str] | LoraHooks:
    """Apply a LoRA (file, folder, hub id or state dict) to ``unet`` with strength ``scale``.

    Every key and shape is checked before anything changes. ``merge=True`` adds the update to the
    weights and returns the names of the changed layers; ``merge=False`` leaves the weights alone and
    returns the :class:`LoraHooks` that apply it at run time (and can remove it). ``allow_pickle``: accept a
    pickled checkpoint (see :func:`read_lora_file`).
    """
    if not math.isfinite(float(scale)):
        raise ValueError(f"LoRA scale must be finite, got {scale!r}")
    state = source if isinstance(source, dict) else read_lora_file(_resolve_lora(source), allow_pickle)
    pairs = lora_pairs(state, unet)
    if not merge:
        return LoraHooks(unet, pairs, float(scale))
    merge_lora(unet, pairs, float(scale))
    return [p.module for p in pairs]
