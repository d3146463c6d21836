"""`openglm infill`: fill the blanks of prompts given on the command line, in a file, on stdin, or interactively
(spec E.1), with every decoding strategy of `GenerationConfig`."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import torch

from openglm import parallel
from openglm.generate.decoding import GenerationConfig
from openglm.generate.infill import FilledText, TokenEvent, fill_blanks


def load_tokenizer(model_dir: str, tokenizer: str | None) -> Any:
    """`tokenizer` is None (the tokenizer saved in `model_dir`), a directory, or "KIND:PATH" (vocab files)."""
    from openglm.tokenizer import GLMTokenizer

    return GLMTokenizer.from_spec(tokenizer if tokenizer is not None else model_dir)


def _read_lines(stream: TextIO) -> Iterator[str]:
    for line in stream:
        line = line.rstrip("\n")
        if line.strip():
            yield line


def _batches(lines: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for line in lines:
        batch.append(line)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _show(result: FilledText, as_json: bool, out: TextIO) -> None:
    if as_json:
        blanks = [
            {
                "position": b.position,
                "text": b.text,
                "token_ids": b.token_ids,
                "stop": b.stop,
                "score": b.score,
            }
            for b in result.blanks
        ]
        out.write(
            json.dumps({"source": result.source, "text": result.text, "blanks": blanks}, ensure_ascii=False)
        )
    else:
        out.write(result.text)
    out.write("\n")
    out.flush()


class _Echo:
    """Streams each blank's new text to the terminal as it is decoded."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.shown, self.blank = out, "", -1

    def __call__(self, event: TokenEvent) -> None:
        if event.blank_index != self.blank:
            self.out.write(
                f"\n[blank {event.blank_index + 1}] "
                if self.blank >= 0
                else f"[blank {event.blank_index + 1}] "
            )
            self.blank, self.shown = event.blank_index, ""
        self.out.write(event.text[len(self.shown) :] if event.text.startswith(self.shown) else event.text)
        self.shown = event.text
        self.out.flush()


def infill(
    model_dir: str,
    text: str,
    interactive: bool = False,
    tokenizer: str | None = None,
    max_length: int = 64,
    min_length: int = 1,
    sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    repetition_penalty: float = 1.0,
    mem_length: int | None = None,
    seed: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str | None = None,
    jsonl: bool = False,
) -> None:
    """Fill [MASK]/[sMASK]/[gMASK] blanks with a GLM; prints one filled text per line.

    Args:
        model_dir: a model directory (ours, Hugging Face GLM, or official with its config.json).
        text: the prompt, e.g. "Tsinghua University is located in [MASK]."; "-" reads prompts from stdin and
            "@FILE" from FILE, one per line. A prompt without a mask is continued ([gMASK] appended).
        interactive: prompt loop: read a line, fill it, show the fill as it is decoded; "stop" or EOF ends it.
        tokenizer: tokenizer directory or "KIND:VOCAB_PATH" (kinds: bert, gpt2, roberta, chinese-sp,
            chinese-sp-fix, bpe); default: the tokenizer saved in model_dir.
        max_length: at most this many tokens per blank.
        min_length: no end token before this many tokens (1 avoids empty fills).
        sample: sample instead of greedy decoding (with num_beams > 1: beam sampling).
        temperature: sampling temperature.
        top_k: sample among the k most likely tokens (0 = all).
        top_p: nucleus sampling threshold (0 = off).
        num_beams: beam search with this many beams (> 1).
        length_penalty: beam score = sum log-prob / length ** length_penalty.
        no_repeat_ngram_size: forbid repeating n-grams of this size inside a blank (0 = off).
        repetition_penalty: > 1 discourages tokens already generated (1 = off).
        mem_length: official memory cap (positions a step may attend to); default unlimited.
        seed: random seed for sampling.
        batch_size: prompts decoded together when reading stdin or a file.
        device: torch device, e.g. "cpu" or "cuda".
        dtype: weights dtype ("float32", "bfloat16", "float16"); default as stored.
        jsonl: print one JSON object per text (source, text, blanks) instead of the filled text.
    """
    from openglm.model import GLMModel

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    config = GenerationConfig(
        max_length=max_length, min_length=min_length, do_sample=sample, temperature=temperature, top_k=top_k,
        top_p=top_p, num_beams=num_beams, length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
        repetition_penalty=repetition_penalty, mem_length=mem_length, seed=seed,
    )  # fmt: skip
    torch_dtype = None
    if dtype is not None:
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype")
    tok = load_tokenizer(model_dir, tokenizer)
    # The padding rows of the vocabulary have no text: never produce them on the command line.
    config = config.replace(vocab_limit=tok.num_tokens)
    device = str(parallel.resolve_device(device))
    model = GLMModel.from_pretrained(model_dir, dtype=torch_dtype, device=device)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer has {tok.vocab_size} ids but the model in {model_dir} has {model.config.vocab_size}"
        )
    out = sys.stdout
    if interactive:
        if text not in ("-", ""):
            _show(fill_blanks(model, tok, text, config), jsonl, out)
        while True:
            out.write("prompt (stop to exit) >>> ")
            out.flush()
            line = sys.stdin.readline()
            if not line or line.strip() == "stop":
                out.write("\n")
                return
            if not line.strip():
                continue
            echo = _Echo(out) if not jsonl else None
            result = fill_blanks(model, tok, line.rstrip("\n"), config, streamer=echo)
            if echo is not None and echo.blank >= 0:
                out.write("\n")
            _show(result, jsonl, out)
    if text == "-":
        lines = _read_lines(sys.stdin)
    elif text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise FileNotFoundError(f"{path}: prompt file not found")
        lines = _read_lines(path.open(encoding="utf-8"))
    else:
        lines = iter([text])
    for batch in _batches(lines, batch_size):
        for result in fill_blanks(model, tok, batch, config):
            _show(result, jsonl, out)
