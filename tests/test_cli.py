"""The command line's own contract: `--debug` on either side of the subcommand, missing extras named."""

from __future__ import annotations

import pytest

import diffinv.commands.solvers as solvers_command
from diffinv import cli


def _fail_with(error: Exception):
    def run(args):
        raise error

    return run


@pytest.mark.parametrize("argv", [["--debug", "list-solvers"], ["list-solvers", "--debug"]])
def test_debug_works_before_and_after_the_subcommand(monkeypatch, argv):
    monkeypatch.setattr(solvers_command, "run", _fail_with(ValueError("bad input")))
    with pytest.raises(ValueError, match="bad input"):  # the traceback, not the one-line error
        cli.main(argv)


def test_without_debug_an_error_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(solvers_command, "run", _fail_with(ValueError("bad input")))
    assert cli.main(["list-solvers"]) == 2
    assert capsys.readouterr().err == "error: bad input\n"


@pytest.mark.parametrize(
    ("package", "extra"), [("gradio", "app"), ("torchmetrics", "bench"), ("diffusers", "diffusers")]
)
def test_a_missing_extra_is_named_with_its_install_command(monkeypatch, capsys, package, extra):
    monkeypatch.setattr(
        solvers_command, "run", _fail_with(ModuleNotFoundError(f"No module named {package!r}", name=package))
    )
    assert cli.main(["list-solvers"]) == 1
    assert capsys.readouterr().err == f"error: list-solvers needs {package}: pip install 'diffinv[{extra}]'\n"


def test_an_unknown_missing_module_is_still_one_line(monkeypatch, capsys):
    monkeypatch.setattr(solvers_command, "run", _fail_with(ModuleNotFoundError("No module named 'nope'", name="nope")))
    assert cli.main(["list-solvers"]) == 1
    assert capsys.readouterr().err == "error: No module named 'nope'\n"


def test_demo_spacing_has_its_own_name_and_the_old_one_still_works(capsys):
    parser = cli.build_parser()
    assert parser.parse_args(["demo", "--spacing", "lambda"]).grid == "lambda"
    assert capsys.readouterr().err == ""
    assert parser.parse_args(["demo", "--grid", "time"]).grid == "time"
    assert capsys.readouterr().err == "note: --grid is now --spacing\n"
    assert "--spacing" in parser._subparsers._group_actions[0].choices["demo"].format_help()


def test_bench_help_explains_every_option():
    parser = cli.build_parser()._subparsers._group_actions[0].choices["bench"]
    silent = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert silent == []
    store = [a for a in parser._actions if a.option_strings and a.nargs != 0 and a.dest != "help"]
    undocumented = [
        a.option_strings[0]
        for a in store
        if "default" not in a.help and a.dest not in ("data", "model", "out", "preset", "only")
    ]
    assert undocumented == []


def test_an_uncached_hub_model_with_the_hub_unreachable_is_one_line_at_once(monkeypatch):
    import time

    import diffinv.weights
    from diffinv.families import pipeline_name

    with pytest.raises(ValueError, match=r"not in the local hub cache and the hub is off \(HF_HUB_OFFLINE=1\)"):
        pipeline_name("nobody/no-such-model")  # the tests run with HF_HUB_OFFLINE=1
    monkeypatch.setattr(diffinv.weights, "hub_offline_reason", lambda: "huggingface.co is unreachable (timed out)")
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"huggingface\.co is unreachable") as err:
        pipeline_name("nobody/no-such-model")
    assert "\n" not in str(err.value) and time.monotonic() - start < 2  # no retries
