"""Helpers of the reliability suite: a deterministic stand-in editor, numpy metrics, CLI capture."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from helpers import FakeInversion, FakeRoundTrip
from PIL import Image

from diffinv import SolverDivergence
from diffinv.cli import main


class FakeEditor(FakeRoundTrip):
    """A deterministic editor: the edit shifts a box by an amount set by the target prompt; ``diverge_on``
    (a word of the source prompt) raises :class:`SolverDivergence`; ``delay`` seconds per image; ``log``:
    a file that gets one line per inverted prompt (appended atomically, so concurrent processes can share it)."""

    def __init__(self, config: Any, device: Any, delay: float = 0.0, log: Path | None = None, diverge_on: str = ""):
        self.config, self.delay, self.log, self.diverge_on = config, delay, log, diverge_on

    def invert(self, images: list[Image.Image], prompts: list[str]) -> FakeInversion:
        for prompt in prompts:
            if self.log is not None:
                fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                os.write(fd, f"{os.getpid()} {prompt}\n".encode())
                os.close(fd)
            time.sleep(self.delay)
            if self.diverge_on and self.diverge_on in prompt:
                raise SolverDivergence(self.config.solver, 3, 421.0, float("inf"))
        return FakeInversion(np.stack([np.asarray(image).astype(np.int64) for image in images]))

    def edit(self, inv: FakeInversion, targets: list[list[str]]) -> list[Image.Image]:
        out = []
        for pixels, (target,) in zip(inv.pixels, targets, strict=True):
            shift = zlib.crc32(f"{target}|{self.config.solver}".encode()) % 60 - 30
            edited = pixels.copy()
            edited[10:40, 10:40] += shift
            out.append(Image.fromarray(np.clip(edited, 0, 255).astype(np.uint8)))
        return out


def fake_factory(**kwargs: Any):
    return lambda config, device: FakeEditor(config, device, **kwargs)


def cheap_metrics(source: Any, edited: Any, mask: np.ndarray, prompt: str) -> dict[str, float]:
    """Numpy-only stand-ins for the metrics (no model weights)."""
    a, b = np.asarray(source, np.float64) / 255, np.asarray(edited, np.float64) / 255
    keep = ~mask[:, :, None]
    mse = float(np.mean(((a - b) * keep) ** 2)) if keep.any() else math.nan
    return {"mse": mse, "clip_whole": float(len(prompt))}


def read_table(path: str | Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def records_without_timing(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every record file of a run, minus the wall-clock field."""
    out = {}
    for p in sorted((Path(run_dir) / "records").glob("*.json")):
        record = json.loads(p.read_text())
        record.pop("seconds", None)
        out[p.stem] = record
    return out


def images_of(run_dir: str | Path) -> dict[str, bytes]:
    """The bytes of every edited and reconstructed image of a run (not the hidden temporary files of a writer
    killed mid-write, which stay behind but never count)."""
    root = Path(run_dir)
    paths = [p for p in [*root.glob("edited/*.png"), *root.glob("recon/*.png")] if not p.name.startswith(".")]
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(paths)}


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A PNG header announcing a ``width`` x ``height`` image (a decompression bomb as far as Pillow can tell)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + body + chunk(b"IEND", b"")


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``diffinv argv`` in this process: (exit status, stdout, stderr); argparse's exits count as returns."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code: int, err: str, expected: int | tuple[int, ...]) -> str:
    """The documented failure: exit status ``expected``, exactly one ``error: ...`` line, no traceback."""
    allowed = (expected,) if isinstance(expected, int) else expected
    assert code in allowed, (code, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]
