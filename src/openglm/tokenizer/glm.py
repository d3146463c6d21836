"""The official GLM tokenizers (spec B): BERT WordPiece, GPT-2 and RoBERTa byte-level BPE, the Chinese
SentencePiece model (with and without fixed command ids) and trained byte-level BPE. The text tokenizers are the
Rust `tokenizers` library and `sentencepiece`; this module only adds GLM's command tokens around them (B.1)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from openglm.atomic import write_bytes_atomic
from openglm.config import pad_vocab_size
from openglm.tokenizer import fast_bpe
from openglm.tokenizer.fast_bpe import TiktokenBPE

KINDS = ("bert", "gpt2", "roberta", "chinese-sp", "chinese-sp-fix", "bpe")
CONFIG_FILE = "tokenizer_config.json"
FORMAT = "openglm-tokenizer"
VERSION = 1
_CONFIG_FIELDS = frozenset(
    {"format", "version", "kind", "options", "num_tokens", "vocab_size", "command_tokens"}
)

# Files written by save_pretrained, per kind, and the names searched when from_files gets a directory
# (ours first, then the names of the official release files).
_SAVED_FILES = {
    "bert": ("vocab.txt",),
    "gpt2": ("vocab.json", "merges.txt"),
    "roberta": ("vocab.json", "merges.txt"),
    "chinese-sp": ("spiece.model",),
    "chinese-sp-fix": ("spiece.model",),
    "bpe": ("tokenizer.json",),
}
_OFFICIAL_NAMES = {
    "bert": ("bert-large-uncased-vocab.txt", "bert-base-uncased-vocab.txt"),
    "gpt2": ("gpt2-vocab.json",),
    "roberta": ("roberta-vocab.json",),
    "chinese-sp": ("cog-pretrain.model",),
    "chinese-sp-fix": ("cog-pretrain.model",),
    "bpe": (),
}
# Released-model defaults for the task-mask flag (spec B, fixtures official_factory): GLM-10B/2B and both
# Chinese models were fine-tuned with --task-mask; the BERT models and GLM-RoBERTa (fine-tuning) were not.
_DEFAULT_TASK_MASK = {
    "bert": False,
    "gpt2": True,
    "roberta": False,
    "chinese-sp": True,
    "chinese-sp-fix": True,
}

# The tokenizer of each released model (GLMConfig preset names): kind, vocab file, and the flags of its
# fine-tuning/inference scripts and of its pretraining run (fixtures official_factory, README table).
OFFICIAL_MODELS: dict[str, tuple[str, str, dict[str, bool], dict[str, bool]]] = {
    "glm-base": ("bert", "bert-base-uncased-vocab.txt", {}, {}),
    "glm-large": ("bert", "bert-large-uncased-vocab.txt", {}, {}),
    "glm-doc": ("bert", "bert-large-uncased-vocab.txt", {}, {}),
    "glm-410m": ("bert", "bert-large-uncased-vocab.txt", {}, {}),
    "glm-515m": ("bert", "bert-large-uncased-vocab.txt", {}, {}),
    "glm-roberta": ("roberta", "roberta-vocab.json", {}, {"task_mask": True}),
    "glm-2b": ("gpt2", "gpt2-vocab.json", {}, {"dblock": True}),
    "glm-10b": ("gpt2", "gpt2-vocab.json", {}, {"dblock": True}),
    "glm-large-chinese": ("chinese-sp-fix", "cog-pretrain.model", {}, {"dblock": True}),
    "glm-10b-chinese": ("chinese-sp", "cog-pretrain.model", {}, {"dblock": True}),
}

# The GLM special tokens of trained tokenizers, in the order they are appended to the learned vocabulary.
GLM_SPECIAL_TOKENS = (
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "[sMASK]",
    "[gMASK]",
    "<|startofpiece|>",
    "<|endofpiece|>",
    "[UNK]",
    "[dBLOCK]",
    "<|endoftext|>",
)
_LSTRIP_TOKENS = frozenset({"[MASK]", "[sMASK]", "[gMASK]"})
UNUSED_TOKEN = "<unused>"


@dataclass(frozen=True)
class CommandToken:
    """One GLM command token: official name (pad, eos, ENC, sep, MASK, unk, sop, eop, gMASK, sMASK, dBLOCK),
    the literal string split out of text, its id, and whether whitespace before it is dropped."""

    name: str
    token: str
    id: int
    lstrip: bool = False


def _utf8(data: bytes, path: Path | str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: not valid UTF-8 at byte offset {err.start} (byte 0x{data[err.start]:02x})"
        ) from None


def _read(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path.read_bytes()


# ----------------------------------------------------------------------------------------------------------
# Text tokenizers: thin adapters over the libraries (encode fragments, decode runs of text ids, id -> string).


class _HFText:
    """A `tokenizers.Tokenizer` (WordPiece or byte-level BPE) used without post-processing; the GLMTokenizer
    encodes even single texts through the batch call."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        vocab = tok.get_vocab(with_added_tokens=True)
        self.size = max(vocab.values()) + 1 if vocab else 0
        self.pieces: list[str | None] = [None] * self.size
        for piece, i in vocab.items():
            self.pieces[i] = piece
        self.vocab = vocab
        self.fast: TiktokenBPE | None = None  # byte-level BPE: the same ids through tiktoken, when available

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.fast is not None:
            return self.fast.encode_batch(texts)
        # encode_batch_fast skips offset tracking; the ids are the same.
        return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def piece_to_id(self, piece: str) -> int | None:
        return self.vocab.get(piece)


