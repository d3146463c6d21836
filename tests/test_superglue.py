"""SuperGLUE readers (train-split rules the fixtures do not cover) and the official metrics against hand-computed
values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from openglm.tasks import metrics
from openglm.tasks.cloze import Example
from openglm.tasks.superglue import TASKS, get_task, remove_final_punctuation, standardize_punctuation


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_accuracy_and_macro_f1_by_hand() -> None:
    preds = ["a", "a", "b", "c", "c", "a"]
    gold = ["a", "b", "b", "c", "a", "a"]
    assert metrics.accuracy(preds, gold) == pytest.approx(4 / 6)
    # a: tp 2, fp 1, fn 1 -> 2/3; b: tp 1, fp 0, fn 1 -> 2/3; c: tp 1, fp 1, fn 0 -> 2/3
    assert metrics.f1_macro(preds, gold) == pytest.approx(2 / 3)
    # A class only predicted (never gold) still counts, as in sklearn's macro average.
    assert metrics.f1_macro(["x", "a"], ["a", "a"]) == pytest.approx((2 / 3 + 0.0) / 2)
    with pytest.raises(ValueError, match="labels"):
        metrics.accuracy([1], [1, 0])


def test_multirc_f1a_and_exact_match_by_hand() -> None:
    preds = [1, 0, 1, 1, 0]
    gold = [1, 0, 0, 1, 1]
    questions = ["q1", "q1", "q2", "q3", "q3"]
    # tp 2 (idx 0, 3), fp 1 (idx 2), fn 1 (idx 4): F1 = 4 / 6
    assert metrics.binary_f1(preds, gold) == pytest.approx(2 / 3)
    # q1 all right, q2 wrong, q3 wrong -> 1 / 3
    assert metrics.multirc_em(preds, gold, questions) == pytest.approx(1 / 3)
    examples = [
        Example(f"e{i}", "", meta={"passage_idx": 0, "question_idx": q}) for i, q in enumerate(questions)
    ]
    out = metrics.compute_metrics(("f1a", "em", "accuracy"), preds, gold, examples)
    assert out == pytest.approx({"f1a": 2 / 3, "em": 1 / 3, "accuracy": 3 / 5})


def test_record_normalisation_em_and_f1_by_hand() -> None:
    assert metrics.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert metrics.normalize_answer("an Apple a day") == "apple day"
    assert metrics.exact_match("the Beatles", "Beatles") == 1.0
    # pred tokens [barack, obama], gold [obama]: precision 1/2, recall 1 -> 2/3
    assert metrics.token_f1("Barack Obama", "Obama") == pytest.approx(2 / 3)
    em, f1 = metrics.record_scores(["Barack Obama", "Paris"], [["Obama", "President Obama"], ["London"]])
    assert em == 0.0
    assert f1 == pytest.approx((2 / 3 + 0.0) / 2)
    examples = [
        Example(
            "q", "", meta={"candidates": ["London", "Barack Obama"], "answers": ["Obama", "Barack Obama"]}
        )
    ]
    assert metrics.compute_metrics(("record_em", "record_f1"), [1], [1], examples) == {
        "record_em": 1.0,
        "record_f1": 1.0,
    }
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.compute_metrics(("bleu",), [1], [1])


def test_text_helpers() -> None:
    assert standardize_punctuation("\u201cHi\u201d \u2018x\u2019 1\u20132") == "\"Hi\" 'x' 1-2"
    assert remove_final_punctuation("Really?!.") == "Really"


def test_copa_train_is_mirrored_and_patterns_lowercase_choices(tmp_path: Path) -> None:
    rows = [
        {"premise": "My body cast a shadow.", "choice1": "The sun was rising.", "choice2": "The grass was cut.", "question": "cause", "label": 0, "idx": 0},
        {"premise": "It rained.", "choice1": "We stayed in.", "choice2": "We swam.", "question": "effect", "label": 1, "idx": 1},
    ]  # fmt: skip
    copa = get_task("copa")
    train = copa.read(_jsonl(tmp_path / "train.jsonl", rows), "train")
    assert [e.guid for e in train] == ["train-0", "train-1", "train-0m", "train-1m"]
    assert train[2].label == 1 and train[2].meta["choice1"] == "The grass was cut."
    assert len(copa.read(tmp_path / "train.jsonl", "dev")) == 2  # only training data is mirrored
    a, b = copa.pattern(train[0], 0)
    assert [f.text for f in a] == [
        '"',
        "the sun was rising",
        '" or "',
        "the grass was cut",
        '"?',
        " My body cast a shadow",
        " because",
        None,
        ".",
    ]
    assert copa.answers(train[1], 0) == [" we stayed in", " we swam"]
    a1, _ = copa.pattern(train[1], 1)
    assert [f.text for f in a1][:4] == ["we stayed in", " or", " we swam", "?"] and a1[5].text == ", so"


def test_wsc_train_keeps_positives_and_repairs_span_indices(tmp_path: Path) -> None:
    rows = [
        {"text": "Mark told Pete many lies about himself .", "target": {"span1_text": "Mark", "span1_index": 1, "span2_text": "himself", "span2_index": 5}, "label": True, "idx": 0},
        {"text": "The cup fell . It broke .", "target": {"span1_text": "cup", "span1_index": 1, "span2_text": "It", "span2_index": 4}, "label": False, "idx": 1},
    ]  # fmt: skip
    wsc = get_task("wsc")
    train = wsc.read(_jsonl(tmp_path / "train.jsonl", rows), "train")
    assert [e.guid for e in train] == ["train-0"]
    assert (
        train[0].meta["span1_index"] == 0 and train[0].meta["span2_index"] == 6
    )  # both off by one, repaired
    assert wsc.label_index(train[0], "train") == 0
    a, _ = wsc.pattern(train[0], 2)
    assert a[0].text == "Mark told Pete many lies about *himself* ."
    dev = wsc.read(tmp_path / "train.jsonl", "dev")
    assert len(dev) == 2 and wsc.label_index(dev[1], "dev") == 0
    # Prediction "True" exactly when the marked span (choice 0) wins.
    assert wsc.predict(dev[0], [0.5, -1.0]) == 1 and wsc.predict(dev[0], [-2.0, -1.0]) == 0


def test_record_train_examples_one_per_answer_with_seeded_negatives(tmp_path: Path) -> None:
    text = (
        "@highlight\nAlpha met Beta. Gamma, Delta, Epsilon, Zeta, Eta, Theta, Iota, Kappa and Lambda watched."
    )
    names = ["Alpha", "Beta", "Gamma", "Delta", "Epsilon", "Zeta", "Eta", "Theta", "Iota", "Kappa", "Lambda"]
    entities = [{"start": text.index(n), "end": text.index(n) + len(n) - 1} for n in names]
    row = {
        "idx": 7,
        "passage": {"text": text, "entities": entities},
        "qas": [
            {"idx": 3, "query": "@placeholder met Beta.", "answers": [{"text": "Alpha"}, {"text": "Alpha"}]}
        ],
    }
    record = get_task("record")
    train = record.read(_jsonl(tmp_path / "train.jsonl", [row]), "train")
    assert len(train) == 1  # duplicate gold answers count once
    ex = train[0]
    assert ex.text_a.startswith("- Alpha met Beta.")
    cands = ex.meta["candidates"]
    assert cands[0] == "Alpha" and len(cands) == 10 and len(set(cands)) == 10 and "Alpha" not in cands[1:]
    assert record.label_index(ex, "train") == 0
    assert (
        record.read(tmp_path / "train.jsonl", "train")[0].meta["candidates"] == cands
    )  # seeded: reproducible
    dev = record.read(tmp_path / "train.jsonl", "dev")[0]
    assert dev.meta["candidates"] == sorted(names) and dev.label == "1"
    a, b = record.pattern(dev, 0)
    assert [f.text for f in a][1:] == [" ", None, " met Beta."] and b == []
    del row["qas"][0]["answers"]  # the test split has no answers: unlabelled, not wrong
    test = record.read(_jsonl(tmp_path / "test.jsonl", [row]), "test")[0]
    assert test.label is None and record.label_index(test, "test") == -1


def test_every_task_reports_unknown_patterns_and_bad_rows(tmp_path: Path) -> None:
    assert set(TASKS) == {"rte", "cb", "boolq", "wic", "multirc", "copa", "wsc", "record"}
    with pytest.raises(ValueError, match="pattern id 9"):
        get_task("rte").check_pattern(9)
    with pytest.raises(ValueError, match="unknown SuperGLUE task"):
        get_task("mnli")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"premise": "x"}\n')
    with pytest.raises(ValueError, match="hypothesis"):
        get_task("rte").read(bad, "dev")
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        get_task("cb").read(bad, "dev")
    with pytest.raises(FileNotFoundError):
        get_task("boolq").read(tmp_path / "nope.jsonl", "dev")


@pytest.mark.parametrize("value", [None, 5, ["x"]])
def test_text_fields_of_another_type_name_file_line_and_field(tmp_path: Path, value: object) -> None:
    bad = tmp_path / "bad.jsonl"
    good = {"premise": "p", "hypothesis": "h", "label": "entailment", "idx": 0}
    bad.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "premise": value, "idx": 1}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:3: field 'premise' must be a string, got "):
        get_task("rte").read(bad, "train")
    bad.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "label": 0, "idx": 1}) + "\n")
    rte = get_task("rte")
    examples = rte.read(bad, "train")
    assert [e.location for e in examples] == [f"{bad}:1", f"{bad}:3"]
    with pytest.raises(
        ValueError, match=r"bad.jsonl:3: label 0 is not one of \['entailment', 'not_entailment'\]"
    ):
        rte.label_index(examples[1], "train")
    copa = {"premise": "p", "choice1": "a", "choice2": "b", "question": "cause", "label": "1"}
    bad.write_text(json.dumps(copa) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: label '1' is not 0 or 1"):
        get_task("copa").read(bad, "train")


def test_official_defaults_per_task_and_recipe() -> None:
    from openglm.tasks.run import FinetuneSettings, official_defaults

    large = official_defaults(get_task("multirc"), FinetuneSettings())
    assert large == {"epochs": 15, "batch_size": 64, "lr": 1e-5, "weight_decay": 0.1, "beta2": 0.999}
    ten_b = official_defaults(get_task("copa"), FinetuneSettings(recipe="10b"))
    assert ten_b == {"epochs": 100, "batch_size": 64, "lr": 5e-6, "weight_decay": 0.01, "beta2": 0.95}
    assert official_defaults(get_task("rte"), FinetuneSettings(lr=3e-5))["lr"] == 3e-5
