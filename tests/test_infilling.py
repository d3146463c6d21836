"""Text infilling (spec D.8, E.3): blanking at a mask ratio, the multi-blank layout, greedy multi-blank
decoding after a few training steps, and corpus BLEU against hand computations (and sacrebleu if present)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tests.conftest import bert_tokenizer, char_tokenizer, tiny_checkpoint, train_steps

from openglm.config import GLMConfig
from openglm.model import GLMModel
from openglm.tasks.infilling import (
    corpus_bleu,
    decode_blanks,
    fill_in,
    finetune_infilling,
    infilling_sample,
    mask_words,
    read_documents,
)
from openglm.tasks.lm_eval import collate
from openglm.tasks.seq2seq import smoothed_loss_fn


def test_mask_words_ratio_and_runs() -> None:
    text = " ".join(f"w{i}" for i in range(40))
    masked, answers = mask_words(text, 0.25, np.random.default_rng(3))
    assert masked.count("[MASK]") == len(answers)
    assert sum(len(a.split()) for a in answers) == 10
    assert fill_in(masked, answers) == text
    # Adjacent blanked words collapse into one mask.
    masked, answers = mask_words(
        "a b c d", 0.5, SimpleNamespace(choice=lambda n, size, replace: np.array([1, 2]))
    )
    assert (masked, answers) == ("a [MASK] d", ["b c"])
    assert mask_words("a b c", 0.0, np.random.default_rng(0)) == ("a b c", [])


def test_infilling_layout() -> None:
    tok = char_tokenizer()
    s = infilling_sample("ab [MASK] c [MASK]", ["xy", "z"], tok, src_seq_length=10, mask_ratio=0.6)
    a = [1, *tok.encode("ab"), 2, *tok.encode("c"), 2, 0]  # [CLS] a b [MASK] c [MASK] eos
    x, y, z = tok.encode("xyz")
    assert s["sep"] == 10 and s["mask_positions"] == [3, 5]
    assert s["input_ids"].tolist() == a + [0, 0, 0] + [3, x, y, 3, z, 0]
    assert s["targets"].tolist() == [0] * 10 + [x, y, 4, z, 4, 0]
    assert s["loss_mask"].tolist() == [0] * 10 + [1] * 5 + [0]
    assert s["position_ids"][0].tolist() == list(range(10)) + [3, 3, 3, 5, 5, 0]
    assert s["position_ids"][1].tolist() == [0] * 10 + [1, 2, 3, 1, 2, 0]
    # Spans that do not fit the Part B budget floor(src x m) are dropped whole.
    s = infilling_sample("ab [MASK] c [MASK]", ["xy", "z"], tok, src_seq_length=10, mask_ratio=0.4)
    assert s["targets"].tolist()[10:] == [x, y, 4, 0]


def test_bleu_against_hand_computation() -> None:
    assert corpus_bleu(["a b c d"], ["a b c d"]) == pytest.approx(100.0)
    assert corpus_bleu(["x y z w"], ["a b c d"]) == 0.0
    hyp, ref = "the cat sat on the mat today", "the cat sat on a mat today ok"
    # 1-grams 6/7, 2-grams 4/6, 3-grams 2/5, 4-grams 1/4; c = 7 < r = 8.
    expected = (
        100
        * math.exp(1 - 8 / 7)
        * math.exp((math.log(6 / 7) + math.log(4 / 6) + math.log(2 / 5) + math.log(1 / 4)) / 4)
    )
    assert corpus_bleu([hyp], [ref]) == pytest.approx(expected)
    # Clipping: a repeated word counts at most as often as in the reference.
    assert corpus_bleu(["the the the the"], ["the cat"], max_n=1) == pytest.approx(100 * 1 / 4)
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps = [hyp, "a b c d e f", "one two three four five"]
    refs = [ref, "a b c x e f", "one two three four six"]
    theirs = sacrebleu.corpus_bleu(hyps, [refs], tokenize="none", smooth_method="none").score
    assert corpus_bleu(hyps, refs) == pytest.approx(theirs)


def test_tiny_model_learns_to_fill_two_blanks() -> None:
    """Training steps on one blanked text, then greedy decoding fills both blanks, the second after the first."""
    torch.manual_seed(0)
    tok = char_tokenizer()
    model = GLMModel(GLMConfig.from_name("tiny"))
    sample = infilling_sample("ab [MASK] cd [MASK] e", ["xy", "z"], tok, src_seq_length=12, mask_ratio=0.5)
    train_steps(model, [collate([sample], tok.pad_id)], 20, smoothed_loss_fn(0.1))
    query = infilling_sample("ab [MASK] cd [MASK] e", None, tok, src_seq_length=12, mask_ratio=0.5)
    assert decode_blanks(model, [query], tok, max_length=4) == [[tok.encode("xy"), tok.encode("z")]]


def test_finetune_infilling_end_to_end(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tiny_checkpoint(tmp_path / "base", bert_tokenizer())
    docs = ["i think the answer is yes because it works for me", "you should ask your doctor about the pain"]
    (tmp_path / "train.txt").write_text("\n".join(docs) + "\n")

    def run(max_steps: int, resume: bool = False) -> dict:
        return finetune_infilling(
            str(tmp_path / "base"),
            str(tmp_path / "train.txt"),
            str(tmp_path / "run"),
            dev_data=str(tmp_path / "train.txt"),
            mask_ratio=0.2,
            src_seq_length=32,
            max_steps=max_steps,
            batch_size=2,
            lr=1e-3,
            eval_every=1,
            progress=False,
            device="cpu",
            resume=resume,
        )

    with caplog.at_level("INFO"):
        result = run(2)
    assert result["step"] == 2 and math.isfinite(result["train_loss"])
    assert result["dev"]["count"] == 2 and 0.0 <= result["dev"]["bleu"] <= 100.0
    assert (Path(result["best"]) / "config.json").is_file()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["step"] == 2
    assert re.search(r"new best dev bleu = [\d.]+ \(step 1\)", caplog.text)  # the step, not None
    log = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="already holds a fine-tuning run .*--train.resume true"):
        run(3)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == log  # nothing the run had is lost
    caplog.clear()
    with caplog.at_level("INFO"):
        resumed = run(3, resume=True)
    assert resumed["step"] == 3 and "resumed from" in caplog.text
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 1, 2, 2, 3, 3]  # loss and dev rows of every step, the first run's kept


def test_infilling_files_and_lengths_are_checked(tmp_path: Path) -> None:
    from openglm.tasks.infilling import run_infilling_eval

    (tmp_path / "docs.txt").write_bytes(b"a fine text\nthe \xe9 end\n")
    with pytest.raises(ValueError, match=r"docs.txt:2: not UTF-8 text \(byte 0xe9"):
        read_documents(tmp_path / "docs.txt")
    (tmp_path / "docs.jsonl").write_text('{"text": "a fine text"}\n{"text": 7}\n')
    with pytest.raises(ValueError, match=r"docs.jsonl:2: field 'text' must be a string, got 7"):
        read_documents(tmp_path / "docs.jsonl")
    base = tiny_checkpoint(tmp_path / "base", bert_tokenizer())
    (tmp_path / "docs.txt").write_text("a fine text with a few words\n")
    with pytest.raises(ValueError, match=r"src_seq_length=256 exceeds .* 64; pass --data.max_seq_length 64"):
        run_infilling_eval(str(base), str(tmp_path / "docs.txt"), device="cpu")


def test_yahoo_documents_read(shared_data: Path) -> None:
    docs = read_documents(shared_data / "yahoo" / "val.txt", limit=5)
    assert len(docs) == 5 and all(20 <= len(d.split()) <= 200 for d in docs)
    assert read_documents(shared_data / "yahoo", limit=5) == docs  # a folder: its dev split is val.txt
    assert read_documents(shared_data / "yahoo", limit=5, split="test") == read_documents(
        shared_data / "yahoo" / "test.txt", limit=5
    )
    with pytest.raises(FileNotFoundError, match=r"no train file \(train.txt, train.jsonl\)"):
        read_documents(shared_data / "yahoo", split="train")
