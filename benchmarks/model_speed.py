"""Model speed: forward+backward tokens/s (fp32, bf16) next to this machine's matmul peak, and cached decoding
tokens/s vs re-running the whole sequence (issue 2 targets). Prints a table.

    python benchmarks/model_speed.py               # glm-base shape, batch 4 x 512, and a small config
    python benchmarks/model_speed.py --quick       # fewer repetitions
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from openglm import GLMConfig, GLMModel

# Reference points measured on the 2-core CPU machine class this project is developed on (issue 2).
OFFICIAL_TRAIN_FP32 = 116.0
OFFICIAL_DECODE = 4.6
TARGET_TRAIN_BF16 = 350.0
TARGET_DECODE = {1: 23.0, 8: 90.0}


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def pretraining_batch(
    cfg: GLMConfig, batch: int, length: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """A token-mode-like layout: Part A of `length` tokens, Part B of ~15% plus one sop per span."""
    part_b = int(length * 0.15) + length // 20
    total = length + part_b
    ids = torch.randint(0, cfg.vocab_size, (batch, total), generator=generator)
    pos = torch.arange(total).expand(batch, total).clone()
    block = torch.zeros(batch, total, dtype=torch.long)
    block[:, length:] = torch.arange(1, part_b + 1) % 4 + 1
    loss_mask = torch.zeros(batch, total)
    loss_mask[:, length:] = 1.0
    return {
        "input_ids": ids,
        "position_ids": torch.stack([pos.clamp(max=cfg.max_sequence_length - 1), block], dim=1),
        "sep": torch.full((batch,), length),
        "targets": torch.randint(0, cfg.vocab_size, (batch, total), generator=generator),
        "loss_mask": loss_mask,
    }


def train_step(
    model: GLMModel, opt: torch.optim.Optimizer, b: dict, bf16: bool, only_loss_logits: bool
) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        sel = b["loss_mask"] > 0 if only_loss_logits else None
        logits = model(b["input_ids"], b["position_ids"], b["sep"], logits_mask=sel).logits
    if sel is None:
        loss = (
            F.cross_entropy(logits.float().flatten(0, 1), b["targets"].flatten(), reduction="none")
            * b["loss_mask"].flatten()
        ).sum()
        loss = loss / b["loss_mask"].sum()
    else:
        loss = F.cross_entropy(logits.float(), b["targets"][sel])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def train_throughput(
    cfg: GLMConfig, batch: int, length: int, bf16: bool, only_loss_logits: bool, steps: int
) -> float:
    torch.manual_seed(0)
    model = GLMModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=False, foreach=True)
    b = pretraining_batch(cfg, batch, length, torch.Generator().manual_seed(0))
    train_step(model, opt, b, bf16, only_loss_logits)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, opt, b, bf16, only_loss_logits)
    return b["input_ids"].numel() * steps / (time.perf_counter() - start)


@torch.no_grad()
def decode_throughput(
    cfg: GLMConfig, batch: int, context: int, new: int, cached: bool, dtype: torch.dtype
) -> float:
    torch.manual_seed(0)
    model = GLMModel(cfg).eval().to(dtype)
    ids = torch.randint(0, cfg.vocab_size, (batch, context))
    pos = torch.stack(
        [torch.arange(context).expand(batch, context), torch.zeros(batch, context, dtype=torch.long)], 1
    )
    step_pos = lambda k: torch.tensor([[context - 1], [k + 1]]).expand(batch, 2, 1)  # noqa: E731
    start = time.perf_counter()
    if cached:
        out = model(ids, pos, context, use_cache=True)
        cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for k in range(new):
            out = model(token, step_pos(k), 0, cache=cache)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        return batch * new / (time.perf_counter() - t0)
    seq, seq_pos = ids, pos
    for k in range(new):
        logits = model(seq, seq_pos, context).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        seq, seq_pos = torch.cat([seq, token], 1), torch.cat([seq_pos, step_pos(k)], 2)
    return batch * new / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (noisier numbers)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = 1 if args.quick else 3
    new_tokens = 8 if args.quick else 32

    fp32_peak = matmul_peak(torch.float32)
    bf16_peak = matmul_peak(torch.bfloat16, n=512, reps=2)
    # CPUs without native bf16 (AVX2 only) emulate it ~100x slower than fp32: bf16 rows would take hours there.
    native_bf16 = bf16_peak > 0.25 * fp32_peak
    if native_bf16:
        bf16_peak = matmul_peak(torch.bfloat16)
    print(
        f"threads={torch.get_num_threads()}  cpu={torch.backends.cpu.get_cpu_capability()}  matmul peak: "
        f"fp32 {fp32_peak:.0f} GFLOP/s, bf16 {bf16_peak:.1f} GFLOP/s"
        + ("" if native_bf16 else "  (no native bf16 on this CPU: bf16 rows skipped)")
        + "\n"
    )

    base, small = GLMConfig.from_name("glm-base"), GLMConfig.from_name("small")
    rows = []
    for name, cfg, batch, length in (("glm-base", base, 4, 512), ("small", small, 8, 256)):
        modes = [("fp32", False, False), ("fp32 + loss-only logits", False, True)]
        if native_bf16:
            modes += [("bf16 autocast", True, False), ("bf16 + loss-only logits", True, True)]
        for label, bf16, sel in modes:
            tps = train_throughput(cfg, batch, length, bf16, sel, steps)
            peak = bf16_peak if bf16 else fp32_peak
            target = f">= {TARGET_TRAIN_BF16:.0f}" if name == "glm-base" and bf16 else ""
            ratio = f"{tps / OFFICIAL_TRAIN_FP32:.2f}x" if name == "glm-base" else ""
            rows.append(
                (
                    f"train {name} {batch}x{length}",
                    label,
                    f"{tps:.0f} tok/s",
                    f"{tps / peak:.2f}",
                    target,
                    ratio,
                )
            )
    for batch in (1, 8):
        full = decode_throughput(base, batch, 512, max(2, new_tokens // 4), cached=False, dtype=torch.float32)
        for dtype in (torch.float32, torch.bfloat16) if native_bf16 else (torch.float32,):
            tps = decode_throughput(base, batch, 512, new_tokens, cached=True, dtype=dtype)
            label = f"kv cache {str(dtype).split('.')[-1]} ({tps / full:.1f}x full recompute)"
            rows.append(
                (
                    f"decode glm-base b={batch} ctx=512",
                    label,
                    f"{tps:.1f} tok/s",
                    "",
                    f">= {TARGET_DECODE[batch]:.0f}",
                    f"{tps / OFFICIAL_DECODE:.1f}x",
                )
            )
        rows.append(
            (f"decode glm-base b={batch} ctx=512", "full recompute fp32", f"{full:.1f} tok/s", "", "", "")
        )

    header = ("case", "mode", "throughput", "tok/s per GFLOP/s", "target", "vs official")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))


if __name__ == "__main__":
    main()
