"""GLMTokenizer against the official tokenizers (fixtures tokenizer/), save/load, errors, round trips."""

from __future__ import annotations

import gzip
import json
import sys
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import reference_dir, require, shared_data_dir

from openglm.tokenizer import GLM_SPECIAL_TOKENS, OFFICIAL_MODELS, GLMTokenizer, corpus_files, train_tokenizer

FACTORY = "tokenizer/official_factory"
ENCODE_CASES = "tokenizer/encode_cases.json"
ID_PROPERTIES = {
    "pad_id": "pad",
    "eos_id": "eos",
    "cls_id": "ENC",
    "sep_id": "sep",
    "mask_id": "MASK",
    "unk_id": "unk",
    "sop_id": "sop",
    "eop_id": "eop",
    "gmask_id": "gMASK",
    "smask_id": "sMASK",
    "dblock_id": "dBLOCK",
}


def _vocab_dir() -> Path:
    return require(shared_data_dir() / "tokenizers")


def _kind_and_file(call: dict) -> tuple[str, str]:
    """Our kind and vocab file for an official make_tokenizer call (tokenizer_type, model_type, fix flag)."""
    ttype, model = call["tokenizer_type"], call.get("model_type")
    if ttype == "BertWordPieceTokenizer":
        return "bert", f"{model or 'bert-large-uncased'}-vocab.txt"
    if ttype == "GPT2BPETokenizer":
        kind = "roberta" if (model or "").startswith("roberta") else "gpt2"
        return kind, f"{kind}-vocab.json"
    if ttype == "ChineseSPTokenizer":
        return ("chinese-sp-fix" if call.get("fix_command_token") else "chinese-sp"), "cog-pretrain.model"
    raise AssertionError(f"fixture names an unknown tokenizer type {ttype!r}")


@cache
def _build(kind: str, file: str, block_symbols: bool, task_mask: bool, dblock: bool) -> GLMTokenizer:
    return GLMTokenizer.from_files(
        kind, _vocab_dir() / file, block_symbols=block_symbols, task_mask=task_mask, dblock=dblock
    )


def _from_call(call: dict) -> GLMTokenizer:
    kind, file = _kind_and_file(call)
    return _build(
        kind,
        file,
        bool(call.get("add_block_symbols", False)),
        bool(call.get("add_task_mask", False)),
        bool(call.get("add_decoder_mask", False)),
    )


def _factory_files() -> list[str]:
    root = reference_dir() / FACTORY
    index = root / "index.json"
    if not index.is_file():
        return ["<absent>"]
    return [entry["file"] for entry in json.loads(index.read_text(encoding="utf-8"))]


def _encode_configs() -> list[str]:
    path = reference_dir() / ENCODE_CASES
    if not path.is_file():
        return ["<absent>"]
    return list(json.loads(path.read_text(encoding="utf-8"))["configs"])


# ---------------------------------------------------------------------------------------------------------
# Parity with the official factory: command tables, sizes, ids, IdToToken strings and DecodeIds text.


@pytest.mark.parametrize("file", _factory_files())
def test_official_factory_variant(file: str) -> None:
    fixture = require(reference_dir() / FACTORY / file)
    ref = json.loads(fixture.read_text(encoding="utf-8"))
    tok = _from_call(ref["make_tokenizer_call"])

    assert [(c.name, c.token, c.id, c.lstrip) for c in tok.command_tokens] == [
        (c["name"], c["token"], c["id"], c["lstrip"]) for c in ref["command_tokens"]
    ]
    for prop, name in ID_PROPERTIES.items():
        assert getattr(tok, prop) == ref["command_name_to_id"].get(name), prop
    for i, token in ref["command_id_to_token_used_by_decode"].items():
        assert tok.convert_ids_to_tokens(int(i)) == token
    assert tok.num_tokens == ref["num_tokens"]
    assert tok.vocab_size == ref["padded_vocab_size"]
    assert tok.eos_id == ref["eod_token"]

    for case in ref["cases"]:
        ids = tok.encode(case["text"])
        assert ids == case["ids"], case["text"]
        assert tok.convert_ids_to_tokens(ids) == case["tokens"], case["text"]
        assert tok.decode(ids) == case["decoded"], case["text"]
    assert tok.encode_batch([c["text"] for c in ref["cases"]]) == [c["ids"] for c in ref["cases"]]


