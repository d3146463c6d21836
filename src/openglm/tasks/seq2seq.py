"""Seq2seq fine-tuning and evaluation (spec D.7, E.2): source/target pairs, the summarization and
"customization" layouts, label-smoothed loss, beam-search decoding and ROUGE-1/2/L.

The target fills one long blank: Part A holds the source with a mask, padded to `src_seq_length` (the pads are
attended), and Part B = [sop] + target predicts target + [eop] at the mask's position.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from openglm import parallel
from openglm.atomic import write_text_atomic
from openglm.lora import LoRASettings
from openglm.tasks.files import find_split_file, line_of, read_jsonl, read_text, row_text, split_file_names
from openglm.tasks.finetuning import check_run_dir, finetune_generation
from openglm.tasks.lm_eval import Sample, check_src_length, collate, default_mask_id, two_part_row

logger = logging.getLogger(__name__)

LAYOUTS = ("summarization", "customization")
# Official task names and the layout each uses.
_LAYOUT_OF_TASK = {
    "xsum": "summarization",
    "cnn_dm": "summarization",
    "cnn_dm_original": "summarization",
    "gigaword": "summarization",
}
# jsonl field pairs tried in order when none are given (XSum uses document/summary).
_FIELD_PAIRS = (("source", "target"), ("document", "summary"), ("src", "tgt"), ("input", "output"))


# ---------------------------------------------------------------------------------------------------------
# Data


def read_pairs(
    path: str | os.PathLike,
    split: str = "train",
    source_key: str | None = None,
    target_key: str | None = None,
) -> list[tuple[str, str]]:
    """Source/target pairs from a jsonl file or from `{split}.source` / `{split}.target` line files.

    `path` is a jsonl file, or a directory holding `{split}.jsonl` or `{split}.source` + `{split}.target`
    (one example per line; the dev split may also be called `val`, `valid` or `validation`). Multi-line jsonl sources (XSum documents) are joined with single spaces, as the
    official XSum reader joins the article's lines; no other normalisation is applied.

    Args:
        path: the file or directory.
        split: which split to read from a directory.
        source_key: jsonl field of the source (default: source, document, src or input).
        target_key: jsonl field of the target (default: the partner of the source field).

    Returns:
        The (source, target) pairs.
    """
    path = Path(path)
    if path.is_dir():
        jsonl, src = find_split_file(path, split, (".jsonl",)), find_split_file(path, split, (".source",))
        tgt = src.with_suffix(".target") if src is not None else None
        if jsonl is not None:
            path = jsonl
        elif src is not None and tgt is not None and tgt.is_file():
            sources = read_text(src).splitlines()
            targets = read_text(tgt).splitlines()
            if len(sources) != len(targets):
                raise ValueError(f"{src} has {len(sources)} lines but {tgt} has {len(targets)}")
            return [(s.strip(), t.strip()) for s, t in zip(sources, targets, strict=True)]
        else:
            raise FileNotFoundError(
                f"{path}: no {split} file ({split_file_names(split, ('.jsonl',))}, or .source + .target pairs)"
            )
    rows = read_jsonl(path)
    if not rows:
        raise ValueError(f"{path}: no examples")
    if source_key is None or target_key is None:
        pair = next(((s, t) for s, t in _FIELD_PAIRS if s in rows[0] and t in rows[0]), None)
        if pair is None:
            raise ValueError(
                f"{path}: row 1 has none of the field pairs {_FIELD_PAIRS}; pass source_key/target_key"
            )
        source_key, target_key = source_key or pair[0], target_key or pair[1]
    pairs = []
    for i, row in enumerate(rows):
        n = line_of(rows, i)
        # A number or null is a broken row; str() would train on "5" and score against "None".
        document, summary = row_text(row, source_key, path, n), row_text(row, target_key, path, n)
        source = " ".join(line.strip() for line in document.split("\n") if line.strip())
        pairs.append((source, summary.strip()))
    return pairs


def source_part(
    source: str,
    tokenizer: Any,
    layout: str = "summarization",
    src_seq_length: int = 608,
    mask_id: int | None = None,
) -> tuple[list[int], int]:
    """Part A of a seq2seq example before padding, and its mask index (spec D.7).

    summarization: [CLS] <mask> " Content:" " "+source, the source cut at the end to fit; the mask sits at
    position 1, so the summary fills a blank before the article. customization: [CLS] source <mask> [eos],
    the source left-truncated to fit. <mask> is [sMASK] for task-mask tokenizers, else [MASK].
    """
    layout = _LAYOUT_OF_TASK.get(layout, layout)
    if layout not in LAYOUTS:
        raise ValueError(
            f"unknown seq2seq layout {layout!r}; expected one of {LAYOUTS} or {sorted(_LAYOUT_OF_TASK)}"
        )
    mask_id = default_mask_id(tokenizer, "sentence") if mask_id is None else mask_id
    if layout == "summarization":
        prompt = [tokenizer.cls_id, mask_id, *tokenizer.encode(" Content:")]
        body = tokenizer.encode(" " + source)[: max(src_seq_length - len(prompt), 0)]
        return prompt + body, 1
    body = tokenizer.encode(source)
    body = body[max(len(body) - (src_seq_length - 3), 0) :]
    ids = [tokenizer.cls_id, *body, mask_id, tokenizer.eos_id]
    return ids, len(ids) - 2


def resolve_mask(tokenizer: Any, mask_token: str | None) -> int | None:
    """The id of an explicitly chosen mask token ("[MASK]", "[sMASK]" or "[gMASK]"); None keeps the layout's
    default ([sMASK] for task-mask tokenizers, else [MASK])."""
    if mask_token is None:
        return None
    if mask_token not in ("[MASK]", "[sMASK]", "[gMASK]"):
        raise ValueError(f"mask_token={mask_token!r}; expected [MASK], [sMASK] or [gMASK]")
    mask_id = tokenizer.token_to_id(mask_token)
    if mask_id is None:
        raise ValueError(
            f"mask_token={mask_token!r} is not in this tokenizer (task-mask tokens need task_mask=True)"
        )
    return mask_id


def target_tokens(target: str, tokenizer: Any, tgt_seq_length: int) -> tuple[list[int], int]:
    """ " "+target + [eop], truncated (eop is appended first, so a long target loses it) and padded to
    `tgt_seq_length`; returns the ids and the number of real ones."""
    ids = [*tokenizer.encode(" " + target), tokenizer.eop_id][:tgt_seq_length]
    real = len(ids)
    return ids + [tokenizer.pad_id] * (tgt_seq_length - real), real


def seq2seq_sample(
    source: str,
    target: str | None,
    tokenizer: Any,
    layout: str = "summarization",
    src_seq_length: int = 608,
    tgt_seq_length: int = 60,
    mask_id: int | None = None,
    mask_pad: bool = False,
) -> Sample:
    """One seq2seq row in the official format (spec D.7).

    Part A is padded with pad ids to `src_seq_length` and sep = `src_seq_length` (the pads are attended). With a
    target: Part B = [sop] + target[:-1] predicting the padded target (loss on its real tokens). Without (eval):
    Part A + [sop] only. `mask_pad` (customization only, as officially) adds an explicit `attention_mask`
    [L, L] that hides the pads: Part A rows see the real source, Part B rows the real source and Part B
    causally. `source_length` is the real Part A length and `mask_position` the blank's index.
    """
    if mask_pad and _LAYOUT_OF_TASK.get(layout, layout) != "customization":
        raise ValueError("mask_pad is only defined for the customization layout (as in the official code)")
    part_a, mask_pos = source_part(source, tokenizer, layout, src_seq_length, mask_id)
    real_a = len(part_a)
    part_a = part_a + [tokenizer.pad_id] * (src_seq_length - real_a)
    if target is None:
        sample = two_part_row(part_a, [0], np.zeros(1, dtype=np.int64), mask_pos, None, tokenizer)
        del sample["targets"], sample["loss_mask"]
    else:
        tokens, real = target_tokens(target, tokenizer, tgt_seq_length)
        loss = np.zeros(tgt_seq_length, dtype=np.int64)
        loss[:real] = 1
        sample = two_part_row(part_a, tokens, loss, mask_pos, None, tokenizer)
        # Padding after the target only carries zero loss; batches are cut after the longest real target.
        sample["length"] = src_seq_length + real
    sample["source_length"] = real_a
    sample["mask_position"] = mask_pos
    if mask_pad:
        sample["attention_mask"] = mask_pad_attention(len(sample["input_ids"]), src_seq_length, real_a)
    return sample


def mask_pad_attention(length: int, src_seq_length: int, source_length: int) -> np.ndarray:
    """The explicit [L, L] 0/1 mask of `--mask-pad-token`: everyone sees the real source; Part B rows also
    see Part B causally; the pads inside Part A are hidden."""
    mask = np.zeros((length, length), dtype=np.uint8)
    mask[:, :source_length] = 1
    causal = np.tril(np.ones((length - src_seq_length, length - src_seq_length), dtype=np.uint8))
    mask[src_seq_length:, src_seq_length:] = causal
    return mask


def collate_seq2seq(
    samples: Sequence[Sample], pad_id: int, device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """`lm_eval.collate` plus the explicit [B, 1, T, T] attention mask of mask-pad samples."""
    batch = collate(samples, pad_id, device)
    if "attention_mask" in samples[0]:
        width = batch["input_ids"].size(1)
        masks = np.stack([np.asarray(s["attention_mask"])[:width, :width] for s in samples])
        batch["attention_mask"] = torch.from_numpy(masks)[:, None].to(device)
    return batch


class Seq2SeqBatches:
    """Training batches over epochs: each pass over the samples is a fresh permutation from
    (seed, epoch), so an interrupted run replays the same order when it skips what it consumed."""

    def __init__(
        self, samples: Sequence[Sample], batch_size: int, pad_id: int, seed: int = 0, shuffle: bool = True
    ):
        if not samples:
            raise ValueError("no training samples")
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        self.samples, self.batch_size, self.pad_id = list(samples), batch_size, pad_id
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    def __len__(self) -> int:
        return math.ceil(len(self.samples) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        order = rng.permutation(len(self.samples)) if self.shuffle else np.arange(len(self.samples))
        for i in range(0, len(order), self.batch_size):
            yield collate_seq2seq([self.samples[j] for j in order[i : i + self.batch_size]], self.pad_id)


# ---------------------------------------------------------------------------------------------------------
# Loss


def label_smoothed_nll(logits: Tensor, targets: Tensor, epsilon: float = 0.1) -> Tensor:
    """Per-token (1 - eps) * NLL + eps * mean over the vocabulary of -log p (spec D.7), in fp32.

    Args:
        logits: [N, V].
        targets: [N].
        epsilon: label smoothing.

    Returns:
        [N] losses.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(1, targets[:, None]).squeeze(1)
    if epsilon == 0:
        return nll
    return (1.0 - epsilon) * nll - epsilon * logp.mean(dim=-1)


