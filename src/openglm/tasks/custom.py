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

from openglm.tasks.cloze import LOSS_FUNCS, MASK, ClozeTask, Example, Fragment
from openglm.tasks.files import Rows, line_of, not_utf8, read_jsonl, read_text, row_field, show_value
from openglm.tasks.metrics import METRICS
from openglm.tasks.superglue import standardize_punctuation

MASK_STRING = "[MASK]"
_KEYS = {
    "name", "format", "data", "fields", "labels", "pattern", "pattern_b", "verbalizer", "choices",
    "choices_field", "metrics", "max_seq_length", "length_penalty", "loss_func", "classifier", "defaults",
    "standardize_punctuation",
}  # fmt: skip
# The fine-tuning defaults a task may set, and what each must be.
_DEFAULT_KEYS = {
    "epochs": "a positive integer",
    "batch_size": "a positive integer",
    "lr": "a positive number",
    "weight_decay": "a number >= 0",
    "warmup": "a fraction in [0, 1)",
}
_SPLITS = ("train", "dev", "test")
_FORMATS = ("jsonl", "tsv", "csv")
_SCALAR = (str, int, float, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_list(value: Any, kinds: type | tuple[type, ...]) -> bool:
    return isinstance(value, list) and all(isinstance(v, kinds) for v in value)


def _default_ok(key: str, value: Any) -> bool:
    if not _is_number(value):
        return False
    if key in ("epochs", "batch_size"):
        return isinstance(value, int) and value > 0
    if key == "lr":
        return value > 0
    if key == "warmup":
        return 0 <= value < 1
    return value >= 0


class CustomTask(ClozeTask):
    """A task built from a YAML mapping; see `load_task` for the fields."""

    def __init__(self, spec: dict[str, Any], source: str = "task", base_dir: Path | None = None) -> None:
        self.source = source
        unknown = set(spec) - _KEYS
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_KEYS)}")
        name = self._need(spec, "name")
        self._check("name", name, isinstance(name, str) and bool(name.strip()), "a non-empty string")
        self.name = str(name)
        self.base_dir = base_dir or Path.cwd()
        data = self._need(spec, "data")
        if not isinstance(data, dict):
            raise ValueError(f"{source}: field 'data' must map split names (train/dev/test) to files")
        bad = set(data) - {"dir", *_SPLITS}
        if bad:
            raise ValueError(
                f"{source}: unknown key(s) {sorted(bad)} in 'data'; allowed: dir, {', '.join(_SPLITS)}"
            )
        for key, value in data.items():
            self._check(f"data.{key}", value, isinstance(value, str) and value, "a file or folder name")
        self.data_dir = data.get("dir")
        self.files = {k: v for k, v in data.items() if k != "dir"}
        if not self.files:
            raise ValueError(f"{source}: field 'data' names no split file (train/dev/test)")
        self.format = spec.get("format")
        if self.format is not None and self.format not in _FORMATS:
            raise ValueError(f"{source}: format={self.format!r}; expected one of {', '.join(_FORMATS)}")
        fields = spec.get("fields") or {}
        self._check("fields", fields, isinstance(fields, dict), "a mapping {text_a, text_b, label}")
        bad = set(fields) - {"text_a", "text_b", "label"}
        if bad:
            raise ValueError(
                f"{source}: unknown key(s) {sorted(bad)} in 'fields'; allowed: label, text_a, text_b"
            )
        for key, value in fields.items():
            self._check(f"fields.{key}", value, isinstance(value, str) and value, "a column name")
        self.text_a_field = fields.get("text_a", "text")
        self.text_b_field = fields.get("text_b")
        self.label_field = fields.get("label", "label")
        self.normalize = self._flag(spec, "standardize_punctuation")
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
        if labels is not None:
            # A string would be split into characters: labels: "01" is two labels "0" and "1" only by accident.
            self._check("labels", labels, _is_list(labels, _SCALAR) and labels, "a list of label values")
            self._unique("labels", [str(x) for x in labels])
        if verbalizer is not None:
            if not isinstance(verbalizer, dict) or not verbalizer:
                raise ValueError(f"{source}: 'verbalizer' must map each label to its label word")
            for label, word in verbalizer.items():
                self._check(
                    f"verbalizer[{label!r}]", word, isinstance(word, str) and word, 'a word, e.g. " great"'
                )
            self.label_list = [str(k) for k in (labels or verbalizer)]
            self.words = {str(k): v for k, v in verbalizer.items()}
            missing = [lb for lb in self.label_list if lb not in self.words]
            if missing:
                raise ValueError(f"{source}: 'verbalizer' has no word for label(s) {missing}")
            # Two labels with one word are the same class to the model: it could never tell them apart.
            self._unique("verbalizer", [self.words[lb] for lb in self.label_list], "words")
            self.multi_token = False
            self.choices = None
            self.choices_field = None
        else:
            self.multi_token = True
            if choices is not None:
                self._check(
                    "choices", choices, _is_list(choices, str) and choices, "a list of answer strings"
                )
                self._unique("choices", choices)
            if choices_field is not None:
                self._check("choices_field", choices_field, isinstance(choices_field, str), "a column name")
            self.choices = list(choices) if choices is not None else None
            self.choices_field = choices_field
            if self.choices is not None:
                self.label_list = [str(x) for x in (labels or range(len(self.choices)))]
                if len(self.label_list) != len(self.choices):
                    raise ValueError(
                        f"{source}: {len(self.label_list)} labels but {len(self.choices)} choices"
                    )
            else:
                self.label_list = [str(x) for x in labels] if labels else []
        metrics = spec.get("metrics") or ["accuracy"]
        self._check("metrics", metrics, _is_list(metrics, str), "a list of metric names, e.g. [accuracy]")
        self.metrics = tuple(metrics)
        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            raise ValueError(f"{source}: unknown metric(s) {bad}; expected some of {list(METRICS)}")
        self.max_seq_length = self._number(spec, "max_seq_length", 256, integer=True, low=1)
        self.length_penalty = float(self._number(spec, "length_penalty", 0.0, low=0))
        self.loss_func = spec.get("loss_func", "cross_entropy")
        if self.loss_func not in LOSS_FUNCS:
            raise ValueError(f"{source}: loss_func={self.loss_func!r}; expected one of {list(LOSS_FUNCS)}")
        classifier = spec.get("classifier") or {}
        self._check("classifier", classifier, isinstance(classifier, dict), "a mapping {text_a, text_b}")
        for key, value in classifier.items():
            self._check(
                f"classifier.{key}",
                value,
                key in ("text_a", "text_b") and isinstance(value, str),
                "a template string (keys text_a, text_b)",
            )
        self.classifier_a = classifier.get("text_a", "{text_a}")
        self.classifier_b = classifier.get("text_b", "{text_b}" if self.text_b_field else None)
        defaults = spec.get("defaults") or {}
        self._check(
            "defaults", defaults, isinstance(defaults, dict), f"a mapping with keys {sorted(_DEFAULT_KEYS)}"
        )
        bad = set(defaults) - set(_DEFAULT_KEYS)
        if bad:
            raise ValueError(
                f"{source}: unknown key(s) {sorted(bad)} in 'defaults'; allowed: {sorted(_DEFAULT_KEYS)}"
            )
        for key, value in defaults.items():
            self._check(f"defaults.{key}", value, _default_ok(key, value), _DEFAULT_KEYS[key])
        self.defaults = dict(defaults)
        self.pattern_ids = (0,)
        self.default_pattern = 0
        self.label_word_advice = (
            f"answers of several tokens go in 'choices' instead of 'verbalizer' ({source})"
        )

    def _check(self, key: str, value: Any, ok: Any, expected: str) -> None:
        if not ok:
            raise ValueError(f"{self.source}: field {key!r} must be {expected}, got {show_value(value, 60)}")

    def _unique(self, key: str, values: list[str], what: str = "values") -> None:
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(
                f"{self.source}: field {key!r} repeats the {what} {repeated}; each must be different"
            )

    def _flag(self, spec: dict[str, Any], key: str) -> bool:
        # bool("no") is True: only real YAML booleans are accepted.
        value = spec.get(key, False)
        self._check(key, value, isinstance(value, bool), "true or false")
        return value

    def _number(
        self, spec: dict[str, Any], key: str, default: float, integer: bool = False, low: float = 0
    ) -> Any:
        value = spec.get(key, default)
        ok = _is_number(value) and value >= low and (not integer or type(value) is int)
        self._check(key, value, ok, f"{'an integer' if integer else 'a number'} >= {low}")
        return value

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
                if extra or ("text" not in item and item.get("mask") is not True):
                    raise ValueError(
                        f"{self.source}: {key}[{i}] must be a string or {{text, shortenable}} / {{mask: true}}"
                        " / {prompt: N}"
                    )
                if "text" in item:
                    self._check(f"{key}[{i}].text", item["text"], isinstance(item["text"], str), "a string")
                for flag in ("shortenable", "mask"):
                    if flag in item:
                        self._check(
                            f"{key}[{i}].{flag}", item[flag], isinstance(item[flag], bool), "true or false"
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
        rows = read_jsonl(path) if fmt == "jsonl" else _read_table(path, fmt)
        if fmt != "jsonl" and rows and split == "train" and self.label_field not in rows[0]:
            # A misnamed label column would otherwise read as "every example unlabelled".
            raise ValueError(
                f"{path}: no column {self.label_field!r} (fields.label in {self.source}); the header has "
                f"{list(rows[0])}"
            )
        out = []
        for i, row in enumerate(rows):
            n = line_of(rows, i)
            text_a = self._text(row, self.text_a_field, path, n)
            text_b = self._text(row, self.text_b_field, path, n) if self.text_b_field else None
            label = row.get(self.label_field)
            if isinstance(label, list | dict):
                raise ValueError(
                    f"{path}:{n}: label field {self.label_field!r} must be a value, got {show_value(label, 60)}"
                )
            if label is not None:
                label = str(label).lower() if isinstance(label, bool) else str(label)
                # An empty label cell is how tables write "no label" (a test split).
                label = label if label.strip() else None
            if label is not None and self.label_list and label not in self.label_list:
                raise ValueError(f"{path}:{n}: label {label!r} is not one of {self.label_list}")
            meta = dict(row)
            if self.choices_field is not None:
                choices = row.get(self.choices_field)
                if not isinstance(choices, list) or not choices:
                    raise ValueError(
                        f"{path}:{n}: field {self.choices_field!r} must be a non-empty list of choices"
                    )
                meta["choices"] = [str(c) for c in choices]
            out.append(Example(f"{split}-{i}", text_a, text_b, label, meta, i, f"{path}:{n}"))
        return out

    def _text(self, row: dict[str, Any], field: str, path: Path, n: int) -> str:
        text = row_field(row, field, path, n)
        if not isinstance(text, str):
            raise ValueError(f"{path}:{n}: field {field!r} must be text, got {show_value(text, 60)}")
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
            # The label is the index of the correct choice.
            n_choices = len(example.meta["choices"])
            if not (example.label.isdigit() and int(example.label) < n_choices):
                raise ValueError(
                    f"{example.where(self.name)}: label {example.label!r} is not a choice index "
                    f"(0..{n_choices - 1})"
                )
            return int(example.label)
        return super().label_index(example, split)

    def classifier_texts(self, example: Example) -> list[tuple[str, str | None]]:
        b = self._fill(self.classifier_b, example) if self.classifier_b else None
        if self.multi_token:
            a = self._fill(self.classifier_a, example)
            return [(a, (b + " " if b else "") + choice.strip()) for choice in self.answers(example, 0)]
        return [(self._fill(self.classifier_a, example), b)]


def _read_table(path: Path, fmt: str) -> Rows:
    """The rows of a tsv/csv file with a header, as dicts, with the line each starts on.

    `csv.DictReader` would quietly keep the last of two same-named columns, fill a short row with None and put
    surplus cells under a None key; each of those is a broken file (an unterminated quote swallows the rest of
    the file into one cell, a tab inside a tsv text splits it), so they are refused here, by line.
    """
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    rows, lines = [], []
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.reader(
                f,
                delimiter="\t" if fmt == "tsv" else ",",
                quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL,
            )
            header = next(reader, None)
            if header is None:
                return Rows()
            repeated = sorted({c for c in header if header.count(c) > 1})
            if repeated:
                raise ValueError(f"{path}:1: the header names column(s) {repeated} more than once")
            end = reader.line_num
            for record in reader:
                start, end = end + 1, reader.line_num
                if not record:  # a blank line
                    continue
                # A quote left open runs the row on over the next lines, whatever its columns come to be.
                hint = f" (an unterminated quote? the row runs to line {end})" if end > start else ""
                if len(record) < len(header):
                    raise ValueError(
                        f"{path}:{start}: the row has {len(record)} of the header's {len(header)} columns, "
                        f"no {header[len(record) :]}{hint}"
                    )
                if any(cell.strip() for cell in record[len(header) :]):
                    hint = hint or (
                        " (a tab inside a text?)" if fmt == "tsv" else " (a comma outside quotes?)"
                    )
                    raise ValueError(
                        f"{path}:{start}: the row has {len(record)} columns but the header {len(header)}{hint}"
                    )
                rows.append(dict(zip(header, record, strict=False)))
                lines.append(start)
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except csv.Error as err:
        raise ValueError(f"{path}:{reader.line_num}: {err}") from None
    return Rows(rows, lines)


def _is_mask(item: Any) -> bool:
    return item == MASK_STRING or (isinstance(item, dict) and bool(item.get("mask")))


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: plain YAML keeps the last silently, so a
    second `dev:` would quietly replace the first."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        except TypeError:  # an unhashable key; construct_mapping reports it
            pass
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_task(path: str | Path) -> CustomTask:
    """Load a YAML task definition.

    Fields:
        name: task name (used in output files).
        data: {dir: optional base folder (relative to the YAML file), train: file, dev: file, test: file}.
            jsonl, tsv (header row) or csv, chosen by `format` or the file extension. Every row of a table
            has the header's columns; an empty label cell (or a row without the label field) is unlabelled,
            which only a test split may be (fine-tuning refuses unlabelled train/dev examples).
        fields: {text_a: column, text_b: column or omitted, label: column}.
        labels: list of the label values in class order (default: the verbalizer's keys or 0..n-1 for
            `choices`).
        pattern: list of pieces for Part A: a string (text with `{field}` placeholders, any column of the
            row plus `{text_a}`/`{text_b}`), `[MASK]` for the mask slot, or `{text: ..., shortenable: true}`
            for text that may be truncated, or `{prompt: N}` for N continuous-prompt tokens (P-tuning: their
            embeddings are learned; without it, `--data.prompt_tokens` puts them before Part A). Pieces are
            encoded separately, so leading spaces matter.
        pattern_b: optional Part B pieces (same syntax).
        verbalizer: {label: word} -- single-token cloze; each word must be one token (e.g. " great"), a
            different one for every label.
        choices: list of answer strings shared by all examples, one per label -- multi-token cloze.
        choices_field: column holding a per-example list of answers; the label is the correct index.
        metrics: names from `openglm.tasks.metrics.METRICS` (default [accuracy]).
        max_seq_length (integer), length_penalty (number), loss_func, standardize_punctuation (true/false):
            as for the built-in tasks; `shortenable` and `mask` of a piece are true/false as well.
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
        spec = yaml.load(read_text(path), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        # PyYAML's own message spans several lines (it quotes the source); keep the line and the problem.
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context = getattr(err, "context", None)
        raise ValueError(f"{where}: invalid YAML: {context + ', ' if context else ''}{problem}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a task file must be a YAML mapping")
    return CustomTask(spec, str(path), path.parent)
