"""The eight SuperGLUE tasks in cloze form (spec D.2-D.3, D.6, pitfall I.13): jsonl readers with the official
text normalisation, the official patterns (the task-file ids and the p0 that GLM-10B actually ran) and label
words, COPA's mirrored training examples, ReCoRD candidates, the WSC span repair, and per-task defaults.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from openglm.tasks.cloze import MASK, ClozeTask, Example, Fragment
from openglm.tasks.files import line_of, read_jsonl, row_field, row_text

# Official file names per split (the SuperGLUE release); `dev` is the validation file.
SPLIT_FILES = {"train": "train.jsonl", "dev": "val.jsonl", "test": "test.jsonl"}

_PUNCT_MAP = {"\u201c": '"', "\u201d": '"', "\u2019": "'", "\u2018": "'", "\u2013": "-"}


def standardize_punctuation(text: str) -> str:
    """Curly quotes -> straight quotes, en dash -> '-' (the official readers do this for all tasks but COPA)."""
    for src, dst in _PUNCT_MAP.items():
        text = text.replace(src, dst)
    return text


def remove_final_punctuation(text: str) -> str:
    """Strip trailing ASCII punctuation (all of it, as the official patterns do)."""
    return text.rstrip(string.punctuation)


def lowercase_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _bool_label(row: dict[str, Any]) -> str | None:
    return str(row["label"]).lower() if row.get("label") is not None else None


def _objects(value: Any, name: str, path: Path, n: int) -> list[dict[str, Any]]:
    """A field that must be a list of objects (MultiRC questions and answers, ReCoRD qas)."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ValueError(f"{path}:{n}: field {name!r} must be a list of objects")
    return value


def _index(row: dict[str, Any], name: str, path: Path, n: int) -> int:
    value = row_field(row, name, path, n)
    if type(value) is not int or value < 0:
        raise ValueError(f"{path}:{n}: field {name!r} must be a word index (an integer >= 0), got {value!r}")
    return value


def text_pair_examples(
    rows: list[dict[str, Any]],
    split: str,
    path: Path,
    fields: tuple[str, str],
    label: Callable[[dict[str, Any]], str | None],
    meta_fields: tuple[str, ...] = (),
) -> list[Example]:
    """Examples of a text-pair task (RTE, CB, BoolQ, WiC): two required text fields, punctuation standardised.

    Args:
        rows: the rows of the split file.
        split: the split name (goes into the guid `<split>-<idx>`).
        path: the file, for error messages.
        fields: the fields of `text_a` and `text_b`.
        label: `row -> raw label` (None when unlabelled).
        meta_fields: required fields copied into `meta`.

    Returns:
        One `Example` per row, `idx` from the row (its position when absent).
    """
    out = []
    for i, row in enumerate(rows):
        n = line_of(rows, i)
        idx = row.get("idx", i)
        out.append(
            Example(
                guid=f"{split}-{idx}",
                text_a=standardize_punctuation(row_text(row, fields[0], path, n)),
                text_b=standardize_punctuation(row_text(row, fields[1], path, n)),
                label=label(row),
                meta={name: row_text(row, name, path, n) for name in meta_fields},
                idx=idx,
                location=f"{path}:{n}",
            )
        )
    return out


@dataclass(frozen=True)
class Defaults:
    """Official fine-tuning hyper-parameters (spec D.6) for Base/Large and for GLM-10B."""

    epochs: int
    epochs_10b: int
    batch_size: int = 16


class SuperGLUETask(ClozeTask):
    """Common reader plumbing: `read(path, split)` accepts a data directory (official file names) or a file."""

    defaults: Defaults = Defaults(epochs=50, epochs_10b=50)

    def read(self, path: str | Path, split: str) -> list[Example]:
        path = Path(path)
        if path.is_dir():
            if split not in SPLIT_FILES:
                raise ValueError(f"unknown split {split!r}; expected one of {list(SPLIT_FILES)}")
            path = path / SPLIT_FILES[split]
        rows = read_jsonl(path)
        return self.make_examples(rows, split, path)

    def make_examples(self, rows: list[dict[str, Any]], split: str, path: Path) -> list[Example]:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------------------


