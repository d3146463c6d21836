"""The training loop: schedule, parameter groups, learning, exact resume (in process and after kill -9)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from openglm import GLMConfig, GLMModel
from openglm.train.checkpoint import checkpoint_dirs
from openglm.train.loop import evaluate_loss, fit, glm_loss
from openglm.train.optim import lr_at, param_groups
from openglm.train.settings import OptimSettings, TrainSettings
from openglm.train.synthetic import SyntheticBatches

ROOT = Path(__file__).resolve().parents[1]
TINY = GLMConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=128, max_sequence_length=32)


def _settings(**kw) -> TrainSettings:
    base = dict(max_steps=6, micro_batch_size=4, progress=False, tensorboard=False, device="cpu")
    base.update(kw)
    return TrainSettings(**base)


def _model(seed: int = 0, config: GLMConfig = TINY) -> GLMModel:
    torch.manual_seed(seed)
    return GLMModel(config)


def _losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


def test_official_schedule_values():
    cos = OptimSettings(lr=1.0, schedule="cosine", warmup=0.1, lr_decay_iters=100, lr_decay_ratio=0.1)
    assert lr_at(0, cos, 1000) == 0.0  # the official first update runs at lr 0
    assert lr_at(5, cos, 1000) == pytest.approx(0.5)
    assert lr_at(10, cos, 1000) == pytest.approx(1.0)
    assert lr_at(55, cos, 1000) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert lr_at(100, cos, 1000) == pytest.approx(0.1)
    assert lr_at(500, cos, 1000) == pytest.approx(0.1)  # cosine stays at r x peak
    lin = OptimSettings(lr=1.0, schedule="linear", warmup=0.0, lr_decay_iters=100, lr_decay_ratio=0.1)
    assert lr_at(100, lin, 1000) == pytest.approx(0.1)
    assert lr_at(110, lin, 1000) == pytest.approx(0.1 - 0.9 * 0.1)  # unclamped: keeps falling past D
    assert lr_at(10_000, lin, 1000) == 0.0
    # D defaults to max_steps and warmup is a fraction of D.
    default = OptimSettings(lr=2.0, warmup=0.5)
    assert lr_at(10, default, 40) == pytest.approx(1.0)


def test_no_weight_decay_on_layernorm_and_biases():
    model = _model()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith("bias") or "layernorm" in n for n in (names[id(p)] for p in no_decay["params"]))
    assert "word_embeddings.weight" in {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_settings_validation_names_the_field():
    with pytest.raises(ValueError, match="train.grad_accum"):
        TrainSettings(grad_accum=0)
    with pytest.raises(ValueError, match="optim.schedule"):
        OptimSettings(schedule="step")
    with pytest.raises(ValueError, match="fp16"):
        fit(_model(), SyntheticBatches(128, 16, 2), _settings(precision="fp16"))


def test_zero_learning_rate_keeps_the_initial_weights():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="optim.lr=-0.1 must be >= 0"):
        OptimSettings(lr=-0.1)
    fit(
        model, SyntheticBatches(TINY.vocab_size, 24, 4, seed=3), _settings(max_steps=3), OptimSettings(lr=0.0)
    )
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_loss_falls_on_a_repeated_batch():
    batch = SyntheticBatches(TINY.vocab_size, 24, 4, seed=3).batch(0)
    result = fit(_model(), [batch], _settings(max_steps=30), OptimSettings(lr=1e-2, warmup=0.0))
    first, last = result.losses[0][1], result.losses[-1][1]
    assert math.isfinite(last) and last < 0.5 * first


def test_bf16_autocast_trains_like_fp32_with_fp32_weights():
    """precision bf16 on CPU: the forward runs under bf16 autocast, the weights and optimizer stay fp32, the
    first loss is the fp32 loss to bf16 accuracy, and the loss falls as in fp32."""
    cfg = TINY.replace(embedding_dropout_prob=0.0, attention_dropout_prob=0.0, output_dropout_prob=0.0)
    batch = SyntheticBatches(cfg.vocab_size, 24, 4, seed=3).batch(0)
    optim = OptimSettings(lr=1e-2, warmup=0.0)
    runs = {}
    for precision in ("fp32", "bf16"):
        model = _model(0, cfg)
        runs[precision] = fit(model, [batch], _settings(max_steps=30, precision=precision), optim)
        assert all(p.dtype == torch.float32 for p in model.parameters())
    fp32, bf16 = ([loss for _, loss in runs[k].losses] for k in ("fp32", "bf16"))
    assert bf16[0] != fp32[0] and bf16[0] == pytest.approx(fp32[0], rel=2e-2)  # autocast did run in bf16
    assert math.isfinite(bf16[-1]) and bf16[-1] < 0.5 * bf16[0]
    assert bf16[-1] == pytest.approx(fp32[-1], rel=0.25)


def test_grad_accumulation_equals_one_big_batch():
    cfg = TINY.replace(embedding_dropout_prob=0.0, attention_dropout_prob=0.0, output_dropout_prob=0.0)
    big = SyntheticBatches(cfg.vocab_size, 24, 4, seed=5)
    halves = [SyntheticBatches(cfg.vocab_size, 24, 2, seed=5, rank=r, world_size=2) for r in (0, 1)]

    def interleaved():
        for i in range(3):
            yield halves[0].batch(i)
            yield halves[1].batch(i)

    a = fit(_model(1, cfg), big, _settings(max_steps=3))
    b = fit(_model(1, cfg), list(interleaved()), _settings(max_steps=3, grad_accum=2))
    for (_, x), (_, y) in zip(a.losses, b.losses, strict=True):
        assert x == pytest.approx(y, abs=1e-5)


class _NoState:
    """A deterministic re-iterable source without state_dict: resume must skip consumed batches."""

    def __init__(self) -> None:
        self.inner = SyntheticBatches(TINY.vocab_size, 24, 2, seed=9)

    def __iter__(self):
        for i in range(1000):
            yield self.inner.batch(i)


@pytest.mark.parametrize("stateful", [True, False])
def test_resume_in_process_is_bit_identical(tmp_path, stateful):
    def source():
        return SyntheticBatches(TINY.vocab_size, 24, 2, seed=9) if stateful else _NoState()

    optim = OptimSettings(lr=5e-3, warmup=0.2, lr_decay_iters=6)
    full = fit(_model(), source(), _settings(grad_accum=2), optim, run_dir=tmp_path / "full")
    part = tmp_path / "part"
    fit(_model(), source(), _settings(grad_accum=2, max_steps=4, save_every=2), optim, run_dir=part)
    assert [p.name for p in checkpoint_dirs(part)] == ["step-00000002", "step-00000004"]
    rest = fit(_model(seed=123), source(), _settings(grad_accum=2), optim, run_dir=part, resume=True)
    assert [s for s, _ in rest.losses] == [5, 6]
    assert _losses(part) == _losses(tmp_path / "full") == [x for _, x in full.losses]


def test_ctrl_c_saves_a_checkpoint_and_stops(tmp_path):
    calls = []

    def interrupted_loss(model, batch):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during step 3
        return glm_loss(model, batch)

    source = SyntheticBatches(TINY.vocab_size, 24, 2, seed=9)
    with pytest.raises(KeyboardInterrupt):
        fit(_model(), source, _settings(max_steps=10), run_dir=tmp_path, loss_fn=interrupted_loss)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000003"]
    assert len(_losses(tmp_path)) == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored
    rest = fit(
        _model(),
        SyntheticBatches(TINY.vocab_size, 24, 2, seed=9),
        _settings(max_steps=5),
        run_dir=tmp_path,
        resume=True,
    )
    assert [s for s, _ in rest.losses] == [4, 5]


def test_max_minutes_stops_with_a_checkpoint(tmp_path):
    result = fit(
        _model(),
        SyntheticBatches(TINY.vocab_size, 24, 2),
        _settings(max_steps=50, max_minutes=1e-9),
        run_dir=tmp_path,
    )
    assert result.step == 1 and [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000001"]


def test_activation_checkpointing_gives_identical_losses():
    source = SyntheticBatches(TINY.vocab_size, 24, 2, seed=1)
    plain = fit(_model(), source, _settings(max_steps=3))
    source = SyntheticBatches(TINY.vocab_size, 24, 2, seed=1)
    checkpointed = fit(_model(), source, _settings(max_steps=3, activation_checkpointing=True))
    assert checkpointed.losses == plain.losses  # recomputation replays the dropout RNG too


@pytest.mark.slow
def test_compiled_blocks_train_like_eager():
    cfg = TINY.replace(embedding_dropout_prob=0.0, attention_dropout_prob=0.0, output_dropout_prob=0.0)
    eager = fit(_model(0, cfg), SyntheticBatches(cfg.vocab_size, 24, 2, seed=1), _settings(max_steps=3))
    compiled = fit(
        _model(0, cfg), SyntheticBatches(cfg.vocab_size, 24, 2, seed=1), _settings(max_steps=3, compile=True)
    )
    for (_, x), (_, y) in zip(eager.losses, compiled.losses, strict=True):
        assert x == pytest.approx(y, abs=1e-4)


def test_evaluate_loss_per_objective():
    model = _model().eval()
    token = SyntheticBatches(TINY.vocab_size, 24, 2, seed=1, mode="token")
    doc = SyntheticBatches(TINY.vocab_size, 24, 2, seed=2, mode="document")
    batches = [token.batch(0), doc.batch(0), token.batch(1)]
    out = evaluate_loss(model, batches)
    assert set(out) == {"val_loss", "val_loss/token", "val_loss/document"}
    with torch.no_grad():
        s, w = glm_loss(model, batches[1])
    assert out["val_loss/document"] == pytest.approx(float(s / w), rel=1e-6)


_RUN = textwrap.dedent(
    """
    import sys, torch
    from openglm import GLMConfig, GLMModel
    from openglm.train.loop import fit
    from openglm.train.settings import OptimSettings, TrainSettings
    from openglm.train.synthetic import SyntheticBatches

    def run(run_dir, resume):
        torch.manual_seed(0)
        cfg = GLMConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=128, max_sequence_length=32)
        settings = TrainSettings(max_steps=16, micro_batch_size=2, grad_accum=2, save_every=1, keep_last=2,
                                 progress=False, tensorboard=False, device="cpu")
        fit(GLMModel(cfg), SyntheticBatches(cfg.vocab_size, 24, 2, seed=4), settings,
            OptimSettings(lr=5e-3, warmup=0.1), run_dir=run_dir, resume=resume)

    if __name__ == "__main__":
        torch.set_num_threads(1)
        run(sys.argv[1], sys.argv[2] == "1")
    """
)


def _spawn(run_dir: Path, resume: bool) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    return subprocess.Popen(
        [sys.executable, "-c", _RUN, str(run_dir), "1" if resume else "0"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_kill_9_then_resume_is_bit_identical(tmp_path):
    killed = tmp_path / "killed"
    proc = _spawn(killed, resume=False)
    namespace: dict = {"__name__": "reference"}
    exec(_RUN, namespace)
    namespace["run"](tmp_path / "reference", False)  # the uninterrupted run, in this process meanwhile
    deadline = time.time() + 120
    metrics = killed / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(_losses(killed)) < 16
    namespace["run"](killed, True)  # resume here: same code, same thread count, one process start saved
    assert _losses(killed) == _losses(tmp_path / "reference")
    assert len(checkpoint_dirs(killed)) == 2


def test_a_small_glm_learns_to_fill_blanks_from_their_context():
    """End to end (objective, batches, model, loss): on documents that are arithmetic progressions, the first token
    of a blank is fixed by the tokens around its [MASK] in Part A and nowhere else, so predicting it means reading
    Part A at the right 2-D positions. Chance is about 1 %; a model that ignores the context stays near it."""
    import numpy as np

    from openglm.blank_infilling import ObjectiveConfig, SpecialTokens
    from openglm.data import PretrainingBatches
    from openglm.data.shards import InMemoryCorpus

    rng = np.random.default_rng(0)
    docs = []
    for _ in range(2000):
        start, step, length = int(rng.integers(0, 100)), int(rng.integers(1, 3)), int(rng.integers(10, 40))
        docs.append(np.array([10 + (start + step * i) % 100 for i in range(length)], dtype=np.int64))
    special = SpecialTokens(eos=1, cls=2, mask=3, sop=4, eop=5, smask=6, gmask=7)
    objective = ObjectiveConfig(bert_prob=1.0, task_mask=True)

    def batches(seed: int) -> PretrainingBatches:
        return PretrainingBatches(
            InMemoryCorpus(docs), special, objective, seq_length=32, batch_size=16, seed=seed
        )

    def tensors(batch: dict) -> dict:
        return {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}

    torch.manual_seed(0)
    config = GLMConfig.from_name("tiny", vocab_size=128, max_sequence_length=32).replace(
        embedding_dropout_prob=0.0, attention_dropout_prob=0.0, output_dropout_prob=0.0
    )
    model = GLMModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    train, held_out = batches(0), [tensors(batches(1).batch(i)) for i in range(4)]

    def first_token_accuracy() -> float:
        hits = total = 0
        with torch.no_grad():
            for b in held_out:
                first = (b["input_ids"] == special.sop) & (b["loss_mask"] > 0)
                logits = model(
                    b["input_ids"], b["position_ids"], attention_mask=b["sep"], logits_mask=first
                ).logits
                hits += int((logits.argmax(-1) == b["targets"][first]).sum())
                total += int(first.sum())
        return hits / total

    accuracy = first_token_accuracy()
    for step in range(2500):
        loss_sum, weight = glm_loss(model, tensors(train.batch(step)))
        optimizer.zero_grad()
        (loss_sum / weight).backward()
        optimizer.step()
        if step % 250 == 249:
            accuracy = first_token_accuracy()
            if accuracy >= 0.8:
                break
    assert accuracy >= 0.8, f"first-token accuracy {accuracy:.2f} after {step + 1} steps"


def _damage(path: Path, how: str) -> None:
    if how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"not a checkpoint" * 10)


@pytest.mark.parametrize(
    "name, how",
    [
        ("model.safetensors", "truncate"),
        ("optimizer.pt", "empty"),
        ("trainer.pt", "garbage"),
        ("trainer.pt", "empty"),
    ],
)
def test_a_damaged_checkpoint_fails_the_resume_in_one_line_naming_the_file(tmp_path, name, how):
    from openglm.train.checkpoint import verify_checkpoint

    source = SyntheticBatches(TINY.vocab_size, 24, 2, seed=9)
    fit(_model(), source, _settings(max_steps=2), run_dir=tmp_path)
    (checkpoint,) = checkpoint_dirs(tmp_path)
    _damage(checkpoint / name, how)
    metrics = (tmp_path / "metrics.jsonl").read_bytes()
    for attempt in (
        lambda: verify_checkpoint(checkpoint, TINY),
        lambda: fit(_model(), source, _settings(max_steps=4), run_dir=tmp_path, resume=True),
    ):
        with pytest.raises(ValueError, match=f"{name}: damaged checkpoint file") as err:
            attempt()
        assert "\n" not in str(err.value)
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics  # the failed resume changed nothing


def test_resuming_with_another_architecture_says_which_field_differs(tmp_path):
    from openglm.train.checkpoint import verify_checkpoint

    source = SyntheticBatches(TINY.vocab_size, 24, 2, seed=9)
    fit(_model(), source, _settings(max_steps=2), run_dir=tmp_path)
    wider = TINY.replace(hidden_size=64)
    with pytest.raises(ValueError, match=r"architecture differs .*hidden_size 32 vs 64") as err:
        fit(_model(config=wider), source, _settings(max_steps=4), run_dir=tmp_path, resume=True)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="hidden_size 32 vs 64"):
        verify_checkpoint(checkpoint_dirs(tmp_path)[0], wider)
    verify_checkpoint(checkpoint_dirs(tmp_path)[0], TINY.replace(output_dropout_prob=0.0))  # run-time knob


def test_keep_last_never_deletes_the_checkpoint_just_written(tmp_path):
    source = SyntheticBatches(TINY.vocab_size, 24, 2, seed=9)
    fit(_model(), source, _settings(max_steps=4, save_every=2), run_dir=tmp_path)
    # A new run in the same folder: its step-1 sorts before the old step-2 and step-4.
    result = fit(_model(), source, _settings(max_steps=1, keep_last=2), run_dir=tmp_path)
    assert result.checkpoint.name == "step-00000001" and (result.checkpoint / "config.json").is_file()
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000001", "step-00000004"]


def test_resume_drops_a_torn_last_metrics_line_and_names_a_bad_one(tmp_path):
    source = SyntheticBatches(TINY.vocab_size, 24, 2, seed=9)
    fit(_model(), source, _settings(max_steps=2), run_dir=tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good + '{"step": 3, "lo')  # killed while writing step 3's line
    fit(_model(), source, _settings(max_steps=3), run_dir=tmp_path, resume=True)
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2, 3]
    metrics.write_text("[1]\n" + good)
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: not a metrics row"):
        fit(_model(), source, _settings(max_steps=4), run_dir=tmp_path, resume=True)
    assert metrics.read_text() == "[1]\n" + good


def test_an_empty_loss_mask_suggests_the_corpus_is_too_small():
    batch = dict(SyntheticBatches(TINY.vocab_size, 24, 2, seed=1).batch(0))
    batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])
    with pytest.raises(ValueError, match="step 0: .*corpus too small.*sequence length"):
        fit(_model(), [batch], _settings(max_steps=1))


def test_eval_every_zero_validates_only_at_the_end_as_documented():
    calls = []

    def eval_fn(model):
        calls.append(1)
        return {"val_loss": 1.0}

    source = SyntheticBatches(TINY.vocab_size, 24, 2, seed=1)
    fit(_model(), source, _settings(max_steps=3, eval_every=0), eval_fn=eval_fn)
    assert len(calls) == 1
    fit(_model(), source, _settings(max_steps=3, eval_every=2), eval_fn=eval_fn)
    assert len(calls) == 3  # step 2 and the end
    doc = " ".join(TrainSettings.__doc__.split())
    assert "so 0 means only at the end" in doc and "0 disables it" not in doc
