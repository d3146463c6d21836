"""Seq2seq (spec D.7, E.2): fixture parity of the XSum / customization rows, pair reading, the label-smoothed
loss against a hand computation, ROUGE on a known example, and a tiny fine-tune that learns and decodes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import (
    bert_tokenizer,
    char_tokenizer,
    reference_dir,
    shared_data_dir,
    tiny_checkpoint,
    train_steps,
)
from tests.test_lm_eval import assert_row, fixture_cases, fixture_tokenizer, load_case

from openglm.config import GLMConfig
from openglm.model import GLMModel
from openglm.tasks.seq2seq import (
    DecodeSettings,
    Seq2SeqBatches,
    collate_seq2seq,
    extend_positions,
    finetune_seq2seq,
    generate_targets,
    label_smoothed_nll,
    read_pairs,
    rouge,
    seq2seq_sample,
    smoothed_loss_fn,
)


@pytest.mark.parametrize("name", fixture_cases(("xsum_", "customization_")) or ["<no fixtures>"])
def test_seq2seq_layout_parity(name: str) -> None:
    """Rows built from the example strings with our tokenizer equal the official rows id for id."""
    if name == "<no fixtures>":
        pytest.skip(f"reference data not available under {reference_dir()} (set OPENGLM_REFERENCE_DIR)")
    case = load_case(name)
    tok = fixture_tokenizer(case)
    mask_pad = bool(case.get("mask_pad_token", False))
    masks = np.load(reference_dir() / "seq2seq" / f"{name}.npz") if mask_pad else None
    for ex in case["examples"]:
        where = f"{name}[{ex['index']}]"
        target = ex["example"]["target"] if case["split"] == "train" else None
        sample = seq2seq_sample(
            ex["example"]["source"],
            target,
            tok,
            case["task"],
            case["src_seq_length"],
            case["tgt_seq_length"],
            mask_pad=mask_pad,
        )
        ref = dict(ex["sample"])
        if mask_pad:
            expected = masks[f"ex{ex['index']}_attention_mask"][0]
            np.testing.assert_array_equal(
                sample["attention_mask"], expected, err_msg=f"{where}: attention mask"
            )
            ref["attention_mask"] = case["src_seq_length"]
        if target is None:
            assert "targets" not in sample
            ref.update(target=sample["input_ids"] * 0, loss_mask=sample["input_ids"] * 0)
            sample = {**sample, "targets": sample["input_ids"] * 0, "loss_mask": sample["input_ids"] * 0}
        assert_row(sample, ref, where)
        if "ref" in ex["example"]:
            assert tok.decode(tok.encode(" " + ex["example"]["target"])).strip() == ex["example"]["ref"]


def test_read_pairs_formats(tmp_path: Path) -> None:
    rows = [{"document": "Line one.\n\nLine two. ", "summary": " Short. "}, {"document": "x", "summary": "y"}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_pairs(tmp_path / "data.jsonl") == [("Line one. Line two.", "Short."), ("x", "y")]
    (tmp_path / "dev.source").write_text("a b\nc d\n")
    (tmp_path / "dev.target").write_text("A\nC\n")
    assert read_pairs(tmp_path, "dev") == [("a b", "A"), ("c d", "C")]
    with pytest.raises(
        FileNotFoundError, match=r"no train file \(train.jsonl, or .source \+ .target pairs\)"
    ):
        read_pairs(tmp_path, "train")
    official = tmp_path / "official"  # the official folders name the dev split `val`
    official.mkdir()
    (official / "val.source").write_text("e f\n")
    (official / "val.target").write_text("E\n")
    assert read_pairs(official, "dev") == [("e f", "E")]
    (tmp_path / "odd.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="source_key"):
        read_pairs(tmp_path / "odd.jsonl")
    (tmp_path / "test.target").write_text("only one\n")
    (tmp_path / "test.source").write_text("a\nb\n")
    with pytest.raises(ValueError, match="2 lines"):
        read_pairs(tmp_path, "test")


def test_read_pairs_refuses_fields_that_are_not_text(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good = {"document": "a b", "summary": "c"}
    for row, message in (
        ({"document": 5, "summary": None}, r"bad.jsonl:3: field 'document' must be a string, got 5$"),
        ({"document": "a b", "summary": None}, r"bad.jsonl:3: field 'summary' must be a string, got null$"),
    ):
        path.write_text(json.dumps(good) + "\n\n" + json.dumps(row) + "\n")
        with pytest.raises(ValueError, match=message):
            read_pairs(path)
    (tmp_path / "train.source").write_bytes(b"a b\n\xfe\n")
    (tmp_path / "train.target").write_text("A\nB\n")
    with pytest.raises(ValueError, match=r"train.source:2: not UTF-8 text \(byte 0xfe"):
        read_pairs(tmp_path, "train")


def test_label_smoothing_matches_hand_computation() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    targets = torch.tensor([0, 1])
    eps = 0.1
    expected = []
    for row, t in zip(logits.tolist(), targets.tolist(), strict=True):
        z = math.log(sum(math.exp(v) for v in row))
        logp = [v - z for v in row]
        expected.append((1 - eps) * -logp[t] + eps * -sum(logp) / len(logp))
    torch.testing.assert_close(label_smoothed_nll(logits, targets, eps), torch.tensor(expected))
    torch.testing.assert_close(
        label_smoothed_nll(logits, targets, 0.0),
        torch.nn.functional.cross_entropy(logits, targets, reduction="none"),
    )


def test_rouge_on_known_example() -> None:
    pytest.importorskip("rouge_score")
    m = rouge(["the cat sat on the mat"], ["the cat was on the mat"])
    assert m["rouge1"] == pytest.approx(100 * 5 / 6)
    assert m["rouge2"] == pytest.approx(100 * 3 / 5)
    assert m["rougeL"] == pytest.approx(100 * 5 / 6)
    # Stemming: "running" and "runs" share the stem "run".
    assert rouge(["dogs running"], ["dog runs"])["rouge1"] == pytest.approx(100.0)
    assert rouge(["a b", "c"], ["a b", "d"])["rouge1"] == pytest.approx(50.0)


def test_extend_positions_keeps_old_rows() -> None:
    torch.manual_seed(0)
    model = GLMModel(GLMConfig.from_name("tiny"))
    old = model.transformer.position_embeddings.weight.detach().clone()
    assert extend_positions(model, 80)
    new = model.transformer.position_embeddings.weight
    assert new.shape[0] == model.config.position_table_rows == 81
    torch.testing.assert_close(new[: old.shape[0]], old)
    assert not extend_positions(model, 40)
    ids = torch.zeros(1, 80, dtype=torch.long)
    pos = torch.stack([torch.arange(80), torch.zeros(80, dtype=torch.long)])[None]
    assert model(ids, pos, attention_mask=80).logits.shape == (1, 80, model.config.vocab_size)


def test_tiny_model_learns_and_beam_decodes_a_target() -> None:
    """A few steps of the smoothed loss on one pair: the loss falls and beam search returns the target."""
    torch.manual_seed(0)
    tok = char_tokenizer()
    model = GLMModel(GLMConfig.from_name("tiny"))
    pairs = [("abcdef", "xyz")]
    samples = [seq2seq_sample(s, t, tok, "summarization", 16, 6) for s, t in pairs]
    assert samples[0]["input_ids"].shape == (22,)
    batches = Seq2SeqBatches(samples, 1, tok.pad_id, seed=0)
    loss_fn = smoothed_loss_fn(0.1)
    with torch.no_grad():
        before = float(loss_fn(model, collate_seq2seq(samples, tok.pad_id))[0])
    evals = [seq2seq_sample(s, None, tok, "summarization", 16, 6) for s, _ in pairs]
    decode = DecodeSettings(num_beams=3, min_length=1, no_repeat_ngram_size=0)
    expected = [tok.encode(" " + t) for _, t in pairs]
    assert generate_targets(model, evals, tok, decode, 6) != expected
    train_steps(model, batches, 30, loss_fn)
    with torch.no_grad():
        after = float(loss_fn(model, collate_seq2seq(samples, tok.pad_id))[0])
    assert after < before / 3
    assert generate_targets(model, evals, tok, decode, 6) == expected


def test_finetune_seq2seq_end_to_end(tmp_path: Path) -> None:
    """The CLI-level function: loads a checkpoint + tokenizer, trains, decodes dev, keeps the best model."""
    pytest.importorskip("rouge_score")
    tiny_checkpoint(tmp_path / "base", bert_tokenizer())
    rows = [{"document": "the fox jumps over the dog.\nit was sunny.", "summary": "fox jumps"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = finetune_seq2seq(
        str(tmp_path / "base"),
        str(tmp_path / "train.jsonl"),
        str(tmp_path / "run"),
        dev_data=str(tmp_path / "train.jsonl"),
        src_seq_length=80,
        tgt_seq_length=6,
        max_steps=3,
        batch_size=1,
        lr=1e-3,
        decode=DecodeSettings(num_beams=2, min_length=1),
        progress=False,
        device="cpu",
    )
    assert result["step"] == 3 and math.isfinite(result["train_loss"])
    assert set(result["dev"]) == {"rouge1", "rouge2", "rougeL", "count"} and result["dev"]["count"] == 1
    best = GLMModel.from_pretrained(result["best"])
    assert best.config.max_sequence_length == 80  # position tables grown for the 80-token source
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["step"] == 3


def test_lora_seq2seq_trains_grown_position_rows(tmp_path: Path) -> None:
    """With LoRA the backbone is frozen, but position rows grown for a longer source start random, so the
    position tables train in full; the kept model is a plain GLM with the merged adapters."""
    pytest.importorskip("rouge_score")
    from openglm.lora import LoRASettings

    base = tiny_checkpoint(tmp_path / "base", bert_tokenizer())
    rows = [{"document": "the fox jumps over the dog.\nit was sunny.", "summary": "fox jumps"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = finetune_seq2seq(
        str(base),
        str(tmp_path / "train.jsonl"),
        str(tmp_path / "run"),
        src_seq_length=80,
        tgt_seq_length=6,
        max_steps=3,
        batch_size=1,
        lr=1e-2,
        warmup=0.0,
        progress=False,
        device="cpu",
        lora=LoRASettings(rank=2, targets=("query_key_value",)),
    )
    before, after = (
        GLMModel.from_pretrained(base).state_dict(),
        GLMModel.from_pretrained(result["best"]).state_dict(),
    )
    changed = {k for k in before if before[k].shape != after[k].shape or not torch.equal(before[k], after[k])}
    qkv = {k for k in before if k.endswith("query_key_value.weight")}
    positions = {"transformer.position_embeddings.weight", "transformer.block_position_embeddings.weight"}
    assert changed == qkv | positions


def test_explicit_mask_token() -> None:
    from openglm.tasks.seq2seq import resolve_mask
    from openglm.tokenizer import GLMTokenizer

    vocab = shared_data_dir() / "tokenizers" / "gpt2-vocab.json"
    if not vocab.is_file():
        pytest.skip(f"tokenizer files not available: {vocab}")
    tok = GLMTokenizer.from_files("gpt2", vocab)
    default = seq2seq_sample("a source", None, tok, "customization", 16, 8)
    assert default["input_ids"][default["mask_position"]] == tok.smask_id  # task-mask default: [sMASK]
    gmask = seq2seq_sample("a source", None, tok, "customization", 16, 8, resolve_mask(tok, "[gMASK]"))
    assert gmask["input_ids"][gmask["mask_position"]] == tok.gmask_id
    assert resolve_mask(tok, None) is None
    with pytest.raises(ValueError, match="expected"):
        resolve_mask(tok, "MASK")
    no_task_mask = GLMTokenizer.from_files("gpt2", vocab, task_mask=False)
    with pytest.raises(ValueError, match="not in this tokenizer"):
        resolve_mask(no_task_mask, "[gMASK]")


def test_mask_pad_hides_the_source_padding() -> None:
    """With mask_pad the loss ignores what sits in Part A's padding; without it the pads are attended."""
    torch.manual_seed(0)
    tok = char_tokenizer()
    model = GLMModel(GLMConfig.from_name("tiny")).eval()
    loss_fn = smoothed_loss_fn(0.0)

    def loss(mask_pad: bool, pad_fill: int) -> float:
        s = seq2seq_sample("abc", "xy", tok, "customization", 12, 4, mask_pad=mask_pad)
        s["input_ids"][s["source_length"] : 12] = pad_fill
        batch = collate_seq2seq([s], tok.pad_id)
        assert ("attention_mask" in batch) == mask_pad
        with torch.no_grad():
            total, count = loss_fn(model, batch)
        return float(total / count)

    assert loss(True, 0) == pytest.approx(loss(True, 77), abs=1e-6)
    assert loss(False, 0) != pytest.approx(loss(False, 77), abs=1e-4)