class _SPText:
    """A SentencePiece model (the Chinese GLM models' `cog-pretrain.model`)."""

    def __init__(self, proc: Any) -> None:
        self.sp = proc
        self.size = proc.get_piece_size()
        self.pieces: list[str | None] = [proc.id_to_piece(i) for i in range(self.size)]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def piece_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)  # returns the unk id for unknown pieces
        return i if self.pieces[i] == piece else None


# ----------------------------------------------------------------------------------------------------------
# Loading the vocab files of each kind and building the command-token tables (spec B.2-B.5).


def _bert_text(data: bytes, path: Path) -> _HFText:
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece

    lines = _utf8(data, path).splitlines()
    vocab: dict[str, int] = {}
    for i, line in enumerate(lines):
        token = line.rstrip("\n")
        if token in vocab:
            raise ValueError(f"{path}: malformed BERT vocab: line {i + 1} repeats token {token!r}")
        vocab[token] = i
    for needed in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"):
        if needed not in vocab:
            raise ValueError(
                f"{path}: malformed BERT vocab: no {needed!r} line (expected a WordPiece vocab.txt)"
            )
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    # Uncased BERT: clean control chars, split CJK characters, strip accents, lower-case, split punctuation.
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return _HFText(tok)


def _bpe_text(vocab_data: bytes, vocab_path: Path, merges_data: bytes, merges_path: Path) -> _HFText:
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    try:
        vocab = json.loads(_utf8(vocab_data, vocab_path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{vocab_path}: malformed BPE vocab (not JSON): {err}") from None
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in vocab.items()
    ):
        raise ValueError(f"{vocab_path}: malformed BPE vocab: expected a JSON object of token -> integer id")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"{vocab_path}: malformed BPE vocab: ids are not exactly 0..{len(vocab) - 1}")
    merges: list[tuple[str, str]] = []
    for n, line in enumerate(_utf8(merges_data, merges_path).split("\n"), start=1):
        if not line or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if (
            len(parts) != 2
            or parts[0] not in vocab
            or parts[1] not in vocab
            or parts[0] + parts[1] not in vocab
        ):
            raise ValueError(f"{merges_path}: malformed BPE merges at line {n}: {line[:60]!r}")
        merges.append((parts[0], parts[1]))
    tok = Tokenizer(BPE(vocab, merges))
    # GPT-2 byte-level pre-tokenisation (its regex, no prefix space), byte-level decoding.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    text = _HFText(tok)
    text.fast = fast_bpe.build(vocab, merges, text)
    return text


def _sp_text(data: bytes, path: Path) -> _SPText:
    import sentencepiece as spm

    proc = spm.SentencePieceProcessor()
    try:
        proc.LoadFromSerializedProto(data)
    except (RuntimeError, OSError, TypeError) as err:
        raise ValueError(f"{path}: not a valid SentencePiece model: {err}") from None
    return _SPText(proc)


def _tokenizer_json_text(data: bytes, path: Path) -> _HFText:
    from tokenizers import Tokenizer

    source = _utf8(data, path)
    try:
        tok = Tokenizer.from_str(source)
    except Exception as err:  # the Rust side raises a bare Exception for any parse error
        raise ValueError(f"{path}: malformed tokenizer.json: {err}") from None
    text = _HFText(tok)
    spec = json.loads(source)
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    byte_level_bpe = (
        model.get("type") == "BPE"
        and not model.get("dropout")
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
        and spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and not pre.get("add_prefix_space")
        and pre.get("use_regex", True)
    )
    if byte_level_bpe:
        # Merges are "a b" strings in older files and [a, b] pairs in newer ones.
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        text.fast = fast_bpe.build(model.get("vocab", {}), merges, text)
    return text


