"""Distributed training on CPU with gloo: 2 ranks (DDP and FSDP2) match 1 process on the same global batch,
checkpoints gather FSDP2 shards, and a rank that dies makes the other fail instead of hanging."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from openglm import parallel
from openglm.parallel import DistEnv, resolve_strategy, wrap_model

ROOT = Path(__file__).resolve().parents[1]

_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from openglm import GLMConfig, GLMModel, parallel
    from openglm.train.loop import evaluate_loss, fit
    from openglm.train.settings import OptimSettings, TrainSettings
    from openglm.train.synthetic import SyntheticBatches

    CFG = GLMConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=128, max_sequence_length=32,
                    embedding_dropout_prob=0.0, attention_dropout_prob=0.0, output_dropout_prob=0.0)
    STEPS = 3

    def model():
        torch.manual_seed(0)
        return GLMModel(CFG)

    def run(world_size, rank, strategy, env=None, run_dir=None, loss_fn=None):
        data = SyntheticBatches(CFG.vocab_size, 24, 4 // world_size, seed=7, rank=rank, world_size=world_size)
        held = SyntheticBatches(CFG.vocab_size, 24, 4 // world_size, seed=8, rank=rank, world_size=world_size)
        valid = [held.batch(i) for i in range(2)]
        settings = TrainSettings(max_steps=STEPS, strategy=strategy, progress=False, tensorboard=False, device="cpu",
                                 timeout_s=30)
        kwargs = {} if loss_fn is None else {"loss_fn": loss_fn}
        result = fit(model(), data, settings, OptimSettings(lr=1e-2, warmup=0.0), run_dir=run_dir, env=env,
                     eval_fn=lambda m: evaluate_loss(m, valid), **kwargs)
        return {"losses": [x for _, x in result.losses], "eval": result.eval}

    if __name__ == "__main__":
        torch.set_num_threads(1)
        out = sys.argv[1]
        env = parallel.init_distributed("cpu", timeout_s=30)
        results = {"ddp": run(2, env.rank, "ddp", env),
                   "fsdp": run(2, env.rank, "fsdp", env, run_dir=os.path.join(out, "fsdp-run"))}
        if env.rank == 0:
            with open(os.path.join(out, "results.json"), "w") as f:
                json.dump(results, f)
        from openglm.train.loop import glm_loss

        def dying_loss(m, batch, calls=[0]):
            calls[0] += 1
            if env.rank == 1 and calls[0] == 2:
                os._exit(3)  # a crash: no teardown, no message to the other rank
            return glm_loss(m, batch)

        run(2, env.rank, "ddp", env, loss_fn=dying_loss)
        parallel.teardown()
        sys.exit(0)  # rank 0 must not get here: its peer died in the middle of step 2
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process_and_a_dead_rank_fails_the_other(tmp_path):
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(ROOT / "src"),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _WORKER, str(tmp_path)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        )
    namespace: dict = {"__name__": "reference"}
    exec(_WORKER, namespace)
    single = namespace["run"](1, 0, "none")  # the same global batch in this process, meanwhile
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    errors = [p.stderr.read().decode(errors="replace") for p in procs]
    assert codes[1] == 3, errors[1]
    assert codes[0] != 0, "rank 0 carried on although rank 1 died"
    results = json.loads((tmp_path / "results.json").read_text())
    for strategy in ("ddp", "fsdp"):
        assert results[strategy]["losses"] == pytest.approx(single["losses"], abs=1e-5), strategy
        for key, value in single["eval"].items():
            assert results[strategy]["eval"][key] == pytest.approx(value, abs=1e-5), (strategy, key)
    # The FSDP2 checkpoint holds the full (gathered) weights: they load into a plain model.
    from openglm import GLMModel
    from openglm.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(tmp_path / "fsdp-run")
    assert ckpt is not None and ckpt.name == "step-00000003"
    loaded = GLMModel.from_pretrained(ckpt)
    assert sum(p.numel() for p in loaded.parameters()) == loaded.config.num_parameters()


def test_single_process_strategies():
    env = DistEnv()
    assert resolve_strategy("auto", env) == "none"
    assert resolve_strategy("auto", DistEnv(world_size=2)) == "ddp"
    with pytest.raises(ValueError, match="strategy"):
        resolve_strategy("zero3", env)
    from openglm import GLMConfig, GLMModel

    model = GLMModel(
        GLMConfig(num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=128, max_sequence_length=16)
    )
    keys = set(model.state_dict())
    wrapped = wrap_model(model, env, "fsdp", activation_checkpointing=True)
    assert wrapped is model and set(model.state_dict()) == keys  # checkpointing keeps the parameter names
    ids = torch.randint(0, 128, (2, 8))
    pos = torch.stack([torch.arange(8).expand(2, 8), torch.zeros(2, 8, dtype=torch.long)], 1)
    model(ids, pos, attention_mask=torch.tensor([4, 4])).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


_FINETUNE_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import openglm.tasks.run as run
    from openglm.tasks import FinetuneSettings, TaskData, finetune

    torch.set_num_threads(1)
    task, model, out = sys.argv[1:4]
    extra = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {"data": {}, "train": {}}
    rows, scores = [], run.batch_scores

    def counting(m, batch, *args):
        if m.training:
            rows.append(int(batch["labels"].size(0)))
        return scores(m, batch, *args)

    run.batch_scores = counting
    settings = FinetuneSettings(max_steps=4, batch_size=8, lr=3e-3, warmup=0.0, eval_every=2, progress=False,
                                device="cpu", seed=1, **extra["train"])
    finetune(task=task, model=model, out_dir=out, data=TaskData(**extra["data"]), train=settings)
    with open(os.path.join(out, f"rows-{os.environ['RANK']}.json"), "w") as f:
        json.dump(rows, f)
    """
)


