"""GLM tokenizers (spec B): the official configurations with their command-token ids, and training new
byte-level BPE tokenizers with the GLM special tokens."""

from openglm.tokenizer.glm import GLM_SPECIAL_TOKENS, KINDS, OFFICIAL_MODELS, CommandToken, GLMTokenizer
from openglm.tokenizer.train import corpus_files, train_tokenizer

__all__ = [
    "GLM_SPECIAL_TOKENS",
    "KINDS",
    "OFFICIAL_MODELS",
    "CommandToken",
    "GLMTokenizer",
    "corpus_files",
    "train_tokenizer",
]
