"""Decoding speed of `fill_blanks` (spec E): tokens/s of greedy and beam search with the K/V cache, against full
recomputation (re-running context + every generated token at each step, which is what a cache-less loop does).

Random weights of the glm-base shape (GLMConfig.from_name("glm-base")), one blank after a context of 512 tokens;
every blank is forced to `--steps` tokens (min_length = max_length) so all rows decode the same amount. Each
row of the table is the fastest of `--repeats` runs, and "bare ms" the fastest of a few bare forwards.

    python benchmarks/generate_speed.py                # the default table (a minute or two on a CPU)
    python benchmarks/generate_speed.py --device cuda --steps 64
"""

from __future__ import annotations

import argparse
import time

import torch

from openglm import GLMConfig, GLMModel, KVCache
from openglm.generate import GenerationConfig, SpecialIds, fill_blank_ids
from openglm.model import SharedPrefixCache

TARGETS = {("greedy", 1): 23.0, ("greedy", 8): 90.0, ("beam4", 1): 60.0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _inputs(
    config: GLMConfig, batch: int, context: int, gen: torch.Generator
) -> tuple[list[list[int]], list[list[int]]]:
    mask = config.vocab_size - 3  # random weights: any valid row will do
    body = torch.randint(2, config.vocab_size - 3, (batch, context - 2), generator=gen).tolist()
    contexts = [[1] + row[: context // 2] + [mask] + row[context // 2 :] for row in body]
    positions = [[1 + context // 2]] * batch
    return contexts, positions


def time_cached(model: GLMModel, contexts, positions, special, config: GenerationConfig, device) -> float:
    """Seconds of decoding only: from the end of the first decoding forward to the end of the last one.

    A forward hook stamps every model call; the first call is the context prefill, the second feeds
    <|startofpiece|> and yields the first token, so the span covers `steps - 1` tokens per row, beam
    bookkeeping and cache reordering included.
    """
    stamps: list[float] = []

    def stamp(*_: object) -> None:
        _sync(device)
        stamps.append(time.perf_counter())

    hook = model.register_forward_hook(stamp)
    try:
        fill_blank_ids(model, contexts, positions, special, config)
    finally:
        hook.remove()
    if len(stamps) != config.max_length + 1:
        raise RuntimeError(f"expected {config.max_length + 1} forward calls, saw {len(stamps)}")
    return stamps[-1] - stamps[1]


@torch.inference_mode()
def time_recompute(
    model: GLMModel, context: list[int], mask_pos: int, steps: int, special: SpecialIds, device
) -> float:
    """Seconds per generated token for one row when every step re-runs the whole sequence without a cache."""
    ids = context + [special.sop]
    pos = list(range(len(context))) + [mask_pos]
    block = [0] * len(context) + [1]
    model(
        torch.tensor([ids], device=device),
        torch.tensor([[pos, block]], device=device),
        attention_mask=len(context),
    )
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(
            torch.tensor([ids], device=device),
            torch.tensor([[pos, block]], device=device),
            attention_mask=len(context),
        )
        ids.append(int(out.logits[0, -1].argmax()))
        pos.append(mask_pos)
        block.append(block[-1] + 1)
    _sync(device)
    return (time.perf_counter() - start) / steps


@torch.inference_mode()
def time_bare_step(
    model: GLMModel, texts: int, beams: int, context: int, steps: int, device, reps: int = 3
) -> float:
    """Seconds of one bare model forward (one token per row after `context + steps` cached slots): the floor
    that any cached decoding loop pays per step. With beams, the rows of a text share its `context` slots
    and own `steps` slots each, as in beam search (SharedPrefixCache). The cache holds random K/V, so no
    prefill is needed."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    rows = texts * beams

    def random_cache(batch: int, length: int) -> KVCache:
        cache = KVCache(cfg.num_layers)
        for layer in range(cfg.num_layers):
            kv = torch.randn(
                batch, cfg.num_attention_heads, length, cfg.head_size, device=device, dtype=dtype
            )
            cache.append(layer, kv, kv)
        cache.commit()
        return cache

    if beams == 1:
        cache, cached = random_cache(rows, context + steps), context + steps
    else:
        visible = torch.ones(texts, context, dtype=torch.bool, device=device)
        cache = SharedPrefixCache(random_cache(texts, context), visible, beams)
        own = random_cache(rows, steps)
        cache.keys, cache.values, cache.length = own.keys, own.values, own.length
        cached = steps
    ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
    pos = torch.tensor([[[context // 2], [2]]], device=device).expand(rows, 2, 1)
    pos = pos if cfg.block_position_encoding else pos[:, 0]
    select = torch.ones(rows, 1, dtype=torch.bool, device=device)
    best = float("inf")
    model.pack_weights(rows)  # the kernels of a decoding step (DecodeState.feed packs as well)
    try:
        for _ in range(reps + 1):  # the first call grows the cache buffer
            _sync(device)
            start = time.perf_counter()
            model(ids, pos, cache=cache, logits_mask=select)
            _sync(device)
            best = min(best, time.perf_counter() - start)
            cache.truncate(cached)  # drop the token again: every rep sees the same cache
    finally:
        model.pack_weights(None)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="glm-base")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=16, help="tokens decoded per row")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument(
        "--recompute-steps", type=int, default=2, help="steps timed for the recomputation baseline"
    )
    parser.add_argument("--repeats", type=int, default=3, help="decoding runs per row; the fastest counts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = GLMConfig.from_name(args.preset)
    model = GLMModel(cfg).to(device=device, dtype=getattr(torch, args.dtype)).eval()
    special = SpecialIds(sop=cfg.vocab_size - 2, eop=cfg.vocab_size - 1, eos=0, pad=0)
    gen = torch.Generator().manual_seed(0)
    print(
        f"# {args.preset} ({cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}), context "
        f"{args.context}, {args.steps} tokens per row, {args.device} {args.dtype}, {torch.get_num_threads()} threads, best of {args.repeats} runs"
    )
    contexts, positions = _inputs(cfg, max(args.batch_sizes), args.context, gen)
    warm = GenerationConfig(max_length=2, min_length=2)
    fill_blank_ids(model, contexts[:1], positions[:1], special, warm)  # allocator and kernel warm-up
    per_row = time_recompute(model, contexts[0], positions[0][0], args.recompute_steps, special, device)
    header = (
        f"{'strategy':<9} {'batch':>5} {'rows':>5} {'tokens/s':>10} {'step ms':>8} {'bare ms':>8} "
        f"{'recompute tok/s':>16} {'ratio':>7} {'target':>9}"
    )
    print(header)
    print("-" * len(header))
    for strategy, beams in (("greedy", 1), (f"beam{args.beams}", args.beams)):
        for batch in args.batch_sizes:
            config = GenerationConfig(max_length=args.steps, min_length=args.steps, num_beams=beams)
            # Best of several runs: on a shared host, the slowest runs measure the neighbours.
            seconds = min(
                time_cached(model, contexts[:batch], positions[:batch], special, config, device)
                for _ in range(args.repeats)
            )
            rows = batch * beams
            # Tokens decoded (beam: every beam candidate), the first of each row excluded by time_cached.
            rate = rows * (args.steps - 1) / seconds
            # Recomputation is compute-bound, so its cost grows linearly with the rows decoded together.
            base = 1.0 / per_row
            target = TARGETS.get((strategy, batch))
            verdict = (
                "" if target is None else (f">={target:.0f} ok" if rate >= target else f">={target:.0f} MISS")
            )
            step_ms = 1000 * seconds / (args.steps - 1)
            bare_ms = 1000 * time_bare_step(model, batch, beams, args.context, args.steps, device)
            print(
                f"{strategy:<9} {batch:>5} {rows:>5} {rate:>10.1f} {step_ms:>8.1f} {bare_ms:>8.1f} "
                f"{base:>16.2f} {rate / base:>6.1f}x {verdict:>9}"
            )
    print(
        f"# recompute: {per_row:.3f} s per token for one row (measured over {args.recompute_steps} steps, scaled to rows)"
    )
    print(
        "# step ms: one decoding step of fill_blanks; bare ms: one bare GLMModel forward over the same cache (shared context for beams)"
    )


if __name__ == "__main__":
    main()