def test_rank_shard_splits_rows_and_skips_batches_too_small_to_share():
    from openglm.tasks.finetuning import RankShard

    class Source:
        def __iter__(self):
            yield {
                "input_ids": torch.arange(8).view(4, 2),
                "labels": torch.arange(4),
                "mode": "cloze",
                "n": torch.tensor(4),
            }
            yield {"input_ids": torch.zeros(1, 2), "labels": torch.zeros(1)}  # fewer rows than ranks
            yield {"input_ids": torch.arange(6).view(3, 2), "labels": torch.arange(3)}

        def __len__(self):
            return 3

        def state_dict(self):
            return {"position": 7}

    shard = RankShard(Source(), rank=1, world_size=2)
    first, last = list(shard)
    assert first["input_ids"].tolist() == [[2, 3], [6, 7]] and first["labels"].tolist() == [1, 3]
    assert first["mode"] == "cloze" and first["n"].item() == 4  # not per-row: passed unchanged
    assert last["labels"].tolist() == [1]
    assert len(shard) == 3 and shard.state_dict() == {"position": 7}


@pytest.mark.parametrize(
    "extra",
    [
        {"data": {}, "train": {}},
        # P-tuning with block-LM steps, whose batches have no prompts: DDP still needs a gradient for the
        # prompt encoder at every step.
        {"data": {"prompt_tokens": 2, "prompt_encoder": "mlp"}, "train": {"block_lm_ratio": 3.0}},
    ],
    ids=["cloze", "ptuning_block_lm"],
)
def test_two_gloo_ranks_finetune_like_one_process(tmp_path, extra):
    """Cloze fine-tuning under torchrun: each rank trains on half of every batch (DDP), rank 0 keeps the best model
    and writes the report; losses, dev scores and kept weights equal a single process on the same batches."""
    from safetensors.torch import load_file
    from tests.test_tasks_run import CLOZE_YAML, WORDS, _task_yaml, _write_data

    from openglm import GLMConfig, GLMModel
    from openglm.tasks import FinetuneSettings, TaskData, finetune
    from openglm.tokenizer import GLMTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "?", *WORDS]
    vocab += [*"abcdefghijklmnopqrstuvwxyz", *("##" + c for c in "abcdefghijklmnopqrstuvwxyz")]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    config = GLMConfig.from_name("tiny", vocab_size=128, max_sequence_length=64).replace(
        embedding_dropout_prob=0.0, attention_dropout_prob=0.0, output_dropout_prob=0.0
    )
    GLMModel(config).save_pretrained(tmp_path / "model")
    GLMTokenizer.from_files("bert", tmp_path / "vocab.txt").save_pretrained(tmp_path / "model")
    _write_data(tmp_path / "data")
    task = str(_task_yaml(tmp_path, CLOZE_YAML))

    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(ROOT / "src"),
        )
        args = [sys.executable, "-c", _FINETUNE_WORKER, task, str(tmp_path / "model"), str(tmp_path / "ddp")]
        args.append(json.dumps(extra))
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    settings = FinetuneSettings(
        max_steps=4, batch_size=8, lr=3e-3, warmup=0.0, eval_every=2, progress=False, device="cpu", seed=1,
        **extra["train"],
    )  # fmt: skip
    single = finetune(
        task=task,
        model=str(tmp_path / "model"),
        out_dir=str(tmp_path / "one"),
        data=TaskData(**extra["data"]),
        train=settings,
    )
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    errors = [p.stderr.read().decode(errors="replace")[-3000:] for p in procs]
    assert codes == [0, 0], errors
    for rank in (0, 1):  # each rank trained on half of every cloze batch of 8
        rows = json.loads((tmp_path / "ddp" / f"rows-{rank}.json").read_text())
        if extra["train"].get("block_lm_ratio"):
            assert set(rows) == {4} and 0 < len(rows) < 4  # the other steps were block-LM batches
        else:
            assert rows == [4, 4, 4, 4]
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp["steps"] == single["steps"] == 4 and ddp["best_step"] == single["best_step"]
    assert ddp["dev"] == pytest.approx(single["dev"], abs=1e-6)

    def losses(run: str) -> list[float]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines if '"loss"' in line]

    assert losses("ddp") == pytest.approx(losses("one"), abs=1e-5)
    kept_ddp = load_file(str(tmp_path / "ddp" / "best" / "model.safetensors"))
    kept_one = load_file(str(tmp_path / "one" / "best" / "model.safetensors"))
    # Adam divides by the root of the squared gradient, so float reordering in a near-zero gradient
    # can move one weight by a sizeable part of lr (3e-3); a wrong gradient moves many by about lr.
    for key, value in kept_one.items():
        torch.testing.assert_close(kept_ddp[key], value, rtol=1e-4, atol=1e-4)


