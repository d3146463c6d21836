"""Pretraining data: `openglm data prepare` round trips and bad input, the shard reader, sample assembly
(spec C.1) and the training batch stream (determinism, ranks, workers, resume, validation sets)."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tests.conftest import reference_dir, require, shared_data_dir
from torch.utils.data import DataLoader

from openglm.blank_infilling import ObjectiveConfig, SpecialTokens
from openglm.cli import main
from openglm.data import (
    InMemoryCorpus,
    PretrainingBatches,
    SampleAssembler,
    ShardedCorpus,
    prepare_corpus,
    split_documents,
    validation_batches,
)

TEXT = """The first document. It has two sentences.
It also has a second line!

The second document: short.



Third one? Yes; with “curly” quotes – and a dash.
"""


@cache
def bert_tokenizer_dir(root: str) -> Path:
    from openglm.tokenizer import GLMTokenizer

    vocab = require(shared_data_dir() / "tokenizers" / "bert-large-uncased-vocab.txt")
    out = Path(root) / "tok"
    GLMTokenizer.from_files("bert", vocab).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bert_tokenizer_dir(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def tokenizer(tok_dir: Path):
    from openglm.tokenizer import GLMTokenizer

    return GLMTokenizer.from_pretrained(tok_dir)


# ------------------------------------------------------------------------------------------ prepare


@pytest.mark.parametrize("workers", [0, 2])
def test_prepare_round_trip(tmp_path: Path, tok_dir: Path, tokenizer, workers: int) -> None:
    src = tmp_path / "corpus.txt"
    src.write_text(TEXT, encoding="utf-8")
    summary = prepare_corpus(
        input=[str(src)], tokenizer=str(tok_dir), out=str(tmp_path / "out"), workers=workers
    )
    corpus = ShardedCorpus(tmp_path / "out")
    assert summary["num_docs"] == len(corpus) == 3
    assert corpus.manifest["dtype"] == "uint16"
    expected = [
        "The first document. It has two sentences.\nIt also has a second line!",
        "The second document: short.",
        'Third one? Yes; with "curly" quotes - and a dash.',
    ]
    for i, text in enumerate(expected):
        np.testing.assert_array_equal(corpus[i], tokenizer.encode(text))
    assert corpus.num_tokens == sum(len(tokenizer.encode(t)) for t in expected)
    assert summary["skipped"] == {}


def test_prepare_lines_jsonl_gzip_dirs_and_shards(tmp_path: Path, tok_dir: Path, tokenizer) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("one line\nanother line\n\n", encoding="utf-8")
    records = [{"text": "json doc one."}, {"text": "json doc two."}, {"other": "x"}, {"text": 5}]
    with gzip.open(data / "sub" / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n{not json\n")
    out = tmp_path / "out"
    summary = prepare_corpus(
        input=str(data), tokenizer=str(tok_dir), out=str(out), text_format="lines", workers=0, shard_tokens=3
    )
    corpus = ShardedCorpus(out)
    texts = ["one line", "another line", "json doc one.", "json doc two."]
    assert [corpus[i].tolist() for i in range(len(corpus))] == [tokenizer.encode(t) for t in texts]
    assert len(corpus.manifest["shards"]) == summary["shards"] >= 2  # tiny shard size: several shards
    assert summary["skipped"] == {"missing or non-string field 'text'": 2, "invalid JSON line": 1}
    # A glob input and a subset view.
    prepare_corpus(input=str(data / "*.txt"), tokenizer=str(tok_dir), out=str(tmp_path / "g"), workers=0)
    assert len(ShardedCorpus(tmp_path / "g")) == 1  # paragraph mode: both lines form one document
    sub = corpus.subset([3, 0])
    assert sub[0].tolist() == corpus[3].tolist() and sub.doc_lengths.tolist() == [
        len(corpus[3]),
        len(corpus[0]),
    ]


def test_prepare_bad_input(tmp_path: Path, tok_dir: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good text here.\n\nbad \xff\xfe bytes\nmore\n\nlast good one.\n")
    out = tmp_path / "out"
    summary = prepare_corpus(input=[str(empty), str(bad)], tokenizer=str(tok_dir), out=str(out), workers=0)
    assert summary["num_docs"] == 2
    assert summary["skipped"] == {
        "no documents in this file (empty?)": 1,
        "invalid UTF-8": 1,
    }
    assert any("bad.txt:3" in e for e in ShardedCorpus(out).manifest["skipped_examples"])
    with pytest.raises(ValueError, match=r"bad\.txt:3: invalid UTF-8"):
        prepare_corpus(
            input=[str(bad)], tokenizer=str(tok_dir), out=str(tmp_path / "s"), workers=0, strict=True
        )
    with pytest.raises(ValueError, match="no documents were read"):
        prepare_corpus(input=[str(empty)], tokenizer=str(tok_dir), out=str(tmp_path / "e"), workers=0)
    assert not (tmp_path / "e").exists()  # a failed prepare leaves no new (empty) folder
    with pytest.raises(ValueError, match="already holds"):
        prepare_corpus(input=[str(bad)], tokenizer=str(tok_dir), out=str(out), workers=0)
    with pytest.raises(FileNotFoundError, match="no such file"):
        prepare_corpus(input=[str(tmp_path / "missing.txt")], tokenizer=str(tok_dir), out=str(tmp_path / "m"))
    with pytest.raises(FileNotFoundError, match="no manifest|no shard manifest"):
        ShardedCorpus(tmp_path / "e")


def test_prepare_prompt_field(tmp_path: Path, tok_dir: Path, tokenizer) -> None:
    """With --prompt-field, a JSON line's prompt precedes its text (each tokenized on its own), the shards
    record the prompt's length, and plain-text documents of the same run have none."""
    records = [
        {"question": "what is the capital of france?", "answer": "paris."},
        {"question": "", "answer": "no prompt here."},
        {"answer": "the prompt field is missing."},
        {"question": "only a prompt.", "answer": " "},
    ]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    (tmp_path / "plain.txt").write_text("a plain document.\n", encoding="utf-8")
    out = tmp_path / "out"
    summary = prepare_corpus(
        input=[str(tmp_path / "qa.jsonl"), str(tmp_path / "plain.txt")],
        tokenizer=str(tok_dir),
        out=str(out),
        jsonl_field="answer",
        prompt_field="question",
        workers=0,
        shard_tokens=8,
    )
    assert summary["skipped"] == {"missing or non-string field 'question'": 1}
    corpus = ShardedCorpus(out)
    question = tokenizer.encode("what is the capital of france?")
    expected = [question + tokenizer.encode("paris."), tokenizer.encode("no prompt here.")]
    expected.append(tokenizer.encode("a plain document."))
    assert [corpus[i].tolist() for i in range(len(corpus))] == expected
    assert corpus.prompt_lengths.tolist() == [len(question), 0, 0]
    assert all("prompt" in shard for shard in corpus.manifest["shards"])
    assert corpus.subset([2, 0]).prompt_lengths.tolist() == [0, len(question)]
    # Shards without prompt files (every corpus prepared without a prompt field) read as prompt-free.
    plain = tmp_path / "plain"
    prepare_corpus(input=[str(tmp_path / "plain.txt")], tokenizer=str(tok_dir), out=str(plain), workers=0)
    assert ShardedCorpus(plain).prompt_lengths.tolist() == [0]
    assert not list(plain.glob("*.prompt.npy"))


