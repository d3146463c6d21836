"""Cloze (PET-style) classification (spec D.1-D.2): pattern fragments -> model inputs, per-task truncation,
single-token (label words read at <|startofpiece|>) and multi-token (summed answer log-probabilities) scoring,
and the cloze losses. Task definitions (readers, patterns, verbalizers) live in `superglue.py` / `custom.py`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

LOSS_FUNCS = ("cross_entropy", "hinge", "generative", "mix")
# Score given to padded choices so that they never win and carry no probability (official value).
PADDED_CHOICE_SCORE = -10000.0


class Tokenizer(Protocol):
    """What the cloze builder needs from `openglm.tokenizer.GLMTokenizer`."""

    cls_id: int
    sep_id: int
    eos_id: int
    mask_id: int
    sop_id: int
    eop_id: int

    def encode(self, text: str) -> list[int]: ...


@dataclass
class Example:
    """One labelled (or unlabelled) task example, as the readers produce it.

    Attributes:
        guid: unique id, `<split>-<idx>` for the SuperGLUE readers.
        text_a: first text (premise, passage, sentence, ...).
        text_b: second text or None.
        label: the raw label value, an element of the task's `label_list` (None when unlabelled).
        meta: task-specific extras (choices, answers, candidate entities, the WiC word, ...).
        idx: the dataset's own index (int, or a list for MultiRC).
        location: where the example was read from, `file:line`, for error messages ("" when not from a file).
    """

    guid: str
    text_a: str
    text_b: str | None = None
    label: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    idx: Any = None
    location: str = ""

    def where(self, task_name: str) -> str:
        """The example's file and line, or the task and guid when it was not read from a file."""
        return self.location or f"task {task_name}: example {self.guid}"


@dataclass(frozen=True)
class Fragment:
    """One piece of a filled pattern. `text=None` is the mask slot; shortenable pieces may be truncated;
    `prompt=N` (with `text=None`) stands for N continuous-prompt placeholders (P-tuning, spec D.5)."""

    text: str | None
    shortenable: bool = False
    prompt: int = 0

    @property
    def is_mask(self) -> bool:
        return self.text is None and not self.prompt


MASK = Fragment(None)
# Continuous-prompt placeholders in encoded ids until the row is built; then they become id 0 and their
# positions go to `prompt_pos` (the model overwrites their embeddings).
PROMPT_PLACEHOLDER = -1