@pytest.mark.parametrize("config", _encode_configs())
def test_encode_cases(config: str) -> None:
    ref = json.loads(require(reference_dir() / ENCODE_CASES).read_text(encoding="utf-8"))["configs"][config]
    tok = _from_call(ref["make_tokenizer_kwargs"])
    assert tok.num_tokens == ref["num_tokens"]
    assert {c.name: c.id for c in tok.command_tokens} == ref["command_ids"]
    assert {c.name: c.lstrip for c in tok.command_tokens} == ref["lstrip"]
    for case in ref["cases"]:
        ids = tok.encode(case["text"])
        assert ids == case["ids"], case["text"]
        assert tok.convert_ids_to_tokens(ids) == case["pieces"], case["text"]
    assert tok.encode_batch([c["text"] for c in ref["cases"]]) == [c["ids"] for c in ref["cases"]]


def test_defaults_are_the_released_models() -> None:
    """from_files(kind, path) without flags gives the fine-tuning/inference tokenizer of the released models."""
    root = require(reference_dir() / FACTORY)
    released = {
        "bert": ("bert-large-uncased-vocab.txt", "bert_large_uncased.json"),
        "gpt2": ("gpt2-vocab.json", "gpt2_glm10b_finetune.json"),
        "roberta": ("roberta-vocab.json", "roberta_glm.json"),
        "chinese-sp": ("cog-pretrain.model", "chinese_sp_nofix.json"),
        "chinese-sp-fix": ("cog-pretrain.model", "chinese_sp_fix.json"),
    }
    for kind, (vocab, fixture) in released.items():
        ref = json.loads(require(root / fixture).read_text(encoding="utf-8"))
        tok = GLMTokenizer.from_files(kind, _vocab_dir() / vocab)
        assert {c.name: c.id for c in tok.command_tokens} == ref["command_name_to_id"], kind
        assert tok.num_tokens == ref["num_tokens"], kind


def test_released_models_match_the_presets() -> None:
    """Every released model's tokenizer pads to the preset's embedding size; for_model picks the flag set."""
    from openglm.config import PRESETS

    for name, (kind, file, finetune, pretrain) in OFFICIAL_MODELS.items():
        for flags in (finetune, pretrain):
            task_mask = flags.get("task_mask", kind in ("gpt2", "chinese-sp", "chinese-sp-fix"))
            tok = _build(kind, file, True, task_mask, flags.get("dblock", False))
            assert tok.vocab_size == PRESETS[name].vocab_size, name
    pre = GLMTokenizer.for_model("glm-10b", _vocab_dir(), pretraining=True)
    assert pre.dblock_id == pre.num_tokens - 1
    assert GLMTokenizer.for_model("GLM_Large", _vocab_dir()).gmask_id is None
    with pytest.raises(ValueError, match="unknown GLM model 'glm-130b'"):
        GLMTokenizer.for_model("glm-130b", _vocab_dir())


def test_directory_of_official_files() -> None:
    """A directory holding the release files by their official names is enough."""
    tok = GLMTokenizer.from_files("gpt2", _vocab_dir())
    assert tok.encode("Hello world") == _build("gpt2", "gpt2-vocab.json", True, True, False).encode(
        "Hello world"
    )


# ---------------------------------------------------------------------------------------------------------
# Save / load


@pytest.mark.parametrize(
    "kind,file",
    [
        ("bert", "bert-large-uncased-vocab.txt"),
        ("gpt2", "gpt2-vocab.json"),
        ("roberta", "roberta-vocab.json"),
        ("chinese-sp", "cog-pretrain.model"),
        ("chinese-sp-fix", "cog-pretrain.model"),
    ],
)
def test_save_and_load_in_a_model_directory(kind: str, file: str, tmp_path: Path) -> None:
    tok = GLMTokenizer.from_files(kind, _vocab_dir() / file, dblock=True)
    model_dir = tmp_path / "ckpt"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model": true}')
    tok.save_pretrained(model_dir)
    assert (model_dir / "config.json").read_text() == '{"model": true}'
    assert not [p for p in model_dir.iterdir() if p.name.endswith(".tmp")]

    back = GLMTokenizer.from_pretrained(model_dir)
    assert back.kind == kind and back.options == tok.options
    assert back.command_tokens == tok.command_tokens
    assert (back.num_tokens, back.vocab_size) == (tok.num_tokens, tok.vocab_size)
    text = "Mask with spaces:   [MASK]   then text. 北京 [gMASK] <|endoftext|>"
    assert back.encode(text) == tok.encode(text)
    assert back.decode(tok.encode(text)) == tok.decode(tok.encode(text))