def _require(vocab: dict[str, int] | Any, token: str, path: Path, what: str) -> int:
    i = vocab.get(token)
    if i is None:
        raise ValueError(f"{path}: not a {what} vocab: it has no {token!r} token")
    return i


def _block_tokens(
    n: int, block_symbols: bool, task_mask: bool, dblock: bool, lstrip_masks: bool
) -> tuple[list[CommandToken], int]:
    """sop/eop (block symbols), then gMASK/sMASK (task mask), then dBLOCK, numbered from `n`."""
    cmds: list[CommandToken] = []
    if block_symbols:
        cmds += [CommandToken("sop", "<|startofpiece|>", n), CommandToken("eop", "<|endofpiece|>", n + 1)]
        n += 2
    if task_mask:
        cmds += [
            CommandToken("gMASK", "[gMASK]", n, lstrip_masks),
            CommandToken("sMASK", "[sMASK]", n + 1, lstrip_masks),
        ]
        n += 2
    if dblock:
        cmds.append(CommandToken("dBLOCK", "[dBLOCK]", n))
        n += 1
    return cmds, n


def _bert_commands(text: _HFText, path: Path, opts: dict[str, bool]) -> tuple[list[CommandToken], int]:
    v = text.vocab
    # eos is [PAD] (id 0): BERT GLMs end documents with 0, not [SEP] (spec B.2, pitfall I.5).
    cmds = [
        CommandToken("pad", "[PAD]", v["[PAD]"]),
        CommandToken("ENC", "[CLS]", v["[CLS]"]),
        CommandToken("MASK", "[MASK]", v["[MASK]"]),
        CommandToken("unk", "[UNK]", v["[UNK]"]),
        CommandToken("sep", "[SEP]", v["[SEP]"]),
        CommandToken("eos", "[PAD]", v["[PAD]"]),
    ]
    extra, n = _block_tokens(text.size, opts["block_symbols"], opts["task_mask"], opts["dblock"], False)
    return cmds + extra, n


def _gpt2_commands(text: _HFText, path: Path, opts: dict[str, bool]) -> tuple[list[CommandToken], int]:
    eot = _require(text.vocab, "<|endoftext|>", path, "GPT-2")
    cmds = [CommandToken("pad", "<|endoftext|>", eot), CommandToken("eos", "<|endoftext|>", eot)]
    n = text.size
    if opts["block_symbols"]:
        cmds += [
            CommandToken("sop", "<|startofpiece|>", n),
            CommandToken("eop", "<|endofpiece|>", n + 1),
            CommandToken("ENC", "[CLS]", n + 2),
            CommandToken("MASK", "[MASK]", n + 3, True),
            CommandToken("sep", "[SEP]", n + 4),
            CommandToken("unk", "[UNK]", n + 5),
        ]
        n += 6
    extra, n = _block_tokens(n, False, opts["task_mask"], opts["dblock"], True)
    return cmds + extra, n


def _roberta_commands(text: _HFText, path: Path, opts: dict[str, bool]) -> tuple[list[CommandToken], int]:
    v = text.vocab
    eos = _require(v, "</s>", path, "RoBERTa")
    # pad = eos = sep = </s>; the literal "<|endoftext|>" is the pad/eos string, so it encodes to </s> (2)
    # and, the sep registration coming later, id 2 prints as "[SEP]" (spec B.4).
    cmds = [
        CommandToken("pad", "<|endoftext|>", eos),
        CommandToken("eos", "<|endoftext|>", eos),
        CommandToken("sep", "[SEP]", eos),
        CommandToken("ENC", "[CLS]", _require(v, "<s>", path, "RoBERTa")),
        CommandToken("MASK", "[MASK]", _require(v, "<mask>", path, "RoBERTa"), True),
        CommandToken("unk", "[UNK]", _require(v, "<unk>", path, "RoBERTa")),
    ]
    extra, n = _block_tokens(text.size, opts["block_symbols"], opts["task_mask"], opts["dblock"], True)
    return cmds + extra, n


