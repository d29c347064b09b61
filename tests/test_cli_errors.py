"""Bad flags and bad data fail at start-up with a message naming the flag / file, line, field."""

import os

import pytest

from cli_util import train


@pytest.mark.parametrize("flag,needle", [
    ("--batch_sise=4", "batch_sise"),
    ("--batch_size=four", "batch_size"),
    ("--loss.gamma=1.0", "gamma"),
    ("--loss=nope", "nope"),
    ("--model=huge", "huge"),
    ("--model.d_modle=8", "d_modle"),
    ("--mesh=data:3", "--mesh"),
    ("--steps=0", "--steps"),
    ("--grad_accum=3", "--grad_accum"),
    ("--tokenizer=no/such/tokenizer.model", "--tokenizer"),
])
def test_bad_flag_is_named(tmp_path, flag, needle):
  proc = train(str(tmp_path / "w"), flag, check=False)
  assert proc.returncode != 0
  assert needle in proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("flag", ["--loss.gamma_beta_ratio=0.5",  # simpo's, not dpo's
                                  "--loss.zzz=1"])  # nobody's
def test_unknown_loss_hparam_lists_valid_ones(tmp_path, flag):
  proc = train(str(tmp_path / "w"), flag, check=False)
  assert proc.returncode != 0
  assert "beta=0.1" in proc.stderr and "label_smoothing" in proc.stderr and "margin" in proc.stderr


BAD_LINES = {
    "bad_json": (b'{"prompt": "a", "chosen": "b", "rejected": ', "invalid JSON"),
    "missing_chosen": (b'{"prompt": "a", "rejected": "c"}', "chosen"),
    "empty_rejected": (b'{"prompt": "a", "chosen": "b", "rejected": ""}', "rejected"),
    "non_utf8": (b'{"prompt": "a\xff\xfe", "chosen": "b", "rejected": "c"}', "UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
@pytest.mark.slow  # over 10 s on 2 cores: kept out of the fast tier
def test_malformed_jsonl_names_file_line_field(tmp_path, case):
  line, needle = BAD_LINES[case]
  path = tmp_path / f"{case}.jsonl"
  good = b'{"prompt": "name a fruit.", "chosen": "apple.", "rejected": "dog."}'
  path.write_bytes(good + b"\n" + line + b"\n" + good + b"\n")
  proc = train(str(tmp_path / "w"), f"--train_data={path}", "--steps=2", check=False)
  assert proc.returncode != 0
  assert f"{case}.jsonl:2" in proc.stderr and needle in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr

  proc = train(str(tmp_path / "w2"), f"--train_data={path}", "--steps=2", "--eval_every=2",
               "--skip_invalid_records", check=True)
  assert "skipped 1" in proc.stdout, proc.stdout[-2000:]


def test_loss_that_needs_scores_on_data_without_them(tmp_path):
  proc = train(str(tmp_path / "w"), "--loss.score_margin=0.5", check=False)
  assert proc.returncode != 0
  assert "chosen_score" in proc.stderr and "Traceback" not in proc.stderr


def test_orpo_sequence_nll_under_a_shared_prompt_is_refused_at_start_up(tmp_path):
  proc = train(str(tmp_path / "w"), "--loss=orpo", "--loss.nll=sequence", "--shared_prompt",
               check=False)
  assert proc.returncode != 0
  assert "--shared_prompt" in proc.stderr.splitlines()[-1] and "Traceback" not in proc.stderr
