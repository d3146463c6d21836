"""Pretraining samples and batches (spec C.1, C.7): documents packed into [CLS] doc eos samples, then the
blank-infilling objective per batch, yielded as padded tensors deterministic in (seed, step, rank)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from openglm.blank_infilling import (
    MODES,
    BlankInfilling,
    BlockBatch,
    ObjectiveConfig,
    SpecialTokens,
    pad_rows,
)
from openglm.data.shards import document_prompt_lengths

log = logging.getLogger(__name__)

# Salts keep the sample stream, the batch stream and validation streams independent for one seed.
_SAMPLE_SALT = 0x5A
_BATCH_SALT = 0xB7
_VALID_SALT = 0x7A
_MULTI_TASK_SALT = 0x3C


class Corpus(Protocol):
    """What sample assembly needs from a tokenized corpus (ShardedCorpus and InMemoryCorpus have it)."""

    doc_lengths: np.ndarray  # int64 [num_docs], tokens per document (no eos)
    # Optional int64 [num_docs]: leading prompt tokens per document, loss mask 0 (absent: no prompts).
    prompt_lengths: np.ndarray

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...


class SampleAssembler:
    """Builds sample `index` of the pretraining stream (spec C.1).

    Documents are drawn with probability proportional to their length (eos included). A document that
    does not fit is cropped at a random start moved to a sentence boundary (up to seq/2 tokens back or
    forward, 50/50) and its right end is cut back to a sentence end when that keeps half the length.
    Shorter documents are packed, each as [CLS] tokens eos, until one reaches the end of the sequence;
    that last piece is cut back to a sentence end too (so samples average ~500 of 512 tokens, as in the
    official runs). Sentence ends use the full set of `SENTENCE_END_CHARS` (the official BlockDataset
    lacks the Chinese marks and "…"; the objective's sentence mode has them).

    Args:
        corpus: the tokenized documents.
        special: token ids and the sentence-end table.
        seq_length: the sample length (512 for the released models).
        seed: the stream's seed; sample `index` depends only on (seed, index).
        sentence_start: move the crop start to a sentence boundary (official non_sentence_start=0).
    """

    def __init__(
        self,
        corpus: Corpus,
        special: SpecialTokens,
        seq_length: int = 512,
        seed: int = 0,
        sentence_start: bool = True,
    ) -> None:
        if seq_length < 8:
            raise ValueError(f"seq_length must be >= 8, got {seq_length}")
        lengths = np.asarray(corpus.doc_lengths, dtype=np.int64)
        if lengths.size == 0 or int(lengths.sum()) == 0:
            raise ValueError("the corpus holds no tokens")
        self.corpus = corpus
        self.special = special
        self.seq_length = seq_length
        self.seed = seed
        self.sentence_start = sentence_start
        self.cum_weights = np.cumsum(lengths + 1)  # +1: the eos appended to every document
        self.prompt_lengths = document_prompt_lengths(corpus)

    def _draw_document(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A document with its eos appended, and its loss mask (0 on a prompt, 1 on text and eos)."""
        doc = int(np.searchsorted(self.cum_weights, rng.integers(self.cum_weights[-1]), side="right"))
        tokens = np.asarray(self.corpus[doc], dtype=np.int64)
        mask = np.ones(tokens.shape[0] + 1, dtype=np.int64)
        mask[: self.prompt_lengths[doc]] = 0
        return np.concatenate((tokens, [self.special.eos])), mask

    def _right_strip(self, tokens: np.ndarray, limit: int) -> int:
        """How many of `tokens` to keep: at most `limit`, back to a sentence end if that keeps limit // 2."""
        n = tokens.shape[0]
        if n <= limit:
            return n
        ends = np.flatnonzero(self.special.is_sentence_end(tokens[:limit]))
        keep = int(ends[-1]) + 1 if ends.size else 0
        if keep < limit // 2 or keep < 1:
            keep = limit
        return keep

    def __call__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample `index`: (tokens int64 [<= seq_length], loss_mask int64: 0 on every [CLS] and prompt)."""
        rng = np.random.default_rng([self.seed, _SAMPLE_SALT, index])
        seq, cls = self.seq_length, self.special.cls
        doc, doc_mask = self._draw_document(rng)
        excess = doc.shape[0] - (seq - 1)
        if excess > 0:
            start = int(rng.integers(excess))
            if self.sentence_start:
                start = self._align_start(rng, doc, start)
            piece = np.concatenate(([cls], doc[start:]))
            keep = self._right_strip(piece, seq)
            pieces = [piece[:keep]]
            masks = [np.concatenate(([0], doc_mask[start:]))[:keep]]
        else:
            pieces = [np.concatenate(([cls], doc))]
            masks = [np.concatenate(([0], doc_mask))]
            total = pieces[0].shape[0]
            while total < seq:
                doc, doc_mask = self._draw_document(rng)
                piece = np.concatenate(([cls], doc))
                last = piece.shape[0] >= seq - total
                keep = self._right_strip(piece, seq - total)
                pieces.append(piece[:keep])
                masks.append(np.concatenate(([0], doc_mask))[:keep])
                total += keep
                if last:
                    # The official packing stops at the piece that reached the end, even when its
                    # sentence-aligned strip leaves the sample short.
                    break
        return np.concatenate(pieces), np.concatenate(masks)

    def _align_start(self, rng: np.random.Generator, doc: np.ndarray, start: int) -> int:
        """Move a crop start to just after a sentence end, up to seq/2 tokens back or forward (50/50)."""
        ends = self.special.is_sentence_end(doc)
        budget = self.seq_length // 2
        if start == 0 or ends[start - 1]:
            return start
        if rng.random() < 0.5:
            lo = max(1, start - budget)
            hits = np.flatnonzero(ends[lo - 1 : start - 1])  # ends[s - 1] for s in lo..start-1
            if hits.size:
                return int(lo + hits[-1])
            return max(0, start - budget)
        hi = min(doc.shape[0] - 2, start + budget)  # keep at least one token and the eos
        hits = np.flatnonzero(ends[start:hi])  # ends[s - 1] for s in start+1..hi
        if hits.size:
            return int(start + 1 + hits[0])
        return max(start, hi)


class PretrainingBatches(IterableDataset):
    """Padded GLM pretraining batches, deterministic in (seed, step, rank, world_size).

    Batch `step` on `rank` holds the global samples (step * world_size + rank) * batch_size + j and is
    corrupted with a generator seeded by (seed, step, rank, world_size); DataLoader workers split the
    steps round-robin, so the stream is the same for any number of workers. Samples whose spans do not
    fit are dropped as in the official collator, so a batch may hold fewer than batch_size rows.

    Each batch is a dict: input_ids [B,T] long, position_ids [B,2,T] long, sep [B] long, targets [B,T]
    long (logit i predicts targets[i]), loss_mask [B,T] float, mode (str), step (int).

    Args:
        corpus: tokenized documents (ShardedCorpus, InMemoryCorpus, or a subset of one).
        special: token ids and sentence ends (`SpecialTokens.from_tokenizer(tokenizer)`).
        objective: the objective mix.
        seq_length: sample length before corruption.
        batch_size: rows per batch on this rank (before drops).
        seed: the run's data seed.
        rank: this data-parallel rank (passed in, never read from the environment).
        world_size: the number of data-parallel ranks.
        start_step: the first step to yield (resume); `load_state_dict` sets it too.
        num_steps: stop before this step (None: infinite).
        pad_to_multiple_of: pad T up to a multiple of this (static shapes for compiled models).
        pad_id: the padding id for tokens and targets (0 officially; the loss mask hides it).
        multi_task: downstream examples as `[CLS] ... eos` token arrays (the official --multi-task-data:
            labelled examples rendered by their pattern with the answer filled in, `tasks.multi_task_samples`).
        multi_task_ratio: the probability that a step's batch is drawn from `multi_task` instead of the
            corpus (the same draw on every rank); such a batch goes through the same objective.
        require_full_sample: refuse a corpus whose documents (with [CLS] and eos each) cannot fill one
            sample of `seq_length`. Samples from such a corpus repeat its few documents, whose blanks
            mostly do not fit, so training would get empty batches; held-out sets may be smaller.
    """

    def __init__(
        self,
        corpus: Corpus,
        special: SpecialTokens,
        objective: ObjectiveConfig | None = None,
        seq_length: int = 512,
        batch_size: int = 16,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        num_steps: int | None = None,
        pad_to_multiple_of: int = 1,
        pad_id: int = 0,
        multi_task: Sequence[np.ndarray] = (),
        multi_task_ratio: float = 0.0,
        require_full_sample: bool = True,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= multi_task_ratio <= 1.0:
            raise ValueError(f"multi_task_ratio must be in [0, 1], got {multi_task_ratio}")
        if multi_task_ratio > 0 and not multi_task:
            raise ValueError("multi_task_ratio > 0 needs multi-task examples")
        if require_full_sample and multi_task_ratio < 1.0:
            _check_fills_a_sample(corpus, seq_length)
        self.objective = BlankInfilling(objective or ObjectiveConfig(), special)
        self.assembler = SampleAssembler(corpus, special, seq_length, seed)
        self.seq_length = seq_length
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.next_step = start_step
        self.num_steps = num_steps
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_id = pad_id
        self.multi_task = [np.asarray(t, dtype=np.int64) for t in multi_task]
        self.multi_task_ratio = multi_task_ratio

    def rows(self, step: int) -> BlockBatch:
        """The unpadded rows of batch `step` on this rank."""
        first = (step * self.world_size + self.rank) * self.batch_size
        rng = np.random.default_rng([self.seed, _BATCH_SALT, step, self.rank, self.world_size])
        if self.is_multi_task(step):
            return self.objective([self._multi_task_sample(first + j) for j in range(self.batch_size)], rng)
        samples = [self.assembler(first + j) for j in range(self.batch_size)]
        return self.objective([s[0] for s in samples], rng, [s[1] for s in samples])

    def is_multi_task(self, step: int) -> bool:
        """Whether batch `step` comes from the multi-task examples (drawn from (seed, step): all ranks agree)."""
        if self.multi_task_ratio <= 0:
            return False
        return bool(
            np.random.default_rng([self.seed, _MULTI_TASK_SALT, step]).random() < self.multi_task_ratio
        )

    def _multi_task_sample(self, index: int) -> np.ndarray:
        # Global sample `index` walks a fresh seeded permutation of the examples each epoch.
        epoch, i = divmod(index, len(self.multi_task))
        return self.multi_task[int(_permutation(self.seed, epoch, len(self.multi_task))[i])]

    def batch(self, step: int) -> dict[str, Any]:
        """Batch `step` on this rank as tensors (random access; the iterator yields the same)."""
        return collate(self.rows(step), self.pad_to_multiple_of, self.pad_id, step=step)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.next_step + worker
        while self.num_steps is None or step < self.num_steps:
            batch = self.batch(step)
            if info is None:
                self.next_step = step + 1  # only meaningful in-process; workers hold copies
            yield batch
            step += workers

    def loader(
        self, num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int = 2
    ) -> Iterator[dict[str, Any]]:
        """Iterate through a DataLoader with `num_workers` processes, in step order, keeping
        `state_dict()` up to date in this process (workers only hold copies of this object).

        Args:
            num_workers: loader processes (0: build batches in this process).
            pin_memory: pin the tensors (for asynchronous host-to-GPU copies).
            prefetch_factor: batches prepared ahead per worker.
        """
        from torch.utils.data import DataLoader

        if num_workers == 0:
            yield from self
            return
        loader = DataLoader(
            self,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor,
        )
        for batch in loader:
            self.next_step = batch["step"] + 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The resume state: the next step to yield, advanced as batches are consumed through iteration in
        this process or through `loader()` (a DataLoader built by hand only advances its workers' copies)."""
        return {"step": self.next_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at `state["step"]` (the next batch yielded is exactly that step's batch)."""
        self.next_step = int(state["step"])


def _check_fills_a_sample(corpus: Corpus, seq_length: int) -> None:
    lengths = np.asarray(corpus.doc_lengths, dtype=np.int64)
    tokens, docs = int(lengths.sum()), int(lengths.shape[0])
    if tokens + 2 * docs >= seq_length:
        return
    raise ValueError(
        f"{_describe(corpus)}: {tokens} tokens in {docs} document(s) ({tokens + 2 * docs} with [CLS] and eos) "
        f"cannot fill one sample of seq_length {seq_length}; add text or lower seq_length"
    )


def _describe(corpus: Any) -> str:
    """Where a corpus comes from, for error messages: its shard folder, or the part of one it is."""
    path = getattr(corpus, "path", None)
    if path is not None:
        return f"shards {path}"
    parent = getattr(corpus, "corpus", None)
    if getattr(parent, "path", None) is not None:
        return f"shards {parent.path} (a subset: {len(corpus)} of its {len(parent)} documents)"
    return "the corpus"


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, _MULTI_TASK_SALT, epoch]).permutation(n)


def collate(
    batch: BlockBatch, pad_to_multiple_of: int = 1, pad_id: int = 0, step: int | None = None
) -> dict[str, Any]:
    """Pad a BlockBatch into the training dict of tensors (spec C.7)."""
    width = max((len(r) for r in batch.rows), default=0)
    if pad_to_multiple_of > 1:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    arrays = pad_rows(batch.rows, width, pad_id)
    out: dict[str, Any] = {k: torch.from_numpy(v) for k, v in arrays.items()}
    out["mode"] = batch.mode
    if step is not None:
        out["step"] = step
    return out


def validation_batches(
    corpus: Corpus,
    special: SpecialTokens,
    objective: ObjectiveConfig | None = None,
    seq_length: int = 512,
    batch_size: int = 16,
    num_batches: int = 4,
    seed: int = 0,
    modes: tuple[str, ...] = MODES,
) -> dict[str, list[dict[str, Any]]]:
    """Fixed held-out batches per objective ("token", "sentence", "document") for evaluation.

    Use a held-out corpus (e.g. `corpus.subset(valid_ids)` from `split_documents`); the sample and
    corruption streams are salted so they never coincide with the training stream of the same seed.

    Returns:
        mode -> list of `num_batches` batch dicts (the same on every call and every rank).
    """
    base = objective or ObjectiveConfig()
    out: dict[str, list[dict[str, Any]]] = {}
    for k, mode in enumerate(modes):
        data = PretrainingBatches(
            corpus,
            special,
            base.only(mode),
            seq_length=seq_length,
            batch_size=batch_size,
            seed=seed * 1000 + _VALID_SALT + k,
            require_full_sample=False,
        )
        out[mode] = [data.batch(step) for step in range(num_batches)]
    return out


def split_documents(num_docs: int, valid_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded train/validation split of document ids (at least one validation document)."""
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    if num_docs < 2:
        raise ValueError(f"need at least 2 documents to split, got {num_docs}")
    order = np.random.default_rng([seed, _VALID_SALT]).permutation(num_docs)
    n_valid = min(num_docs - 1, max(1, int(round(num_docs * valid_fraction))))
    return np.sort(order[n_valid:]), np.sort(order[:n_valid])
