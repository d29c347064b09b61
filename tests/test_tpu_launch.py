"""tpu/launch.py and tpu/slurm.py in --dry-run: the exact commands they would run."""

import os
import shlex
import subprocess
import sys
import tempfile

import pytest

from launch_util import GC, QR, REPO, SCOPE, dry, error, launch


def bundle(name):
  return os.path.join(tempfile.gettempdir(), f"jaxpref-{name}.tar.gz")


def run_line(name, zone, command):
  return shlex.join([*GC.split(), "ssh", name, f"--zone={zone}", "--worker=all", "--command", command])


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
  monkeypatch.chdir(REPO)


def _probe(name, zone, tries=20, wait=15):
  ssh = f"{GC} ssh {name} --zone={zone} --worker=all --command true"
  return shlex.join(["bash", "-c", (
      f"for i in $(seq {tries}); do {ssh} && exit 0; "
      f'echo "ssh to {name} not ready (try $i of {tries}); retrying in {wait}s"; '
      f'sleep {wait}; done; echo "no ssh to {name} after {tries} tries"; exit 1')])


def _bash_ok(script):
  """The shell a worker would run parses (bash -n), so a quoting slip fails here."""
  proc = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr


def test_create_plain_uses_generation_runtime(capsys):
  assert dry(capsys, "create", "--name=dpo", "--zone=us-west4-a", "--accelerator=v5litepod-256") == [
      f"{GC} create dpo {SCOPE} --accelerator-type=v5litepod-256 --version=v2-alpha-tpuv5-lite",
      _probe("dpo", "us-west4-a")]
  assert dry(capsys, "create", "--name=dpo", "--zone=us-east5-a", "--accelerator=v5p-64",
             "--project=my-proj")[0] == (
      f"{GC} create dpo --zone=us-east5-a --project=my-proj --accelerator-type=v5p-64 "
      "--version=v2-alpha-tpuv5")
  assert dry(capsys, "create", "--name=a", "--zone=z", "--accelerator=v4-8", "--version=custom")[0] \
      .endswith("--accelerator-type=v4-8 --version=custom")
  assert dry(capsys, "create", "--name=a", "--zone=z", "--accelerator=v6e-8")[0].endswith(
      "--accelerator-type=v6e-8 --version=v2-alpha-tpuv6e")


def test_create_capacity_scopes_service_account_startup_script(capsys, tmp_path):
  base = ["create", "--name=dpo", "--zone=us-west4-a", "--accelerator=v5litepod-8"]
  head = f"{GC} create dpo {SCOPE} --accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite"
  assert dry(capsys, *base, "--spot")[0] == f"{head} --spot"
  assert dry(capsys, *base, "--preemptible")[0] == f"{head} --preemptible"
  assert dry(capsys, *base, "--reserved")[0] == f"{head} --reserved"
  boot = tmp_path / "boot.sh"
  boot.write_text("#!/bin/bash\n")
  assert dry(capsys, *base, "--service-account=sa@p.iam.gserviceaccount.com",
             "--scopes=https://www.googleapis.com/auth/cloud-platform",
             f"--startup-script={boot}")[0] == (
      f"{head} --service-account=sa@p.iam.gserviceaccount.com "
      f"--scopes=https://www.googleapis.com/auth/cloud-platform "
      f"--metadata-from-file=startup-script={boot}")
  assert "exclude each other" in error(capsys, *base, "--spot", "--preemptible")
  assert "exclude each other" in error(capsys, *base, "--spot", "--reserved")
  assert "add --queued" in error(capsys, *base, "--best-effort")
  assert "add --queued" in error(capsys, *base, "--valid-until=6h")
  assert "no such file" in error(capsys, *base, "--startup-script=nope.sh")


def test_create_queued_waits_until_active_with_a_timeout(capsys):
  lines = dry(capsys, "create", "--name=dpo", "--zone=us-east5-a", "--accelerator=v5p-64",
              "--queued", "--spot", "--valid-until=6h", "--wait-timeout=2h",
              "--scopes=https://www.googleapis.com/auth/cloud-platform")
  assert lines[0] == (f"{QR} create dpo --zone=us-east5-a --node-id=dpo --accelerator-type=v5p-64 "
                      "--runtime-version=v2-alpha-tpuv5 --spot --valid-until-duration=6h "
                      "--scopes=https://www.googleapis.com/auth/cloud-platform")
  wait = shlex.split(lines[1])
  assert wait[:2] == ["bash", "-c"] and len(wait) == 3
  assert (f"{QR} describe dpo --zone=us-east5-a '--format=value(state.state)'" in wait[2]
          and 'until [ "$s" = ACTIVE ]' in wait[2] and "FAILED|SUSPENDED) exit 1" in wait[2]
          and "[ $SECONDS -ge 7200 ]" in wait[2] and "sleep 30" in wait[2])
  _bash_ok(wait[2])
  assert lines[2] == _probe("dpo", "us-east5-a") and len(lines) == 3
  assert "take --spot" in error(capsys, "create", "--name=a", "--zone=z", "--accelerator=v5p-8",
                                "--queued", "--preemptible")


