"""Text infilling (spec D.8, E.3): Yahoo-style blanks at a mask ratio, the multi-blank Part A/B layout, fine-tuning
with the label-smoothed loss, greedy left-to-right decoding of every blank, and corpus BLEU of the filled texts.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from openglm import parallel
from openglm.atomic import write_text_atomic
from openglm.lora import LoRASettings
from openglm.tasks.files import find_split_file, line_of, read_jsonl, read_text, row_text, split_file_names
from openglm.tasks.finetuning import check_run_dir, finetune_generation
from openglm.tasks.lm_eval import Sample, check_src_length, collate

logger = logging.getLogger(__name__)

MASK_TEXT = "[MASK]"


# ---------------------------------------------------------------------------------------------------------
# Blanks


def read_documents(path: str | os.PathLike, limit: int | None = None, split: str = "dev") -> list[str]:
    """Documents of a Yahoo-style text file (one per line, blank lines skipped) or of a jsonl `text` field;
    for a folder, its `split` file (`test.txt`, `val.txt`, `dev.jsonl`, ...)."""
    path = Path(path)
    if path.is_dir():
        found = find_split_file(path, split, (".txt", ".jsonl"))
        if found is None:
            raise FileNotFoundError(
                f"{path}: no {split} file ({split_file_names(split, ('.txt', '.jsonl'))})"
            )
        path = found
    if path.suffix == ".jsonl":
        rows = read_jsonl(path)
        docs = [row_text(row, "text", path, line_of(rows, i)) for i, row in enumerate(rows)]
    else:
        docs = read_text(path).splitlines()
    docs = [d.strip() for d in docs if d.strip()][:limit]
    if not docs:
        raise ValueError(f"{path}: no documents")
    return docs


def mask_words(text: str, ratio: float, rng: np.random.Generator) -> tuple[str, list[str]]:
    """Blank out floor(ratio x #words) whitespace words chosen without replacement (spec D.8).

    Each run of consecutive blanked words becomes one literal "[MASK]"; the answers are those runs, in order.

    Args:
        text: the document.
        ratio: the mask ratio m.
        rng: the random source.

    Returns:
        (masked text, answers).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio {ratio} must be in [0, 1)")
    words = text.split()
    chosen = (
        set(rng.choice(len(words), size=int(ratio * len(words)), replace=False).tolist()) if words else set()
    )
    out: list[str] = []
    answers: list[str] = []
    for i, word in enumerate(words):
        if i not in chosen:
            out.append(word)
        elif i - 1 in chosen:
            answers[-1] += " " + word
        else:
            out.append(MASK_TEXT)
            answers.append(word)
    return " ".join(out), answers


def infilling_sample(
    masked_text: str,
    answers: Sequence[str] | None,
    tokenizer: Any,
    src_seq_length: int = 256,
    mask_ratio: float = 0.1,
) -> Sample:
    """The multi-blank row (spec D.8).

    Part A = [CLS] " "+masked text [eos], truncated and padded with pad ids to `src_seq_length`, sep =
    `src_seq_length`. Then, for each blank left to right, [sop] + span with targets span + [eop] at that
    mask's position and block ids 1..len+1; Part B is capped at floor(src_seq_length x m) tokens (trailing
    spans that do not fit are dropped whole) and the row padded to src + that cap. Without answers (decoding)
    the row is Part A only. `mask_positions` lists the indices of the masks still in Part A.
    """
    ids = [tokenizer.cls_id, *tokenizer.encode(" " + masked_text), tokenizer.eos_id]
    ids = ids[: src_seq_length - 1] + [tokenizer.eos_id] if len(ids) > src_seq_length else ids
    positions = [i for i, t in enumerate(ids) if t == tokenizer.mask_id]
    real_a = len(ids)
    ids += [tokenizer.pad_id] * (src_seq_length - real_a)
    budget = int(src_seq_length * mask_ratio)
    inputs, targets, pos, block = (
        list(ids),
        [0] * src_seq_length,
        list(range(src_seq_length)),
        [0] * src_seq_length,
    )
    loss = [0] * src_seq_length
    if answers is not None:
        if len(answers) < len(positions):
            raise ValueError(f"{len(positions)} masks but {len(answers)} answers in {masked_text[:60]!r}")
        used = 0
        for p, answer in zip(positions, answers, strict=False):
            span = tokenizer.encode(" " + answer)
            if used + len(span) + 1 > budget:
                break
            inputs += [tokenizer.sop_id, *span]
            targets += [*span, tokenizer.eop_id]
            loss += [1] * (len(span) + 1)
            pos += [p] * (len(span) + 1)
            block += list(range(1, len(span) + 2))
            used += len(span) + 1
        pad = src_seq_length + budget - len(inputs)
        inputs += [tokenizer.pad_id] * pad
        targets += [0] * pad
        loss += [0] * pad
        pos += [0] * pad
        block += [0] * pad
        length = src_seq_length + used
    else:
        length = src_seq_length
    return {
        "input_ids": np.asarray(inputs, dtype=np.int64),
        "position_ids": np.asarray([pos, block], dtype=np.int64),
        "targets": np.asarray(targets, dtype=np.int64),
        "loss_mask": np.asarray(loss, dtype=np.int64),
        "sep": src_seq_length,
        "length": length,
        "mask_positions": positions,
        "source_length": real_a,
    }


class InfillingBatches:
    """Training batches over epochs; the blanks are drawn afresh every epoch (the official RNG is seeded once,
    so masks change between epochs), from (seed, epoch) so that a resumed run replays them."""

    def __init__(
        self,
        documents: Sequence[str],
        tokenizer: Any,
        mask_ratio: float,
        src_seq_length: int,
        batch_size: int,
        seed: int = 0,
    ) -> None:
        if not documents:
            raise ValueError("no training documents")
        self.documents, self.tokenizer = list(documents), tokenizer
        self.mask_ratio, self.src_seq_length, self.batch_size = mask_ratio, src_seq_length, batch_size
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return math.ceil(len(self.documents) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        order = rng.permutation(len(self.documents))
        for i in range(0, len(order), self.batch_size):
            samples = []
            for j in order[i : i + self.batch_size]:
                masked, answers = mask_words(self.documents[j], self.mask_ratio, rng)
                samples.append(
                    infilling_sample(masked, answers, self.tokenizer, self.src_seq_length, self.mask_ratio)
                )
            yield collate(samples, self.tokenizer.pad_id)


# ---------------------------------------------------------------------------------------------------------
# Decoding and BLEU


def fill_in(masked_text: str, fills: Sequence[str]) -> str:
    """Put the fills in place of the "[MASK]"s, left to right; blanks without a fill become empty."""
    pieces = masked_text.split(MASK_TEXT)
    out = [pieces[0]]
    for i, rest in enumerate(pieces[1:]):
        out.append(fills[i].strip() if i < len(fills) else "")
        out.append(rest)
    return " ".join("".join(out).split())


def decode_blanks(
    model: nn.Module,
    samples: Sequence[Sample],
    tokenizer: Any,
    max_length: int,
    batch_size: int = 16,
) -> list[list[list[int]]]:
    """Greedy left-to-right filling of every blank of each sample (spec E.3): each blank ends at eop and the
    next one starts with [sop] at its mask's position, seeing the earlier fills. Returns per sample the ids
    of each fill (no eop)."""
    from openglm.generate import GenerationConfig, SpecialIds, fill_blank_ids

    config = GenerationConfig(max_length=max_length, min_length=1, num_beams=1, stop_ids=(tokenizer.eop_id,))
    special = SpecialIds.from_tokenizer(tokenizer)
    # The softmax covers the padded vocabulary; its dummy rows have no text and are dropped.
    limit = getattr(tokenizer, "num_tokens", None) or float("inf")

    def decode(share: Sequence[Sample]) -> list[list[list[int]]]:
        out: list[list[list[int]]] = []
        for i in range(0, len(share), batch_size):
            chunk = share[i : i + batch_size]
            contexts = [list(s["input_ids"][: s["sep"]]) for s in chunk]
            masks = [list(s["mask_positions"]) for s in chunk]
            for per_text in fill_blank_ids(model, contexts, masks, special, config):
                out.append(
                    [[t for t in f.token_ids if t != tokenizer.eop_id and t < limit] for f in per_text]
                )
        return out

    return parallel.shard_map(decode, samples)  # under torchrun, each rank decodes its share


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str], max_n: int = 4) -> float:
    """Corpus BLEU x 100 over whitespace tokens, one reference each (Papineni et al. 2002): clipped n-gram
    precisions pooled over the corpus, their geometric mean, and the brevity penalty exp(1 - r/c) when the
    hypotheses are shorter than the references. No smoothing: a zero precision gives 0."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        h, r = hyp.split(), ref.split()
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, max_n + 1):
            h_grams = Counter(tuple(h[i : i + n]) for i in range(len(h) - n + 1))
            r_grams = Counter(tuple(r[i : i + n]) for i in range(len(r) - n + 1))
            matches[n - 1] += sum(min(c, r_grams[g]) for g, c in h_grams.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    if hyp_len == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / max_n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return 100.0 * brevity * math.exp(log_precision)


def evaluate_infilling(
    model: nn.Module,
    tokenizer: Any,
    data: str | os.PathLike,
    mask_ratio: float = 0.1,
    src_seq_length: int = 256,
    seed: int = 0,
    batch_size: int = 16,
    limit: int | None = None,
    output: str | os.PathLike | None = None,
    documents: Sequence[str] | None = None,
) -> dict[str, float]:
    """BLEU of greedily filled blanks (spec D.8): each document is blanked with a seeded RNG, filled, and the
    filled text scored against the original with its blanked spans passed through the tokenizer (so that a
    lower-casing or `[UNK]`-producing tokenizer is not penalised for what it cannot write).

    Args:
        model: a `GLMModel`.
        tokenizer: its tokenizer.
        data: Yahoo-style text file (one document per line) or jsonl with `text`.
        mask_ratio: the share of words blanked.
        src_seq_length: Part A length.
        seed: seed of the blanks.
        batch_size: documents decoded together.
        limit: only the first `limit` documents.
        output: write `{"masked", "reference", "prediction"}` jsonl rows here.
        documents: already-read documents (then `data` is only named in messages).

    Returns:
        `{"bleu", "count"}`.
    """
    docs = list(documents if documents is not None else read_documents(data))[:limit]
    rng = np.random.default_rng(seed)
    masked = [mask_words(d, mask_ratio, rng) for d in docs]
    samples = [infilling_sample(m, None, tokenizer, src_seq_length, mask_ratio) for m, _ in masked]
    was_training = model.training
    model.eval()
    try:
        fills = decode_blanks(model, samples, tokenizer, max(1, int(src_seq_length * mask_ratio)), batch_size)
    finally:
        model.train(was_training)
    predictions = [
        fill_in(m, [tokenizer.decode(f) for f in fs]) for (m, _), fs in zip(masked, fills, strict=True)
    ]
    references = [
        fill_in(m, [tokenizer.decode(tokenizer.encode(" " + a)) for a in answers]) for m, answers in masked
    ]
    metrics = {"bleu": corpus_bleu(predictions, references), "count": len(docs)}
    if output is not None and parallel.is_main():
        rows = [
            json.dumps({"masked": m, "reference": r, "prediction": p}, ensure_ascii=False)
            for (m, _), r, p in zip(masked, references, predictions, strict=True)
        ]
        write_text_atomic(Path(output), "\n".join(rows) + "\n")
    return metrics


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning


def finetune_infilling(
    model_dir: str,
    train_data: str,
    out_dir: str,
    dev_data: str | None = None,
    tokenizer_dir: str | None = None,
    mask_ratio: float = 0.1,
    src_seq_length: int = 256,
    label_smoothing: float = 0.1,
    epochs: float = 5.0,
    max_steps: int | None = None,
    batch_size: int = 16,
    grad_accum: int = 1,
    lr: float = 1e-5,
    weight_decay: float = 0.1,
    warmup: float = 0.06,
    eval_every: int = 0,
    dev_limit: int | None = 200,
    train_limit: int | None = None,
    precision: str = "fp32",
    device: str = "auto",
    seed: int = 1234,
    progress: bool = True,
    lora: LoRASettings | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Fine-tune a GLM for text infilling with the shared training loop, then score BLEU on dev (spec D.8).

    Official Yahoo settings: BERT tokenizer, m = 0.1, src 256, 5 epochs, batch 16, lr 1e-5, linear decay,
    warmup 6 %, wd 0.1, label smoothing 0.1. The model with the best dev BLEU (or the final one without dev
    data) is saved to `out_dir/best` with its tokenizer; metrics go to `out_dir/metrics.json`.

    Args:
        model_dir: pretrained checkpoint directory.
        train_data: training documents (Yahoo text file or jsonl with `text`).
        out_dir: run directory.
        dev_data: dev documents; None skips evaluation.
        tokenizer_dir: tokenizer directory (default `model_dir`).
        mask_ratio: share of words blanked.
        src_seq_length: Part A length.
        label_smoothing: epsilon of the smoothed loss.
        epochs: training epochs (used when `max_steps` is None).
        max_steps: optimizer steps (overrides `epochs`).
        batch_size: rows per micro-batch.
        grad_accum: micro-batches per optimizer step.
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        warmup: warmup fraction.
        eval_every: evaluate dev BLEU every this many steps (0: only at the end).
        dev_limit: dev documents per evaluation (None: all).
        train_limit: use only the first training documents.
        precision: `fp32`, `bf16` or `fp16`.
        device: `auto`, `cpu`, `cuda`, ...
        seed: seed of initialisation, dropout, blanks and data order.
        progress: show progress bars.
        lora: train LoRA adapters on the frozen GLM instead of every weight (None: full fine-tuning).
        resume: continue the run in `out_dir` from its newest checkpoint (an earlier run there is refused
            otherwise).

    Returns:
        `{"step", "train_loss", "dev": {...}, "best": path}`.
    """
    from openglm.model import GLMModel
    from openglm.tokenizer import GLMTokenizer

    check_run_dir(out_dir, resume)
    out = Path(out_dir)
    tokenizer = GLMTokenizer.from_pretrained(tokenizer_dir or model_dir)
    model = GLMModel.from_pretrained(model_dir)
    check_src_length(src_seq_length, model)
    batches = InfillingBatches(
        read_documents(train_data, train_limit, "train"),
        tokenizer,
        mask_ratio,
        src_seq_length,
        batch_size,
        seed,
    )
    dev_docs = read_documents(dev_data, dev_limit) if dev_data is not None else None

    def dev_metrics(net: nn.Module) -> dict[str, float]:
        return evaluate_infilling(
            net,
            tokenizer,
            dev_data or "",
            mask_ratio,
            src_seq_length,
            0,  # the blanks of `openglm eval` (seed 0), so that dev numbers compare across runs and commands
            batch_size,
            documents=dev_docs,
        )

    return finetune_generation(
        model,
        tokenizer,
        batches,
        out,
        dev_metrics if dev_docs else None,
        "bleu",
        label_smoothing=label_smoothing,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        weight_decay=weight_decay,
        warmup=warmup,
        eval_every=eval_every,
        precision=precision,
        device=device,
        seed=seed,
        progress=progress,
        lora=lora,
        resume=resume,
    )


