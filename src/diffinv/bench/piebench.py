"""PIE-Bench (Ju et al., ICLR 2024, "PnP Inversion"): the data set loader and its RLE masks.

The folder a user passes holds ``mapping_file.json`` and ``annotation_images/`` exactly as the authors
distribute them. Each record of the mapping file gives an image path, the source and target prompts with
``[ ]`` around the words that change, an instruction, the blended words, an edit type ``"0"``..``"9"`` and
an RLE mask (1 = the region to edit). Masks decode exactly as the official ``mask_decode``: ``(start,
length)`` pairs over the row-major flattened image, runs clipped at the end, and the 1-pixel border always
set (the authors' guard against annotation errors). The official decoder assumes 512x512; here the mask
takes the size of its image (PIE-Bench images are all 512x512, so the two agree on the real data).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..controls.p2p import strip_markers

__all__ = ["EDIT_TYPES", "PieBench", "PieRecord", "decode_mask", "encode_mask", "strip_markers", "write_piebench"]

MAPPING_FILE = "mapping_file.json"
IMAGES_DIR = "annotation_images"

EDIT_TYPES = {
    0: "random",
    1: "change object",
    2: "add object",
    3: "delete object",
    4: "change content",
    5: "change pose",
    6: "change color",
    7: "change material",
    8: "change background",
    9: "change style",
}


def decode_mask(rle: Sequence[int], height: int, width: int, border: bool = True) -> np.ndarray:
    """Decode PIE-Bench's RLE into a boolean ``(height, width)`` mask, True = region to edit.

    ``rle`` alternates run start (index into the row-major flattened image) and run length. A run that
    passes the end is clipped, as the official decoder does; a start outside the image, a negative number
    or an odd-length list is an error (``ValueError``). ``border``: set the 1-pixel frame, as the official
    decoder always does.
    """
    values = _check_rle(rle)
    length = height * width
    starts, runs = values[0::2], values[1::2]
    if starts.size and starts.max() >= length:
        bad = max(rle[0::2])
        raise ValueError(f"RLE run starts at pixel {bad}, outside a {height}x{width} mask ({length} pixels)")
    ends = np.minimum(starts + runs, length)
    delta = np.zeros(length + 1, dtype=np.int64)
    np.add.at(delta, starts, 1)
    np.add.at(delta, ends, -1)
    mask = (np.cumsum(delta[:-1]) > 0).reshape(height, width)
    if border:
        mask[0, :] = mask[-1, :] = True
        mask[:, 0] = mask[:, -1] = True
    return mask


def encode_mask(mask: np.ndarray) -> list[int]:
    """The RLE of a 2-D mask in PIE-Bench's format (``decode_mask(encode_mask(m), *m.shape, border=False) == m``)."""
    flat = np.asarray(mask, dtype=bool).reshape(-1).astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [0]])))
    starts, ends = edges[0::2], edges[1::2]
    return [int(v) for pair in zip(starts, ends - starts) for v in pair]


