"""Pretraining data: corpus -> token shards (`openglm data prepare`), sample assembly and training batches."""

from openglm.data.pretraining import (
    PretrainingBatches,
    SampleAssembler,
    collate,
    split_documents,
    validation_batches,
)
from openglm.data.shards import CorpusSubset, InMemoryCorpus, ShardedCorpus, prepare_corpus

__all__ = [
    "CorpusSubset",
    "InMemoryCorpus",
    "ShardedCorpus",
    "prepare_corpus",
    "PretrainingBatches",
    "SampleAssembler",
    "collate",
    "split_documents",
    "validation_batches",
]
