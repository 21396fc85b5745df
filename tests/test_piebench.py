"""PIE-Bench loader: RLE decoding as the official decoder, prompt markers, filters and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from diffinv.bench import PieBench, decode_mask, encode_mask, prompt_pairs, strip_markers, write_piebench

# (skimage image, edit type, source, target, blended word, mask kind)
ITEMS = [
    ("astronaut", 0, "a [woman] in a space suit", "a [robot] in a space suit", "woman robot", "box"),
    ("chelsea", 1, "a photo of a [cat] on a rug", "a photo of a [dog] on a rug", "cat dog", "box"),
    ("coffee", 2, "a cup of coffee", "a cup of coffee [with a spoon]", " spoon", "box"),
    ("rocket", 6, "a [white] rocket on a pad", "a [red] rocket on a pad", "white red", "box"),
    ("camera", 8, "a man with a camera [in a field]", "a man with a camera [on a beach]", "", "ring"),
    ("immunohistochemistry", 9, "a [microscope image] of cells", "a [watercolor painting] of cells", "", "all"),
]


def skimage_rgb(name: str, size: int) -> Image.Image:
    from skimage import data

    array = getattr(data, name)()
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return Image.fromarray(array[..., :3]).resize((size, size), Image.Resampling.BICUBIC)


def make_mask(kind: str, size: int, seed: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    if kind == "all":
        mask[:] = True
    elif kind == "ring":
        yy, xx = np.mgrid[:size, :size]
        r = np.hypot(yy - size / 2, xx - size / 2)
        mask[(r > size / 6) & (r < size / 3)] = True
    else:
        rng = np.random.default_rng(seed)
        y, x = rng.integers(4, size // 2, 2)
        mask[y : y + size // 3, x : x + size // 4] = True
    return mask


def make_dataset(root, size: int = 64, n: int | None = None):
    """A synthetic PIE-Bench folder in the official format from scikit-image's bundled photos."""
    items = []
    for i, (name, edit_type, source, target, blended, kind) in enumerate(ITEMS[:n]):
        items.append(
            {
                "id": f"{edit_type}{i:011d}",
                "image": skimage_rgb(name, size),
                "mask": make_mask(kind, size, i),
                "source": source,
                "target": target,
                "edit_type": edit_type,
                "instruction": f"edit image {i}",
                "blended_word": blended,
            }
        )
    return write_piebench(root, items), items


def official_decode(rle, height, width):
    """The official ``mask_decode`` transcribed (loops and all), generalised from 512x512."""
    length = height * width
    m = np.zeros(length)
    for i in range(0, len(rle), 2):
        n = min(rle[i + 1], length - rle[i])
        for j in range(n):
            m[rle[i] + j] = 1
    m = m.reshape(height, width)
    m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = 1
    return m


@pytest.mark.parametrize("seed", range(5))
def test_decode_matches_official_and_encode_inverts(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(5, 40)), int(rng.integers(5, 40))
    mask = rng.random((h, w)) < rng.random()
    rle = encode_mask(mask)
    assert np.array_equal(decode_mask(rle, h, w, border=False), mask)
    assert np.array_equal(decode_mask(rle, h, w), official_decode(rle, h, w).astype(bool))
    # Overlapping and past-the-end runs (clipped by the official decoder) decode the same way too.
    messy = [0, 3, 2, 4, h * w - 2, 50, 5, 0]
    assert np.array_equal(decode_mask(messy, h, w), official_decode(messy, h, w).astype(bool))


def test_border_always_edited():
    mask = decode_mask([], 6, 7)
    assert mask[0].all() and mask[-1].all() and mask[:, 0].all() and mask[:, -1].all()
    assert not mask[1:-1, 1:-1].any()


