"""Where a result came from: package versions and the model's revision, for run configs and output sidecars."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import platform
from pathlib import Path
from typing import Any

__all__ = ["editor_settings", "folder_hash", "model_revision", "record", "versions"]

PACKAGES = ("diffinv", "torch", "diffusers", "transformers", "numpy", "pillow")
# Files read whole by folder_hash; weight files enter only by name and size (hashing gigabytes is too slow).
_SMALL_SUFFIXES = (".json", ".txt", ".model", ".yaml", ".yml")


def versions() -> dict[str, str]:
    """Python and the installed versions of the packages that decide a result (``"absent"`` if not installed)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def folder_hash(folder: str | Path) -> str:
    """A sha256 of a model folder: every file's relative path and size, and the content of its config files."""
    root = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        digest.update(f"{rel}\0{path.stat().st_size}\0".encode())
        if path.suffix in _SMALL_SUFFIXES:
            digest.update(path.read_bytes())
    return digest.hexdigest()


def model_revision(model: str | Path) -> dict[str, Any]:
    """``{"folder_hash": ...}`` for a local folder, ``{"revision": commit}`` for a hub id found in the local cache
    (``{"revision": None}`` when the cache does not hold it)."""
    path = Path(model)
    if path.is_dir():
        return {"folder_hash": folder_hash(path)}
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(model), "model_index.json")
    except Exception:  # not a valid repo id, or no huggingface_hub
        cached = None
    if isinstance(cached, str) and "snapshots" in Path(cached).parts:
        parts = Path(cached).parts
        return {"revision": parts[parts.index("snapshots") + 1]}
    return {"revision": None}


def editor_settings(editor: Any, model: str | Path, lora: Any = None, lora_merge: bool = True) -> dict[str, Any]:
    """Every setting of a :class:`diffinv.editor.Editor` as it resolved them (``lora``: the LoRA source given)."""
    return {
        "model": str(model),
        "model_family": editor.family.name,
        "solver": editor.solver.name,
        "solver_options": editor.solver.options(),
        "steps": editor.steps,
        "spacing": editor.spacing,
        "timesteps": editor.timesteps.tolist(),
        "strength": editor.strength,
        "guidance": editor.guidance,
        "inversion_guidance": None if editor.npi else editor.inversion_guidance,
        "negative_prompt": editor.negative_prompt,
        "smoothing": list(editor.smoothing),
        "lora": None if lora is None else str(lora),
        "lora_scale": editor.lora_scale if editor.lora_layers else None,
        "lora_merge": lora_merge if editor.lora_layers else None,
        "resize": editor.resize,
        "size": list(editor.size),
        "dtype": str(editor.unet.dtype).removeprefix("torch."),
        "solver_dtype": str(editor.solver_dtype).removeprefix("torch."),
        "device": str(editor.device),
    }


def record(
    source_image: str, source_prompt: str, settings: dict[str, Any], model: str | Path | None, seed: int | None = None
) -> dict[str, Any]:
    """What decided a set of outputs: source, settings, seed, the model's revision (``model=None``: a built-in
    model, no revision), the versions and the time it was made."""
    return {
        "source_image": source_image,
        "source_prompt": source_prompt,
        "settings": settings,
        "seed": seed,
        "model_revision": None if model is None else model_revision(model),
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
