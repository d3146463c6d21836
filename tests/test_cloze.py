"""Cloze classification (spec D.1-D.3): input parity with the official builder for every fixture task and
pattern, truncation, collation, single/multi-token scoring and the losses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import reference_dir, require, shared_data_dir

from openglm.tasks import cloze
from openglm.tasks.cloze import MASK, ClozeTask, Example, Fragment
from openglm.tasks.superglue import TASK_DIRS, get_task

TOKENIZER_FILES = {
    "bert": "bert-large-uncased-vocab.txt",
    "gpt2": "gpt2-vocab.json",
}


def _fixture_cases() -> list[str]:
    index = reference_dir() / "cloze" / "index.json"
    if not index.is_file():
        return []
    return sorted(json.loads(index.read_text()))


_TOKENIZERS: dict[str, object] = {}


def load_tokenizer(kind: str):
    if kind not in _TOKENIZERS:
        from openglm.tokenizer import GLMTokenizer

        path = require(shared_data_dir() / "tokenizers" / TOKENIZER_FILES[kind])
        _TOKENIZERS[kind] = GLMTokenizer.from_files(kind, path)
    return _TOKENIZERS[kind]


def _example_dict(ex: Example) -> dict:
    return {"guid": ex.guid, "text_a": ex.text_a, "text_b": ex.text_b, "label": ex.label, "meta": ex.meta}


def _parts_dict(parts: list[Fragment], mask_id: int) -> list[dict]:
    return [
        {"ids": [mask_id], "shortenable": False}
        if f.is_mask
        else {"text": f.text, "shortenable": f.shortenable}
        for f in parts
        if f.is_mask or f.text
    ]


def check_case(case: str, tokenizer) -> None:
    """Compare our reader, pattern and inputs with one fixture file, example by example."""
    fx = json.loads((reference_dir() / "cloze" / f"{case}.json").read_text())
    task = get_task(fx["task"])
    pattern_id = fx["pattern_id"]
    data_file = require(shared_data_dir() / "superglue" / fx["data_file"])
    split = fx["split"]
    assert Path(fx["data_file"]).parts[0] == TASK_DIRS[task.name]
    examples = task.read(data_file, split)
    assert len(examples) == fx["n_examples_in_split"]
    # The official dataset stable-sorts by number of choices (this reorders ReCoRD only).
    if task.multi_token:
        examples = sorted(examples, key=lambda e: len(task.answers(e, pattern_id)))
    assert task.label_list == fx["label_list"]
    assert task.multi_token == fx["is_multi_token"]
    if fx["verbalizers"] is not None:
        assert task.verbalizer(pattern_id) == [v["word"] for v in fx["verbalizers"]]
        assert cloze.verbalizer_ids(task, tokenizer, pattern_id) == [v["id"] for v in fx["verbalizers"]]
    max_len = fx["max_seq_length"]
    assert task.max_seq_length == max_len
    for item in fx["examples"]:
        ex = examples[item["dataset_index"]]
        want = item["example"]
        got = _example_dict(ex)
        if task.name == "record":  # answers come from a set in the official reader: order is arbitrary
            assert sorted(got["meta"].pop("answers")) == sorted(want["meta"]["answers"])
            want = {**want, "meta": {k: v for k, v in want["meta"].items() if k != "answers"}}
        assert got == {k: want[k] for k in got}, ex.guid
        parts_a, parts_b = task.pattern(ex, pattern_id)
        assert _parts_dict(parts_a, tokenizer.mask_id) == item["pattern_parts_a"], ex.guid
        assert _parts_dict(parts_b, tokenizer.mask_id) == item["pattern_parts_b"], ex.guid
        if task.multi_token:
            answers = task.answers(ex, pattern_id)
            assert answers == item["answers"], ex.guid
            assert [tokenizer.encode(a) for a in answers] == item["answer_ids"], ex.guid
        sample = cloze.encode_example(task, ex, tokenizer, pattern_id, max_len, split=split)
        ref = item["sample"]
        assert sample.truncated == item["truncated"], ex.guid
        assert sample.input_ids.tolist() == ref["text"], ex.guid
        assert sample.position_ids.tolist() == ref["position"], ex.guid
        assert np.asarray(sample.sep).tolist() == ref["mask"], ex.guid
        assert sample.loss_mask.tolist() == ref["logit_mask"], ex.guid
        assert sample.label == ref["label"], ex.guid
        assert sample.uid == ref["uid"]
        if task.multi_token:
            assert sample.targets.tolist() == ref["target"], ex.guid
        else:
            assert sample.label_ids.tolist() == ref["target"], ex.guid


@pytest.mark.parametrize("case", _fixture_cases() or ["<no cloze fixtures>"])
def test_cloze_inputs_match_official(case: str) -> None:
    require(reference_dir() / "cloze" / "index.json")
    fx_meta = json.loads((reference_dir() / "cloze" / f"{case}.json").read_text())
    check_case(case, load_tokenizer(fx_meta["tokenizer"]))


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer-free unit tests: a tiny character-level tokenizer


class CharTokenizer:
    """One id per character; specials above 256."""

    pad_id = eos_id = 0
    cls_id, sep_id, mask_id, sop_id, eop_id = 257, 258, 259, 260, 261
    vocab_size = 384

    def encode(self, text: str) -> list[int]:
        return [min(ord(c), 255) + 1 if c != "\x00" else 1 for c in text]


class ToyTask(ClozeTask):
    name = "toy"
    label_list = ["neg", "pos"]

    def pattern(self, example, pattern_id):
        return [Fragment(example.text_a, True), Fragment(" ?")], [MASK, Fragment(example.text_b or "", True)]

    def verbalizer(self, pattern_id):
        return ["n", "y"]


def test_truncation_takes_from_the_longer_shortenable_part_ties_to_b() -> None:
    a = [([1, 2, 3, 4], True), ([9], False)]
    b = [([5, 6], True), ([7, 8], True)]
    # total = 5 + 4 + 3 = 12; budget 9 -> remove 3: A(4)>B(4)? no -> B; A(4)>B(3) -> A; A(3)>B(3)? no -> B
    assert cloze.truncate(a, b, 0, 9)
    assert a == [([1, 2, 3], True), ([9], False)]
    assert b == [([5, 6], True), ([], True)]
    assert not cloze.truncate(a, b, 0, 100)
    with pytest.raises(ValueError, match="shortenable"):
        cloze.truncate([([1], False)], [], 0, 3)


def test_build_input_layout_single_and_multi_token() -> None:
    tok = CharTokenizer()
    row = cloze.build_input([10, tok.mask_id, 11, tok.mask_id], [12], None, 12, tok)
    # [CLS] 10 M 11 M 12 eos | sop | pad...
    assert row.input_ids.tolist() == [257, 10, 259, 11, 259, 12, 0, 260, 0, 0, 0, 0]
    assert row.sep == 7
    assert row.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 4, 0, 0, 0, 0]  # the *last* mask
    assert row.position_ids[1].tolist() == [0] * 7 + [1, 0, 0, 0, 0]
    assert row.loss_mask.tolist() == [0] * 7 + [1, 0, 0, 0, 0]
    multi = cloze.build_input([tok.mask_id], None, [30, 31, tok.eop_id], 9, tok)
    assert multi.input_ids.tolist() == [257, 259, 0, 260, 30, 31, 0, 0, 0]
    assert multi.targets.tolist() == [0, 0, 0, 30, 31, 261, 0, 0, 0]
    assert multi.position_ids.tolist() == [[0, 1, 2, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 2, 3, 0, 0, 0]]
    with pytest.raises(ValueError, match="MASK"):
        cloze.build_input([10], None, None, 8, tok)


def test_encode_example_truncates_to_fit_and_checks_label_words() -> None:
    tok = CharTokenizer()
    task = ToyTask()
    ex = Example("x-0", "abcdefghij", "klmnop", "pos")
    s = cloze.encode_example(task, ex, tok, max_seq_length=16)
    assert s.truncated and s.sep == 15 and s.label == 1
    assert s.label_ids.tolist() == [ord("n") + 1, ord("y") + 1]
    bad = ToyTask()
    bad.verbalizer = lambda pid: ["no", "y"]
    with pytest.raises(ValueError, match="one"):
        cloze.encode_example(bad, ex, tok, max_seq_length=64)


class TinyLM(torch.nn.Module):
    """Stands in for GLMModel: logits depend on token and position so that scores differ per row."""

    def __init__(self, vocab: int = 384) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 8)
        self.out = torch.nn.Linear(8, vocab)
        self.calls: list[tuple[int, ...]] = []

    def forward(self, input_ids, position_ids, attention_mask=None, logits_mask=None):
        self.calls.append(tuple(input_ids.shape))
        h = self.emb(input_ids) + position_ids[:, 0, :, None].float() * 0.01
        h = torch.cumsum(h, dim=1)  # causal-ish mixing
        logits = self.out(h)
        if logits_mask is not None:
            logits = logits[logits_mask]

        class Out:
            pass

        o = Out()
        o.logits = logits
        return o


def _manual_choice_score(model, row: cloze.ClozeRow) -> float:
    ids = torch.from_numpy(row.input_ids)[None]
    pos = torch.from_numpy(row.position_ids)[None]
    logits = model(ids, pos).logits[0].log_softmax(-1)
    m = row.loss_mask.astype(bool)
    tgt = torch.from_numpy(row.targets[m])
    return float(logits[torch.from_numpy(m)].gather(1, tgt[:, None]).sum().detach())


def test_multi_token_scores_mask_padded_choices_and_apply_length_penalty() -> None:
    torch.manual_seed(0)
    tok = CharTokenizer()
    model = TinyLM()

    class Choice(ToyTask):
        multi_token = True

        def answers(self, example, pattern_id):
            return example.meta["choices"]

    task = Choice()
    s1 = cloze.encode_example(
        task, Example("a", "xy", None, "pos", {"choices": ["p", "qrs", "t"]}), tok, max_seq_length=20
    )
    s2 = cloze.encode_example(
        task, Example("b", "zz", None, "neg", {"choices": ["uv", "w"]}), tok, max_seq_length=20
    )
    batch = cloze.collate([s1, s2])
    assert batch["input_ids"].shape[:2] == (2, 3) and batch["choice_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    scores = cloze.cloze_scores(model, batch)
    assert model.calls[-1][0] == 5  # only the real choices are run
    assert scores[1, 2].item() == cloze.PADDED_CHOICE_SCORE
    for b, s in enumerate((s1, s2)):
        for c in range(s.num_choices):
            row = cloze.ClozeRow(
                s.input_ids[c], s.position_ids[c], int(s.sep[c]), s.targets[c], s.loss_mask[c]
            )
            assert scores[b, c].item() == pytest.approx(_manual_choice_score(model, row), abs=1e-5)
    pen = cloze.cloze_scores(model, batch, length_penalty=1.0)
    # "qrs" has 3 letters + eop = 4 scored tokens
    assert pen[0, 1].item() == pytest.approx(scores[0, 1].item() / 4, abs=1e-5)
    loss = cloze.cloze_loss(scores, batch["labels"])
    loss.backward()
    assert model.emb.weight.grad is not None


def test_single_token_scores_read_logits_at_sep() -> None:
    torch.manual_seed(0)
    tok = CharTokenizer()
    model = TinyLM()
    task = ToyTask()
    samples = [
        cloze.encode_example(task, Example(f"e{i}", t, "u", "pos"), tok, max_seq_length=32)
        for i, t in enumerate(["ab", "abcdef"])
    ]
    batch = cloze.collate(samples)
    assert batch["input_ids"].shape[1] == max(s.sep for s in samples) + 1  # trailing padding trimmed
    scores = cloze.cloze_scores(model, batch)
    full = model(batch["input_ids"], batch["position_ids"]).logits
    for b, s in enumerate(samples):
        assert torch.allclose(scores[b], full[b, s.sep, s.label_ids])


def test_losses_against_hand_values() -> None:
    scores = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.0, cloze.PADDED_CHOICE_SCORE]])
    labels = torch.tensor([0, 1])
    ce = -(torch.log_softmax(scores, -1)[0, 0] + torch.log_softmax(scores, -1)[1, 1]) / 2
    assert cloze.cloze_loss(scores, labels).item() == pytest.approx(ce.item())
    # hinge: row 0: max(0,1+0-2)+max(0,1-1-2)=0; row 1: max(0,1+0.5-1)=0.5, padded 0 -> mean 0.25
    assert cloze.cloze_loss(scores, labels, "hinge").item() == pytest.approx(0.25)
    assert cloze.cloze_loss(scores, labels, "generative").item() == pytest.approx(-1.5)
    assert cloze.cloze_loss(scores, labels, "mix").item() == pytest.approx(-1.5 + ce.item())
    with pytest.raises(ValueError, match="loss_func"):
        cloze.cloze_loss(scores, labels, "nope")