def _chinese_commands(
    text: _SPText, path: Path, opts: dict[str, bool], fix: bool
) -> tuple[list[CommandToken], int]:
    n = text.size
    cmds = [
        CommandToken("pad", "<|endoftext|>", n),
        CommandToken("eos", "<|endoftext|>", n),
        CommandToken("sep", "[SEP]", n + 1),
        CommandToken("ENC", "[CLS]", n + 2),
        CommandToken("MASK", "[MASK]", n + 3, True),
        CommandToken("unk", "[UNK]", n + 4),
    ]
    n += 5
    if opts["block_symbols"]:
        # sop sits at n+1, so id n (50005) is never used; without the fix the counter advances by two only,
        # so gMASK lands on eop's id (GLM-10B-Chinese: gMASK = eop = 50007), spec B.5 / pitfall I.6.
        cmds += [CommandToken("sop", "<|startofpiece|>", n + 1), CommandToken("eop", "<|endofpiece|>", n + 2)]
        n += 3 if fix else 2
    if opts["task_mask"]:
        masks = [CommandToken("gMASK", "[gMASK]", n, True), CommandToken("sMASK", "[sMASK]", n + 1, True)]
        if fix:
            masks = [CommandToken("sMASK", "[sMASK]", n, True), CommandToken("gMASK", "[gMASK]", n + 1, True)]
        cmds += masks
        n += 2
    if opts["dblock"]:
        cmds.append(CommandToken("dBLOCK", "[dBLOCK]", n))
        n += 1
    return cmds, n


def _trained_commands(text: _HFText, path: Path) -> tuple[list[CommandToken], int]:
    v = text.vocab
    eot = _require(v, "<|endoftext|>", path, "GLM byte-level BPE")
    cmds = [CommandToken("pad", "<|endoftext|>", eot), CommandToken("eos", "<|endoftext|>", eot)]
    names = [
        ("sop", "<|startofpiece|>"),
        ("eop", "<|endofpiece|>"),
        ("ENC", "[CLS]"),
        ("MASK", "[MASK]"),
        ("sep", "[SEP]"),
        ("unk", "[UNK]"),
        ("gMASK", "[gMASK]"),
        ("sMASK", "[sMASK]"),
        ("dBLOCK", "[dBLOCK]"),
    ]
    cmds += [CommandToken(name, tok, v[tok], tok in _LSTRIP_TOKENS) for name, tok in names if tok in v]
    return cmds, text.size


# ----------------------------------------------------------------------------------------------------------