_EVAL_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import openglm.generate as generate
    import openglm.tasks.lm_eval as lm_eval
    import openglm.tasks.run as run
    from openglm.tasks import TaskData, evaluate

    torch.set_num_threads(1)
    root, model, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    rows = {"cloze": 0, "lm": 0, "decode": 0}
    scores, log_probs, fill = run.batch_scores, lm_eval.token_log_probs, generate.fill_blank_ids

    def counted(key, fn, n):
        def wrapper(*args, **kwargs):
            rows[key] += n(args)
            return fn(*args, **kwargs)
        return wrapper

    run.batch_scores = counted("cloze", scores, lambda a: int(a[1]["input_ids"].size(0)))
    lm_eval.token_log_probs = counted("lm", log_probs, lambda a: int(a[1]["input_ids"].size(0)))
    generate.fill_blank_ids = counted("decode", fill, lambda a: len(a[1]))
    world = os.environ.get("WORLD_SIZE", "1")
    results = {
        name: evaluate(task=task, model=model, data=TaskData(**data), device="cpu", progress=False,
                       batch_size=2, output=os.path.join(root, f"{name}-{world}.json"))
        for name, (task, data) in cases.items()
    }
    with open(os.path.join(root, f"eval-{world}-{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump({"results": results, "rows": rows}, f)
    """
)


def test_two_gloo_ranks_evaluate_each_half_and_agree_with_one_process(tmp_path):
    """`openglm eval` under torchrun: each rank scores (or decodes) its share of the examples of every task
    kind, and every rank returns the metrics of one process on all of them; rank 0 alone writes `output`."""
    from tests.test_tasks_run import CLOZE_YAML, WORDS, _task_yaml, _write_data

    from openglm import GLMConfig, GLMModel
    from openglm.tokenizer import GLMTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "?", *WORDS]
    vocab += [*"abcdefghijklmnopqrstuvwxyz", *("##" + c for c in "abcdefghijklmnopqrstuvwxyz")]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    GLMModel(GLMConfig.from_name("tiny", vocab_size=128, max_sequence_length=64)).save_pretrained(
        tmp_path / "m"
    )
    GLMTokenizer.from_files("bert", tmp_path / "vocab.txt").save_pretrained(tmp_path / "m")
    _write_data(tmp_path / "data", n_dev=13)  # odd: the ranks get 7 and 6
    sentences = [f"the {WORDS[i]} was so {WORDS[i + 3]} and the plot was {WORDS[i + 5]}" for i in range(5)]
    (tmp_path / "lambada.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences))
    (tmp_path / "docs.txt").write_text("\n".join(sentences) + "\n")
    pairs = [{"source": s, "target": s.split()[1]} for s in sentences]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cases = {
        "cloze": [str(_task_yaml(tmp_path, CLOZE_YAML)), {}],
        "lambada": ["lambada", {"data_dir": str(tmp_path / "lambada.jsonl")}],
        "perplexity": ["perplexity", {"data_dir": str(tmp_path / "docs.txt"), "max_seq_length": 8}],
        "yahoo": ["yahoo", {"data_dir": str(tmp_path / "docs.txt"), "max_seq_length": 32}],
        "seq2seq": ["seq2seq", {"data_dir": str(tmp_path / "pairs.jsonl"), "max_seq_length": 32}],
    }
    args = [sys.executable, "-c", _EVAL_WORKER, str(tmp_path), str(tmp_path / "m"), json.dumps(cases)]
    port, procs = _free_port(), []
    for world, rank in ((2, 0), (2, 1), (1, 0)):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
        if world == 2:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
            env["MASTER_PORT"] = str(port)
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0, 0], [p.stderr.read().decode(errors="replace")[-3000:] for p in procs]
    one = json.loads((tmp_path / "eval-1-0.json").read_text())
    ranks = [json.loads((tmp_path / f"eval-2-{r}.json").read_text()) for r in (0, 1)]
    for name in cases:
        expected = one["results"][name]
        for rank in ranks:
            got = rank["results"][name]
            assert got.keys() == expected.keys(), name
            for key, value in expected.items():
                assert got[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-5)), key
        assert (tmp_path / f"{name}-2.json").is_file()
    assert one["results"]["perplexity"]["num_windows"] > 2  # the windows, not only the documents, are shared
    for key, total in one["rows"].items():
        assert total > 0 and sum(r["rows"][key] for r in ranks) == total, key
        assert all(r["rows"][key] < total for r in ranks), key  # each rank did only its share


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")
def test_unavailable_or_malformed_devices_are_one_line_errors() -> None:
    assert parallel.resolve_device("auto") == torch.device("cpu")
    assert parallel.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device 'cuda': CUDA is not available here"):
        parallel.resolve_device("cuda")
    with pytest.raises(ValueError, match="device 'cuda:1': CUDA is not available here"):
        parallel.init_distributed("cuda:1")
    with pytest.raises(ValueError, match="device 'gpu': not a device name"):
        parallel.resolve_device("gpu")
    with pytest.raises(ValueError, match="device 'meta': openglm runs on cpu, cuda or mps, not meta"):
        parallel.resolve_device("meta")