def test_loader_reads_records(tmp_path):
    root, items = make_dataset(tmp_path / "pie", size=48)
    data = PieBench(root)
    assert len(data) == len(items) and data.ids == sorted(it["id"] for it in items)
    rec = data.by_id(items[1]["id"])
    assert rec.source_prompt == "a photo of a cat on a rug" and rec.target_prompt == "a photo of a dog on a rug"
    assert rec.blended_words == ("cat", "dog") and rec.edit_type == 1 and rec.edit_type_name == "change object"
    assert rec.instruction == "edit image 1"
    assert rec.image().size == (48, 48) and rec.image().mode == "RGB"
    expected = items[1]["mask"].copy()
    expected[0, :] = expected[-1, :] = expected[:, 0] = expected[:, -1] = True
    assert np.array_equal(rec.mask(), expected)
    data.validate()

    assert [r.edit_type for r in PieBench(root, types=[1, 9])] == [1, 9]
    assert PieBench(root, ids=[items[2]["id"]]).ids == [items[2]["id"]]
    assert strip_markers("a [b] c [d e]") == "a b c d e"


def test_prompt_rules(tmp_path):
    root, items = make_dataset(tmp_path / "pie", size=32)
    data = PieBench(root)
    grey = prompt_pairs(data, "greyscale")
    assert grey[items[1]["id"]][1] == "a black and white photo of a cat on a rug"
    # Large deviations: target = the source prompt half way around the whole id-sorted mapping, even when filtered.
    full = prompt_pairs(data, "large-deviation")
    ids = data.ids
    for i, image_id in enumerate(ids):
        assert full[image_id] == (data[i].source_prompt, data[(i + len(ids) // 2) % len(ids)].source_prompt)
        assert full[image_id][0] != full[image_id][1]
    part = prompt_pairs(PieBench(root, types=[1]), "large-deviation")
    assert part == {items[1]["id"]: full[items[1]["id"]]}


def _mapping(root):
    return json.loads((root / "mapping_file.json").read_text())


def _broken(tmp_path, edit):
    root, items = make_dataset(tmp_path / "pie", size=32, n=3)
    mapping = _mapping(root)
    key = items[1]["id"]
    edit(root, mapping, key)
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    return root, key


def test_errors_name_the_record(tmp_path):
    def bad_rle(root, m, key):
        m[key]["mask"] = [1, 2, 3]

    def negative(root, m, key):
        m[key]["mask"] = [-1, 2]

    def missing_image(root, m, key):
        (root / "annotation_images" / m[key]["image_path"]).unlink()

    def bad_type(root, m, key):
        m[key]["editing_type_id"] = "12"

    def no_prompt(root, m, key):
        del m[key]["editing_prompt"]

    for edit, words in [
        (bad_rle, "even length"),
        (negative, "negative"),
        (missing_image, "missing"),
        (bad_type, "editing_type_id"),
        (no_prompt, "editing_prompt"),
    ]:
        root, key = _broken(tmp_path / edit.__name__, edit)
        with pytest.raises(ValueError, match=f"record {key}.*{words}|{words}.*record {key}") as err:
            PieBench(root)
        assert key in str(err.value)


def test_mask_size_mismatch_and_corrupt_files(tmp_path):
    def too_big(root, m, key):
        m[key]["mask"] = [32 * 32 + 5, 3]  # the run starts past a 32x32 image (e.g. a 512x512 mask)

    root, key = _broken(tmp_path / "big", too_big)
    data = PieBench(root)  # syntax is fine; the size is checked against the image
    with pytest.raises(ValueError, match=f"record {key}.*outside a 32x32 mask"):
        data.validate()

    root, _ = make_dataset(tmp_path / "corrupt", size=32, n=2)
    (root / "mapping_file.json").write_text('{"000": {"image_path": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        PieBench(root)
    (root / "mapping_file.json").write_text("[]")
    with pytest.raises(ValueError, match="JSON object keyed by image id"):
        PieBench(root)
    with pytest.raises(ValueError, match=r"no mapping_file\.json"):
        PieBench(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        PieBench(tmp_path / "nowhere")

    root, _ = make_dataset(tmp_path / "unreadable", size=32, n=2)
    data = PieBench(root)
    data[0].image_path.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=f"record {data[0].id}: cannot read image"):
        data[0].image()
    with pytest.raises(ValueError, match="edit type must be 0-9"):
        PieBench(root, types=[10])
    with pytest.raises(ValueError, match=r"not in mapping_file\.json"):
        PieBench(root, ids=["nope"])