class GLMTokenizer:
    """A GLM tokenizer: a library text tokenizer plus GLM's command tokens with their official ids.

    Build one with `GLMTokenizer.from_files(kind, path)` from vocab files, or `from_pretrained(dir)` from a
    directory written by `save_pretrained` (a model directory can carry its tokenizer this way).
    `encode` adds no [CLS]/eos; command strings in the text ([MASK], [gMASK], <|endoftext|>, ...) become their
    ids with the official whitespace rules (spec B.1).
    """

    def __init__(
        self,
        kind: str,
        text: _HFText | _SPText,
        commands: list[CommandToken],
        num_tokens: int,
        options: dict[str, bool],
        files: dict[str, bytes],
    ) -> None:
        self.kind = kind
        self.options = dict(options)
        self._text = text
        self._files = files
        self._num_tokens = num_tokens
        self._commands = tuple(commands)
        # Where names or strings share an id, the one declared last wins (official maps).
        self._name_to_id = {c.name: c.id for c in commands}
        self._string_to_id = {c.token: c.id for c in commands}
        self._command_ids = frozenset(c.id for c in commands)
        self._split_order = [(c.token, c.lstrip) for c in commands]
        self._strings = tuple(dict.fromkeys(c.token for c in commands))
        self._any_command = re.compile("|".join(re.escape(s) for s in self._strings))
        table: list[str | None] = [None] * num_tokens
        table[: min(num_tokens, len(text.pieces))] = text.pieces[:num_tokens]
        if kind.startswith("chinese-sp"):
            # The official Chinese tokenizer prints ids 0 and 1 from its type-token table (<str0>, <str1>), so
            # the unknown piece (id 0) reads "<str0>" in its token lists (fixtures official_factory).
            table[0], table[1] = "<str0>", "<str1>"
        for c in commands:
            table[c.id] = c.token
        # Ids inside num_tokens that no token owns (the Chinese tokenizers skip 50005) print as "<unused>" and
        # decode to it, so id -> string tables over range(num_tokens) work.
        holes = [i for i, s in enumerate(table) if s is None]
        for i in holes:
            table[i] = UNUSED_TOKEN
        self._id_to_token = table
        self._spliced_ids = self._command_ids | frozenset(holes)  # decoded from the table, not the library

    # -- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_files(
        cls,
        kind: str,
        path: str | os.PathLike,
        *,
        merges: str | os.PathLike | None = None,
        block_symbols: bool = True,
        task_mask: bool | None = None,
        dblock: bool = False,
    ) -> GLMTokenizer:
        """Build a tokenizer from vocab files.

        Args:
            kind: "bert" (WordPiece vocab.txt, uncased), "gpt2" (vocab.json + merges.txt), "roberta" (the RoBERTa
                vocab.json + merges.txt), "chinese-sp" (cog-pretrain.model, GLM-10B-Chinese ids),
                "chinese-sp-fix" (the same with --fix-command-token, GLM-Large-Chinese ids), or "bpe" (a
                tokenizer.json written by `train_tokenizer`).
            path: the vocab file, or a directory holding it under its usual name (vocab.txt, vocab.json,
                spiece.model, tokenizer.json, or the official release names such as gpt2-vocab.json).
            merges: the BPE merges file; default: next to `path`, "vocab.json" replaced by "merges.txt".
            block_symbols: add <|startofpiece|>/<|endofpiece|> (every released GLM has them).
            task_mask: add [gMASK]/[sMASK]; default as in the released models (on for GPT-2 and Chinese, off
                for BERT and RoBERTa).
            dblock: add [dBLOCK], as the pretraining runs with --block-mask-prob did (not used after).

        Returns:
            The tokenizer. `bpe` tokenizers take their command tokens from their vocabulary and ignore the
            three flags.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(KINDS)}")
        if task_mask is None:
            task_mask = block_symbols and _DEFAULT_TASK_MASK.get(kind, True)
        if (task_mask or dblock) and not block_symbols and kind != "bpe":
            raise ValueError("tokenizer options: task_mask and dblock need block_symbols=True (as in GLM)")
        opts = {"block_symbols": bool(block_symbols), "task_mask": bool(task_mask), "dblock": bool(dblock)}
        main = _find_file(kind, Path(path))
        if kind == "bert":
            data = _read(main, "BERT vocab file")
            text = _bert_text(data, main)
            commands, n = _bert_commands(text, main, opts)
            files = {"vocab.txt": data}
        elif kind in ("gpt2", "roberta"):
            merges_path = Path(merges) if merges is not None else _merges_next_to(main)
            data = _read(main, f"{kind} vocab file")
            merges_data = _read(merges_path, f"{kind} merges file (pass merges=PATH)")
            text = _bpe_text(data, main, merges_data, merges_path)
            build = _gpt2_commands if kind == "gpt2" else _roberta_commands
            commands, n = build(text, main, opts)
            files = {"vocab.json": data, "merges.txt": merges_data}
        elif kind == "bpe":
            return cls._from_tokenizer_json(_read(main, "tokenizer.json"), main)
        else:
            data = _read(main, "SentencePiece model")
            text = _sp_text(data, main)
            commands, n = _chinese_commands(text, main, opts, fix=kind == "chinese-sp-fix")
            files = {"spiece.model": data}
        return cls(kind, text, commands, n, opts, files)

    @classmethod
    def for_model(cls, model: str, vocab_dir: str | os.PathLike, pretraining: bool = False) -> GLMTokenizer:
        """The tokenizer of a released GLM, from a directory holding the official vocab files.

        Args:
            model: a released model ("glm-large", "glm-10b", "glm-10b-chinese", ...; see `OFFICIAL_MODELS`).
            vocab_dir: directory with the release files (bert-*-uncased-vocab.txt, gpt2-vocab.json +
                gpt2-merges.txt, roberta-vocab.json + roberta-merges.txt, cog-pretrain.model).
            pretraining: the flags of the model's pretraining run ([dBLOCK]; task masks for GLM-RoBERTa)
                instead of its fine-tuning and inference scripts. Ids of shared tokens are the same.

        Returns:
            The tokenizer.
        """
        key = model.lower().replace("_", "-")
        if key not in OFFICIAL_MODELS:
            raise ValueError(f"unknown GLM model {model!r}; known: {', '.join(OFFICIAL_MODELS)}")
        kind, file, finetune, pretrain = OFFICIAL_MODELS[key]
        return cls.from_files(kind, Path(vocab_dir) / file, **(pretrain if pretraining else finetune))

    @classmethod
    def from_spec(cls, spec: str | os.PathLike) -> GLMTokenizer:
        """A tokenizer named on a command line: "KIND:VOCAB_PATH" (e.g. "gpt2:gpt2-vocab.json", merges found next
        to it) or a saved tokenizer directory."""
        kind, sep, path = os.fspath(spec).partition(":")
        if sep and kind in KINDS:
            return cls.from_files(kind, path)
        if sep and not Path(spec).exists():
            raise ValueError(
                f"tokenizer {os.fspath(spec)!r}: unknown kind {kind!r}; give KIND:VOCAB_PATH with KIND one of "
                f"{', '.join(KINDS)}, or a tokenizer directory"
            )
        return cls.from_pretrained(spec)

    @classmethod
    def _from_tokenizer_json(cls, data: bytes, path: Path) -> GLMTokenizer:
        text = _tokenizer_json_text(data, path)
        commands, n = _trained_commands(text, path)
        return cls("bpe", text, commands, n, {}, {"tokenizer.json": data})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> GLMTokenizer:
        """Load a tokenizer saved by `save_pretrained` (or a model directory that carries one).

        Args:
            path: the directory.

        Returns:
            The tokenizer.
        """
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {root}")
        cfg_path = root / CONFIG_FILE
        if not cfg_path.is_file():
            raise FileNotFoundError(
                f"{root}: no {CONFIG_FILE}; not a saved openglm tokenizer (write one with "
                "GLMTokenizer.save_pretrained or `openglm tokenizer train`)"
            )
        try:
            cfg = json.loads(_utf8(cfg_path.read_bytes(), cfg_path))
        except json.JSONDecodeError as err:
            raise ValueError(f"{cfg_path}: malformed JSON: {err}") from None
        if isinstance(cfg, dict) and "format" not in cfg and "tokenizer_class" in cfg:
            return _from_hf_directory(root, cfg["tokenizer_class"], cfg_path)
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
            raise ValueError(f'{cfg_path}: not an openglm tokenizer config (no "format": "{FORMAT}")')
        unknown = sorted(set(cfg) - _CONFIG_FIELDS)
        if unknown:
            raise ValueError(f"{cfg_path}: unknown field(s) {unknown}; expected {sorted(_CONFIG_FIELDS)}")
        version = cfg.get("version", VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version != VERSION:
            newer = isinstance(version, int) and not isinstance(version, bool) and version > VERSION
            raise ValueError(
                f"{cfg_path}: version {version!r} "
                + ("is newer than this openglm reads" if newer else "is not a tokenizer config version")
                + f" (it reads version {VERSION})"
            )
        kind = cfg.get("kind")
        if kind not in KINDS:
            raise ValueError(
                f"{cfg_path}: unknown tokenizer kind {kind!r}; expected one of {', '.join(KINDS)}"
            )
        options = cfg.get("options", {})
        if not isinstance(options, dict) or set(options) - {"block_symbols", "task_mask", "dblock"}:
            raise ValueError(f"{cfg_path}: field 'options' must hold only block_symbols, task_mask, dblock")
        for name, value in options.items():
            if not isinstance(value, bool):
                raise ValueError(f"{cfg_path}: options.{name} must be true or false, got {value!r}")
        names = _SAVED_FILES[kind]
        merges = root / names[1] if len(names) > 1 else None
        tok = cls.from_files(kind, root / names[0], merges=merges, **options)
        tok._check_saved(cfg, cfg_path)
        return tok

    def _check_saved(self, cfg: dict[str, Any], cfg_path: Path) -> None:
        """The sizes and command tokens in the config are derived from the vocabulary files when saving; a
        config that disagrees was edited or sits next to other files, and would not mean what it says."""
        for name, actual in (("num_tokens", self.num_tokens), ("vocab_size", self.vocab_size)):
            value = cfg.get(name, actual)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{cfg_path}: field {name!r} must be an integer, got {value!r}")
            if value != actual:
                raise ValueError(
                    f"{cfg_path}: {name}={value} but the vocabulary files give {actual}; the config does not "
                    "belong to these files"
                )
        if "command_tokens" not in cfg:
            return
        saved = cfg["command_tokens"]
        fields = [f.name for f in dataclasses.fields(CommandToken)]
        if not isinstance(saved, list) or not all(
            isinstance(c, dict) and set(c) == set(fields) for c in saved
        ):
            raise ValueError(
                f"{cfg_path}: field 'command_tokens' must be a list of objects with the keys "
                f"{', '.join(fields)}"
            )
        expected = [asdict(c) for c in self._commands]
        if saved != expected:
            first = next(
                (
                    f"{e['name']} should be {e['token']!r} with id {e['id']}"
                    for e in expected
                    if e not in saved
                ),
                f"there are {len(expected)} command tokens, not {len(saved)}",
            )
            raise ValueError(
                f"{cfg_path}: field 'command_tokens' does not match the vocabulary files ({first}); command ids "
                "come from the vocabulary and cannot be changed here"
            )

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the vocab files and tokenizer_config.json into a directory (created if needed).

        Each file is written to a temporary name and renamed; the config goes last, so a directory is never
        loadable with a half-written vocabulary. Other files in the directory (a model's) are left alone.

        Args:
            path: the directory.
        """
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        for name, data in self._files.items():
            write_bytes_atomic(root / name, data)
        cfg = {
            "format": FORMAT,
            "version": VERSION,
            "kind": self.kind,
            "options": self.options,
            "num_tokens": self.num_tokens,
            "vocab_size": self.vocab_size,
            "command_tokens": [asdict(c) for c in self._commands],
        }
        write_bytes_atomic(
            root / CONFIG_FILE, (json.dumps(cfg, indent=1, ensure_ascii=False) + "\n").encode()
        )

    # -- encoding -----------------------------------------------------------------------------------------

    def _split(self, text: str) -> list[str | int]:
        """Split text on the command strings in declaration order (spec B.1): fragments stay strings, command
        tokens become ids. Whitespace directly before an lstrip token is dropped; fragments are not stripped
        otherwise, so " x [SEP]" keeps the space before [SEP] as a token of its own."""
        if not text.strip():
            return []
        if self._any_command.search(text) is None:
            return [text]
        parts: list[str | int] = [text]
        for token, lstrip in self._split_order:
            cmd_id = self._string_to_id[token]
            out: list[str | int] = []
            for part in parts:
                if isinstance(part, int) or token not in part:
                    out.append(part)
                    continue
                pieces = part.split(token)
                last = len(pieces) - 1
                for i, piece in enumerate(pieces):
                    if lstrip and i < last:
                        piece = piece.rstrip()
                    if piece:
                        out.append(piece)
                    if i < last:
                        out.append(cmd_id)
            parts = out
        return parts

    def encode(self, text: str | bytes) -> list[int]:
        """Token ids of one text, without [CLS]/eos.

        Args:
            text: the text (bytes are decoded as UTF-8; invalid bytes raise ValueError with their offset).

        Returns:
            The ids.
        """
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Iterable[str | bytes]) -> list[list[int]]:
        """Token ids of many texts through the library's batch path (Rust threads / SentencePiece threads).

        Args:
            texts: the texts.

        Returns:
            One id list per text, equal to `encode` of each.
        """
        texts = list(texts)
        splits = [self._split(_as_text(t, i)) for i, t in enumerate(texts)]
        fragments = [p for parts in splits for p in parts if isinstance(p, str)]
        try:
            encoded = iter(self._text.encode_batch(fragments) if fragments else [])
        except (UnicodeEncodeError, TypeError):  # tokenizers raises TypeError for lone surrogates
            _raise_bad_unicode(texts)
            raise
        result = []
        for parts in splits:
            if len(parts) == 1 and isinstance(parts[0], str):
                result.append(list(next(encoded)))
                continue
            ids: list[int] = []
            for p in parts:
                if isinstance(p, int):
                    ids.append(p)
                else:
                    ids.extend(next(encoded))
            result.append(ids)
        return result

    # -- decoding -----------------------------------------------------------------------------------------

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> list[str] | str:
        """Vocabulary strings of ids, as the official `IdToToken` prints them.

        Args:
            ids: one id or a sequence (list, numpy array, tensor).

        Returns:
            The raw strings: 'Ġ' byte-level forms for GPT-2/RoBERTa/BPE, '##' continuations for BERT, '▁'
            pieces for SentencePiece, the command string for command ids (the last one declared on a shared
            id: RoBERTa 2 is "[SEP]", GLM-10B-Chinese 50007 is "[gMASK]"). A single id gives a single string.
        """
        if isinstance(ids, int) or (hasattr(ids, "ndim") and ids.ndim == 0):
            return self._token(int(ids))
        return [self._token(i) for i in _id_list(ids)]

    def _token(self, i: int) -> str:
        s = self._id_to_token[i] if 0 <= i < self._num_tokens else None
        if s is None:
            raise ValueError(
                f"token id {i} is not in this {self.kind} tokenizer (num_tokens {self._num_tokens})"
            )
        return s

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids, as the official `DecodeIds` gives it.

        BERT joins word pieces with spaces and glues '##' continuations on. The others decode each run of text
        ids with the library and put the command strings in between, unspaced (so "in [MASK]" -> "in[MASK]").

        Args:
            ids: token ids (list, numpy array or tensor).

        Returns:
            The text.
        """
        ids = _id_list(ids)
        if self.kind == "bert":
            words: list[str] = []
            for token in self.convert_ids_to_tokens(ids):
                if token.startswith("##") and words:
                    words[-1] += token[2:]
                else:
                    words.append(token)
            return " ".join(words)
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._spliced_ids:
                if run:
                    out.append(self._text.decode(run))
                    run = []
                out.append(self._id_to_token[i])
            else:
                self._token(i)  # range check with a clear error
                run.append(i)
        if run:
            out.append(self._text.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        """Id of a command string or vocabulary entry, or None when the tokenizer has no such token."""
        if token in self._string_to_id:
            return self._string_to_id[token]
        return self._text.piece_to_id(token)

    # -- ids and sizes ------------------------------------------------------------------------------------

    @property
    def command_tokens(self) -> tuple[CommandToken, ...]:
        """The command tokens in declaration order (the order text is split in)."""
        return self._commands

    def command_id(self, name: str) -> int | None:
        """Id of an official command name (pad, eos, ENC, sep, MASK, unk, sop, eop, gMASK, sMASK, dBLOCK)."""
        return self._name_to_id.get(name)

    @property
    def pad_id(self) -> int | None:
        return self._name_to_id.get("pad")

    @property
    def eos_id(self) -> int | None:
        return self._name_to_id.get("eos")

    @property
    def cls_id(self) -> int | None:
        return self._name_to_id.get("ENC")

    @property
    def sep_id(self) -> int | None:
        return self._name_to_id.get("sep")

    @property
    def mask_id(self) -> int | None:
        return self._name_to_id.get("MASK")

    @property
    def unk_id(self) -> int | None:
        return self._name_to_id.get("unk")

    @property
    def sop_id(self) -> int | None:
        return self._name_to_id.get("sop")

    @property
    def eop_id(self) -> int | None:
        return self._name_to_id.get("eop")

    @property
    def gmask_id(self) -> int | None:
        return self._name_to_id.get("gMASK")

    @property
    def smask_id(self) -> int | None:
        return self._name_to_id.get("sMASK")

    @property
    def dblock_id(self) -> int | None:
        return self._name_to_id.get("dBLOCK")

    @property
    def num_tokens(self) -> int:
        """Text vocabulary plus command tokens (unpadded; the official `num_tokens`)."""
        return self._num_tokens

    @property
    def vocab_size(self) -> int:
        """`num_tokens` padded to a multiple of 128: the model's embedding rows (spec B.6)."""
        return pad_vocab_size(self._num_tokens, 128)

    def __len__(self) -> int:
        return self._num_tokens

    def __repr__(self) -> str:
        return f"GLMTokenizer(kind={self.kind!r}, num_tokens={self.num_tokens}, options={self.options})"


