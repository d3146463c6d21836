"""`openglm infill`: fill the blanks of prompts given on the command line, in a file, on stdin, or interactively
(spec E.1), with every decoding strategy of `GenerationConfig`."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from openglm import parallel
from openglm.convert import WEIGHT_DTYPES
from openglm.generate.decoding import GenerationConfig
from openglm.generate.infill import FilledText, TokenEvent, fill_blanks


def load_tokenizer(model_dir: str, tokenizer: str | None) -> Any:
    """`tokenizer` is None (the tokenizer saved in `model_dir`), a directory, or "KIND:PATH" (vocab files)."""
    from openglm.tokenizer import GLMTokenizer

    if tokenizer is None and not (Path(model_dir) / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir}: no tokenizer_config.json, so no tokenizer to use; pass --tokenizer KIND:VOCAB_PATH "
            "or a tokenizer directory"
        )
    return GLMTokenizer.from_spec(tokenizer if tokenizer is not None else model_dir)


def _read_lines(stream: Any, where: str) -> Iterator[str]:
    """Non-blank lines of a text or binary stream; invalid UTF-8 names `where` and the line."""
    for number, line in enumerate(stream, 1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{where}:{number}: not valid UTF-8 (byte 0x{line[err.start]:02x} at offset {err.start})"
                ) from None
        line = line.rstrip("\r\n")
        if line.strip():
            yield line


def _read_file(path: Path) -> Iterator[str]:
    with path.open("rb") as handle:
        yield from _read_lines(handle, str(path))


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
        # One output line per input: a fill that contains a line break is written with it escaped.
        out.write(result.text.replace("\r", "\\r").replace("\n", "\\n"))
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
    model_config: str | None = None,
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
        model_dir: a model directory (ours, Hugging Face GLM, or official: with its config.json or
            --model_config).
        text: the prompt, e.g. "Tsinghua University is located in [MASK]."; "-" reads prompts from stdin and
            "@FILE" from FILE, one per line (blank lines are skipped; `--jsonl true` keeps each source with
            its fill). A prompt without a mask is continued ([gMASK] appended).
        interactive: prompt loop: read a line, fill it, show the fill as it is decoded; "stop" or EOF ends it.
        tokenizer: tokenizer directory or "KIND:VOCAB_PATH" (kinds: bert, gpt2, roberta, chinese-sp,
            chinese-sp-fix, bpe); default: the tokenizer saved in model_dir.
        model_config: the architecture of an official checkpoint without a config.json: a preset name (e.g.
            glm-large) or a config.json path.
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
        jsonl: print one JSON object per text (source, text, blanks) instead of the filled text. The plain
            text output writes a line break inside a filled text as the two characters \\n (\\r likewise), so
            that every input gives one line; the JSON holds the exact text.
    """
    from openglm.model import GLMModel

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    config = GenerationConfig(
        max_length=max_length, min_length=min_length, do_sample=sample, temperature=temperature, top_k=top_k,
        top_p=top_p, num_beams=num_beams, length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
        repetition_penalty=repetition_penalty, mem_length=mem_length, seed=seed,
    )  # fmt: skip
    if dtype is not None and dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; expected one of {', '.join(WEIGHT_DTYPES)}")
    torch_dtype = WEIGHT_DTYPES[dtype] if dtype is not None else None
    if not Path(model_dir).exists():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    if not interactive and text != "-" and not text.startswith("@") and not text.strip():
        raise ValueError("no text: the prompt is empty (give a text, - for stdin or @FILE)")
    if not interactive and text.startswith("@") and not Path(text[1:]).is_file():
        raise FileNotFoundError(f"{text[1:]}: prompt file not found")
    tok = load_tokenizer(model_dir, tokenizer)
    # The padding rows of the vocabulary have no text: never produce them on the command line.
    config = config.replace(vocab_limit=tok.num_tokens)
    device = str(parallel.resolve_device(device))
    model = GLMModel.from_pretrained(model_dir, config=model_config, dtype=torch_dtype, device=device)
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
        where = "stdin"
        lines = _read_lines(getattr(sys.stdin, "buffer", sys.stdin), where)
    elif text.startswith("@"):
        path = Path(text[1:])
        where = str(path)
        lines = _read_file(path)
    else:
        where, lines = "the command line", iter([text])
    shown = 0
    for batch in _batches(lines, batch_size):
        for result in fill_blanks(model, tok, batch, config):
            _show(result, jsonl, out)
            shown += 1
    if not shown:
        raise ValueError(f"no texts: {where} holds no non-blank line")
