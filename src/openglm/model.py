"""The GLM network (spec A): one pre-LN Transformer whose Part A attends bidirectionally and Part B causally.

Module and parameter names follow the official checkpoints (`word_embeddings`, `transformer.layers.{i}.
attention.query_key_value`, ...), so official and Hugging Face state dicts load without a key map; only the
model-parallel merge and prefix handling live in `convert.py`.

Shape legend: B batch, T new tokens, S keys (cache + new), C channels (hidden), nh heads, hs head size,
V padded vocabulary.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openglm.config import GLMConfig

AttentionMask = int | Tensor | None


class KVCache:
    """Keys and values of every layer for the positions seen so far, for incremental decoding.

    The official code caches pre-LN hidden states and re-projects them to K/V at every step; since past
    states never change, caching K/V is numerically equivalent and avoids that work. Buffers grow by
    doubling so that appending one token does not copy the whole cache; `reserve` sizes the first buffers
    for a caller that knows how long the cache will get (a decoding loop then never copies its context).
    """

    def __init__(self, num_layers: int, reserve: int = 0) -> None:
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.length = 0
        self._pending = 0
        self.reserve = reserve

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v ([B, nh, T, hs]) after the cached positions; return all keys/values [B, nh, S, hs]."""
        new = k.size(2)
        end = self.length + new
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is None or buf_k.size(2) < end or buf_k.size(0) != k.size(0) or buf_k.dtype != k.dtype:
            grown = 2 * buf_k.size(2) if buf_k is not None else self.reserve
            capacity = max(end, grown, 16)
            shape = (k.size(0), k.size(1), capacity, k.size(3))
            grown_k, grown_v = k.new_empty(shape), v.new_empty(shape)
            if buf_k is not None and self.length:
                grown_k[:, :, : self.length] = buf_k[:, :, : self.length]
                grown_v[:, :, : self.length] = buf_v[:, :, : self.length]
            buf_k, buf_v = grown_k, grown_v
            self.keys[layer], self.values[layer] = buf_k, buf_v
        buf_k[:, :, self.length : end] = k
        buf_v[:, :, self.length : end] = v
        self._pending = new
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float
    ) -> Tensor:
        """Attention of q ([B, nh, T, hs]) over the cached positions and the new k, v, which are appended."""
        k, v = self.append(layer, k, v)  # (B, nh, S, hs)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

    def commit(self) -> None:
        """Called once per forward after every layer appended: the new positions become part of the cache."""
        self.length += self._pending
        self._pending = 0

    @property
    def batch_size(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].size(0)

    def select(self, index: Tensor) -> KVCache:
        """A new cache whose batch rows are `index` (beam reordering, repeating rows for beams)."""
        out = KVCache(len(self.keys))
        out.length = self.length
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            if k is not None:
                out.keys[i] = k[:, :, : self.length].index_select(0, index)
                out.values[i] = v[:, :, : self.length].index_select(0, index)
        return out

    def reorder_(self, index: Tensor, start: int = 0) -> None:
        """In place, row i takes the positions `start:` of row `index[i]` (beam search). Positions before
        `start` must already agree between those rows, so only the newer ones are copied."""
        if self.length <= start:
            return
        for buffers in (self.keys, self.values):
            for buf in buffers:
                if buf is not None:
                    buf[:, :, start : self.length] = buf[:, :, start : self.length].index_select(0, index)

    def truncate(self, n: int) -> None:
        """Forget every position after the first `n` (buffers are kept, so appending again does not allocate)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {n}")
        self.length = n

    def keep_last(self, n: int) -> None:
        """Drop all but the last `n` positions (the official interactive memory cap, spec A.8)."""
        if n >= self.length:
            return
        start = self.length - n
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            if k is not None:
                self.keys[i] = k[:, :, start : self.length].clone()
                self.values[i] = v[:, :, start : self.length].clone()
        self.length = n


class SharedPrefixCache(KVCache):
    """The cache of a beam search: each `group` consecutive rows (the beams of one text) share one row of a
    `prefix` cache (the text's context and earlier fills) and hold only the positions decoded since.

    Beams differ only in what they decoded, so a copy of the context per beam would make every step read it
    `group` times (at batch 8, 4 beams and context 512 that is about 1.2 GB per step for glm-base); here a
    step reads it once per text, the beams of a text being the query rows of its shared keys. Serves decoding
    steps only: one new token per row, no attention mask (`visible` hides prefix slots; a beam sees all of
    its own positions).
    """

    def __init__(self, prefix: KVCache, visible: Tensor, group: int) -> None:
        if visible.shape != (prefix.batch_size, prefix.length):
            raise ValueError(
                f"visible must be [{prefix.batch_size}, {prefix.length}] for this prefix; got {tuple(visible.shape)}"
            )
        super().__init__(len(prefix.keys))
        self.prefix, self.group = prefix, group
        self.visible = visible
        # (n, 1, 1, P); None when every prefix slot is visible (no padding), which spares a masking pass.
        self._hidden = None if bool(visible.all()) else ~visible[:, None, None, :]

    @property
    def batch_size(self) -> int:
        return self.prefix.batch_size * self.group

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float
    ) -> Tensor:
        rows, nh, T, hs = q.shape
        if T != 1 or mask is not None or rows != self.batch_size:
            raise ValueError(
                f"a shared-prefix cache of {self.batch_size} rows takes one new token per row and no mask; "
                f"got {rows} rows of {T} tokens{' with a mask' if mask is not None else ''}"
            )
        own_k, own_v = self.append(layer, k, v)  # (rows, nh, t, hs)
        n, g, t, P = self.prefix.batch_size, self.group, own_k.size(2), self.prefix.length
        shared_k = self.prefix.keys[layer][:, :, :P]  # (n, nh, P, hs)
        shared_v = self.prefix.values[layer][:, :, :P]
        scale = 1.0 / math.sqrt(hs)
        grouped = q.view(n, g, nh, hs).transpose(1, 2)  # (n, nh, g, hs): a text's beams as its query rows
        shared = torch.matmul(grouped, shared_k.transpose(-1, -2)).mul_(scale)  # (n, nh, g, P)
        if self._hidden is not None:
            shared.masked_fill_(self._hidden, float("-inf"))
        own = torch.matmul(q, own_k.transpose(-1, -2)).mul_(scale)  # (rows, nh, 1, t)
        own = own.view(n, g, nh, t).transpose(1, 2)  # (n, nh, g, t)
        # Softmax in float32 (as the fused kernels do internally), then back to the values' dtype.
        probs = torch.cat([shared, own], dim=-1).float().softmax(dim=-1).to(q.dtype)  # (n, nh, g, P + t)
        if dropout_p:
            probs = F.dropout(probs, dropout_p)
        out = torch.matmul(probs[..., :P], shared_v)  # (n, nh, g, hs)
        out = out.transpose(1, 2).reshape(rows, nh, 1, hs)
        own_probs = probs[..., P:].transpose(1, 2).reshape(rows, nh, 1, t)
        return out.add_(torch.matmul(own_probs, own_v))

    def select(self, index: Tensor) -> SharedPrefixCache:
        """A new cache of the rows `index`, which must be whole groups in order (dropping finished texts)."""
        g = self.group
        groups = index[::g] // g
        if index.numel() % g or not torch.equal(
            index, (groups[:, None] * g + torch.arange(g, device=index.device)).reshape(-1)
        ):
            raise ValueError(
                f"a shared-prefix cache keeps or drops whole groups of {g} rows; got rows {index.tolist()}"
            )
        out = SharedPrefixCache(self.prefix.select(groups), self.visible.index_select(0, groups), g)
        own = KVCache.select(self, index)
        out.keys, out.values, out.length = own.keys, own.values, own.length
        return out


@dataclass
class GLMOutput:
    """`logits` [B, T, V] (or [N, V] for the positions selected by `logits_mask`); `cache` if requested;
    `hidden_states` [B, T, C] after the final LayerNorm."""

    logits: Tensor | None
    cache: KVCache | None = None
    hidden_states: Tensor | None = None


def build_attention_mask(
    attention_mask: AttentionMask, batch: int, query: int, cached: int, device: torch.device
) -> Tensor:
    """Boolean visibility [B or 1, 1, T, S] (True = may attend) from GLM's `sep` semantics (spec A.7).

    `attention_mask` is an int or 1-element tensor (one sep for the batch), a [B] tensor (sep per row) or an
    explicit [B, 1, T, K] 0/1 mask used as given (its last `cached + T` columns). With sep, query i sees key j
    if j < sep or j <= i (indices among the new tokens); cached positions are always visible.
    """
    keys = cached + query
    if isinstance(attention_mask, Tensor) and attention_mask.dim() == 4:
        if attention_mask.size(2) != query or attention_mask.size(-1) < keys:
            raise ValueError(
                f"explicit attention_mask of shape {tuple(attention_mask.shape)} does not cover "
                f"{query} queries and {keys} keys"
            )
        mask = attention_mask[..., -keys:].to(device=device) > 0
        # A query row that sees nothing would give NaN under -inf masking; such rows are padding by
        # construction, so let them see everything rather than poison the batch.
        empty = ~mask.any(dim=-1, keepdim=True)
        return mask | empty
    if attention_mask is None:
        sep = torch.zeros(1, dtype=torch.long, device=device)
    elif isinstance(attention_mask, int):
        sep = torch.tensor([attention_mask], device=device)
    elif isinstance(attention_mask, Tensor) and attention_mask.numel() == 1:
        sep = attention_mask.reshape(1).to(device=device, dtype=torch.long)
    elif isinstance(attention_mask, Tensor) and attention_mask.dim() == 1 and attention_mask.numel() == batch:
        sep = attention_mask.to(device=device, dtype=torch.long)
    else:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask)
        raise ValueError(
            f"attention_mask must be an int, a [1] or [B={batch}] sep tensor, or [B,1,T,S]; got {shape}"
        )
    q = torch.arange(query, device=device).view(1, query, 1)
    k = torch.arange(keys, device=device).view(1, 1, keys) - cached
    visible = (k < sep.view(-1, 1, 1)) | (k <= q)  # (B or 1, T, S); cached keys have k < 0
    return visible.unsqueeze(1)


# Largest row count that takes the weight-major product on CPU; decoding steps (batch x beams rows) fall
# below it, prefill and training batches (thousands of rows) above it.
_FEW_ROWS = 64

# MKL's packed GEMM (the kernels behind torch.compile's CPU freezing); absent from builds without MKL.
_MKL_PACKING = (
    torch.backends.mkl.is_available()
    and hasattr(torch.ops.mkl, "_mkl_linear")
    and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
)


@dataclass(frozen=True)
class PackedWeight:
    """A weight in MKL's packed GEMM layout for products with exactly `rows` rows (see `GLMModel.pack_weights`).

    `source` and `version` are the weight's storage address and `_version` when it was packed: a replaced or
    in-place updated weight no longer matches them, and the stale copy is then ignored."""

    rows: int
    data: Tensor
    source: int
    version: int

    def fits(self, x: Tensor, weight: Tensor, rows: int) -> bool:
        """Whether this copy may stand in for `weight` in x @ weight^T (x with `rows` rows, no gradients)."""
        return (
            self.rows == rows
            and self.source == weight.data_ptr()
            and self.version == weight._version
            and x.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        )


def pack_weight(weight: Tensor, rows: int) -> PackedWeight | None:
    """The packed copy of a float32 CPU weight, or None where MKL packing does not apply."""
    if not _MKL_PACKING or weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    with torch.no_grad():
        data = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)
    return PackedWeight(rows, data, weight.data_ptr(), weight._version)


def linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, packed: PackedWeight | None = None
) -> Tensor:
    """`F.linear`, with faster kernels for the few-row products of decoding on CPU.

    For x @ W^T, CPU BLAS packs (copies) the whole weight matrix on every call, so a decoding step with a
    handful of rows reads each weight three times and costs as much as 60 rows. Two remedies, both reading
    each weight once per call:
    - `packed` (set up by `GLMModel.pack_weights` for a decoding loop): the weight already sits in MKL's
      packed layout for exactly this row count, so the GEMM streams it; no gradients flow through it.
    - otherwise W @ x^T, which packs only the small x^T.
    All linear layers and the vocabulary projection of glm-base at 8 rows, on a 2-core Xeon: about 38 ms
    packed, 58 ms as W @ x^T, 60 ms as F.linear. The sum order can differ from F.linear in the last bits, as
    between any two BLAS kernels.
    """
    rows = x.numel() // x.size(-1) if x.size(-1) else 0
    if x.device.type != "cpu" or not 1 < rows <= _FEW_ROWS:
        return F.linear(x, weight, bias)
    if packed is not None and packed.fits(x, weight, rows):
        return torch.ops.mkl._mkl_linear(x, packed.data, weight, bias, rows)
    flat = x.reshape(rows, x.size(-1))
    # (N, rows) -> (rows, N); contiguous, since attention kernels take slower paths on transposed strides.
    out = torch.mm(weight, flat.t()).t().contiguous()
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight.size(0))


def _memory_allows(weights: list[Tensor]) -> bool:
    """Whether a copy of `weights` fits in a quarter of the memory available now (unknown: no)."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return False
    return 4 * sum(w.numel() * w.element_size() for w in weights) <= available


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state-dict keys) whose forward takes the few-rows paths of `linear`."""

    packed: PackedWeight | None = None

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.packed)


class SelfAttention(nn.Module):
    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_size = config.head_size
        self.dropout = config.attention_dropout_prob
        # Fused projection; output rows are [Q (all heads); K (all heads); V (all heads)].
        self.query_key_value = Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor, mask: Tensor | None, cache: KVCache | None, layer: int) -> Tensor:
        B, T, C = x.shape
        qkv = self.query_key_value(x).view(B, T, 3, self.num_heads, self.head_size)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs)
        dropout = self.dropout if self.training else 0.0
        if cache is not None:
            y = cache.attend(layer, q, k, v, mask, dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.dense(y)


class MLP(nn.Module):
    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = Linear(config.hidden_size, 4 * config.hidden_size)
        self.dense_4h_to_h = Linear(4 * config.hidden_size, config.hidden_size)
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"

    def forward(self, x: Tensor) -> Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate=self.approximate))


class Block(nn.Module):
    """pre_ln: x + f(LN(x)) (GLM). deepnorm: LN(alpha * x + f(x)) (post-LN, GLM-130B)."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.pre_ln = config.norm_scheme == "pre_ln"
        self.alpha = config.residual_alpha
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.output_dropout_prob)

    def forward(self, x: Tensor, mask: Tensor | None, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        if self.pre_ln:
            x = x + self.dropout(self.attention(self.input_layernorm(x), mask, cache, layer))
            return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))
        x = self.input_layernorm(self.alpha * x + self.dropout(self.attention(x, mask, cache, layer)))
        return self.post_attention_layernorm(self.alpha * x + self.dropout(self.mlp(x)))


