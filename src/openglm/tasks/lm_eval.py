"""Zero-shot language modelling (spec D.9): LAMBADA accuracy (bi- and unidirectional), perplexity over
sliding windows with the word-level adjusted perplexity of WikiText, and zero-shot multiple choice.

A *sample* here is a dict of numpy arrays in the official row format (`input_ids` [L], `position_ids` [2, L],
`targets` [L], `loss_mask` [L], `sep` int) plus `length`, the number of leading columns that matter.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from openglm import parallel
from openglm.tasks.files import line_of, read_jsonl, read_text, row_field, row_text

logger = logging.getLogger(__name__)

Sample = dict[str, Any]


# ---------------------------------------------------------------------------------------------------------
# Reading data


def default_mask_id(tokenizer: Any, kind: str = "generation") -> int:
    """The mask token a task uses (spec I.9): task-mask tokenizers use [gMASK] for LM evaluation
    (`kind="generation"`) and [sMASK] for summarization (`kind="sentence"`); others always use [MASK]."""
    if kind == "generation" and getattr(tokenizer, "gmask_id", None) is not None:
        return tokenizer.gmask_id
    if kind == "sentence" and getattr(tokenizer, "smask_id", None) is not None:
        return tokenizer.smask_id
    if kind not in ("generation", "sentence", "token"):
        raise ValueError(f"unknown mask kind {kind!r}; expected generation, sentence or token")
    return tokenizer.mask_id


# ---------------------------------------------------------------------------------------------------------
# LAMBADA


def lambada_text(row: dict[str, Any], path: Path = Path("<row>"), n: int = 0) -> str:
    """The full passage of a LAMBADA row: `{"text"}`, or `{"prompt", "label"}` joined by one space.

    The answer is the passage's last whitespace word, so an empty label would quietly make the prompt's last
    word the answer; it is refused. (A few official labels span a line break, "of\n\nPower": as officially,
    only their last word is scored.)
    """
    if "text" in row:
        return row_text(row, "text", path, n, empty=False)
    return row_text(row, "prompt", path, n, empty=False) + " " + row_text(row, "label", path, n, empty=False)


def lambada_split(text: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Context and answer ids of a passage, in the official strict mode (spec D.9).

    The answer is the last whitespace word encoded as " "+word; the context is everything before that word's
    last occurrence, stripped.
    """
    words = text.split()
    if not words:
        raise ValueError("LAMBADA passage is empty")
    word = words[-1]
    start = text.rfind(word)
    return tokenizer.encode(text[:start].strip()), tokenizer.encode(" " + word)


def lambada_sample(
    context_ids: Sequence[int],
    answer_ids: Sequence[int],
    tokenizer: Any,
    seq_length: int = 512,
    unidirectional: bool = False,
    mask_id: int | None = None,
) -> Sample:
    """One LAMBADA row (spec D.9), padded to `seq_length` with eos and position 0.

    Bidirectional: Part A = [CLS] ctx <mask> [eos], Part B = [sop] + answer[:-1] at the mask's position.
    Unidirectional: Part A = [CLS] ctx[0] <mask> [eos], Part B = [sop] + ctx[1:] + answer[:-1]; the loss covers
    only the answer. The context is left-truncated so that the row fits `seq_length`; no eop is predicted.

    Args:
        context_ids: the context tokens.
        answer_ids: the answer tokens (at least one).
        tokenizer: supplies cls/eos/sop/pad ids.
        seq_length: row length.
        unidirectional: put the context in the causal part.
        mask_id: the mask token; default [gMASK] if the tokenizer has it, else [MASK].

    Returns:
        The sample dict.
    """
    if not answer_ids:
        raise ValueError("LAMBADA answer has no tokens")
    mask_id = default_mask_id(tokenizer) if mask_id is None else mask_id
    context = list(context_ids)
    overflow = len(context) + len(answer_ids) + 3 - seq_length
    # The official code cuts Part A's tokens from the left, which in the unidirectional layout would eat
    # ctx[0] and the mask; cutting the context instead keeps both layouts well formed. (No LAMBADA passage
    # reaches 512 tokens with the BERT or GPT-2 vocabulary, so results are unaffected.)
    if overflow > 0:
        context = context[overflow:]
    if not context:
        raise ValueError(f"LAMBADA answer of {len(answer_ids)} tokens does not fit seq_length={seq_length}")
    if unidirectional:
        part_a, part_b_tokens = context[:1], context[1:] + list(answer_ids)
    else:
        part_a, part_b_tokens = context, list(answer_ids)
    part_a = [tokenizer.cls_id, *part_a, mask_id, tokenizer.eos_id]
    mask_pos = len(part_a) - 2
    loss = np.zeros(len(part_b_tokens), dtype=np.int64)
    loss[len(part_b_tokens) - len(answer_ids) :] = 1
    return two_part_row(part_a, part_b_tokens, loss, mask_pos, seq_length, tokenizer)