def test_create_queued_reserved_and_best_effort(capsys):
  base = ["create", "--name=q", "--zone=us-east5-a", "--accelerator=v5p-8", "--queued"]
  tail = "--node-id=q --accelerator-type=v5p-8 --runtime-version=v2-alpha-tpuv5"
  assert dry(capsys, *base, "--reserved")[0] == f"{QR} create q --zone=us-east5-a {tail} --reserved"
  # --best-effort is only in the alpha command group.
  assert dry(capsys, *base, "--best-effort")[0] == (
      f"gcloud alpha compute tpus queued-resources create q --zone=us-east5-a {tail} --best-effort")
  lines = dry(capsys, *base, "--ssh-retries=3", "--ssh-retry-wait=1m")
  assert lines[2] == _probe("q", "us-east5-a", 3, 60)
  _bash_ok(shlex.split(lines[2])[2])


def test_hosts_and_durations():
  assert [launch.hosts(a) for a in ("v5litepod-8", "v5litepod-16", "v5litepod-256", "v5p-8",
                                    "v5p-64", "v6e-8", "v6e-64", "v4-32", "v3-8")] == \
      [1, 4, 64, 1, 8, 1, 16, 4, 1]
  parsed = [launch.seconds(d) for d in ("90", "30s", "20m", "6h", "2d")]  # a parser, not a timer
  assert parsed == [90, 30, 1200, 21600, 172800]
  with pytest.raises(launch.LaunchError, match="not a duration"):
    launch.seconds("6 hours")


VENV_PY = '"$HOME"/jaxpref_venv/bin/python'


def test_install_makes_a_python311_venv_on_every_worker(capsys):
  want = ("jaxpref[tpu] @ git+https://github.com/o/jaxpref.git@main")
  for url in ("https://github.com/o/jaxpref.git@main", "git+https://github.com/o/jaxpref.git@main"):
    lines = dry(capsys, "install", "--name=dpo", "--zone=us-west4-a", f"--git={url}")
    assert len(lines) == 1
    cmd = shlex.split(lines[0])
    assert cmd[:9] == [*GC.split(), "ssh", "dpo", SCOPE, "--worker=all", "--command"]
    remote = cmd[9]
    assert remote.startswith(f"{{ [ -x {VENV_PY} ] || {{ ")
    assert "curl -LsSf https://astral.sh/uv/install.sh" in remote
    assert 'uv venv --seed --python 3.11 "$HOME"/jaxpref_venv' in remote
    assert "assert sys.version_info >= (3, 11)" in remote
    assert remote.endswith(f"{VENV_PY} -m pip install --upgrade pip && "
                           f"{VENV_PY} -m pip install {shlex.quote(want)}")
    assert "python3 -m pip" not in remote  # never the image's Python 3.10
    _bash_ok(remote)
  deadsnakes = shlex.split(dry(capsys, "install", "--name=d", "--zone=z", "--git=https://g/j.git",
                               "--python-via=deadsnakes", "--venv=/opt/v")[0])[-1]
  assert ("sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get update -y && "
          "sudo apt-get install -y python3.11 python3.11-venv && python3.11 -m venv /opt/v"
          in deadsnakes)
  assert deadsnakes.endswith(
      "/opt/v/bin/python -m pip install 'jaxpref[tpu] @ git+https://g/j.git'")
  _bash_ok(deadsnakes)


def test_install_from_sdist(capsys, tmp_path):
  sdist = tmp_path / "jaxpref-0.1.0.tar.gz"
  sdist.write_bytes(b"")
  lines = dry(capsys, "install", "--name=dpo", "--zone=us-west4-a", f"--sdist={sdist}")
  assert lines[0] == f"{GC} scp {sdist} dpo:jaxpref-0.1.0.tar.gz {SCOPE} --worker=all"
  assert shlex.split(lines[1])[-1].endswith(f"{VENV_PY} -m pip install "
                                            "'./jaxpref-0.1.0.tar.gz[tpu]'")
  assert "exactly one of --git" in error(capsys, "install", "--name=a", "--zone=z")
  assert "no such file" in error(capsys, "install", "--name=a", "--zone=z", "--sdist=nope.tar.gz")


