"""Crash safety of ``diffinv bench`` runs: kills at random moments, partial files, concurrent processes."""

from __future__ import annotations

import json
import multiprocessing
import random
import time
from collections import Counter

import pytest

from diffinv.bench import PieBench, RunConfig, read_records, run_bench, write_table

from .common import FakeEditor, cheap_metrics, fake_factory, images_of, read_table, records_without_timing, run_cli

CONFIG = RunConfig(model="fake", solver="ees27", metrics=["mse", "clip_whole"])

# Children come from a forkserver, never from a fork of this process: a forked child shares the parent's
# multiprocessing semaphores (tqdm keeps one per bar class, taken by every bar, even a disabled one), so a
# child killed while holding one would hang the next progress bar of the whole test session. The server is
# a fresh interpreter that imports this module once, so each child still starts in milliseconds.
SERVER = multiprocessing.get_context("forkserver")
SERVER.set_forkserver_preload([__name__])


def _bench(out, delay=0.0, log=None, config=CONFIG, data=None):
    return run_bench(
        config,
        data,
        out,
        editor_factory=fake_factory(delay=delay, log=log),
        metrics=cheap_metrics,
        device="cpu",
        progress=False,
    )


@pytest.fixture(scope="module")
def reference(pie_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    _bench(out, data=pie_data)
    return out


@pytest.fixture(autouse=True)
def _no_child_outlives_its_test():
    yield
    for proc in SERVER.active_children():
        proc.kill()
        proc.join(30)


def _start(target, *args):
    proc = SERVER.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def _child(data, out, delay, log):
    _bench(out, delay=delay, log=log, data=data)


def _cli_child(argv):
    import torch

    torch.set_num_threads(1)  # as tests/conftest.py sets it for the reference run: float32 sums depend on it
    code = run_cli(argv)[0]
    if code:
        raise SystemExit(code)


def _kill(proc) -> bool:
    """SIGKILL ``proc`` if it still runs; True if it was killed."""
    alive = proc.is_alive()
    if alive:
        proc.kill()
    proc.join(30)
    assert proc.exitcode is not None, "a child did not stop"
    return alive


def test_random_kills_resume_to_the_uninterrupted_table(pie_data, reference, tmp_path):
    """SIGKILL a run 20 times at random moments (each attempt resumes the last); the end state is the same."""
    out, log = tmp_path / "run", tmp_path / "calls.log"
    rng = random.Random(7)
    kills = 0
    for _ in range(20):
        proc = _start(_child, pie_data, out, 0.05, log)  # six images: >= 0.3 s
        time.sleep(rng.uniform(0.0, 0.15))
        kills += _kill(proc)
    assert kills >= 10  # most attempts were interrupted (the rest finished)
    _bench(out, data=pie_data)
    assert sorted(p.name for p in out.rglob("*.tmp")) == []  # what killed writers left is gone
    assert read_table(out / "metrics.csv") == read_table(reference / "metrics.csv")
    assert records_without_timing(out) == records_without_timing(reference)
    assert images_of(out) == images_of(reference)


def test_partial_files_never_count_as_done(pie_data, reference, tmp_path):
    """Truncated or empty records, half-written images and stray temporary files are redone, not trusted."""
    out = tmp_path / "run"
    _bench(out, data=pie_data)
    ids = PieBench(pie_data).ids
    records = out / "records"
    full = (records / f"{ids[0]}.json").read_text()
    (records / f"{ids[0]}.json").write_text(full[: len(full) // 2])  # cut mid-file
    (records / f"{ids[1]}.json").write_text("")  # empty
    (records / f"{ids[2]}.json").write_text(json.dumps({"image_id": ids[3]}))  # another image's id
    (records / f"{ids[4]}.json").unlink()
    (out / "edited" / f"{ids[4]}.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # an image cut by the kill
    (out / "recon" / f".{ids[4]}.png.12345.tmp").write_bytes(b"\x89PNG")  # and the next file it was writing
    (records / f".{ids[5]}.json.12345.tmp").write_text('{"image_id": "x"')
    (out / "metrics.csv").write_text("image_id,editing\n1")

    done = {r["image_id"] for r in read_records(out)}  # readers skip what is not a complete record
    assert done == {ids[3], ids[5]}
    write_table(out)
    assert len(read_table(out / "metrics.csv")) == 3

    log = tmp_path / "calls.log"
    _bench(out, log=log, data=pie_data)
    assert len(log.read_text().splitlines()) == 4  # exactly the four images that were not complete
    assert not (out / "recon" / f".{ids[4]}.png.12345.tmp").exists()  # a redone image's leftovers are deleted
    assert read_table(out / "metrics.csv") == read_table(reference / "metrics.csv")
    assert records_without_timing(out) == records_without_timing(reference)
    assert images_of(out) == images_of(reference)


def test_two_processes_on_one_folder_do_not_corrupt_it(pie_data, reference, tmp_path):
    """Two independent runs (no torchrun) on one folder: each image is done once, the table is complete."""
    out, log = tmp_path / "run", tmp_path / "calls.log"
    procs = [_start(_child, pie_data, out, 0.1, log) for _ in range(2)]
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]  # (None: still running after a minute, i.e. stuck)
    prompts = Counter(line.split(" ", 1)[1] for line in log.read_text().splitlines())
    assert sorted(prompts.values()) == [1] * 6, prompts  # nobody did an image twice
    assert len({line.split()[0] for line in log.read_text().splitlines()}) == 2  # both worked
    assert read_table(out / "metrics.csv") == read_table(reference / "metrics.csv")
    assert records_without_timing(out) == records_without_timing(reference)


def test_an_image_finished_meanwhile_by_another_process_is_not_redone(pie_data, reference, tmp_path):
    """A run picks its images, then builds its editor; another process finishing one of them in between is seen
    by the re-check under the image's lock: the image is not done twice and its record is not rewritten."""
    out, log = tmp_path / "run", tmp_path / "calls.log"
    first = PieBench(pie_data)[0].id
    other: dict[str, bytes] = {}

    def factory(config, device):
        alone = fake_factory()
        run_bench(config, pie_data, out, ids=[first], editor_factory=alone, metrics=cheap_metrics, progress=False)
        other["record"] = (out / "records" / f"{first}.json").read_bytes()
        return FakeEditor(config, device, log=log)

    run_bench(CONFIG, pie_data, out, editor_factory=factory, metrics=cheap_metrics, device="cpu", progress=False)
    assert len(log.read_text().splitlines()) == 5  # the five images left, not the one finished meanwhile
    assert (out / "records" / f"{first}.json").read_bytes() == other["record"]
    assert read_table(out / "metrics.csv") == read_table(reference / "metrics.csv")


def _done(out) -> int:
    return len([p for p in (out / "records").glob("*.json") if not p.name.startswith(".")]) if out.exists() else 0


def test_killed_cli_run_with_the_real_editor_resumes(pie_data, tiny_model, tmp_path):
    """``diffinv bench`` on a tiny saved pipeline, killed once before any image is done and once after the first
    finished image and before the last, resumes to the uninterrupted table."""
    argv = ["bench", "--data", str(pie_data), "--model", str(tiny_model), "--steps", "4"]
    argv += ["--metrics", "psnr,mse", "--device", "cpu", "--no-progress", "--seed", "5"]
    code, _, err = run_cli([*argv, "--out", str(tmp_path / "ref")])
    assert code == 0, err
    total = _done(tmp_path / "ref")
    assert total == 6
    out = tmp_path / "run"
    for at_least in (0, 1):
        proc = _start(_cli_child, [*argv, "--out", str(out)])
        deadline = time.time() + 120
        while time.time() < deadline and proc.is_alive() and not (out / "config.json").exists():
            time.sleep(0.005)
        while time.time() < deadline and proc.is_alive() and _done(out) < at_least:
            time.sleep(0.002)
        assert _kill(proc), "the run ended before it was killed"
        assert at_least <= _done(out) < total, (at_least, _done(out))  # the kill landed where it was meant to
    assert _done(out) >= 1
    code, _, err = run_cli([*argv, "--out", str(out)])
    assert code == 0, err
    assert read_table(out / "metrics.csv") == read_table(tmp_path / "ref" / "metrics.csv")
    assert images_of(out) == images_of(tmp_path / "ref")
