"""The README as a user reads it: its Python snippets run as written, and every file it points at exists.

The snippets name real models and a GPU; here the model loader gives the tiny saved pipeline (on CPU, float32)
and the undefined names of the solver-core snippet are bound to the exact Gaussian model. Everything else, the
calls and their arguments, runs exactly as printed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import diffinv
from diffinv.analytic import GaussianModel

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def _snippet(marker: str) -> str:
    found = [s for s in SNIPPETS if marker in s]
    assert len(found) == 1, f"the README has no single python snippet with {marker!r}"
    return found[0]


def test_every_python_snippet_is_covered_here():
    covered = ("Editor.from_pretrained", "diffinv.invert(eps", "gradio_client")
    assert len(SNIPPETS) == len(covered) and all(any(c in s for s in SNIPPETS) for c in covered)


def test_the_editor_snippet_runs(tmp_path, monkeypatch):
    from PIL import Image
    from tiny import tiny_sd_pipe

    model = tmp_path / "model"
    tiny_sd_pipe().save_pretrained(model)
    load = diffinv.Editor.from_pretrained.__func__

    def tiny(cls, name, dtype=None, device=None, **options):
        assert name == "stable-diffusion-v1-5/stable-diffusion-v1-5" and device == "cuda"
        return load(cls, model, dtype=torch.float32, device="cpu", **options)

    monkeypatch.setattr(diffinv.Editor, "from_pretrained", classmethod(tiny))
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 64), (120, 90, 60)).save("photo.jpg")
    scope: dict = {}
    exec(_snippet("Editor.from_pretrained"), scope)
    assert len(scope["edits"]) == 2 and len(scope["recon"]) == 1
    assert scope["editor"].spacing == "lambda" and scope["editor"].solver.name == "ees27"


def test_the_solver_core_snippet_runs():
    sched = diffinv.NoiseSchedule.scaled_linear()
    model = GaussianModel(sched, torch.full((2, 3), 0.2, dtype=torch.float64), 0.3)
    x0 = model.sample(2, generator=torch.Generator().manual_seed(0))
    target = GaussianModel(sched, torch.full((2, 3), -0.2, dtype=torch.float64), 0.3)
    scope = {"diffinv": diffinv, "alphas_cumprod": sched.alphas_cumprod, "eps": model, "x0": x0}
    scope |= {"eps_target": target, "x_T": torch.randn(2, 2, 3, dtype=torch.float64)}
    exec(_snippet("diffinv.invert(eps"), scope)
    assert scope["x0_hat"].shape == x0.shape and scope["x"].shape == x0.shape


def test_the_app_api_snippet_names_the_real_endpoint():
    pytest.importorskip("gradio")
    from diffinv import app

    snippet = _snippet("gradio_client")  # needs a running server: tests/test_app.py drives this endpoint
    assert 'api_name="/compare"' in snippet and "compare" in dir(app)


def test_every_file_the_readme_points_at_exists():
    linked = re.findall(r"\]\(([^)#:]+)\)", README)
    named = re.findall(r"`((?:docs|benchmarks|tests|src|scripts|\.ci)/[\w./-]+)`", README)
    missing = sorted({p for p in linked + named if not (ROOT / p).exists() and "*" not in p})
    assert linked and missing == []
