"""Tokenizer, record reading, tokenization to `GroupBatch`, and the batch order."""

from jaxpref.data.pairs import (PairDataset, batch_indices, eval_batches, tokenize_pair,
                                tokenize_sequence)
from jaxpref.data.records import (DataError, PairRecord, ReadReport, UnpairedRecord, read_pairs,
                                  read_unpaired, unpair)
from jaxpref.data.tokenizer import Tokenizer
from jaxpref.data.unpaired import UnpairedDataset

__all__ = ["DataError", "PairDataset", "PairRecord", "ReadReport", "Tokenizer", "UnpairedDataset",
           "UnpairedRecord", "batch_indices", "eval_batches", "read_pairs", "read_unpaired",
           "tokenize_pair", "tokenize_sequence", "unpair"]