class ClozeTask:
    """A classification task in cloze form. Subclasses define the reader, patterns and label words.

    Attributes:
        name: task name (`rte`, `copa`, or the YAML task's name).
        label_list: the label values in label order (index = class id).
        multi_token: score whole answers (COPA/WSC/ReCoRD style) instead of one label word.
        pattern_ids: the pattern ids this task supports; `default_pattern` is used when none is given.
        max_seq_length: the official maximum input length.
        length_penalty: multi-token scores are divided by |answer|**length_penalty when > 0.
        loss_func: default loss (`cross_entropy`, `hinge`, `generative`, `mix`).
        metrics: names understood by `openglm.tasks.metrics.compute_metrics`.
        label_field: the data field holding the label, for messages about unlabelled examples.
        label_word_advice: what to do when a label word is not one token of the tokenizer.
    """

    name: str = "task"
    label_list: list[Any] = []
    multi_token: bool = False
    pattern_ids: tuple[int, ...] = (0,)
    default_pattern: int = 0
    max_seq_length: int = 256
    length_penalty: float = 0.0
    loss_func: str = "cross_entropy"
    metrics: tuple[str, ...] = ("accuracy",)
    label_field: str = "label"
    # A built-in task's label words are fixed by the official patterns, so only the tokenizer can change.
    label_word_advice: str = (
        "this built-in task needs a tokenizer that has each of its label words as one token (the official GLM "
        "tokenizers do); another --data.pattern_id may use other words"
    )

    def read(self, path: str, split: str) -> list[Example]:
        """Read the examples of one split from `path`."""
        raise NotImplementedError(f"task {self.name} has no reader")

    def pattern(self, example: Example, pattern_id: int) -> tuple[list[Fragment], list[Fragment]]:
        """Parts A and B of the filled pattern for `example` (exactly one `MASK` fragment in total)."""
        raise NotImplementedError(f"task {self.name} has no pattern")

    def verbalizer(self, pattern_id: int) -> list[str]:
        """Single-token tasks: the label word of every label, in `label_list` order."""
        raise NotImplementedError(f"task {self.name} is multi-token and has no verbalizer")

    def answers(self, example: Example, pattern_id: int) -> list[str]:
        """Multi-token tasks: the answer strings, one row each."""
        raise NotImplementedError(f"task {self.name} is single-token and has no answer list")

    def classifier_texts(self, example: Example) -> list[tuple[str, str | None]]:
        """Classifier-head baseline (spec D.4): (text_a, text_b) per row; several rows = multiple choice."""
        return [(example.text_a, example.text_b)]

    def label_index(self, example: Example, split: str) -> int:
        """Class id of the example (-1 when unlabelled)."""
        if example.label is None:
            return -1
        try:
            return self.label_list.index(example.label)
        except ValueError:
            raise ValueError(
                f"{example.where(self.name)}: label {example.label!r} is not one of {self.label_list}"
            ) from None

    def predict(self, example: Example, scores: Sequence[float]) -> int:
        """Predicted label index from this example's label/choice scores (argmax; ReCoRD: candidate index)."""
        return int(np.argmax(np.asarray(scores)))

    def check_pattern(self, pattern_id: int | None) -> int:
        pid = self.default_pattern if pattern_id is None else pattern_id
        if pid not in self.pattern_ids:
            raise ValueError(
                f"task {self.name}: pattern id {pid} is not defined; available: {list(self.pattern_ids)}"
            )
        return pid


# --------------------------------------------------------------------------------------------------------------
# Input construction (spec D.1 / D.2)


EncodedPart = list[tuple[list[int], bool]]


def encode_parts(tokenizer: Tokenizer, parts: Sequence[Fragment]) -> EncodedPart:
    """Encode every fragment on its own (spec B.1: no BPE merge crosses a fragment, leading spaces matter).

    Empty text fragments are dropped, as the official builder does; the mask slot becomes [MASK].
    """
    out: EncodedPart = []
    for frag in parts:
        if frag.prompt:
            out.append(([PROMPT_PLACEHOLDER] * frag.prompt, False))
        elif frag.is_mask:
            out.append(([tokenizer.mask_id], False))
        elif frag.text:
            out.append((list(tokenizer.encode(frag.text)), frag.shortenable))
    return out


def _shortenable_length(parts: EncodedPart) -> int:
    return sum(len(ids) for ids, shortenable in parts if shortenable)


def _remove_last(parts: EncodedPart) -> None:
    candidates = [i for i, (ids, shortenable) in enumerate(parts) if shortenable and ids]
    if not candidates:
        raise ValueError("cloze input is too long and has no shortenable text left to truncate")
    i = candidates[-1]
    parts[i] = (parts[i][0][:-1], True)


def truncate(parts_a: EncodedPart, parts_b: EncodedPart, answer_length: int, max_length: int) -> bool:
    """Shorten the parts in place so that the whole row fits `max_length` (spec D.2).

    The row is [CLS] A B eos [sop] answer[:-1] (answer = answer ids + eop), i.e. len(A) + len(B) + 3 +
    `answer_length` tokens (`answer_length` = 0 for single-token tasks, whose Part B is a lone [sop]). One token
    at a time is removed from the end of the last non-empty shortenable fragment of whichever part has more
    shortenable tokens; ties go to part B.

    Returns:
        Whether anything was removed.
    """
    total = sum(len(ids) for ids, _ in parts_a) + sum(len(ids) for ids, _ in parts_b) + 3 + answer_length
    excess = total - max_length
    if excess <= 0:
        return False
    for _ in range(excess):
        if _shortenable_length(parts_a) > _shortenable_length(parts_b):
            _remove_last(parts_a)
        else:
            _remove_last(parts_b)
    return True


