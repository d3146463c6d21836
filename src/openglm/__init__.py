"""openglm: GLM (General Language Model, Du et al., ACL 2022) on plain PyTorch."""

from openglm.config import PRESETS, GLMConfig, pad_vocab_size
from openglm.generate import fill_blanks, score_fills
from openglm.model import GLMModel, GLMOutput, KVCache
from openglm.tokenizer import GLMTokenizer

__all__ = ["GLMConfig", "GLMModel", "GLMOutput", "GLMTokenizer", "KVCache", "PRESETS", "fill_blanks", "pad_vocab_size", "score_fills"]
__version__ = "0.1.0"
