"""The CLI as a user meets it: bad input gets one readable line, exit code 2, registry unchanged;
README examples use flags that exist."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from selfspec.cli import build_parser, main
from tests.conftest import REPO, seeds_dir


@pytest.fixture
def seeds(tmp_path, monkeypatch):
    return seeds_dir(tmp_path, monkeypatch, names=("demo",))


def run(args, capsys):
    code = main(args)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("args, message", [
    (["specialize", "nope"], "unknown domain 'nope'"),
    (["specialize"], "name the domains to specialize, or pass --all"),
    (["specialize", "demo", "--rank", "12"], "rank 12 is not one vLLM can serve"),
    (["specialize", "demo", "--rank", "32"], "pass --max-lora-rank 32"),
    (["specialize", "demo", "--base-model", "/no/such/model"], "unknown base model"),
    (["specialize", "demo", "--num-instructions", "0"], "num_instructions"),
])
def test_bad_input_one_line_exit_2_registry_unchanged(tmp_path, seeds, capsys, args, message):
    experts = tmp_path / "experts"
    code, err = run(args + ["--experts-dir", str(experts)], capsys)
    assert code == 2
    assert err.startswith("selfspec: error:") and message in err
    assert "Traceback" not in err
    assert not (experts / "registry.json").exists()


def test_malformed_seeds_named_in_error(tmp_path, seeds, capsys):
    (seeds / "demo" / "seeds.yaml").write_text("domain: demo\ndescription: short\nseeds: []\n")
    code, err = run(["specialize", "demo", "--experts-dir", str(tmp_path / "e")], capsys)
    assert code == 2 and "seeds.yaml" in err and "description" in err


def test_unwritable_experts_dir(tmp_path, seeds, capsys):
    (tmp_path / "f").write_text("")
    code, err = run(["specialize", "demo", "--experts-dir", str(tmp_path / "f" / "x")], capsys)
    assert code == 2 and "not writable" in err


def test_experts_lists_empty_registry(tmp_path, capsys):
    assert main(["experts", "--experts-dir", str(tmp_path)]) == 0
    assert "no experts" in capsys.readouterr().out


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "selfspec.cli", "specialize", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--num-instructions" in out and "--resume" in out


def test_readme_examples_use_real_flags():
    """Every `selfspec <cmd> ... --flag` in the READMEs names a subcommand and flags that exist."""
    parser = build_parser()
    subs = {a.dest: a for a in parser._actions if a.dest == "command"}["command"].choices
    text = (REPO / "README.md").read_text() + (REPO / "seeds" / "README.md").read_text()
    lines = re.findall(r"selfspec (\w+)([^\n`#|]*)", text)
    assert lines
    for cmd, rest in lines:
        if cmd not in subs:
            continue  # prose like "selfspec implements"
        actions = list(subs[cmd]._actions)
        for a in subs[cmd]._actions:  # `selfspec experts add ...`: the nested command's flags
            words = rest.split()
            if a.choices and isinstance(a.choices, dict) and words and words[0] in a.choices:
                actions += a.choices[words[0]]._actions
        known = {o for a in actions for o in a.option_strings}
        for flag in re.findall(r"(--[a-z][a-z-]*)", rest):
            assert flag in known, f"README: selfspec {cmd} {flag} does not exist"
        shlex.split(rest)


def test_failed_check_leaves_nothing_to_resume(tmp_path, seeds, capsys):
    experts = tmp_path / "experts"
    args = ["specialize", "demo", "--experts-dir", str(experts)]
    code, err = run(args + ["--base-model", "/no/such/model"], capsys)
    assert code == 2 and "unknown base model" in err
    code, err = run(args + ["--base-model", "/no/such/model", "--corpus", str(tmp_path)], capsys)
    assert code == 2 and "not a folder of Markdown" in err
    assert not (experts / ".work" / "demo").exists()