FREE_TPU = ("pids=$(sudo find /proc/[0-9]*/fd \\( -lname '/dev/accel*' -o -lname "
            "'/dev/vfio/[0-9]*' \\) 2>/dev/null | cut -d/ -f3 | sort -u); "
            'if [ -n "$pids" ]; then echo "killing TPU holders: $pids"; sudo kill -9 $pids; '
            "sleep 2; fi; sudo rm -f /tmp/libtpu_lockfile")


def _remote_train(train):
  return ('mkdir -p "$HOME"/jaxpref_run && tar -xzf jaxpref-bundle.tar.gz -C "$HOME"/jaxpref_run '
          f'|| exit 1; {FREE_TPU}; cd "$HOME"/jaxpref_run || exit 1; '
          f'nohup "$HOME"/jaxpref_venv/bin/{train} > train.log 2>&1 < /dev/null & '
          "echo $! > train.pid; "
          'echo "started on $(hostname): pid $!, log jaxpref_run/train.log"')


def test_run_copies_flag_files_and_data_then_starts_every_worker(capsys):
  lines = dry(capsys, "run", "--name=dpo", "--zone=us-west4-a",
              "--flagfile=experiments/quickstart.flags", "--workdir=runs/q", "--", "--steps=100")
  assert lines == [
      f"tar -czf {bundle('dpo')} experiments/quickstart.flags experiments/tiny.flags "
      "jaxpref/data/tiny/eval.jsonl jaxpref/data/tiny/tokenizer.model jaxpref/data/tiny/train.jsonl",
      f"{GC} scp {bundle('dpo')} dpo:jaxpref-bundle.tar.gz {SCOPE} --worker=all",
      run_line("dpo", "us-west4-a", _remote_train(
          "jaxpref-train --flagfile=experiments/quickstart.flags --workdir=runs/q --steps=100"))]
  _bash_ok(shlex.split(lines[2])[-1])


def test_run_resolves_includes_relative_to_each_file(capsys, tmp_path, monkeypatch):
  # exp/rows/a.flags includes ../base.flags, which includes shared/common.flags (from exp/)
  # and names a data file relative to the cwd and a loss module relative to itself.
  (tmp_path / "exp" / "rows").mkdir(parents=True)
  (tmp_path / "exp" / "shared").mkdir()
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "train.jsonl").write_text("{}\n")
  (tmp_path / "exp" / "my_loss.py").write_text("")
  (tmp_path / "exp" / "shared" / "common.flags").write_text("# shared\n--steps=10\n")
  (tmp_path / "exp" / "base.flags").write_text(
      "--flagfile=shared/common.flags\n--train_data=data/train.jsonl\n--loss_module=my_loss.py\n"
      "--eval_data=/abs/eval.jsonl\n")
  (tmp_path / "exp" / "rows" / "a.flags").write_text("--flagfile=../base.flags\n--loss=dpo\n")
  monkeypatch.chdir(tmp_path)
  lines = dry(capsys, "run", "--name=n", "--zone=z", "--flagfile=exp/rows/a.flags", "--workdir=w",
              "--follow")
  assert lines[0] == (f"tar -czf {bundle('n')} data/train.jsonl exp/base.flags exp/my_loss.py "
                      "exp/rows/a.flags exp/shared/common.flags")
  assert lines[2] == run_line("n", "z", _remote_train(
      "jaxpref-train --flagfile=exp/rows/a.flags --workdir=w"))
  assert lines[3] == (f"{GC} ssh n --zone=z --worker=0 --command "
                      "'tail -n +1 -F \"$HOME\"/jaxpref_run/train.log'")


def test_run_errors(capsys, tmp_path, monkeypatch):
  base = ["run", "--name=n", "--zone=z", "--workdir=w"]
  assert "no such file 'nope.flags'" in error(capsys, *base, "--flagfile=nope.flags")
  (tmp_path / "a.flags").write_text("--flagfile=missing.flags\n")
  (tmp_path / "loop.flags").write_text("--flagfile=loop.flags\n")
  monkeypatch.chdir(tmp_path)
  assert "included from" in error(capsys, *base, "--flagfile=a.flags")
  assert "includes itself" in error(capsys, *base, "--flagfile=loop.flags")
  assert "outside the current folder" in error(capsys, *base, f"--flagfile={REPO}/experiments/quickstart.flags")
  assert "own --workdir" in error(capsys, *base, "--flagfile=a.flags", "--", "--workdir=x")
  assert "--flagfile" in error(capsys, "run", "--name=n", "--zone=z", "--workdir=w")


