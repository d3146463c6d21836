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
    args = recipe_arguments(ROOT / "configs/pretrain/tiny.yaml", overrides)
    summary = pretrain(**args)
    assert summary["step"] == 3 and summary["loss"] > 0
    assert {"val_loss/token", "val_loss/sentence", "val_loss/document"} <= set(summary)
    model_dir = Path(summary["model_dir"])
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "config.json").is_file()
    from openglm import GLMModel
    from openglm.tokenizer import GLMTokenizer

    # The demo's first-token / later-token split is of the very batches the run validated on.
    from openglm.train.demo import held_out_blank_losses

    blanks = held_out_blank_losses(
        GLMModel.from_pretrained(model_dir),
        GLMTokenizer.from_pretrained(model_dir),
        tmp_path / "shards",
        args,
    )
    assert blanks.first_tokens > 0 and blanks.later_tokens > 0
    mean = (blanks.first * blanks.first_tokens + blanks.later * blanks.later_tokens) / (
        blanks.first_tokens + blanks.later_tokens
    )
    assert mean == pytest.approx(summary["val_loss/token"], rel=1e-5)

    assert GLMTokenizer.from_pretrained(model_dir).vocab_size == 384
    other = train_tokenizer([str(corpus)], 280, str(tmp_path / "other-tok"), progress=False)
    wrong = overrides + ["--data.tokenizer", other, "--out_dir", str(tmp_path / "run2")]
    with pytest.raises(
        ValueError,
        match="shards were prepared with a tokenizer of .*; use the tokenizer the shards were made with",
    ):
        pretrain(**recipe_arguments(ROOT / "configs/pretrain/tiny.yaml", wrong))
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
    with pytest.raises(ValueError, match="data.seed=-1 must be >= 0"):
        DataSettings(path="x", seed=-1)
    with pytest.raises(ValueError, match="train.seed=-1 must be >= 0"):
        TrainSettings(seed=-1)


def _synthetic_run(out_dir: Path, resume: bool = False, **overrides) -> dict:
    train = TrainSettings(max_steps=2, micro_batch_size=2, progress=False, tensorboard=False, device="cpu")
    return pretrain(
        model="tiny",
        data=DataSettings(synthetic=True, seq_length=32, valid_batches=0),
        train=train,
        out_dir=str(out_dir),
        model_overrides=overrides or None,
        resume=resume,
    )


def test_a_fresh_run_never_overwrites_a_run_folder(tmp_path):
    run = tmp_path / "run"
    _synthetic_run(run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"out_dir=.*already holds a run .*--resume true.*another --out_dir"):
        _synthetic_run(run)
    # A resume that cannot go on (another architecture) leaves the folder as it was too.
    with pytest.raises(ValueError, match="hidden_size 64 vs 128"):
        _synthetic_run(run, resume=True, hidden_size=128)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert _synthetic_run(run, resume=True)["step"] == 2
    (tmp_path / "afile").write_text("keep")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(ValueError, match="not a directory"):
            _synthetic_run(out)
    assert (tmp_path / "afile").read_text() == "keep"


def test_recipes_resolve_from_any_working_directory(tmp_path, monkeypatch):
    from openglm.train.demo import DEFAULT_RECIPE, resolve_recipe

    monkeypatch.chdir(tmp_path)
    assert resolve_recipe(DEFAULT_RECIPE) == ROOT / DEFAULT_RECIPE
    assert recipe_arguments(DEFAULT_RECIPE)["train"].max_steps > 0
    (tmp_path / "configs" / "pretrain").mkdir(parents=True)
    (tmp_path / DEFAULT_RECIPE).write_text("train:\n  max_steps: 7\n")
    assert recipe_arguments(DEFAULT_RECIPE)["train"].max_steps == 7  # the working directory comes first
    with pytest.raises(FileNotFoundError, match="nosuch.yaml: recipe not found"):
        resolve_recipe("nosuch.yaml")