def two_part_row(
    part_a: Sequence[int],
    part_b_tokens: Sequence[int],
    part_b_loss: np.ndarray,
    mask_pos: int,
    pad_to: int | None,
    tokenizer: Any,
) -> Sample:
    """Part A (bidirectional) followed by Part B = [sop] + tokens[:-1] predicting `part_b_tokens` (spec D.1).

    Part A positions count up from 0; Part B tokens sit at `mask_pos` with block ids 1, 2, ... The row is
    right-padded to `pad_to` (None: no padding) with the pad id at position 0, block 0, without loss.
    """
    a, b = len(part_a), len(part_b_tokens)
    if b == 0:
        raise ValueError("Part B needs at least one token to predict")
    length = a + b
    total = length if pad_to is None else pad_to
    if total < length:
        raise ValueError(f"row of {length} tokens does not fit {pad_to}")
    ids = np.full(total, tokenizer.pad_id, dtype=np.int64)
    ids[:a] = part_a
    ids[a] = tokenizer.sop_id
    ids[a + 1 : length] = part_b_tokens[:-1]
    targets = np.zeros(total, dtype=np.int64)
    targets[a:length] = part_b_tokens
    loss = np.zeros(total, dtype=np.int64)
    loss[a:length] = part_b_loss
    pos = np.zeros((2, total), dtype=np.int64)
    pos[0, :a] = np.arange(a)
    pos[0, a:length] = mask_pos
    pos[1, a:length] = np.arange(1, b + 1)
    return {
        "input_ids": ids,
        "position_ids": pos,
        "targets": targets,
        "loss_mask": loss,
        "sep": a,
        "length": length,
    }


# ---------------------------------------------------------------------------------------------------------
# Perplexity windows


