"""Classification tasks defined in YAML (issue 7, item 2): data files, fields, a cloze pattern with a mask slot,
a verbalizer or multi-token choices, and the metrics -- fine-tunable with `openglm finetune --task my.yaml`.

The format is documented on `load_task`; `configs/tasks/sst2.yaml` is a worked example.
"""

from __future__ import annotations

import csv
import string
from pathlib import Path
from typing import Any

import yaml

from openglm.tasks.cloze import MASK, ClozeTask, Example, Fragment
from openglm.tasks.files import read_jsonl
from openglm.tasks.metrics import METRICS
from openglm.tasks.superglue import standardize_punctuation

MASK_STRING = "[MASK]"
_KEYS = {
    "name", "format", "data", "fields", "labels", "pattern", "pattern_b", "verbalizer", "choices",
    "choices_field", "metrics", "max_seq_length", "length_penalty", "loss_func", "classifier", "defaults",
    "standardize_punctuation",
}  # fmt: skip
_DEFAULT_KEYS = {"epochs", "batch_size", "lr", "weight_decay", "warmup"}


class CustomTask(ClozeTask):
    """A task built from a YAML mapping; see `load_task` for the fields."""

    def __init__(self, spec: dict[str, Any], source: str = "task", base_dir: Path | None = None) -> None:
        self.source = source
        unknown = set(spec) - _KEYS
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_KEYS)}")
        self.name = str(self._need(spec, "name"))
        self.base_dir = base_dir or Path.cwd()
        data = self._need(spec, "data")
        if not isinstance(data, dict):
            raise ValueError(f"{source}: field 'data' must map split names (train/dev/test) to files")
        self.data_dir = data.get("dir")
        self.files = {k: v for k, v in data.items() if k != "dir"}
        if not self.files:
            raise ValueError(f"{source}: field 'data' names no split file (train/dev/test)")
        self.format = spec.get("format")
        fields = spec.get("fields") or {}
        self.text_a_field = fields.get("text_a", "text")
        self.text_b_field = fields.get("text_b")
        self.label_field = fields.get("label", "label")
        self.normalize = bool(spec.get("standardize_punctuation", False))
        self.pattern_a = self._pattern(spec.get("pattern"), "pattern", required=True)
        self.pattern_b = self._pattern(spec.get("pattern_b"), "pattern_b", required=False)
        n_masks = sum(_is_mask(p) for p in [*self.pattern_a, *self.pattern_b])
        if n_masks != 1:
            raise ValueError(
                f"{source}: the pattern needs exactly one mask slot ({MASK_STRING!r}), found {n_masks}"
            )
        verbalizer, choices, choices_field = (
            spec.get("verbalizer"),
            spec.get("choices"),
            spec.get("choices_field"),
        )
        if sum(x is not None for x in (verbalizer, choices, choices_field)) != 1:
            raise ValueError(f"{source}: give exactly one of 'verbalizer', 'choices' or 'choices_field'")
        labels = spec.get("labels")
        if verbalizer is not None:
            if not isinstance(verbalizer, dict) or not verbalizer:
                raise ValueError(f"{source}: 'verbalizer' must map each label to its label word")
            self.label_list = [str(k) for k in (labels or verbalizer)]
            self.words = {str(k): str(v) for k, v in verbalizer.items()}
            missing = [lb for lb in self.label_list if lb not in self.words]
            if missing:
                raise ValueError(f"{source}: 'verbalizer' has no word for label(s) {missing}")
            self.multi_token = False
            self.choices = None
            self.choices_field = None
        else:
            self.multi_token = True
            self.choices = [str(c) for c in choices] if choices is not None else None
            self.choices_field = choices_field
            if self.choices is not None:
                self.label_list = [str(x) for x in (labels or range(len(self.choices)))]
                if len(self.label_list) != len(self.choices):
                    raise ValueError(
                        f"{source}: {len(self.label_list)} labels but {len(self.choices)} choices"
                    )
            else:
                self.label_list = [str(x) for x in labels] if labels else []
        self.metrics = tuple(spec.get("metrics") or ("accuracy",))
        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            raise ValueError(f"{source}: unknown metric(s) {bad}; expected some of {list(METRICS)}")
        self.max_seq_length = int(spec.get("max_seq_length", 256))
        self.length_penalty = float(spec.get("length_penalty", 0.0))
        self.loss_func = str(spec.get("loss_func", "cross_entropy"))
        classifier = spec.get("classifier") or {}
        self.classifier_a = classifier.get("text_a", "{text_a}")
        self.classifier_b = classifier.get("text_b", "{text_b}" if self.text_b_field else None)
        self.defaults = dict(spec.get("defaults") or {})
        bad = set(self.defaults) - _DEFAULT_KEYS
        if bad:
            raise ValueError(
                f"{source}: unknown key(s) {sorted(bad)} in 'defaults'; allowed: {sorted(_DEFAULT_KEYS)}"
            )
        self.pattern_ids = (0,)
        self.default_pattern = 0

    def _need(self, spec: dict[str, Any], key: str) -> Any:
        if key not in spec:
            raise ValueError(f"{self.source}: missing field {key!r}")
        return spec[key]

    def _pattern(self, items: Any, key: str, required: bool) -> list[Any]:
        if items is None:
            if required:
                raise ValueError(
                    f"{self.source}: missing field {key!r} (a list of text pieces and {MASK_STRING!r})"
                )
            return []
        if not isinstance(items, list):
            raise ValueError(f"{self.source}: field {key!r} must be a list of pieces")
        for i, item in enumerate(items):
            if isinstance(item, dict) and set(item) == {"prompt"}:
                count = item["prompt"]
                if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                    raise ValueError(
                        f"{self.source}: {key}[{i}]: prompt must be a positive integer, got {count!r}"
                    )
            elif isinstance(item, dict):
                extra = set(item) - {"text", "shortenable", "mask"}
                if extra or ("text" not in item and not item.get("mask")):
                    raise ValueError(
                        f"{self.source}: {key}[{i}] must be a string or {{text, shortenable}} / {{mask: true}}"
                        " / {prompt: N}"
                    )
            elif not isinstance(item, str):
                raise ValueError(f"{self.source}: {key}[{i}] must be a string, got {item!r}")
        return items

    # -- data -------------------------------------------------------------------------------------------------

    def split_path(self, split: str, data_dir: str | Path | None = None) -> Path:
        """The file of `split`: relative names resolve against `data_dir` (override), else the YAML's
        `data.dir`, else the YAML file's folder."""
        if split not in self.files:
            raise ValueError(
                f"{self.source}: no file for split {split!r} in 'data' (has {sorted(self.files)})"
            )
        name = Path(self.files[split])
        if name.is_absolute():
            return name
        if data_dir is not None:
            return Path(data_dir) / name
        base = self.base_dir / self.data_dir if self.data_dir else self.base_dir
        return base / name

    def read(self, path: str | Path, split: str) -> list[Example]:
        path = Path(path)
        fmt = self.format or (
            "tsv" if path.suffix in (".tsv", ".tab") else "csv" if path.suffix == ".csv" else "jsonl"
        )
        if fmt == "jsonl":
            rows = read_jsonl(path)
        elif fmt in ("tsv", "csv"):
            if not path.is_file():
                raise FileNotFoundError(f"data file not found: {path}")
            with path.open(encoding="utf-8", newline="") as f:
                reader = csv.DictReader(
                    f,
                    delimiter="\t" if fmt == "tsv" else ",",
                    quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL,
                )
                rows = list(reader)
        else:
            raise ValueError(f"{self.source}: format={fmt!r}; expected jsonl, tsv or csv")
        out = []
        for n, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise ValueError(f"{path}: row {n} is not an object")
            text_a = self._text(row, self.text_a_field, path, n)
            text_b = self._text(row, self.text_b_field, path, n) if self.text_b_field else None
            label = row.get(self.label_field)
            if label is not None:
                label = str(label).lower() if isinstance(label, bool) else str(label)
                if self.label_list and label not in self.label_list:
                    raise ValueError(f"{path}: row {n}: label {label!r} is not one of {self.label_list}")
            meta = dict(row)
            if self.choices_field is not None:
                choices = row.get(self.choices_field)
                if not isinstance(choices, list) or not choices:
                    raise ValueError(
                        f"{path}: row {n}: field {self.choices_field!r} must be a non-empty list of choices"
                    )
                meta["choices"] = [str(c) for c in choices]
            out.append(Example(f"{split}-{n - 1}", text_a, text_b, label, meta, n - 1))
        return out

    def _text(self, row: dict[str, Any], field: str, path: Path, n: int) -> str:
        if field not in row:
            raise ValueError(f"{path}: row {n} has no field {field!r} (fields: {sorted(row)})")
        text = str(row[field])
        return standardize_punctuation(text) if self.normalize else text

    # -- pattern ----------------------------------------------------------------------------------------------

    def _fill(self, template: str, example: Example) -> str:
        values = {**{k: v for k, v in example.meta.items() if not isinstance(v, list | dict)}}
        values["text_a"] = example.text_a
        values["text_b"] = example.text_b or ""
        try:
            return string.Formatter().vformat(template, (), values)
        except KeyError as err:
            raise ValueError(
                f"{self.source}: pattern placeholder {{{err.args[0]}}} is not a field of the data"
            ) from None

    def _fragments(self, items: list[Any], example: Example) -> list[Fragment]:
        out = []
        for item in items:
            if _is_mask(item):
                out.append(MASK)
            elif isinstance(item, dict) and "prompt" in item:
                out.append(Fragment(None, prompt=item["prompt"]))
            elif isinstance(item, dict):
                out.append(Fragment(self._fill(item["text"], example), bool(item.get("shortenable", False))))
            else:
                out.append(Fragment(self._fill(item, example)))
        return out

    def pattern(self, example: Example, pattern_id: int) -> tuple[list[Fragment], list[Fragment]]:
        return self._fragments(self.pattern_a, example), self._fragments(self.pattern_b, example)

    def verbalizer(self, pattern_id: int) -> list[str]:
        if self.multi_token:
            raise ValueError(f"{self.source}: task uses multi-token choices, not a verbalizer")
        return [self.words[label] for label in self.label_list]

    def answers(self, example: Example, pattern_id: int) -> list[str]:
        return list(self.choices) if self.choices is not None else example.meta["choices"]

    def label_index(self, example: Example, split: str) -> int:
        if example.label is None:
            return -1
        if self.choices_field is not None and not self.label_list:
            index = int(example.label)  # the label is the index of the correct choice
            if not 0 <= index < len(example.meta["choices"]):
                raise ValueError(
                    f"{self.source}: example {example.guid}: label {index} is not a choice index"
                )
            return index
        return super().label_index(example, split)

    def classifier_texts(self, example: Example) -> list[tuple[str, str | None]]:
        b = self._fill(self.classifier_b, example) if self.classifier_b else None
        if self.multi_token:
            a = self._fill(self.classifier_a, example)
            return [(a, (b + " " if b else "") + choice.strip()) for choice in self.answers(example, 0)]
        return [(self._fill(self.classifier_a, example), b)]


