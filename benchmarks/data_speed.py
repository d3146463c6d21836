"""Batch-construction speed of the pretraining data pipeline (spec C): sample assembly + blank infilling +
padding, in tokens per second on one CPU core, for each objective at sequence length 512.

Usage: python benchmarks/data_speed.py [--shards DIR] [--seconds 3] [--batch-size 16]
Without --shards it tokenizes ../shared/data/corpora/tinyshakespeare.txt with the BERT vocabulary.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from openglm.blank_infilling import ObjectiveConfig, SpecialTokens
from openglm.data import InMemoryCorpus, PretrainingBatches, ShardedCorpus, collate

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
# glm-base trains at about 350 tokens/s on this machine's CPU; data must be at least 10x faster.
TRAINING_TOKENS_PER_S = 350
TARGET = 10 * TRAINING_TOKENS_PER_S


def load_corpus(shards: str | None):
    from openglm.tokenizer import GLMTokenizer

    if shards:
        corpus = ShardedCorpus(shards)
        tok = GLMTokenizer.from_pretrained(corpus.manifest["tokenizer"])
        return corpus, SpecialTokens.from_tokenizer(tok), f"shards {shards}"
    tok = GLMTokenizer.from_files("gpt2", SHARED / "tokenizers", dblock=True)
    text = (SHARED / "corpora" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    # Group speeches into documents of a few hundred tokens, as a real corpus would have.
    grouped = ["\n".join(docs[i : i + 8]) for i in range(0, len(docs), 8)]
    corpus = InMemoryCorpus([np.array(ids) for ids in tok.encode_batch(grouped)])
    return corpus, SpecialTokens.from_tokenizer(tok), "tinyshakespeare (GPT-2 tokenizer)"


def measure(data: PretrainingBatches, seconds: float) -> tuple[float, float, int]:
    """Returns (row tokens/s, padded tokens/s, batches); row tokens exclude padding."""
    collate(data.rows(0))  # warm up
    start = time.perf_counter()
    step, tokens, padded = 1, 0, 0
    while time.perf_counter() - start < seconds:
        rows = data.rows(step)  # sample assembly + objective
        batch = collate(rows)  # padding into tensors
        tokens += sum(len(r) for r in rows.rows)
        padded += batch["input_ids"].numel()
        step += 1
    elapsed = time.perf_counter() - start
    return tokens / elapsed, padded / elapsed, step - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default=None, help="a shard directory from `openglm data prepare`")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per objective")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-length", type=int, default=512)
    args = parser.parse_args()

    corpus, special, source = load_corpus(args.shards)
    print(f"corpus: {source}, {len(corpus)} documents, {int(corpus.doc_lengths.sum())} tokens")
    print(f"sequence length {args.seq_length}, batch size {args.batch_size}, one process\n")
    base = ObjectiveConfig(task_mask=special.gmask is not None)
    configs = {
        "token": base.only("token"),
        "sentence": base.only("sentence"),
        "document": base.only("document"),
        "glm-10b mix": ObjectiveConfig.from_name("glm-10b") if special.dblock is not None else base,
    }
    print(f"{'objective':<14}{'tokens/s':>12}{'padded tok/s':>15}{'batches':>10}{'target':>10}  ok")
    for name, config in configs.items():
        data = PretrainingBatches(
            corpus, special, config, seq_length=args.seq_length, batch_size=args.batch_size, seed=0
        )
        rate, padded, batches = measure(data, args.seconds)
        ok = "yes" if rate >= TARGET else "NO"
        print(f"{name:<14}{rate:>12,.0f}{padded:>15,.0f}{batches:>10}{TARGET:>10,}  {ok}")
    print(
        f"\ntarget: 10 x the glm-base training throughput here ({TRAINING_TOKENS_PER_S} tokens/s) = {TARGET:,}"
    )


if __name__ == "__main__":
    main()