@dataclass
class ClozeRow:
    """One model row built by `build_input` (spec D.1); every array has length `max_seq_length`."""

    input_ids: np.ndarray  # [S]
    position_ids: np.ndarray  # [2, S]: positions, block positions
    sep: int
    targets: np.ndarray  # [S]
    loss_mask: np.ndarray  # [S]


def build_input(
    tokens_a: list[int],
    tokens_b: list[int] | None,
    answer_ids: list[int] | None,
    max_seq_length: int,
    tokenizer: Tokenizer,
    add_sep: bool = False,
    add_piece: bool = True,
) -> ClozeRow:
    """The official fine-tuning row: [CLS] A ([SEP]) B eos, then [sop] + answer[:-1] (spec D.1).

    Args:
        tokens_a: Part A text ids (pattern part A).
        tokens_b: pattern part B ids, or None.
        answer_ids: answer ids including the final eop, or None (a lone [sop] with target 0 is appended
            when `add_piece`).
        max_seq_length: row length; shorter rows are padded with eos ids and position 0.
        tokenizer: provides the special-token ids.
        add_sep: put [SEP] between A and B (classifier-head inputs, spec D.4).
        add_piece: append the [sop] piece (cloze inputs).

    Returns:
        The row. Its Part B position is the index of the last [MASK] in Part A; block positions count 1, 2, ...
    """
    ids = [tokenizer.cls_id, *tokens_a]
    if tokens_b is not None:
        if add_sep:
            ids.append(tokenizer.sep_id)
        ids.extend(tokens_b)
    # The official builder hard-cuts what the pattern truncation could not shorten (eos must still fit).
    if len(ids) >= max_seq_length - 1:
        ids = ids[: max_seq_length - 1]
    ids.append(tokenizer.eos_id)
    sep = len(ids)
    positions = list(range(sep))
    blocks = [0] * sep
    targets = [0] * sep
    loss_mask = [0] * sep
    if add_piece or answer_ids is not None:
        mask_positions = [i for i, t in enumerate(ids) if t == tokenizer.mask_id]
        if not mask_positions:
            raise ValueError("cloze input has no [MASK] token in Part A (the pattern needs a mask slot)")
        mask_position = mask_positions[-1]  # the *last* mask (spec I.14)
        ids.append(tokenizer.sop_id)
        positions.append(mask_position)
        blocks.append(1)
        if answer_ids is not None:
            ids.extend(answer_ids[:-1])
            positions.extend([mask_position] * (len(answer_ids) - 1))
            blocks.extend(range(2, len(answer_ids) + 1))
            targets.extend(answer_ids)
            loss_mask.extend([1] * len(answer_ids))
        else:
            targets.append(0)
            loss_mask.append(1)
    if len(ids) > max_seq_length:
        raise ValueError(f"cloze row of {len(ids)} tokens exceeds max_seq_length={max_seq_length}")
    pad = max_seq_length - len(ids)
    ids.extend([tokenizer.eos_id] * pad)
    positions.extend([0] * pad)
    blocks.extend([0] * pad)
    targets.extend([0] * pad)
    loss_mask.extend([0] * pad)
    return ClozeRow(
        input_ids=np.asarray(ids, dtype=np.int64),
        position_ids=np.asarray([positions, blocks], dtype=np.int64),
        sep=sep,
        targets=np.asarray(targets, dtype=np.int64),
        loss_mask=np.asarray(loss_mask, dtype=np.int64),
    )


