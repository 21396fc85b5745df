"""Metric weights air-gapped: a --weights folder of config-built random backbones is used before the hub;
missing weights give one error line naming every metric; ``diffinv weights check``/``download``."""

from __future__ import annotations

import math

import pytest
import torch
from test_bench_runner import FakeEditor
from test_metrics import _images, tiny_clip, tiny_vit
from test_piebench import make_dataset

from diffinv import metrics as M
from diffinv import weights as W
from diffinv.bench import RunConfig, run_bench
from diffinv.cli import main


def _lpips_files(folder, seed=0):
    """Random LPIPS weights in the layout: torchvision-keyed squeezenet1_1 state dict + the seven heads."""
    torch.manual_seed(seed)
    net = M.SqueezeLPIPS()
    for p in net.parameters():
        p.data.normal_(0, 0.1)
    folder.mkdir(parents=True)
    backbone = {f"features.{k}": v for k, v in net.features.state_dict().items()}
    backbone |= {"classifier.1.weight": torch.zeros(1000, 512, 1, 1), "classifier.1.bias": torch.zeros(1000)}
    torch.save(backbone, folder / W.SQUEEZENET_FILE)
    torch.save({k: v for k, v in net.state_dict().items() if k.startswith("lin")}, folder / W.LPIPS_HEADS_FILE)
    return net


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    vit = tiny_vit()
    vit.save_pretrained(root / W.BACKBONES["dino"].folder)
    model, processor = tiny_clip()
    model.save_pretrained(root / W.BACKBONES["clip"].folder)
    processor.save_pretrained(root / W.BACKBONES["clip"].folder)
    lpips = _lpips_files(root / W.BACKBONES["lpips"].folder)
    return root, vit, (model, processor), lpips


def test_suite_loads_every_backbone_from_the_folder(weights_dir, monkeypatch):
    root, vit, clip, lpips = weights_dir
    monkeypatch.delenv(W.ENV, raising=False)
    suite = M.MetricSuite(device="cpu", weights=root)
    assert suite.dino.model.state_dict().keys() == vit.state_dict().keys()
    assert all(torch.equal(v, vit.state_dict()[k]) for k, v in suite.dino.model.state_dict().items())
    assert torch.equal(suite.clip.model.text_projection.weight, clip[0].text_projection.weight)
    assert torch.equal(suite.lpips.lin3.model[1].weight, lpips.lin3.model[1].weight)
    assert torch.equal(suite.lpips.features[9].squeeze.weight, lpips.features[9].squeeze.weight)
    a, b, mask = _images(size=48)
    values = suite(a, b, mask, "a robot in a space suit")
    expected = M.MetricSuite(device="cpu", dino=vit, clip=clip, lpips=lpips)(a, b, mask, "a robot in a space suit")
    assert values.keys() == set(M.METRICS) and all(math.isfinite(v) for v in values.values())
    assert values == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # The environment variable names the same folder.
    monkeypatch.setenv(W.ENV, str(root))
    assert M.MetricSuite("lpips,psnr", device="cpu").lpips.lin0.model[1].weight.equal(lpips.lin0.model[1].weight)


def test_one_error_line_names_every_metric_without_weights(tmp_path, monkeypatch, weights_dir):
    monkeypatch.delenv(W.ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "no-hub-cache"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(M.MetricWeightsError) as err:
        M.MetricSuite(device="cpu", weights=tmp_path / "empty")
    message = str(err.value)
    assert "\n" not in message
    assert "metric(s) structure_distance, clip_whole, clip_edited, lpips " in message
    assert f"diffinv weights download --dir {tmp_path / 'empty'}" in message and "--weights" in message
    assert message.count("HF_HUB_OFFLINE=1") == 3  # each backbone says why, in the same line
    assert message.endswith("--metrics psnr,mse,ssim")
    # A partial folder: only what it lacks is named.
    root = weights_dir[0]
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "dino-vitb8").symlink_to(root / "dino-vitb8")
    with pytest.raises(M.MetricWeightsError, match=r"metric\(s\) lpips \(") as err:
        M.MetricSuite("structure_distance,lpips,ssim", device="cpu", weights=partial)
    assert "structure_distance" not in str(err.value).split("(")[0]