def test_logs_copy_delete(capsys):
  assert dry(capsys, "logs", "--name=dpo", "--zone=us-west4-a") == [
      f"{GC} ssh dpo {SCOPE} --worker=0 --command 'tail -n +1 -F \"$HOME\"/jaxpref_run/train.log'"]
  assert dry(capsys, "logs", "--name=dpo", "--zone=us-west4-a", "--worker=3")[0].startswith(
      f"{GC} ssh dpo {SCOPE} --worker=3 ")
  assert dry(capsys, "copy", "--name=dpo", "--zone=us-west4-a", "--workdir=runs/q",
             "--dest=gs://bkt/runs/q") == [
      f"{GC} ssh dpo {SCOPE} --worker=all --command "
      "'gcloud storage rsync --recursive jaxpref_run/runs/q gs://bkt/runs/q'"]
  # A gs:// workdir is in the bucket already: copied within GCS, from this machine.
  assert dry(capsys, "copy", "--name=dpo", "--zone=us-west4-a", "--workdir=gs://bkt/run",
             "--dest=gs://bkt/keep/run") == [
      "gcloud storage rsync --recursive gs://bkt/run gs://bkt/keep/run"]
  assert "nothing to copy" in error(capsys, "copy", "--name=a", "--zone=z",
                                    "--workdir=gs://b/r", "--dest=gs://b/r/")
  assert "gs://" in error(capsys, "copy", "--name=a", "--zone=z", "--workdir=w", "--dest=/tmp/x")
  assert dry(capsys, "delete", "--name=dpo", "--zone=us-west4-a") == [f"{GC} delete dpo {SCOPE} --quiet"]
  assert dry(capsys, "delete", "--name=dpo", "--zone=us-west4-a", "--queued") == [
      f"{QR} delete dpo {SCOPE} --force --quiet"]


def test_logs_from_every_worker(capsys):
  (line,) = dry(capsys, "logs", "--name=dpo", "--zone=us-east5-a", "--worker=all")
  cmd = shlex.split(line)
  assert cmd[:8] == [*GC.split(), "ssh", "dpo", "--zone=us-east5-a", "--worker=all"]
  assert cmd[-1] == 'tail -n +1 -F "$HOME"/jaxpref_run/train.log | sed -u "s/^/$(hostname): /"'
  _bash_ok(cmd[-1])
  lines = dry(capsys, "logs", "--name=dpo", "--zone=us-east5-a", "--gather=logs/run1",
              "--accelerator=v5p-32")
  assert lines == ["mkdir -p logs/run1"] + [
      f"{GC} scp dpo:jaxpref_run/train.log logs/run1/worker-{w}.log --zone=us-east5-a "
      f"--worker={w}" for w in range(4)]
  assert "--accelerator" in error(capsys, "logs", "--name=a", "--zone=z", "--gather=d")


def test_stop_terms_then_frees_the_tpu(capsys):
  (line,) = dry(capsys, "stop", "--name=dpo", "--zone=us-west4-a", "--grace=2m")
  cmd = shlex.split(line)
  assert cmd[:9] == [*GC.split(), "ssh", "dpo", SCOPE, "--worker=all", "--command"]
  pid = '"$HOME"/jaxpref_run/train.pid'
  assert cmd[9] == (
      f"if [ -f {pid} ] && kill -0 $(cat {pid}) 2>/dev/null; then p=$(cat {pid}); "
      'kill -TERM $p; echo "$(hostname): SIGTERM to $p"; '
      "for i in $(seq 120); do kill -0 $p 2>/dev/null || break; sleep 1; done; "
      'kill -0 $p 2>/dev/null && { echo "$(hostname): SIGKILL to $p"; kill -9 $p; }; '
      f"fi; rm -f {pid}; {FREE_TPU}")
  _bash_ok(cmd[9])