class RTE(SuperGLUETask):
    name = "rte"
    label_list = ["entailment", "not_entailment"]
    pattern_ids = (0, 1, 2, 3, 4)
    default_pattern = 0
    defaults = Defaults(epochs=50, epochs_10b=50)
    words = {"entailment": " Yes", "not_entailment": " No", "contradiction": " No", "neutral": " Maybe"}
    words_tf = {
        "entailment": " true",
        "not_entailment": " false",
        "contradiction": " false",
        "neutral": " neither",
    }
    tf_question = " True or False?"

    def make_examples(self, rows: list[dict[str, Any]], split: str, path: Path) -> list[Example]:
        return text_pair_examples(rows, split, path, ("premise", "hypothesis"), lambda row: row.get("label"))

    def pattern(self, example: Example, pattern_id: int) -> tuple[list[Fragment], list[Fragment]]:
        premise = example.text_a
        hypothesis = remove_final_punctuation(example.text_b or "")
        if pattern_id == 0:
            return [Fragment('"'), Fragment(hypothesis, True), Fragment('" ?')], [
                MASK,
                Fragment(","),
                Fragment(' "'),
                Fragment(premise, True),
                Fragment('"'),
            ]
        if pattern_id == 1:
            return [Fragment(hypothesis, True), Fragment("?")], [
                MASK,
                Fragment(","),
                Fragment(" " + premise, True),
            ]
        if pattern_id == 2:
            return [Fragment('"'), Fragment(hypothesis, True), Fragment('" ?')], [
                MASK,
                Fragment('. "'),
                Fragment(premise, True),
                Fragment('"'),
            ]
        if pattern_id == 3:
            return [Fragment(hypothesis, True), Fragment("?")], [
                MASK,
                Fragment("."),
                Fragment(" " + premise, True),
            ]
        return [
            Fragment(premise, True),
            Fragment(" question:"),
            Fragment(" " + hypothesis, True),
            Fragment(self.tf_question),
            Fragment(" answer:"),
            MASK,
        ], []

    def verbalizer(self, pattern_id: int) -> list[str]:
        words = self.words_tf if pattern_id == 4 else self.words
        return [words[label] for label in self.label_list]

    def classifier_texts(self, example: Example) -> list[tuple[str, str | None]]:
        return [(example.text_a, example.text_b)]


class CB(RTE):
    name = "cb"
    label_list = ["entailment", "contradiction", "neutral"]
    default_pattern = 3
    defaults = Defaults(epochs=50, epochs_10b=100)
    tf_question = " true, false or neither?"
    metrics = ("accuracy", "f1_macro")


class BoolQ(SuperGLUETask):
    name = "boolq"
    label_list = ["false", "true"]
    pattern_ids = (0, 1, 2, 3, 4, 5)
    default_pattern = 4
    defaults = Defaults(epochs=20, epochs_10b=24)

    def make_examples(self, rows: list[dict[str, Any]], split: str, path: Path) -> list[Example]:
        return text_pair_examples(rows, split, path, ("passage", "question"), _bool_label)

    def pattern(self, example: Example, pattern_id: int) -> tuple[list[Fragment], list[Fragment]]:
        passage, question = Fragment(example.text_a, True), Fragment(" " + (example.text_b or ""), True)
        if pattern_id in (0, 1):
            return [passage, Fragment(" Question:"), question, Fragment("? Answer:"), MASK, Fragment(".")], []
        if pattern_id in (2, 3):
            return [
                passage,
                Fragment(" Based on the previous passage,"),
                question,
                Fragment("?"),
                MASK,
                Fragment("."),
            ], []
        return [
            Fragment("Based on the following passage"),
            question,
            Fragment("?"),
            MASK,
            Fragment("."),
            Fragment(" " + example.text_a, True),
        ], []

    def verbalizer(self, pattern_id: int) -> list[str]:
        return [" No", " Yes"] if pattern_id % 2 == 0 else [" false", " true"]


class WiC(SuperGLUETask):
    name = "wic"
    label_list = ["false", "true"]
    pattern_ids = (0, 1, 2)
    default_pattern = 1
    defaults = Defaults(epochs=30, epochs_10b=40)

    def make_examples(self, rows: list[dict[str, Any]], split: str, path: Path) -> list[Example]:
        return text_pair_examples(
            rows, split, path, ("sentence1", "sentence2"), _bool_label, meta_fields=("word",)
        )

    def pattern(self, example: Example, pattern_id: int) -> tuple[list[Fragment], list[Fragment]]:
        s1, s2, word = example.text_a, example.text_b or "", example.meta["word"]
        if pattern_id == 0:
            return [
                Fragment('"' + s1 + '" / "' + s2 + '"', True),
                Fragment(' Similar sense of "' + word + '"?'),
                MASK,
                Fragment("."),
            ], []
        if pattern_id == 1:
            return [
                Fragment(s1, True),
                Fragment(" " + s2, True),
                Fragment(" Does " + word + " have the same meaning in both sentences?"),
                MASK,
            ], []
        return [
            Fragment(word),
            Fragment(" ."),
            Fragment(' Sense (1) (a) "'),
            Fragment(s1, True),
            Fragment('"'),
            Fragment(" ("),
            MASK,
            Fragment(') "'),
            Fragment(s2, True),
            Fragment('"'),
        ], []

    def verbalizer(self, pattern_id: int) -> list[str]:
        return ["2", "b"] if pattern_id == 2 else [" No", " Yes"]


