"""Checkpoint formats (spec F): ours (config.json + safetensors), Hugging Face GLM directories, and official
Megatron/DeepSpeed directories including model-parallel shards, merged as the official `change_mp.py` splits.

The model keeps the official parameter names, so the only "key map" is prefix handling; the model-parallel
merge rules below are the one place that knows how official shards were split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from openglm.atomic import replace_directory
from openglm.config import GLMConfig

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# The weight dtypes a converted or loaded model may be cast to (`--dtype`).
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MP_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt$")
_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SHARD_FILE = re.compile(r"-\d+-of-\d+\.(safetensors|bin)$")
# Prefixes that wrappers put in front of the backbone keys: DDP/DeepSpeed `module.`, HF heads `glm.`,
# official classification wrappers `model.`.
_PREFIXES = ("module.", "glm.", "model.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and, where it applies, the key."""


# --------------------------------------------------------------------------------------------------------
# Reading files
def _file_kind(path: Path) -> str:
    """'safetensors', 'torch' (zip archive or legacy pickle) or 'other', from the first bytes of the file."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save's zip archive; a pickle's PROTO opcode
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":  # an 8-byte header length, then the JSON header
        return "safetensors"
    return "other"


def _torch_load(path: Path) -> object:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if _file_kind(path) != "torch":
        raise CheckpointError(f"{path}: not a checkpoint (neither a PyTorch file nor safetensors)")
    try:
        # Official checkpoints may pickle the argparse namespace of the run; that class is plain data.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch words every refusal the same way; only an unsupported global means "code would run".
        detail = re.search(r"Unsupported (?:global|class):? (?:GLOBAL )?(\S+)", str(err))
        if detail is None:
            raise CheckpointError(f"{path}: not a checkpoint (the data in it cannot be unpickled)") from None
        raise CheckpointError(
            f"{path}: refused to load: the file needs pickled code to be executed ({detail.group(1)}); "
            "re-save it as a plain state dict or safetensors"
        ) from None
    except Exception as err:  # the unpickler raises anything (KeyError, ValueError, ...) on damaged files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: cannot read the checkpoint ({first}); is it truncated?") from None


def _safetensors_load(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read safetensors ({err}); is it truncated?") from None


def _state_from_pickle(obj: object, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, Mapping) and "module" in obj and isinstance(obj["module"], Mapping):
        obj = obj["module"]
    elif isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (or {{'module': state_dict}})")
    return dict(obj)


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            backbone = [k for k in state if k.startswith(prefix)]
            if (
                backbone
                and len(backbone) >= len(state) // 2
                and any(k[len(prefix) :].startswith(("word_embeddings", "transformer.")) for k in backbone)
            ):
                state = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}
                changed = True
    return state


# --------------------------------------------------------------------------------------------------------
# Model parallelism (spec F.3)
def _split_kind(key: str) -> str:
    """How `change_mp.py` split a key: 'qkv' (per-rank [Q;K;V] thirds), 'rows', 'cols' or 'replicated'."""
    if "position" in key:
        return "replicated"
    if "query_key_value" in key:
        return "qkv"
    if key == "word_embeddings.weight" or "dense_h_to_4h" in key:
        return "rows"
    if key.endswith("weight") and ("attention.dense" in key or "dense_4h_to_h" in key):
        return "cols"
    return "replicated"


def merge_model_parallel(shards: list[dict[str, Tensor]], source: str = "shards") -> dict[str, Tensor]:
    """Merge official model-parallel shards (rank order) into one MP=1 state dict."""
    if len(shards) == 1:
        return dict(shards[0])
    keys = list(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(keys):
            diff = sorted(set(shard) ^ set(keys))
            raise CheckpointError(f"{source}: rank {rank} has different keys from rank 0 (e.g. {diff[0]!r})")
    merged: dict[str, Tensor] = {}
    for key in keys:
        parts = [s[key] for s in shards]
        kind = _split_kind(key)
        if kind == "rows":
            merged[key] = torch.cat(parts, dim=0)
        elif kind == "cols":
            merged[key] = torch.cat(parts, dim=1)
        elif kind == "qkv":
            thirds = [p.chunk(3, dim=0) for p in parts]  # per rank: (Q_r, K_r, V_r)
            merged[key] = torch.cat([t[i] for i in range(3) for t in thirds], dim=0)
        else:
            merged[key] = parts[0]
    return merged


def _official_shard_files(path: Path) -> list[Path]:
    if path.is_file():
        if _MP_FILE.search(path.name) and path.name.startswith("mp_rank_00"):
            path = path.parent
        else:
            return [path]
    tracker = next(
        (path / n for n in ("latest_checkpointed_iteration.txt", "latest") if (path / n).is_file()), None
    )
    folder = path
    if tracker is not None:
        tag = tracker.read_text().strip()
        folder = path / tag
        if not folder.is_dir() and tag.isdigit():
            folder = path / f"iter_{int(tag):07d}"
        if not folder.is_dir():
            raise CheckpointError(f"{tracker}: names checkpoint {tag!r} but {path / tag} does not exist")
    files = sorted(
        (p for p in folder.iterdir() if _MP_FILE.search(p.name)),
        key=lambda p: int(_MP_FILE.search(p.name).group(1)),
    )
    if not files:
        raise CheckpointError(f"{folder}: no mp_rank_XX_model_states.pt files")
    ranks = [int(_MP_FILE.search(p.name).group(1)) for p in files]
    if ranks != list(range(len(ranks))):
        raise CheckpointError(f"{folder}: model-parallel ranks {ranks} are not 0..{len(ranks) - 1}")
    return files


# --------------------------------------------------------------------------------------------------------
def _has_official_markers(path: Path) -> bool:
    """A tracker file or mp_rank files, and none of the weight files of the other layouts."""
    if any((path / n).is_file() for n in (WEIGHTS_NAME, "pytorch_model.bin", *_INDEX_NAMES)):
        return False
    return any((path / n).is_file() for n in ("latest_checkpointed_iteration.txt", "latest")) or any(
        _MP_FILE.search(p.name) for p in path.iterdir()
    )


def _read_config_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def detect_format(path: Path) -> str:
    """'openglm', 'hf' or 'official' for a checkpoint path.

    The official layout is recognised first: its directory may also hold a config.json (the one to use).
    """
    if path.is_file():
        if _file_kind(path) == "other":
            raise CheckpointError(f"{path}: not a checkpoint (neither a PyTorch file nor safetensors)")
        return "official" if path.suffix in (".pt", ".bin", ".pth") else "openglm"
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    if _has_official_markers(path):
        return "official"
    if (path / CONFIG_NAME).is_file():
        data = _read_config_json(path / CONFIG_NAME)
        return "openglm" if data.get("model_type") == "openglm" else "hf"
    raise CheckpointError(
        f"{path}: not a GLM checkpoint (no config.json, no latest_checkpointed_iteration.txt, no mp_rank files)"
    )


def _hf_weight_files(path: Path) -> list[Path]:
    for index_name in _INDEX_NAMES:
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as err:
                raise CheckpointError(f"{index}: malformed index ({err})") from None
            return [path / name for name in sorted(set(weight_map.values()))]
    for name in (WEIGHTS_NAME, "pytorch_model.bin"):
        if (path / name).is_file():
            return [path / name]
    found = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not found:
        raise CheckpointError(f"{path}: no weights (model.safetensors, pytorch_model.bin or *.safetensors)")
    if len(found) == 1 or all(_SHARD_FILE.search(p.name) for p in found):
        return found
    # Other tensors can sit next to the weights (inputs, expected outputs): take the file named as weights.
    named = [p for p in found if re.search(r"model|weights", p.stem)]
    if len(named) == 1:
        return named
    raise CheckpointError(
        f"{path}: several weight files and no index ({', '.join(p.name for p in found)}); "
        f"name the weights {WEIGHTS_NAME} or add model.safetensors.index.json"
    )


def _read_weights(files: list[Path]) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for f in files:
        is_safetensors = f.suffix == ".safetensors" or (f.is_file() and _file_kind(f) == "safetensors")
        part = _safetensors_load(f) if is_safetensors else _state_from_pickle(_torch_load(f), f)
        state.update(part)
    return state


_CONFIG_HINT = (
    "pass --model_config on the command line or config= in Python (a preset name such as glm-large, or a "
    "config.json path)"
)


def load_checkpoint(
    path: Path, config: GLMConfig | str | os.PathLike | None = None
) -> tuple[GLMConfig, dict[str, Tensor]]:
    """Read any supported checkpoint layout into (config, MP=1 state dict with official key names).

    An official checkpoint takes `config`, else the config.json in its directory.
    """
    fmt = detect_format(path)
    if fmt == "official":
        beside = (path if path.is_dir() else path.parent) / CONFIG_NAME
        if config is None and beside.is_file():
            config = beside
        if config is None:
            raise CheckpointError(
                f"{path}: official checkpoints carry no config; put a config.json next to it or {_CONFIG_HINT}"
            )
        cfg = GLMConfig.resolve(config)
        files = _official_shard_files(path)
        shards = [_strip_prefixes(_state_from_pickle(_torch_load(f), f)) for f in files]
        return cfg, merge_model_parallel(shards, source=str(files[0].parent))
    if path.is_file():
        if config is None:
            raise CheckpointError(f"{path}: a bare weights file carries no config; {_CONFIG_HINT}")
        cfg = GLMConfig.resolve(config)
        return cfg, _strip_prefixes(_read_weights([path]))
    cfg = GLMConfig.resolve(config) if config is not None else GLMConfig.from_file(path / CONFIG_NAME)
    return cfg, _strip_prefixes(_read_weights(_hf_weight_files(path)))


def _check_values(key: str, value: Tensor, target: Tensor, source: str) -> None:
    """Refuse integer weights (copying would cast them silently) and NaN/inf (the model would emit garbage)."""
    if target.is_floating_point() and not value.is_floating_point():
        raise CheckpointError(f"{source}: {key!r} has dtype {value.dtype}; expected floating-point weights")
    if not value.is_floating_point() or value.numel() == 0:
        return
    # One float32 sum per tensor is cheap and is finite whenever every element is; only a sum that is not
    # (NaN/inf inside, or an overflow of huge finite values) needs the element-wise test.
    if torch.isfinite(value.sum(dtype=torch.float32)) or bool(torch.isfinite(value).all()):
        return
    bad = int((~torch.isfinite(value)).sum())
    raise CheckpointError(f"{source}: {key!r} holds {bad} NaN/inf value(s); the checkpoint is damaged")


def apply_state_dict(model: torch.nn.Module, state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Copy `state` into `model`, with one-line errors for unknown/missing keys and shape mismatches.

    Position tables saved with fewer rows than the model has are copied into the first rows and the rest keep
    their fresh init (the official load-time extension, spec F.4).
    """
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown and all(k.startswith((*_HEAD_PREFIXES, _PROMPT_PREFIX)) for k in unknown):
        what = "a prompt encoder" if unknown[0].startswith(_PROMPT_PREFIX) else "a classifier head"
        raise CheckpointError(
            f"{source}: holds {what} besides the GLM ({unknown[0]!r}); `openglm convert` it into a fine-tuned "
            "directory first"
        )
    if unknown:
        raise CheckpointError(
            f"{source}: unknown key {unknown[0]!r}"
            + (f" (+{len(unknown) - 1} more)" if len(unknown) > 1 else "")
        )
    missing = sorted(set(own) - set(state))
    if missing:
        raise CheckpointError(
            f"{source}: missing key {missing[0]!r}"
            + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    for key, value in state.items():
        _check_values(key, value, own[key], source)
    with torch.no_grad():
        for key, value in state.items():
            target = own[key]
            if value.shape == target.shape:
                target.copy_(value)
            elif (
                "position_embeddings" in key
                and value.dim() == 2
                and value.shape[1] == target.shape[1]
                and value.shape[0] < target.shape[0]
            ):
                log.warning(
                    "%s: %s has %d rows, model has %d; extra rows keep their init",
                    source,
                    key,
                    value.shape[0],
                    target.shape[0],
                )
                target[: value.shape[0]].copy_(value)
            else:
                raise CheckpointError(
                    f"{source}: shape mismatch for {key!r}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}"
                )


def save_checkpoint(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Write `model.safetensors` and `config.json` into `directory`, each through a temp file and a rename.

    LoRA adapters are merged into the weights they adapt, so the directory always holds a plain GLM.
    """
    from openglm.lora import merged_state_dict

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in merged_state_dict(model).items()}
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / WEIGHTS_NAME)
    model.config.save(directory / CONFIG_NAME)


# Fine-tuned checkpoints (spec F.2): a classifier head next to a `model.`-prefixed backbone, or a P-tuning
# prompt encoder (`prompt_spell.*`) next to the backbone's own keys. Our directories keep them in side files.
_HEAD_PREFIXES = ("pool_layer.", "multichoice_head.")
_PROMPT_PREFIX = "prompt_spell."
_PROMPT_NAMES = (("embeddings.", "spell_embeddings."), ("lstm.", "lstm_head."), ("mlp.", "mlp_head."))


def prompt_keys_to_official(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our `PromptEncoder` keys (embeddings / lstm / mlp) as the official `prompt_spell.*` keys."""
    out = {}
    for key, value in state.items():
        ours, theirs = next((o, t) for o, t in _PROMPT_NAMES if key.startswith(o))
        out[_PROMPT_PREFIX + theirs + key[len(ours) :]] = value
    return out


def _prompt_keys_from_official(state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        rest = key[len(_PROMPT_PREFIX) :]
        match = next(((o, t) for o, t in _PROMPT_NAMES if rest.startswith(t)), None)
        if match is None:
            raise CheckpointError(f"{source}: unknown prompt encoder key {key!r}")
        out[match[0] + rest[len(match[1]) :]] = value
    return out


@dataclasses.dataclass
class FineTunedParts:
    """What a checkpoint holds beyond the GLM: a classifier head (official names) and/or a prompt encoder
    (our `PromptEncoder` names, with its settings)."""

    head: dict[str, Tensor]
    prompt: dict[str, Tensor]
    pool_token: str = "cls"
    head_dropout: float | None = None  # None: the backbone's output dropout, as the official head has
    prefix_tokens: int = 0

    @property
    def prompt_encoder(self) -> str:
        if any(k.startswith("lstm.") for k in self.prompt):
            return "lstm"
        return "mlp" if any(k.startswith("mlp.") for k in self.prompt) else "none"


def split_fine_tuned(
    state: dict[str, Tensor], path: Path, source: str
) -> tuple[dict[str, Tensor], FineTunedParts]:
    """Take a classifier head and a prompt encoder out of a state dict (official / Hugging Face keys), or read
    them from our directory's side files; returns the GLM's own state and the parts."""
    from openglm.ptuning import PROMPT_WEIGHTS, prompt_settings
    from openglm.tasks.classifier import HEAD_CONFIG, HEAD_WEIGHTS

    head = {k: state.pop(k) for k in list(state) if k.startswith(_HEAD_PREFIXES)}
    prompt = _prompt_keys_from_official(
        {k: state.pop(k) for k in list(state) if k.startswith(_PROMPT_PREFIX)}, source
    )
    parts = FineTunedParts(head, prompt)
    folder = path if path.is_dir() else path.parent
    if (folder / HEAD_CONFIG).is_file():  # ours
        meta = _read_config_json(folder / HEAD_CONFIG)
        parts.head, parts.pool_token = _safetensors_load(folder / HEAD_WEIGHTS), meta.get("pool_token", "cls")
        parts.head_dropout = meta.get("dropout")
    elif parts.head and (folder / CONFIG_NAME).is_file():  # a Hugging Face config names the pool token
        pool = _read_config_json(folder / CONFIG_NAME).get("pool_token")
        parts.pool_token = pool if isinstance(pool, str) else "cls"
    settings = prompt_settings(folder)
    if settings is not None:  # ours
        parts.prompt, parts.prefix_tokens = (
            _safetensors_load(folder / PROMPT_WEIGHTS),
            settings["prefix_tokens"],
        )
    if parts.head and parts.prompt:
        raise CheckpointError(
            f"{source}: holds both a classifier head and a prompt encoder; one of them only"
        )
    if parts.head and set(parts.head) != {f"{p}{w}" for p in _HEAD_PREFIXES for w in ("weight", "bias")}:
        raise CheckpointError(f"{source}: an incomplete classifier head ({', '.join(sorted(parts.head))})")
    return state, parts


def save_fine_tuned(model: torch.nn.Module, parts: FineTunedParts, directory: Path) -> None:
    """Write the GLM and its parts as our directories hold them: a classifier-head directory, a P-tuning
    directory, or a plain model directory."""
    from openglm.ptuning import GLMWithPrompts, PromptEncoder
    from openglm.tasks.classifier import GLMForSequenceClassification

    if parts.head:
        classes = parts.head["multichoice_head.weight"].shape[0]
        wrapped = GLMForSequenceClassification(model, classes, parts.pool_token, parts.head_dropout)
        apply_state_dict(wrapped, {**{f"model.{k}": v for k, v in model.state_dict().items()}, **parts.head})
        wrapped.save_pretrained(directory)
    elif parts.prompt:
        rows, width = parts.prompt["embeddings.weight"].shape
        encoder = PromptEncoder(rows, width, parts.prompt_encoder)
        apply_state_dict(encoder, parts.prompt, source="prompt encoder")
        GLMWithPrompts(
            model, encoder.to(next(model.parameters()).dtype), parts.prefix_tokens
        ).save_pretrained(directory)
    else:
        save_checkpoint(model, directory)


# Hugging Face hub GLM tokenizer classes (`tokenizer_class` in tokenizer_config.json) -> our kind, vocab file.
HF_TOKENIZERS = {
    "GLMBertTokenizer": ("bert", "vocab.txt"),
    "GLMGPT2Tokenizer": ("gpt2", "vocab.json"),
    "GLMRobertaTokenizer": ("roberta", "vocab.json"),
    "GLMChineseTokenizer": ("chinese-sp", "cog-pretrain.model"),
}


def released_model(config: GLMConfig, kind: str = "") -> str | None:
    """The released GLM whose architecture `config` has (layers, width, heads, positions) and whose tokenizer
    kind starts with `kind`, if any."""
    from openglm.tokenizer import OFFICIAL_MODELS

    shape = (config.num_layers, config.hidden_size, config.num_attention_heads, config.max_sequence_length)
    for name, (tokenizer_kind, *_) in OFFICIAL_MODELS.items():
        if not tokenizer_kind.startswith(kind):
            continue
        try:
            preset = GLMConfig.from_name(name)
        except (KeyError, ValueError):
            continue
        if (
            preset.num_layers,
            preset.hidden_size,
            preset.num_attention_heads,
            preset.max_sequence_length,
        ) == shape:
            return name
    return None


def hf_tokenizer(src: Path, tokenizer_class: str, config: GLMConfig | None, settings: Path):
    """The GLM tokenizer a Hugging Face directory names by `tokenizer_class` (one of `HF_TOKENIZERS`), with
    the official ids of the released model that has `config`'s architecture, if any."""
    from openglm.tokenizer import OFFICIAL_MODELS, GLMTokenizer

    kind, file = HF_TOKENIZERS[tokenizer_class]
    options: dict[str, bool] = {}
    name = released_model(config, kind) if config is not None else None
    if name is not None:
        kind, _, options, _ = OFFICIAL_MODELS[name]
    if not (src / file).is_file():
        raise CheckpointError(f"{settings} names {tokenizer_class}, but {src / file} is missing")
    return GLMTokenizer.from_files(kind, src / file, **options)


def find_tokenizer(src: Path, config: GLMConfig | None):
    """The tokenizer a checkpoint directory carries, or None: an openglm tokenizer, or a Hugging Face GLM one
    (its `tokenizer_class` and vocab file), built with the official ids of the released model that has this
    architecture (GLM-Large-Chinese's fixed command ids, for example)."""
    from openglm.tokenizer import GLMTokenizer

    settings = src / "tokenizer_config.json" if src.is_dir() else None
    if settings is None or not settings.is_file():
        return None
    try:
        meta = json.loads(settings.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{settings}: malformed JSON: {err}") from None
    if isinstance(meta, dict) and meta.get("format") is not None:
        return GLMTokenizer.from_pretrained(src)  # our own format
    cls = meta.get("tokenizer_class") if isinstance(meta, dict) else None
    if cls not in HF_TOKENIZERS:
        log.warning("%s: tokenizer_class %r is not a GLM tokenizer; no tokenizer converted", settings, cls)
        return None
    return hf_tokenizer(src, cls, config, settings)


def _load_fine_tuned(src: str, model_config: str | None, dtype: str | None):
    """The GLM of any checkpoint plus what it holds beyond it (`FineTunedParts`), cast to `dtype`."""
    from openglm.model import GLMModel

    config, state = load_checkpoint(Path(src), model_config)
    state, parts = split_fine_tuned(state, Path(src), src)
    model = GLMModel(config)
    apply_state_dict(model, state, source=src)
    if dtype:
        cast = WEIGHT_DTYPES[dtype]
        model = model.to(cast)
        parts.head = {k: v.to(cast) for k, v in parts.head.items()}
        parts.prompt = {k: v.to(cast) for k, v in parts.prompt.items()}
    return model, parts


def _check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"{dst}: exists and is not a directory; name a new output directory")
    if dst.is_dir() and any(dst.iterdir()):
        if not overwrite:
            raise ValueError(f"{dst}: the output directory is not empty; pass --overwrite true to replace it")
        source, target = src.resolve(), dst.resolve()
        if target == source or target in source.parents:
            raise ValueError(f"{dst}: replacing it would delete the source checkpoint {src}")


def convert(
    src: str,
    dst: str,
    model_config: str | None = None,
    dtype: str | None = None,
    tokenizer: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert an official (any MP size) or Hugging Face GLM checkpoint into an openglm directory.

    The tokenizer travels with the weights, so that the directory works on its own (`openglm infill DIR`):
    a Hugging Face directory's GLM tokenizer is converted with the official ids, or `tokenizer` names one.
    A fine-tuned checkpoint's classifier head or P-tuning prompt encoder (official key names, spec F.2) makes
    the output a classifier or P-tuning directory, which `openglm eval` reads.

    Args:
        src: checkpoint directory (official: holds latest_checkpointed_iteration.txt, and may hold the
            config.json; HF: config.json + weights).
        dst: output directory (config.json + model.safetensors, and the tokenizer's files); it must not
            exist or be empty, unless `overwrite`.
        model_config: for official checkpoints without a config.json, a preset name (e.g. glm-large) or a
            config.json path; for the others, it replaces their config.
        dtype: optional dtype of the saved weights: float32, bfloat16 or float16.
        tokenizer: "KIND:VOCAB_PATH" (e.g. bert:bert-large-uncased-vocab.txt; official checkpoints carry no
            vocab) or a saved tokenizer directory; default: the one found in `src`, if any.
        overwrite: replace a non-empty `dst` (the new directory is written completely before it takes the
            old one's place, so a failed conversion keeps the old one).

    Returns:
        The output directory.
    """
    from openglm.tokenizer import GLMTokenizer

    if dtype is not None and dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {list(WEIGHT_DTYPES)}")
    _check_destination(Path(src), Path(dst), overwrite)
    model, parts = _load_fine_tuned(src, model_config, dtype)
    tok = GLMTokenizer.from_spec(tokenizer) if tokenizer else find_tokenizer(Path(src), model.config)
    if tok is not None and tok.num_tokens > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tok.num_tokens} tokens but the model only {model.config.vocab_size} embedding rows"
        )

    def write(directory: Path) -> None:
        save_fine_tuned(model, parts, directory)
        if tok is not None:
            tok.save_pretrained(directory)

    replace_directory(dst, write)
    if tok is None:
        log.warning(
            "%s carries no tokenizer: %s holds the model only (add one with --tokenizer KIND:VOCAB_PATH)",
            src,
            dst,
        )
    return Path(dst)


# --------------------------------------------------------------------------------------------------------
# Export: back to the official layout (any MP size) or a Hugging Face GLM directory
EXPORT_FORMATS = ("official", "hf")
_OFFICIAL_TAG = "release"  # what the released checkpoints' latest_checkpointed_iteration.txt holds


def split_model_parallel(
    state: Mapping[str, Tensor], parts: int, source: str = "model"
) -> list[dict[str, Tensor]]:
    """Split an MP=1 state dict into `parts` official model-parallel shards (the inverse of
    `merge_model_parallel`, as `change_mp.py` splits). Each shard holds its own copies, so that a saved
    shard does not carry the whole tensor it was cut from."""
    if parts < 1:
        raise ValueError(f"model_parallel={parts}: must be >= 1")
    shards: list[dict[str, Tensor]] = [{} for _ in range(parts)]
    for key, value in state.items():
        kind = _split_kind(key)
        dim = 1 if kind == "cols" else 0
        if kind != "replicated" and value.shape[dim] % (3 * parts if kind == "qkv" else parts):
            raise ValueError(
                f"{source}: model_parallel={parts} does not divide {key!r} (dimension {dim} has "
                f"{value.shape[dim]} {'rows of Q, K and V' if kind == 'qkv' else 'entries'})"
            )
        if kind == "qkv":
            q, k, v = (t.chunk(parts, dim=0) for t in value.chunk(3, dim=0))  # each: parts x [C/parts, ...]
            pieces = [torch.cat([q[r], k[r], v[r]], dim=0) for r in range(parts)]
        elif kind in ("rows", "cols"):
            pieces = list(value.chunk(parts, dim=dim))
        else:
            pieces = [value] * parts
        for shard, piece in zip(shards, pieces, strict=True):
            shard[key] = piece.clone() if kind != "replicated" else piece
    return shards


def hf_config_dict(config: GLMConfig, dtype: torch.dtype) -> dict:
    """The `config.json` of a Hugging Face hub GLM directory (spec F.5) for `config`."""
    return {
        "architectures": ["GLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_glm.GLMConfig",
            "AutoModel": "modeling_glm.GLMModel",
            "AutoModelForSeq2SeqLM": "modeling_glm.GLMForConditionalGeneration",
            "AutoModelForMultipleChoice": "modeling_glm.GLMForMultipleChoice",
        },
        "model_type": "glm",
        "num_layers": config.num_layers,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "embedding_dropout_prob": config.embedding_dropout_prob,
        "attention_dropout_prob": config.attention_dropout_prob,
        "output_dropout_prob": config.output_dropout_prob,
        "max_sequence_length": config.max_sequence_length,
        "max_memory_length": 0,
        "checkpoint_activations": False,
        "checkpoint_num_layers": 1,
        "parallel_output": True,
        "relative_encoding": False,
        "block_position_encoding": config.block_position_encoding,
        "output_predict": True,  # the HF default is False, which would return hidden states instead of logits
        "spell_length": None,
        "spell_func": "lstm",
        "attention_scale": config.attention_scale,
        "initializer_range": config.initializer_range,
        "pool_token": "cls",
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# GLM-10B-Chinese gives gMASK and eop one id (50007); on the hub gMASK is 50009, a copy of eop's row made by
# the official HF conversion (over the pretraining [dBLOCK] row), and the hub config bans 50009 in generation.
_HUB_GMASK_ROW = {"glm-10b-chinese": (50007, 50009)}


def hub_state(state: Mapping[str, Tensor], config: GLMConfig) -> tuple[dict[str, Tensor], dict]:
    """The state dict and extra config fields of a Hugging Face export, as the official HF conversion makes
    them (spec F.5, pitfall I.6): for GLM-10B-Chinese's architecture, row 50007 of the word embeddings is
    copied into row 50009 and `bad_words_id` bans 50009."""
    name = released_model(config, "chinese-sp")  # GLM-10B has the same shape: the vocabulary tells them apart
    rows = _HUB_GMASK_ROW.get(name or "")
    if rows is None or GLMConfig.from_name(name).vocab_size != config.vocab_size:
        return dict(state), {}
    source, target = rows
    embeddings = state["word_embeddings.weight"].clone()
    embeddings[target] = embeddings[source]
    return {**state, "word_embeddings.weight": embeddings}, {"bad_words_id": [target]}


def _check_exportable(config: GLMConfig, fmt: str) -> None:
    """Refuse architectures the official code (and the HF remote code built from it) cannot run."""
    if config.norm_scheme != "pre_ln":
        raise ValueError(f"norm_scheme={config.norm_scheme!r}: the {fmt} format runs pre-LN GLMs only")
    if config.layernorm_epsilon != 1e-5:
        raise ValueError(f"layernorm_epsilon={config.layernorm_epsilon}: the {fmt} format hard-wires 1e-5")
    if fmt == "official" and config.activation != "gelu_tanh":
        raise ValueError(f"activation={config.activation!r}: the official code computes gelu_tanh")


def _write_hf_tokenizer(tok, config: GLMConfig, directory: Path, dst: str) -> None:
    """Write `tok` as a Hugging Face GLM tokenizer (its vocab files + a `tokenizer_config.json` naming the
    hub class) if that class rebuilds the same ids; otherwise warn and leave the tokenizer out."""
    cls = next((c for c, (kind, _) in HF_TOKENIZERS.items() if tok.kind.startswith(kind)), None)
    if cls is None:
        log.warning("a %s tokenizer has no Hugging Face GLM class; %s holds no tokenizer", tok.kind, dst)
        return
    staged = directory / ".tokenizer"
    tok.save_pretrained(staged)
    (staged / "tokenizer_config.json").unlink()  # ours; the hub's names the class instead
    hub_file = HF_TOKENIZERS[cls][1]
    for path in staged.iterdir():  # our chinese "spiece.model" is the hub's "cog-pretrain.model"
        path.rename(directory / (hub_file if path.suffix == ".model" else path.name))
    staged.rmdir()
    settings = directory / "tokenizer_config.json"
    meta = {"tokenizer_class": cls, "auto_map": {"AutoTokenizer": [f"tokenization_glm.{cls}", None]}}
    settings.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    rebuilt = hf_tokenizer(directory, cls, config, settings)
    if rebuilt.num_tokens != tok.num_tokens or rebuilt.command_tokens != tok.command_tokens:
        for path in directory.iterdir():
            if path.name not in (CONFIG_NAME, "pytorch_model.bin"):
                path.unlink()
        message = "%s would give this %s tokenizer other special-token ids; %s holds no tokenizer"
        log.warning(message, cls, tok.kind, dst)


def export(
    model: str,
    dst: str,
    format: str = "hf",
    model_parallel: int = 1,
    model_config: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Export a GLM to the official (any MP size) or Hugging Face checkpoint layout.

    So that the official code, or the hub's GLM remote code, can load a model trained or converted here.

    official: `latest_checkpointed_iteration.txt` ("release") and `release/mp_rank_XX_model_states.pt`
    (`{"module": state dict}`), split into `model_parallel` shards as `change_mp.py` splits; a config.json and
    the tokenizer go beside them. hf: `config.json` (model_type "glm") and `pytorch_model.bin`, the files the
    official HF conversion writes, plus the tokenizer's vocab file and `tokenizer_config.json` when the hub's
    tokenizer class rebuilds the same ids; add the hub repo's `configuration_glm.py`, `modeling_glm.py` (and
    `tokenization_glm.py`) to use it with `trust_remote_code`.

    Args:
        model: an openglm model directory, or any checkpoint `openglm convert` reads (official, any MP size;
            Hugging Face).
        dst: output directory; it must not exist or be empty, unless `overwrite`.
        format: "hf" or "official".
        model_parallel: number of official model-parallel shards (official format only).
        model_config: for an official checkpoint without a config.json, a preset name (e.g. glm-large) or a
            config.json path, as for `convert`.
        dtype: optional dtype of the saved weights: float32, bfloat16 or float16 (the released official
            checkpoints hold float16).
        overwrite: replace a non-empty `dst` (the new directory is written completely first).

    Returns:
        The output directory.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format={format!r}; expected one of {list(EXPORT_FORMATS)}")
    if isinstance(model_parallel, bool) or not isinstance(model_parallel, int) or model_parallel < 1:
        raise ValueError(f"model_parallel={model_parallel!r}: must be a positive integer")
    if format == "hf" and model_parallel != 1:
        raise ValueError(f"model_parallel={model_parallel}: the Hugging Face format holds one unsplit model")
    if dtype is not None and dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {list(WEIGHT_DTYPES)}")
    _check_destination(Path(model), Path(dst), overwrite)
    glm, parts = _load_fine_tuned(model, model_config, dtype)
    config = glm.config
    _check_exportable(config, format)
    heads = config.num_attention_heads
    if heads % model_parallel:
        raise ValueError(f"model_parallel={model_parallel} does not divide the {heads} attention heads")
    state = {k: v.detach().contiguous().cpu() for k, v in glm.state_dict().items()}
    shards = split_model_parallel(state, model_parallel, source=model)
    # Fine-tuned parts are not model-parallel in the official code: every shard holds all of them. A
    # classifier's backbone keys take the `model.` prefix of the official GLMForSequenceClassification.
    if parts.head and format == "hf":
        log.warning("%s holds a classifier head, which the Hugging Face GLM has not; it is left out", model)
    elif parts.head:
        shards = [{**{f"model.{k}": v for k, v in shard.items()}, **parts.head} for shard in shards]
    if parts.prompt:
        shards = [{**shard, **prompt_keys_to_official(parts.prompt)} for shard in shards]
        if parts.prefix_tokens:
            log.info(
                "%d of the prompt tokens go before Part A (the official --prefix-prompt)", parts.prefix_tokens
            )
    tok = find_tokenizer(Path(model), config)
    weights_dtype = next(iter(state.values())).dtype

    def write(directory: Path) -> None:
        if format == "official":
            (directory / "latest_checkpointed_iteration.txt").write_text(_OFFICIAL_TAG)
            (directory / _OFFICIAL_TAG).mkdir()
            for rank, shard in enumerate(shards):
                torch.save(
                    {"module": shard}, directory / _OFFICIAL_TAG / f"mp_rank_{rank:02d}_model_states.pt"
                )
            config.save(directory / CONFIG_NAME)
            if tok is not None:
                tok.save_pretrained(directory)
        else:
            weights, extra_fields = hub_state(shards[0], config)
            torch.save(weights, directory / "pytorch_model.bin")
            hub = {**hf_config_dict(config, weights_dtype), **extra_fields}
            if parts.prompt:  # the hub GLMModel builds its prompt_spell from these
                hub.update(
                    spell_length=parts.prompt["embeddings.weight"].shape[0], spell_func=parts.prompt_encoder
                )
            text = json.dumps(hub, indent=2) + "\n"
            (directory / CONFIG_NAME).write_text(text, encoding="utf-8")
            if tok is not None:
                _write_hf_tokenizer(tok, config, directory, dst)

    replace_directory(dst, write)
    if tok is None:
        log.warning("%s carries no tokenizer: %s holds the model only", model, dst)
    return Path(dst)