class Transformer(nn.Module):
    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        rows = config.position_table_rows
        self.position_embeddings = nn.Embedding(rows, config.hidden_size)
        self.block_position_embeddings = (
            nn.Embedding(rows, config.hidden_size) if config.block_position_encoding else None
        )
        self.embedding_dropout = nn.Dropout(config.embedding_dropout_prob)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class GLMModel(nn.Module):
    """GLM with a tied output projection (no bias). Never touches torch.distributed; see `parallel.py`."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.transformer = Transformer(config)
        self.output_packed: PackedWeight | None = None  # the tied output projection's, see pack_weights
        self._packed_rows: int | None = None
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Official init (spec A.6); with deepnorm, Xavier-normal scaled by beta as in GLM-130B/DeepNet."""
        cfg = self.config
        std = cfg.initializer_range
        out_std = std / math.sqrt(2.0 * cfg.num_layers)
        nn.init.normal_(self.word_embeddings.weight, std=std)
        nn.init.normal_(self.transformer.position_embeddings.weight, std=std)
        if self.transformer.block_position_embeddings is not None:
            nn.init.normal_(self.transformer.block_position_embeddings.weight, std=std)
        for block in self.transformer.layers:
            for ln in (block.input_layernorm, block.post_attention_layernorm):
                nn.init.ones_(ln.weight)
                nn.init.zeros_(ln.bias)
            att, mlp = block.attention, block.mlp
            for lin in (att.query_key_value, att.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h):
                nn.init.zeros_(lin.bias)
            if cfg.norm_scheme == "deepnorm":
                beta, C = cfg.init_beta, cfg.hidden_size
                with torch.no_grad():
                    w = att.query_key_value.weight
                    nn.init.xavier_normal_(w[: 2 * C].view(2, C, C)[0])
                    nn.init.xavier_normal_(w[: 2 * C].view(2, C, C)[1])
                    nn.init.xavier_normal_(w[2 * C :], gain=beta)
                for lin in (att.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h):
                    nn.init.xavier_normal_(lin.weight, gain=beta)
            else:
                nn.init.normal_(att.query_key_value.weight, std=std)
                nn.init.normal_(mlp.dense_h_to_4h.weight, std=std)
                nn.init.normal_(att.dense.weight, std=out_std)
                nn.init.normal_(mlp.dense_4h_to_h.weight, std=out_std)
        nn.init.ones_(self.transformer.final_layernorm.weight)
        nn.init.zeros_(self.transformer.final_layernorm.bias)

    # ----------------------------------------------------------------------------------------------------
    def pack_weights(self, rows: int | None) -> bool:
        """Keep copies of the linear weights in MKL's packed layout for forwards of exactly `rows` rows.

        A decoding loop on CPU calls this with its rows per step (batch x beams) and with None when it ends:
        each step then streams every weight once (see `linear`), the largest saving of a float32 decoding
        step. The copies take as much memory as the weights, so they are made only while the weights use at
        most a quarter of the available memory; other devices, dtypes, one row or more than 64 rows are left
        to the plain kernels. Returns whether packed copies are in place.
        """
        if rows == self._packed_rows:
            return self.output_packed is not None
        self._packed_rows = rows
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        for module in linears:
            module.packed = None
        self.output_packed = None
        weights = [m.weight for m in linears] + [self.word_embeddings.weight]
        if rows is None or not 1 < rows <= _FEW_ROWS or not _memory_allows(weights):
            return False
        self.output_packed = pack_weight(self.word_embeddings.weight, rows)
        for module in linears:
            module.packed = pack_weight(module.weight, rows)
        return self.output_packed is not None

    # ----------------------------------------------------------------------------------------------------
    def embed(self, input_ids: Tensor, position_ids: Tensor, input_embeds: Tensor | None = None) -> Tensor:
        cfg = self.config
        B, T = input_ids.shape
        if cfg.block_position_encoding:
            if (
                position_ids.dim() != 3
                or position_ids.shape[1] != 2
                or position_ids.shape[0] != B
                or position_ids.shape[2] != T
            ):
                raise ValueError(
                    f"position_ids must be [B, 2, T] = [{B}, 2, {T}] with block positions; got {tuple(position_ids.shape)}"
                )
            pos, block = position_ids[:, 0], position_ids[:, 1]
        else:
            if position_ids.shape != (B, T):
                raise ValueError(
                    f"position_ids must be [B, T] = [{B}, {T}] without block positions; got {tuple(position_ids.shape)}"
                )
            pos, block = position_ids, None
        words = self.word_embeddings(input_ids) if input_embeds is None else input_embeds
        x = words + self.transformer.position_embeddings(pos)
        if block is not None:
            x = x + self.transformer.block_position_embeddings(block)
        return self.transformer.embedding_dropout(x)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: AttentionMask = None,
        cache: KVCache | None = None,
        use_cache: bool = False,
        logits_mask: Tensor | None = None,
        return_hidden: bool = False,
        input_embeds: Tensor | None = None,
    ) -> GLMOutput:
        """Run GLM over new tokens, optionally after cached ones.

        Args:
            input_ids: [B, T] token ids.
            position_ids: [B, 2, T] (position, block position), or [B, T] without block positions.
            attention_mask: sep as an int / [1] tensor (whole batch) / [B] tensor (per row), or an explicit
                [B, 1, T, K] 0/1 mask used as given. None means sep = 0 (causal). With a cache, cached
                positions are always visible and sep counts among the new tokens.
            cache: a `KVCache` from a previous call; it is extended in place.
            use_cache: start a new cache when `cache` is None and return it.
            logits_mask: optional bool [B, T]; logits are then computed only where it is True and returned
                flattened as [N, V] (the vocabulary projection is the largest matmul of a small model).
            return_hidden: also return the final-LayerNorm hidden states [B, T, C].
            input_embeds: [B, T, C] word embeddings to use instead of looking up `input_ids` (P-tuning
                overwrites some of them); the position embeddings are still added.

        Returns:
            `GLMOutput` with logits [B, T, V] over the padded vocabulary (or [N, V]), the cache, hidden states.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T]; got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if cache is None and use_cache:
            cache = KVCache(self.config.num_layers)
        cached = cache.length if cache is not None else 0
        if cache is not None and cached and cache.batch_size != B:
            raise ValueError(f"cache holds batch {cache.batch_size} but input_ids has batch {B}")
        # One new token, or sep covering every new token, sees every key: no mask lets SDPA take its
        # fastest path (the common case of a decoding step).
        trivial = T == 1 and (
            attention_mask is None
            or isinstance(attention_mask, int)
            or (
                isinstance(attention_mask, Tensor)
                and attention_mask.dim() <= 1
                and attention_mask.numel() in (1, B)
            )
        )
        mask = None if trivial else build_attention_mask(attention_mask, B, T, cached, input_ids.device)
        if input_embeds is not None and input_embeds.shape != (B, T, self.config.hidden_size):
            raise ValueError(
                f"input_embeds must be [B, T, C] = [{B}, {T}, {self.config.hidden_size}]; got {tuple(input_embeds.shape)}"
            )
        x = self.embed(input_ids, position_ids, input_embeds)
        for i, layer in enumerate(self.transformer.layers):
            x = layer(x, mask, cache, i)
        if cache is not None:
            cache.commit()
        h = self.transformer.final_layernorm(x)
        selected = h[logits_mask] if logits_mask is not None else h  # (N, C) or (B, T, C)
        logits = linear(selected, self.word_embeddings.weight, packed=self.output_packed)
        return GLMOutput(logits=logits, cache=cache, hidden_states=h if return_hidden else None)

    # ----------------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `config.json` + `model.safetensors` (atomically) into `directory`."""
        from openglm.convert import save_checkpoint

        save_checkpoint(self, directory)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        config: GLMConfig | str | os.PathLike | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> GLMModel:
        """Load our own directory, a Hugging Face GLM directory, or an official Megatron/DeepSpeed directory.

        Args:
            path: checkpoint directory (or an official `<tag>` folder / `mp_rank_00_model_states.pt`).
            config: a `GLMConfig`, a preset name or a config.json path; required for official checkpoints
                without a config.json in their directory. Overrides the directory's own config when given.
            dtype: cast the weights to this dtype (default: keep float32).
            device: where to build the model.
        """
        from openglm.convert import apply_state_dict, load_checkpoint

        cfg, state = load_checkpoint(Path(path), config)
        model = cls(cfg)
        apply_state_dict(model, state, source=str(path))
        if dtype is not None:
            model = model.to(dtype)
        return model.to(device)
