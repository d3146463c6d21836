"""Pretraining recipes validate against `pretrain`'s signature; the CPU recipe runs end to end on real shards;
`openglm plot` draws a run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from openglm.train.demo import recipe_arguments, unigram_entropy
from openglm.train.pretrain import DataSettings, pretrain
from openglm.train.settings import OptimSettings, TrainSettings

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs" / "pretrain").glob("*.yaml"))


def test_the_official_recipes_are_there():
    names = {p.stem for p in RECIPES}
    assert {"tiny", "glm-base", "glm-large", "glm-large-chinese", "glm-10b"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates(recipe):
    from openglm.config import GLMConfig

    args = recipe_arguments(recipe)
    assert isinstance(args["train"], TrainSettings) and isinstance(args["optim"], OptimSettings)
    assert isinstance(args["data"], DataSettings) and args["data"].path
    config = GLMConfig.resolve(args["model"]).replace(**(args["model_overrides"] or {}))
    assert args["data"].seq_length <= config.max_sequence_length


def test_official_recipe_values():
    ten = recipe_arguments(ROOT / "configs/pretrain/glm-10b.yaml")
    assert (ten["optim"].lr, ten["optim"].beta2, ten["optim"].eps) == (1e-4, 0.95, 1e-8)
    assert (ten["optim"].lr_decay_iters, ten["optim"].warmup, ten["optim"].lr_decay_ratio) == (
        175000,
        0.04,
        0.1,
    )
    assert (ten["objective"].bert_prob, ten["objective"].gap_sentence_prob) == (0.5, 0.3)
    large = recipe_arguments(ROOT / "configs/pretrain/glm-large.yaml")
    assert (large["optim"].lr, large["train"].max_steps, large["optim"].lr_decay_iters) == (
        2e-4,
        200000,
        160000,
    )


def test_bad_override_names_the_field():
    with pytest.raises(ValueError):
        recipe_arguments(ROOT / "configs/pretrain/tiny.yaml", ["--train.grad_accum", "0"])
    with pytest.raises(ValueError, match="data.path"):
        pretrain(data=DataSettings())


_TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine.\n"
    "All that glitters is not gold. Fortune favours the bold. Brevity is the soul of wit.\n"
)


def test_tiny_recipe_runs_on_real_shards_and_plots(tmp_path):
    from openglm.data import prepare_corpus
    from openglm.tokenizer import train_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_TEXT * (i % 3 + 1) for i in range(40)))
    tok = train_tokenizer([str(corpus)], 300, str(tmp_path / "tok"), progress=False)
    prepare_corpus([str(corpus)], tok, str(tmp_path / "shards"), workers=0, progress=False)
    assert 0 < unigram_entropy(tmp_path / "shards") < math.log(300)  # below a uniform distribution
    overrides = ["--data.path", str(tmp_path / "shards"), "--out_dir", str(tmp_path / "run")]
    overrides += ["--train.max_steps", "3", "--train.micro_batch_size", "2", "--data.seq_length", "32"]
    overrides += ["--data.valid_batches", "1", "--data.valid_fraction", "0.1", "--train.eval_every", "2"]
    overrides += ["--train.progress", "false", "--train.tensorboard", "false"]
    summary = pretrain(**recipe_arguments(ROOT / "configs/pretrain/tiny.yaml", overrides))
    assert summary["step"] == 3 and summary["loss"] > 0
    assert {"val_loss/token", "val_loss/sentence", "val_loss/document"} <= set(summary)
    model_dir = Path(summary["model_dir"])
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "config.json").is_file()
    from openglm.tokenizer import GLMTokenizer

    assert GLMTokenizer.from_pretrained(model_dir).vocab_size == 384
    pytest.importorskip("matplotlib")
    from openglm.train.plot import plot

    png = Path(plot(str(tmp_path / "run")))
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_pretraining_mixes_in_multi_task_examples(tmp_path, caplog):
    from tests.test_tasks_run import CLOZE_YAML, _task_yaml, _write_data

    from openglm.data import prepare_corpus
    from openglm.tokenizer import train_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_TEXT * (i % 3 + 1) for i in range(40)))
    tok = train_tokenizer([str(corpus)], 300, str(tmp_path / "tok"), progress=False)
    prepare_corpus([str(corpus)], tok, str(tmp_path / "shards"), workers=0, progress=False)
    _write_data(tmp_path / "data")
    task = str(_task_yaml(tmp_path, CLOZE_YAML))
    overrides = ["--data.path", str(tmp_path / "shards"), "--out_dir", str(tmp_path / "run")]
    overrides += ["--train.max_steps", "4", "--train.micro_batch_size", "2", "--data.seq_length", "32"]
    overrides += ["--data.valid_batches", "0", "--train.progress", "false", "--train.tensorboard", "false"]
    overrides += ["--data.multi_task", f"[{task}]", "--data.multi_task_ratio", "0.5"]
    with caplog.at_level("INFO", logger="openglm.tasks.run"):
        summary = pretrain(**recipe_arguments(ROOT / "configs/pretrain/tiny.yaml", overrides))
    assert summary["step"] == 4 and summary["loss"] > 0
    assert "multi-task data: 32 examples of toy_sentiment" in caplog.text
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["data"]["multi_task"] == [task] and run["data"]["multi_task_ratio"] == 0.5
    with pytest.raises(ValueError, match="data.multi_task and data.multi_task_ratio go together"):
        DataSettings(path="x", multi_task=[task])
    with pytest.raises(ValueError, match="data.multi_task and data.multi_task_ratio go together"):
        DataSettings(path="x", multi_task_ratio=0.1)
    with pytest.raises(ValueError, match="data.multi_task_ratio=2.0 must be in"):
        DataSettings(path="x", multi_task=[task], multi_task_ratio=2.0)