def _from_hf_directory(root: Path, tokenizer_class: Any, cfg_path: Path) -> GLMTokenizer:
    """A Hugging Face GLM directory's tokenizer, rebuilt from its `tokenizer_class` and vocab file as
    `openglm convert` does (with the official ids of the released model that has the directory's config)."""
    from openglm.config import GLMConfig
    from openglm.convert import HF_TOKENIZERS, hf_tokenizer

    if tokenizer_class not in HF_TOKENIZERS:
        raise ValueError(
            f"{cfg_path}: tokenizer_class {tokenizer_class!r} is not a GLM tokenizer "
            f"({', '.join(HF_TOKENIZERS)}); not a tokenizer openglm can load"
        )
    config = GLMConfig.from_file(root) if (root / "config.json").is_file() else None
    return hf_tokenizer(root, tokenizer_class, config, cfg_path)


def _find_file(kind: str, path: Path) -> Path:
    if not path.is_dir():
        return path
    for name in _SAVED_FILES[kind][:1] + _OFFICIAL_NAMES[kind]:
        if (path / name).is_file():
            return path / name
    wanted = ", ".join(_SAVED_FILES[kind][:1] + _OFFICIAL_NAMES[kind])
    raise FileNotFoundError(f"{path}: no {kind} vocab file in this directory (looked for {wanted})")


def _merges_next_to(vocab: Path) -> Path:
    name = vocab.name
    if name.endswith("vocab.json"):
        return vocab.with_name(name[: -len("vocab.json")] + "merges.txt")
    return vocab.with_name("merges.txt")


def _as_text(text: str | bytes, index: int) -> str:
    if isinstance(text, str):
        return text
    if isinstance(text, bytes | bytearray):
        return _utf8(bytes(text), f"text {index}")
    raise TypeError(f"text {index}: expected str or bytes, got {type(text).__name__}")


def _raise_bad_unicode(texts: Sequence[str | bytes]) -> None:
    for i, t in enumerate(texts):
        if isinstance(t, str):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError(
                    f"text {i}: not encodable as UTF-8 at character offset {err.start} "
                    f"(lone surrogate U+{ord(t[err.start]):04X}; was it read with errors='surrogateescape'?)"
                ) from None


def _id_list(ids: Iterable[int]) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]
