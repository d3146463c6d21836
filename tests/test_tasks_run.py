"""`finetune` / `evaluate` end to end on a tiny GLM and a YAML-defined task (cloze, multi-token choices and the
classifier-head baseline), the classifier head itself, YAML validation, and the shipped SST-2 task file."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.conftest import ROOT, shared_data_dir

from openglm.config import GLMConfig
from openglm.model import GLMModel
from openglm.tasks.classifier import GLMForSequenceClassification, encode_classifier_example
from openglm.tasks.cloze import collate, encode_example
from openglm.tasks.custom import load_task
from openglm.tasks.run import FinetuneSettings, TaskData, evaluate, finetune

WORDS = [
    "it",
    "was",
    "the",
    "movie",
    "film",
    "great",
    "terrible",
    "fun",
    "boring",
    "lovely",
    "awful",
    "plot",
    "so",
]
POSITIVE, NEGATIVE = ["fun", "lovely"], ["boring", "awful"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GLM checkpoint carrying a tiny WordPiece tokenizer."""
    from openglm.tokenizer import GLMTokenizer

    root = tmp_path_factory.mktemp("tiny")
    letters = list(string.ascii_lowercase)
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        ".",
        ",",
        "!",
        "?",
        *WORDS,
        *letters,
        *("##" + c for c in letters),
    ]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = GLMTokenizer.from_files("bert", root / "vocab.txt")
    torch.manual_seed(0)
    config = GLMConfig.from_name("tiny", vocab_size=128, max_sequence_length=64)
    model_dir = root / "model"
    GLMModel(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir


def _write_data(folder: Path, n_train: int = 32, n_dev: int = 12) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = []
        for i in range(n):
            label = i % 2
            word = (POSITIVE if label else NEGATIVE)[(i // 2) % 2]
            subject = ["the movie", "the film", "the plot"][i % 3]
            rows.append(
                {"review": f"{subject} was so {word}", "sentiment": str(label), "options": ["bad", "good"]}
            )
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _task_yaml(folder: Path, body: str) -> Path:
    path = folder / "task.yaml"
    path.write_text(body)
    return path


CLOZE_YAML = """
name: toy_sentiment
data: {dir: data, train: train.jsonl, dev: dev.jsonl}
fields: {text_a: review, label: sentiment}
pattern:
  - {text: "{review}", shortenable: true}
  - " it was"
  - "[MASK]"
  - "."
verbalizer: {"0": " terrible", "1": " great"}
metrics: [accuracy, f1_macro]
max_seq_length: 32
"""


def test_yaml_cloze_task_finetunes_end_to_end(tiny_dir: Path, tmp_path: Path) -> None:
    _write_data(tmp_path / "data")
    task = _task_yaml(tmp_path, CLOZE_YAML)
    out = tmp_path / "run"
    settings = FinetuneSettings(
        max_steps=12, batch_size=8, lr=3e-3, warmup=0.0, eval_every=6, progress=False, device="cpu"
    )
    report = finetune(task=str(task), model=str(tiny_dir), out_dir=str(out), data=TaskData(), train=settings)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["task"] == "toy_sentiment" and saved["steps"] == 12
    assert set(saved["dev"]) == {"accuracy", "f1_macro"}
    assert saved["best_step"] in (6, 12)
    losses = [
        json.loads(line)["loss"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if "loss" in line
    ]
    assert sum(losses[-3:]) < sum(losses[:3])  # the cloze loss falls on this learnable toy task
    # The kept best model reproduces the best dev score when evaluated on its own.
    result = evaluate(
        task=str(task),
        model=str(out / "best"),
        data=TaskData(),
        progress=False,
        device="cpu",
        output=str(tmp_path / "e.json"),
    )
    assert result["accuracy"] == pytest.approx(report["dev"]["accuracy"])
    written = json.loads((tmp_path / "e.json").read_text())
    assert len(written["predictions"]) == 12


def test_yaml_multi_token_choices_and_classifier_head(tiny_dir: Path, tmp_path: Path) -> None:
    _write_data(tmp_path / "data", n_train=8, n_dev=6)
    body = CLOZE_YAML.replace(
        'verbalizer: {"0": " terrible", "1": " great"}', 'choices: [" awful plot", " great fun"]'
    )
    task = _task_yaml(tmp_path, body)
    settings = FinetuneSettings(max_steps=2, batch_size=4, lr=1e-3, progress=False, device="cpu")
    report = finetune(task=str(task), model=str(tiny_dir), out_dir=str(tmp_path / "multi"), train=settings)
    assert 0.0 <= report["dev"]["accuracy"] <= 1.0
    report = finetune(
        task=str(task),
        model=str(tiny_dir),
        out_dir=str(tmp_path / "cls"),
        data=TaskData(mode="classifier"),
        train=settings,
    )
    assert report["mode"] == "classifier"
    assert (tmp_path / "cls" / "best" / "classifier.json").is_file()
    again = evaluate(task=str(task), model=str(tmp_path / "cls" / "best"), progress=False, device="cpu")
    assert again["mode"] == "classifier" and again["accuracy"] == pytest.approx(report["dev"]["accuracy"])


def test_classifier_head_forward_backward_and_pooling(tiny_dir: Path, tmp_path: Path) -> None:
    from openglm.tokenizer import GLMTokenizer

    _write_data(tmp_path / "data", n_train=4, n_dev=2)
    task = load_task(_task_yaml(tmp_path, CLOZE_YAML))
    tok = GLMTokenizer.from_pretrained(tiny_dir)
    examples = task.read(task.split_path("train"), "train")
    samples = [encode_classifier_example(task, e, tok, 32) for e in examples]
    s = samples[0]
    ids = s.input_ids[: s.sep].tolist()
    assert ids[0] == tok.cls_id and ids[-1] == tok.eos_id and tok.sep_id not in ids  # no text_b: no [SEP]
    batch = collate(samples)
    backbone = GLMModel.from_pretrained(tiny_dir)
    for pool in ("cls", "start", "pad"):
        head = GLMForSequenceClassification(backbone, 2, pool)
        logits = head(batch["input_ids"], batch["position_ids"], batch["sep"])
        assert logits.shape == (4, 2)
    head.eval()
    hidden = backbone(
        batch["input_ids"], batch["position_ids"], attention_mask=batch["sep"], return_hidden=True
    ).hidden_states
    pooled = hidden[torch.arange(4), batch["sep"] - 1]
    assert torch.allclose(
        head(batch["input_ids"], batch["position_ids"], batch["sep"]),
        head.multichoice_head(torch.tanh(head.pool_layer(pooled))),
        atol=1e-6,
    )
    head.train()
    loss = torch.nn.functional.cross_entropy(
        head(batch["input_ids"], batch["position_ids"], batch["sep"]), batch["labels"]
    )
    loss.backward()
    assert head.pool_layer.weight.grad is not None and backbone.word_embeddings.weight.grad is not None
    keys = set(head.state_dict())
    assert {"pool_layer.weight", "multichoice_head.bias"} <= keys and any(
        k.startswith("model.transformer.") for k in keys
    )


def test_yaml_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one mask"):
        load_task(_task_yaml(tmp_path, CLOZE_YAML.replace('  - "[MASK]"\n', "")))
    with pytest.raises(ValueError, match="unknown field"):
        load_task(_task_yaml(tmp_path, CLOZE_YAML + "patern: []\n"))
    with pytest.raises(ValueError, match="exactly one of"):
        load_task(_task_yaml(tmp_path, CLOZE_YAML + "choices: [a, b]\n"))
    with pytest.raises(ValueError, match="unknown metric"):
        load_task(_task_yaml(tmp_path, CLOZE_YAML.replace("f1_macro", "bleu")))
    with pytest.raises(FileNotFoundError):
        load_task(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="field 'name' must be a non-empty string, got"):
        load_task(_task_yaml(tmp_path, CLOZE_YAML.replace("name: toy_sentiment", "name: [s]")))
    _write_data(tmp_path / "data", 2, 2)
    bad = tmp_path / "data" / "dev.jsonl"
    bad.write_text('{"review": "x", "sentiment": "7"}\n')
    task = load_task(_task_yaml(tmp_path, CLOZE_YAML))
    with pytest.raises(ValueError, match="label '7'"):
        task.read(bad, "dev")


def test_unknown_task_and_missing_data_dir_are_clear_errors(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown task"):
        evaluate(task="nosuchtask", model=str(tiny_dir))
    with pytest.raises(ValueError, match="data_dir"):
        evaluate(task="rte", model=str(tiny_dir), progress=False)
    with pytest.raises(ValueError, match="zero-shot"):
        finetune(task="lambada", model=str(tiny_dir), out_dir=str(tmp_path / "x"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="afile: a file; name the model's directory"):
        evaluate(task="rte", model=str(tmp_path / "afile"), progress=False)
    # An unwritable --output fails before the evaluation, not after it.
    with pytest.raises(ValueError, match="is a directory; name a file"):
        evaluate(task="rte", model=str(tiny_dir), output=str(tmp_path), progress=False)
    with pytest.raises(NotADirectoryError, match="afile is a file, not a folder"):
        evaluate(
            task="lambada", model=str(tiny_dir), output=str(tmp_path / "afile" / "m.json"), progress=False
        )


def test_shipped_sst2_task_reads_the_shared_data() -> None:
    from openglm.tasks.superglue import get_task

    task = load_task(ROOT / "configs" / "tasks" / "sst2.yaml")
    assert task.verbalizer(0) == [" terrible", " great"] and task.label_list == ["0", "1"]
    folder = shared_data_dir() / "glue" / "sst2"
    if not folder.is_dir():
        pytest.skip(f"shared data not available: {folder}")
    assert task.split_path("dev").resolve() == (folder / "dev.tsv").resolve()
    assert task.split_path("dev", "/elsewhere") == Path("/elsewhere/dev.tsv")
    dev = task.read(task.split_path("dev"), "dev")
    assert len(dev) == 6735 and {e.label for e in dev} == {"0", "1"}
    a, b = task.pattern(dev[0], 0)
    assert [f.text for f in a] == [dev[0].text_a, " It was", None, "."] and b == []
    assert get_task("rte").name == "rte"
    from openglm.tokenizer import GLMTokenizer

    vocab = shared_data_dir() / "tokenizers" / "bert-large-uncased-vocab.txt"
    bert = GLMTokenizer.from_files("bert", vocab)
    sample = encode_example(task, dev[0], bert)
    assert sample.label_ids.tolist() == [bert.token_to_id("terrible"), bert.token_to_id("great")]


def test_cli_lists_finetune_and_eval(capsys: pytest.CaptureFixture[str]) -> None:
    from openglm.cli import main

    for verb in ("finetune", "eval"):
        with pytest.raises(SystemExit) as exc:
            main([verb, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert "--task" in text and "--data.pattern_id" in text


def test_lm_and_infilling_task_names_are_handed_to_their_modules(tiny_dir: Path, tmp_path: Path) -> None:
    lambada = tmp_path / "lambada.jsonl"
    lambada.write_text(
        "".join(
            json.dumps({"prompt": f"the movie was so {w} it was", "label": "great"}) + "\n" for w in POSITIVE
        )
    )
    out = evaluate(
        task="lambada",
        model=str(tiny_dir),
        data=TaskData(data_dir=str(lambada)),
        device="cpu",
        progress=False,
    )
    assert out["task"] == "lambada" and 0.0 <= out["accuracy"] <= 1.0
    docs = tmp_path / "docs.txt"
    docs.write_text("the movie was so fun and the plot was lovely\nthe film was boring so it was awful\n")
    out = evaluate(
        task="yahoo",
        model=str(tiny_dir),
        data=TaskData(data_dir=str(docs), max_seq_length=32),
        device="cpu",
        progress=False,
    )
    assert out["task"] == "yahoo" and "bleu" in out


def test_block_lm_regularisation_mixes_blank_infilling_batches(tiny_dir: Path, tmp_path: Path) -> None:
    from openglm.tasks.cloze import filled_pattern_tokens
    from openglm.tasks.run import EpochBatches, MixedBatches
    from openglm.tokenizer import GLMTokenizer

    _write_data(tmp_path / "data", n_train=16, n_dev=4)
    task = load_task(_task_yaml(tmp_path, CLOZE_YAML.replace("max_seq_length: 32", "max_seq_length: 24")))
    tok = GLMTokenizer.from_pretrained(tiny_dir)
    examples = task.read(task.split_path("train"), "train")
    filled = filled_pattern_tokens(task, examples[1], tok)
    # "the film was so fun it was great ." wrapped as [CLS] ... eos, the label word in the mask slot
    assert filled[0] == tok.cls_id and filled[-1] == tok.eos_id and tok.mask_id not in filled.tolist()
    assert tok.decode(filled[1:-1].tolist()).split()[-2:] == ["great", "."]
    samples = [encode_example(task, e, tok) for e in examples]
    filled_all = [filled_pattern_tokens(task, e, tok) for e in examples]
    mixed = MixedBatches(EpochBatches(samples, 4, 0), filled_all, tok, ratio=1.0, seed=0)
    it = iter(mixed)
    kinds = ["labels" in next(it) for _ in range(12)]
    assert any(kinds) and not all(kinds)  # both cloze and blank-infilling steps occur
    again = MixedBatches(EpochBatches(samples, 4, 0), filled_all, tok, ratio=1.0, seed=0)
    assert ["labels" in b for b, _ in zip(again, range(12), strict=False)] == kinds  # seeded per step
    settings = FinetuneSettings(
        max_steps=4, batch_size=4, lr=1e-3, block_lm_ratio=1.0, progress=False, device="cpu"
    )
    report = finetune(
        task=str(tmp_path / "task.yaml"), model=str(tiny_dir), out_dir=str(tmp_path / "run"), train=settings
    )
    assert report["steps"] == 4 and report["final_loss"] is not None


def test_resumed_finetune_continues_the_step_count_and_keeps_the_best(tiny_dir: Path, tmp_path: Path) -> None:
    _write_data(tmp_path / "data", n_train=8, n_dev=4)
    task = str(_task_yaml(tmp_path, CLOZE_YAML))
    out = str(tmp_path / "run")
    first = FinetuneSettings(max_steps=2, batch_size=4, lr=1e-3, eval_every=2, progress=False, device="cpu")
    report1 = finetune(task=task, model=str(tiny_dir), out_dir=out, train=first)
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # the torn last line of a run killed while logging
    second = FinetuneSettings(
        max_steps=4, batch_size=4, lr=1e-3, eval_every=2, progress=False, device="cpu", resume=True
    )
    report2 = finetune(task=task, model=str(tiny_dir), out_dir=out, train=second)
    assert report2["steps"] == 4
    assert report2["dev"]["accuracy"] >= report1["dev"]["accuracy"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    dev = [(r["step"], r["dev_accuracy"]) for r in rows if "dev_accuracy" in r]
    assert [step for step, _ in dev] == [2, 4]
    best_value = max(v for _, v in dev)
    assert report2["best_step"] == next(
        step for step, v in dev if v == best_value
    )  # first step reaching the best


def test_lora_finetune_from_the_cli_keeps_a_plain_merged_model(tiny_dir: Path, tmp_path: Path) -> None:
    from openglm.cli import main

    _write_data(tmp_path / "data")
    task = _task_yaml(tmp_path, CLOZE_YAML)
    out = tmp_path / "lora"
    main(
        ["finetune", "--task", str(task), "--model", str(tiny_dir), "--out_dir", str(out),
         "--train.max_steps", "24", "--train.batch_size", "8", "--train.lr", "1e-2", "--train.warmup", "0",
         "--train.progress", "false", "--train.device", "cpu",
         "--train.lora_rank", "4", "--train.lora_targets", "[query_key_value, dense_4h_to_h]"]
    )  # fmt: skip
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["train"]["lora_rank"] == 4
    pretrained, tuned = (
        GLMModel.from_pretrained(tiny_dir).state_dict(),
        GLMModel.from_pretrained(out / "best").state_dict(),
    )
    changed = {k for k in pretrained if not torch.equal(pretrained[k], tuned[k])}
    assert changed == {
        f"transformer.layers.{i}.{name}.weight"
        for i in range(2)
        for name in ("attention.query_key_value", "mlp.dense_4h_to_h")
    }
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "finetune",
                "--task",
                str(task),
                "--model",
                str(tiny_dir),
                "--out_dir",
                str(out),
                "--train.lora_rank",
                "-1",
            ]
        )
    assert exc.value.code == 2


def test_multi_task_samples_fill_each_pattern_with_its_answer(tiny_dir: Path, tmp_path: Path) -> None:
    from openglm.tasks import multi_task_samples
    from openglm.tokenizer import GLMTokenizer

    tok = GLMTokenizer.from_pretrained(tiny_dir)
    _write_data(tmp_path / "data", n_train=6)
    rte = tmp_path / "rte"
    rte.mkdir()
    rows = [
        {"premise": "the movie was fun", "hypothesis": "it was fun.", "label": "entailment", "idx": 0},
        {
            "premise": "the plot was awful",
            "hypothesis": "it was lovely.",
            "label": "not_entailment",
            "idx": 1,
        },
        {
            "premise": "the film was so boring",
            "hypothesis": "it was boring.",
            "idx": 2,
        },  # unlabelled: skipped
    ]
    (rte / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pool = multi_task_samples([str(_task_yaml(tmp_path, CLOZE_YAML)), f"rte={rte}"], tok, 24)
    assert len(pool) == 6 + 2
    texts = [tok.decode(ids[1:-1].tolist()) for ids in pool]
    assert all(ids[0] == tok.cls_id and ids[-1] == tok.eos_id and len(ids) <= 24 for ids in pool)
    for i, text in enumerate(texts[:6]):  # "<review> it was <answer>."
        assert text.endswith("it was " + ("great ." if i % 2 else "terrible ."))
    # RTE pattern 0, `"<hypothesis>" ? <answer>, "<premise>"` (the toy vocabulary has no quote mark)
    assert texts[6] == "[UNK] it was fun [UNK] ? yes , [UNK] the movie was fun [UNK]"
    assert texts[7].startswith("[UNK] it was lovely [UNK] ? no ,")
    with pytest.raises(ValueError, match="name the folder of its split files, rte=DATA_DIR"):
        multi_task_samples(["rte"], tok, 24)
    with pytest.raises(ValueError, match="unknown task"):
        multi_task_samples([f"nope={rte}"], tok, 24)


def test_new_parameters_depend_on_the_seed_not_on_what_ran_before(tiny_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    _write_data(tmp_path / "data", n_train=8, n_dev=4)
    task = str(_task_yaml(tmp_path, CLOZE_YAML))

    def run(name: str, data: TaskData, **kw: Any) -> dict[str, torch.Tensor]:
        torch.rand(7)  # the global RNG is elsewhere each time
        settings = FinetuneSettings(
            max_steps=1, batch_size=4, eval_every=1, progress=False, device="cpu", **kw
        )
        finetune(task=task, model=str(tiny_dir), out_dir=str(tmp_path / name), data=data, train=settings)
        return load_file(str(tmp_path / name / "checkpoints/step-00000001/model.safetensors"))

    for i, (data, kw) in enumerate(((TaskData(mode="classifier"), {}), (TaskData(), {"lora_rank": 2}))):
        a, b = run(f"a{i}", data, **kw), run(f"b{i}", data, **kw)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        c = run(f"c{i}", data, seed=7, **kw)
        assert any(not torch.equal(a[k], c[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one-line errors naming file, line and field, before any training and without touching out_dir


def _quick(**kw: Any) -> FinetuneSettings:
    return FinetuneSettings(max_steps=1, batch_size=4, eval_every=1, progress=False, device="cpu", **kw)


def test_unlabelled_training_and_dev_examples_are_refused_before_training(
    tiny_dir: Path, tmp_path: Path
) -> None:
    _write_data(tmp_path / "data", n_train=4, n_dev=2)
    task = str(_task_yaml(tmp_path, CLOZE_YAML))
    train = tmp_path / "data" / "train.jsonl"
    rows = train.read_text().splitlines()
    train.write_text("\n".join([rows[0], "", json.dumps({"review": "the plot"}), *rows[1:]]) + "\n")
    out = tmp_path / "run"
    with pytest.raises(
        ValueError, match=r"train.jsonl:3: the train example has no label \(field 'sentiment'\)"
    ):
        finetune(task=task, model=str(tiny_dir), out_dir=str(out), train=_quick())
    assert not out.exists()
    _write_data(tmp_path / "data", n_train=4, n_dev=2)
    dev = tmp_path / "data" / "dev.jsonl"
    dev.write_text(dev.read_text() + json.dumps({"review": "the film", "sentiment": ""}) + "\n")
    with pytest.raises(
        ValueError, match=r"dev.jsonl:3: the dev example has no label .* select the best model"
    ):
        finetune(task=task, model=str(tiny_dir), out_dir=str(out), train=_quick())
    assert not out.exists()  # refused before the first checkpoint, not after


def test_table_rows_that_lose_or_gain_columns_are_refused(tmp_path: Path) -> None:
    tsv_yaml = CLOZE_YAML.replace("train.jsonl", "train.tsv").replace("dev.jsonl", "dev.tsv")
    task = load_task(_task_yaml(tmp_path, tsv_yaml))
    (tmp_path / "data").mkdir()
    table = tmp_path / "data" / "train.tsv"
    table.write_text("review\tsentiment\nthe film was fun\t1\nthe plot was awful\n")
    with pytest.raises(
        ValueError, match=r"train.tsv:3: the row has 1 of the header's 2 columns, no \['sentiment'\]"
    ):
        task.read(table, "train")
    table.write_text("review\tsentiment\nthe film\twas fun\t1\n")
    with pytest.raises(
        ValueError, match=r"train.tsv:2: the row has 3 columns but the header 2 \(a tab inside"
    ):
        task.read(table, "train")
    table.write_text("review\tsentiment\n\nthe film was fun\t1\t\nthe plot\t\n")  # blank line, empty cells
    rows = task.read(table, "train")
    assert [(e.text_a, e.label, e.location) for e in rows] == [
        ("the film was fun", "1", f"{table}:3"),
        ("the plot", None, f"{table}:4"),  # an empty label cell is unlabelled
    ]
    task = load_task(_task_yaml(tmp_path, tsv_yaml.replace(".tsv", ".csv")))
    table = tmp_path / "data" / "train.csv"
    table.write_text('review,sentiment\n"the film, it was fun",1\n"the plot was awful,0\nso fun,1\n')
    with pytest.raises(
        ValueError, match=r"train.csv:3: .* \(an unterminated quote\? the row runs to line 4\)"
    ):
        task.read(table, "train")
    table.write_text("review,sentiment,review\nthe film,1,fun\n")
    with pytest.raises(
        ValueError, match=r"train.csv:1: the header names column\(s\) \['review'\] more than once"
    ):
        task.read(table, "train")
    table.write_text("review,label\nthe film,1\n")
    with pytest.raises(
        ValueError, match=r"train.csv: no column 'sentiment' \(fields.label in .*\); the header"
    ):
        task.read(table, "train")
    table.write_bytes(b"review,sentiment\nthe film,1\nthe \xff plot,0\n")
    with pytest.raises(ValueError, match=r"train.csv:3: not UTF-8 text \(byte 0xff"):
        task.read(table, "train")


def test_jsonl_text_fields_must_be_strings(tmp_path: Path) -> None:
    _write_data(tmp_path / "data", 2, 2)
    task = load_task(_task_yaml(tmp_path, CLOZE_YAML))
    bad = tmp_path / "data" / "dev.jsonl"
    for value, shown in ((5, "5"), (None, "null")):
        bad.write_text(
            json.dumps({"review": "x", "sentiment": "1"}) + "\n" + json.dumps({"review": value}) + "\n"
        )
        with pytest.raises(ValueError, match=rf"dev.jsonl:2: field 'review' must be text, got {shown}$"):
            task.read(bad, "dev")


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("verbalizer: {\"0\": \" terrible\", \"1\": \" great\"}", 'verbalizer: {"0": " great", "1": " great"}',
         r"field 'verbalizer' repeats the words \[' great'\]"),
        ("verbalizer: {\"0\": \" terrible\", \"1\": \" great\"}", 'verbalizer: {"0": " terrible", "1": 5}',
         r"field \"verbalizer\['1'\]\" must be a word"),
        ("shortenable: true", 'shortenable: "no"', r"field 'pattern\[0\].shortenable' must be true or false, got 'no'"),
        ("metrics: [accuracy, f1_macro]", "metrics: accuracy", r"field 'metrics' must be a list of metric names"),
        ("max_seq_length: 32", 'max_seq_length: "abc"', r"field 'max_seq_length' must be an integer >= 1, got 'abc'"),
        ("max_seq_length: 32", "max_seq_length: -5", r"field 'max_seq_length' must be an integer >= 1, got -5"),
        ("max_seq_length: 32", "labels: \"01\"", r"field 'labels' must be a list of label values, got '01'"),
        ("max_seq_length: 32", "defaults: {epochs: \"x\"}", r"field 'defaults.epochs' must be a positive integer"),
        ("max_seq_length: 32", "defaults: {epochs: -1}", r"field 'defaults.epochs' must be a positive integer"),
        ("max_seq_length: 32", "defaults: {batch_size: 0}", r"field 'defaults.batch_size' must be a positive"),
        ("max_seq_length: 32", "loss_func: foo", r"loss_func='foo'; expected one of"),
        ("max_seq_length: 32", "data: {train: a.jsonl}", r":12: invalid YAML: key 'data' is given twice"),
    ],
)  # fmt: skip
def test_yaml_fields_of_the_wrong_type_name_the_file_and_field(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    assert old in CLOZE_YAML
    with pytest.raises(ValueError, match=r"task.yaml.*" + message):
        load_task(_task_yaml(tmp_path, CLOZE_YAML.replace(old, new)))


def test_label_words_that_are_not_one_token_get_advice_that_fits_the_task(
    tiny_dir: Path, tmp_path: Path
) -> None:
    from openglm.tasks.cloze import Example
    from openglm.tasks.superglue import get_task
    from openglm.tokenizer import GLMTokenizer

    tok = GLMTokenizer.from_pretrained(tiny_dir)  # WordPiece over a handful of words: "yes" is 3 pieces
    rte = Example("dev-0", "the movie was fun", "it was fun", "entailment")
    with pytest.raises(ValueError, match="label word ' Yes' .* this built-in task needs a tokenizer"):
        encode_example(get_task("rte"), rte, tok, max_seq_length=32)
    _write_data(tmp_path / "data", 2, 2)
    task = load_task(_task_yaml(tmp_path, CLOZE_YAML.replace('" great"', '" great fun"')))
    example = task.read(task.split_path("dev"), "dev")[0]
    with pytest.raises(ValueError, match="encodes to 2 tokens .* go in 'choices' instead of 'verbalizer'"):
        encode_example(task, example, tok)
    # " great" and "great" are different strings but one WordPiece token
    task = load_task(_task_yaml(tmp_path, CLOZE_YAML.replace('" terrible"', '"great"')))
    with pytest.raises(ValueError, match="label words 'great' and ' great', which are the same token"):
        encode_example(task, example, tok)


def test_rows_longer_than_the_model_positions_are_refused_up_front(tiny_dir: Path, tmp_path: Path) -> None:
    _write_data(tmp_path / "data", 4, 2)
    task = str(_task_yaml(tmp_path, CLOZE_YAML))
    message = r"--data.max_seq_length 100 does not fit the model's max_sequence_length 64; pass 64 or less"
    with pytest.raises(ValueError, match=message):
        finetune(
            task=task, model=str(tiny_dir), out_dir=str(tmp_path / "r"), data=TaskData(max_seq_length=100)
        )
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match=message):
        evaluate(task=task, model=str(tiny_dir), data=TaskData(max_seq_length=100), device="cpu")
    # A task's own longer default is capped at the model's positions: the same rows as asking for 64.
    long_yaml = CLOZE_YAML.replace("max_seq_length: 32", "max_seq_length: 256")
    capped = evaluate(task=str(_task_yaml(tmp_path, long_yaml)), model=str(tiny_dir), device="cpu")
    explicit = evaluate(task=task, model=str(tiny_dir), data=TaskData(max_seq_length=64), device="cpu")
    assert capped["accuracy"] == explicit["accuracy"]


def test_a_finished_run_is_not_overwritten_without_resume(tiny_dir: Path, tmp_path: Path) -> None:
    _write_data(tmp_path / "data", 4, 2)
    task = str(_task_yaml(tmp_path, CLOZE_YAML))
    out = tmp_path / "run"
    finetune(task=task, model=str(tiny_dir), out_dir=str(out), train=_quick())
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(
        ValueError, match=r"already holds a fine-tuning run .* --train.resume true, or pick another"
    ):
        finetune(task=task, model=str(tiny_dir), out_dir=str(out), train=_quick())
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(NotADirectoryError, match="is a file"):
        finetune(task=task, model=str(tiny_dir), out_dir=str(tmp_path / "afile"), train=_quick())
    assert (tmp_path / "afile").read_text() == "keep me"


def test_eval_of_unlabelled_splits_and_bad_arguments(
    tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_data(tmp_path / "data", 2, 3)
    task = str(_task_yaml(tmp_path, CLOZE_YAML))
    dev = tmp_path / "data" / "dev.jsonl"
    rows = [json.loads(line) for line in dev.read_text().splitlines()]
    dev.write_text(
        "".join(json.dumps(r if i != 1 else {"review": r["review"]}) + "\n" for i, r in enumerate(rows))
    )
    with pytest.raises(
        ValueError, match=r"dev.jsonl:2: the dev example has no label .* 2 of the 3 dev examples"
    ):
        evaluate(task=task, model=str(tiny_dir), device="cpu", progress=False)
    dev.write_text("".join(json.dumps({"review": r["review"]}) + "\n" for r in rows))  # a test split
    with caplog.at_level("INFO"):
        result = evaluate(
            task=task, model=str(tiny_dir), device="cpu", progress=False, output=str(tmp_path / "p.json")
        )
    assert "accuracy" not in result and result["examples"] == 3
    assert "no labels, so no metrics; writing predictions only" in caplog.text
    assert len(json.loads((tmp_path / "p.json").read_text())["predictions"]) == 3
    for size in (0, -2):
        with pytest.raises(ValueError, match=f"--batch_size {size}: must be a positive"):
            evaluate(task=task, model=str(tiny_dir), device="cpu", batch_size=size)
    for call in (evaluate, lambda **kw: finetune(out_dir=str(tmp_path / "o"), **kw)):
        with pytest.raises(FileNotFoundError, match="model directory not found: .*nosuchdir"):
            call(task=task, model=str(tmp_path / "nosuchdir"))
        with pytest.raises(FileNotFoundError, match="model directory not found"):
            call(task="lambada" if call is evaluate else "yahoo", model=str(tmp_path / "nosuchdir"))


def test_help_lists_every_accepted_task() -> None:
    from openglm.tasks.run import INFILLING_TASKS, LM_EVAL_TASKS, SEQ2SEQ_TASKS
    from openglm.tasks.superglue import TASKS

    for fn, extra in ((finetune, ()), (evaluate, LM_EVAL_TASKS)):
        doc = " ".join((fn.__doc__ or "").split())
        task_help = doc[doc.index("task:") : doc.index("model:")]
        for name in (*TASKS, *SEQ2SEQ_TASKS, *INFILLING_TASKS, *extra, ".yaml"):
            assert f"`{name}`" in task_help, (fn.__name__, name)
    assert "seq2seq" in (finetune.__doc__ or "").splitlines()[0]
