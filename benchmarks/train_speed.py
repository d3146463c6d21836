"""Training throughput of `openglm.train.fit` on synthetic blank-infilling batches (tokens/s per setup).

python benchmarks/train_speed.py --preset small --seq 128 --batch 16 --steps 10
python benchmarks/train_speed.py --preset glm-large --device cuda --precision bf16 fp32 --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from openglm import GLMConfig, GLMModel
from openglm.train.loop import fit
from openglm.train.settings import OptimSettings, TrainSettings
from openglm.train.synthetic import SyntheticBatches


def measure(preset: str, seq: int, batch: int, steps: int, precision: str, device: str, ckpt: bool) -> dict:
    config = GLMConfig.from_name(preset, max_sequence_length=max(seq, 8))
    torch.manual_seed(0)
    model = GLMModel(config)
    data = SyntheticBatches(config.vocab_size, seq, batch, seed=0)
    settings = TrainSettings(
        max_steps=steps + 2, precision=precision, device=device, activation_checkpointing=ckpt,
        progress=False, tensorboard=False,
    )  # fmt: skip
    times: list[float] = []
    last = [time.perf_counter()]

    def timed(batch_iter):
        for b in batch_iter:
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now
            yield b

    fit(model, timed(iter(data)), settings, OptimSettings(lr=1e-4, warmup=0.0))
    per_step = statistics.median(times[3:]) if len(times) > 3 else statistics.median(times)
    return {"tokens_per_s": batch * seq / per_step, "s_per_step": per_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    args = parser.parse_args()
    print(f"{args.preset}, {args.batch} x {args.seq} tokens per step on {args.device}")
    print(f"{'precision':<10}{'act. ckpt':<11}{'s/step':>9}{'tokens/s':>12}")
    for precision in args.precision:
        for ckpt in (False, True):
            r = measure(args.preset, args.seq, args.batch, args.steps, precision, args.device, ckpt)
            print(
                f"{precision:<10}{'on' if ckpt else 'off':<11}{r['s_per_step']:>9.3f}{r['tokens_per_s']:>12,.0f}"
            )


if __name__ == "__main__":
    main()