@dataclass
class ClozeSample:
    """Model inputs of one example.

    Single-token: `input_ids` [S], `position_ids` [2, S], `sep` int, `loss_mask` [S] (1 at sep, the position
    whose logits are read), `label_ids` [K] the label-word ids. Multi-token: `input_ids` [C, S],
    `position_ids` [C, 2, S], `sep` [C], `targets`/`loss_mask` [C, S] (answer ids + eop from index sep).
    """

    input_ids: np.ndarray
    position_ids: np.ndarray
    sep: Any
    loss_mask: np.ndarray
    label: int
    uid: str
    targets: np.ndarray | None = None
    label_ids: np.ndarray | None = None
    truncated: bool = False
    prompt_pos: np.ndarray | None = None  # [n] or [C, n]: the continuous-prompt placeholders (P-tuning)

    @property
    def num_choices(self) -> int:
        return 1 if self.input_ids.ndim == 1 else int(self.input_ids.shape[0])

    @classmethod
    def from_rows(
        cls, rows: Sequence[ClozeRow], label: int, uid: str, truncated: bool = False
    ) -> ClozeSample:
        """A multi-row sample (one row per choice or answer) from rows of `build_input`.

        Args:
            rows: the rows, all of one length S.
            label: index of the gold row (or the example's label index).
            uid: the example's id.
            truncated: whether any row lost tokens to the length limit.

        Returns:
            A sample with `input_ids`/`targets`/`loss_mask` [C, S], `position_ids` [C, 2, S], `sep` [C].
        """
        input_ids = np.stack([r.input_ids for r in rows])
        return cls(
            input_ids=input_ids,
            position_ids=np.stack([r.position_ids for r in rows]),
            sep=np.asarray([r.sep for r in rows], dtype=np.int64),
            loss_mask=np.stack([r.loss_mask for r in rows]),
            targets=np.stack([r.targets for r in rows]),
            label=label,
            uid=uid,
            truncated=truncated,
            prompt_pos=take_prompts(input_ids, uid),
        )


def take_prompts(input_ids: np.ndarray, uid: str) -> np.ndarray | None:
    """Positions of the continuous-prompt placeholders of a row [S] or rows [C, S] ([n] / [C, n]), which
    become id 0 in place; None when there are none."""
    found = input_ids == PROMPT_PLACEHOLDER
    if not found.any():
        return None
    counts = found.sum(-1)
    if np.any(counts != counts.flat[0]):
        raise ValueError(f"example {uid}: its rows keep different numbers of prompt tokens {counts.tolist()}")
    input_ids[found] = 0
    if input_ids.ndim == 1:
        return np.flatnonzero(found)
    return np.stack([np.flatnonzero(row) for row in found])


def verbalizer_ids(task: ClozeTask, tokenizer: Tokenizer, pattern_id: int) -> list[int]:
    """Token id of every label word; each must encode to exactly one token (leading spaces matter)."""
    ids = []
    for label, word in zip(task.label_list, task.verbalizer(pattern_id), strict=True):
        enc = tokenizer.encode(word)
        if len(enc) != 1:
            raise ValueError(
                f"task {task.name}: label word {word!r} of label {label!r} encodes to {len(enc)} tokens {enc} "
                f"with this tokenizer, but a label word must be exactly one token; {task.label_word_advice}"
            )
        ids.append(enc[0])
    # Labels whose words are one token (" great" and "great" for a lower-casing WordPiece) get one score.
    for i, token in enumerate(ids):
        if token in ids[:i]:
            j = ids.index(token)
            words = task.verbalizer(pattern_id)
            raise ValueError(
                f"task {task.name}: labels {task.label_list[j]!r} and {task.label_list[i]!r} have label words "
                f"{words[j]!r} and {words[i]!r}, which are the same token {token}; the model could not tell "
                "them apart"
            )
    return ids


