"""Incremental decoding state (spec A.7-A.8, E.1): one K/V cache for a batch of rows plus, per row, which cached
slots that row may attend to, so that padding and unfed slots stay invisible and the official memory cap
(`mem_length`) can be applied per row.

Every forward appends the same number of slots to every row; a slot a row did not really feed (padding, a
finished row, a token the official loop never feeds) is simply marked invisible for that row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from openglm.model import GLMModel, KVCache, SharedPrefixCache

# Trimming the cache copies it, so it is done only once this many leading slots are invisible to every row.
_TRIM_MIN_SLOTS = 64


class DecodeState:
    """A `KVCache` plus a per-row key-visibility mask [B, S].

    Args:
        model: the network (its parameters decide device and dtype).
        mem_length: the official memory cap (spec A.8, `mem_length = seq_length - 1` in interactive mode): a
            query sees at most the last `mem_length` slots its row fed before the current forward (plus the
            tokens of the current forward). None means unlimited.
        pack_weights: a decoding loop of many one-token steps: each step asks the model for weights packed for
            its row count (`GLMModel.pack_weights`); the loop's owner calls `model.pack_weights(None)` after.
        reserve: cache slots to allocate at the first feed (`KVCache`).
    """

    def __init__(
        self, model: GLMModel, mem_length: int | None = None, pack_weights: bool = False, reserve: int = 0
    ) -> None:
        if mem_length is not None and mem_length < 1:
            raise ValueError(f"mem_length must be >= 1 or None; got {mem_length}")
        self.model = model
        self.mem_length = mem_length
        self.pack_weights = pack_weights
        self.device = next(model.parameters()).device
        self.cache = KVCache(model.config.num_layers, reserve)
        self.keymask = torch.zeros(0, 0, dtype=torch.bool, device=self.device)  # (B, S) slots a row fed
        self.offset = 0  # absolute index of cache slot 0 (slots before it were trimmed)

    @property
    def length(self) -> int:
        """Absolute number of slots appended so far (trimmed ones included)."""
        return self.offset + self.cache.length

    def visible(self) -> Tensor:
        """Bool [B, S]: the cached slots each row may attend to now (fed slots, capped to the last mem_length)."""
        if self.mem_length is None:
            return self.keymask
        # Number of fed slots at or after each column; the cap keeps the last `mem_length` of them.
        after = self.keymask.flip(-1).cumsum(-1).flip(-1)
        return self.keymask & (after <= self.mem_length)

    @torch.no_grad()
    def feed(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        real: Tensor,
        bidirectional: bool = False,
        logits_at: Tensor | None = None,
    ) -> Tensor | None:
        """Run new tokens after the cache and append them.

        Args:
            input_ids: [B, T] token ids (anything where `real` is False).
            position_ids: [B, 2, T] (or [B, T] without block positions).
            real: bool [B, T]; False slots are padding: never visible to any query, now or later.
            bidirectional: True for a Part A context (every real new token sees every other one, spec A.7
                with sep = length); False for Part B tokens (causal among the new tokens).
            logits_at: optional bool [B, T]; return logits only there, flattened to [N, V]. None: no logits.

        Returns:
            logits [N, V] at `logits_at`, or None.
        """
        B, T = input_ids.shape
        if self.cache.length and self.keymask.size(0) != B:
            raise ValueError(f"decode state holds {self.keymask.size(0)} rows but {B} were fed")
        real = real.to(self.device, torch.bool)
        S = self.cache.length
        past = self.visible() if S else torch.zeros(B, 0, dtype=torch.bool, device=self.device)
        if T == 1:  # the decoding step: each row sees its visible cache and itself
            if self.pack_weights:
                # Every step of a loop has the same rows (until finished ones are dropped): weights packed
                # for that row count make the step's products stream them once.
                self.model.pack_weights(B)
            if bool(past.all()):
                mask = None  # every row sees every slot (no padding, no cap): attention's fastest path
            else:
                mask = torch.cat([past, past.new_ones(B, 1)], dim=-1)[:, None, None, :]  # (B, 1, 1, S + 1)
        else:
            if bidirectional:
                new = real[:, None, :].expand(B, T, T)
            else:
                causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()
                new = causal[None] & real[:, None, :]
            # A query always sees itself, so a padding query never has an empty row (its output is discarded).
            new = new | torch.eye(T, dtype=torch.bool, device=self.device)[None]
            mask = torch.cat([past[:, None, :].expand(B, T, S), new], dim=-1).unsqueeze(1)  # (B, 1, T, S + T)
        select = (
            logits_at if logits_at is not None else torch.zeros(B, T, dtype=torch.bool, device=self.device)
        )
        out = self.model(
            input_ids.to(self.device),
            position_ids.to(self.device),
            attention_mask=mask,
            cache=self.cache,
            logits_mask=select.to(self.device),
        )
        self.keymask = torch.cat([self.keymask if S else self.keymask.new_zeros(B, 0), real], dim=1)
        self._maybe_trim()
        return out.logits if logits_at is not None else None

    @torch.no_grad()
    def expand(self, index: Tensor) -> DecodeState:
        """A new state whose rows are `index` of this one (e.g. each row repeated once per beam)."""
        out = DecodeState.__new__(DecodeState)
        out.model, out.mem_length, out.device, out.offset, out.pack_weights = (
            self.model,
            self.mem_length,
            self.device,
            self.offset,
            self.pack_weights,
        )
        index = index.to(self.device)
        out.cache = self.cache.select(index)
        out.keymask = self.keymask.index_select(0, index)
        return out

    def beams(self, items: list[int], beams: int) -> DecodeState | BeamState:
        """The state of a beam search over the rows `items`, `beams` rows each (row i*beams+j: beam j of
        items[i]). Without a memory cap the beams share their row's cache (`BeamState`); with one, each beam
        gets a copy, since the cap hides different slots as beams grow."""
        if self.mem_length is None:
            return BeamState(self, items, beams)
        return self.expand(torch.tensor(items).repeat_interleave(beams))

    @torch.no_grad()
    def reorder(self, index: Tensor, start: int) -> None:
        """Beam reordering in place: row i takes the slots of row index[i] from absolute slot `start` on.

        Slots before `start` must already be equal for row i and row index[i] (beams of one text share their
        context and earlier blanks), so only the slots decoded since `start` are copied, not the whole cache.
        """
        index = index.to(self.device)
        lo = max(start - self.offset, 0)
        self.cache.reorder_(index, lo)
        self.keymask[:, lo:] = self.keymask[:, lo:].index_select(0, index)

    def _maybe_trim(self) -> None:
        """Drop leading slots that the memory cap hides from every row for good (they never come back)."""
        if self.mem_length is None or self.cache.length <= self.mem_length:
            return
        seen = self.visible().any(dim=0)
        first = int(seen.float().argmax()) if bool(seen.any()) else self.cache.length
        if first < _TRIM_MIN_SLOTS:
            return
        self.cache.keep_last(self.cache.length - first)
        self.keymask = self.keymask[:, first:].clone()
        self.offset += first


class BeamState:
    """The decoding state of one beam-search round (spec E.2): `beams` rows per text over a `SharedPrefixCache`,
    so the text's cached context is stored and read once for all of its beams.

    Offers what the beam loop uses of `DecodeState`: `feed` (one token per row), `expand` (keep whole texts),
    `reorder` and `length`.
    """

    def __init__(self, state: DecodeState, items: list[int], beams: int) -> None:
        self.model, self.device, self.beams = state.model, state.device, beams
        self.pack_weights = state.pack_weights
        self.start = state.length
        visible = state.visible()
        if items == list(range(visible.size(0))):
            prefix = state.cache  # read only: the round appends to its own cache
        else:
            index = torch.tensor(items, device=self.device)
            prefix, visible = state.cache.select(index), visible.index_select(0, index)
        self.cache = SharedPrefixCache(prefix, visible, beams)

    @property
    def length(self) -> int:
        """Absolute number of slots: the shared ones plus those decoded in this round."""
        return self.start + self.cache.length

    @torch.no_grad()
    def feed(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        real: Tensor,
        logits_at: Tensor | None = None,
    ) -> Tensor | None:
        """`DecodeState.feed` for one token per row. Rows that are not `real` (texts already decided) still
        fill a slot of their own beams; nothing reads their outputs."""
        B, T = input_ids.shape
        if T != 1 or B != self.cache.batch_size:
            raise ValueError(
                f"a beam state of {self.cache.batch_size} rows takes one token per row; got [{B}, {T}]"
            )
        if self.pack_weights:
            self.model.pack_weights(B)  # as in DecodeState.feed
        select = logits_at if logits_at is not None else torch.zeros(B, 1, dtype=torch.bool)
        out = self.model(
            input_ids.to(self.device),
            position_ids.to(self.device),
            cache=self.cache,
            logits_mask=select.to(self.device),
        )
        return out.logits if logits_at is not None else None

    def expand(self, index: Tensor) -> BeamState:
        """A new state of the rows `index`: whole texts (all of their beams, in order)."""
        out = BeamState.__new__(BeamState)
        out.model, out.device, out.beams, out.start = self.model, self.device, self.beams, self.start
        out.pack_weights = self.pack_weights
        out.cache = self.cache.select(index.to(self.device))
        return out

    @torch.no_grad()
    def reorder(self, index: Tensor, start: int) -> None:
        """Row i takes the decoded slots of row index[i]; `start` must be where this round began."""
        if start != self.start:
            raise ValueError(
                f"a beam state reorders the slots of its round (from {self.start}); got start {start}"
            )
        self.cache.reorder_(index.to(self.device))
