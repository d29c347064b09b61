"""Tokenizer, record reading, tokenization to `GroupBatch`, and the batch order."""

from jaxpref.data.pairs import (PairDataset, Truncation, batch_indices, eval_batches,
                                tokenize_pair, tokenize_sequence)
from jaxpref.data.ranked import PAIRING_MODES, RankedDataset, pairs_from_ratings
from jaxpref.data.records import (DataError, PairRecord, RankedRecord, ReadReport, UnpairedRecord,
                                  read_pairs, read_ranked, read_unpaired, unpair)
from jaxpref.data.tokenizer import Tokenizer
from jaxpref.data.unpaired import UnpairedDataset

__all__ = ["PAIRING_MODES", "DataError", "PairDataset", "PairRecord", "RankedDataset",
           "RankedRecord", "ReadReport", "Tokenizer", "Truncation", "UnpairedDataset", "UnpairedRecord",
           "batch_indices", "eval_batches", "pairs_from_ratings", "read_pairs", "read_ranked",
           "read_unpaired", "tokenize_pair", "tokenize_sequence", "unpair"]