def encode_example(
    task: ClozeTask,
    example: Example,
    tokenizer: Tokenizer,
    pattern_id: int | None = None,
    max_seq_length: int | None = None,
    split: str = "dev",
    prompt_tokens: int = 0,
) -> ClozeSample:
    """Build the cloze model inputs of one example (spec D.1-D.3).

    Args:
        task: the task (patterns, verbalizer or answers).
        example: the example from `task.read`.
        tokenizer: a `GLMTokenizer` (or anything with `encode` and the special ids).
        pattern_id: pattern to use; default `task.default_pattern`.
        max_seq_length: row length; default `task.max_seq_length`.
        split: `train` enables train-only label rules (WSC with the `mix` loss labels choice 0).
        prompt_tokens: continuous-prompt placeholders put before Part A (P-tuning's prefix prompt), on top
            of any `prompt` fragments of the pattern; their positions go to `prompt_pos`.

    Returns:
        The `ClozeSample`.
    """
    pid = task.check_pattern(pattern_id)
    max_len = max_seq_length or task.max_seq_length
    parts_a, parts_b = task.pattern(example, pid)
    if prompt_tokens:
        parts_a = [Fragment(None, prompt=prompt_tokens), *parts_a]
    if sum(f.is_mask for f in (*parts_a, *parts_b)) != 1:
        raise ValueError(f"task {task.name} pattern {pid}: a pattern needs exactly one mask slot")
    enc_a, enc_b = encode_parts(tokenizer, parts_a), encode_parts(tokenizer, parts_b)
    label = task.label_index(example, split)
    if not task.multi_token:
        truncated = truncate(enc_a, enc_b, 0, max_len)
        tokens_a = [t for ids, _ in enc_a for t in ids]
        tokens_b = [t for ids, _ in enc_b for t in ids] if enc_b else None
        row = build_input(tokens_a, tokens_b, None, max_len, tokenizer)
        loss_mask = np.zeros(max_len, dtype=np.int64)
        loss_mask[row.sep] = 1
        return ClozeSample(
            input_ids=row.input_ids,
            position_ids=row.position_ids,
            sep=row.sep,
            loss_mask=loss_mask,
            label=label,
            uid=example.guid,
            label_ids=np.asarray(verbalizer_ids(task, tokenizer, pid), dtype=np.int64),
            truncated=truncated,
            prompt_pos=take_prompts(row.input_ids, example.guid),
        )
    answers = task.answers(example, pid)
    if not answers:
        raise ValueError(f"task {task.name}: example {example.guid} has no answer choices")
    rows: list[ClozeRow] = []
    truncated = False
    for answer in answers:
        answer_ids = [*tokenizer.encode(answer), tokenizer.eop_id]
        # Each choice truncates its own copy of the context, leaving room for that choice (spec D.2).
        a, b = copy.deepcopy(enc_a), copy.deepcopy(enc_b)
        truncated |= truncate(a, b, len(answer_ids) - 1, max_len)
        tokens_a = [t for ids, _ in a for t in ids]
        tokens_b = [t for ids, _ in b for t in ids] if b else None
        rows.append(build_input(tokens_a, tokens_b, answer_ids, max_len, tokenizer))
    return ClozeSample.from_rows(rows, label, example.guid, truncated)


def filled_pattern_tokens(
    task: ClozeTask,
    example: Example,
    tokenizer: Tokenizer,
    pattern_id: int | None = None,
    max_seq_length: int | None = None,
    split: str = "train",
) -> np.ndarray:
    """[CLS] pattern-with-the-answer eos: the labelled example as plain text for block-LM regularisation (D.10).

    The mask slot holds the gold label word (single-token) or the gold answer (multi-token); the result is
    shortened like a cloze input and then fed to the pretraining objective (spec C.2-C.4).
    """
    pid = task.check_pattern(pattern_id)
    label = task.label_index(example, split)
    if label < 0:
        raise ValueError(f"task {task.name}: example {example.guid} has no label to fill the pattern with")
    answer = task.answers(example, pid)[label] if task.multi_token else task.verbalizer(pid)[label]
    parts_a, parts_b = task.pattern(example, pid)
    # Plain text: the answer in the mask slot, no continuous-prompt placeholders.
    enc_a = encode_parts(tokenizer, [Fragment(answer) if f.is_mask else f for f in parts_a if not f.prompt])
    enc_b = encode_parts(tokenizer, [Fragment(answer) if f.is_mask else f for f in parts_b if not f.prompt])
    truncate(enc_a, enc_b, 0, max_seq_length or task.max_seq_length)
    ids = [
        tokenizer.cls_id,
        *(t for ids, _ in enc_a for t in ids),
        *(t for ids, _ in enc_b for t in ids),
        tokenizer.eos_id,
    ]
    return np.asarray(ids, dtype=np.int64)


