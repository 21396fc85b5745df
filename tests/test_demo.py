"""diffinv demo: end to end through the CLI, determinism, divergence handling and bad options."""

import csv

import pytest
import torch

import diffinv
from diffinv import cli
from diffinv.demo import COLUMNS, EDIT_COLUMNS, DemoConfig, _Edit, run_demo, solver_spacing
from diffinv.schedules import NoiseSchedule

SMALL = {"steps": 6, "images": 2, "reference_steps": 24}


def exact_solver() -> str | None:
    return next((n for n in diffinv.list_solvers() if diffinv.get_solver(n).exact), None)


def test_demo_cli_end_to_end(tmp_path, capsys):
    names = ["ddim", "ees27"] + ([exact_solver()] if exact_solver() else [])
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--steps", "6", "--images", "2", "--reference-steps", "24"]
    code = cli.main([*argv, "--solvers", ",".join(names), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    for name in names:
        assert name in printed
    for f in ("demo.csv", "demo_edits.csv", "demo.png", "tradeoff.png"):
        assert (out / f).stat().st_size > 0, f
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"
    with (out / "demo.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == COLUMNS
    assert [r["solver"] for r in rows] == ["reference", *names]
    by = {r["solver"]: r for r in rows}
    assert float(by["reference"]["reference_rmse"]) == 0
    assert by["ees27"]["grid"] == "lambda" and by["ddim"]["grid"] == "time"
    # EES inverts far more faithfully than naive DDIM inversion at a quarter of the model calls
    assert float(by["ees27"]["roundtrip_rmse"]) < 0.1 * float(by["ddim"]["roundtrip_rmse"])
    with (out / "demo_edits.csv").open() as f:
        edits = list(csv.DictReader(f))
    assert list(edits[0]) == EDIT_COLUMNS
    assert len(edits) == (1 + len(names)) * 5  # reference + solvers, 5 edit targets each


def test_every_registered_solver_is_run_and_deterministic():
    config = DemoConfig(steps=2, images=1, reference_steps=4, seed=3)
    first = run_demo(config, progress=False)
    assert [r["solver"] for r in first.rows] == ["reference", *diffinv.list_solvers(NoiseSchedule.scaled_linear())]
    again = run_demo(config, progress=False)
    for a, b in zip(first.rows, again.rows):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]), (a["solver"], k)  # equal or both NaN
    other = run_demo(DemoConfig(steps=2, images=1, reference_steps=4, seed=4, solvers=["ddim"]), progress=False)
    assert not torch.equal(other.sources, first.sources)


def test_a_diverging_solver_is_recorded_not_raised(monkeypatch):
    real = _Edit.solve

    def solve(self, solver, spacing, steps):
        if solver.name == "heun":
            raise diffinv.SolverDivergence("heun", 3, 500.0, float("inf"))
        return real(self, solver, spacing, steps)

    monkeypatch.setattr(_Edit, "solve", solve)
    result = run_demo(DemoConfig(solvers=["heun", "ddim"], **SMALL), progress=False)
    heun, ddim = result.rows[1], result.rows[2]
    assert heun["diverged"] is True and heun["roundtrip_rmse"] != heun["roundtrip_rmse"]  # NaN
    assert ddim["diverged"] is False and ddim["roundtrip_rmse"] > 0


def test_grid_rule():
    assert solver_spacing(diffinv.get_solver("ees27")) == "lambda"
    assert solver_spacing(diffinv.get_solver("rk4")) == "lambda"
    assert solver_spacing(diffinv.get_solver("ddim")) == "time"
    for name in diffinv.list_solvers():
        solver = diffinv.get_solver(name)
        if solver.exact:
            assert solver_spacing(solver) == "time", name
        assert solver_spacing(solver, "lambda") == "lambda"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "steps must be a positive integer"),
        (["--images", "-1"], "images must be a positive integer"),
        (["--solvers", "nosuch"], "unknown solver 'nosuch'"),
        (["--solvers", ","], "no solver names"),
        (["--guidance", "nan"], "guidance must be a finite number"),
        (["--spacing", "cubic"], "invalid choice"),
        (["--grid", "cubic"], "invalid choice"),  # the old name of --spacing
    ],
)
def test_bad_options_exit_2_with_one_line(tmp_path, capsys, args, message):
    try:
        code = cli.main(["demo", "--out", str(tmp_path), "--no-progress", *args])
    except SystemExit as exit:  # argparse's own errors (e.g. an invalid choice) exit directly
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "demo.csv").exists()


def test_demo_on_the_shipped_digits_network(tmp_path, capsys):
    """`diffinv demo --model digits`: every chosen solver on both grids, judged edits, the pictures written."""
    out = tmp_path / "digits"
    argv = ["demo", "--model", "digits", "--out", str(out), "--steps", "5", "--images", "1", "--reference-steps", "20"]
    assert cli.main([*argv, "--solvers", "ees27,bdia", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "1 images x 3 edits" in printed  # the digits problem: a 3 edited to three other digits
    with (out / "demo.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["solver"], r["grid"]) for r in rows] == [
        ("reference", "lambda"),
        ("ees27", "lambda"),
        ("ees27", "time"),
        ("bdia", "lambda"),
        ("bdia", "time"),
    ]
    bdia = next(r for r in rows if r["solver"] == "bdia" and r["grid"] == "time")
    assert float(bdia["roundtrip_rmse"]) < 1e-4  # exact on the learned network too (float32 state)
    assert all(0 <= float(r["align_acc"]) <= 1 for r in rows)
    for f in ("demo.csv", "demo_edits.csv", "demo.png", "tradeoff.png"):
        assert (out / f).read_bytes()[:4] != b"" and (out / f).stat().st_size > 0, f
