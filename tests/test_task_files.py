"""Task files and best-model selection: the shared jsonl reader and atomic writer, and fit_keeping_best (keep the
first dev evaluation, replace it only when strictly better, save the final model when there is no dev data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from openglm.atomic import write_text_atomic
from openglm.config import GLMConfig
from openglm.model import GLMModel
from openglm.tasks.files import line_of, read_jsonl, read_text, row_field, row_text
from openglm.tasks.finetuning import BestDev, fit_keeping_best
from openglm.train.settings import OptimSettings, TrainSettings
from openglm.train.synthetic import SyntheticBatches

TINY = GLMConfig(num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=128, max_sequence_length=32)


def test_read_jsonl_reports_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2, "b": [3]}\n')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2, "b": [3]}]
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: expected a JSON object, got list"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: not valid JSON"):
        read_jsonl(path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_jsonl(tmp_path / "missing.jsonl")
    assert row_field({"a": 1}, "a", path, 3) == 1
    with pytest.raises(ValueError, match=r"rows.jsonl:3: the row has no field 'b' \(fields: \['a'\]\)"):
        row_field({"a": 1}, "b", path, 3)


def test_rows_know_their_lines_and_bad_bytes_or_types_are_named(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": "x"}\n\n\n{"a": null, "b": 5}\n{"a": ""}\n')
    rows = read_jsonl(path)
    assert [line_of(rows, i) for i in range(3)] == [1, 4, 5]  # blank lines skipped, lines kept
    assert [line_of(rows[1:], i) for i in range(2)] == [4, 5]  # `rows[:limit]` too
    assert line_of([{}, {}], 1) == 2  # a plain list: the position
    assert row_text(rows[0], "a", path, 1) == "x"
    with pytest.raises(ValueError, match=r"rows.jsonl:4: field 'a' must be a string, got null$"):
        row_text(rows[1], "a", path, 4)
    with pytest.raises(ValueError, match=r"rows.jsonl:4: field 'b' must be a string, got 5$"):
        row_text(rows[1], "b", path, 4)
    with pytest.raises(ValueError, match=r"rows.jsonl:5: field 'a' is empty$"):
        row_text(rows[2], "a", path, 5, empty=False)
    path.write_bytes(b'{"a": "x"}\n{"a": "\xc3\x28"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: not UTF-8 text \(byte 0xc3 at offset 18\)"):
        read_jsonl(path)
    with pytest.raises(ValueError, match=r"rows.jsonl:2: not UTF-8 text"):
        read_text(path)
    with pytest.raises(FileNotFoundError, match="data file not found: .*nope.txt"):
        read_text(tmp_path / "nope.txt")


def test_write_text_atomic_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out" / "metrics.json"
    write_text_atomic(target, "first\n")
    write_text_atomic(target, "second ü\n")
    assert target.read_text(encoding="utf-8") == "second ü\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


class CountingTokenizer:
    """Stands in for a tokenizer: every save writes the number of saves so far."""

    def __init__(self) -> None:
        self.saves = 0

    def save_pretrained(self, directory: Path) -> None:
        self.saves += 1
        (Path(directory) / "tokenizer.txt").write_text(str(self.saves))


def _fit(tmp_path: Path, scores: list[float] | None, tok: CountingTokenizer):
    calls: list[int] = []

    def dev_metrics(model: object) -> dict[str, float]:
        assert isinstance(model, GLMModel)  # unwrapped before evaluation
        calls.append(len(calls) + 1)
        return {"acc": scores[len(calls) - 1], "count": 4.0}  # type: ignore[index]

    settings = TrainSettings(max_steps=len(scores or [0]), eval_every=1, device="cpu", progress=False)
    return fit_keeping_best(
        GLMModel(TINY),
        tok,
        SyntheticBatches(TINY.vocab_size, 16, 2),
        settings,
        OptimSettings(lr=1e-3, warmup=0.0),
        run_dir=tmp_path,
        evaluate=dev_metrics if scores is not None else None,
        key_metric="acc",
        step_fn=lambda: len(calls),
        metric_prefix="dev_",
    )


def test_fit_keeping_best_keeps_only_strict_improvements(tmp_path: Path) -> None:
    tok = CountingTokenizer()
    result, best = _fit(tmp_path, [0.5, 0.5, 0.25, 0.75], tok)
    assert best == BestDev(tmp_path / "best", value=0.75, step=4, metrics={"acc": 0.75, "count": 4.0})
    assert tok.saves == 2  # the first evaluation and the last; the tie and the worse one are not saved
    assert (tmp_path / "best" / "config.json").is_file()
    assert (tmp_path / "best" / "tokenizer.txt").read_text() == "2"
    assert result.eval == {"dev_acc": 0.75, "dev_count": 4.0}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["dev_acc"] for r in rows if "dev_acc" in r] == [0.5, 0.5, 0.25, 0.75]


def test_fit_keeping_best_without_dev_saves_the_final_model(tmp_path: Path) -> None:
    tok = CountingTokenizer()
    result, best = _fit(tmp_path, None, tok)
    assert result.step == 1 and best.metrics is None and best.value is None
    assert tok.saves == 1
    saved = GLMModel.from_pretrained(tmp_path / "best")
    assert saved.config.num_layers == TINY.num_layers