def test_up_is_create_install_run_in_order(capsys):
  common = ["--name=dpo", "--zone=us-west4-a"]
  up = dry(capsys, "up", *common, "--accelerator=v5litepod-8", "--git=https://g/j.git",
           "--flagfile=experiments/quickstart.flags", "--workdir=runs/q", "--follow", "--", "--steps=5")
  parts = (dry(capsys, "create", *common, "--accelerator=v5litepod-8")
           + dry(capsys, "install", *common, "--git=https://g/j.git")
           + dry(capsys, "run", *common, "--flagfile=experiments/quickstart.flags", "--workdir=runs/q",
                 "--follow", "--", "--steps=5"))
  assert up == parts and len(up) == 7


def test_unattended_up_is_one_create_with_a_startup_script(capsys, tmp_path):
  args = ["--name=u", "--zone=us-east5-a", "--git=https://g/j.git",
          "--flagfile=experiments/quickstart.flags", "--workdir=runs/q"]
  lines = dry(capsys, "up", *args, "--accelerator=v5p-64", "--queued", "--spot", "--unattended",
              "--", "--steps=5")
  boot = os.path.join(tempfile.gettempdir(), "jaxpref-u-startup.sh")
  assert lines == [
      f"{QR} create u --zone=us-east5-a --node-id=u --accelerator-type=v5p-64 "
      f"--runtime-version=v2-alpha-tpuv5 --spot --metadata-from-file=startup-script={boot}",
      lines[1]]  # the wait for ACTIVE; no ssh at all
  assert lines[1].startswith("bash -c ") and "ACTIVE" in lines[1]
  assert launch.main(["startup-script", *args, "--", "--steps=5"]) == 0
  script = capsys.readouterr().out
  with open(boot) as f:
    assert f.read() == script
  _bash_ok(script)
  assert script.startswith("#!/bin/bash\n")
  assert "uv venv --seed --python 3.11 /opt/jaxpref_venv" in script
  assert ("nohup /opt/jaxpref_venv/bin/jaxpref-train --flagfile=experiments/quickstart.flags "
          "--workdir=runs/q --steps=5 > train.log" in script)
  assert "sudo rm -f /tmp/libtpu_lockfile; cd /opt/jaxpref_run" in script
  # The embedded bundle unpacks to the flag and data files.
  b64 = script.split("<<'JAXPREF_BUNDLE'\n")[1].split("\nJAXPREF_BUNDLE")[0]
  import base64, io, tarfile
  with tarfile.open(fileobj=io.BytesIO(base64.b64decode(b64.replace("\n", "")))) as tar:
    assert "experiments/tiny.flags" in tar.getnames()
  assert "absolute --remote-dir" in error(capsys, "startup-script", *args, "--remote-dir=rel")
  assert "from --git" in error(capsys, "startup-script", *args[:2], "--sdist=setup.py", *args[3:])


def test_missing_flags_and_unknown_accelerator(capsys):
  assert "--zone" in error(capsys, "create", "--name=a", "--accelerator=v5p-8")
  assert "--name" in error(capsys, "delete", "--zone=z")
  assert "--accelerator" in error(capsys, "create", "--name=a", "--zone=z")
  err = error(capsys, "create", "--name=a", "--zone=z", "--accelerator=v5e-8")
  assert "unknown accelerator type 'v5e-8'" in err and "v5litepod-N" in err
  assert "only for run, up" in error(capsys, "delete", "--name=a", "--zone=z", "--", "--steps=1")


def test_cli_runs_without_jax_and_stops_on_first_failure(tmp_path):
  # A jax that cannot be imported proves the launcher never imports it.
  (tmp_path / "jax").mkdir()
  (tmp_path / "jax" / "__init__.py").write_text("raise ImportError('the launcher imported jax')\n")
  # A fake gcloud that fails: the launcher must stop after it, naming the command.
  (tmp_path / "bin").mkdir()
  fake = tmp_path / "bin" / "gcloud"
  fake.write_text("#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/calls\"\nexit 3\n")
  fake.chmod(0o755)
  env = dict(os.environ, PYTHONPATH=str(tmp_path), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
  args = [sys.executable, "tpu/launch.py", "up", "--name=n", "--zone=z", "--accelerator=v5p-8",
          "--git=https://g/j.git", "--flagfile=experiments/quickstart.flags", "--workdir=w"]
  ok = subprocess.run(args + ["--dry-run"], cwd=REPO, env=env, capture_output=True, text=True)
  assert ok.returncode == 0 and ok.stdout.startswith(f"{GC} create n"), ok.stderr
  bad = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
  assert bad.returncode == 1
  assert "error: stopped: exit status 3 from: gcloud compute tpus tpu-vm create n" in bad.stderr
  assert len((tmp_path / "bin" / "calls").read_text().splitlines()) == 1
