"""Blank filling and generation (spec E): `fill_blanks` (greedy, sampling, beam search; batched, one K/V cache,
streaming), `score_fills` for candidate fills, and the `openglm infill` command."""

from openglm.generate.decoding import GenerationConfig
from openglm.generate.infill import (
    BlankFill,
    FilledText,
    SpecialIds,
    TokenEvent,
    fill_blank_ids,
    fill_blanks,
    fill_events,
    prepare_context,
    score_fill_ids,
    score_fills,
    stream_blanks,
)

__all__ = [
    "BlankFill",
    "FilledText",
    "GenerationConfig",
    "SpecialIds",
    "TokenEvent",
    "fill_blank_ids",
    "fill_blanks",
    "fill_events",
    "prepare_context",
    "score_fill_ids",
    "score_fills",
    "stream_blanks",
]
