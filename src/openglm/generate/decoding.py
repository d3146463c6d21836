"""Decoding strategies for blank filling (spec E.1-E.3): settings, logits processors (min length, no-repeat
n-gram, repetition penalty), sampling warpers (temperature, top-k, top-p) and the beam bookkeeping of the
official seq2seq evaluator (an HF-style `BeamSearchScorer`: score = sum_logprob / len**length_penalty, no early
stopping).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GenerationConfig:
    """How each blank is decoded.

    Attributes:
        max_length: at most this many tokens per blank (the official `out_seq_length` / `tgt_seq_length`).
        min_length: the end tokens are banned until a blank has this many tokens (1 avoids empty fills).
        do_sample: sample instead of taking the argmax; with `num_beams` > 1, beam sampling (each step's 2K
            candidates are drawn from the temperature / top-k / top-p distribution, then ranked as in beam
            search).
        temperature: sampling temperature (logits are divided by it).
        top_k: keep only the k most likely tokens when sampling (0 = off).
        top_p: keep the smallest set of tokens whose probability reaches p when sampling (0 = off).
        num_beams: > 1 runs beam search (deterministic top-2*beams selection, as `--select-topk`).
        length_penalty: beam hypotheses are ranked by sum_logprob / length**length_penalty.
        no_repeat_ngram_size: an n-gram never repeats inside one blank (0 = off).
        repetition_penalty: CTRL-style penalty (> 1 discourages) on tokens already generated in this text
            (every blank so far); logits > 0 are divided by it, logits < 0 multiplied.
        mem_length: the official memory cap (interactive `seq_length - 1`): each step attends to at most the
            last `mem_length` positions. None = unlimited (recommended; the cap only exists for parity).
        seed: seed of the torch.Generator used for sampling (None = nondeterministic).
        stop_ids: tokens that end a blank; None means <|endofpiece|> and eos, as in interactive mode.
        vocab_limit: ids >= this are never produced (e.g. the tokenizer's `num_tokens`, to keep the padding
            rows of the vocabulary out of the text); None allows every row, as the official code does.
    """

    max_length: int = 64
    min_length: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    mem_length: int | None = None
    seed: int | None = None
    stop_ids: tuple[int, ...] | None = None
    vocab_limit: int | None = None

    def __post_init__(self) -> None:
        checks = {
            "max_length": self.max_length >= 1,
            "min_length": 0 <= self.min_length <= self.max_length,
            "temperature": self.temperature > 0,
            "top_k": self.top_k >= 0,
            "top_p": 0.0 <= self.top_p <= 1.0,
            "num_beams": self.num_beams >= 1,
            "no_repeat_ngram_size": self.no_repeat_ngram_size >= 0,
            "repetition_penalty": self.repetition_penalty > 0,
            "mem_length": self.mem_length is None or self.mem_length >= 1,
            "vocab_limit": self.vocab_limit is None or self.vocab_limit >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"GenerationConfig.{name} has an invalid value: {getattr(self, name)!r}")
        if self.stop_ids is not None:
            self.stop_ids = tuple(int(t) for t in self.stop_ids)

    def replace(self, **changes: object) -> GenerationConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    @property
    def strategy(self) -> str:
        if self.num_beams > 1:
            return "beam sample" if self.do_sample else "beam"
        return "sample" if self.do_sample else "greedy"


# ------------------------------------------------------------------------------------------------------------
# Logits processors: each takes scores [N, V] and per-row token histories and edits the scores in place.
def ban_until_min_length(
    scores: Tensor, lengths: Sequence[int], min_length: int, stop_ids: Sequence[int]
) -> None:
    """End tokens get -inf in rows whose current blank has fewer than `min_length` tokens."""
    if min_length <= 0:
        return
    rows = [i for i, n in enumerate(lengths) if n < min_length]
    if rows:
        device = scores.device
        scores[
            torch.tensor(rows, device=device)[:, None], torch.tensor(list(stop_ids), device=device)[None, :]
        ] = -float("inf")


def ban_beyond_vocab(scores: Tensor, limit: int | None) -> None:
    """Ids at or above `limit` (padding rows of the vocabulary) get -inf."""
    if limit is not None and limit < scores.size(-1):
        scores[:, limit:] = -float("inf")


def ban_repeated_ngrams(scores: Tensor, histories: Sequence[Sequence[int]], n: int) -> None:
    """Fairseq-style no-repeat n-gram: the token that would complete an n-gram already in the history is banned."""
    if n <= 0:
        return
    for row, tokens in enumerate(histories):
        if len(tokens) + 1 < n:
            continue
        prefix = tuple(tokens[len(tokens) - n + 1 :]) if n > 1 else ()
        banned = [
            tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i : i + n - 1]) == prefix
        ]
        if banned:
            scores[row, banned] = -float("inf")


def penalize_repetition(scores: Tensor, histories: Sequence[Sequence[int]], penalty: float) -> None:
    """CTRL repetition penalty on every token present in a row's history."""
    if penalty == 1.0:
        return
    for row, tokens in enumerate(histories):
        if tokens:
            idx = torch.tensor(sorted(set(tokens)), device=scores.device)
            picked = scores[row, idx]
            scores[row, idx] = torch.where(picked < 0, picked * penalty, picked / penalty)


