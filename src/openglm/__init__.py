"""openglm: GLM (General Language Model, Du et al., ACL 2022) on plain PyTorch."""

from openglm.blank_infilling import ObjectiveConfig
from openglm.config import PRESETS, GLMConfig, pad_vocab_size
from openglm.data import PretrainingBatches, ShardedCorpus, prepare_corpus
from openglm.generate import fill_blanks, score_fills
from openglm.model import GLMModel, GLMOutput, KVCache
from openglm.tokenizer import GLMTokenizer
from openglm.train import OptimSettings, TrainSettings, fit

__all__ = [
    "GLMConfig",
    "GLMModel",
    "GLMOutput",
    "GLMTokenizer",
    "KVCache",
    "ObjectiveConfig",
    "PRESETS",
    "PretrainingBatches",
    "ShardedCorpus",
    "OptimSettings",
    "TrainSettings",
    "fill_blanks",
    "fit",
    "pad_vocab_size",
    "prepare_corpus",
    "score_fills",
]
__version__ = "0.1.0"
