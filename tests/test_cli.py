"""The command line: flag errors are one line naming the flag and value; results go to stdout as JSON."""

from __future__ import annotations

import json

import pytest

from openglm.cli import main


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["plan", "--gpus", "x"], "openglm: error: --gpus 'x': expected int (see openglm plan --help)"),
        (
            ["finetune", "--task", "rte", "--train.lr", "abc"],
            "openglm: error: --train.lr 'abc': expected float or null (see openglm finetune --help)",
        ),
        (
            ["demo", "--prompts", "text"],
            "openglm: error: --prompts 'text': expected list[str] or null (a list: --prompts '[a, b]' or "
            "--prompts+ a) (see openglm demo --help)",
        ),
        (
            ["plan", "--nosuch", "1"],
            "openglm: error: unrecognized arguments: --nosuch 1 (see openglm plan --help)",
        ),
    ],
)
def test_flag_errors_are_one_line(argv: list[str], line: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [line] and captured.out == ""


def test_unknown_verb_and_help(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["nosuchverb"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith("openglm: error: argument subcommand: invalid choice")
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--help"])
    assert exit_info.value.code == 0 and "--micro_batch_size" in capsys.readouterr().out


def test_results_print_as_json(capsys: pytest.CaptureFixture) -> None:
    from openglm.cli import _print_result

    _print_result({"accuracy": 0.5, "task": "rte"})
    assert json.loads(capsys.readouterr().out) == {"accuracy": 0.5, "task": "rte"}
    _print_result("a table\nas text")
    assert capsys.readouterr().out == "a table\nas text\n"
