"""Checkpoint formats (spec F): ours (config.json + safetensors), Hugging Face GLM directories, and official
Megatron/DeepSpeed directories including model-parallel shards, merged as the official `change_mp.py` splits.

The model keeps the official parameter names, so the only "key map" is prefix handling; the model-parallel
merge rules below are the one place that knows how official shards were split.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from openglm.config import GLMConfig

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_MP_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt$")
# Prefixes that wrappers put in front of the backbone keys: DDP/DeepSpeed `module.`, HF heads `glm.`,
# official classification wrappers `model.`.
_PREFIXES = ("module.", "glm.", "model.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and, where it applies, the key."""


# --------------------------------------------------------------------------------------------------------
# Reading files
def _torch_load(path: Path) -> object:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        # Official checkpoints may pickle the argparse namespace of the run; that class is plain data.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unsupported object"
        raise CheckpointError(
            f"{path}: refused to load: the file needs pickled code to be executed ({first}); "
            "re-save it as a plain state dict or safetensors"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(
            f"{path}: cannot read the checkpoint ({str(err).splitlines()[0]}); is it truncated?"
        ) from None


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
def detect_format(path: Path) -> str:
    """'openglm', 'hf' or 'official' for a checkpoint path."""
    if path.is_file():
        return "official" if path.suffix in (".pt", ".bin", ".pth") else "openglm"
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    if (path / CONFIG_NAME).is_file():
        try:
            data = json.loads((path / CONFIG_NAME).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path / CONFIG_NAME}: not valid JSON ({err})") from None
        return "openglm" if data.get("model_type") == "openglm" else "hf"
    if any((path / n).is_file() for n in ("latest_checkpointed_iteration.txt", "latest")) or any(
        _MP_FILE.search(p.name) for p in path.iterdir()
    ):
        return "official"
    raise CheckpointError(
        f"{path}: not a GLM checkpoint (no config.json, no latest_checkpointed_iteration.txt, no mp_rank files)"
    )


def _hf_weight_files(path: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
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
    return found


def _read_weights(files: list[Path]) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for f in files:
        part = _safetensors_load(f) if f.suffix == ".safetensors" else _state_from_pickle(_torch_load(f), f)
        state.update(part)
    return state


def load_checkpoint(
    path: Path, config: GLMConfig | str | os.PathLike | None = None
) -> tuple[GLMConfig, dict[str, Tensor]]:
    """Read any supported checkpoint layout into (config, MP=1 state dict with official key names)."""
    fmt = detect_format(path)
    if fmt == "official":
        files = _official_shard_files(path)
        shards = [_strip_prefixes(_state_from_pickle(_torch_load(f), f)) for f in files]
        state = merge_model_parallel(shards, source=str(files[0].parent))
        if config is None:
            raise CheckpointError(
                f"{path}: official checkpoints carry no config; pass config= (a GLMConfig, a preset name such as "
                "'glm-large', or a config.json path)"
            )
        return GLMConfig.resolve(config), state
    if path.is_file():
        state = _read_weights([path])
        if config is None:
            raise CheckpointError(f"{path}: a bare weights file carries no config; pass config=")
        return GLMConfig.resolve(config), _strip_prefixes(state)
    cfg = GLMConfig.resolve(config) if config is not None else GLMConfig.from_file(path / CONFIG_NAME)
    return cfg, _strip_prefixes(_read_weights(_hf_weight_files(path)))


def apply_state_dict(model: torch.nn.Module, state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Copy `state` into `model`, with one-line errors for unknown/missing keys and shape mismatches.

    Position tables saved with fewer rows than the model has are copied into the first rows and the rest keep
    their fresh init (the official load-time extension, spec F.4).
    """
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
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


def find_tokenizer(src: Path, config: GLMConfig):
    """The tokenizer a checkpoint directory carries, or None: an openglm tokenizer, or a Hugging Face GLM one
    (its `tokenizer_class` and vocab file), built with the official ids of the released model that has this
    architecture (GLM-Large-Chinese's fixed command ids, for example)."""
    from openglm.tokenizer import OFFICIAL_MODELS, GLMTokenizer

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
    kind, file = HF_TOKENIZERS[cls]
    options: dict[str, bool] = {}
    name = released_model(config, kind)
    if name is not None:
        kind, _, options, _ = OFFICIAL_MODELS[name]
    if not (src / file).is_file():
        raise CheckpointError(f"{settings} names {cls}, but {src / file} is missing")
    return GLMTokenizer.from_files(kind, src / file, **options)


def convert(
    src: str,
    dst: str,
    model_config: str | None = None,
    dtype: str | None = None,
    tokenizer: str | None = None,
) -> Path:
    """Convert an official (any MP size) or Hugging Face GLM checkpoint into an openglm directory.

    The tokenizer travels with the weights, so that the directory works on its own (`openglm infill DIR`):
    a Hugging Face directory's GLM tokenizer is converted with the official ids, or `tokenizer` names one.

    Args:
        src: checkpoint directory (official: holds latest_checkpointed_iteration.txt; HF: config.json + weights).
        dst: output directory (config.json + model.safetensors, and the tokenizer's files).
        model_config: for official checkpoints, a preset name (e.g. glm-large) or a config.json path.
        dtype: optional dtype of the saved weights: float32, bfloat16 or float16.
        tokenizer: "KIND:VOCAB_PATH" (e.g. bert:bert-large-uncased-vocab.txt; official checkpoints carry no
            vocab) or a saved tokenizer directory; default: the one found in `src`, if any.

    Returns:
        The output directory.
    """
    from openglm.model import GLMModel
    from openglm.tokenizer import GLMTokenizer

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype is not None and dtype not in dtypes:
        raise ValueError(f"dtype={dtype!r}; expected one of {list(dtypes)}")
    model = GLMModel.from_pretrained(src, config=model_config, dtype=dtypes.get(dtype) if dtype else None)
    tok = GLMTokenizer.from_spec(tokenizer) if tokenizer else find_tokenizer(Path(src), model.config)
    if tok is not None and tok.num_tokens > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tok.num_tokens} tokens but the model only {model.config.vocab_size} embedding rows"
        )
    save_checkpoint(model, dst)
    if tok is not None:
        tok.save_pretrained(dst)
    else:
        log.warning(
            "%s carries no tokenizer: %s holds the model only (add one with --tokenizer KIND:VOCAB_PATH)",
            src,
            dst,
        )
    return Path(dst)