def warp_logits(logits: Tensor, config: GenerationConfig) -> Tensor:
    """Temperature, then top-k, then top-p (the official order): [N, V] logits with the dropped tokens at -inf."""
    logits = logits.float() / config.temperature
    if config.top_k > 0:
        k = min(config.top_k, logits.size(-1))
        kth = logits.topk(k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if 0.0 < config.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the tokens before it already exceed top_p; the most likely token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) > config.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -float("inf"))
    return logits


def sample_tokens(logits: Tensor, config: GenerationConfig, generator: torch.Generator | None) -> Tensor:
    """One multinomial draw per row from the warped distribution (`warp_logits`). [N, V] -> [N]."""
    probs = warp_logits(logits, config).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _sampled_candidates(
    total: Tensor, config: GenerationConfig, count: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Beam sampling: `count` distinct candidates per text [n, K*V], drawn without replacement from the warped
    distribution over every beam's continuations (Gumbel top-k), returned as (true scores, indices) sorted by
    true score, best first. When warping leaves fewer than `count` candidates, the best remaining ones by true
    score fill up the rest."""
    n, width = total.shape
    warped = warp_logits(total, config)  # temperature / top-k / top-p over all K*V continuations of a text
    uniform = torch.rand(n, width, generator=generator, device=total.device).clamp_(min=1e-20)
    keys = warped - torch.log(-torch.log(uniform))  # -inf outside the warped set
    picked = keys.topk(count, dim=1).indices  # the sampled ones first, then -inf keys
    sampled = torch.isfinite(keys.gather(1, picked))
    if not bool(sampled.all()):
        rest = total.masked_fill(torch.isfinite(warped), -float("inf")).topk(count, dim=1).indices
        slot = (torch.arange(count, device=total.device) - sampled.sum(1, keepdim=True)).clamp(min=0)
        picked = torch.where(sampled, picked, rest.gather(1, slot))
    values = total.gather(1, picked)
    values, order = values.sort(dim=1, descending=True)
    return values, picked.gather(1, order)


# ------------------------------------------------------------------------------------------------------------
class BeamHypotheses:
    """The finished hypotheses of one text (HF `BeamHypotheses` semantics, which the official evaluator uses).

    A hypothesis of n tokens (end token excluded) with summed log-probability s scores s / max(n, 1)**lp; at
    most `num_beams` are kept, the worst is evicted on overflow.
    """

    def __init__(self, num_beams: int, length_penalty: float) -> None:
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.kept: list[tuple[float, list[int], int | None]] = []
        self.worst = 1e9

    def add(self, tokens: list[int], logprob_sum: float, end_token: int | None = None) -> None:
        score = logprob_sum / (max(len(tokens), 1) ** self.length_penalty)
        if len(self.kept) < self.num_beams or score > self.worst:
            self.kept.append((score, tokens, end_token))
            if len(self.kept) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _, _) in enumerate(self.kept))
                del self.kept[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_running: float, cur_len: int) -> bool:
        """No running beam can still beat the worst kept hypothesis (do_early_stopping=False)."""
        if len(self.kept) < self.num_beams:
            return False
        return self.worst >= best_running / (max(cur_len, 1) ** self.length_penalty)

    def best(self) -> tuple[float, list[int], int | None]:
        # A stable sort + pop from the end: among equal scores the last added wins, as in HF finalize.
        return sorted(self.kept, key=lambda x: x[0])[-1]


def beam_step(
    scores: Tensor,
    beam_scores: Tensor,
    hyps: list[BeamHypotheses],
    done: list[bool],
    histories: list[list[int]],
    stop_ids: Sequence[int],
    num_beams: int,
    sampling: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of the official beam search for n texts x K beams.

    Args:
        scores: processed log-probabilities [n*K, V] (done texts: anything).
        beam_scores: running sums [n*K].
        hyps: finished hypotheses per text (updated in place).
        done: per-text flag (updated in place).
        histories: generated tokens per beam row before this step.
        stop_ids: end tokens (the beam "eos").
        num_beams: K.
        sampling: beam sampling with this config's temperature / top-k / top-p: the 2K candidates are drawn
            from the warped distribution instead of taken as the top 2K (beam scores stay true
            log-probabilities). None: the deterministic official search.
        generator: the random source of beam sampling.

    Returns:
        (next beam scores [n*K], next tokens [n*K], source row of each new beam [n*K]). Done texts keep
        their rows in place (their content no longer matters).
    """
    K = num_beams
    n = len(hyps)
    V = scores.size(-1)
    total = (scores + beam_scores[:, None]).view(n, K * V)
    if sampling is not None:
        top_scores, top_idx = _sampled_candidates(total, sampling, 2 * K, generator)
    else:
        # The official code sorts the gathered scores again; topk already returns them sorted.
        top_scores, top_idx = total.topk(2 * K, dim=1, largest=True, sorted=True)
    top_rows = (top_idx // V).tolist()
    top_tokens = (top_idx % V).tolist()
    top_vals = top_scores.tolist()
    cur_len = len(histories[0]) if histories else 0
    stop = set(stop_ids)
    # Python lists while scanning candidates (no per-element device access); float32 values round-trip exactly.
    next_scores = [[0.0] * K for _ in range(n)]
    next_tokens = [[0] * K for _ in range(n)]
    next_rows = [[b * K + j for j in range(K)] for b in range(n)]
    for b in range(n):
        if done[b]:
            continue
        filled = 0
        for rank, (row, tok, val) in enumerate(zip(top_rows[b], top_tokens[b], top_vals[b], strict=True)):
            src = b * K + row
            if tok in stop:
                if rank < K:
                    hyps[b].add(list(histories[src]), val, tok)
            else:
                next_scores[b][filled] = val
                next_tokens[b][filled] = tok
                next_rows[b][filled] = src
                filled += 1
            if filled == K:
                break
        if filled < K:
            raise ValueError(f"beam search: more than {K} of the top {2 * K} candidates are end tokens")
        done[b] = hyps[b].is_done(max(top_vals[b]), cur_len)
    device = scores.device
    return (
        torch.tensor(next_scores, dtype=beam_scores.dtype, device=device).view(-1),
        torch.tensor(next_tokens, dtype=torch.long).view(-1),
        torch.tensor(next_rows, dtype=torch.long).view(-1),
    )
