"""``diffinv app``: the compare function, its Gradio API (gradio_client) and the page in a headless browser.

Set ``DIFFINV_APP_SCREENSHOT=docs/app.png`` to keep the browser test's screenshot (the README's picture).
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home
os.environ.setdefault("GRADIO_TELEMETRY_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import io
import json
import math
import shutil
import socket
import zipfile

import numpy as np
import pytest
import torch
from helpers import require
from PIL import Image

from diffinv import cli
from diffinv.app import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    TOY_DISPLAY,
    DigitsBackend,
    EditorBackend,
    InversionCache,
    Settings,
    ToyBackend,
    compare,
    load_backend,
    parse_targets,
)
from diffinv.solve import generate, invert

gr = require("gradio", reason="the app needs the app extra: pip install 'diffinv[app]'")
gradio_client = require("gradio_client", reason="the app extra")

TARGETS = ["red box 0.2", "night scene"]


@pytest.fixture(scope="module")
def toy():
    return ToyBackend()


@pytest.fixture(scope="module")
def example(toy, tmp_path_factory):
    path = tmp_path_factory.mktemp("app") / "toy.png"
    toy.examples()[0][0].save(path)
    return path


@pytest.fixture(scope="module")
def digits():
    return load_backend()  # the default model


@pytest.fixture(scope="module")
def digit_example(digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("app") / "three.png"
    digits.examples()[0][0].save(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(backend):
    from diffinv.app import build_app

    demo = build_app(backend).queue()
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return demo, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def toy_server(toy):
    demo, url = _serve(toy)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def client(toy_server):
    return gradio_client.Client(toy_server, verbose=False)


@pytest.fixture(scope="module")
def digits_server(digits):
    demo, url = _serve(digits)
    yield url
    demo.close()


# -- compare ------------------------------------------------------------------------------------


def test_compare_toy_rows_scores_and_exact_edits(toy, example):
    result = compare(toy, example, "gray box", TARGETS, ["edict", "ddim"], Settings(steps=20))
    # The example is shown enlarged; the model gets its own 16 px pixels back (8-bit values in [-1, 1]).
    pixels = np.asarray(Image.open(example).convert("RGB"))[:: TOY_DISPLAY // 16, :: TOY_DISPLAY // 16] / 127.5 - 1
    assert np.abs(result.source.permute(1, 2, 0).numpy() - pixels).max() < 1e-6
    assert [r.solver for r in result.rows] == ["edict", "ddim"]
    edict, ddim = result.rows
    assert edict.roundtrip_rmse < 1e-8 < 1e-3 < ddim.roundtrip_rmse  # exactly reversible vs DDIM
    assert edict.reconstruction_psnr > ddim.reconstruction_psnr
    assert not np.isnan(edict.background_psnr)  # the toy model knows each edit's mask
    # The edits are the exact-model ODE solves: invert under the source, generate under each target.
    x = toy.prepare(example)[None]
    ts = toy._timesteps("edict", Settings(steps=20))
    inv = invert(toy.scenes.guided("gray box", 3.0), x, toy.scenes.schedule, solver="edict", timesteps=ts)
    for target, edit in zip(TARGETS, edict.edits):
        alone = generate(toy.scenes.guided(target, 3.0), inv)[0]
        assert torch.allclose(edit, alone, atol=1e-9)
    assert len(result.table()) == 2 and result.record["target_prompts"] == TARGETS
    assert result.grid.height > 2 * 96  # two rows of 96 px images plus captions


def test_second_click_with_new_targets_reuses_the_inversion(toy, example):
    cache = InversionCache()
    first = compare(toy, example, "gray box", ["red box 0.1"], ["ees27"], Settings(steps=10), cache=cache)
    again = compare(toy, example, "gray box", TARGETS, ["ees27"], Settings(steps=10), cache=cache)
    assert not first.rows[0].cached and again.rows[0].cached
    nfe = first.rows[0].calls // 3  # invert + reconstruct + edit, each one pass over the grid
    assert nfe > 0 and again.rows[0].calls == 2 * nfe  # no inversion this time
    other = compare(toy, example, "gray box", TARGETS, ["ees27"], Settings(steps=12), cache=cache)
    assert not other.rows[0].cached  # new settings: a new inversion


def test_background_psnr_outside_a_given_or_painted_mask(toy, example):
    run = lambda mask: compare(toy, example, "gray box", ["red box 0.8"], ["ddim"], Settings(steps=10), mask=mask)  # noqa: E731
    size = Image.open(example).size
    whole = run(Image.new("L", size, 255))  # everything may change: no background
    assert np.isnan(whole.rows[0].background_psnr) and whole.record["mask"] == "given"
    own = run(None).rows[0].background_psnr  # the toy model's own mask: the object square
    half = np.zeros(size[::-1], dtype=np.uint8)
    half[:, : size[0] // 2] = 255  # the left half edited
    given = run(Image.fromarray(half)).rows[0].background_psnr
    assert np.isfinite(own) and np.isfinite(given) and abs(given - own) > 0.01
    # A painted stroke layer (the mask editor's value) counts as that region, whatever the composite shows.
    stroke = np.zeros((*size[::-1], 4), dtype=np.uint8)
    stroke[:, : size[0] // 2, 3] = 255
    painted = {"background": Image.open(example), "layers": [Image.fromarray(stroke)], "composite": None}
    assert run(painted).rows[0].background_psnr == pytest.approx(given)


def test_npi_and_partial_inversion_on_the_toy_model(toy, example):
    full = compare(toy, example, "gray box", TARGETS, ["edict"], Settings(steps=20))
    npi = compare(toy, example, "gray box", TARGETS, ["edict"], Settings(steps=20, smoothing=("npi",)))
    assert npi.rows[0].roundtrip_rmse < 1e-8  # inverted and reconstructed with the source prompt alone
    assert (npi.rows[0].edits[0] - full.rows[0].edits[0]).abs().max() > 1e-3
    half = compare(toy, example, "gray box", TARGETS, ["edict"], Settings(steps=20, strength=0.5))
    assert half.rows[0].calls == full.rows[0].calls // 2  # 10 of the 20 steps, three passes each
    assert half.record["settings"]["edict"]["timesteps"][0] < 600


def test_a_diverging_solver_gets_its_row_the_others_still_run(example):
    from diffinv.solve import SolverDivergence

    class Diverging(ToyBackend):
        def edit(self, handle, targets, settings):
            if handle["inv"].solver.name == "edict":
                raise SolverDivergence("edict", 3, 500.0, math.inf)
            return super().edit(handle, targets, settings)

    result = compare(Diverging(), example, "gray box", TARGETS, ["edict", "ddim"], Settings(steps=10))
    edict, ddim = result.rows
    assert edict.diverged and "diverged" in edict.diverged and math.isnan(edict.roundtrip_rmse)
    assert ddim.diverged is None and ddim.roundtrip_rmse > 0
    assert result.table()[0][2] == "diverged"


def test_parse_targets():
    assert parse_targets("a\n\n b \n") == ["a", "b"]
    assert parse_targets(["a", " ", "b"]) == ["a", "b"]
    assert parse_targets("['a', 'b']") == ["a", "b"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"source": "a cat"}, "not a toy-scene prompt"),
        ({"targets": "\n"}, "at least one target"),
        ({"solvers": []}, "tick at least one solver"),
        ({"solvers": ["nope"]}, "nope"),
        ({"settings": Settings(steps=0)}, "steps"),
        ({"settings": Settings(strength=0.0)}, "strength"),
        ({"settings": Settings(smoothing=("proximal",))}, "not available"),
        ({"image": None}, "give an image"),
    ],
)
def test_compare_bad_input(toy, example, kwargs, message):
    args = {"image": example, "source": "gray box", "targets": TARGETS, "solvers": ["ddim"]} | kwargs
    with pytest.raises(ValueError, match=message):
        compare(toy, **args)


def test_default_model_is_the_shipped_digits_network_and_the_toy_stays_by_name(digits):
    assert DEFAULT_MODEL == "digits" and isinstance(digits, DigitsBackend)
    assert isinstance(load_backend("toy"), ToyBackend) and set(BUILTIN_MODELS) == {"digits", "toy"}


def test_compare_digits_exact_round_trip_and_the_solvers_own_edits(digits, digit_example):
    result = compare(digits, digit_example, "digit 3", ["digit 8", "1"], ["edict", "ees27"], Settings(steps=10))
    edict, ees = result.rows
    assert edict.roundtrip_rmse < 1e-10 < 1e-6 < ees.roundtrip_rmse  # float64 state: EDICT to round-off
    assert ees.calls == 3 * 10 * 4  # invert, reconstruct, edit: 10 steps of 4 stages (guidance batched)
    # The example's own pixels (grey, 16 px) reach the model; the edits are the model's ODE solves.
    x = digits.prepare(digit_example)
    net = digits.net
    assert torch.equal(x[0], x[2]) and (x[0] - net.sources(3, 1)[0, 0]).abs().max() < 1 / 255
    ts = digits._timesteps("ees27", Settings(steps=10))
    inv = invert(net.eps(3, 3.0), x[None, :1], net.schedule, solver="ees27", timesteps=ts)
    for digit, edit in zip((8, 1), ees.edits):
        alone = generate(net.eps(digit, 3.0), inv)[0]
        assert edit.shape == (3, 16, 16) and torch.allclose(edit[1], alone[0], atol=1e-6)
    assert (ees.edits[0] - ees.edits[1]).abs().max() > 0.5  # an 8 is not a 1
    assert math.isnan(ees.background_psnr)  # no mask known: give one for a background score
    with pytest.raises(ValueError, match="not a digits prompt"):
        compare(digits, digit_example, "digit 3", ["a cat"], ["ddim"], Settings(steps=2))


# -- the Gradio API -----------------------------------------------------------------------------


def _predict(client, *args, **kwargs):
    return client.predict(*args, api_name="/compare", **kwargs)


def test_api_compare_toy(client, example):
    grid, table, archive = _predict(
        client, gradio_client.handle_file(str(example)), "gray box", "\n".join(TARGETS), ["ees27", "edict", "ddim"], 10
    )
    assert [row[0] for row in table["data"]] == ["ees27", "edict", "ddim"]
    assert Image.open(grid).size[1] > 3 * 96
    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
        record = json.loads(z.read("settings.json"))
    assert {"grid.png", "source.png", "edict/reconstruction.png", "ddim/edit_2.png"} <= names
    assert record["settings"]["edict"]["steps"] == 10 and record["target_prompts"] == TARGETS
    assert record["versions"]["diffinv"]


def test_api_targets_as_list_and_defaults(client, example):
    _, table, _ = _predict(client, gradio_client.handle_file(str(example)), "gray box", TARGETS, ["ddim"])
    assert len(table["data"]) == 1  # every other input took its default


@pytest.mark.parametrize(
    "source, targets, solvers, steps, message",
    [
        ("cat", "night scene", ["ddim"], 10, "not a toy-scene prompt"),
        ("gray box", "", ["ddim"], 10, "target"),
        ("gray box", "night scene", [], 10, "solver"),
        ("gray box", "night scene", ["ddim"], 0, "minimum value 1"),  # the steps slider's own check
    ],
)
def test_api_bad_input_is_an_error_not_a_crash(client, example, source, targets, solvers, steps, message):
    with pytest.raises(gradio_client.exceptions.AppError, match=message):
        _predict(client, gradio_client.handle_file(str(example)), source, targets, solvers, steps)
    _, table, _ = _predict(client, gradio_client.handle_file(str(example)), "gray box", "night scene", ["ddim"], 5)
    assert len(table["data"]) == 1  # the server still answers


def test_api_compare_on_the_default_digits_model(digits_server, digit_example):
    c = gradio_client.Client(digits_server, verbose=False)
    grid, table, archive = _predict(
        c, gradio_client.handle_file(str(digit_example)), "digit 3", ["digit 8", "digit 1"], ["edict", "ddim"], 10
    )
    assert [row[0] for row in table["data"]] == ["edict", "ddim"]
    assert float(table["data"][0][2]) < 1e-10 < float(table["data"][1][2])  # round trip: EDICT exact, DDIM not
    assert Image.open(grid).size[0] == 4 * TOY_DISPLAY  # source, reconstruction, two edits
    with zipfile.ZipFile(archive) as z:
        record = json.loads(z.read("settings.json"))
    assert record["settings"]["edict"]["model"] == "digits" and record["target_prompts"] == ["digit 8", "digit 1"]
    with pytest.raises(gradio_client.exceptions.AppError, match="not a digits prompt"):
        _predict(c, gradio_client.handle_file(str(digit_example)), "gray box", "digit 8", ["ddim"], 2)


def test_api_compare_tiny_sd(tmp_path):
    require("diffusers")
    from tiny import tiny_sd_pipe

    demo, url = _serve(EditorBackend(tiny_sd_pipe()))
    try:
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
        c = gradio_client.Client(url, verbose=False)
        photo = gradio_client.handle_file(str(tmp_path / "photo.png"))
        grid, table, archive = _predict(c, photo, "a cat", "a dog\na fox", ["edict", "ddim"], 3)
        assert [row[0] for row in table["data"]] == ["edict", "ddim"]
        assert all(row[5] > 0 for row in table["data"])  # model calls counted
        assert Image.open(grid).size[0] == 4 * 64  # source, reconstruction, two edits
        with zipfile.ZipFile(archive) as z:
            record = json.loads(z.read("settings.json"))
            source = np.asarray(Image.open(io.BytesIO(z.read("source.png"))))
        assert record["settings"]["edict"]["model_family"] == "sd"
        assert np.array_equal(source, np.asarray(Image.open(tmp_path / "photo.png")))  # the photo, unchanged
        with pytest.raises(gradio_client.exceptions.AppError, match="not in the list of choices"):
            _predict(c, photo, "a cat", "a dog", ["ddim"], 3, smoothing=["smooth-lora"])
    finally:
        demo.close()


def test_cli_app_errors(capsys, tmp_path):
    assert cli.main(["app", "--port", "0"]) == 2
    assert "--port" in capsys.readouterr().err
    assert cli.main(["app", "--model", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: model folder not found")


def test_cli_app_serves_the_chosen_model_on_the_chosen_address(monkeypatch, tmp_path):
    """``--model``, ``--host`` and ``--port`` reach the page and the server (launch itself is replaced)."""
    from tiny import tiny_sd_pipe

    launched = {}

    def launch(self, **kwargs):
        launched.update(kwargs, title=self.title, markdown=[getattr(b, "value", None) for b in self.blocks.values()])
        return self

    monkeypatch.setattr(gr.Blocks, "launch", launch)
    assert cli.main(["app", "--host", "0.0.0.0", "--port", "7999"]) == 0
    assert (launched["server_name"], launched["server_port"]) == ("0.0.0.0", 7999)
    assert any("**digits**" in str(m) for m in launched["markdown"])  # no --model: the shipped digits network
    launched.clear()
    assert cli.main(["app", "--model", "toy"]) == 0
    assert any("toy-scenes" in str(m) for m in launched["markdown"])  # the toy model by name
    model = tmp_path / "tiny-sd"
    tiny_sd_pipe().save_pretrained(model)
    launched.clear()
    assert cli.main(["app", "--model", str(model)]) == 0
    assert (launched["server_name"], launched["server_port"]) == ("127.0.0.1", 7860)
    assert any(str(model) in str(m) for m in launched["markdown"])  # the page names the loaded model


def test_progress_is_reported_per_solver_up_to_done(toy, example):
    seen = []
    compare(
        toy,
        example,
        "gray box",
        TARGETS,
        ["edict", "ddim"],
        Settings(steps=4),
        progress=lambda f, d: seen.append((f, d)),
    )
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and seen[-1] == (1.0, "done")
    assert any(d.startswith("edict: inverting") for _, d in seen) and any(
        d.startswith("ddim: editing") for _, d in seen
    )


# -- a real browser -----------------------------------------------------------------------------


def _browser():
    """A headless Chromium driven by selenium, or a skip saying what is missing."""
    webdriver = require("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no chromium/chromedriver: apt-get install -y chromium chromium-driver (make browser)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(arg)
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(options=options, service=Service(driver))


def test_browser_compare_two_solvers(digits_server, digit_example, tmp_path):
    """The default page (the digits model): upload, prompts, two solvers, compare; nothing loaded from outside.
    The default EES(2,7) against its symmetric member: the learned network's round trip (docs/digits-roundtrip.md)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    try:
        browser.get(digits_server)
        wait = WebDriverWait(browser, 60)
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image input[type=file]")))
        upload.send_keys(str(digit_example))
        source = browser.find_element(By.CSS_SELECTOR, "#source textarea, #source input")
        source.clear()
        source.send_keys("digit 3")
        targets = browser.find_element(By.CSS_SELECTOR, "#targets textarea")
        targets.clear()
        targets.send_keys("digit 8\ndigit 1\ndigit 5")
        for box in browser.find_elements(By.CSS_SELECTOR, "#solvers input[type=checkbox]"):
            if box.is_selected():
                box.click()
        for name in ("ees27", "ees27_sym"):
            browser.find_element(By.XPATH, f"//*[@id='solvers']//label[normalize-space()='{name}']").click()
        browser.find_element(By.CSS_SELECTOR, "#compare").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#grid img")))
        wait.until(lambda b: "ees27_sym" in b.find_element(By.CSS_SELECTOR, "#table").text)
        rows = [
            r.text
            for r in browser.find_elements(By.CSS_SELECTOR, "#table [role=row]")
            if not r.find_elements(By.CSS_SELECTOR, "[role=columnheader]")  # not the header row
        ]
        shot = tmp_path / "app.png"
        browser.save_screenshot(str(shot))
        page = browser.find_element(By.TAG_NAME, "body").text
        fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    finally:
        browser.quit()
    assert [r.split()[0] for r in rows] == ["ees27", "ees27_sym"], rows
    default, symmetric = (float(r.split()[2]) for r in rows)  # the round trip on a learned network
    assert symmetric < default / 10, rows
    assert "error" not in page.lower()
    elsewhere = [u for u in fetched if not u.startswith(digits_server) and not u.startswith(("data:", "blob:"))]
    assert not elsewhere, elsewhere  # the page loads nothing from outside the local server
    assert Image.open(shot).size[0] > 0
    keep = os.environ.get("DIFFINV_APP_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)