class MultiRC(SuperGLUETask):
    name = "multirc"
    label_list = [0, 1]
    pattern_ids = (0,)
    default_pattern = 0
    max_seq_length = 512
    defaults = Defaults(epochs=15, epochs_10b=12, batch_size=64)
    metrics = ("f1a", "em", "accuracy")

    def make_examples(self, rows: list[dict[str, Any]], split: str, path: Path) -> list[Example]:
        out = []
        for i, row in enumerate(rows):
            n = line_of(rows, i)
            passage = row_field(row, "passage", path, n)
            p_idx = row.get("idx", i)
            text = standardize_punctuation(row_text(passage, "text", path, n))
            for q in _objects(row_field(passage, "questions", path, n), "questions", path, n):
                q_idx = row_field(q, "idx", path, n)
                question = standardize_punctuation(row_text(q, "question", path, n))
                for a in _objects(row_field(q, "answers", path, n), "answers", path, n):
                    a_idx = row_field(a, "idx", path, n)
                    out.append(
                        Example(
                            guid=f"{split}-p{p_idx}-q{q_idx}-a{a_idx}",
                            text_a=text,
                            text_b=question,
                            label=a.get("label"),
                            meta={
                                "passage_idx": p_idx,
                                "question_idx": q_idx,
                                "answer_idx": a_idx,
                                "answer": standardize_punctuation(row_text(a, "text", path, n)),
                            },
                            idx=[p_idx, q_idx, a_idx],
                            location=f"{path}:{n}",
                        )
                    )
        return out

    def pattern(self, example: Example, pattern_id: int) -> tuple[list[Fragment], list[Fragment]]:
        passage = remove_final_punctuation(example.text_a.rstrip())
        question = remove_final_punctuation((example.text_b or "").rstrip())
        return [
            Fragment(passage, True),
            Fragment("."),
            Fragment(" Question:"),
            Fragment(" " + question + "?"),
            Fragment(" Is it"),
            Fragment(" " + example.meta["answer"]),
            Fragment("?"),
            MASK,
            Fragment("."),
        ], []

    def verbalizer(self, pattern_id: int) -> list[str]:
        return [" No", " Yes"]

    def classifier_texts(self, example: Example) -> list[tuple[str, str | None]]:
        return [(example.text_a, (example.text_b or "") + " " + example.meta["answer"])]


class COPA(SuperGLUETask):
    name = "copa"
    label_list = [0, 1]
    multi_token = True
    pattern_ids = (0, 1)
    default_pattern = 0
    defaults = Defaults(epochs=50, epochs_10b=100)

    def make_examples(self, rows: list[dict[str, Any]], split: str, path: Path) -> list[Example]:
        out = []
        for i, row in enumerate(rows):
            n = line_of(rows, i)
            idx = row.get("idx", i)
            meta = {k: row_text(row, k, path, n) for k in ("choice1", "choice2", "question")}
            label = row.get("label")
            # COPA is the one reader without punctuation standardisation.
            premise = row_text(row, "premise", path, n)
            out.append(Example(f"{split}-{idx}", premise, None, label, meta, idx, f"{path}:{n}"))
        if split == "train":
            # Mirrored copies (choices swapped, label flipped) are appended after the originals (spec D.3).
            mirrors = [
                Example(
                    guid=ex.guid + "m",
                    text_a=ex.text_a,
                    label=None if ex.label is None else 1 - self.label_index(ex, split),
                    meta={
                        "choice1": ex.meta["choice2"],
                        "choice2": ex.meta["choice1"],
                        "question": ex.meta["question"],
                    },
                    idx=ex.idx,
                    location=ex.location,
                )
                for ex in out
            ]
            out += mirrors
        return out

    @staticmethod
    def _choice(text: str) -> str:
        return remove_final_punctuation(lowercase_first(text))

    def pattern(self, example: Example, pattern_id: int) -> tuple[list[Fragment], list[Fragment]]:
        premise = Fragment(" " + remove_final_punctuation(example.text_a), True)
        c1, c2 = self._choice(example.meta["choice1"]), self._choice(example.meta["choice2"])
        question = example.meta["question"]
        if question not in ("cause", "effect"):
            raise ValueError(f"copa: example {example.guid} has question {question!r}; expected cause/effect")
        joiner = Fragment(" because" if question == "cause" else ", so")
        if pattern_id == 0:
            return [
                Fragment('"'),
                Fragment(c1),
                Fragment('" or "'),
                Fragment(c2),
                Fragment('"?'),
                premise,
                joiner,
                MASK,
                Fragment("."),
            ], []
        return [
            Fragment(c1),
            Fragment(" or"),
            Fragment(" " + c2),
            Fragment("?"),
            premise,
            joiner,
            MASK,
            Fragment("."),
        ], []

    def answers(self, example: Example, pattern_id: int) -> list[str]:
        return [" " + self._choice(example.meta["choice1"]), " " + self._choice(example.meta["choice2"])]

    def label_index(self, example: Example, split: str) -> int:
        if example.label is None:
            return -1
        # 0 and 1 only: int() would also take "1", 1.7 or True and quietly train on a guess.
        if type(example.label) is not int or example.label not in (0, 1):
            raise ValueError(f"{example.where(self.name)}: label {example.label!r} is not 0 or 1")
        return example.label

    def classifier_texts(self, example: Example) -> list[tuple[str, str | None]]:
        joiner = "because" if example.meta["question"] == "cause" else "so"
        return [(example.text_a, f"{joiner} {example.meta[c]}") for c in ("choice1", "choice2")]