_HUGE = 2**62
# What Pillow raises on a file it cannot decode (DecompressionBombError: over Image.MAX_IMAGE_PIXELS pixels).
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _check_rle(rle: Any) -> np.ndarray:
    if not isinstance(rle, (list, tuple)):
        raise ValueError(f"mask must be a list of integers, got {type(rle).__name__}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in rle):
        raise ValueError("mask must hold only integers")
    if len(rle) % 2:
        raise ValueError(f"mask RLE must have an even length (start, length pairs), got {len(rle)} numbers")
    if any(v < 0 for v in rle):
        raise ValueError(f"mask RLE holds a negative number ({min(rle)})")
    # Beyond any image: clamp so that start + length cannot overflow int64 (runs are clipped anyway).
    return np.asarray([min(v, _HUGE) for v in rle], dtype=np.int64).reshape(-1)


@dataclass(frozen=True)
class PieRecord:
    """One PIE-Bench record. Prompts are given with the ``[ ]`` markers stripped; ``raw`` keeps the original."""

    id: str
    image_path: Path
    source_prompt: str
    target_prompt: str
    instruction: str
    blended_words: tuple[str, ...]
    edit_type: int
    rle: tuple[int, ...]
    raw: dict[str, Any]

    @property
    def edit_type_name(self) -> str:
        return EDIT_TYPES[self.edit_type]

    def image(self) -> Image.Image:
        """The source image, RGB."""
        try:
            with Image.open(self.image_path) as im:
                return im.convert("RGB")
        except _IMAGE_ERRORS as err:
            raise ValueError(f"record {self.id}: cannot read image {self.image_path}: {err}") from None

    def image_size(self) -> tuple[int, int]:
        """``(width, height)`` read from the file header."""
        try:
            with Image.open(self.image_path) as im:
                return im.size
        except _IMAGE_ERRORS as err:
            raise ValueError(f"record {self.id}: cannot read image {self.image_path}: {err}") from None

    def mask(self) -> np.ndarray:
        """The edit mask (bool, image-sized, True = region to edit, border set as the official decoder)."""
        width, height = self.image_size()
        try:
            return decode_mask(self.rle, height, width)
        except ValueError as err:
            raise ValueError(f"record {self.id}: {err} (image {self.image_path.name} is {width}x{height})") from None


class PieBench(Sequence[PieRecord]):
    """The PIE-Bench data set in ``path`` (the folder holding ``mapping_file.json`` and ``annotation_images/``).

    ``types``: keep only these edit types (0-9); ``ids``: keep only these image ids. Records are in id order.
    Every record is checked on load (fields, types, RLE syntax, image file present); ``validate()`` also
    decodes every mask against its image. Errors are ``ValueError`` naming the record.
    """

    def __init__(self, path: str | Path, types: Iterable[int] | None = None, ids: Iterable[str] | None = None):
        self.root = Path(path)
        if not self.root.is_dir():
            raise ValueError(f"PIE-Bench folder {self.root} does not exist or is not a folder")
        mapping_path = self.root / MAPPING_FILE
        if not mapping_path.is_file():
            raise ValueError(f"{self.root} is not a PIE-Bench folder: it has no {MAPPING_FILE}")
        if not (self.root / IMAGES_DIR).is_dir():
            raise ValueError(f"{self.root} is not a PIE-Bench folder: it has no {IMAGES_DIR}/ folder")
        try:
            mapping = json.loads(mapping_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{mapping_path} is not valid JSON: {err}") from None
        if not isinstance(mapping, dict) or not mapping:
            raise ValueError(f"{mapping_path} must be a non-empty JSON object keyed by image id")
        self.mapping = mapping
        self.all_records = [self._record(str(key), item) for key, item in sorted(mapping.items())]

        wanted_types = None if types is None else set(_check_types(types))
        wanted_ids = None if ids is None else {str(i) for i in ids}
        if wanted_ids is not None:
            missing = sorted(wanted_ids - set(mapping))
            if missing:
                raise ValueError(f"image id(s) not in {MAPPING_FILE}: {', '.join(missing[:5])}")
        self.records = [
            r
            for r in self.all_records
            if (wanted_types is None or r.edit_type in wanted_types) and (wanted_ids is None or r.id in wanted_ids)
        ]
        self._by_id = {r.id: r for r in self.all_records}

    def _record(self, key: str, item: Any) -> PieRecord:
        where = f"record {key} of {MAPPING_FILE}"
        if not isinstance(item, dict):
            raise ValueError(f"{where} must be an object, got {type(item).__name__}")
        for field in ("image_path", "original_prompt", "editing_prompt", "editing_type_id", "mask"):
            if field not in item:
                raise ValueError(f"{where} has no {field!r}")
        for field in ("image_path", "original_prompt", "editing_prompt"):
            if not isinstance(item[field], str) or not item[field].strip():
                raise ValueError(f"{where}: {field!r} must be a non-empty string")
        for field in ("editing_instruction", "blended_word"):
            if not isinstance(item.get(field, ""), str):
                raise ValueError(f"{where}: {field!r} must be a string")
        try:
            edit_type = int(str(item["editing_type_id"]))
        except ValueError:
            edit_type = -1
        if edit_type not in EDIT_TYPES:
            raise ValueError(f"{where}: editing_type_id must be '0'..'9', got {item['editing_type_id']!r}")
        try:
            rle = tuple(int(v) for v in _check_rle(item["mask"]))
        except ValueError as err:
            raise ValueError(f"{where}: bad mask: {err}") from None
        image_path = self.root / IMAGES_DIR / item["image_path"]
        if not image_path.is_file():
            raise ValueError(f"{where}: image {image_path} is missing")
        return PieRecord(
            id=key,
            image_path=image_path,
            source_prompt=strip_markers(item["original_prompt"]),
            target_prompt=strip_markers(item["editing_prompt"]),
            instruction=item.get("editing_instruction", ""),
            blended_words=tuple(item.get("blended_word", "").split()),
            edit_type=edit_type,
            rle=rle,
            raw=item,
        )

    def validate(self) -> None:
        """Decode every selected mask against its image size (``ValueError`` naming the first bad record)."""
        for record in self.records:
            record.mask()

    def by_id(self, image_id: str) -> PieRecord:
        """The record ``image_id`` (from the whole mapping file, whatever the filters)."""
        try:
            return self._by_id[str(image_id)]
        except KeyError:
            raise ValueError(f"image id {image_id!r} is not in {MAPPING_FILE}") from None

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):  # type: ignore[override]
        return self.records[index]

    def __iter__(self) -> Iterator[PieRecord]:
        return iter(self.records)

    def __repr__(self) -> str:
        return f"PieBench({str(self.root)!r}, {len(self)} of {len(self.all_records)} records)"


def _check_types(types: Iterable[int]) -> list[int]:
    out = []
    for t in types:
        try:
            value = int(t)
        except (TypeError, ValueError):
            raise ValueError(f"edit type must be an integer 0-9, got {t!r}") from None
        if value not in EDIT_TYPES:
            raise ValueError(f"edit type must be 0-9, got {value}")
        out.append(value)
    return out


def write_piebench(root: str | Path, items: Iterable[dict[str, Any]]) -> Path:
    """Write a data set in PIE-Bench's format (your own images, or a test fixture); returns ``root``.

    Each item: ``id`` (12 digits in the original), ``image`` (PIL), ``mask`` (bool array, True = edit),
    ``source``/``target`` prompts (with ``[ ]`` markers if wanted), ``edit_type`` (0-9), and optionally
    ``instruction``, ``blended_word`` and ``folder`` (default: ``"<type>_custom"``). Images are saved as JPEG
    as in the original; masks are RLE-encoded by :func:`encode_mask`.
    """
    root = Path(root)
    mapping: dict[str, Any] = {}
    for item in items:
        edit_type = int(item["edit_type"])
        rel = f"{item.get('folder', f'{edit_type}_custom')}/{item['id']}.jpg"
        path = root / IMAGES_DIR / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        item["image"].convert("RGB").save(path, quality=95)
        mapping[str(item["id"])] = {
            "image_path": rel,
            "original_prompt": item["source"],
            "editing_prompt": item["target"],
            "editing_instruction": item.get("instruction", ""),
            "editing_type_id": str(edit_type),
            "blended_word": item.get("blended_word", ""),
            "mask": encode_mask(item["mask"]),
        }
    (root / MAPPING_FILE).write_text(json.dumps(mapping, indent=1), encoding="utf-8")
    return root
