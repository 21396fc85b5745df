"""Model families, one module each: which family a pipeline or a model folder is, and its adapter.

``FAMILIES`` is tried in order (the most specific first): a family claims a model by the pipeline class named in
its ``model_index.json`` (:func:`family_for_model`) and a loaded pipeline by its parts (:func:`family_of`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .base import Conditioning, ModelFamily, diffusers_timesteps
from .flow import FlowFamily
from .flux import Flux
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL

__all__ = [
    "FAMILIES",
    "Conditioning",
    "FlowFamily",
    "Flux",
    "ModelFamily",
    "StableDiffusion",
    "StableDiffusion3",
    "StableDiffusionXL",
    "diffusers_timesteps",
    "family_for_model",
    "family_of",
    "pipeline_name",
]

FAMILIES: tuple[type[ModelFamily], ...] = (StableDiffusion3, Flux, StableDiffusionXL, StableDiffusion)


def _supported() -> str:
    return ", ".join(f.pipelines[0] for f in FAMILIES)


def family_of(pipe: Any) -> ModelFamily:
    """The adapter of a loaded diffusers pipeline."""
    for family in FAMILIES:
        if family.matches(pipe):
            return family(pipe)
    raise ValueError(f"unsupported pipeline {type(pipe).__name__}; diffinv edits with {_supported()}")


def pipeline_name(model: str | Path) -> str:
    """The pipeline class name in the ``model_index.json`` of a local folder or a hub id."""
    path = Path(model)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ValueError(f"{path} is not a diffusers model folder (no model_index.json)")
    elif path.exists() or str(model).startswith((".", "/", "~")) or str(model).count("/") > 1:
        raise ValueError(f"model folder not found: {model}")
    else:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        from ..weights import hub_offline_reason

        cached = try_to_load_from_cache(str(model), "model_index.json")
        if not isinstance(cached, str):  # not in the local cache: the hub must answer, say at once if it cannot
            reason = hub_offline_reason()
            if reason is not None:
                raise ValueError(
                    f"model {model!r} is not in the local hub cache and {reason}; give a local model folder, "
                    "or run where the hub is reachable once to cache it"
                )
        try:
            index = Path(cached) if isinstance(cached, str) else Path(hf_hub_download(str(model), "model_index.json"))
        except Exception as err:
            raise ValueError(f"cannot find model {model!r} locally or on the hub: {str(err).splitlines()[0]}") from None
    try:
        return str(json.loads(index.read_text())["_class_name"])
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"cannot read {index}: {err}") from None


def family_for_model(model: str | Path) -> type[ModelFamily]:
    """The family of a model folder or hub id, from the pipeline its ``model_index.json`` names."""
    name = pipeline_name(model)
    for family in FAMILIES:
        if family.claims(name):
            return family
    raise ValueError(f"unsupported pipeline {name!r} in {model}; diffinv edits with {_supported()} models")
