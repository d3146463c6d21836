"""Blank filling (spec E.1-E.3): any number of [MASK]/[sMASK]/[gMASK] per text, filled left to right, each fill
visible to the later ones (Part B layout), batched over texts with one K/V cache; plus candidate scoring.

Layout of one blank: <|startofpiece|> takes the mask's position and block position 1, generated tokens block
positions 2, 3, ...; decoding attends to the whole (visible) cache. As in the official interactive loop, an end
token is never fed, and neither is the last token of a blank that stopped at `max_length`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from openglm.generate.decoding import (
    BeamHypotheses,
    GenerationConfig,
    ban_beyond_vocab,
    ban_repeated_ngrams,
    ban_until_min_length,
    beam_step,
    penalize_repetition,
    sample_tokens,
)
from openglm.generate.state import BeamState, DecodeState
from openglm.model import GLMModel

_MASK_TEXT = re.compile(r"\[(?:MASK|sMASK|gMASK)\]")


@dataclass(frozen=True)
class SpecialIds:
    """Command-token ids the decoder needs (spec B)."""

    sop: int
    eop: int
    eos: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> SpecialIds:
        ids = {
            "sop": tokenizer.sop_id,
            "eop": tokenizer.eop_id,
            "eos": tokenizer.eos_id,
            "pad": tokenizer.pad_id,
        }
        missing = [name for name, value in ids.items() if value is None]
        if missing or tokenizer.cls_id is None:
            names = ", ".join(missing + (["cls"] if tokenizer.cls_id is None else []))
            raise ValueError(f"the tokenizer has no {names} token; blank filling needs GLM's block symbols")
        return cls(**ids)


@dataclass
class BlankFill:
    """One filled blank.

    Attributes:
        position: index of the mask token in the context ids (the fill's position id).
        mask_id: the mask token ([MASK], [sMASK] or [gMASK] id).
        token_ids: generated ids, without <|startofpiece|> and without the end token.
        stop: "end_token" (an end token was produced) or "max_length".
        end_token: the end token that stopped the blank, if any.
        score: greedy/sampling: summed log-probability of the tokens under the model; beam search: the
            hypothesis score sum_logprob / length**length_penalty.
        text: the decoded fill (empty at the id level).
    """

    position: int
    mask_id: int
    token_ids: list[int]
    stop: str
    end_token: int | None = None
    score: float = 0.0
    text: str = ""


@dataclass
class FilledText:
    """A text with its blanks filled.

    Attributes:
        source: the text as given.
        text: the text with each mask replaced by its fill.
        context_ids: [CLS] + ids (+ eos), as fed (spec E.1).
        blanks: the fills, in left-to-right order.
        output_ids: the official output layout: context, then <|startofpiece|> + fill for each blank.
    """

    source: str
    text: str
    context_ids: list[int]
    blanks: list[BlankFill] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class TokenEvent:
    """A token as it is decoded (streaming). `text` is the decoded fill so far ("" at the id level)."""

    text_index: int
    blank_index: int
    token_id: int
    text: str = ""


# ------------------------------------------------------------------------------------------------------------
# Id level
def _check_lengths(model: GLMModel, contexts: Sequence[Sequence[int]], config: GenerationConfig) -> None:
    rows = model.config.position_table_rows
    for i, ctx in enumerate(contexts):
        if not ctx:
            raise ValueError(f"context {i} is empty")
        if len(ctx) > rows:
            raise ValueError(f"context {i} has {len(ctx)} tokens; the model has {rows} positions")
    if config.max_length >= rows:
        raise ValueError(
            f"max_length={config.max_length} needs block positions up to it; the model has {rows} rows"
        )


def _prefill(state: DecodeState, contexts: Sequence[Sequence[int]], pad: int) -> None:
    """Encode right-padded contexts bidirectionally; padding is hidden by the explicit mask (not by sep)."""
    B, L = len(contexts), max(len(c) for c in contexts)
    ids = torch.full((B, L), pad, dtype=torch.long)
    real = torch.zeros(B, L, dtype=torch.bool)
    for i, ctx in enumerate(contexts):
        ids[i, : len(ctx)] = torch.tensor(list(ctx), dtype=torch.long)
        real[i, : len(ctx)] = True
    positions = torch.stack(
        [torch.arange(L).expand(B, L), torch.zeros(B, L, dtype=torch.long)], dim=1
    )  # (B, 2, L)
    state.feed(ids, _positions(state, positions), real, bidirectional=True)


def _positions(state: DecodeState | BeamState, position_ids: Tensor) -> Tensor:
    """[B, 2, T] -> what the model takes ([B, T] without block positions)."""
    return position_ids if state.model.config.block_position_encoding else position_ids[:, 0]


def _feed_one(
    state: DecodeState | BeamState, tokens: list[int], pos: list[int], block: list[int], real: list[bool]
) -> Tensor:
    """Feed one token per row; return logits [N, V] of the real rows (in row order)."""
    ids = torch.tensor(tokens, dtype=torch.long)[:, None]
    position_ids = torch.tensor([pos, block], dtype=torch.long).t()[:, :, None]  # (B, 2, 1)
    real_t = torch.tensor(real, dtype=torch.bool)[:, None]
    return state.feed(ids, _positions(state, position_ids), real_t, logits_at=real_t)


def _feed_spans(state: DecodeState, spans: list[list[int] | None], positions: list[int], pad: int) -> None:
    """Append a causal Part B span per row (sop + fill) after the cache; None rows feed padding only."""
    T = max((len(s) for s in spans if s), default=0)
    if T == 0:
        return
    B = len(spans)
    ids = torch.full((B, T), pad, dtype=torch.long)
    pos = torch.zeros(B, 2, T, dtype=torch.long)
    real = torch.zeros(B, T, dtype=torch.bool)
    for i, span in enumerate(spans):
        if span:
            n = len(span)
            ids[i, :n] = torch.tensor(span)
            pos[i, 0, :n] = positions[i]
            pos[i, 1, :n] = torch.arange(1, n + 1)
            real[i, :n] = True
    state.feed(ids, _positions(state, pos), real)


class _Row:
    """Progress of one text through its blanks (greedy and sampling)."""

    def __init__(self, positions: Sequence[int], masks: Sequence[int]) -> None:
        self.positions, self.masks = list(positions), list(masks)
        self.blank = 0
        self.tokens: list[int] = []
        self.history: list[int] = []  # every token generated for this text, for the repetition penalty
        self.logprob = 0.0
        self.fresh = True  # the next feed is this blank's <|startofpiece|>
        self.fills: list[BlankFill] = []

    @property
    def done(self) -> bool:
        return self.blank >= len(self.positions)

    def finish(self, stop: str, end_token: int | None) -> None:
        k = self.blank
        fill = BlankFill(self.positions[k], self.masks[k], self.tokens, stop, end_token, self.logprob)
        self.fills.append(fill)
        self.blank += 1
        self.tokens, self.logprob, self.fresh = [], 0.0, True


def _generator(config: GenerationConfig, device: torch.device) -> torch.Generator | None:
    """The seeded random source of sampling (None: torch's global one, or no sampling)."""
    if config.do_sample and config.seed is not None:
        return torch.Generator(device=device).manual_seed(config.seed)
    return None


def _decode_stepwise(
    state: DecodeState,
    rows: list[_Row],
    config: GenerationConfig,
    special: SpecialIds,
    stop_ids: tuple[int, ...],
) -> Generator[TokenEvent, None, None]:
    """Greedy or sampled decoding of every blank of every row, one token per row per forward."""
    generator = _generator(config, state.device)
    stop = set(stop_ids)
    slots = list(range(len(rows)))  # the text held by each row of the decode state
    while True:
        live = [i for i in slots if not rows[i].done]
        if not live:
            break
        if len(live) <= len(slots) // 2:
            # Most texts are finished (fewer or shorter blanks): drop their rows so steps stop computing them.
            state = state.expand(torch.tensor([j for j, i in enumerate(slots) if not rows[i].done]))
            slots = live
        feeds = []  # (token, position, block position, real) per state row
        for r in (rows[i] for i in slots):
            if r.done:
                feeds.append((special.pad, 0, 0, False))
            elif r.fresh:
                feeds.append((special.sop, r.positions[r.blank], 1, True))
            else:
                feeds.append((r.tokens[-1], r.positions[r.blank], len(r.tokens) + 1, True))
        tokens, pos, block, real = (list(column) for column in zip(*feeds, strict=True))
        active = [(i, rows[i]) for i in slots if not rows[i].done]
        logits = _feed_one(state, tokens, pos, block, real).float()  # (N, V)
        logprobs = F.log_softmax(logits, dim=-1)
        penalize_repetition(logits, [r.history for _, r in active], config.repetition_penalty)
        ban_until_min_length(logits, [len(r.tokens) for _, r in active], config.min_length, stop_ids)
        ban_repeated_ngrams(logits, [r.tokens for _, r in active], config.no_repeat_ngram_size)
        ban_beyond_vocab(logits, config.vocab_limit)
        if config.do_sample:
            chosen = sample_tokens(logits, config, generator)
        else:
            chosen = logits.argmax(dim=-1)
        chosen_logprobs = logprobs.gather(-1, chosen[:, None])[:, 0].tolist()
        for (i, r), tok, logprob in zip(active, chosen.tolist(), chosen_logprobs, strict=True):
            r.fresh = False
            if tok in stop:
                r.finish("end_token", tok)
                continue
            r.tokens.append(tok)
            r.history.append(tok)
            r.logprob += logprob
            yield TokenEvent(i, r.blank, tok)
            if len(r.tokens) >= config.max_length:
                r.finish("max_length", None)


def _beam_round(
    state: DecodeState,
    items: list[int],
    positions: list[int],
    histories_before: list[list[int]],
    config: GenerationConfig,
    special: SpecialIds,
    stop_ids: tuple[int, ...],
    generator: torch.Generator | None = None,
) -> list[tuple[list[int], str, int | None, float]]:
    """Beam search of one blank for each row in `items` (spec E.2); returns (tokens, stop, end, score) per item."""
    K = config.num_beams
    n = len(items)
    beams = state.beams(items, K)
    start = beams.length
    beam_scores = torch.zeros(n, K, device=state.device)
    beam_scores[:, 1:] = -1e9  # all beams start equal: only beam 0 may expand at the first step
    beam_scores = beam_scores.view(-1)
    hyps = [BeamHypotheses(K, config.length_penalty) for _ in range(n)]
    done = [False] * n
    histories: list[list[int]] = [[] for _ in range(n * K)]
    alive = list(range(n))  # the texts whose K rows the beam state holds, in row order
    for t in range(config.max_length):
        live = [b for b in alive if not done[b]]
        if len(live) <= len(alive) // 2:
            # Most texts are finished: drop their rows so that steps stop computing them.
            keep = [a * K + j for a, b in enumerate(alive) if not done[b] for j in range(K)]
            beams = beams.expand(torch.tensor(keep))
            beam_scores = beam_scores[torch.tensor(keep, device=beam_scores.device)]
            histories = [histories[row] for row in keep]
            alive = live
        text = [alive[row // K] for row in range(len(alive) * K)]  # the text of each beam row
        real = [not done[b] for b in text]
        tokens = [special.sop if t == 0 else h[-1] for h in histories]
        logits = _feed_one(beams, tokens, [positions[b] for b in text], [t + 1] * len(text), real).float()
        scores = logits.new_zeros(len(text), logits.size(-1))
        scores[torch.tensor(real, device=logits.device)] = F.log_softmax(logits, dim=-1)
        if config.repetition_penalty != 1.0:
            penalize_repetition(
                scores,
                [histories_before[b] + h for b, h in zip(text, histories, strict=True)],
                config.repetition_penalty,
            )
        ban_until_min_length(scores, [t] * len(text), config.min_length, stop_ids)
        ban_repeated_ngrams(scores, histories, config.no_repeat_ngram_size)
        ban_beyond_vocab(scores, config.vocab_limit)
        alive_done = [done[b] for b in alive]
        beam_scores, next_tokens, src = beam_step(
            scores,
            beam_scores,
            [hyps[b] for b in alive],
            alive_done,
            histories,
            stop_ids,
            K,
            sampling=config if config.do_sample else None,
            generator=generator,
        )
        for b, flag in zip(alive, alive_done, strict=True):
            done[b] = flag
        beams.reorder(src, start)
        src_list, tok_list = src.tolist(), next_tokens.tolist()
        histories = [histories[s] + [tok] for s, tok in zip(src_list, tok_list, strict=True)]
        if all(done):
            break
    for a, b in enumerate(alive):  # texts still searching at max_length keep their open beams
        if not done[b]:
            for j in range(K):
                hyps[b].add(histories[a * K + j], float(beam_scores[a * K + j]))
    results = []
    for b in range(n):
        score, tokens, end = hyps[b].best()
        results.append((tokens, "max_length" if end is None else "end_token", end, score))
    return results


def _decode_beam(
    state: DecodeState,
    rows: list[_Row],
    config: GenerationConfig,
    special: SpecialIds,
    stop_ids: tuple[int, ...],
) -> Generator[TokenEvent, None, None]:
    """Beam search blank by blank; the chosen fill is appended to the shared cache before the next blank."""
    generator = _generator(config, state.device)
    rounds = max(len(r.positions) for r in rows)
    for k in range(rounds):
        items = [i for i, r in enumerate(rows) if len(r.positions) > k]
        results = _beam_round(
            state,
            items,
            [rows[i].positions[k] for i in items],
            [rows[i].history for i in items],
            config,
            special,
            stop_ids,
            generator,
        )
        spans: list[list[int] | None] = [None] * len(rows)
        for i, (tokens, stop, end, score) in zip(items, results, strict=True):
            r = rows[i]
            r.tokens, r.logprob = tokens, score
            r.history.extend(tokens)
            for tok in tokens:
                yield TokenEvent(i, k, tok)
            # As in the stepwise loop, the last token of a blank cut at max_length is not fed.
            spans[i] = [special.sop] + (tokens if stop == "end_token" else tokens[:-1])
            r.finish(stop, end)
        if k + 1 < rounds:
            _feed_spans(
                state, spans, [r.positions[k] if len(r.positions) > k else 0 for r in rows], special.pad
            )


def fill_events(
    model: GLMModel,
    contexts: Sequence[Sequence[int]],
    mask_positions: Sequence[Sequence[int]],
    special: SpecialIds,
    config: GenerationConfig,
) -> Generator[TokenEvent, None, list[list[BlankFill]]]:
    """The decoding loop as a generator: yields a `TokenEvent` per decoded token, returns the fills per text.

    Greedy/sampling events arrive as tokens are decoded; beam search events when each blank is decided.
    """
    if len(contexts) != len(mask_positions):
        raise ValueError(f"{len(contexts)} contexts but {len(mask_positions)} mask position lists")
    _check_lengths(model, contexts, config)
    rows = []
    for i, (ctx, positions) in enumerate(zip(contexts, mask_positions, strict=True)):
        for p in positions:
            if not 0 <= p < len(ctx):
                raise ValueError(f"context {i}: mask position {p} is outside its {len(ctx)} tokens")
        order = sorted(positions)
        rows.append(_Row(order, [ctx[p] for p in order]))
    stop_ids = config.stop_ids if config.stop_ids is not None else (special.eop, special.eos)
    if not rows or all(r.done for r in rows):
        return [r.fills for r in rows]
    # Gradients are off inside DecodeState only: a no_grad block around the yields would leak into the caller.
    was_training = model.training
    model.eval()
    try:
        # Each blank appends at most <|startofpiece|> + max_length slots after the context. Reserving up to
        # twice the context (where doubling would first grow to) spares the copy of the whole context at the
        # first decoding step, and never takes more memory than that growth would.
        longest = max(len(c) for c in contexts)
        grow = min(max(len(p) for p in mask_positions) * (config.max_length + 1), longest)
        state = DecodeState(model, config.mem_length, pack_weights=True, reserve=longest + grow)
        _prefill(state, contexts, special.pad)
        loop = _decode_beam if config.num_beams > 1 else _decode_stepwise
        yield from loop(state, rows, config, special, stop_ids)
    finally:
        model.pack_weights(None)  # the decoding steps packed them (DecodeState.feed with pack_weights)
        model.train(was_training)
    return [r.fills for r in rows]


def fill_blank_ids(
    model: GLMModel,
    contexts: Sequence[Sequence[int]],
    mask_positions: Sequence[Sequence[int]],
    special: SpecialIds,
    config: GenerationConfig | None = None,
    streamer: Callable[[TokenEvent], None] | None = None,
    **options: Any,
) -> list[list[BlankFill]]:
    """Fill blanks given token ids (no tokenizer needed).

    Args:
        model: a GLM.
        contexts: per text, the full Part A ids ([CLS] ... (+ eos)), masks included.
        mask_positions: per text, the indices of the masks to fill (filled in increasing order).
        special: sop/eop/eos/pad ids.
        config: decoding settings; `options` override its fields.
        streamer: called with each `TokenEvent`.

    Returns:
        Per text, its `BlankFill`s in left-to-right order.
    """
    config = (config or GenerationConfig()).replace(**options)
    events = fill_events(model, contexts, mask_positions, special, config)
    while True:
        try:
            event = next(events)
        except StopIteration as finished:
            return finished.value
        if streamer is not None:
            streamer(event)


# ------------------------------------------------------------------------------------------------------------
# Text level
def _mask_ids(tokenizer: Any) -> set[int]:
    return {t for t in (tokenizer.mask_id, tokenizer.smask_id, tokenizer.gmask_id) if t is not None}


def prepare_context(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """Part A ids and mask positions of a prompt, as the official interactive script builds them (spec E.1).

    A text without "MASK]" gets " [gMASK]" appended (" [MASK]" if the tokenizer has no gMASK); the context is
    [CLS] + ids, plus eos unless the text ends with "[gMASK]".

    Returns:
        (context_ids, mask_positions).
    """
    if "MASK]" not in text:
        text = text + (" [gMASK]" if tokenizer.gmask_id is not None else " [MASK]")
    ids = [tokenizer.cls_id] + list(tokenizer.encode(text))
    if not text.endswith("[gMASK]"):
        ids.append(tokenizer.eos_id)
    masks = _mask_ids(tokenizer)
    positions = [i for i, t in enumerate(ids) if t in masks]
    if not positions:
        raise ValueError(f"text {text[:60]!r} mentions MASK] but holds no [MASK]/[sMASK]/[gMASK] token")
    return ids, positions


def _splice(tokenizer: Any, source: str, context: list[int], fills: list[BlankFill]) -> str:
    """Replace each mask of the text by its fill; keeps the user's own text around the blanks."""
    text = source
    if "MASK]" not in text:
        text = text + (" [gMASK]" if tokenizer.gmask_id is not None else " [MASK]")
    pieces = _MASK_TEXT.split(text)
    if len(pieces) != len(fills) + 1:
        # The tokenizer split the masks differently from the plain pattern: rebuild from ids instead.
        ids: list[int] = []
        by_pos = {f.position: f for f in fills}
        for i, t in enumerate(context[1:], start=1):
            ids.extend(by_pos[i].token_ids if i in by_pos else [t])
        return tokenizer.decode(ids)
    out = [pieces[0]]
    for fill, after in zip(fills, pieces[1:], strict=True):
        piece = fill.text
        if (not out[-1] or out[-1][-1:].isspace()) and piece[:1] == " ":
            # BPE fills carry their own leading space, which the text before the mask already has (the
            # official output has it once). Only that one space goes: other whitespace is part of the fill.
            piece = piece[1:]
        out.append(piece)
        out.append(after)
    return "".join(out)


def _as_list(texts: str | Sequence[str]) -> tuple[list[str], bool]:
    if isinstance(texts, str):
        return [texts], True
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"texts[{i}] must be a str; got {type(t).__name__}")
    return texts, False


def _text_events(
    model: GLMModel, tokenizer: Any, items: list[str], config: GenerationConfig
) -> Generator[TokenEvent, None, list[FilledText]]:
    """Text-level decoding loop: yields events carrying the decoded fill so far, returns the `FilledText`s."""
    prepared = [prepare_context(tokenizer, t) for t in items]
    contexts = [c for c, _ in prepared]
    events = fill_events(
        model, contexts, [p for _, p in prepared], SpecialIds.from_tokenizer(tokenizer), config
    )
    so_far: dict[tuple[int, int], list[int]] = {}
    while True:
        try:
            event = next(events)
        except StopIteration as finished:
            fills = finished.value
            break
        tokens = so_far.setdefault((event.text_index, event.blank_index), [])
        tokens.append(event.token_id)
        yield TokenEvent(event.text_index, event.blank_index, event.token_id, tokenizer.decode(tokens))
    out = []
    for text, ctx, blanks in zip(items, contexts, fills, strict=True):
        output_ids = list(ctx)
        for blank in blanks:
            blank.text = tokenizer.decode(blank.token_ids)
            output_ids += [tokenizer.sop_id] + blank.token_ids
        out.append(FilledText(text, _splice(tokenizer, text, ctx, blanks), ctx, blanks, output_ids))
    return out


def stream_blanks(
    model: GLMModel,
    tokenizer: Any,
    texts: str | Sequence[str],
    config: GenerationConfig | None = None,
    **options: Any,
) -> Iterator[TokenEvent]:
    """Like `fill_blanks`, but an iterator of `TokenEvent`s (with the decoded fill so far) as tokens are decoded."""
    items, _ = _as_list(texts)
    config = (config or GenerationConfig()).replace(**options)
    yield from _text_events(model, tokenizer, items, config)


def fill_blanks(
    model: GLMModel,
    tokenizer: Any,
    texts: str | Sequence[str],
    config: GenerationConfig | None = None,
    streamer: Callable[[TokenEvent], None] | None = None,
    **options: Any,
) -> FilledText | list[FilledText]:
    """Fill every [MASK]/[sMASK]/[gMASK] of each text, left to right, in one batched, cached decode.

    Args:
        model: a GLM.
        tokenizer: a `GLMTokenizer` (anything with encode/decode and the command-token id properties).
        texts: one text or a list; texts without a mask get a [gMASK] appended (spec E.1).
        config: decoding settings (`GenerationConfig`); keyword `options` override its fields, e.g.
            `num_beams=4`, `do_sample=True, top_p=0.9, seed=0`, `max_length=32`.
        streamer: called with a `TokenEvent` (carrying the decoded fill so far) for each decoded token.

    Returns:
        A `FilledText` per text (a single one when `texts` is a str).
    """
    items, single = _as_list(texts)
    config = (config or GenerationConfig()).replace(**options)
    events = _text_events(model, tokenizer, items, config)
    while True:
        try:
            event = next(events)
        except StopIteration as finished:
            out = finished.value
            break
        if streamer is not None:
            streamer(event)
    return out[0] if single else out


# ------------------------------------------------------------------------------------------------------------
# Scoring
def score_fill_ids(
    model: GLMModel,
    context_ids: Sequence[int],
    mask_position: int,
    candidates: Sequence[Sequence[int]],
    special: SpecialIds,
    include_eop: bool = True,
    normalize: bool = False,
    batch_size: int = 64,
) -> list[float]:
    """Log-likelihood of each candidate fill of one blank, from one encoding of the context (spec D.2, I.7).

    Args:
        model: a GLM.
        context_ids: Part A ids with the mask at `mask_position`.
        mask_position: index of the blank's mask token.
        candidates: token ids of each candidate fill.
        special: sop/eop/eos/pad ids.
        include_eop: also score <|endofpiece|> after the candidate (official cloze scoring does).
        normalize: divide by the number of scored tokens.
        batch_size: candidates scored per forward (all of them share the one context encoding).

    Returns:
        One log-likelihood per candidate (full-vocabulary log-softmax, as officially).
    """
    if not candidates:
        return []
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if not 0 <= mask_position < len(context_ids):
        raise ValueError(f"mask position {mask_position} is outside the {len(context_ids)} context tokens")
    targets = [list(c) + ([special.eop] if include_eop else []) for c in candidates]
    for i, tgt in enumerate(targets):
        if not tgt:
            raise ValueError(f"candidate {i} is empty and include_eop is False: nothing to score")
    rows = model.config.position_table_rows
    if max(len(t) for t in targets) >= rows:
        raise ValueError(f"a candidate is longer than the model's {rows - 1} block positions")
    _check_lengths(model, [context_ids], GenerationConfig(max_length=1, min_length=0))
    was_training = model.training
    model.eval()
    scores: list[float] = []
    try:
        with torch.inference_mode():
            context = DecodeState(model)
            _prefill(context, [context_ids], special.pad)
            for first in range(0, len(targets), batch_size):
                chunk = targets[first : first + batch_size]
                state = context.expand(torch.zeros(len(chunk), dtype=torch.long))
                N, T = len(chunk), max(len(t) for t in chunk)
                ids = torch.full((N, T), special.pad, dtype=torch.long)
                goal = torch.full((N, T), special.pad, dtype=torch.long)
                real = torch.zeros(N, T, dtype=torch.bool)
                for i, tgt in enumerate(chunk):
                    n = len(tgt)
                    ids[i, :n] = torch.tensor(
                        [special.sop] + tgt[:-1]
                    )  # input i predicts target i (no shift)
                    goal[i, :n] = torch.tensor(tgt)
                    real[i, :n] = True
                block = torch.arange(1, T + 1).expand(N, T)
                pos = torch.stack([torch.full((N, T), mask_position), block], dim=1)  # (N, 2, T)
                logits = state.feed(ids, _positions(state, pos), real, logits_at=real)  # (sum of lengths, V)
                picked = F.log_softmax(logits.float(), dim=-1).gather(
                    -1, goal[real].to(logits.device)[:, None]
                )
                per_token = picked[:, 0].tolist()
                start = 0
                for tgt in chunk:
                    total = sum(per_token[start : start + len(tgt)])
                    start += len(tgt)
                    scores.append(total / len(tgt) if normalize else total)
    finally:
        model.train(was_training)
    return scores


def score_fills(
    model: GLMModel,
    tokenizer: Any,
    text: str,
    candidates: Sequence[str],
    blank: int = 0,
    include_eop: bool = True,
    normalize: bool = False,
    batch_size: int = 64,
) -> list[float]:
    """Log-likelihood of each candidate text as the fill of one blank of `text` (multiple choice, cloze).

    Args:
        model: a GLM.
        tokenizer: a `GLMTokenizer`.
        text: the prompt; its masks as in `fill_blanks` (a [gMASK] is appended when it has none).
        candidates: candidate fills, encoded as given (leading spaces matter for BPE tokenizers).
        blank: which mask (0 = the leftmost) the candidates fill.
        include_eop: also score <|endofpiece|> after the candidate.
        normalize: divide each score by its number of scored tokens.
        batch_size: candidates scored per forward.

    Returns:
        One log-likelihood per candidate.
    """
    context, positions = prepare_context(tokenizer, text)
    if not 0 <= blank < len(positions):
        raise ValueError(f"blank={blank} but the text has {len(positions)} mask(s)")
    ids = [list(tokenizer.encode(c)) for c in candidates]
    return score_fill_ids(
        model,
        context,
        positions[blank],
        ids,
        SpecialIds.from_tokenizer(tokenizer),
        include_eop,
        normalize,
        batch_size,
    )
