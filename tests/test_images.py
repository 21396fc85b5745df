"""Image loading: every mode to RGB, EXIF rotation, the resize rules, errors naming the path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffinv.images import check_output_path, image_grid, load_image, pil_to_tensor, tensor_to_pil


def test_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (4, 3), (10, 20, 30, 0))  # fully transparent -> the white background
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 3), (0, 0, 0, 255))
    assert load_image(half).getpixel((1, 1)) == (0, 0, 0)
    assert load_image(Image.new("L", (4, 3), 77)).getpixel((0, 0)) == (77, 77, 77)
    deep = Image.fromarray(np.full((3, 4), 65535, dtype=np.uint16))
    assert deep.mode.startswith("I;16") and load_image(deep).getpixel((0, 0)) == (255, 255, 255)
    mid = Image.fromarray(np.full((3, 4), 32896, dtype=np.uint16))  # 128 * 257
    assert load_image(mid).getpixel((0, 0)) == (128, 128, 128)
    pal = Image.new("P", (4, 3), 3)
    pal.putpalette([0, 0, 0] * 3 + [200, 100, 50] + [0, 0, 0] * 252)
    assert load_image(pal).getpixel((0, 0)) == (200, 100, 50)
    cmyk = Image.new("CMYK", (4, 3), (0, 0, 0, 0))
    assert load_image(cmyk).getpixel((0, 0)) == (255, 255, 255)
    for img in (rgba, pal, cmyk, deep):
        path = tmp_path / f"x_{img.mode.replace(';', '')}.png" if img.mode != "CMYK" else tmp_path / "x.jpg"
        img.save(path)
        assert load_image(path).mode == "RGB"


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert load_image(path).size == (20, 40)


def test_resize_rules():
    arr = np.zeros((50, 100, 3), dtype=np.uint8)
    arr[:, :15] = 255  # a white stripe on the left: cropped away by a center crop
    img = Image.fromarray(arr)
    crop = np.asarray(load_image(img, (32, 32)))
    assert crop.shape == (32, 32, 3) and crop.max() == 0
    pad = np.asarray(load_image(img, (32, 32), "pad"))
    assert pad.shape == (32, 32, 3) and (pad[0] == 255).all() and (pad[-1] == 255).all() and pad[16, 10:].max() == 0
    stretch = load_image(img, (16, 64), "stretch")
    assert stretch.size == (64, 16)
    assert load_image(img).size == (100, 50)
    with pytest.raises(ValueError, match="resize"):
        load_image(img, (8, 8), "zoom")


def test_arrays():
    assert load_image(np.full((3, 4), 0.5)).getpixel((0, 0)) == (128, 128, 128)
    assert load_image(np.zeros((3, 4, 4), dtype=np.uint8)).size == (4, 3)
    with pytest.raises(ValueError, match="shape"):
        load_image(np.zeros((3, 4, 2)))
    with pytest.raises(ValueError, match="dtype"):
        load_image(np.zeros((3, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="NaN"):
        load_image(np.full((3, 4), np.nan))


def test_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ValueError, match=r"nope\.png"):
        load_image(missing)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"broken\.jpg"):
        load_image(bad)
    with pytest.raises(ValueError, match="directory"):
        load_image(tmp_path)
    with pytest.raises(ValueError, match=r"\.xyz"):
        check_output_path(tmp_path / "out.xyz")
    check_output_path(tmp_path / "out.png")


def test_tensor_round_trip_and_grid():
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)) for _ in range(2)]
    x = pil_to_tensor(imgs)
    assert x.shape == (2, 3, 6, 5) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    back = tensor_to_pil(x)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(imgs, back))
    grid = image_grid([imgs[0], Image.new("RGB", (3, 9))])
    assert grid.size == (8, 9)


def test_psnr_grid_captions_and_png_text(tmp_path):
    import math

    from diffinv.images import image_grid, psnr, save_image

    a = Image.fromarray(np.full((8, 8, 3), 100, np.uint8))
    b = Image.fromarray(np.full((8, 8, 3), 110, np.uint8))
    assert psnr(a, a) == math.inf
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100))
    with pytest.raises(ValueError, match="differ in size"):
        psnr(a, Image.new("RGB", (4, 8)))
    plain = image_grid([a, b])
    assert plain.size == (16, 8)
    wide = Image.new("RGB", (64, 8), (255, 255, 255))
    captioned = image_grid([wide, wide], captions=["source", "a much longer caption that has to wrap"])
    assert captioned.width == 128 and captioned.height > 8 + 12  # at least two caption lines under the tiles
    assert np.asarray(captioned)[8:].min() < 255  # text was drawn
    with pytest.raises(ValueError, match="one caption per image"):
        image_grid([a, b], captions=["one"])
    png = save_image(a, tmp_path / "a.png", text={"diffinv": '{"k": 1}'})
    assert Image.open(png).text == {"diffinv": '{"k": 1}'}
    jpg = save_image(a, tmp_path / "a.jpg", text={"diffinv": "x"})  # no text chunks in JPEG: none stored
    assert Image.open(jpg).size == (8, 8)


def test_provenance_versions_and_folder_hash(tmp_path):
    from diffinv.provenance import folder_hash, model_revision, versions

    v = versions()
    assert v["torch"] == torch.__version__ and v["diffinv"] != "absent"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text('{"_class_name": "X"}')
    (tmp_path / "m" / "w.safetensors").write_bytes(b"0" * 10)
    first = folder_hash(tmp_path / "m")
    assert model_revision(tmp_path / "m") == {"folder_hash": first}
    (tmp_path / "m" / "model_index.json").write_text('{"_class_name": "Y"}')
    assert folder_hash(tmp_path / "m") != first  # a config change changes the hash
    assert model_revision("nobody/not-cached") == {"revision": None}