def test_prompt_lengths_are_checked() -> None:
    with pytest.raises(ValueError, match="document 1 has prompt length 4 but 3 tokens"):
        InMemoryCorpus([[10, 11], [10, 11, 12]], prompt_lengths=[1, 4])
    with pytest.raises(ValueError, match="1 prompt lengths for 2 documents"):
        InMemoryCorpus([[10, 11], [10, 11, 12]], prompt_lengths=[1])


def test_cli_prepare(tmp_path: Path, tok_dir: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "c.txt"
    src.write_text(TEXT, encoding="utf-8")
    main(["data", "prepare", "--input", str(src), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "o")])
    assert json.loads(capsys.readouterr().out)["num_docs"] == 3
    with pytest.raises(SystemExit):
        main(
            ["data", "prepare", "--input", str(tmp_path / "nope"), "--tokenizer", str(tok_dir), "--out", "x"]
        )
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--tokenizer", str(tok_dir), "--out", str(tmp_path / "o2")])
    assert "--input is required" in capsys.readouterr().err


def test_prepare_gutenberg_book(tmp_path: Path, tok_dir: Path) -> None:
    book = require(shared_data_dir() / "corpora" / "gutenberg" / "blake-poems.txt")
    summary = prepare_corpus(input=[str(book)], tokenizer=str(tok_dir), out=str(tmp_path / "g"), workers=2)
    corpus = ShardedCorpus(tmp_path / "g")
    assert summary["num_docs"] == len(corpus) > 100 and corpus.num_tokens > 5000