def _attention(batch: dict[str, Any]) -> Any:
    return batch["attention_mask"] if "attention_mask" in batch else batch["sep"]


def smoothed_loss_fn(epsilon: float):
    """A `fit` loss function: (sum of label-smoothed token losses, number of target tokens)."""

    def loss_fn(model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        where = batch["loss_mask"] > 0
        out = model(
            batch["input_ids"], batch["position_ids"], attention_mask=_attention(batch), logits_mask=where
        )
        losses = label_smoothed_nll(out.logits, batch["targets"][where], epsilon)
        return losses.sum(), where.sum().float()

    return loss_fn


POSITION_TABLES = ("position_embeddings", "block_position_embeddings")


def extend_positions(model: nn.Module, max_sequence_length: int) -> bool:
    """Grow the position tables to `max_sequence_length` (spec F.4, I.15): new rows are drawn from
    N(0, initializer_range) and trained during fine-tuning; existing rows are kept. Returns whether it grew."""
    config = model.config
    if max_sequence_length <= config.max_sequence_length:
        return False
    old_rows = config.position_table_rows
    config.max_sequence_length = max_sequence_length
    rows = config.position_table_rows
    tables = [(name, getattr(model.transformer, name, None)) for name in POSITION_TABLES]
    for name, table in tables:
        if table is None:  # no block position table
            continue
        grown = nn.Embedding(rows, table.embedding_dim, device=table.weight.device, dtype=table.weight.dtype)
        with torch.no_grad():
            grown.weight.normal_(0.0, config.initializer_range)
            grown.weight[:old_rows] = table.weight
        setattr(model.transformer, name, grown)
    logger.info("position tables extended from %d to %d rows (new rows random)", old_rows, rows)
    return True


# ---------------------------------------------------------------------------------------------------------
# Decoding and ROUGE


@dataclass
class DecodeSettings:
    """Beam search of the official seq2seq evaluator (spec E.2); XSum values by default.

    Attributes:
        num_beams: beams (1 = greedy).
        length_penalty: hypotheses ranked by sum_logprob / length**length_penalty.
        min_length: eop is banned until this many tokens are generated.
        no_repeat_ngram_size: no n-gram repeats within a generated target (0 = off).
        max_length: at most this many tokens (default: `tgt_seq_length`).
    """

    num_beams: int = 6
    length_penalty: float = 1.0
    min_length: int = 10
    no_repeat_ngram_size: int = 3
    max_length: int | None = None


def generate_targets(
    model: nn.Module,
    samples: Sequence[Sample],
    tokenizer: Any,
    settings: DecodeSettings,
    max_length: int,
    batch_size: int = 8,
) -> list[list[int]]:
    """Decode the blank of each eval sample with `openglm.generate` beam search; returns the ids without eop.

    Plain samples pass their padded Part A (the pads are attended, as in training); mask-pad samples pass
    only the real source, whose padding the decoder then hides.
    """
    from openglm.generate import GenerationConfig, SpecialIds, fill_blank_ids

    config = GenerationConfig(
        max_length=settings.max_length or max_length,
        min_length=settings.min_length,
        num_beams=settings.num_beams,
        length_penalty=settings.length_penalty,
        no_repeat_ngram_size=settings.no_repeat_ngram_size,
        stop_ids=(tokenizer.eop_id,),
    )
    special = SpecialIds.from_tokenizer(tokenizer)
    # The softmax covers the padded vocabulary; its dummy rows have no text and are dropped.
    limit = getattr(tokenizer, "num_tokens", None) or float("inf")

    def decode(share: Sequence[Sample]) -> list[list[int]]:
        outputs: list[list[int]] = []
        for i in range(0, len(share), batch_size):
            chunk = share[i : i + batch_size]
            contexts = [
                list(s["input_ids"][: s["source_length"] if "attention_mask" in s else s["sep"]])
                for s in chunk
            ]
            masks = [[int(s["mask_position"])] for s in chunk]
            for per_text in fill_blank_ids(model, contexts, masks, special, config):
                ids = list(per_text[0].token_ids) if per_text else []
                outputs.append(
                    [t for t in ids if t not in (tokenizer.eop_id, tokenizer.pad_id) and t < limit]
                )
        return outputs

    return parallel.shard_map(decode, samples)  # under torchrun, each rank decodes its share


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 x 100 with Porter stemming (`rouge-score`; ROUGE-L is the summary-level rougeLsum,
    sentences separated by newlines, as in the official evaluator)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:
        raise ImportError("ROUGE needs the rouge-score package: pip install 'openglm[eval]'") from err
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)
        totals["rouge1"] += scores["rouge1"].fmeasure
        totals["rouge2"] += scores["rouge2"].fmeasure
        totals["rougeL"] += scores["rougeLsum"].fmeasure
    return {k: 100.0 * v / len(predictions) for k, v in totals.items()}


