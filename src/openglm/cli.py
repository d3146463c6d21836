"""`openglm <verb>`: a table from verbs to typed library functions; flags and help come from signatures and
docstrings (jsonargparse). Errors in user input end the process with one line, not a traceback."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from openglm.convert import convert
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


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import CLI

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = _normalise_flags(sys.argv[1:] if argv is None else list(argv))
    try:
        result = CLI(_commands(), args=argv, as_positional=True)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, UnicodeDecodeError) as err:
        print(f"openglm: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("openglm: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    _print_result(result)


def _print_result(result: object) -> None:
    """The verb's result on stdout (logs go to stderr): text as it is, anything else as JSON that scripts can
    read."""
    if result is None or isinstance(result, Callable):
        return
    if isinstance(result, os.PathLike):
        result = os.fspath(result)
    print(result if isinstance(result, str) else json.dumps(result, indent=1, default=str))
