"""Blank filling and generation (spec E): parity with the official decoding loops, batching and cache invariants,
decoding strategies, streaming, candidate scoring and the `openglm infill` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import reference_dir, require, shared_data_dir

from openglm import GLMConfig, GLMModel
from openglm.generate import (
    GenerationConfig,
    SpecialIds,
    fill_blank_ids,
    fill_blanks,
    prepare_context,
    score_fill_ids,
    score_fills,
    stream_blanks,
)

MODELS = ["gpt2_10b_l2_h32", "bert_large_l2_h64"]
# Ids of the random tiny model below (vocab 256).
SPECIAL = SpecialIds(sop=250, eop=251, eos=0, pad=0)
MASK, SMASK, GMASK, CLS = 252, 253, 254, 249


def _fixture_model(name: str) -> tuple[GLMModel, Path]:
    from safetensors.torch import load_file

    folder = require(reference_dir() / "generation" / name)
    model = GLMModel(GLMConfig.from_file(folder / "config.json"))
    model.load_state_dict(load_file(folder / "weights.safetensors"))
    return model.eval(), folder


def _fixture_special(folder: Path) -> SpecialIds:
    ids = json.loads((folder / "meta.json").read_text())["command_tokens"]
    return SpecialIds(sop=ids["sop"], eop=ids["eop"], eos=ids["eos"], pad=ids["pad"])


def _stop_name(record_stop: dict) -> str:
    return "end_token" if record_stop["reason"] == "end_token" else "max_length"


def _official_tokenizer(name: str):
    from openglm.tokenizer import GLMTokenizer

    vocab = shared_data_dir() / "tokenizers"
    if name.startswith("gpt2"):
        return GLMTokenizer.from_files(
            "gpt2", require(vocab / "gpt2-vocab.json"), merges=vocab / "gpt2-merges.txt"
        )
    return GLMTokenizer.from_files("bert", require(vocab / "bert-large-uncased-vocab.txt"))


def _tiny_model(seed: int = 0, **changes) -> GLMModel:
    """A random tiny GLM with sharp distributions (so argmax never hinges on rounding) and a boosted eop row."""
    cfg = GLMConfig.from_name("tiny").replace(**changes)
    model = GLMModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_((0.3 if "embeddings" in name else 0.15) * torch.randn(p.shape, generator=gen))
        model.word_embeddings.weight[SPECIAL.eop] *= 3.0
    return model.eval()


# A batch of different lengths with 1-5 blanks of all three kinds.
TEXTS = [
    [CLS, 5, 6, MASK, 7, 8, 0],
    [CLS, 9, SMASK, 10, 11, MASK, 12, 13, 14, GMASK],
    [CLS, 15, 16, 17, 18, 19, 20, 21, GMASK],
    [CLS, MASK, 3, SMASK, 4, MASK, 5, GMASK, 6, MASK, 0],
    [CLS, 30, 31, MASK, 32, SMASK, 0],
]
MASKS = [[i for i, t in enumerate(ctx) if t in (MASK, SMASK, GMASK)] for ctx in TEXTS]


def _ids(fills) -> list[list[list[int]]]:
    return [[b.token_ids for b in row] for row in fills]


# ------------------------------------------------------------------------------------------------------------
# Parity with the official loops
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("case", ["interactive.json", "interactive_memtrunc.json"])
def test_interactive_parity_batched(name: str, case: str) -> None:
    model, folder = _fixture_model(name)
    fx = json.loads((folder / case).read_text())
    records = fx["records"]
    config = GenerationConfig(max_length=fx["out_seq_length"], min_length=0, mem_length=fx["mem_length"])
    fills = fill_blank_ids(
        model,
        [r["context_ids"] for r in records],
        [r["mask_positions"] for r in records],
        _fixture_special(folder),
        config,
    )  # every prompt in one batched call
    for row, record in zip(fills, records, strict=True):
        assert [b.token_ids for b in row] == [b["generated_ids"] for b in record["blanks"]], record["prompt"]
        assert [b.stop for b in row] == [_stop_name(b["stop"]) for b in record["blanks"]]
        assert [b.position for b in row] == [b["mask_position"] for b in record["blanks"]]
        for b, ref in zip(row, record["blanks"], strict=True):
            assert b.end_token == ref["stop"].get("token")


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("case", ["interactive.json", "interactive_memtrunc.json"])
def test_interactive_step_logits(name: str, case: str) -> None:
    """One prompt at a time: the top-5 logits of every forward match the official ones."""
    model, folder = _fixture_model(name)
    fx = json.loads((folder / case).read_text())
    config = GenerationConfig(max_length=fx["out_seq_length"], min_length=0, mem_length=fx["mem_length"])
    seen: list[torch.Tensor] = []
    hook = model.register_forward_hook(
        lambda _m, _i, out: seen.append(out.logits) if out.logits.numel() else None
    )
    try:
        for record in fx["records"]:
            seen.clear()
            fill_blank_ids(
                model, [record["context_ids"]], [record["mask_positions"]], _fixture_special(folder), config
            )
            steps = [s for blank in record["blanks"] for s in blank["steps"]]
            assert len(seen) == len(steps), "one forward per step, no re-encoding"
            for logits, step in zip(seen, steps, strict=True):
                top = logits.topk(5, dim=-1)
                assert top.indices.tolist() == step["top_ids"]
                torch.testing.assert_close(top.values, torch.tensor(step["top_logits"]), atol=1e-4, rtol=0)
    finally:
        hook.remove()


@pytest.mark.parametrize("name", MODELS)
def test_beam_parity(name: str) -> None:
    model, folder = _fixture_model(name)
    fx = json.loads((folder / "beam.json").read_text())
    special = SpecialIds(sop=fx["sop"], eop=fx["eop"], eos=fx["pad"], pad=fx["pad"])
    config = GenerationConfig(
        max_length=fx["tgt_seq_length"],
        min_length=fx["min_tgt_length"],
        num_beams=fx["num_beams"],
        length_penalty=fx["length_penalty"],
        no_repeat_ngram_size=fx["no_repeat_ngram_size"],
        stop_ids=(fx["eop"],),
    )
    examples = fx["examples"]
    contexts = [
        e["input_ids"][: e["sep"]] for e in examples
    ]  # Part A (its padding is visible, as officially)
    positions = [[e["position_ids"][0][e["sep"]]] for e in examples]
    seen: list[torch.Tensor] = []
    hook = model.register_forward_hook(
        lambda _m, _i, out: seen.append(out.logits) if out.logits.numel() else None
    )
    try:
        fills = fill_blank_ids(model, contexts, positions, special, config)
    finally:
        hook.remove()
    for (fill,), e in zip(fills, examples, strict=True):
        assert fill.token_ids == e["prediction_ids"]
        assert fill.score == pytest.approx(e["beam_score"], abs=1e-4)
        ended = len(fill.token_ids) < fx["tgt_seq_length"]
        assert fill.stop == ("end_token" if ended else "max_length")
    K = fx["num_beams"]
    assert len(seen) == fx["n_forward_calls"]
    for s, (logits, ref) in enumerate(zip(seen, fx["steps_top5"], strict=True)):
        ref_ids, ref_vals = torch.tensor(ref["top_ids"]), torch.tensor(ref["top_logits"])
        if s == 0:  # the official first forward runs once per text, before the beams are made
            logits = logits[::K]
        if logits.shape[0] != ref_ids.shape[0]:
            continue  # a finished text stops computing here; the official loop keeps feeding it padding
        top = logits.topk(5, dim=-1)
        assert top.indices.tolist() == ref_ids.tolist(), f"step {s}"
        torch.testing.assert_close(top.values, ref_vals, atol=1e-4, rtol=0)
    # Batched beam search gives what one text at a time gives.
    for ctx, pos, (fill,) in zip(contexts, positions, fills, strict=True):
        (alone,) = fill_blank_ids(model, [ctx], [pos], special, config)[0]
        assert alone.token_ids == fill.token_ids and alone.score == pytest.approx(fill.score, abs=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_text_level_parity(name: str) -> None:
    """Prompts through GLMTokenizer: the same context ids, output ids and output text as the official script."""
    model, folder = _fixture_model(name)
    tokenizer = _official_tokenizer(name)
    fx = json.loads((folder / "interactive.json").read_text())
    records = fx["records"]
    for record in records:
        assert prepare_context(tokenizer, record["prompt"]) == (
            record["context_ids"],
            record["mask_positions"],
        )
    filled = fill_blanks(
        model, tokenizer, [r["prompt"] for r in records], max_length=fx["out_seq_length"], min_length=0
    )
    for out, record in zip(filled, records, strict=True):
        assert out.output_ids == record["output_ids"]
        assert tokenizer.decode(out.output_ids) == record["output_text"]
        assert [b.text for b in out.blanks] == [b["generated_text"] for b in record["blanks"]]
        assert "MASK]" not in out.text
        for blank in out.blanks:
            assert blank.text.strip() in out.text


# ------------------------------------------------------------------------------------------------------------
# Batching and cache invariants on a random tiny model
def _naive_greedy(model: GLMModel, ctx: list[int], positions: list[int], max_length: int) -> list[list[int]]:
    """Full recomputation every step: Part A + every fed Part B token, sep = len(A) (spec A.7), no cache."""
    fed, pos, block, fills = [], [], [], []
    for m in positions:
        tokens, step_fed = [], [SPECIAL.sop]
        while True:
            ids = ctx + fed + step_fed
            p = list(range(len(ctx))) + pos + [m] * len(step_fed)
            bp = [0] * len(ctx) + block + list(range(1, len(step_fed) + 1))
            logits = model(torch.tensor([ids]), torch.tensor([[p, bp]]), attention_mask=len(ctx)).logits[
                0, -1
            ]
            tok = int(logits.argmax())
            if tok in (SPECIAL.eop, SPECIAL.eos):
                break
            tokens.append(tok)
            if len(tokens) >= max_length:
                break
            step_fed.append(tok)
        fed += step_fed
        pos += [m] * len(step_fed)
        block += list(range(1, len(step_fed) + 1))
        fills.append(tokens)
    return fills


def test_cached_fill_equals_full_recomputation() -> None:
    model = _tiny_model()
    config = GenerationConfig(max_length=6, min_length=0)
    batch_rows: list[int] = []
    hook = model.register_forward_hook(lambda _m, inputs, _o: batch_rows.append(inputs[0].shape[0]))
    try:
        fills = fill_blank_ids(model, TEXTS, MASKS, SPECIAL, config)
    finally:
        hook.remove()
    assert batch_rows[0] == len(TEXTS) and batch_rows[-1] < len(TEXTS)  # finished texts leave the batch
    with torch.no_grad():
        for ctx, masks, row in zip(TEXTS, MASKS, fills, strict=True):
            assert [b.token_ids for b in row] == _naive_greedy(model, ctx, masks, 6)


@pytest.mark.parametrize("options", [{}, {"num_beams": 3, "length_penalty": 0.8}, {"mem_length": 12}])
def test_batched_equals_one_at_a_time(options: dict) -> None:
    model = _tiny_model(1)
    config = GenerationConfig(max_length=5, min_length=1, no_repeat_ngram_size=2, **options)
    batched = fill_blank_ids(model, TEXTS, MASKS, SPECIAL, config)
    assert [len(row) for row in batched] == [len(m) for m in MASKS]
    for ctx, masks, row in zip(TEXTS, MASKS, batched, strict=True):
        (alone,) = fill_blank_ids(model, [ctx], [masks], SPECIAL, config)
        assert [b.token_ids for b in alone] == [b.token_ids for b in row]
        assert [b.score for b in alone] == pytest.approx([b.score for b in row], abs=1e-4)


def test_beams_sharing_the_context_equal_beams_with_copies() -> None:
    """Beam search reads each text's cache once for all its beams (BeamState); with a memory cap every beam
    has its own copy (DecodeState.expand). A cap larger than any text makes both paths decode the same."""
    model = _tiny_model(5)
    config = GenerationConfig(max_length=5, min_length=2, num_beams=3, length_penalty=0.7)
    shared = fill_blank_ids(model, TEXTS, MASKS, SPECIAL, config)
    copied = fill_blank_ids(model, TEXTS, MASKS, SPECIAL, config, mem_length=10_000)
    assert _ids(shared) == _ids(copied)
    for a, b in zip(shared, copied, strict=True):
        assert [f.score for f in a] == pytest.approx([f.score for f in b], abs=1e-4)


def test_one_dimensional_positions() -> None:
    """Models without block positions take [B, T] position ids; batching still changes nothing."""
    model = _tiny_model(12, block_position_encoding=False)
    config = GenerationConfig(max_length=4, num_beams=2)
    batched = fill_blank_ids(model, TEXTS, MASKS, SPECIAL, config)
    assert _ids(batched)[1] == _ids(fill_blank_ids(model, TEXTS[1:2], MASKS[1:2], SPECIAL, config))[0]


def test_padding_inside_batch_is_invisible() -> None:
    """A short context next to a long one fills the same as alone, even with padding tokens that are real ids."""
    model = _tiny_model(2)
    short, long = [CLS, 7, MASK, 0], [CLS] + list(range(10, 40)) + [MASK, 0]
    config = GenerationConfig(max_length=8, min_length=0)
    both = fill_blank_ids(model, [short, long], [[2], [31]], SPECIAL, config)
    assert _ids(both)[0] == _ids(fill_blank_ids(model, [short], [[2]], SPECIAL, config))[0]


def test_memory_cap_changes_late_blanks_only_when_exceeded() -> None:
    model = _tiny_model(3)
    ctx, masks = TEXTS[3], MASKS[3]
    free = fill_blank_ids(model, [ctx], [masks], SPECIAL, max_length=6, min_length=6)
    roomy = fill_blank_ids(model, [ctx], [masks], SPECIAL, max_length=6, min_length=6, mem_length=200)
    tight = fill_blank_ids(model, [ctx], [masks], SPECIAL, max_length=6, min_length=6, mem_length=8)
    assert _ids(free) == _ids(roomy)
    assert _ids(free) != _ids(tight)


@pytest.mark.parametrize("beams", [1, 2])
def test_memory_cap_trimming_keeps_results(beams: int, monkeypatch) -> None:
    """Dropping cache slots that the cap hides from every row (KVCache.keep_last) changes no fill."""
    from openglm.model import KVCache

    model = _tiny_model(3)
    config = GenerationConfig(max_length=6, min_length=6, mem_length=8, num_beams=beams)
    reference = fill_blank_ids(
        model, TEXTS, MASKS, SPECIAL, config
    )  # tiny contexts: below the trim threshold
    calls: list[int] = []
    keep_last = KVCache.keep_last
    monkeypatch.setattr(KVCache, "keep_last", lambda self, n: (calls.append(n), keep_last(self, n))[1])
    monkeypatch.setattr("openglm.generate.state._TRIM_MIN_SLOTS", 1)
    assert _ids(fill_blank_ids(model, TEXTS, MASKS, SPECIAL, config)) == _ids(reference)
    assert calls


# ------------------------------------------------------------------------------------------------------------
# Strategies
def test_sampling_is_seeded_and_top_k_1_is_greedy() -> None:
    model = _tiny_model(4)
    kw = {"max_length": 6, "min_length": 0}
    a = fill_blank_ids(model, TEXTS, MASKS, SPECIAL, do_sample=True, temperature=1.5, seed=7, **kw)
    b = fill_blank_ids(model, TEXTS, MASKS, SPECIAL, do_sample=True, temperature=1.5, seed=7, **kw)
    c = fill_blank_ids(model, TEXTS, MASKS, SPECIAL, do_sample=True, temperature=1.5, seed=8, **kw)
    assert _ids(a) == _ids(b) and _ids(a) != _ids(c)
    greedy = fill_blank_ids(model, TEXTS, MASKS, SPECIAL, **kw)
    assert _ids(fill_blank_ids(model, TEXTS, MASKS, SPECIAL, do_sample=True, top_k=1, seed=1, **kw)) == _ids(
        greedy
    )
    tiny_p = fill_blank_ids(model, TEXTS, MASKS, SPECIAL, do_sample=True, top_p=1e-6, seed=1, **kw)
    assert _ids(tiny_p) == _ids(greedy)


def test_beam_sampling_is_seeded_and_cold_beam_sampling_is_beam_search() -> None:
    model = _tiny_model(4)
    kw = {"max_length": 6, "min_length": 1, "num_beams": 3}
    beam = fill_blank_ids(model, TEXTS, MASKS, SPECIAL, **kw)
    a = fill_blank_ids(model, TEXTS, MASKS, SPECIAL, do_sample=True, temperature=2.0, seed=7, **kw)
    b = fill_blank_ids(model, TEXTS, MASKS, SPECIAL, do_sample=True, temperature=2.0, seed=7, **kw)
    c = fill_blank_ids(model, TEXTS, MASKS, SPECIAL, do_sample=True, temperature=2.0, seed=8, **kw)
    assert _ids(a) == _ids(b) and _ids(a) != _ids(c) and _ids(a) != _ids(beam)
    assert all(blank.score <= 0.0 for row in a for blank in row)  # true (length-normalised) log-probabilities
    # Near-zero temperature: the sampled candidates are the top 2K, so beam sampling is beam search.
    cold = fill_blank_ids(model, TEXTS, MASKS, SPECIAL, do_sample=True, temperature=1e-6, seed=1, **kw)
    assert _ids(cold) == _ids(beam)
    # top_k = 1 keeps one sampled candidate per text; the others are the next best, as in beam search.
    assert _ids(fill_blank_ids(model, TEXTS, MASKS, SPECIAL, do_sample=True, top_k=1, seed=3, **kw)) == _ids(
        beam
    )


def test_processors() -> None:
    model = _tiny_model(5)
    config = GenerationConfig(max_length=12, min_length=4, no_repeat_ngram_size=2)
    for row in fill_blank_ids(model, TEXTS, MASKS, SPECIAL, config):
        for blank in row:
            assert len(blank.token_ids) >= 4
            bigrams = list(zip(blank.token_ids, blank.token_ids[1:], strict=False))
            assert len(bigrams) == len(set(bigrams))
    plain = fill_blank_ids(model, TEXTS, MASKS, SPECIAL, max_length=12, min_length=0)
    penalized = fill_blank_ids(
        model, TEXTS, MASKS, SPECIAL, max_length=12, min_length=0, repetition_penalty=5.0
    )
    repeats = lambda fills: sum(len(b.token_ids) - len(set(b.token_ids)) for row in fills for b in row)  # noqa: E731
    assert repeats(penalized) < repeats(plain)
    beams = fill_blank_ids(model, TEXTS, MASKS, SPECIAL, max_length=12, num_beams=4, min_length=2)
    for row in beams:
        assert all(len(b.token_ids) >= 2 for b in row)
    for options in ({}, {"num_beams": 3}, {"do_sample": True, "seed": 0}):
        limited = fill_blank_ids(model, TEXTS, MASKS, SPECIAL, max_length=8, vocab_limit=100, **options)
        assert all(t < 100 for row in limited for b in row for t in b.token_ids)


def test_beam_search_beats_greedy_on_its_own_score() -> None:
    """With length_penalty 0 the beam score is the summed log-probability, which beam search maximises."""
    model = _tiny_model(6)
    greedy = fill_blank_ids(model, TEXTS[:3], MASKS[:3], SPECIAL, max_length=4, min_length=0)
    beam = fill_blank_ids(
        model, TEXTS[:3], MASKS[:3], SPECIAL, max_length=4, min_length=0, num_beams=4, length_penalty=0.0
    )
    assert beam[0][0].score >= greedy[0][0].score - 1e-5


def test_streaming_matches_result() -> None:
    model = _tiny_model(7)
    events = []
    fills = fill_blank_ids(model, TEXTS, MASKS, SPECIAL, max_length=5, streamer=events.append)
    for i, row in enumerate(fills):
        for k, blank in enumerate(row):
            assert [e.token_id for e in events if (e.text_index, e.blank_index) == (i, k)] == blank.token_ids


def test_decoding_leaves_no_packed_weights_behind() -> None:
    """The decoding steps pack the weights for their row count; the copies go when the loop ends or is closed."""
    from openglm.generate import fill_events
    from openglm.model import _MKL_PACKING, Linear

    model = _tiny_model(4)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    seen: list[bool] = []
    hook = model.register_forward_hook(lambda *_: seen.append(model.output_packed is not None))
    try:
        for beams in (1, 2):
            fill_blank_ids(model, TEXTS, MASKS, SPECIAL, max_length=3, num_beams=beams)
            assert model.output_packed is None and all(m.packed is None for m in linears)
    finally:
        hook.remove()
    assert any(seen) is _MKL_PACKING  # the steps did run packed where MKL is there
    events = fill_events(model, TEXTS, MASKS, SPECIAL, GenerationConfig(max_length=3))
    next(events)
    events.close()
    assert model.output_packed is None and all(m.packed is None for m in linears)
    # One forward of one-token candidates is no decoding loop: nothing is packed for it.
    score_fill_ids(model, TEXTS[0], MASKS[0][0], [[5], [6], [7]], SPECIAL, include_eop=False)
    assert model.output_packed is None


def test_iteration_leaves_caller_state_alone() -> None:
    """Between streamed tokens the caller keeps grad mode; the model's train/eval flag is restored after."""
    from openglm.generate import fill_events

    model = _tiny_model(11).train()
    events = fill_events(model, TEXTS, MASKS, SPECIAL, GenerationConfig(max_length=3))
    next(events)
    assert torch.is_grad_enabled()
    for _ in events:
        assert torch.is_grad_enabled()
    assert model.training


