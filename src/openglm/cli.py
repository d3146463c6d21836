"""`openglm <verb>`: a table from verbs to typed library functions; flags and help come from signatures and
docstrings (jsonargparse). Errors in user input end the process with one line, not a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from openglm.convert import convert, export
from openglm.data.shards import prepare_corpus
from openglm.generate.command import infill
from openglm.tasks.run import evaluate, finetune
from openglm.tokenizer import train_tokenizer
from openglm.train.demo import demo
from openglm.train.plan import plan
from openglm.train.plot import plot
from openglm.train.pretrain import pretrain


def _commands() -> dict[str, Any]:
    table: dict[str, Any] = {
        "convert": convert,
        "export": export,
        "pretrain": pretrain,
        "plan": plan,
        "plot": plot,
        "demo": demo,
        "finetune": finetune,
        "eval": evaluate,
        "infill": infill,
        "tokenizer": {"_help": "Train a tokenizer (byte-level BPE) on a corpus.", "train": train_tokenizer},
        "data": {
            "_help": "Tokenize a corpus into memory-mapped pretraining shards.",
            "prepare": prepare_corpus,
        },
    }
    return table


def _normalise_flags(argv: list[str]) -> list[str]:
    """Accept `--vocab-size` as well as `--vocab_size` (jsonargparse names flags after the parameters)."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, sep, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + sep + value
        out.append(arg)
    return out


def _check_config_files(argv: list[str]) -> None:
    """Read each `--config FILE` before jsonargparse does: its errors name "<unicode string>" instead of the
    file, and an empty file reads as "Unexpected config:"."""
    import yaml

    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config="):
            value = arg.partition("=")[2]
        else:
            continue
        path = Path(value)
        if not path.is_file():
            continue  # a YAML string, or a missing file that jsonargparse reports by name
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not valid UTF-8 (byte offset {err.start})") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"{where}: invalid YAML: {problem}") from None
        if data is None:
            raise ValueError(f"{path}: the config file is empty")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of option: value, got a {type(data).__name__}")


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import CLI

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = _normalise_flags(sys.argv[1:] if argv is None else list(argv))
    try:
        _check_config_files(argv)
        result = CLI(_commands(), args=argv, as_positional=True, exit_on_error=False)
    except argparse.ArgumentError as err:
        print(f"openglm: error: {_flag_error(str(err), argv)}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as err:  # UnicodeDecodeError and CheckpointError included
        print(f"openglm: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as err:
        # Disk full, unwritable or missing paths: the system's reason, with the file when it names one.
        message = f"{err.filename}: {err.strerror}" if err.filename and err.strerror else str(err)
        print(f"openglm: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("openglm: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    _print_result(result)


def _flag_error(message: str, argv: list[str]) -> str:
    """One line for a command-line error: jsonargparse explains a bad value over several lines of type
    reprs ("Parser key ...", "Subtypes: [<class 'int'>, ...]", "Given value: abc")."""
    verb = next((a for a in argv if not a.startswith("-")), None)
    hint = f" (see openglm {verb} --help)" if verb in _commands() else " (see openglm --help)"
    key = re.match(r'Parser key "([^"]+)"', message)
    value = re.search(r"(?:Given|Got) value: (.*)$", message, re.M)
    if key is None or value is None:
        return " ".join(line.strip() for line in message.splitlines() if line.strip()) + hint
    subtypes = re.search(r"Subtypes: \[(.*)\]", message)
    listed = subtypes.group(1) if subtypes else " ".join(re.findall(r"Expected a (<class '\w+'>)", message))
    found = re.findall(r"<class '(\w+)'>|(\w+\[[^\]]*\])", listed)  # (class name, generic alias) pairs
    names = ["null" if name == "NoneType" else name for pair in found for name in pair if name]
    expected = f"expected {' or '.join(dict.fromkeys(names))}" if names else "not a valid value"
    if any(n.startswith("list") for n in names):
        expected += f" (a list: --{key.group(1)} '[a, b]' or --{key.group(1)}+ a)"
    return f"--{key.group(1)} {value.group(1).strip()!r}: {expected}{hint}"


def _print_result(result: object) -> None:
    """The verb's result on stdout (logs go to stderr): text as it is, anything else as JSON that scripts can
    read."""
    if result is None or isinstance(result, Callable):
        return
    if isinstance(result, os.PathLike):
        result = os.fspath(result)
    print(result if isinstance(result, str) else json.dumps(result, indent=1, default=str))