# The Megatron WikiText detokenizer as an ordered list of steps: (old, new) is a plain replacement, a compiled
# pattern a regex substitution. The order matters (e.g. " @-@ " must go before the bracket rules).
_WIKITEXT_STEPS: tuple[tuple[str | re.Pattern[str], str], ...] = (
    # contractions and number separators of the tokenised format
    ("s '", "s'"),
    (re.compile(r"/' [0-9]/"), r"/'[0-9]/"),
    (" @-@ ", "-"),
    (" @,@ ", ","),
    (" @.@ ", "."),
    # punctuation
    (" : ", ": "),
    (" ; ", "; "),
    (" . ", ". "),
    (" ! ", "! "),
    (" ? ", "? "),
    (" , ", ", "),
    # brackets and quotes hug their content
    (re.compile(r"\(\s*([^\)]*?)\s*\)"), r"(\1)"),
    (re.compile(r"\[\s*([^\]]*?)\s*\]"), r"[\1]"),
    (re.compile(r"{\s*([^}]*?)\s*}"), r"{\1}"),
    (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'),
    (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'"),
    # headings, degrees, line edges, the N placeholder, possessives
    ("= = = =", "===="),
    ("= = =", "==="),
    ("= =", "=="),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    (" \n", "\n"),
    ("\n ", "\n"),
    (" N ", " 1 "),
    (" 's", "'s"),
)


def wikitext_detokenize(text: str) -> str:
    """Undo the WikiText tokenisation the way the Megatron detokenizer used by GLM does (spec D.9)."""
    for old, new in _WIKITEXT_STEPS:
        text = old.sub(new, text) if isinstance(old, re.Pattern) else text.replace(old, new)
    return text


def count_words(text: str) -> int:
    """Words for the adjusted perplexity: `len(text.strip().split(" "))` (spec D.9).

    Splitting on single spaces is deliberate: newlines do not separate words and runs of spaces add empty
    strings, exactly as in the official count that published WikiText numbers are normalised with.
    """
    return len(text.strip().split(" "))


def lm_windows(
    documents: Sequence[Sequence[int]],
    tokenizer: Any,
    seq_length: int = 1024,
    stride: int = 256,
    unidirectional: bool = False,
    mask_id: int | None = None,
) -> list[Sample]:
    """Sliding evaluation windows over token documents (spec D.9); every token but the first of each
    document is predicted exactly once.

    Window size W = seq_length - 1 and row length W + 2. Window 0 (and every window when unidirectional) has
    Part A = [CLS] t_first <mask>; a later bidirectional window puts its first W - stride tokens in Part A
    and predicts the rest. Unidirectional windows after the first score only the last `stride` positions
    of the padded row. Documents with fewer than 2 tokens have nothing to predict and are skipped.

    Args:
        documents: token ids of each document.
        tokenizer: supplies cls/sop/pad ids.
        seq_length: the model's sequence length (1024 for WikiText, 512 for `zero_lm`).
        stride: the overlapping-eval stride (tokens newly predicted per window).
        unidirectional: keep only one token in Part A.
        mask_id: the mask token; default [gMASK] if the tokenizer has it, else [MASK].

    Returns:
        The samples, document by document, window by window.
    """
    width = seq_length - 1
    # A stride of the whole window would leave later unidirectional windows unable to score their first token.
    if not 0 < stride < width:
        raise ValueError(f"stride={stride} must be in 1..seq_length-2={width - 1}")
    mask_id = default_mask_id(tokenizer) if mask_id is None else mask_id
    samples = []
    for doc in documents:
        doc = list(doc)
        if len(doc) < 2:
            continue
        n_windows = math.ceil(max(len(doc) - width, 0) / stride) + 1
        for k in range(n_windows):
            tokens = doc[k * stride : k * stride + width]
            prompt_len = 1 if (k == 0 or unidirectional) else width - stride
            prompt, text = tokens[:prompt_len], tokens[prompt_len:]
            loss = np.ones(len(text), dtype=np.int64)
            sample = two_part_row(
                [tokenizer.cls_id, *prompt, mask_id], text, loss, prompt_len + 1, width + 2, tokenizer
            )
            if k > 0 and unidirectional:
                # The official cut acts on the padded row: only its last `stride` columns keep their loss.
                sample["loss_mask"][: width + 2 - stride] = 0
            samples.append(sample)
    return samples


def read_lm_documents(path: str | os.PathLike, tokenizer: Any, wikitext: bool) -> tuple[list[list[int]], int]:
    """Token documents and the word count of a perplexity corpus (spec D.9).

    `wikitext=True`: the whole file is detokenized and encoded as one document, words counted over the raw
    text. Otherwise every non-empty line of a text file (or the `text` field of each jsonl row) is a
    document, and words are counted per line.

    Returns:
        (documents, number of words).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if wikitext:
        raw = read_text(path)
        return [tokenizer.encode(wikitext_detokenize(raw))], count_words(raw)
    if path.suffix == ".jsonl":
        rows = read_jsonl(path)
        lines = [row_text(row, "text", path, line_of(rows, i)) for i, row in enumerate(rows)]
    else:
        lines = read_text(path).splitlines()
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no text to evaluate")
    return [tokenizer.encode(line.strip()) for line in lines], sum(count_words(line) for line in lines)


# ---------------------------------------------------------------------------------------------------------
# Running a model over samples


def collate(
    samples: Sequence[Sample], pad_id: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Stack samples into a batch cut to the longest `length` (trailing padding never changes the logits of
    earlier columns: Part B is causal and Part A does not look past sep)."""
    width = max(int(s["length"]) for s in samples)
    for s in samples:
        width = max(width, int(s["sep"]))

    def col(key: str, fill: int) -> torch.Tensor:
        rows = []
        for s in samples:
            a = np.asarray(s[key])[..., :width]
            if a.shape[-1] < width:
                pad = [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])]
                a = np.pad(a, pad, constant_values=fill)
            rows.append(a)
        return torch.from_numpy(np.stack(rows)).to(device)

    batch = {
        "input_ids": col("input_ids", pad_id),
        "position_ids": col("position_ids", 0),
        "targets": col("targets", 0),
        "loss_mask": col("loss_mask", 0),
        "sep": torch.tensor([int(s["sep"]) for s in samples], dtype=torch.long, device=device),
    }
    return batch


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    if size <= 0:
        raise ValueError(f"batch_size={size} must be positive")
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def token_log_probs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target where `loss_mask` is set, and whether it is the argmax.

    Returns:
        (log_probs [N], correct [N] bool) in row-major order of the selected positions (fp32).
    """
    select = batch["loss_mask"] > 0
    out = model(batch["input_ids"], batch["position_ids"], attention_mask=batch["sep"], logits_mask=select)
    logits = out.logits.float()  # (N, V)
    targets = batch["targets"][select]
    # cross_entropy is log_softmax + gather without a second [N, V] buffer (N can be 8 x 1022 windows).
    logp = -F.cross_entropy(logits, targets, reduction="none")
    return logp, logits.argmax(dim=-1) == targets


def _progress(items: Iterable[Any], total: int, desc: str, enabled: bool) -> Iterable[Any]:
    if not enabled or not parallel.is_main():
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc)


def evaluate_lambada(
    model: torch.nn.Module,
    tokenizer: Any,
    path: str | os.PathLike,
    unidirectional: bool = False,
    seq_length: int | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """LAMBADA accuracy (spec D.9): a passage counts iff the argmax equals the target at every answer token,
    teacher-forced.

    Args:
        model: a `GLMModel` (put in eval mode here).
        tokenizer: the model's tokenizer.
        path: jsonl with `{"text"}` or `{"prompt", "label"}` rows.
        unidirectional: the unidirectional layout.
        seq_length: row length (512 officially; the default, capped at the model's positions).
        batch_size: rows per forward pass.
        limit: evaluate only the first `limit` passages.
        progress: show a progress bar.

    Returns:
        `{"accuracy", "correct", "total"}`.
    """
    path = Path(path)
    seq_length = row_length(model, seq_length, 512)
    rows = read_jsonl(path)[:limit]
    if not rows:
        raise ValueError(f"{path}: no LAMBADA rows")
    samples = []
    for i, row in enumerate(rows):
        ctx, ans = lambada_split(lambada_text(row, path, line_of(rows, i)), tokenizer)
        samples.append(
            lambada_sample(ctx, ans, tokenizer, seq_length=seq_length, unidirectional=unidirectional)
        )
    correct = lambada_correct(model, samples, tokenizer.pad_id, batch_size, progress)
    total = len(samples)
    return {"accuracy": sum(correct) / total, "correct": int(sum(correct)), "total": total}


def lambada_correct(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    pad_id: int,
    batch_size: int = 16,
    progress: bool = False,
) -> list[bool]:
    """For each sample, whether every scored token is the model's argmax (teacher-forced). Under torchrun
    each rank scores its share (`parallel.shard_map`)."""

    def hits(share: Sequence[Sample]) -> list[bool]:
        return [
            bool(hit.all()) for _, hit in _per_sample(model, share, pad_id, batch_size, "lambada", progress)
        ]

    model.eval()
    return parallel.shard_map(hits, samples)


def _per_sample(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    pad_id: int,
    batch_size: int,
    desc: str,
    progress: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(log-probabilities, argmax hits) of each sample's scored tokens, batch by batch, in sample order."""
    device = _device_of(model)
    chunks = list(_batches(samples, batch_size))
    for chunk in _progress(chunks, len(chunks), desc, progress):
        batch = collate(chunk, pad_id, device)
        logp, hit = token_log_probs(model, batch)
        counts = batch["loss_mask"].gt(0).sum(dim=1).tolist()
        yield from zip(torch.split(logp, counts), torch.split(hit, counts), strict=True)


def evaluate_perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    path: str | os.PathLike,
    wikitext: bool | None = None,
    seq_length: int | None = None,
    stride: int | None = None,
    unidirectional: bool = False,
    batch_size: int = 8,
    progress: bool = False,
    limit: int | None = None,
) -> dict[str, float]:
    """Perplexity over sliding windows and the word-level adjusted perplexity (spec D.9).

    loss = sum NLL / (N_tok - 1); ppl = exp(loss); adjusted ppl = exp(loss * (N_tok - 1) / (N_words - 1)) with
    N_words from `count_words`. Both exponents are capped at 20, as in the official evaluation.

    Args:
        model: a `GLMModel`.
        tokenizer: the model's tokenizer.
        path: a WikiText `.tokens` file, or a text / jsonl file with one document per line.
        wikitext: treat the file as WikiText (detokenize, one document); default: the name contains "wiki".
        seq_length: window length + 1 (officially 1024 for WikiText, 512 for `zero_lm`); default 1024, or the
            model's position count when smaller.
        stride: tokens newly predicted by each window after the first; default min(256, seq_length // 2).
        unidirectional: the unidirectional window layout.
        batch_size: windows per forward pass.
        progress: show a progress bar.
        limit: score only the first `limit` windows (a quick look): loss and ppl over the tokens they
            predict; the word-level adjusted ppl needs the whole text and is left out.

    Returns:
        `{"loss", "ppl", "adjusted_ppl", "num_tokens", "num_words", "num_windows"}` (with `limit`:
        `{"loss", "ppl", "num_tokens", "num_windows"}`, the tokens being those scored).
    """
    path = Path(path)
    seq_length = row_length(model, seq_length, 1024)
    if seq_length < 3:  # a window predicts at least one new token after its context token
        raise ValueError(f"seq_length {seq_length}: perplexity windows need at least 3 tokens")
    if stride is None:
        stride = min(256, seq_length // 2)
    if wikitext is None:
        wikitext = "wiki" in path.name.lower() and path.suffix != ".jsonl"
    documents, num_words = read_lm_documents(path, tokenizer, wikitext)
    samples = lm_windows(documents, tokenizer, seq_length, stride, unidirectional)
    if limit is not None and limit < len(samples):
        samples = samples[:limit]
        scored = sum(int(np.count_nonzero(s["loss_mask"])) for s in samples)
        loss = windows_nll(model, samples, tokenizer.pad_id, batch_size, progress) / scored
        logger.info(
            "perplexity over the first %d windows only; no adjusted ppl (it needs the whole text)", limit
        )
        return {"loss": loss, "ppl": math.exp(min(20.0, loss)), "num_tokens": scored, "num_windows": limit}
    num_tokens = sum(len(d) for d in documents)
    nll = windows_nll(model, samples, tokenizer.pad_id, batch_size, progress)
    return perplexity_metrics(nll, num_tokens, num_words, len(samples))


def row_length(model: torch.nn.Module, seq_length: int | None, default: int) -> int:
    """`seq_length`, or `default` capped at the model's position count; a row longer than the position table
    would index past it, so an explicit longer one is refused."""
    config = getattr(model, "config", None)
    limit = config.max_sequence_length if config is not None else None
    if seq_length is None:
        return min(default, limit) if limit is not None else default
    if seq_length < 2 or (limit is not None and seq_length > limit):
        raise ValueError(
            f"seq_length {seq_length}: must be between 2 and the model's max_sequence_length {limit}"
        )
    return seq_length


def check_src_length(src_seq_length: int, model: torch.nn.Module) -> None:
    """Refuse rows longer than the model's position table, which would index past it."""
    limit = model.config.max_sequence_length
    if src_seq_length > limit:
        raise ValueError(
            f"src_seq_length={src_seq_length} exceeds the model's max_sequence_length {limit}; pass "
            f"--data.max_seq_length {limit} (or less)"
        )


def windows_nll(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    pad_id: int,
    batch_size: int = 8,
    progress: bool = False,
) -> float:
    """Summed negative log-likelihood of every scored token of `samples` (fp64 accumulation). Under torchrun
    each rank scores its share of the windows (`parallel.shard_map`)."""

    def nll(share: Sequence[Sample]) -> list[float]:
        return [
            -float(lp.double().sum())
            for lp, _ in _per_sample(model, share, pad_id, batch_size, "perplexity", progress)
        ]

    model.eval()
    return math.fsum(parallel.shard_map(nll, samples))


def perplexity_metrics(nll: float, num_tokens: int, num_words: int, num_windows: int = 0) -> dict[str, float]:
    """ppl and adjusted ppl from a summed NLL (spec D.9); exponents capped at 20 like the official code."""
    if num_tokens < 2 or num_words < 2:
        raise ValueError(f"perplexity needs at least 2 tokens and 2 words; got {num_tokens} and {num_words}")
    loss = nll / (num_tokens - 1)
    adjusted = loss * (num_tokens - 1) / (num_words - 1)
    return {
        "loss": loss,
        "ppl": math.exp(min(20.0, loss)),
        "adjusted_ppl": math.exp(min(20.0, adjusted)),
        "num_tokens": num_tokens,
        "num_words": num_words,
        "num_windows": num_windows,
    }


# ---------------------------------------------------------------------------------------------------------
# Zero-shot multiple choice


def multichoice_samples(
    context: str,
    choices: Sequence[str],
    tokenizer: Any,
    unidirectional: bool = False,
    seq_length: int = 512,
) -> list[Sample]:
    """One scoring row per choice (spec D.9, `MultiChoiceDataset`): no eop is scored.

    Bidirectional: "[MASK]" is appended to the context when it holds no mask token; Part A = [CLS] context
    [eos] and the choice fills the last mask. Unidirectional: Part A = [CLS] <gMASK or MASK> [eos] and Part B
    holds the context followed by the choice; only the choice is scored. The context is left-truncated to fit.
    """
    mask_tokens = ("[MASK]", "[sMASK]", "[gMASK]")
    mask_ids = {tokenizer.mask_id, getattr(tokenizer, "smask_id", None), getattr(tokenizer, "gmask_id", None)}
    mask_ids.discard(None)
    samples = []
    for choice in choices:
        choice_ids = (
            tokenizer.encode(" " + choice.strip()) if not choice.startswith(" ") else tokenizer.encode(choice)
        )
        if not choice_ids:
            raise ValueError(f"multiple-choice option {choice!r} encodes to no tokens")
        if unidirectional:
            ctx = tokenizer.encode(context)
            budget = seq_length - 3 - len(choice_ids)
            ctx = ctx[max(0, len(ctx) - budget) :]
            part_b = ctx + choice_ids
            loss = np.zeros(len(part_b), dtype=np.int64)
            loss[len(ctx) :] = 1
            mask = default_mask_id(tokenizer)
            samples.append(
                two_part_row([tokenizer.cls_id, mask, tokenizer.eos_id], part_b, loss, 1, None, tokenizer)
            )
            continue
        text = context if any(m in context for m in mask_tokens) else context.rstrip() + " [MASK]"
        ctx = tokenizer.encode(text)
        overflow = len(ctx) + len(choice_ids) + 2 - seq_length
        if overflow > 0:
            ctx = ctx[overflow:]
        part_a = [tokenizer.cls_id, *ctx, tokenizer.eos_id]
        positions = [i for i, t in enumerate(part_a) if t in mask_ids]
        if not positions:
            raise ValueError(f"multiple-choice context lost its mask token when truncated: {context[:60]!r}")
        loss = np.ones(len(choice_ids), dtype=np.int64)
        samples.append(two_part_row(part_a, choice_ids, loss, positions[-1], None, tokenizer))
    return samples


def evaluate_multichoice(
    model: torch.nn.Module,
    tokenizer: Any,
    path: str | os.PathLike,
    unidirectional: bool = False,
    length_normalize: bool = False,
    seq_length: int | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Zero-shot multiple choice from jsonl rows `{"inputs_pretokenized", "choices_pretokenized", "label"}`.

    Each choice is scored by the sum of its token log-probabilities (optionally divided by its length) and
    the best-scoring choice is the prediction; `label` is the index of the correct choice.

    Returns:
        `{"accuracy", "correct", "total"}`.
    """
    path = Path(path)
    seq_length = row_length(model, seq_length, 512)
    rows = read_jsonl(path)[:limit]
    if not rows:
        raise ValueError(f"{path}: no multiple-choice rows")
    model.eval()
    flat: list[Sample] = []
    owners: list[int] = []
    labels: list[int] = []
    for i, row in enumerate(rows):
        n = line_of(rows, i)
        choices = row_field(row, "choices_pretokenized", path, n)
        label = row_field(row, "label", path, n)
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{path}:{n}: field 'choices_pretokenized' must be a non-empty list of strings")
        if type(label) is not int or not 0 <= label < len(choices):
            raise ValueError(f"{path}:{n}: label={label!r} is not an index into its {len(choices)} choices")
        context = row_text(row, "inputs_pretokenized", path, n)
        for s in multichoice_samples(context, choices, tokenizer, unidirectional, seq_length):
            flat.append(s)
            owners.append(i)
        labels.append(label)

    def choice_scores(share: Sequence[Sample]) -> list[float]:
        pairs = _per_sample(model, share, tokenizer.pad_id, batch_size, "multichoice", progress)
        return [float(lp.sum()) / (len(lp) if length_normalize else 1) for lp, _ in pairs]

    scores = parallel.shard_map(choice_scores, flat)  # under torchrun, each rank scores its share
    best: dict[int, tuple[float, int]] = {}
    choice_index: dict[int, int] = {}
    for owner, score in zip(owners, scores, strict=True):
        i = choice_index.get(owner, 0)
        choice_index[owner] = i + 1
        if owner not in best or score > best[owner][0]:
            best[owner] = (score, i)
    correct = sum(int(best[i][1] == labels[i]) for i in range(len(labels)))
    return {"accuracy": correct / len(labels), "correct": correct, "total": len(labels)}


# ---------------------------------------------------------------------------------------------------------
# Dispatcher for `openglm eval`


LM_TASKS = ("lambada", "wikitext", "perplexity", "multichoice")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_model_and_tokenizer(
    model_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    device: str = "auto",
    precision: str = "fp32",
) -> tuple[torch.nn.Module, Any]:
    """A `GLMModel` (in eval mode, weights cast to `precision`: fp32, bf16 or fp16) and its `GLMTokenizer`
    from a checkpoint directory (the tokenizer from `tokenizer_dir` if given)."""
    from openglm.model import GLMModel
    from openglm.tokenizer import GLMTokenizer

    if precision not in DTYPES:
        raise ValueError(f"precision={precision!r}; expected one of {sorted(DTYPES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = GLMModel.from_pretrained(model_dir, device=device, dtype=DTYPES[precision])
    tokenizer = GLMTokenizer.from_pretrained(tokenizer_dir or model_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} ids but the model at {model_dir} only {model.config.vocab_size}"
        )
    return model.eval(), tokenizer


def run_lm_eval(
    task: str,
    model_dir: str,
    data: str,
    tokenizer_dir: str | None = None,
    unidirectional: bool = False,
    seq_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
    progress: bool = True,
) -> dict[str, float]:
    """Zero-shot evaluation of a checkpoint (spec D.9).

    Args:
        task: `lambada`, `wikitext` (detokenized single document), `perplexity` (one document per line) or
            `multichoice`.
        model_dir: checkpoint directory (`GLMModel.from_pretrained`).
        data: the data file (LAMBADA / multiple-choice jsonl, WikiText `.tokens`, text or jsonl corpus).
        tokenizer_dir: tokenizer directory; default `model_dir`.
        unidirectional: the unidirectional layouts.
        seq_length: row length; default 512 (lambada, multichoice, perplexity) or 1024 (wikitext), capped by
            the model's `max_sequence_length`.
        stride: perplexity window stride; default min(256, seq_length // 2) (the official 256 for 512- and
            1024-token windows, and still half a window of context for models with fewer positions).
        batch_size: rows per forward pass.
        limit: evaluate only the first rows (lambada, multichoice) or windows (perplexity).
        device: `auto`, `cpu`, `cuda`, ...
        precision: weights in `fp32`, `bf16` or `fp16` (log-probabilities are always taken in fp32).
        progress: show progress bars.

    Returns:
        The metrics dict of the task, plus `task`.
    """
    if task not in LM_TASKS:
        raise ValueError(f"unknown zero-shot task {task!r}; expected one of {LM_TASKS}")
    device = str(parallel.init_distributed(device).device)  # under torchrun: this rank's GPU
    model, tokenizer = load_model_and_tokenizer(model_dir, tokenizer_dir, device, precision)
    if seq_length is None:  # the official lengths, capped at the model's positions
        seq_length = row_length(model, None, 1024 if task == "wikitext" else 512)
    if task == "lambada":
        metrics = evaluate_lambada(
            model, tokenizer, data, unidirectional, seq_length, batch_size, limit, progress
        )
    elif task == "multichoice":
        metrics = evaluate_multichoice(
            model,
            tokenizer,
            data,
            unidirectional,
            seq_length=seq_length,
            batch_size=batch_size,
            limit=limit,
            progress=progress,
        )
    else:
        metrics = evaluate_perplexity(
            model, tokenizer, data, task == "wikitext", seq_length, stride, unidirectional, batch_size, progress,
            limit,
        )  # fmt: skip
    logger.info("%s: %s", task, metrics)
    return {"task": task, **metrics}
