"""Tokenizer throughput (issue 3): tokens/s of `GLMTokenizer.encode_batch` (the Rust / SentencePiece batch path)
on the Gutenberg corpus, one configuration per row, pinned to one CPU core. Target: >= 1M tokens/s for the BPE
kinds (GPT-2, RoBERTa, trained BPE).

    python benchmarks/tokenizer_speed.py                 # ../shared/data/corpora/gutenberg, first 4 MB
    python benchmarks/tokenizer_speed.py --mb 0          # the whole corpus
    python benchmarks/tokenizer_speed.py --bpe DIR       # add a tokenizer trained by `openglm tokenizer train`
"""

from __future__ import annotations

import os

# One core: the Rust thread pool reads this when it starts, so it must be set before tokenizers is imported.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from openglm.tokenizer import GLMTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET_BPE = 1_000_000  # tokens/s on one core for the byte-level BPE kinds
CONFIGS = [
    ("bert", "bert-large-uncased-vocab.txt", {}),
    ("gpt2", "gpt2-vocab.json", {}),
    ("roberta", "roberta-vocab.json", {}),
    ("chinese-sp", "cog-pretrain.model", {}),
    ("chinese-sp-fix", "cog-pretrain.model", {}),
]
BPE_KINDS = {"gpt2", "roberta", "bpe"}


def load_texts(corpus: Path, limit_bytes: int) -> list[str]:
    """Paragraphs (blank-line separated) of the corpus files, up to `limit_bytes` of text (0: all)."""
    texts: list[str] = []
    size = 0
    for path in sorted(corpus.glob("*.txt")):
        for para in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            if para.strip():
                texts.append(para)
                size += len(para.encode())
                if limit_bytes and size >= limit_bytes:
                    return texts
    return texts


def measure(tok: GLMTokenizer, texts: list[str], batch: int, min_seconds: float) -> tuple[int, float, float]:
    """Tokens, wall seconds and CPU seconds of encoding all texts in batches, repeated for `min_seconds`.

    CPU seconds are what one core spent; on a shared machine they are the fair measure, wall time is not."""
    tok.encode_batch(texts[:batch])  # warm-up
    tokens, rounds = 0, 0
    wall, cpu = time.perf_counter(), time.process_time()
    while rounds == 0 or time.perf_counter() - wall < min_seconds:
        for i in range(0, len(texts), batch):
            tokens += sum(len(ids) for ids in tok.encode_batch(texts[i : i + batch]))
        rounds += 1
    return tokens, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=ROOT.parent / "shared/data/corpora/gutenberg")
    parser.add_argument("--vocab-dir", type=Path, default=ROOT.parent / "shared/data/tokenizers")
    parser.add_argument("--mb", type=float, default=4.0, help="MB of text to encode (0: the whole corpus)")
    parser.add_argument("--batch", type=int, default=1024, help="texts per encode_batch call")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="repeat until this long per row")
    parser.add_argument("--bpe", type=Path, help="also measure a trained tokenizer directory")
    args = parser.parse_args()

    if not args.corpus.is_dir():
        print(f"skipped: corpus not found at {args.corpus} (pass --corpus DIR)")
        return
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # SentencePiece threads too: one core
    texts = load_texts(args.corpus, int(args.mb * 1e6))
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"corpus: {args.corpus} ({len(texts)} paragraphs, {mb:.1f} MB), one core, batch {args.batch}")

    rows = []
    configs = [(kind, args.vocab_dir / file, opts) for kind, file, opts in CONFIGS]
    if args.bpe is not None:
        configs.append(("bpe", args.bpe, {}))
    for kind, path, opts in configs:
        try:
            tok = (
                GLMTokenizer.from_pretrained(path)
                if kind == "bpe"
                else GLMTokenizer.from_files(kind, path, **opts)
            )
        except (FileNotFoundError, ValueError) as err:
            print(f"skipped {kind}: {err}")
            continue
        tokens, wall, cpu = measure(tok, texts, args.batch, args.min_seconds)
        rows.append((kind, tokens, wall, cpu))

    print(
        f"\n| {'tokenizer':<15} | {'tokens':>10} | {'wall s':>7} | {'cpu s':>7} | {'tok/s wall':>11} "
        f"| {'tok/s cpu':>11} | {'target':>10} | ok |"
    )
    print(f"|{'-' * 17}|{'-' * 12}|{'-' * 9}|{'-' * 9}|{'-' * 13}|{'-' * 13}|{'-' * 12}|----|")
    for kind, tokens, wall, cpu in rows:
        goal = TARGET_BPE if kind in BPE_KINDS else None
        rate = tokens / cpu
        ok = "-" if goal is None else ("yes" if rate >= goal else "no")
        goal_s = f"{goal:>10,}" if goal else f"{'-':>10}"
        print(
            f"| {kind:<15} | {tokens:>10,} | {wall:>7.2f} | {cpu:>7.2f} | {tokens / wall:>11,.0f} "
            f"| {rate:>11,.0f} | {goal_s} | {ok:<3}|"
        )
    print("target: tokens/s per core (CPU time), byte-level BPE kinds")


if __name__ == "__main__":
    main()
