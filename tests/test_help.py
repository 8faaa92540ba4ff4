"""`--help` of every command: placeholders survive, no type oddities, and `sphrun --version`."""

import re

import pytest
import typer
from typer.testing import CliRunner

import sphrun
from sphrun.cli import app

COMMANDS = ["train", "finetune", "plot", "connect", "curvature"]
PLACEHOLDER = re.compile(r"<[A-Za-z][^<>]*>")  # <class>, <name from the settings>; not "x < y"


def render(*args):
    """The help text as a user sees it on a wide terminal, whitespace runs made single spaces."""
    result = CliRunner().invoke(app, [*args, "--help"], terminal_width=240, max_content_width=240)
    assert result.exit_code == 0, result.output
    return result.output, " ".join(result.output.split())


def help_sources(name):
    """The command's docstring and the help of each of its parameters, as written in cli.py."""
    command = typer.main.get_command(app).commands[name]
    return [command.help or ""] + [param.help or "" for param in command.params]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_placeholder_of_the_help_source_is_shown(name):
    _, shown = render(name)
    written = {p for text in help_sources(name) for p in PLACEHOLDER.findall(" ".join(text.split()))}
    lost = sorted(p for p in written if p not in shown)
    assert not lost, f"{name} --help drops {lost}"


def test_the_placeholders_users_need_are_there():
    assert "train/<class>/<image>" in render("train")[1]
    assert "runs/<name from the settings>" in render("train")[1]
    assert "RUN-ft-elr<X>-from<ITER>[-D<D>][-<step>][-geo][-every<N>]" in render("finetune")[1]
    assert "connect/<A>@<step>--<B>@<step>" in render("connect")[1]
    assert "<run>-<kind>.png" in render("plot")[1]


@pytest.mark.parametrize("name", [None, *COMMANDS])
def test_no_type_oddities_in_usage_or_options(name):
    raw, shown = render(*([name] if name else []))
    usage = raw.strip().splitlines()[0]
    assert "{" not in usage and "}" not in usage, usage
    for oddity in ("<bool>", "<str>", "<int>", "<float>", "<list"):
        assert oddity not in shown, f"{name} --help shows {oddity}"


def test_usage_names_the_arguments():
    assert render("finetune")[0].splitlines()[0].endswith("[OPTIONS] RUN")
    assert render("connect")[0].splitlines()[0].endswith("[OPTIONS] RUN_A RUN_B [RUN_C]")
    assert render("plot")[0].splitlines()[0].endswith("[OPTIONS] RUN_OR_DIR...")


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"sphrun {sphrun.__version__}"
    assert "--version" in render()[1]


def test_help_cites_the_projects_own_docs():
    for name in [None, *COMMANDS]:
        assert "PAPER.md" not in render(*([name] if name else []))[1]
    assert "docs/science.md" in render("finetune")[1]


def option_lines(name):
    """Each option of the command's help on one line (a terminal wide enough that nothing wraps)."""
    result = CliRunner().invoke(app, [name, "--help"], terminal_width=10000, max_content_width=10000)
    return [line.strip() for line in result.output.splitlines() if line.lstrip().startswith("-")]


@pytest.mark.parametrize("name", COMMANDS)
def test_each_default_is_said_once(name):
    for line in option_lines(name):
        assert not ("(default:" in line and "[default:" in line), line


def test_options_for_several_runs_count_seeds_too():
    for option in ("--out", "--pack"):
        line = next(line for line in option_lines("train") if line.startswith(option + " "))
        assert "several runs (ELRs or seeds)" in line and "several ELRs" not in line, line


def test_plot_help_gives_the_whole_settling_rule():
    shown = render("plot")[1]
    convergence = shown[shown.index("1 (convergence)"):shown.index("2 (chaotic equilibrium)")]
    # phases.classify: turned under 0.5 rad, error below chance and loss not rising
    assert "0.5 rad" in convergence and "below chance" in convergence and "not rising" in convergence