def run_infilling_eval(
    model_dir: str,
    data: str,
    tokenizer_dir: str | None = None,
    mask_ratio: float = 0.1,
    src_seq_length: int = 256,
    seed: int = 0,
    batch_size: int = 16,
    limit: int | None = None,
    output: str | None = None,
    device: str = "auto",
    split: str = "dev",
) -> dict[str, float]:
    """BLEU of a (fine-tuned) checkpoint filling seeded blanks; the entry point for `openglm eval`.

    Args:
        model_dir: checkpoint directory (with its tokenizer unless `tokenizer_dir` is given).
        data: Yahoo-style documents.
        tokenizer_dir: tokenizer directory (default `model_dir`).
        mask_ratio: share of words blanked.
        src_seq_length: Part A length.
        seed: seed of the blanks.
        batch_size: documents decoded together.
        limit: only the first `limit` documents.
        output: write predictions (jsonl) here.
        device: `auto`, `cpu`, `cuda`, ...
        split: the file to read when `data` is a folder (dev: `val.txt`, `dev.txt`, ...; test: `test.txt`).

    Returns:
        `{"bleu", "count"}`.
    """
    from openglm.tasks.lm_eval import load_model_and_tokenizer

    documents = read_documents(data, limit, split)
    device = str(parallel.init_distributed(device).device)  # under torchrun: this rank's GPU
    model, tokenizer = load_model_and_tokenizer(model_dir, tokenizer_dir, device)
    check_src_length(src_seq_length, model)
    return evaluate_infilling(
        model, tokenizer, data, mask_ratio, src_seq_length, seed, batch_size, limit, output, documents
    )