def test_bad_inputs_raise_one_line_errors() -> None:
    model = _tiny_model()
    with pytest.raises(ValueError, match="max_length"):
        GenerationConfig(max_length=0)
    with pytest.raises(ValueError, match="unknown generation option"):
        fill_blank_ids(model, TEXTS, MASKS, SPECIAL, beams=3)
    with pytest.raises(ValueError, match="positions"):
        fill_blank_ids(model, [[CLS] * 80 + [MASK]], [[80]], SPECIAL)
    with pytest.raises(ValueError, match="outside"):
        fill_blank_ids(model, [[CLS, MASK]], [[5]], SPECIAL)


# ------------------------------------------------------------------------------------------------------------
# Scoring
def test_score_fill_ids_matches_full_forward_and_greedy_score() -> None:
    model = _tiny_model(8)
    ctx, m = TEXTS[0], MASKS[0][0]
    candidates = [[40], [41, 42, 43], [44, 45]]
    scores = score_fill_ids(model, ctx, m, candidates, SPECIAL)
    for cand, score in zip(candidates, scores, strict=True):
        tgt = cand + [SPECIAL.eop]
        ids = ctx + [SPECIAL.sop] + cand
        pos = [list(range(len(ctx))) + [m] * len(tgt), [0] * len(ctx) + list(range(1, len(tgt) + 1))]
        with torch.no_grad():
            logits = model(torch.tensor([ids]), torch.tensor([pos]), attention_mask=len(ctx)).logits[
                0, len(ctx) :
            ]
        expected = F.log_softmax(logits, -1).gather(-1, torch.tensor(tgt)[:, None]).sum()
        assert score == pytest.approx(float(expected), abs=1e-4)
    # One candidate alone scores as in the batch; normalisation divides by the scored tokens.
    assert score_fill_ids(model, ctx, m, candidates[1:2], SPECIAL) == pytest.approx(scores[1:2], abs=1e-5)
    assert score_fill_ids(model, ctx, m, candidates, SPECIAL, batch_size=2) == pytest.approx(scores, abs=1e-5)
    norm = score_fill_ids(model, ctx, m, candidates, SPECIAL, normalize=True)
    assert norm == pytest.approx(
        [s / (len(c) + 1) for s, c in zip(scores, candidates, strict=True)], abs=1e-5
    )
    # The log-probability that greedy decoding reports is the score of its own fill without eop.
    (fill,) = fill_blank_ids(model, [ctx], [[m]], SPECIAL, max_length=3, min_length=0)[0]
    (again,) = score_fill_ids(model, ctx, m, [fill.token_ids], SPECIAL, include_eop=False)
    assert again == pytest.approx(fill.score, abs=1e-4)


