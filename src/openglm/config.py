"""GLM architecture configuration (spec A.9-A.10): one serialisable dataclass plus the official presets.

Run settings (training, data, evaluation) live elsewhere; this file describes only the network, so that a
checkpoint directory can describe itself with a `config.json` written next to its weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openglm.atomic import write_text_atomic

ACTIVATIONS = ("gelu_tanh", "gelu_erf")
NORM_SCHEMES = ("pre_ln", "deepnorm")

# Fields of the Hugging Face hub `config.json` of the THUDM GLM models that carry no architecture we model
# (they steer the original training code or the HF wrapper). They are accepted and ignored when loading.
_HF_IGNORED_FIELDS = {
    "model_type",
    "architectures",
    "auto_map",
    "checkpoint_activations",
    "checkpoint_num_layers",
    "parallel_output",
    "relative_encoding",
    "output_predict",
    "spell_length",
    "spell_func",
    "max_memory_length",
    "pool_token",
    "torch_dtype",
    "transformers_version",
    "bad_words_id",
    "tokenizer_class",
    "_name_or_path",
    "num_hidden_layers",
}


_FLOAT_FIELDS = (
    "embedding_dropout_prob",
    "attention_dropout_prob",
    "output_dropout_prob",
    "layernorm_epsilon",
    "initializer_range",
    "attention_scale",
    "deepnorm_alpha",
    "deepnorm_beta",
)


def pad_vocab_size(num_tokens: int, multiple: int = 128) -> int:
    """The smallest multiple of `multiple` that is >= `num_tokens` (spec B.6); the pad rows are real rows."""
    if num_tokens <= 0 or multiple <= 0:
        raise ValueError(f"pad_vocab_size: num_tokens={num_tokens} and multiple={multiple} must be positive")
    return int(math.ceil(num_tokens / multiple) * multiple)


@dataclass
class GLMConfig:
    """Architecture of a GLM network.

    Attributes:
        num_layers: number of transformer blocks (L).
        hidden_size: model width (h); must be divisible by `num_attention_heads`.
        num_attention_heads: attention heads (n); head size is h / n (64 in every released model).
        vocab_size: rows of the word embedding = tokenizer size padded to a multiple of 128 (spec B.6).
            The softmax runs over all rows, the padding rows included, as in the official code.
        max_sequence_length: P. With block positions both position tables have P + 1 rows (spec A.3).
        block_position_encoding: 2-D positions (position in Part A, position inside the span). True for
            every released model; False gives 1-D positions and `position_ids` of shape [B, T].
        activation: `gelu_tanh` is the official training activation; `gelu_erf` is what the Hugging Face
            remote code uses (differs by ~1e-3 per activation).
        norm_scheme: `pre_ln` (GLM) or `deepnorm` (post-LN with DeepNorm's up-weighted residual and
            down-scaled init, as GLM-130B trains deep models).
        deepnorm_alpha: residual weight for `deepnorm`; None means (2L)^(1/2) as in GLM-130B.
        deepnorm_beta: init gain for `deepnorm`; None means (2L)^(-1/2) as in GLM-130B.
        embedding_dropout_prob: dropout on the embedding sum.
        attention_dropout_prob: dropout on attention probabilities.
        output_dropout_prob: dropout after the attention output projection and after the MLP.
        layernorm_epsilon: 1e-5, hard-wired in the official code.
        initializer_range: std of the normal init (0.02); output projections get 0.02 / sqrt(2L).
        attention_scale: kept for checkpoint compatibility; > 1 is an fp16 trick that computes the same
            softmax, so it does not change the maths here.
        tokenizer: name of the tokenizer the checkpoint was trained with (informational).
    """

    num_layers: int = 12
    hidden_size: int = 768
    num_attention_heads: int = 12
    vocab_size: int = 30592
    max_sequence_length: int = 512
    block_position_encoding: bool = True
    activation: str = "gelu_tanh"
    norm_scheme: str = "pre_ln"
    deepnorm_alpha: float | None = None
    deepnorm_beta: float | None = None
    embedding_dropout_prob: float = 0.1
    attention_dropout_prob: float = 0.1
    output_dropout_prob: float = 0.1
    layernorm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    attention_scale: float = 1.0
    tokenizer: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_sequence_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GLMConfig.{name} must be a positive integer, got {value!r}")
        # JSON configs can hold "false" or "1e-5" as strings: only real booleans and numbers are accepted, so
        # that a string is never read as truthy or compared with a number.
        if not isinstance(self.block_position_encoding, bool):
            raise ValueError(
                f"GLMConfig.block_position_encoding must be true or false, got {self.block_position_encoding!r}"
            )
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if value is None and name in ("deepnorm_alpha", "deepnorm_beta"):
                continue
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"GLMConfig.{name} must be a finite number, got {value!r}")
        for name in ("activation", "norm_scheme", "tokenizer"):
            value = getattr(self, name)
            if not isinstance(value, str) and not (name == "tokenizer" and value is None):
                raise ValueError(f"GLMConfig.{name} must be a string, got {value!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"GLMConfig.extra must be an object, got {self.extra!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"GLMConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GLMConfig.activation={self.activation!r}; expected one of {ACTIVATIONS}")
        if self.norm_scheme not in NORM_SCHEMES:
            raise ValueError(f"GLMConfig.norm_scheme={self.norm_scheme!r}; expected one of {NORM_SCHEMES}")
        for name in ("embedding_dropout_prob", "attention_dropout_prob", "output_dropout_prob"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"GLMConfig.{name}={value!r} must be in [0, 1)")
        for name in ("layernorm_epsilon", "initializer_range"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GLMConfig.{name}={getattr(self, name)!r} must be positive")
        if self.attention_scale < 1.0:
            raise ValueError(f"GLMConfig.attention_scale={self.attention_scale!r} must be >= 1")
        for name in ("deepnorm_alpha", "deepnorm_beta"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"GLMConfig.{name}={value!r} must be positive")

    # ----------------------------------------------------------------------------------------------------
    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def position_table_rows(self) -> int:
        """P + 1 rows with block positions (the extra row serves the sentinel variant), P without."""
        return self.max_sequence_length + 1 if self.block_position_encoding else self.max_sequence_length

    @property
    def residual_alpha(self) -> float:
        if self.norm_scheme != "deepnorm":
            return 1.0
        return self.deepnorm_alpha if self.deepnorm_alpha is not None else (2 * self.num_layers) ** 0.5

    @property
    def init_beta(self) -> float:
        return self.deepnorm_beta if self.deepnorm_beta is not None else (2 * self.num_layers) ** -0.5

    def num_parameters(self) -> int:
        """Parameter count: L(12h^2 + 13h) + Vh + position tables + final LayerNorm (spec A.10)."""
        h = self.hidden_size
        tables = 2 if self.block_position_encoding else 1
        return (
            self.num_layers * (12 * h * h + 13 * h)
            + self.vocab_size * h
            + tables * self.position_table_rows * h
            + 2 * h
        )

    def replace(self, **changes: Any) -> GLMConfig:
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        extra = data.pop("extra")
        data["model_type"] = "openglm"
        if extra:
            data["extra"] = extra
        return data

    def save(self, path: str | os.PathLike) -> None:
        """Write the config as JSON atomically (temp file, then rename)."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> GLMConfig:
        """Build from our own dict or from a Hugging Face hub GLM `config.json` (field names mostly agree)."""
        data = dict(data)
        hf_only = _HF_IGNORED_FIELDS - {"model_type"}
        if data.get("model_type") == "glm" or (data.get("model_type") != "openglm" and hf_only & set(data)):
            data = _from_hf_dict(data, source)
        data.pop("model_type", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown config field(s) {unknown}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> GLMConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config file not found")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> GLMConfig:
        """A preset by name (`glm-large`, `glm-10b`, ..., `tiny`); see `PRESETS`."""
        key = name.lower().replace("_", "-")
        if key not in PRESETS:
            raise ValueError(f"unknown GLM preset {name!r}; known presets: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[key], **overrides)

    @classmethod
    def resolve(cls, spec: GLMConfig | str | os.PathLike) -> GLMConfig:
        """A config object, a preset name, or a path to a config.json / a directory holding one."""
        if isinstance(spec, GLMConfig):
            return spec
        text = str(spec)
        if text.lower().replace("_", "-") in PRESETS:
            return cls.from_name(text)
        if Path(text).exists():
            return cls.from_file(text)
        raise ValueError(f"config {text!r} is neither a preset ({', '.join(PRESETS)}) nor an existing file")


def _from_hf_dict(data: dict[str, Any], source: str) -> dict[str, Any]:
    if "num_layers" not in data and "num_hidden_layers" in data:
        data["num_layers"] = data["num_hidden_layers"]
    relative = data.get("relative_encoding", False)
    if relative is True:
        raise ValueError(f"{source}: relative_encoding (Transformer-XL attention) is not supported")
    if relative is not False:
        raise ValueError(f"{source}: GLMConfig.relative_encoding must be true or false, got {relative!r}")
    if data.get("output_predict") is False:
        # The HF default is False but every released config sets it to true; our model always projects.
        pass
    out = {k: v for k, v in data.items() if k not in _HF_IGNORED_FIELDS}
    out.setdefault("activation", "gelu_tanh")
    return out


def _preset(L: int, h: int, n: int, P: int, V: int, tokenizer: str) -> GLMConfig:
    return GLMConfig(
        num_layers=L,
        hidden_size=h,
        num_attention_heads=n,
        max_sequence_length=P,
        vocab_size=V,
        tokenizer=tokenizer,
    )


# Every released GLM (spec A.10), plus `tiny` for tests and `small` for the CPU quickstart.
PRESETS: dict[str, GLMConfig] = {
    "glm-base": _preset(12, 768, 12, 512, 30592, "bert-base-uncased"),
    "glm-large": _preset(24, 1024, 16, 512, 30592, "bert-large-uncased"),
    "glm-doc": _preset(24, 1024, 16, 512, 30592, "bert-large-uncased"),
    "glm-410m": _preset(30, 1024, 16, 512, 30592, "bert-large-uncased"),
    "glm-515m": _preset(30, 1152, 18, 512, 30592, "bert-large-uncased"),
    "glm-roberta": _preset(24, 1024, 16, 512, 50304, "roberta"),
    "glm-large-chinese": _preset(24, 1024, 16, 1024, 50048, "chinese-sp-fix"),
    "glm-2b": _preset(36, 2048, 32, 1024, 50304, "gpt2"),
    "glm-10b": _preset(48, 4096, 64, 1024, 50304, "gpt2"),
    "glm-10b-chinese": _preset(48, 4096, 64, 1024, 50048, "chinese-sp"),
    "tiny": GLMConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256, max_sequence_length=64
    ),
    "small": GLMConfig(
        num_layers=4, hidden_size=256, num_attention_heads=4, vocab_size=8192, max_sequence_length=256
    ),
}