_DEMO_RECIPE = """\
model: tiny
data: {seq_length: 32, valid_fraction: 0.1, valid_batches: 1}
train: {max_steps: 2, micro_batch_size: 2, progress: false, tensorboard: false, device: cpu}
"""


def test_demo_checks_its_inputs_before_any_work(tmp_path):
    from openglm.train.demo import demo

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_TEXT)
    out = tmp_path / "out"
    for kwargs, error, match in [
        ({"recipe": "nosuch.yaml"}, FileNotFoundError, "recipe not found"),
        ({"max_steps": 0}, ValueError, "train.max_steps=0"),
        ({"corpus": str(tmp_path / "missing.txt")}, FileNotFoundError, "corpus=.*missing.txt"),
    ]:
        with pytest.raises(error, match=match):
            demo(**{"corpus": str(corpus), "out_dir": str(out), **kwargs})
        assert not out.exists()
    (tmp_path / "afile").write_text("keep")
    with pytest.raises(ValueError, match="not a directory"):
        demo(corpus=str(corpus), out_dir=str(tmp_path / "afile"))
    mine = tmp_path / "mine"
    (mine / "run").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not empty and was not made by `openglm demo`"):
        demo(corpus=str(corpus), out_dir=str(mine))
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "run"]


def test_demo_rebuilds_its_own_folder_and_keeps_it_when_a_rerun_fails(tmp_path):
    from openglm.train.demo import DEMO_MARKER, demo

    recipe = tmp_path / "demo.yaml"
    recipe.write_text(_DEMO_RECIPE)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_TEXT * (i % 3 + 1) for i in range(40)))
    out = tmp_path / "demo"
    kwargs = {"out_dir": str(out), "recipe": str(recipe), "vocab_size": 300, "prompts": ["A [MASK] in time."]}
    report = demo(corpus=str(corpus), **kwargs)
    assert "held-out infilling loss" in report and "a blank's first token" in report
    assert (out / DEMO_MARKER).is_file()
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Too short.\n\nAlso short.\n")
    with pytest.raises(ValueError):
        demo(corpus=str(tiny), **kwargs)
    with pytest.raises(ValueError):
        demo(corpus=str(tiny), **{**kwargs, "out_dir": str(tmp_path / "fresh")})
    assert not (tmp_path / "fresh").exists()  # a failed first demo leaves no folder behind
    assert {
        p: p.read_bytes() for p in out.rglob("*") if p.is_file()
    } == files  # model and tokenizer still match
    assert "held-out infilling loss" in demo(corpus=str(corpus), **kwargs)  # a plain rerun rebuilds
    assert sorted(p.name for p in out.iterdir()) == sorted([DEMO_MARKER, "run", "shards", "tokenizer"])


def _metrics_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 5.0 - s / 10, "lr": 1e-3} for s in range(1, 30)]
    lines = [json.dumps(r) for r in rows] + ['{"step": 30, "loss": NaN}', "[1]", '{"loss": 1.0}', "{torn"]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def test_plot_skips_malformed_rows_and_leaves_no_temporary(tmp_path, caplog):
    pytest.importorskip("matplotlib")
    from openglm.train.plot import plot

    run = _metrics_run(tmp_path)
    target = tmp_path / "figures"
    target.mkdir()
    with caplog.at_level("WARNING", logger="openglm.train.plot"):
        png = Path(plot(str(run), out=str(target)))
    assert png == target / "curves.png" and png.read_bytes()[:4] == b"\x89PNG"
    assert "skipped 3 malformed line(s) (line 31, 32, 33)" in caplog.text
    with pytest.raises(ValueError, match="unknown image type '.txt'"):
        plot(str(run), out=str(tmp_path / "x.txt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot(str(run), out=str(tmp_path / "nodir" / "x.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures", "run"]
    assert sorted(p.name for p in target.iterdir()) == ["curves.png"]
