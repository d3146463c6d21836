"""GLM tokenizers (spec B): the official configurations with their command-token ids, and training new
byte-level BPE tokenizers with the GLM special tokens."""

from openglm.tokenizer.glm import GLM_SPECIAL_TOKENS, KINDS, CommandToken, GLMTokenizer

__all__ = ["GLM_SPECIAL_TOKENS", "KINDS", "CommandToken", "GLMTokenizer"]