# ---------------------------------------------------------------------------------------------------------
# Errors: one clear line naming the file, field or value


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown tokenizer kind 'llama'"):
        GLMTokenizer.from_files("llama", "x")


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="BERT vocab file not found: .*nope.txt"):
        GLMTokenizer.from_files("bert", tmp_path / "nope.txt")
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))
    with pytest.raises(FileNotFoundError, match="merges file.*merges.txt"):
        GLMTokenizer.from_files("gpt2", tmp_path / "vocab.json")
    with pytest.raises(FileNotFoundError, match="no tokenizer_config.json"):
        GLMTokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no chinese-sp vocab file in this directory"):
        GLMTokenizer.from_files("chinese-sp", tmp_path)


def _tiny_bpe(tmp_path: Path, vocab: dict, merges: str) -> Path:
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text(merges)
    return tmp_path / "vocab.json"


def test_malformed_vocab_files(tmp_path: Path) -> None:
    bad_json = tmp_path / "bad"
    bad_json.mkdir()
    (bad_json / "vocab.json").write_text("{not json")
    (bad_json / "merges.txt").write_text("")
    with pytest.raises(ValueError, match=r"vocab.json: malformed BPE vocab \(not JSON\)"):
        GLMTokenizer.from_files("gpt2", bad_json / "vocab.json")

    tiny = {"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}
    path = _tiny_bpe(tmp_path, tiny, "#version: 0.2\na b\nb c d\n")
    with pytest.raises(ValueError, match="merges.txt: malformed BPE merges at line 3"):
        GLMTokenizer.from_files("gpt2", path)
    path = _tiny_bpe(tmp_path, {"a": 0, "b": 1, "ab": 2}, "a b\n")
    with pytest.raises(ValueError, match="not a GPT-2 vocab: it has no '<|endoftext|>' token"):
        GLMTokenizer.from_files("gpt2", path)
    path = _tiny_bpe(tmp_path, {"a": 0, "b": 5}, "")
    with pytest.raises(ValueError, match="ids are not exactly 0..1"):
        GLMTokenizer.from_files("gpt2", path)

    vocab_txt = tmp_path / "vocab.txt"
    vocab_txt.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n")
    with pytest.raises(ValueError, match=r"vocab.txt: malformed BERT vocab: no '\[MASK\]' line"):
        GLMTokenizer.from_files("bert", vocab_txt)
    vocab_txt.write_bytes(b"[PAD]\n[UNK]\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"vocab.txt: not valid UTF-8 at byte offset 12 \(byte 0xff\)"):
        GLMTokenizer.from_files("bert", vocab_txt)

    sp = tmp_path / "spiece.model"
    sp.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match="spiece.model: not a valid SentencePiece model"):
        GLMTokenizer.from_files("chinese-sp", sp)

    (tmp_path / "tokenizer_config.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not an openglm tokenizer config"):
        GLMTokenizer.from_pretrained(tmp_path)


def test_tiny_bpe_vocab_works(tmp_path: Path) -> None:
    """A user's own small GPT-2-format vocab builds a tokenizer with the GPT-2 command layout."""
    vocab = {"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3, "Ġ": 4}
    tok = GLMTokenizer.from_files("gpt2", _tiny_bpe(tmp_path, vocab, "#version: 0.2\na b\n"))
    assert tok.encode("ab a") == [2, 4, 0]
    assert (tok.eos_id, tok.sop_id, tok.mask_id, tok.gmask_id, tok.dblock_id) == (3, 5, 8, 11, None)
    assert tok.num_tokens == 13 and tok.vocab_size == 128


def test_bad_input_text() -> None:
    tok = _build("gpt2", "gpt2-vocab.json", True, True, False)
    assert tok.encode("héllo".encode()) == tok.encode("héllo")
    with pytest.raises(ValueError, match=r"text 1: not valid UTF-8 at byte offset 2 \(byte 0xff\)"):
        tok.encode_batch(["fine", b"ok\xffno"])
    with pytest.raises(ValueError, match="text 0: not encodable as UTF-8 at character offset 1"):
        tok.encode("a\udcffb")
    with pytest.raises(ValueError, match="token id 60000 is not in this gpt2 tokenizer"):
        tok.decode([1, 60000])


def test_pickles_for_worker_processes() -> None:
    import pickle

    tok = _build("chinese-sp", "cog-pretrain.model", True, True, False)
    text = "北京是中国的[MASK]，有很多[sMASK]。 and English"
    back = pickle.loads(pickle.dumps(tok))
    assert back.encode(text) == tok.encode(text) and back.command_tokens == tok.command_tokens


def test_missing_ids_are_none() -> None:
    bert = _build("bert", "bert-large-uncased-vocab.txt", True, False, False)
    assert (bert.gmask_id, bert.smask_id, bert.dblock_id) == (None, None, None)
    assert bert.token_to_id("[gMASK]") is None and bert.token_to_id("hello") is not None
    assert bert.token_to_id("[MASK]") == bert.mask_id
    sp = _build("chinese-sp", "cog-pretrain.model", True, True, False)
    assert sp.token_to_id("<|endofpiece|>") == sp.eop_id
    assert sp.token_to_id("definitely-not-a-piece") is None
    # Every id below num_tokens has a string, the skipped Chinese id included (id -> string tables work).
    table = sp.convert_ids_to_tokens(list(range(sp.num_tokens)))
    skipped = [i for i in range(sp.unk_id + 1, sp.sop_id)]
    assert [table[i] for i in skipped] == ["<unused>"] and sp.decode(skipped) == "<unused>"
    with pytest.raises(ValueError, match=f"token id {sp.num_tokens} is not in this chinese-sp tokenizer"):
        sp.convert_ids_to_tokens([sp.num_tokens])


# ---------------------------------------------------------------------------------------------------------
# Properties


_no_commands = st.text(max_size=60).filter(
    lambda s: s.strip() and not any(c in s for c in ("[", "<|"))  # no command strings, not blank
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_no_commands)
def test_byte_level_round_trip(text: str) -> None:
    """GPT-2 byte-level BPE is lossless for any text without command strings (and not blank, spec B.1)."""
    tok = _build("gpt2", "gpt2-vocab.json", True, True, False)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert max(ids) < 50257


@pytest.mark.parametrize(
    "kind,file",
    [
        ("gpt2", "gpt2-vocab.json"),
        ("bert", "bert-large-uncased-vocab.txt"),
        ("chinese-sp", "cog-pretrain.model"),
    ],
)
@settings(max_examples=40, deadline=None)
@given(
    texts=st.lists(st.text(max_size=30), max_size=6), command=st.sampled_from(["[MASK]", "[SEP]", "[CLS]"])
)
def test_batch_equals_single_and_commands_split(kind: str, file: str, texts: list[str], command: str) -> None:
    tok = _build(kind, file, True, kind != "bert", False)
    joined = [f"{t} {command} {t}" for t in texts]
    assert tok.encode_batch(joined) == [tok.encode(t) for t in joined]
    for t in joined:
        assert tok.token_to_id(command) in tok.encode(t)


# ---------------------------------------------------------------------------------------------------------
# Trained byte-level BPE

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.\n",
    "GLM fills blanks: the capital of France is Paris.\n",
    "清华大学位于北京。今天天气怎么样？\n",
    "Emoji 😀🎉👍🏽 and symbols © ® ™ ∑ ∞ survive.\n",
    "Café, naïve, résumé, Zürich, São Paulo.\n",
] * 20


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> GLMTokenizer:
    root = tmp_path_factory.mktemp("train")
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text("".join(_CORPUS[:50]), encoding="utf-8")
    (root / "corpus" / "b.txt").write_text("".join(_CORPUS[50:]), encoding="utf-8")
    (root / "corpus" / ".hidden").write_bytes(b"\xff not text, skipped")
    out = train_tokenizer([str(root / "corpus")], vocab_size=400, out=str(root / "tok"), progress=False)
    return GLMTokenizer.from_pretrained(out)


def test_trained_tokenizer_layout(trained: GLMTokenizer) -> None:
    n = trained.num_tokens
    assert n <= 400 and trained.vocab_size == 512
    # The GLM tokens follow the learned vocabulary, in the documented order.
    tail = trained.convert_ids_to_tokens(list(range(n - len(GLM_SPECIAL_TOKENS), n)))
    assert tail == list(GLM_SPECIAL_TOKENS)
    assert trained.pad_id == trained.eos_id == trained.token_to_id("<|endoftext|>") == n - 1
    ids = [trained.cls_id, trained.sep_id, trained.mask_id, trained.smask_id, trained.gmask_id]
    ids += [trained.sop_id, trained.eop_id, trained.unk_id, trained.dblock_id]
    assert ids == list(range(n - 10, n - 1))
    # Mask tokens take the official GPT-2 whitespace rule.
    assert trained.encode("at [MASK] (x") == trained.encode("at") + [trained.mask_id] + trained.encode(" (x")
    assert trained.encode("a [SEP]") == trained.encode("a") + [trained.token_to_id("Ġ"), trained.sep_id]


@settings(max_examples=150, deadline=None)
@given(_no_commands)
def test_trained_round_trip_any_unicode(trained: GLMTokenizer, text: str) -> None:
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert trained.unk_id not in ids


def test_trained_from_files_and_resave(trained: GLMTokenizer, tmp_path: Path) -> None:
    trained.save_pretrained(tmp_path)
    again = GLMTokenizer.from_files("bpe", tmp_path)
    assert again.command_tokens == trained.command_tokens
    assert again.encode("北京 😀 [gMASK]") == trained.encode("北京 😀 [gMASK]")


def test_training_reads_the_corpus_as_data_prepare_does(tmp_path: Path) -> None:
    """JSON lines train on their text field only: the same tokenizer as the same documents in plain text."""
    docs = ["".join(_CORPUS[i : i + 3]).strip() for i in range(0, len(_CORPUS), 3)]
    (tmp_path / "plain.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    rows = "".join(json.dumps({"id": i, "text": d, "source": "web"}) + "\n" for i, d in enumerate(docs))
    with gzip.open(tmp_path / "docs.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(rows)
    plain = train_tokenizer(
        [str(tmp_path / "plain.txt")], vocab_size=300, out=str(tmp_path / "p"), progress=False
    )
    jsonl = train_tokenizer(
        [str(tmp_path / "docs.jsonl.gz")], vocab_size=300, out=str(tmp_path / "j"), progress=False
    )
    assert (Path(plain) / "tokenizer.json").read_text() == (Path(jsonl) / "tokenizer.json").read_text()


def test_corpus_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(FileNotFoundError, match="corpus file not found: .*missing.txt"):
        corpus_files([str(tmp_path / "missing.txt")])
    with pytest.raises(FileNotFoundError, match="corpus pattern matched no files"):
        corpus_files([str(tmp_path / "*.nothing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="corpus directory has no files"):
        corpus_files([str(tmp_path / "empty")])
    # A paragraph with invalid UTF-8 is skipped and counted, as `data prepare` does; strict mode refuses it.
    bad = tmp_path / "bad.txt"
    bad.write_bytes("".join(_CORPUS).encode() + b"\nstill ok \xc3( rest\n")
    with caplog.at_level("WARNING"):
        train_tokenizer([str(bad)], vocab_size=300, out=str(tmp_path / "ok"), progress=False)
    assert "skipped 1 x invalid UTF-8" in caplog.text and f"{bad}:102" in caplog.text
    with pytest.raises(ValueError, match=rf"{bad}:102: invalid UTF-8"):
        train_tokenizer([str(bad)], vocab_size=300, out=str(tmp_path / "s"), strict=True, progress=False)
    with pytest.raises(ValueError, match="vocab_size=200 is too small"):
        train_tokenizer([str(bad)], vocab_size=200, out=str(tmp_path / "o"), progress=False)
    (tmp_path / "only-bad.txt").write_bytes(b"\xff\xfe\n")
    with pytest.raises(ValueError, match="no documents were read from 1 input file"):
        train_tokenizer(
            [str(tmp_path / "only-bad.txt")], vocab_size=300, out=str(tmp_path / "n"), progress=False
        )


def test_cli_train(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from openglm.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(_CORPUS), encoding="utf-8")
    other = tmp_path / "d.txt"
    other.write_text("more text\n", encoding="utf-8")
    flags = ["--vocab_size", "300", "--out", str(tmp_path / "tok"), "--progress", "false"]
    main(["tokenizer", "train", "--corpus", str(corpus), "--corpus+", str(other), *flags])
    assert GLMTokenizer.from_pretrained(tmp_path / "tok").num_tokens <= 300
    corpus.write_bytes(b"abc\x80")
    for argv, message in [
        (
            ["--corpus", f"[{corpus}]", "--strict", "true", *flags, "--overwrite", "true"],
            f"{corpus}:1: invalid UTF-8",
        ),
        (["--corpus", str(other), "--out", str(tmp_path / "x")], "tokenizer train: --vocab_size is required"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["tokenizer", "train", *argv])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"openglm: error: {message}"


# ---------------------------------------------------------------------------------------------------------
# The tiktoken path for byte-level BPE


def _library_ids(tok: GLMTokenizer, texts: list[str]) -> list[list[int]]:
    """The same encode_batch through the `tokenizers` library, bypassing the tiktoken path."""
    fast, tok._text.fast = tok._text.fast, None
    try:
        return tok.encode_batch(texts)
    finally:
        tok._text.fast = fast


@pytest.mark.parametrize("kind,file", [("gpt2", "gpt2-vocab.json"), ("roberta", "roberta-vocab.json")])
def test_tiktoken_path_equals_the_library_on_real_text(kind: str, file: str) -> None:
    tok = _build(kind, file, True, True, False)
    assert tok._text.fast is not None, "tiktoken is a dependency; the byte-level BPE kinds should use it"
    corpus = require(shared_data_dir() / "corpora" / "gutenberg")
    texts = []
    for path in sorted(corpus.glob("*.txt"))[:6]:
        texts += [
            p for p in path.read_text(encoding="utf-8", errors="replace").split("\n\n")[:300] if p.strip()
        ]
    texts += ["x [MASK] y [sMASK]", "  leading and trailing  ", "\t\n\r\x0b\x0c\u2028\u00a0 odd spaces"]
    assert tok.encode_batch(texts) == _library_ids(tok, texts)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(max_size=80), min_size=1, max_size=4))
def test_tiktoken_path_equals_the_library_on_any_text(trained: GLMTokenizer, texts: list[str]) -> None:
    assert trained._text.fast is not None
    assert trained.encode_batch(texts) == _library_ids(trained, texts)


def test_tiktoken_path_refuses_lone_surrogates_and_falls_back(
    trained: GLMTokenizer, monkeypatch, caplog
) -> None:
    with pytest.raises(ValueError, match="not encodable as UTF-8 at character offset 3"):
        trained.encode("ok \ud800 not ok")
    from openglm.tokenizer import fast_bpe

    vocab = {c: i for i, c in enumerate(fast_bpe.byte_to_unicode().values())}
    vocab["ab"] = 256
    wrong = SimpleNamespace(encode_batch=lambda texts: [[0] for _ in texts])
    with caplog.at_level("WARNING"):
        assert fast_bpe.build(vocab, [("a", "b")], wrong) is None  # disagrees with its reference
    assert "using the library" in caplog.text
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # not installed
    assert fast_bpe.build(vocab, [("a", "b")], wrong) is None


# ---------------------------------------------------------------------------------------------------------
# tokenizer_config.json is checked; Hugging Face GLM directories load as `openglm convert` reads them


def _saved_bpe(tmp_path: Path, trained: GLMTokenizer) -> Path:
    trained.save_pretrained(tmp_path)
    return tmp_path / "tokenizer_config.json"


@pytest.mark.parametrize(
    "change,message",
    [
        ({"version": 99}, "version 99 is newer than this openglm reads"),
        ({"version": "1"}, "version '1' is not a tokenizer config version"),
        ({"surprise": 1}, r"unknown field\(s\) \['surprise'\]"),
        ({"command_tokens": "x"}, "field 'command_tokens' must be a list of objects"),
        ({"command_tokens": [{"name": "MASK"}]}, "field 'command_tokens' must be a list of objects"),
        ({"command_tokens": []}, "field 'command_tokens' does not match the vocabulary files"),
        ({"num_tokens": "600"}, "field 'num_tokens' must be an integer, got '600'"),
        ({"vocab_size": 5000}, "vocab_size=5000 but the vocabulary files give 512"),
        ({"options": {"task_mask": "yes"}}, "options.task_mask must be true or false"),
    ],
)
def test_tokenizer_config_is_checked(
    trained: GLMTokenizer, tmp_path: Path, change: dict, message: str
) -> None:
    path = _saved_bpe(tmp_path, trained)
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ValueError, match=rf"^{path}: {message}") as err:
        GLMTokenizer.from_pretrained(tmp_path)
    assert "\n" not in str(err.value)


def test_edited_command_ids_are_refused(trained: GLMTokenizer, tmp_path: Path) -> None:
    path = _saved_bpe(tmp_path, trained)
    cfg = json.loads(path.read_text())
    mask = next(c for c in cfg["command_tokens"] if c["name"] == "MASK")
    mask["id"] = 5
    path.write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError,
        match=rf"command_tokens' does not match .*MASK should be '\[MASK\]' with id {trained.mask_id}",
    ):
        GLMTokenizer.from_pretrained(tmp_path)


def test_hugging_face_directory_tokenizer(tmp_path: Path) -> None:
    vocab = _vocab_dir()
    (tmp_path / "vocab.json").write_bytes((vocab / "gpt2-vocab.json").read_bytes())
    (tmp_path / "merges.txt").write_bytes((vocab / "gpt2-merges.txt").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GLMGPT2Tokenizer"}))
    loaded = GLMTokenizer.from_pretrained(tmp_path)
    official = GLMTokenizer.for_model("glm-10b", vocab)
    assert loaded.command_tokens == official.command_tokens
    text = "Tsinghua University is located in [MASK]."
    assert GLMTokenizer.from_spec(tmp_path).encode(text) == official.encode(text)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    with pytest.raises(ValueError, match="tokenizer_class 'LlamaTokenizer' is not a GLM tokenizer"):
        GLMTokenizer.from_pretrained(tmp_path)


def test_unknown_kind_in_a_spec() -> None:
    with pytest.raises(ValueError, match="tokenizer 'foo:bar': unknown kind 'foo'; give KIND:VOCAB_PATH"):
        GLMTokenizer.from_spec("foo:bar")


def test_train_output_and_damaged_gzip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from openglm.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(_CORPUS), encoding="utf-8")
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(ValueError, match="--out .*afile exists and is not a directory"):
        train_tokenizer([str(corpus)], vocab_size=300, out=str(tmp_path / "afile"), progress=False)
    assert (tmp_path / "afile").read_text() == "mine"
    first = train_tokenizer([str(corpus)], vocab_size=300, out=str(tmp_path / "t"), progress=False)
    before = (tmp_path / "t" / "tokenizer.json").read_bytes()
    with pytest.raises(ValueError, match="already holds a tokenizer .*; pass --overwrite true"):
        train_tokenizer([str(corpus)], vocab_size=280, out=first, progress=False)
    assert (tmp_path / "t" / "tokenizer.json").read_bytes() == before
    train_tokenizer([str(corpus)], vocab_size=280, out=first, progress=False, overwrite=True)
    assert GLMTokenizer.from_pretrained(first).num_tokens <= 280
    with gzip.open(tmp_path / "whole.txt.gz", "wb") as f:
        f.write("".join(_CORPUS).encode() * 20)
    data = (tmp_path / "whole.txt.gz").read_bytes()
    (tmp_path / "cut.txt.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "fake.txt.gz").write_bytes(b"plain text, not gzip\n")
    flags = ["--vocab_size", "300", "--out", str(tmp_path / "o"), "--progress", "false"]
    for name in ("cut.txt.gz", "fake.txt.gz"):
        with pytest.raises(SystemExit):
            main(["tokenizer", "train", "--corpus", str(tmp_path / name), *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"openglm: error: {tmp_path / name}: ")