# --------------------------------------------------------------------------------------------------------------
# Batching, scoring and losses


def _trim_width(samples: Sequence[ClozeSample]) -> int:
    """Common row width after dropping trailing padding: eos ids in the causal region after everything that is
    read (sep and the answer), which no earlier token attends to, so trimming it leaves every score unchanged."""
    width = 0
    for s in samples:
        read = s.loss_mask.reshape(-1, s.loss_mask.shape[-1]).any(0)
        width = max(width, int(np.max(s.sep)) + 1, int(np.nonzero(read)[0].max()) + 1 if read.any() else 0)
    return width


def collate(samples: Sequence[ClozeSample]) -> dict[str, Tensor]:
    """Stack samples into a batch, trimming the common trailing padding.

    Single-token batches: `input_ids` [B, T], `position_ids` [B, 2, T], `sep` [B], `label_ids` [B, K],
    `labels` [B]. Multi-token batches: `input_ids` [B, C, T], `position_ids` [B, C, 2, T], `sep` [B, C],
    `targets`/`loss_mask` [B, C, T], `choice_mask` [B, C] (0 on padded choices), `labels` [B].
    """
    if not samples:
        raise ValueError("collate: empty batch")
    multi = samples[0].targets is not None
    width = _trim_width(samples)
    labels = torch.tensor([s.label for s in samples], dtype=torch.long)
    if not multi:
        batch = {
            "input_ids": torch.from_numpy(np.stack([s.input_ids[:width] for s in samples])),
            "position_ids": torch.from_numpy(np.stack([s.position_ids[:, :width] for s in samples])),
            "sep": torch.tensor([s.sep for s in samples], dtype=torch.long),
            "labels": labels,
        }
        if samples[0].label_ids is not None:  # cloze rows; classifier-head rows have no label words
            batch["label_ids"] = torch.from_numpy(np.stack([s.label_ids for s in samples]))
        if prompt_count(samples) is not None:
            batch["prompt_pos"] = torch.from_numpy(np.stack([s.prompt_pos for s in samples]))
        return batch
    C = max(s.num_choices for s in samples)
    B = len(samples)
    eos = int(samples[0].input_ids[0, -1])
    input_ids = np.full((B, C, width), eos, dtype=np.int64)
    position_ids = np.zeros((B, C, 2, width), dtype=np.int64)
    sep = np.ones((B, C), dtype=np.int64)
    targets = np.zeros((B, C, width), dtype=np.int64)
    loss_mask = np.zeros((B, C, width), dtype=np.int64)
    choice_mask = np.zeros((B, C), dtype=np.int64)
    for b, s in enumerate(samples):
        n = s.num_choices
        input_ids[b, :n] = s.input_ids[:, :width]
        position_ids[b, :n] = s.position_ids[:, :, :width]
        sep[b, :n] = s.sep
        targets[b, :n] = s.targets[:, :width]
        loss_mask[b, :n] = s.loss_mask[:, :width]
        choice_mask[b, :n] = 1
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "position_ids": torch.from_numpy(position_ids),
        "sep": torch.from_numpy(sep),
        "targets": torch.from_numpy(targets),
        "loss_mask": torch.from_numpy(loss_mask),
        "choice_mask": torch.from_numpy(choice_mask),
        "labels": labels,
    }
    n = prompt_count(samples)
    if n is not None:
        prompt_pos = np.zeros((B, C, n), dtype=np.int64)  # padded choices point at index 0
        for b, s in enumerate(samples):
            prompt_pos[b, : s.num_choices] = s.prompt_pos
        batch["prompt_pos"] = torch.from_numpy(prompt_pos)
    return batch


