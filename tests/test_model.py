"""GLMModel: parity with the official forward passes (fixtures) and the invariants of the Part A/B masks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import reference_dir

from openglm import GLMConfig, GLMModel, KVCache
from openglm.model import (
    _MKL_PACKING,
    Linear,
    SharedPrefixCache,
    build_attention_mask,
    linear,
    pack_weight,
)

ATOL = 1e-4


def _model_cases() -> list[str]:
    root = reference_dir() / "model"
    if not root.is_dir():
        return ["<missing>"]
    return sorted(p.name for p in root.iterdir() if (p / "expected.safetensors").is_file())


@pytest.fixture(params=_model_cases())
def case(request, reference):
    folder = reference / "model" / request.param
    if not folder.is_dir():
        pytest.skip(f"no model fixtures under {reference / 'model'}")
    cfg = GLMConfig.from_file(folder / "config.json")
    model = GLMModel(cfg).eval()
    model.load_state_dict(load_file(str(folder / "weights.safetensors")))
    return (
        folder,
        model,
        load_file(str(folder / "inputs.safetensors")),
        load_file(str(folder / "expected.safetensors")),
    )


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def test_forward_sep_vector_scalar_and_4d_mask(case):
    _, model, inp, exp = case
    ids, pos = inp["input_ids"], inp["position_ids"]
    assert _max_diff(model(ids, pos, inp["sep"]).logits, exp["logits_sep_vector"]) < ATOL
    assert _max_diff(model(ids, pos, inp["sep_scalar"]).logits, exp["logits_sep_scalar"]) < ATOL
    assert _max_diff(model(ids, pos, inp["attention_mask_4d"]).logits, exp["logits_mask_4d"]) < ATOL
    assert _max_diff(model(ids, pos, inp["sep"], use_cache=True).logits, exp["logits_return_memory"]) < ATOL


@torch.no_grad()
def test_incremental_decoding_matches_official_memory(case):
    _, model, inp, exp = case
    out = model(
        inp["inc_context_ids"], inp["inc_context_position_ids"], inp["inc_context_sep"], use_cache=True
    )
    assert _max_diff(out.logits, exp["inc_context_logits"]) < ATOL
    cache = out.cache
    steps = inp["inc_step_ids"].shape[1]
    for k in range(steps):
        step = model(
            inp["inc_step_ids"][:, k : k + 1],
            inp["inc_step_position_ids"][..., k : k + 1],
            inp["inc_step_sep"],
            cache=cache,
        )
        assert _max_diff(step.logits[:, -1], exp["inc_step_logits"][k]) < ATOL
    full = model(inp["inc_full_ids"], inp["inc_full_position_ids"], inp["inc_full_sep"])
    assert _max_diff(full.logits, exp["inc_full_logits"]) < ATOL
    assert cache.length == inp["inc_full_ids"].shape[1]


@torch.no_grad()
def test_cache_equals_full_forward_with_chunks():
    torch.manual_seed(0)
    model = GLMModel(GLMConfig.from_name("tiny")).eval()
    B, T, sep = 2, 20, 12
    ids = torch.randint(0, 256, (B, T))
    pos = torch.stack(
        [torch.arange(T).expand(B, T), (torch.arange(T) - sep + 1).clamp(min=0).expand(B, T)], dim=1
    )
    full = model(ids, pos, sep).logits
    out = model(ids[:, :sep], pos[..., :sep], sep, use_cache=True)
    chunks = [out.logits]
    cache = out.cache
    for start, end in [(sep, sep + 3), (sep + 3, sep + 4), (sep + 4, T)]:
        chunks.append(model(ids[:, start:end], pos[..., start:end], 0, cache=cache).logits)
    assert _max_diff(torch.cat(chunks, dim=1), full) < 1e-5


@torch.no_grad()
def test_part_a_never_sees_part_b_and_b_is_causal():
    torch.manual_seed(1)
    model = GLMModel(GLMConfig.from_name("tiny")).eval()
    T, sep = 16, 9
    ids = torch.randint(0, 256, (1, T))
    pos = torch.stack([torch.arange(T), (torch.arange(T) - sep + 1).clamp(min=0)]).unsqueeze(0)
    base = model(ids, pos, sep).logits
    changed = ids.clone()
    changed[0, 12:] = (changed[0, 12:] + 7) % 256
    other = model(changed, pos, sep).logits
    assert torch.equal(base[:, :12], other[:, :12])  # Part A and earlier Part B tokens untouched
    assert _max_diff(base[:, 12:], other[:, 12:]) > 1e-3
    changed_a = ids.clone()
    changed_a[0, 2] = (changed_a[0, 2] + 1) % 256
    assert _max_diff(model(changed_a, pos, sep).logits[:, :2], base[:, :2]) > 1e-4  # A is bidirectional


def test_build_mask_semantics():
    m = build_attention_mask(torch.tensor([2, 0]), 2, 4, 0, torch.device("cpu"))[:, 0]
    assert m[0].int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert m[1].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    cached = build_attention_mask(0, 1, 2, 3, torch.device("cpu"))[0, 0]
    assert cached.int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="attention_mask"):
        build_attention_mask(torch.zeros(3), 2, 4, 0, torch.device("cpu"))


def test_logits_mask_selects_positions():
    torch.manual_seed(2)
    model = GLMModel(GLMConfig.from_name("tiny")).eval()
    ids = torch.randint(0, 256, (2, 10))
    pos = torch.stack([torch.arange(10).expand(2, 10), torch.zeros(2, 10, dtype=torch.long)], dim=1)
    sel = torch.zeros(2, 10, dtype=torch.bool)
    sel[0, 3] = sel[1, 7] = True
    with torch.no_grad():
        full = model(ids, pos, 10).logits
        part = model(ids, pos, 10, logits_mask=sel).logits
    assert part.shape == (2, 256)
    assert torch.allclose(part, full[sel], atol=1e-6)


def test_position_ids_shape_errors():
    model = GLMModel(GLMConfig.from_name("tiny"))
    with pytest.raises(ValueError, match=r"\[B, 2, T\]"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("mode", ["autocast", "pure"])
def test_bf16_runs_and_stays_close(mode):
    torch.manual_seed(3)
    model = GLMModel(GLMConfig.from_name("tiny")).eval()
    ids = torch.randint(0, 256, (2, 12))
    pos = torch.stack([torch.arange(12).expand(2, 12), torch.zeros(2, 12, dtype=torch.long)], dim=1)
    with torch.no_grad():
        ref = model(ids, pos, 6).logits
        if mode == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(ids, pos, 6).logits
        else:
            out = model.to(torch.bfloat16)(ids, pos, 6).logits
    assert torch.isfinite(out.float()).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_deepnorm_bounded_update_at_depth():
    """DeepNorm's point: one optimizer step changes the output by a depth-independent amount, while a
    post-LN residual stack without it moves more as depth grows."""

    def update_size(scheme: str, layers: int, alpha: float | None = None, beta: float | None = None) -> float:
        torch.manual_seed(0)
        cfg = GLMConfig(
            num_layers=layers, hidden_size=16, num_attention_heads=2, vocab_size=64, max_sequence_length=16,
            norm_scheme=scheme, deepnorm_alpha=alpha, deepnorm_beta=beta,
            embedding_dropout_prob=0.0, attention_dropout_prob=0.0, output_dropout_prob=0.0,
        )  # fmt: skip
        model = GLMModel(cfg)
        ids = torch.randint(0, 64, (2, 8))
        pos = torch.stack([torch.arange(8).expand(2, 8), torch.zeros(2, 8, dtype=torch.long)], dim=1)
        before = model(ids, pos, 8, return_hidden=True).hidden_states.detach()
        model(ids, pos, 8).logits.logsumexp(-1).mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 1e-3 * p.grad.sign()  # Adam-like step of fixed size per parameter
        after = model(ids, pos, 8, return_hidden=True).hidden_states.detach()
        return ((after - before).norm() / before.norm()).item()

    deep = update_size("deepnorm", 32)
    shallow = update_size("deepnorm", 4)
    assert deep < 3 * shallow  # bounded as depth grows 8x
    plain_post_ln = update_size("deepnorm", 32, alpha=1.0, beta=1.0)  # post-LN without DeepNorm
    assert deep < 0.5 * plain_post_ln


def test_cache_reorder_copies_only_positions_from_start():
    cache = KVCache(1)
    k = torch.arange(2 * 1 * 4 * 1, dtype=torch.float32).view(2, 1, 4, 1)
    cache.append(0, k, k.clone())
    cache.commit()
    cache.reorder_(torch.tensor([1, 1]), start=2)
    keys = cache.keys[0][:, :, : cache.length, 0]
    assert keys.tolist() == [[[0.0, 1.0, 6.0, 7.0]], [[4.0, 5.0, 6.0, 7.0]]]


def test_cache_truncate_keeps_buffers_and_refuses_growth():
    cache = KVCache(1)
    k = torch.randn(1, 2, 5, 4)
    cache.append(0, k, k)
    cache.commit()
    buffer = cache.keys[0]
    cache.truncate(3)
    assert cache.length == 3
    cache.append(0, k[:, :, :1], k[:, :, :1])
    cache.commit()
    assert cache.keys[0] is buffer and cache.length == 4
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(9)


def test_cache_reserve_sizes_the_first_buffers():
    k = torch.randn(2, 3, 30, 4)
    cache = KVCache(1, reserve=40)
    cache.append(0, k, k)
    cache.commit()
    buffer = cache.keys[0]
    assert buffer.size(2) == 40
    cache.append(0, k[:, :, :10], k[:, :, :10])  # fills the reserve exactly: no new buffer
    cache.commit()
    assert cache.keys[0] is buffer
    cache.append(0, k[:, :, :1], k[:, :, :1])  # beyond it: doubling as usual
    cache.commit()
    assert cache.keys[0].size(2) == 80
    torch.testing.assert_close(cache.keys[0][:, :, :30], k)


@pytest.mark.parametrize("rows", [1, 2, 8, 64, 65])
@pytest.mark.parametrize("with_bias", [True, False])
def test_few_rows_linear_equals_f_linear_with_gradients(rows, with_bias):
    torch.manual_seed(rows)
    x = torch.randn(rows, 1, 24, requires_grad=True)  # (B, T, C) with B*T = rows
    weight = torch.randn(40, 24, requires_grad=True)
    bias = torch.randn(40, requires_grad=True) if with_bias else None
    out = linear(x, weight, bias)
    expected = torch.nn.functional.linear(x, weight, bias)
    assert out.shape == expected.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [x, weight] + ([bias] if with_bias else []))
    wanted = torch.autograd.grad(expected.square().sum(), [x, weight] + ([bias] if with_bias else []))
    for got, want in zip(grads, wanted, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


needs_mkl = pytest.mark.skipif(not _MKL_PACKING, reason="this torch build has no MKL packed GEMM")


@needs_mkl
def test_packed_linear_equals_f_linear_and_never_uses_a_stale_copy():
    torch.manual_seed(0)
    weight, bias = torch.randn(40, 24), torch.randn(40)
    packed = pack_weight(weight, 8)
    with torch.no_grad():
        for x in (torch.randn(8, 1, 24), torch.randn(24, 8).t(), torch.randn(2, 4, 24)):
            torch.testing.assert_close(
                linear(x, weight, bias, packed), torch.nn.functional.linear(x, weight, bias)
            )
        x = torch.randn(8, 24)
        other = pack_weight(torch.randn(40, 24), 8)  # another weight's copy: ignored
        torch.testing.assert_close(
            linear(x, weight, bias, other), torch.nn.functional.linear(x, weight, bias)
        )
        weight.mul_(2.0)  # updated in place after packing: the copy is stale
        torch.testing.assert_close(
            linear(x, weight, bias, packed), torch.nn.functional.linear(x, weight, bias)
        )
    # With gradients wanted, the plain kernels run (the packed product has no backward).
    weight = torch.randn(40, 24, requires_grad=True)
    out = linear(x, weight, None, pack_weight(weight, 8))
    (grad,) = torch.autograd.grad(out.sum(), [weight])
    torch.testing.assert_close(grad, x.sum(0).expand(40, 24))


def test_pack_weights_keeps_the_step_and_is_undone():
    """A decoding step with packed weights gives the logits of the plain kernels; None drops every copy."""
    torch.manual_seed(1)
    model = GLMModel(GLMConfig.from_name("tiny")).eval()
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    ids = torch.randint(0, 100, (4, 6))
    pos = torch.stack([torch.arange(6).expand(4, 6), torch.zeros(4, 6, dtype=torch.long)], dim=1)
    step = torch.tensor([[[6], [0]]]).expand(4, 2, 1)
    with torch.no_grad():
        cache = model(ids, pos, use_cache=True).cache
        plain = model(ids[:, :1], step, cache=cache).logits
        cache.truncate(6)
        assert model.pack_weights(4) is _MKL_PACKING
        assert all((m.packed is not None) is _MKL_PACKING for m in linears)
        packed = model(ids[:, :1], step, cache=cache).logits
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
    assert not model.pack_weights(1) and not model.pack_weights(65)  # plain kernels serve these
    assert model.pack_weights(None) is False
    assert model.output_packed is None and all(m.packed is None for m in linears)


def test_shared_prefix_cache_equals_a_copy_per_row():
    """Beams reading one shared prefix row (with hidden slots) attend as if each had its own copy of it."""
    torch.manual_seed(2)
    texts, beams, P, nh, hs = 3, 2, 7, 2, 4
    prefix = KVCache(1)
    prefix.append(0, torch.randn(texts, nh, P, hs), torch.randn(texts, nh, P, hs))
    prefix.commit()
    visible = torch.ones(texts, P, dtype=torch.bool)
    visible[1, 5:] = False  # padding of a shorter text
    rows = torch.arange(texts).repeat_interleave(beams)
    shared, copied = SharedPrefixCache(prefix, visible, beams), prefix.select(rows)
    for step in range(3):
        q, k, v = (torch.randn(texts * beams, nh, 1, hs) for _ in range(3))
        mask = torch.cat([visible[rows], torch.ones(texts * beams, step + 1, dtype=torch.bool)], dim=1)
        got = shared.attend(0, q, k, v, None, 0.0)
        want = copied.attend(0, q, k, v, mask[:, None, None, :], 0.0)
        shared.commit()
        copied.commit()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    order = torch.tensor([1, 1, 2, 3, 5, 4])  # beams reorder within their text
    shared.reorder_(order)
    copied.reorder_(order, P)
    kept = shared.select(torch.tensor([0, 1, 4, 5]))  # text 1 finished
    assert kept.batch_size == 4 and kept.prefix.batch_size == 2 and kept.length == 3
    q, k, v = (torch.randn(4, nh, 1, hs) for _ in range(3))
    keep = torch.tensor([0, 1, 4, 5])
    mask = torch.cat([visible[rows][keep], torch.ones(4, 4, dtype=torch.bool)], dim=1)
    want = copied.select(keep).attend(0, q, k, v, mask[:, None, None, :], 0.0)
    torch.testing.assert_close(kept.attend(0, q, k, v, None, 0.0), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="whole groups of 2"):
        shared.select(torch.tensor([0, 2, 3]))
    with pytest.raises(ValueError, match="one new token per row"):
        shared.attend(
            0, torch.randn(6, nh, 2, hs), torch.randn(6, nh, 2, hs), torch.randn(6, nh, 2, hs), None, 0.0
        )