def evaluate_seq2seq(
    model: nn.Module,
    tokenizer: Any,
    data: str | os.PathLike,
    split: str = "dev",
    layout: str = "summarization",
    src_seq_length: int = 608,
    tgt_seq_length: int = 60,
    decode: DecodeSettings | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    mask_pad: bool = False,
    output: str | os.PathLike | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
    mask_token: str | None = None,
) -> dict[str, float]:
    """Decode every source with beam search and score ROUGE against the references (spec D.7, E.2).

    References are the targets decoded after encoding (as officially), so a lower-casing tokenizer is not
    penalised for case.

    Args:
        model: a `GLMModel`.
        tokenizer: its tokenizer.
        data: pairs file or directory (see `read_pairs`).
        split: split to read from a directory.
        layout: `summarization` or `customization`.
        src_seq_length: Part A length.
        tgt_seq_length: the longest target.
        decode: beam-search settings (default: XSum's).
        batch_size: sources decoded together.
        limit: only the first `limit` pairs.
        mask_pad: customization with hidden pads.
        output: write `{"source", "reference", "prediction"}` jsonl rows here.
        pairs: already-read pairs (then `data` is only named in messages).
        mask_token: "[MASK]", "[sMASK]" or "[gMASK]" instead of the layout's default mask.

    Returns:
        `{"rouge1", "rouge2", "rougeL", "count"}`.
    """
    decode = decode or DecodeSettings()
    mask_id = resolve_mask(tokenizer, mask_token)
    pairs = list(pairs if pairs is not None else read_pairs(data, split))[:limit]
    samples = [
        seq2seq_sample(src, None, tokenizer, layout, src_seq_length, tgt_seq_length, mask_id, mask_pad)
        for src, _ in pairs
    ]
    was_training = model.training
    model.eval()
    try:
        generated = generate_targets(model, samples, tokenizer, decode, tgt_seq_length, batch_size)
    finally:
        model.train(was_training)
    predictions = [tokenizer.decode(ids).strip() for ids in generated]
    references = [tokenizer.decode(tokenizer.encode(" " + tgt)).strip() for _, tgt in pairs]
    metrics = {**rouge(predictions, references), "count": len(pairs)}
    if output is not None and parallel.is_main():
        rows = [
            json.dumps({"source": s, "reference": r, "prediction": p}, ensure_ascii=False)
            for (s, _), r, p in zip(pairs, references, predictions, strict=True)
        ]
        write_text_atomic(Path(output), "\n".join(rows) + "\n")
    return metrics


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning


