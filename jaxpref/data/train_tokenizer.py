"""Trains a sentencepiece model with jaxpref's fixed special ids (pad 0, unk 1, bos 2, eos 3).

  python -m jaxpref.data.train_tokenizer --corpus=corpus.txt --model_prefix=tok --vocab_size=8000

The same corpus and options give a byte-identical model: one training thread, no input
shuffling, and the corpus is streamed to the trainer rather than named by path, so no
file or temporary-directory name ends up inside the model file.
"""

from __future__ import annotations

import argparse
import io
from typing import Iterable

import sentencepiece as spm

SPECIAL_IDS = dict(pad_id=0, unk_id=1, bos_id=2, eos_id=3)


def train_bytes(lines: Iterable[str], vocab_size: int, model_type: str = "unigram",
                normalization: str = "nmt_nfkc") -> bytes:
  """The serialized model trained on `lines` (one sentence each).

  `vocab_size` is an upper bound (`hard_vocab_limit=False`): a small corpus yields fewer
  pieces instead of an error. Without byte fallback, characters absent from the corpus
  encode as unk, so the vocabulary stays small for the CPU-sized models.
  """
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size,
      model_type=model_type, normalization_rule_name=normalization, character_coverage=1.0,
      byte_fallback=False, hard_vocab_limit=False, num_threads=1, shuffle_input_sentence=False,
      minloglevel=2, **SPECIAL_IDS)
  return out.getvalue()


def _corpus_lines(path: str):
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.rstrip("\r\n")
      if line.strip():
        yield line


def train(corpus: str, model_prefix: str, vocab_size: int, model_type: str = "unigram",
          normalization: str = "nmt_nfkc") -> str:
  """Writes PREFIX.model and PREFIX.vocab (piece<TAB>score per id); returns PREFIX.model."""
  model = train_bytes(_corpus_lines(corpus), vocab_size, model_type, normalization)
  with open(model_prefix + ".model", "wb") as f:
    f.write(model)
  sp = spm.SentencePieceProcessor(model_proto=model)
  with open(model_prefix + ".vocab", "w", encoding="utf-8") as f:
    f.writelines(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
  return model_prefix + ".model"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--corpus", required=True, help="UTF-8 text file, one sentence a line")
  parser.add_argument("--model_prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
  parser.add_argument("--vocab_size", type=int, default=8000, help="upper bound on the pieces")
  parser.add_argument("--model_type", default="unigram", choices=["unigram", "bpe"])
  parser.add_argument("--normalization", default="nmt_nfkc",
                      choices=["nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf", "identity"],
                      help="sentencepiece normalization rule; identity keeps text as written")
  args = parser.parse_args(argv)
  path = train(args.corpus, args.model_prefix, args.vocab_size, args.model_type, args.normalization)
  vocab = spm.SentencePieceProcessor(model_file=path).get_piece_size()
  print(f"wrote {path} ({vocab} pieces)")


if __name__ == "__main__":
  main()