@pytest.mark.slow
def test_prepare_gutenberg_full(tmp_path: Path, tok_dir: Path) -> None:
    root = require(shared_data_dir() / "corpora" / "gutenberg")
    summary = prepare_corpus(input=[str(root)], tokenizer=str(tok_dir), out=str(tmp_path / "g"), workers=2)
    assert summary["num_tokens"] > 2_000_000


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("bad", ["truncated_gz", "empty", "strict_json"])
def test_failed_prepare_keeps_the_old_shards(tmp_path: Path, tok_dir: Path, bad: str) -> None:
    """A failing `--overwrite true` run leaves the shards OUT had (they were deleted before tokenizing)."""
    src = tmp_path / "good.txt"
    src.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "out"
    prepare_corpus(input=[str(src)], tokenizer=str(tok_dir), out=str(out), workers=0, progress=False)
    before = _snapshot(out)
    strict = False
    if bad == "truncated_gz":
        data = gzip.compress(("a line of text.\n" * 4000).encode())
        (tmp_path / "in.txt.gz").write_bytes(data[: len(data) // 2])
        inputs, match = [str(tmp_path / "in.txt.gz")], r"in\.txt\.gz: truncated gzip file"
    elif bad == "empty":
        (tmp_path / "in.txt").write_bytes(b"")
        inputs, match = [str(tmp_path / "in.txt")], "no documents were read"
    else:
        (tmp_path / "in.jsonl").write_text('{"text": "fine."}\n{not json\n', encoding="utf-8")
        inputs, match, strict = [str(tmp_path / "in.jsonl")], r"in\.jsonl:2: invalid JSON line", True
    with pytest.raises(ValueError, match=match):
        prepare_corpus(
            input=inputs, tokenizer=str(tok_dir), out=str(out), overwrite=True, strict=strict, workers=2
        )
    assert _snapshot(out) == before
    assert len(ShardedCorpus(out)) == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left
    # Into a new nested folder: nothing is created at all.
    with pytest.raises(ValueError, match=match):
        prepare_corpus(
            input=inputs, tokenizer=str(tok_dir), out=str(tmp_path / "new" / "deep"), strict=strict
        )
    assert not (tmp_path / "new").exists()


def test_prepare_replaces_only_shard_files(tmp_path: Path, tok_dir: Path) -> None:
    """Overwriting a folder that also holds the user's files (even the corpus) replaces the shards only,
    stale extra shards of a bigger earlier run included."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me", encoding="utf-8")
    src = out / "corpus.txt"
    src.write_text(TEXT, encoding="utf-8")
    prepare_corpus(input=[str(src)], tokenizer=str(tok_dir), out=str(out), workers=0, shard_tokens=3)
    assert (out / "shard-00002.bin").exists()
    with pytest.raises(ValueError, match="pass --overwrite true to replace it"):
        prepare_corpus(input=[str(src)], tokenizer=str(tok_dir), out=str(out), workers=0)
    prepare_corpus(input=[str(src)], tokenizer=str(tok_dir), out=str(out), workers=0, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "corpus.txt",
        "manifest.json",
        "notes.txt",
        "shard-00000.bin",
        "shard-00000.idx.npy",
    ]
    assert (out / "notes.txt").read_text(encoding="utf-8") == "keep me" and len(ShardedCorpus(out)) == 3


def test_prepare_flag_errors(tmp_path: Path, tok_dir: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "c.txt"
    src.write_text(TEXT, encoding="utf-8")
    args = ["data", "prepare", "--input", str(src), "--tokenizer", str(tok_dir)]
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path / "o"), "--workers", "-1"])
    assert "--workers must be >= 0" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path / "afile")])
    assert "afile: --out exists and is not a directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"plain text, not gzip\n", r"x\.txt\.gz: corrupt gzip file at its start"),
        (
            gzip.compress(b"".join(b"line %d\n" % i for i in range(3000)))[:2000],
            r"x\.txt\.gz: truncated gzip file \(its data ends after line",
        ),
    ],
    ids=["not_gzip", "truncated"],
)
def test_damaged_gzip_is_one_error_naming_the_file(
    tmp_path: Path, tok_dir: Path, capsys: pytest.CaptureFixture, data: bytes, match: str
) -> None:
    (tmp_path / "x.txt.gz").write_bytes(data)
    src, out = str(tmp_path / "x.txt.gz"), str(tmp_path / "o")
    with pytest.raises(SystemExit):
        main(
            [
                "data",
                "prepare",
                "--input",
                src,
                "--tokenizer",
                str(tok_dir),
                "--out",
                out,
                "--progress",
                "false",
            ]
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("openglm: error: ")
    assert re.search(match, err[0])


def test_unreadable_corpus_names_the_file(tmp_path: Path, tok_dir: Path) -> None:
    """With every document skipped, the error says where the bad input is, not only how much."""
    (tmp_path / "bin.txt.gz").write_bytes(gzip.compress(b"\xff\xfe\x00binary\n"))
    with pytest.raises(ValueError, match=r"invalid UTF-8: 1 \(first at .*bin\.txt\.gz:1\)"):
        prepare_corpus(input=[str(tmp_path / "bin.txt.gz")], tokenizer=str(tok_dir), out=str(tmp_path / "o"))


def test_input_report_summary_names_where() -> None:
    from openglm.corpus import InputReport

    report = InputReport()
    report.skip("invalid UTF-8", "a.txt:3", strict=False)
    report.skip("invalid UTF-8", "b.txt:1", strict=False)
    report.skipped["document with no tokens"] += 2  # counted after tokenizing: no file:line
    assert report.summary() == "invalid UTF-8: 2 (first at a.txt:3), document with no tokens: 2"
    assert InputReport().summary() == "no text found"


# ------------------------------------------------------------------------------------------ shard checks


@pytest.fixture(scope="module")
def good_shards(tmp_path_factory: pytest.TempPathFactory, tok_dir: Path) -> Path:
    src = tmp_path_factory.mktemp("corpus") / "c.txt"
    src.write_text(TEXT, encoding="utf-8")
    out = tmp_path_factory.mktemp("shards") / "s"
    prepare_corpus(input=[str(src)], tokenizer=str(tok_dir), out=str(out), workers=0, progress=False)
    return out


def _edit_manifest(**changes):
    def edit(folder: Path) -> None:
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest.update(changes)
        (folder / "manifest.json").write_text(json.dumps(manifest))

    return edit


def _edit_shard(**changes):
    def edit(folder: Path) -> None:
        manifest = json.loads((folder / "manifest.json").read_text())
        for key, value in changes.items():
            if value is None:
                del manifest["shards"][0][key]
            else:
                manifest["shards"][0][key] = value
        (folder / "manifest.json").write_text(json.dumps(manifest))

    return edit


def _write(name: str, data: bytes):
    return lambda folder: (folder / name).write_bytes(data)


def _truncate(name: str, size: int):
    return lambda folder: (folder / name).write_bytes((folder / name).read_bytes()[:size])


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        (
            _truncate("shard-00000.bin", 10),
            ValueError,
            r"shard-00000\.bin: 10 bytes, but .*records \d+ uint16",
        ),
        (
            _edit_manifest(dtype="float64"),
            ValueError,
            r"manifest\.json: dtype 'float64' is not one of uint16",
        ),
        (_edit_manifest(dtype="foo"), ValueError, r"dtype 'foo'"),
        (_edit_manifest(dtype="uint32"), ValueError, r"shard-00000\.bin: \d+ bytes, but .* uint32 tokens"),
        (_write("manifest.json", b"[]"), ValueError, r"manifest\.json: expected a JSON object, got list"),
        (_write("manifest.json", b""), ValueError, r"manifest\.json: not a valid shard manifest \(Expecting"),
        (_truncate("manifest.json", 60), ValueError, r"manifest\.json: not a valid shard manifest"),
        (_edit_manifest(shards="x"), ValueError, r"manifest\.json: shards must be a non-empty list"),
        (_edit_manifest(shards=[]), ValueError, r"manifest\.json: shards must be a non-empty list"),
        (_edit_shard(index=None), ValueError, r"shards\[0\]\.index must be a file name inside"),
        (_edit_shard(tokens="../s/shard-00000.bin"), ValueError, r"shards\[0\]\.tokens must be a file name"),
        (_edit_shard(num_tokens=10**9), ValueError, r"num_tokens is \d+ but its shards hold 1000000000"),
        (_edit_manifest(num_tokens="x"), ValueError, r"manifest\.json: num_tokens must be a whole number"),
        (_edit_manifest(eos_id=99999), ValueError, r"eos_id 99999 is outside vocab_size"),
        (_edit_manifest(vocab_size=70000), ValueError, r"vocab_size 70000 does not fit dtype uint16"),
        (_write("shard-00000.idx.npy", b"garbage" * 20), ValueError, r"idx\.npy: not a readable \.npy array"),
        (_truncate("shard-00000.idx.npy", 140), ValueError, r"idx\.npy: not a readable \.npy array"),
        (lambda f: (f / "shard-00000.bin").unlink(), FileNotFoundError, r"shard-00000\.bin: no such file"),
        (lambda f: (f / "shard-00000.idx.npy").unlink(), FileNotFoundError, r"idx\.npy: no such file"),
    ],
    ids=[
        "bin_truncated",
        "dtype_float64",
        "dtype_foo",
        "dtype_uint32",
        "manifest_list",
        "manifest_empty",
        "manifest_truncated",
        "shards_str",
        "shards_empty",
        "no_index_key",
        "path_outside",
        "shard_num_tokens",
        "num_tokens_str",
        "eos_outside_vocab",
        "vocab_too_big_for_dtype",
        "index_garbage",
        "index_truncated",
        "bin_missing",
        "index_missing",
    ],
)
def test_damaged_shards_fail_when_opened(tmp_path: Path, good_shards: Path, damage, error, match) -> None:
    folder = tmp_path / "s"
    shutil.copytree(good_shards, folder)
    ShardedCorpus(folder)  # the copy is fine before the damage
    damage(folder)
    with pytest.raises(error, match=match) as caught:
        ShardedCorpus(folder)
    assert "\n" not in str(caught.value)


def test_index_offsets_are_checked(tmp_path: Path, good_shards: Path) -> None:
    folder = tmp_path / "s"
    shutil.copytree(good_shards, folder)
    offsets = np.load(folder / "shard-00000.idx.npy")
    np.save(folder / "shard-00000.idx.npy", offsets[::-1].copy())
    with pytest.raises(ValueError, match=r"idx\.npy: offsets must rise from 0 to num_tokens"):
        ShardedCorpus(folder)
    np.save(folder / "shard-00000.idx.npy", offsets[:-1])
    with pytest.raises(ValueError, match=r"expected 4 integers \(num_docs \+ 1 document offsets"):
        ShardedCorpus(folder)


def test_check_tokenizer(good_shards: Path, tokenizer) -> None:
    corpus = ShardedCorpus(good_shards)
    corpus.check_tokenizer(tokenizer)
    other = SimpleNamespace(vocab_size=2048, eos_id=tokenizer.eos_id, cls_id=tokenizer.cls_id)
    with pytest.raises(
        ValueError, match=rf"vocab_size {tokenizer.vocab_size} .* this tokenizer has vocab_size 2048"
    ):
        corpus.check_tokenizer(other)
    other = SimpleNamespace(
        vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id + 1, cls_id=tokenizer.cls_id
    )
    with pytest.raises(ValueError, match="eos_id"):
        corpus.check_tokenizer(other)


def test_corpus_too_small_for_one_sample(good_shards: Path, tokenizer) -> None:
    """A corpus that cannot fill one sample gives batches whose blanks do not fit (no loss weight); say so up
    front, naming the shards and the counts. Held-out sets may be that small."""
    special = SpecialTokens.from_tokenizer(tokenizer)
    corpus = ShardedCorpus(good_shards)
    tokens = corpus.num_tokens
    with pytest.raises(ValueError, match=rf"shards .*{good_shards.name}: {tokens} tokens in 3 document\(s\)"):
        PretrainingBatches(corpus, special, seq_length=128, batch_size=2)
    with pytest.raises(ValueError, match=r"\(a subset: 1 of its 3 documents\)"):
        PretrainingBatches(corpus.subset([1]), special, seq_length=128, batch_size=2)
    PretrainingBatches(corpus, special, seq_length=tokens + 6, batch_size=2)  # exactly one sample's worth
    valid = validation_batches(corpus.subset([1]), special, seq_length=128, batch_size=2, num_batches=1)
    assert set(valid) == {"token", "sentence", "document"}


# ------------------------------------------------------------------------------------------ samples


def synthetic(num_docs: int = 300, seed: int = 0) -> tuple[InMemoryCorpus, SpecialTokens]:
    """Random documents over ids 10..999 with sentence ends (id 5) about every 12 tokens."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(num_docs):
        n = int(rng.integers(5, 1500))
        d = rng.integers(10, 1000, size=n)
        d[rng.random(n) < 0.08] = 5
        docs.append(d)
    table = np.zeros(1000, dtype=bool)
    table[5] = True
    special = SpecialTokens(
        cls=1, eos=0, mask=2, sop=3, eop=4, smask=6, gmask=7, dblock=8, sentence_end=table
    )
    return InMemoryCorpus(docs), special


def test_sample_assembly() -> None:
    corpus, special = synthetic()
    assemble = SampleAssembler(corpus, special, seq_length=256, seed=3)
    lengths, multi = [], 0
    doc_texts = {tuple(d.tolist()) for d in corpus.documents}
    for index in range(200):
        tokens, loss = assemble(index)
        assert 2 <= len(tokens) <= 256 and tokens[0] == special.cls
        np.testing.assert_array_equal(loss, tokens != special.cls)
        again, _ = assemble(index)
        np.testing.assert_array_equal(tokens, again)  # seeded per index
        lengths.append(len(tokens))
        cls_at = np.flatnonzero(tokens == special.cls)
        multi += len(cls_at) > 1
        # Every complete piece ([CLS] ... eos) is a whole corpus document.
        for a, b in zip(cls_at, list(cls_at[1:]) + [len(tokens)], strict=True):
            piece = tokens[a + 1 : b]
            if len(piece) and piece[-1] == special.eos and a + 1 < b - 1 and len(cls_at) > 1:
                assert tuple(piece[:-1].tolist()) in doc_texts
    assert np.mean(lengths) > 0.9 * 256  # packing fills the sequence
    assert 0 < multi < 200


def test_prompt_tokens_have_no_loss_in_prefix_lm_rows() -> None:
    """Prompt tokens (ids 1000..1099 here) get loss mask 0 in every assembled sample, through cropping and
    packing; the document objective's prefix-LM rows then take no loss on them, as on [CLS]."""
    corpus, special = synthetic(num_docs=200)
    rng = np.random.default_rng(1)
    short = [doc[:200] for doc in corpus.documents]  # some fit whole, some are cropped
    prompt_lengths = rng.integers(0, 40, size=len(short)).clip(max=[len(d) for d in short])
    docs = []
    for doc, p in zip(short, prompt_lengths, strict=True):
        doc = doc.copy()
        doc[:p] = rng.integers(1000, 1100, size=p)
        docs.append(doc)
    prompted = InMemoryCorpus(docs, prompt_lengths=prompt_lengths)
    is_prompt = lambda t: (t >= 1000) & (t < 1100)  # noqa: E731
    assemble = SampleAssembler(prompted, special, seq_length=128, seed=0)
    saw_prompt = 0
    for index in range(300):
        tokens, mask = assemble(index)
        np.testing.assert_array_equal(mask, ~is_prompt(tokens) & (tokens != special.cls))
        saw_prompt += int(is_prompt(tokens).any())
    assert saw_prompt > 50
    objective = ObjectiveConfig(bert_prob=0.0, gpt_suffix_prob=1.0)
    data = PretrainingBatches(prompted, special, objective, seq_length=128, batch_size=8, seed=0)
    supervised = prompt_targets = 0
    for step in range(20):
        batch = data.batch(step)
        on = batch["loss_mask"] > 0
        assert not is_prompt(batch["targets"][on]).any()
        supervised += int(on.sum())
        prompt_targets += int(is_prompt(batch["targets"][batch["position_ids"][:, 1] > 0]).sum())
    assert supervised > 0 and prompt_targets > 0  # prompts do reach Part B, unsupervised


def test_weighting_by_length() -> None:
    special = SpecialTokens(cls=1, eos=0, mask=2, sop=3, eop=4, sentence_end=np.zeros(100, dtype=bool))
    corpus = InMemoryCorpus([np.full(9, 10), np.full(99, 11)])  # weights 10 : 100 (eos included)
    assemble = SampleAssembler(corpus, special, seq_length=512, seed=0)
    firsts = [int(assemble(i)[0][1]) for i in range(2000)]
    assert abs(firsts.count(10) / 2000 - 10 / 110) < 0.025


def test_crop_starts_at_sentence_boundary() -> None:
    corpus, special = synthetic(num_docs=20)
    corpus = InMemoryCorpus([d for d in corpus.documents if len(d) > 1000])
    assemble = SampleAssembler(corpus, special, seq_length=128, seed=1)
    aligned = 0
    for index in range(100):
        tokens, _ = assemble(index)
        assert len(tokens) <= 128
        piece = tokens[1:].tolist()
        for doc in corpus.documents:
            d = doc.tolist() + [special.eos]
            hits = [k for k in range(len(d) - len(piece) + 1) if d[k : k + len(piece)] == piece]
            if hits:
                aligned += hits[0] == 0 or d[hits[0] - 1] == 5
                break
        else:
            raise AssertionError("a cropped sample is not a slice of a document")
    assert aligned >= 95  # sentence ends are dense, so the 64-token move almost always finds one


# ------------------------------------------------------------------------------------------ batches


def assert_batches_equal(a: dict, b: dict) -> None:
    assert a["mode"] == b["mode"]
    for key in ("input_ids", "position_ids", "sep", "targets", "loss_mask"):
        assert torch.equal(a[key], b[key]), key


def test_batch_format_and_determinism() -> None:
    corpus, special = synthetic()
    config = ObjectiveConfig.from_name("glm-10b")
    data = PretrainingBatches(corpus, special, config, seq_length=128, batch_size=4, seed=5)
    batches = [b for _, b in zip(range(12), data, strict=False)]
    modes = {b["mode"] for b in batches}
    assert modes <= {"token", "sentence", "document"} and len(modes) >= 2
    for step, b in enumerate(batches):
        n, t = b["input_ids"].shape
        assert b["input_ids"].dtype == torch.long and b["loss_mask"].dtype == torch.float32
        assert b["position_ids"].shape == (n, 2, t) and b["sep"].shape == (n,)
        assert b["targets"].shape == (n, t) and b["step"] == step
        assert torch.all(b["sep"] <= t) and b["loss_mask"].sum() > 0
        # Padding carries no loss; Part A carries no loss.
        for i in range(n):
            assert b["loss_mask"][i, : b["sep"][i]].sum() == 0
        assert_batches_equal(b, data.batch(step))
    other = PretrainingBatches(corpus, special, config, seq_length=128, batch_size=4, seed=6)
    assert not torch.equal(other.batch(0)["input_ids"][:, :8], batches[0]["input_ids"][:, :8])


def test_ranks_see_different_data_and_resume() -> None:
    corpus, special = synthetic()
    make = lambda rank, **kw: PretrainingBatches(  # noqa: E731
        corpus, special, seq_length=128, batch_size=2, seed=1, rank=rank, world_size=2, **kw
    )
    r0, r1 = make(0), make(1)
    assert not torch.equal(r0.batch(0)["input_ids"][:, :16], r1.batch(0)["input_ids"][:, :16])
    it = iter(r0)
    first = [next(it) for _ in range(3)]
    state = r0.state_dict()
    assert state == {"step": 3}
    expected = next(it)
    resumed = make(0)
    resumed.load_state_dict(state)
    assert_batches_equal(next(iter(resumed)), expected)
    assert_batches_equal(next(iter(make(0, start_step=1))), first[1])
    with pytest.raises(ValueError, match="rank"):
        make(2)


def test_multi_task_batches_replace_corpus_batches_at_the_drawn_steps() -> None:
    corpus, special = synthetic()
    special.sentence_end = np.zeros(4000, dtype=bool)
    special.sentence_end[5] = True
    rng = np.random.default_rng(0)
    ids = rng.permutation(np.arange(2000, 2000 + 24 * 40)).reshape(24, 40)  # every id in one example only
    pool = [np.concatenate(([special.cls], row, [special.eos])) for row in ids]

    def owner(row_tokens: torch.Tensor) -> int:
        found = {int(np.flatnonzero((ids == t).any(axis=1))[0]) for t in row_tokens.tolist() if t >= 2000}
        assert len(found) == 1, found
        return found.pop()

    config = ObjectiveConfig().only("token")
    make = lambda rank, ratio: PretrainingBatches(  # noqa: E731
        corpus,
        special,
        config,
        128,
        4,
        seed=3,
        rank=rank,
        world_size=2,
        multi_task=pool,
        multi_task_ratio=ratio,
    )
    always = make(0, 1.0), make(1, 1.0)
    seen = []
    for step in range(3):  # 3 steps x 2 ranks x 4 rows: one pass over the 24 examples
        for data in always:
            b = data.batch(step)
            assert not torch.any((b["input_ids"] >= 10) & (b["input_ids"] < 1000))  # nothing from the corpus
            seen += [
                owner(torch.cat([b["input_ids"][i], b["targets"][i]])) for i in range(b["input_ids"].shape[0])
            ]
    assert sorted(seen) == list(range(24))
    some = make(0, 0.25), make(1, 0.25)
    drawn = [some[0].is_multi_task(step) for step in range(400)]
    assert drawn == [some[1].is_multi_task(step) for step in range(400)]  # the ranks agree
    assert 0.18 < np.mean(drawn) < 0.32
    plain = PretrainingBatches(corpus, special, config, 128, 4, seed=3, rank=0, world_size=2)
    for step in range(8):
        b = some[0].batch(step)
        if drawn[step]:
            assert torch.all((b["input_ids"] < 10) | (b["input_ids"] >= 2000))
        else:  # the corpus batches are those of a run without multi-task data
            assert_batches_equal(b, plain.batch(step))
    with pytest.raises(ValueError, match="needs multi-task examples"):
        PretrainingBatches(corpus, special, config, multi_task_ratio=0.5)
    with pytest.raises(ValueError, match="multi_task_ratio must be in"):
        PretrainingBatches(corpus, special, config, multi_task=pool, multi_task_ratio=1.5)


def test_dataloader_workers_keep_order() -> None:
    corpus, special = synthetic(num_docs=60)
    make = lambda: PretrainingBatches(corpus, special, seq_length=64, batch_size=2, seed=2, num_steps=6)  # noqa: E731
    serial = list(make())
    parallel = list(DataLoader(make(), batch_size=None, num_workers=2))
    assert [b["step"] for b in parallel] == list(range(6))
    for a, b in zip(serial, parallel, strict=True):
        assert_batches_equal(a, b)
    data = make()
    stream = data.loader(num_workers=2)
    for _ in range(4):
        next(stream)
    assert data.state_dict() == {"step": 4}
    resumed = make()
    resumed.load_state_dict(data.state_dict())
    assert_batches_equal(next(resumed.loader(num_workers=2)), serial[4])


def test_sharded_corpus_feeds_batches(tmp_path: Path, tok_dir: Path, tokenizer) -> None:
    book = require(shared_data_dir() / "corpora" / "tinyshakespeare.txt")
    prepare_corpus(
        input=[str(book)], tokenizer=str(tok_dir), out=str(tmp_path / "s"), workers=0, progress=False
    )
    corpus = ShardedCorpus(tmp_path / "s")
    special = SpecialTokens.from_tokenizer(tokenizer)
    train_ids, valid_ids = split_documents(len(corpus), 0.1, seed=0)
    assert len(set(train_ids) & set(valid_ids)) == 0 and len(train_ids) + len(valid_ids) == len(corpus)
    data = PretrainingBatches(corpus.subset(train_ids), special, seq_length=128, batch_size=2)
    batch = data.batch(0)
    assert batch["mode"] == "token" and batch["input_ids"].shape[0] == 2
    loader = DataLoader(
        PretrainingBatches(corpus, special, seq_length=64, batch_size=2, num_steps=2),
        batch_size=None,
        num_workers=1,
    )
    assert len(list(loader)) == 2  # the memory map re-opens in the worker
    valid = validation_batches(corpus.subset(valid_ids), special, seq_length=128, batch_size=2, num_batches=2)
    assert set(valid) == {"token", "sentence", "document"}
    for mode, batches in valid.items():
        assert len(batches) == 2 and all(b["mode"] == mode for b in batches)
    again = validation_batches(corpus.subset(valid_ids), special, seq_length=128, batch_size=2, num_batches=2)
    assert_batches_equal(valid["sentence"][1], again["sentence"][1])


def test_sample_assembly_matches_fixture() -> None:
    """Spec C.1 on the fixture's own documents: the same documents, and sample lengths and packing that
    match the official BlockDataset's statistics (2000 samples of 512)."""
    import random

    from openglm.corpus import ascii_punctuation
    from openglm.tokenizer import GLMTokenizer

    fixtures = reference_dir() / "blank_infilling"
    stats = json.loads(require(fixtures / "pipeline_stats.json").read_text())
    text = require(shared_data_dir() / "corpora" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    # The fixture's documents (its README): groups of k blank-line separated speeches joined by newlines.
    speeches = [s for s in text.split("\n\n") if s.strip()]
    choose, docs, i = random.Random(12345), [], 0
    while i < len(speeches):
        k = choose.choice([1, 1, 2, 3, 5, 8, 13, 21, 34])
        docs.append("\n".join(speeches[i : i + k]))
        i += k
    assert len(docs) == stats["n_documents"]
    tok = GLMTokenizer.from_files("bert", shared_data_dir() / "tokenizers" / "bert-large-uncased-vocab.txt")
    corpus = InMemoryCorpus([np.array(ids) for ids in tok.encode_batch([ascii_punctuation(d) for d in docs])])
    special = SpecialTokens.from_tokenizer(tok)

    data = np.load(require(fixtures / "pipeline_samples_bert.npz"))
    text_ids, off = data["text"], data["offsets"]
    theirs = [text_ids[off[i] : off[i + 1]] for i in range(len(off) - 1)]
    known = {tuple(d.tolist()) for d in corpus.documents}
    complete = 0
    for sample in theirs[:200]:
        cls_at = np.flatnonzero(sample == special.cls).tolist()
        for a, b in zip(cls_at, cls_at[1:] + [len(sample)], strict=True):
            if a > 0 and sample[b - 1] == special.eos:  # a packed, unstripped document
                assert tuple(sample[a + 1 : b - 1].tolist()) in known
                complete += 1
    assert complete > 5

    assemble = SampleAssembler(corpus, special, seq_length=512, seed=0)
    ours = [assemble(i)[0] for i in range(len(theirs))]
    n = len(theirs)
    for stat in (len, lambda s: float(np.count_nonzero(s == special.cls) > 1)):
        a = np.array([stat(s) for s in ours], dtype=float)
        b = np.array([stat(s) for s in theirs], dtype=float)
        se = np.sqrt(a.var() / n + b.var() / n)
        assert abs(a.mean() - b.mean()) <= 4 * se, (a.mean(), b.mean(), se)
    assert min(len(s) for s in ours) > 256 and max(len(s) for s in ours) == 512
