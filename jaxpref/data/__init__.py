"""Tokenizer, record reading, tokenization to `GroupBatch`, and the batch order."""

from jaxpref.data.pairs import (PairDataset, batch_indices, eval_batches, tokenize_pair,
                                tokenize_sequence)
from jaxpref.data.records import DataError, PairRecord, ReadReport, read_pairs
from jaxpref.data.tokenizer import Tokenizer

__all__ = ["DataError", "PairDataset", "PairRecord", "ReadReport", "Tokenizer", "batch_indices",
           "eval_batches", "read_pairs", "tokenize_pair", "tokenize_sequence"]