def _is_mask(item: Any) -> bool:
    return item == MASK_STRING or (isinstance(item, dict) and bool(item.get("mask")))


def load_task(path: str | Path) -> CustomTask:
    """Load a YAML task definition.

    Fields:
        name: task name (used in output files).
        data: {dir: optional base folder (relative to the YAML file), train: file, dev: file, test: file}.
            jsonl, tsv (header row) or csv, chosen by `format` or the file extension.
        fields: {text_a: column, text_b: column or omitted, label: column}.
        labels: label values in class order (default: the verbalizer's keys or 0..n-1 for `choices`).
        pattern: list of pieces for Part A: a string (text with `{field}` placeholders, any column of the
            row plus `{text_a}`/`{text_b}`), `[MASK]` for the mask slot, or `{text: ..., shortenable: true}`
            for text that may be truncated, or `{prompt: N}` for N continuous-prompt tokens (P-tuning: their
            embeddings are learned; without it, `--data.prompt_tokens` puts them before Part A). Pieces are
            encoded separately, so leading spaces matter.
        pattern_b: optional Part B pieces (same syntax).
        verbalizer: {label: word} -- single-token cloze; each word must be one token (e.g. " great").
        choices: list of answer strings shared by all examples, one per label -- multi-token cloze.
        choices_field: column holding a per-example list of answers; the label is the correct index.
        metrics: names from `openglm.tasks.metrics.METRICS` (default [accuracy]).
        max_seq_length, length_penalty, loss_func, standardize_punctuation: as for the built-in tasks.
        classifier: {text_a: template, text_b: template} inputs of the classifier-head baseline.
        defaults: {epochs, batch_size, lr, weight_decay, warmup} fine-tuning defaults of this task.

    Args:
        path: the YAML file.

    Returns:
        The task.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a task file must be a YAML mapping")
    return CustomTask(spec, str(path), path.parent)
