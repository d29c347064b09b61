"""Trains a sentencepiece model with jaxpref's fixed special ids (pad 0, unk 1, bos 2, eos 3).

  python -m jaxpref.data.train_tokenizer --corpus=corpus.txt --model_prefix=tok --vocab_size=8000
"""

from __future__ import annotations

import argparse

import sentencepiece as spm


def train(corpus: str, model_prefix: str, vocab_size: int, model_type: str = "unigram") -> str:
  spm.SentencePieceTrainer.train(
      input=corpus, model_prefix=model_prefix, vocab_size=vocab_size, model_type=model_type,
      pad_id=0, unk_id=1, bos_id=2, eos_id=3, character_coverage=1.0, byte_fallback=False,
      hard_vocab_limit=False, num_threads=1, shuffle_input_sentence=False,
      minloglevel=2)
  return model_prefix + ".model"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--corpus", required=True, help="text file, one sentence a line")
  parser.add_argument("--model_prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
  parser.add_argument("--vocab_size", type=int, default=8000)
  parser.add_argument("--model_type", default="unigram", choices=["unigram", "bpe"])
  args = parser.parse_args(argv)
  print("wrote", train(args.corpus, args.model_prefix, args.vocab_size, args.model_type))


if __name__ == "__main__":
  main()