def prompt_count(samples: Sequence[ClozeSample]) -> int | None:
    """The number of continuous-prompt placeholders every sample has (None: none has any); samples with
    different numbers cannot share a batch or a prompt encoder."""
    counts = {None if s.prompt_pos is None else int(s.prompt_pos.shape[-1]) for s in samples}
    if len(counts) > 1:
        raise ValueError(f"the examples place different numbers of prompt tokens: {sorted(map(str, counts))}")
    return counts.pop() if counts else None


def cloze_scores(model: torch.nn.Module, batch: dict[str, Tensor], length_penalty: float = 0.0) -> Tensor:
    """Scores of every label (single-token) or choice (multi-token), [B, K] or [B, C] (spec D.2).

    Single-token: the raw logits of the label words at index sep (the [sop] position, not [MASK]); a softmax
    over them is p(y|x). Multi-token: sum over the answer tokens (eop included) of the full-vocabulary
    log-softmax, divided by |answer|**length_penalty when length_penalty > 0; padded choices get -10000.
    """
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    if "label_ids" in batch:
        B, T = input_ids.shape
        at_sep = torch.zeros(B, T, dtype=torch.bool, device=device)
        sep = batch["sep"].to(device)
        at_sep[torch.arange(B, device=device), sep] = True
        extra = {"prompt_pos": batch["prompt_pos"].to(device)} if "prompt_pos" in batch else {}
        out = model(
            input_ids, batch["position_ids"].to(device), attention_mask=sep, logits_mask=at_sep, **extra
        )
        return out.logits.gather(1, batch["label_ids"].to(device))  # [B, V] -> [B, K]
    B, C, T = input_ids.shape
    choice_mask = batch["choice_mask"].to(device).bool()
    # Only real choices are run through the model: rows [N, T] with N = number of real choices.
    ids = input_ids[choice_mask]
    pos = batch["position_ids"].to(device)[choice_mask]
    sep = batch["sep"].to(device)[choice_mask]
    loss_mask = batch["loss_mask"].to(device)[choice_mask].bool()
    targets = batch["targets"].to(device)[choice_mask][loss_mask]  # [M] answer tokens of all rows
    extra = {"prompt_pos": batch["prompt_pos"].to(device)[choice_mask]} if "prompt_pos" in batch else {}
    out = model(ids, pos, attention_mask=sep, logits_mask=loss_mask, **extra)
    token_logp = out.logits.float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)  # [M]
    row_of_token = torch.arange(ids.size(0), device=device)[:, None].expand_as(loss_mask)[loss_mask]
    row_scores = torch.zeros(ids.size(0), device=device, dtype=token_logp.dtype).index_add(
        0, row_of_token, token_logp
    )
    if length_penalty > 0:
        lengths = loss_mask.sum(1).to(row_scores.dtype)
        row_scores = row_scores / lengths.pow(length_penalty)
    scores = torch.full((B, C), PADDED_CHOICE_SCORE, device=device, dtype=row_scores.dtype)
    return scores.masked_scatter(choice_mask, row_scores)


def cloze_loss(scores: Tensor, labels: Tensor, loss_func: str = "cross_entropy") -> Tensor:
    """Loss over label/choice scores [B, K] (spec D.2 `--loss-func`).

    `cross_entropy`: softmax over the scores. `hinge`: sum over wrong choices of max(0, 1 + s_j - s_y).
    `generative`: -mean score of the labelled choice. `mix`: generative + cross_entropy.
    """
    if loss_func not in LOSS_FUNCS:
        raise ValueError(f"loss_func={loss_func!r}; expected one of {LOSS_FUNCS}")
    labels = labels.to(scores.device)
    if loss_func == "cross_entropy":
        return F.cross_entropy(scores.float(), labels)
    correct = scores.gather(1, labels[:, None])  # [B, 1]
    if loss_func == "hinge":
        margins = (1.0 + scores - correct).clamp(min=0.0)
        return (margins.sum(1) - 1.0).mean()  # the j = y term contributes exactly 1
    generative = -correct.squeeze(1).float().mean()
    if loss_func == "generative":
        return generative
    return generative + F.cross_entropy(scores.float(), labels)