def test_text_level_fill_and_score_with_tokenizer() -> None:
    tokenizer = _official_tokenizer("gpt2")
    model = _tiny_model(9, vocab_size=tokenizer.vocab_size)
    texts = ["Tsinghua University is located in [MASK].", "The [MASK] of France is [sMASK] and", "No mask"]
    outs = fill_blanks(model, tokenizer, texts, max_length=4)
    assert [len(o.blanks) for o in outs] == [1, 2, 1]
    for o in outs:
        assert "MASK]" not in o.text and all(b.text == tokenizer.decode(b.token_ids) for b in o.blanks)
    single = fill_blanks(model, tokenizer, texts[1], max_length=4)
    assert single.output_ids == outs[1].output_ids
    streamed = list(stream_blanks(model, tokenizer, texts, max_length=4))
    assert streamed[-1].text == outs[streamed[-1].text_index].blanks[streamed[-1].blank_index].text
    scores = score_fills(model, tokenizer, texts[0], [" Beijing", " Paris", " the moon"], include_eop=False)
    assert len(scores) == 3 and all(s < 0 for s in scores)
    with pytest.raises(ValueError, match="blank=3"):
        score_fills(model, tokenizer, texts[0], ["x"], blank=3)


# ------------------------------------------------------------------------------------------------------------
# CLI
@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    tokenizer = _official_tokenizer("gpt2")
    model = _tiny_model(10, vocab_size=tokenizer.vocab_size)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