def test_weights_check_and_download(weights_dir, tmp_path, capsys, monkeypatch):
    root = weights_dir[0]
    monkeypatch.delenv(W.ENV, raising=False)
    assert main(["weights", "check", "--dir", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(line.startswith("present") for line in lines)
    assert "structure_distance" in lines[0] and "clip_whole,clip_edited" in lines[1] and "lpips" in lines[2]
    # A folder with the LPIPS heads and the CLIP weights missing.
    broken = tmp_path / "broken"
    for key in ("dino", "lpips"):
        (broken / W.BACKBONES[key].folder).mkdir(parents=True)
    for f in (root / "dino-vitb8").iterdir():
        (broken / "dino-vitb8" / f.name).write_bytes(f.read_bytes())
    (broken / "lpips-squeeze" / W.SQUEEZENET_FILE).write_bytes(
        (root / "lpips-squeeze" / W.SQUEEZENET_FILE).read_bytes()
    )
    monkeypatch.setenv(W.ENV, str(broken))  # --dir defaults to $DIFFINV_WEIGHTS
    assert main(["weights", "check"]) == 1
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert [line.split()[0] for line in lines] == ["present", "missing", "missing"]
    assert "lacks config.json, model.safetensors|pytorch_model.bin" in lines[1]
    assert lines[2].endswith(f"lacks {W.LPIPS_HEADS_FILE}")
    fix = f"run 'diffinv weights download --dir {broken}'"
    assert out.err.strip() == f"error: missing clip-vit-large-patch14, lpips-squeeze in {broken}: {fix}"
    monkeypatch.delenv(W.ENV)
    assert main(["weights", "check"]) == 2 and "give --dir DIR" in capsys.readouterr().err
    # Offline: download says so in one line, at once.
    assert main(["weights", "download", "--dir", str(tmp_path / "new")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: cannot download the metric weights: the hub is off (HF_HUB_OFFLINE=1)"


def test_bench_passes_weights_and_refuses_other_sizes(weights_dir, tmp_path, monkeypatch):
    from diffinv.cli import build_parser

    args = build_parser().parse_args(["bench", "--weights", "W", "--data", "d", "--model", "m", "--out", "o"])
    assert str(args.weights) == "W"
    root = weights_dir[0]
    data, _ = make_dataset(tmp_path / "pie", size=64, n=2)
    out = run_bench(
        RunConfig(model="fake", metrics="lpips,psnr"),
        data,
        tmp_path / "run",
        device="cpu",
        editor_factory=lambda c, d: FakeEditor(c, d),
        weights=root,
        progress=False,
    )
    assert out.is_file()

    class Big(FakeEditor):
        size = (128, 128)

    with pytest.raises(ValueError, match=r"generates 128x128 images, PIE-Bench's are 64x64.*size=\[64,64\]"):
        run_bench(
            RunConfig(model="fake", metrics="psnr"),
            data,
            tmp_path / "big",
            device="cpu",
            editor_factory=lambda c, d: Big(c, d),
            progress=False,
        )
    assert not (tmp_path / "big").exists()


def test_unreachable_hub_is_one_phrase(monkeypatch):
    import socket

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    hosts = []

    def refuse(address, timeout):
        hosts.append((address, timeout))
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert W.hub_offline_reason() == "huggingface.co is unreachable (Connection refused)"
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example.org")
    assert W.hub_offline_reason().startswith("hf-mirror.example.org is unreachable")
    assert hosts == [(("huggingface.co", 443), 3.0), (("hf-mirror.example.org", 443), 3.0)]
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # the hub client goes through the proxy: not judged here
    assert W.hub_offline_reason() is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert W.hub_offline_reason() == "the hub is off (HF_HUB_OFFLINE=1)"


def test_bench_scores_the_last_panel_of_a_side_by_side_output(tmp_path):
    from PIL import Image

    from diffinv.bench import PieBench, read_records

    class Panels(FakeEditor):  # source | edit, as the official scripts save their outputs
        def edit(self, inv, targets):
            out = super().edit(inv, targets)[0]
            canvas = Image.new("RGB", (2 * out.width, out.height))
            canvas.paste(out, (out.width, 0))
            return [canvas]

    data, _ = make_dataset(tmp_path / "pie", size=64, n=3)
    psnr = lambda source, edited, mask, prompt: {"psnr": M.background_psnr(source, edited, mask)}  # noqa: E731
    run_bench(
        RunConfig(model="fake", metrics="psnr"),
        data,
        tmp_path / "run",
        device="cpu",
        editor_factory=lambda c, d: Panels(c, d),
        metrics=psnr,
        progress=False,
    )
    records = {r["image_id"]: r for r in read_records(tmp_path / "run")}
    for record in PieBench(data):
        saved = Image.open(tmp_path / "run" / "edited" / f"{record.id}.png")
        assert saved.size == (128, 64)
        expected = M.background_psnr(record.image(), saved.crop((64, 0, 128, 64)), record.mask())
        assert records[record.id]["psnr"] == expected or (
            math.isnan(expected) and math.isnan(records[record.id]["psnr"])
        )


def test_download_writes_the_layout_the_metrics_read(tmp_path, monkeypatch, capsys):
    """``weights download`` with the hubs replaced by tiny random networks: the folder it fills passes
    ``weights check`` and the metrics load every backbone from it, the hub ids being the metrics' own."""
    import transformers

    asked = []
    vit, (clip_model, processor) = tiny_vit(), tiny_clip()
    lpips = M.SqueezeLPIPS()
    for p in lpips.features.parameters():
        p.data.normal_(0, 0.1)
    backbone = {f"features.{k}": v for k, v in lpips.features.state_dict().items()}

    def hub(obj):
        return classmethod(lambda cls, name, **kw: asked.append(name) or obj)

    monkeypatch.setattr(W, "hub_offline_reason", lambda *a, **k: None)
    monkeypatch.setattr(transformers.ViTModel, "from_pretrained", hub(vit))
    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", hub(clip_model))
    monkeypatch.setattr(transformers.CLIPProcessor, "from_pretrained", hub(processor))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kw: asked.append(url) or backbone)
    root = tmp_path / "w"
    assert main(["weights", "download", "--dir", str(root)]) == 0
    assert asked == [W.DINO_ID, W.CLIP_ID, W.CLIP_ID, W.SQUEEZENET_URL]
    assert capsys.readouterr().out.count("present ") == 3
    monkeypatch.undo()
    assert W.check_weights(root) == {"dino": [], "clip": [], "lpips": []}
    suite = M.MetricSuite(device="cpu", weights=root)
    assert suite.dino.model.embeddings.patch_embeddings.projection.weight.equal(
        vit.embeddings.patch_embeddings.projection.weight
    )
    assert suite.lpips.features[0].weight.equal(lpips.features[0].weight)
    heads = torch.load(M.lpips_heads_path(), map_location="cpu", weights_only=True)
    assert suite.lpips.lin6.model[1].weight.equal(heads["lin6.model.1.weight"])  # the shipped heads, copied