class WSC(SuperGLUETask):
    name = "wsc"
    label_list = ["False", "True"]
    multi_token = True
    pattern_ids = (0, 2)
    default_pattern = 2
    max_seq_length = 128
    length_penalty = 1.0
    loss_func = "mix"
    defaults = Defaults(epochs=50, epochs_10b=100)

    def make_examples(self, rows: list[dict[str, Any]], split: str, path: Path) -> list[Example]:
        out = []
        for i, row in enumerate(rows):
            n = line_of(rows, i)
            idx = row.get("idx", i)
            target = row_field(row, "target", path, n)
            label = str(row["label"]) if row.get("label") is not None else None
            words = row_text(row, "text", path, n).split()
            span1, span2 = row_text(target, "span1_text", path, n), row_text(target, "span2_text", path, n)
            i1, i2 = _index(target, "span1_index", path, n), _index(target, "span2_index", path, n)
            if not i2 < len(words):
                raise ValueError(f"{path}:{n}: span2_index {i2} is past the text's {len(words)} words")
            # Some official indices are off by one word: look one word left/right for the span.
            span1_words = span1.lower().split()
            lower = [w.lower() for w in words]
            if lower[i1 : i1 + len(span1_words)] != span1_words:
                for off in (-1, 1):
                    if lower[i1 + off : i1 + off + len(span1_words)] == span1_words:
                        i1 += off
            if words[i2] != span2:
                for off in (-1, 1):
                    if 0 <= i2 + off < len(words) and words[i2 + off] == span2:
                        i2 += off
                if words[i2] != span2 and words[i2].startswith(span2):
                    words = words[:i2] + [words[i2][: len(span2)], words[i2][len(span2) :]] + words[i2 + 1 :]
            if words[i2] != span2:
                raise ValueError(f"{path}: row {n}: pronoun {span2!r} not found at word {i2}")
            meta = {"span1_text": span1, "span2_text": span2, "span1_index": i1, "span2_index": i2}
            if "candidates" in row:
                meta["candidates"] = list(row["candidates"])
            if split == "train" and label != "True":
                continue  # training keeps the positive examples only (the correct span is the answer)
            out.append(Example(f"{split}-{idx}", " ".join(words), None, label, meta, idx, f"{path}:{n}"))
        return out

    def pattern(self, example: Example, pattern_id: int) -> tuple[list[Fragment], list[Fragment]]:
        pronoun, i2 = example.meta["span2_text"], example.meta["span2_index"]
        words = example.text_a.split()
        words[i2] = "*" + words[i2] + "*"
        text = Fragment(" ".join(words), True)
        if pattern_id == 0:
            return [text, Fragment(" The pronoun '*" + pronoun + "*' refers to"), MASK, Fragment(".")], []
        return [
            text,
            Fragment(" Question: In the passage above, what does the pronoun '*" + pronoun + "*' refer to?"),
            Fragment(" Answer:"),
            MASK,
            Fragment("."),
        ], []

    def answers(self, example: Example, pattern_id: int) -> list[str]:
        return [" " + example.meta["span1_text"]] + [" " + c for c in example.meta.get("candidates", [])]

    def predict(self, example: Example, scores: Sequence[float]) -> int:
        # "True" iff the marked span (choice 0) beats every negative candidate (spec D.3).
        return (
            self.label_list.index("True")
            if int(np.argmax(np.asarray(scores))) == 0
            else self.label_list.index("False")
        )

    def label_index(self, example: Example, split: str) -> int:
        # Training examples are all positives whose correct answer is choice 0 (spec D.3, `--loss-func mix`).
        if split == "train":
            return 0
        return super().label_index(example, split)

    def classifier_texts(self, example: Example) -> list[tuple[str, str | None]]:
        return [(example.text_a, example.meta["span2_text"] + " " + example.meta["span1_text"])]