def test_cli_infill(model_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import io

    from openglm.cli import main

    prompt = "Tsinghua University is located in [MASK]."
    main(["infill", str(model_dir), prompt, "--max_length", "3"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("Tsinghua University is located in") and "[MASK]" not in line

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{prompt}\nThe [MASK] of France is [sMASK].\n\nNo mask at all\n")
    main(
        ["infill", str(model_dir), f"@{prompts}", "--max_length", "3", "--num_beams", "2", "--jsonl", "true"]
    )
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [len(r["blanks"]) for r in rows] == [1, 2, 1]

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{prompt}\nNo mask\n"))
    main(
        [
            "infill",
            str(model_dir),
            "-",
            "--max_length",
            "3",
            "--sample",
            "true",
            "--seed",
            "1",
            "--batch_size",
            "1",
        ]
    )
    assert len(capsys.readouterr().out.strip().splitlines()) == 2

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{prompt}\nstop\n"))
    main(["infill", str(model_dir), "-", "--interactive", "true", "--max_length", "3"])
    out = capsys.readouterr().out
    assert "[blank 1]" in out and out.count(">>>") == 2

    with pytest.raises(SystemExit) as exit_info:
        main(["infill", str(model_dir), f"@{tmp_path / 'missing.txt'}"])
    assert exit_info.value.code == 2 and "missing.txt" in capsys.readouterr().err


def test_tokenizer_without_block_symbols_is_refused() -> None:
    from openglm.tokenizer import GLMTokenizer

    vocab = require(shared_data_dir() / "tokenizers" / "bert-large-uncased-vocab.txt")
    tokenizer = GLMTokenizer.from_files("bert", vocab, block_symbols=False)
    with pytest.raises(ValueError, match="block symbols"):
        fill_blanks(_tiny_model(), tokenizer, "a [MASK] b")


def test_beam_search_drops_finished_texts_and_still_equals_one_at_a_time() -> None:
    """Texts whose beam search ends early leave the batch mid-blank; the others decode as they would alone."""
    model = _tiny_model(4)
    early = {3, 8}  # blanks at these positions: <|endofpiece|> wins from the third token on

    def rig(_module, args, kwargs, output):
        position_ids, select = args[1], kwargs["logits_mask"]
        if select.size(1) == 1 and position_ids.dim() == 3:
            rows = position_ids[:, :, -1][select[:, -1]]  # (N, 2) position, block position of each logit row
            favour = torch.tensor([int(p) in early and int(b) >= 3 for p, b in rows.tolist()])
            output.logits[favour, SPECIAL.eop] += 100.0
        return output

    config = GenerationConfig(max_length=8, min_length=1, num_beams=3)
    batch_rows: list[int] = []
    hooks = [
        model.register_forward_hook(rig, with_kwargs=True),
        model.register_forward_hook(lambda _m, inputs, _o: batch_rows.append(inputs[0].shape[0])),
    ]
    try:
        batched = fill_blank_ids(model, TEXTS, MASKS, SPECIAL, config)
        alone = [
            fill_blank_ids(model, [c], [m], SPECIAL, config)[0] for c, m in zip(TEXTS, MASKS, strict=True)
        ]
    finally:
        for hook in hooks:
            hook.remove()
    first_round = batch_rows[1 : 1 + config.max_length]  # after the prefill: the first blank of every text
    # The rigged texts end at the third step: from the fourth step on, 2 texts x 3 beams.
    assert first_round[:4] == [3 * len(TEXTS)] * 3 + [3 * 2]
    assert _ids(batched) == _ids(alone)
    assert [b.score for row in batched for b in row] == pytest.approx(
        [b.score for row in alone for b in row], abs=1e-4
    )


def _official_layout(model_dir: Path, root: Path) -> Path:
    from safetensors.torch import load_file

    (root / "release").mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("release")
    torch.save(
        {"module": load_file(model_dir / "model.safetensors")},
        root / "release" / "mp_rank_00_model_states.pt",
    )
    return root


def test_cli_infill_reads_official_and_hugging_face_directories(
    model_dir: Path, tmp_path: Path, capsys
) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from openglm.cli import main

    prompt = ["Tsinghua University is located in [MASK].", "--max_length", "3"]
    main(["infill", str(model_dir), *prompt])
    expected = capsys.readouterr().out

    official = _official_layout(model_dir, tmp_path / "official")
    with pytest.raises(SystemExit):
        main(["infill", str(official), *prompt, "--tokenizer", str(model_dir)])
    assert "--model_config" in capsys.readouterr().err
    config = str(model_dir / "config.json")
    main(["infill", str(official), *prompt, "--tokenizer", str(model_dir), "--model_config", config])
    assert capsys.readouterr().out == expected
    # With a config.json (and a tokenizer) beside the official files, the directory works on its own.
    for name in ("config.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(model_dir / name, official / name)
    main(["infill", str(official), *prompt])
    assert capsys.readouterr().out == expected

    # A Hugging Face directory: hub config, `glm.` keys, and the tokenizer named by its tokenizer_class.
    hf = tmp_path / "hf"
    hf.mkdir()
    hf_config = {**json.loads((model_dir / "config.json").read_text()), "model_type": "glm"}
    (hf / "config.json").write_text(json.dumps({**hf_config, "architectures": ["GLMModel"]}))
    state = {"glm." + k: v for k, v in load_file(model_dir / "model.safetensors").items()}
    save_file(state, str(hf / "model.safetensors"))
    vocab = shared_data_dir() / "tokenizers"
    shutil.copy(vocab / "gpt2-vocab.json", hf / "vocab.json")
    shutil.copy(vocab / "gpt2-merges.txt", hf / "merges.txt")
    (hf / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GLMGPT2Tokenizer"}))
    main(["infill", str(hf), *prompt])
    assert capsys.readouterr().out == expected


def test_cli_infill_errors_are_one_line(model_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import io

    from openglm.cli import main

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine [MASK]\n\xff [MASK]\n")
    bare = tmp_path / "bare"  # a model without a tokenizer
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((model_dir / name).read_bytes())
    cases = [
        ([str(tmp_path / "nowhere"), "a [MASK]"], "", f"model directory not found: {tmp_path / 'nowhere'}"),
        (
            [str(model_dir), "a [MASK]", "--dtype", "int8"],
            "",
            "dtype 'int8' is not supported; expected one of",
        ),
        ([str(model_dir), f"@{empty}"], "", f"no texts: {empty} holds no non-blank line"),
        ([str(model_dir), "-"], "", "no texts: stdin holds no non-blank line"),
        ([str(model_dir), "-"], b"\xff\n", "stdin:1: not valid UTF-8 (byte 0xff at offset 0)"),
        ([str(model_dir), f"@{bad}"], "", f"{bad}:2: not valid UTF-8"),
        ([str(model_dir), "  "], "", "no text: the prompt is empty"),
        ([str(bare), "a [MASK]"], "", f"{bare}: no tokenizer_config.json, so no tokenizer to use"),
    ]
    for argv, stdin, message in cases:
        if isinstance(stdin, bytes):
            monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        else:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        with pytest.raises(SystemExit) as exit_info:
            main(["infill", *argv, "--max_length", "2"])
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1, (argv, captured.err)
        assert err[0].startswith(f"openglm: error: {message}"), (argv, err)
        assert captured.out == ""


def test_cli_infill_prints_one_line_per_text(model_dir: Path, capsys, monkeypatch) -> None:
    from openglm.cli import main
    from openglm.generate.infill import FilledText

    def fake_fill(_model, _tokenizer, texts, _config):
        return [FilledText(t, t.replace("[MASK]", "two\nlines\r"), []) for t in texts]

    monkeypatch.setattr("openglm.generate.command.fill_blanks", fake_fill)
    main(["infill", str(model_dir), "a [MASK] b"])
    assert capsys.readouterr().out == "a two\\nlines\\r b\n"
    main(["infill", str(model_dir), "a [MASK] b", "--jsonl", "true"])
    assert json.loads(capsys.readouterr().out)["text"] == "a two\nlines\r b"


def test_splice_keeps_whitespace_fills() -> None:
    """A BPE fill's leading space is the one the text already has before the mask (the official output has it
    once, so a fill of one space adds nothing); any other whitespace of a fill is kept."""
    from types import SimpleNamespace

    from openglm.generate.infill import BlankFill, _splice

    tokenizer = SimpleNamespace(gmask_id=GMASK)

    def splice(source: str, *fills: str) -> str:
        blanks = [BlankFill(position=0, mask_id=MASK, token_ids=[], stop="max_length", text=f) for f in fills]
        return _splice(tokenizer, source, [], blanks)

    assert splice("It is in [MASK].", " Paris") == "It is in Paris."
    assert splice("It is in [MASK].", " ") == "It is in ."
    assert splice("It is in [MASK].", "\n") == "It is in \n."
    assert splice("It is in [MASK].", "  two") == "It is in  two."
    assert splice("[MASK] and [MASK]", " a", "b") == "a and b"
