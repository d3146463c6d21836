"""Zero-shot LM evaluation (spec D.9): fixture parity of the LAMBADA rows and perplexity windows, the word
count of the adjusted perplexity, the all-positions LAMBADA rule and exact-once token coverage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import bert_tokenizer, char_tokenizer, reference_dir, shared_data_dir
from torch import nn

from openglm.config import GLMConfig
from openglm.model import GLMModel, GLMOutput
from openglm.tasks.lm_eval import (
    collate,
    count_words,
    evaluate_lambada,
    evaluate_multichoice,
    evaluate_perplexity,
    lambada_correct,
    lambada_sample,
    lambada_split,
    lm_windows,
    perplexity_metrics,
    wikitext_detokenize,
)

TOKENIZER_FILES = {"bert": "bert-large-uncased-vocab.txt", "gpt2": "gpt2-vocab.json"}
LM_PREFIXES = ("lambada_", "wikitext_", "lm_")


def fixture_cases(prefixes: tuple[str, ...]) -> list[str]:
    """Case names "<model>/<case>" of the seq2seq fixture index that start with one of `prefixes`."""
    index = reference_dir() / "seq2seq" / "index.json"
    if not index.is_file():
        return []
    names = json.loads(index.read_text())
    return sorted(n for n in names if n.split("/", 1)[1].startswith(prefixes))


def load_case(name: str) -> dict:
    path = reference_dir() / "seq2seq" / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"reference data not available: {path} (set OPENGLM_REFERENCE_DIR or add ../shared)")
    return json.loads(path.read_text())


def fixture_tokenizer(case: dict):
    """The official tokenizer configuration a fixture was made with."""
    from openglm.tokenizer import GLMTokenizer

    path = shared_data_dir() / "tokenizers" / TOKENIZER_FILES[case["tokenizer"]]
    if not path.is_file():
        pytest.skip(f"tokenizer files not available: {path}")
    return GLMTokenizer.from_files(case["tokenizer"], path, task_mask=case["task_mask"])


def assert_row(sample: dict, ref: dict, where: str) -> None:
    assert sample["sep"] == ref["attention_mask"], f"{where}: sep"
    np.testing.assert_array_equal(sample["input_ids"], ref["text"], err_msg=f"{where}: text")
    np.testing.assert_array_equal(sample["targets"], ref["target"], err_msg=f"{where}: target")
    np.testing.assert_array_equal(sample["loss_mask"], ref["loss_mask"], err_msg=f"{where}: loss_mask")
    np.testing.assert_array_equal(sample["position_ids"], ref["position_id"], err_msg=f"{where}: position_id")


@pytest.mark.parametrize("name", fixture_cases(LM_PREFIXES) or ["<no fixtures>"])
def test_lm_layout_parity(name: str) -> None:
    """Rows built from the raw text with our tokenizer equal the official rows id for id."""
    if name == "<no fixtures>":
        pytest.skip(f"reference data not available under {reference_dir()} (set OPENGLM_REFERENCE_DIR)")
    case = load_case(name)
    tok = fixture_tokenizer(case)
    mask_id = tok.gmask_id if case["task_mask"] else tok.mask_id
    assert mask_id == case["command_ids"][case["mask_token"]]
    if "lambada" in name:
        for ex in case["examples"]:
            ctx, ans = lambada_split(ex["text"], tok)
            assert ctx == ex["context_ids"] and ans == ex["answer_ids"], f"{name}[{ex['index']}]: encoding"
            sample = lambada_sample(ctx, ans, tok, case["seq_length"], case["unidirectional"])
            assert_row(sample, ex["sample"], f"{name}[{ex['index']}]")
        return
    raw = case["input_text"]
    if "wikitext" in name:
        documents = [tok.encode(wikitext_detokenize(raw))]
        words = count_words(raw)
    else:
        lines = [line for line in raw.split("\n") if line.strip()]
        documents = [tok.encode(line.strip()) for line in lines]
        words = sum(count_words(line) for line in lines)
    assert documents == case["documents"]
    assert words == case["num_original_tokens"]
    assert sum(len(d) for d in documents) == case["num_tokenized_tokens"]
    windows = lm_windows(documents, tok, case["seq_length"], case["overlapping_eval"], case["unidirectional"])
    assert len(windows) == case["n_windows"]
    for sample, ex in zip(windows, case["examples"], strict=True):
        assert_row(sample, ex["sample"], f"{name}[{ex['index']}]")


def test_word_count_splits_on_single_spaces() -> None:
    # Newlines join words, runs of spaces add empty words, outer whitespace is stripped first.
    assert count_words("  a b\nc  d  ") == 4  # ["a", "b\nc", "", "d"]
    assert count_words("one") == 1
    assert count_words("x\n\ny") == 1


def test_wikitext_detokenizer_rules() -> None:
    text = ' = Title = \n The 1 @,@ 000 @-@ year ( old ) " tale " , it \'s 3 @.@ 5 . \n'
    assert wikitext_detokenize(text) == ' = Title =\nThe 1,000-year (old) "tale", it\'s 3.5.\n'


def test_perplexity_metrics_formula() -> None:
    m = perplexity_metrics(nll=30.0, num_tokens=11, num_words=7)
    assert m["loss"] == pytest.approx(3.0)
    assert m["ppl"] == pytest.approx(math.exp(3.0))
    assert m["adjusted_ppl"] == pytest.approx(math.exp(30.0 / 6))
    assert perplexity_metrics(nll=1e6, num_tokens=3, num_words=3)["ppl"] == pytest.approx(math.exp(20.0))


@pytest.mark.parametrize("unidirectional", [False, True])
@pytest.mark.parametrize(("seq_length", "stride"), [(16, 4), (16, 14), (33, 8), (9, 3), (9, 1)])
def test_windows_predict_every_token_once(unidirectional: bool, seq_length: int, stride: int) -> None:
    tok = char_tokenizer(gmask_id=5, smask_id=6)
    docs = [list(range(100, 100 + n)) for n in (1, 2, 7, 15, 16, 17, 40, 61)]
    windows = lm_windows(docs, tok, seq_length, stride, unidirectional)
    predicted = [t for w in windows for t in w["targets"][w["loss_mask"] > 0].tolist()]
    expected = [t for d in docs if len(d) > 1 for t in d[1:]]
    assert sorted(predicted) == sorted(expected)
    assert all(len(w["input_ids"]) == seq_length + 1 for w in windows)


class ScriptedLM(nn.Module):
    """Returns, at the selected positions in order, logits whose argmax is the next id of a script."""

    def __init__(self, script: list[int], vocab: int = 16) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.script, self.vocab, self.calls = list(script), vocab, 0

    def forward(self, input_ids, position_ids, attention_mask=None, logits_mask=None, **_):
        n = int(logits_mask.sum())
        ids = torch.tensor(self.script[:n])
        del self.script[:n]
        self.calls += 1
        return GLMOutput(logits=nn.functional.one_hot(ids, self.vocab).float() * 5.0)


def test_lambada_needs_every_answer_token() -> None:
    tok = char_tokenizer(gmask_id=5, smask_id=6)
    answers = [[7], [8, 9], [10, 11], [12, 13]]
    samples = [lambada_sample([20 + i, 21], ans, tok, seq_length=12) for i, ans in enumerate(answers)]
    # right; second token wrong; first token wrong; both right
    model = ScriptedLM([7, 8, 1, 1, 11, 12, 13])
    assert lambada_correct(model, samples, tok.pad_id, batch_size=3) == [True, False, False, True]
    assert model.calls == 2 and not model.script


def test_lambada_unidirectional_scores_only_the_answer() -> None:
    tok = char_tokenizer(gmask_id=5, smask_id=6)
    sample = lambada_sample([20, 21, 22], [9], tok, seq_length=12, unidirectional=True)
    assert sample["sep"] == 4 and sample["targets"][sample["loss_mask"] > 0].tolist() == [9]
    assert lambada_correct(ScriptedLM([9]), [sample], tok.pad_id) == [True]


def test_collate_trims_padding_without_changing_logits() -> None:
    torch.manual_seed(0)
    tok = char_tokenizer(gmask_id=5, smask_id=6)
    model = GLMModel(GLMConfig.from_name("tiny")).eval()
    samples = [lambada_sample([30, 31, 32, 33], [40, 41], tok, 24), lambada_sample([50], [60], tok, 24)]
    short = collate(samples, tok.pad_id)
    assert short["input_ids"].shape == (2, 9)
    full = {
        k: torch.as_tensor(np.stack([s[k] for s in samples]))
        for k in ("input_ids", "position_ids", "loss_mask")
    }
    with torch.no_grad():
        a = model(short["input_ids"], short["position_ids"], attention_mask=short["sep"]).logits
        b = model(full["input_ids"], full["position_ids"], attention_mask=short["sep"]).logits
    torch.testing.assert_close(a, b[:, :9])


def uniform_model(tokenizer) -> GLMModel:
    """A tiny GLM whose logits are all zero: every token has probability 1/V."""
    config = GLMConfig.from_name("tiny", vocab_size=tokenizer.vocab_size)
    model = GLMModel(config).eval()
    with torch.no_grad():
        model.word_embeddings.weight.zero_()
    return model


def test_perplexity_of_uniform_model_is_vocab_size(tmp_path: Path) -> None:
    """ppl = V exactly iff every token after the first is scored once (windows, stride, batching)."""
    tok = bert_tokenizer()
    model = uniform_model(tok)
    text = " = Heading = \n " + " ".join(f"word{i} , token @-@ {i} ." for i in range(40)) + " \n"
    path = tmp_path / "wiki.test.tokens"
    path.write_text(text)
    m = evaluate_perplexity(model, tok, path, seq_length=32, stride=8, batch_size=3)
    assert m["num_windows"] > 3
    assert m["ppl"] == pytest.approx(tok.vocab_size, rel=1e-5)
    assert m["num_words"] == count_words(text)
    assert m["adjusted_ppl"] == pytest.approx(
        math.exp(math.log(tok.vocab_size) * (m["num_tokens"] - 1) / (m["num_words"] - 1)), rel=1e-5
    )
    uni = evaluate_perplexity(model, tok, path, seq_length=32, stride=8, unidirectional=True)
    assert uni["ppl"] == pytest.approx(tok.vocab_size, rel=1e-5)
    few = evaluate_perplexity(model, tok, path, seq_length=32, stride=8, limit=2)
    assert few["num_windows"] == 2 and "adjusted_ppl" not in few
    assert 0 < few["num_tokens"] < m["num_tokens"]
    assert few["ppl"] == pytest.approx(tok.vocab_size, rel=1e-5)
    limit = model.config.max_sequence_length
    with pytest.raises(ValueError, match=f"seq_length {limit + 1}: must be between 2 and .* {limit}"):
        evaluate_perplexity(model, tok, path, seq_length=limit + 1)
    with pytest.raises(ValueError, match="seq_length 2: perplexity windows need at least 3 tokens"):
        evaluate_perplexity(model, tok, path, seq_length=2)


def test_lambada_and_multichoice_end_to_end(tmp_path: Path) -> None:
    """Reading {"prompt","label"} rows, batching, and the accuracy: a model that always predicts the id of
    "dog" gets exactly the passages whose answer is " dog"."""
    tok = bert_tokenizer()
    model = uniform_model(tok)
    dog = tok.encode(" dog")
    assert len(dog) == 1
    with torch.no_grad():
        model.word_embeddings.weight[dog[0]] = 1.0
        model.transformer.final_layernorm.bias.fill_(1.0)
        model.transformer.final_layernorm.weight.zero_()
    rows = [
        {"prompt": "the cat chased the", "label": "dog"},
        {"prompt": "the dog chased the", "label": "cat"},
        {"text": "my neighbour walks his dog"},
        {"prompt": "a", "label": "doghouse"},
    ]
    path = tmp_path / "lambada.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    m = evaluate_lambada(model, tok, path, batch_size=3)
    assert m == {"accuracy": 0.5, "correct": 2, "total": 4}
    assert evaluate_lambada(model, tok, path, unidirectional=True, batch_size=2) == m
    mc = [
        {"inputs_pretokenized": "the cat chased the", "choices_pretokenized": ["cat", "dog"], "label": 1},
        {
            "inputs_pretokenized": "the [MASK] chased the cat",
            "choices_pretokenized": ["dog", "cow"],
            "label": 1,
        },
        {"inputs_pretokenized": "a", "choices_pretokenized": ["doghouse", "dog"], "label": 1},
    ]
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in mc) + "\n")
    for uni in (False, True):
        assert evaluate_multichoice(model, tok, path, unidirectional=uni, batch_size=4)["correct"] == 2


def test_bad_rows_raise_one_line_errors(tmp_path: Path) -> None:
    tok = char_tokenizer(gmask_id=5, smask_id=6)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="no field 'label'"):
        evaluate_lambada(ScriptedLM([]), tok, path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1"):
        evaluate_lambada(ScriptedLM([]), tok, path)
    with pytest.raises(FileNotFoundError):
        evaluate_lambada(ScriptedLM([]), tok, tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": 5, "label": "dog"}, r"bad.jsonl:3: field 'prompt' must be a string, got 5$"),
        ({"prompt": "the cat saw the", "label": " "}, r"bad.jsonl:3: field 'label' is empty$"),
        (
            {"prompt": "the cat saw the", "label": None},
            r"bad.jsonl:3: field 'label' must be a string, got null",
        ),
        ({"text": "   "}, r"bad.jsonl:3: field 'text' is empty$"),
    ],
)
def test_lambada_rows_of_the_wrong_type_name_file_line_and_field(
    tmp_path: Path, row: dict, message: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a cat", "label": "sat"}) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=message):
        evaluate_lambada(ScriptedLM([]), char_tokenizer(gmask_id=5, smask_id=6), path)


def test_multichoice_rows_and_text_files_are_checked(tmp_path: Path) -> None:
    tok = char_tokenizer(gmask_id=5, smask_id=6)
    path = tmp_path / "mc.jsonl"
    row = {"inputs_pretokenized": "a", "choices_pretokenized": ["b", "c"], "label": 1}
    for bad, message in (
        ({"label": True}, r"mc.jsonl:1: label=True is not an index"),
        (
            {"choices_pretokenized": ["b", 5]},
            r"mc.jsonl:1: field 'choices_pretokenized' must be a non-empty list of",
        ),
        (
            {"inputs_pretokenized": None},
            r"mc.jsonl:1: field 'inputs_pretokenized' must be a string, got null",
        ),
    ):
        path.write_text(json.dumps({**row, **bad}) + "\n")
        with pytest.raises(ValueError, match=message):
            evaluate_multichoice(ScriptedLM([]), tok, path)
    # a blank line between rows: the labels still go with their own rows
    rows = [{**row, "label": 0}, {**row, "choices_pretokenized": ["c", "b"], "label": 1}]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    b = tok.encode("b")[0]  # the scripted model always favours "b"
    assert evaluate_multichoice(ScriptedLM([b] * 4, vocab=256), tok, path)["accuracy"] == 1.0
    text = tmp_path / "wiki.test.tokens"
    text.write_bytes(b"a b c\n d \xff e\n")
    for wikitext in (True, False):
        with pytest.raises(ValueError, match=r"wiki.test.tokens:2: not UTF-8 text \(byte 0xff"):
            evaluate_perplexity(ScriptedLM([]), tok, text, wikitext=wikitext, seq_length=16)


def test_run_lm_eval_dispatcher(tmp_path: Path) -> None:
    """The `openglm eval` entry point: loads a checkpoint directory with its tokenizer, bf16 weights."""
    from openglm.tasks.lm_eval import run_lm_eval

    tok = bert_tokenizer()
    uniform_model(tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    corpus = tmp_path / "docs.txt"
    corpus.write_text("first document here .\n\nsecond one , a bit longer than the first .\n")
    m = run_lm_eval(
        "perplexity",
        str(tmp_path / "model"),
        str(corpus),
        seq_length=16,
        stride=4,
        precision="bf16",
        device="cpu",
        progress=False,
    )
    assert m["task"] == "perplexity" and m["num_words"] == 4 + 10
    # Two documents: N_tok - 2 tokens are scored but the official normaliser is N_tok - 1.
    expected = math.log(tok.vocab_size) * (m["num_tokens"] - 2) / (m["num_tokens"] - 1)
    assert m["loss"] == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="unknown zero-shot task"):
        run_lm_eval("hellaswag", str(tmp_path / "model"), str(corpus))


def test_multichoice_layouts() -> None:
    from openglm.tasks.lm_eval import multichoice_samples

    def encode(text: str) -> list[int]:
        out = []
        for i, part in enumerate(text.split("[MASK]")):
            out += ([2] if i else []) + [ord(c) for c in part.replace(" ", "")]
        return out

    tok = char_tokenizer(smask_id=6)
    tok.encode = encode
    bi = multichoice_samples("ab", ["x", "yz"], tok)
    # "[MASK]" appended: [CLS] a b [MASK] eos | sop (x) ; the choice sits at the mask, no eop is scored.
    assert bi[0]["input_ids"].tolist() == [1, 97, 98, 2, 0, 3]
    assert bi[1]["targets"].tolist() == [0] * 5 + [121, 122]
    assert bi[1]["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 3], [0, 0, 0, 0, 0, 1, 2]]
    inner = multichoice_samples("a [MASK] b", ["x"], tok)[0]
    assert inner["position_ids"][0, -1] == 2  # the existing mask is used
    uni = multichoice_samples("ab", ["x"], tok, unidirectional=True)[0]
    # [CLS] [MASK] eos | sop a b -> targets a b x; only x is scored.
    assert uni["input_ids"].tolist() == [1, 2, 0, 3, 97, 98]
    assert uni["targets"][uni["loss_mask"] > 0].tolist() == [120]