class ReCoRD(SuperGLUETask):
    name = "record"
    label_list = ["0", "1"]
    multi_token = True
    pattern_ids = (0,)
    default_pattern = 0
    max_seq_length = 512
    defaults = Defaults(epochs=5, epochs_10b=3, batch_size=64)
    metrics = ("record_em", "record_f1")
    max_train_candidates = 10
    seed = 42

    def make_examples(self, rows: list[dict[str, Any]], split: str, path: Path) -> list[Example]:
        out = []
        # The official reader shuffles negatives with Python's `random.Random(42)`; reproducing its stream
        # needs the same generator, not numpy's.
        shuffler = random.Random(self.seed)
        for i, row in enumerate(rows):
            n = line_of(rows, i)
            p_idx = row.get("idx", i)
            passage = row_field(row, "passage", path, n)
            raw = row_text(passage, "text", path, n)
            entities = sorted({raw[e["start"] : e["end"] + 1] for e in passage.get("entities", [])})
            text = standardize_punctuation(raw.replace("@highlight\n", "- "))
            for q in _objects(row_field(row, "qas", path, n), "qas", path, n):
                q_idx = row_field(q, "idx", path, n)
                question = standardize_punctuation(row_text(q, "query", path, n))
                answers = list(dict.fromkeys(row_text(a, "text", path, n) for a in q.get("answers", [])))
                if split == "train":
                    for a_idx, answer in enumerate(answers):
                        negatives = [e for e in entities if e not in answers]
                        if len(negatives) > self.max_train_candidates - 1:
                            shuffler.shuffle(negatives)
                            negatives = negatives[: self.max_train_candidates - 1]
                        meta = {
                            "passage_idx": p_idx,
                            "question_idx": q_idx,
                            "candidates": [answer, *negatives],
                            "answers": [answer],
                        }
                        out.append(
                            Example(
                                f"{split}-p{p_idx}-q{q_idx}-a{a_idx}",
                                text,
                                question,
                                "0",
                                meta,
                                [p_idx, q_idx, a_idx],
                                f"{path}:{n}",
                            )
                        )
                else:
                    meta = {
                        "passage_idx": p_idx,
                        "question_idx": q_idx,
                        "candidates": entities,
                        "answers": answers,
                    }
                    # A query without answers (the test split) is unlabelled: scored, it would count as wrong.
                    label = "1" if answers else None
                    out.append(
                        Example(
                            f"{split}-p{p_idx}-q{q_idx}", text, question, label, meta, q_idx, f"{path}:{n}"
                        )
                    )
        return out

    def pattern(self, example: Example, pattern_id: int) -> tuple[list[Fragment], list[Fragment]]:
        query = example.text_b or ""
        if "@placeholder" not in query:
            raise ValueError(f"record: example {example.guid} has no @placeholder in its query")
        qa, qb = query.split("@placeholder", 1)
        return [Fragment(example.text_a, True), Fragment(" " + qa.rstrip()), MASK, Fragment(qb)], []

    def answers(self, example: Example, pattern_id: int) -> list[str]:
        return [" " + c for c in example.meta["candidates"]]

    def classifier_texts(self, example: Example) -> list[tuple[str, str | None]]:
        query = example.text_b or ""
        return [(example.text_a, query.replace("@placeholder", c)) for c in example.meta["candidates"]]


TASKS: dict[str, type[SuperGLUETask]] = {
    cls.name: cls for cls in (RTE, CB, BoolQ, WiC, MultiRC, COPA, WSC, ReCoRD)
}
# Directory names of the official release, for `--data-dir` defaults.
TASK_DIRS = {
    "rte": "RTE",
    "cb": "CB",
    "boolq": "BoolQ",
    "wic": "WiC",
    "multirc": "MultiRC",
    "copa": "COPA",
    "wsc": "WSC",
    "record": "ReCoRD",
}


def get_task(name: str) -> SuperGLUETask:
    """The SuperGLUE task called `name` (case-insensitive)."""
    key = name.lower()
    if key not in TASKS:
        raise ValueError(f"unknown SuperGLUE task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[key]()