def finetune_seq2seq(
    model_dir: str,
    train_data: str,
    out_dir: str,
    dev_data: str | None = None,
    tokenizer_dir: str | None = None,
    layout: str = "summarization",
    src_seq_length: int = 608,
    tgt_seq_length: int = 60,
    label_smoothing: float = 0.1,
    epochs: float = 6.0,
    max_steps: int | None = None,
    batch_size: int = 8,
    grad_accum: int = 1,
    lr: float = 1e-5,
    weight_decay: float = 0.1,
    warmup: float = 0.06,
    eval_every: int = 0,
    dev_limit: int | None = 100,
    decode: DecodeSettings | None = None,
    mask_pad: bool = False,
    mask_token: str | None = None,
    precision: str = "fp32",
    device: str = "auto",
    seed: int = 1234,
    progress: bool = True,
    lora: LoRASettings | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Fine-tune a GLM on source/target pairs with the shared training loop, then score ROUGE on dev.

    XSum defaults (spec D.7): src 608 / tgt 60, 6 epochs, lr 1e-5, label smoothing 0.1, warmup 6 %, linear
    decay, wd 0.1, 6 beams, length penalty 1, min length 10, no-repeat 3-grams. A source longer than the
    model's positions grows the position tables (new rows random, spec F.4). The model with the best dev
    ROUGE-L (or the final one without dev data) is saved to `out_dir/best` with its tokenizer, and the
    metrics to `out_dir/metrics.json`.

    Args:
        model_dir: pretrained checkpoint directory.
        train_data: training pairs (file or directory, split "train").
        out_dir: run directory (training checkpoints, best model, metrics).
        dev_data: dev pairs (file or directory, split "dev"); None skips evaluation.
        tokenizer_dir: tokenizer directory (default `model_dir`).
        layout: `summarization` or `customization`.
        src_seq_length: Part A length.
        tgt_seq_length: target length (with eop).
        label_smoothing: epsilon of the smoothed loss.
        epochs: training epochs (used when `max_steps` is None).
        max_steps: optimizer steps (overrides `epochs`).
        batch_size: rows per micro-batch.
        grad_accum: micro-batches per optimizer step.
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        warmup: warmup fraction.
        eval_every: evaluate dev ROUGE every this many steps (0: only at the end).
        dev_limit: dev pairs decoded per evaluation (None: all).
        decode: beam-search settings.
        mask_pad: customization with hidden pads.
        mask_token: "[MASK]", "[sMASK]" or "[gMASK]" instead of the layout's default mask.
        precision: `fp32`, `bf16` or `fp16`.
        device: `auto`, `cpu`, `cuda`, ...
        seed: seed of initialisation, dropout and data order.
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
    if extend_positions(model, src_seq_length) and lora is not None:
        # The new position rows start random: LoRA alone could never train them.
        lora = dataclasses.replace(lora, train_also=(*lora.train_also, *POSITION_TABLES))
        logger.info(
            "position tables grown to %d: they train in full next to the LoRA adapters", src_seq_length
        )
    mask_id = resolve_mask(tokenizer, mask_token)
    train_pairs = read_pairs(train_data, "train")
    dev_pairs = read_pairs(dev_data, "dev") if dev_data is not None else None
    samples = [
        seq2seq_sample(s, t, tokenizer, layout, src_seq_length, tgt_seq_length, mask_id, mask_pad)
        for s, t in train_pairs
    ]
    batches = Seq2SeqBatches(samples, batch_size, tokenizer.pad_id, seed)

    def dev_metrics(net: nn.Module) -> dict[str, float]:
        return evaluate_seq2seq(
            net,
            tokenizer,
            dev_data or "",
            layout=layout,
            src_seq_length=src_seq_length,
            tgt_seq_length=tgt_seq_length,
            decode=decode,
            batch_size=batch_size,
            limit=dev_limit,
            mask_pad=mask_pad,
            pairs=dev_pairs,
            mask_token=mask_token,
        )

    return finetune_generation(
        model,
        tokenizer,
        batches,
        out,
        dev_metrics if dev_pairs else None,
        "rougeL",
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


def run_seq2seq_eval(
    model_dir: str,
    data: str,
    tokenizer_dir: str | None = None,
    split: str = "dev",
    layout: str = "summarization",
    src_seq_length: int = 608,
    tgt_seq_length: int = 60,
    num_beams: int = 6,
    length_penalty: float = 1.0,
    min_length: int = 10,
    no_repeat_ngram_size: int = 3,
    batch_size: int = 8,
    limit: int | None = None,
    mask_pad: bool = False,
    output: str | None = None,
    mask_token: str | None = None,
    device: str = "auto",
) -> dict[str, float]:
    """ROUGE of a (fine-tuned) checkpoint on source/target pairs; the entry point for `openglm eval`.

    Args:
        model_dir: checkpoint directory (with its tokenizer unless `tokenizer_dir` is given).
        data: pairs file or directory.
        tokenizer_dir: tokenizer directory (default `model_dir`).
        split: split to read from a directory.
        layout: `summarization` or `customization`.
        src_seq_length: Part A length.
        tgt_seq_length: the longest target.
        num_beams: beams.
        length_penalty: beam length penalty.
        min_length: minimum generated tokens.
        no_repeat_ngram_size: banned repeated n-gram size (0 = off).
        batch_size: sources decoded together.
        limit: only the first `limit` pairs.
        mask_pad: customization with hidden pads.
        output: write predictions (jsonl) here.
        mask_token: "[MASK]", "[sMASK]" or "[gMASK]" instead of the layout's default mask.
        device: `auto`, `cpu`, `cuda`, ...

    Returns:
        `{"rouge1", "rouge2", "rougeL", "count"}`.
    """
    from openglm.tasks.lm_eval import load_model_and_tokenizer

    device = str(parallel.init_distributed(device).device)  # under torchrun: this rank's GPU
    model, tokenizer = load_model_and_tokenizer(model_dir, tokenizer_dir, device)
    check_src_length(src_seq_length, model)
    decode = DecodeSettings(num_beams, length_penalty, min_length, no_repeat_ngram_size)
    return evaluate_seq2seq(
        model,
        tokenizer,
        data,
        split,
        layout,
        src_seq_length,
        tgt_seq_length,
        decode,
        batch_size,
        limit,
        mask_pad,
        output,
        mask_token=mask_token,
    )
