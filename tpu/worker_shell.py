"""The shell that tpu/launch.py runs on every TPU worker (over ssh or as a startup script).

Kept apart from the gcloud plumbing so each piece can be read, and tested, as the exact
text a worker executes. Stdlib only.
"""

from __future__ import annotations

import shlex

PYTHON = "3.11"  # jax 0.10 needs >= 3.11; TPU VM images ship Ubuntu 22.04's 3.10
UV_URL = "https://astral.sh/uv/install.sh"
LOCKFILE = "/tmp/libtpu_lockfile"  # left behind by a killed run: the next one cannot start
PID = "train.pid"


def path(p: str) -> str:
  """A shell word for a worker path: relative ones are under $HOME whatever the cwd is."""
  return shlex.quote(p) if p.startswith("/") else f'"$HOME"/{shlex.quote(p)}'


def venv(venv_dir: str, via: str) -> str:
  """Makes a Python >= 3.11 virtualenv at venv_dir unless one is there.

  uv: a standalone CPython from uv's builds, no root needed. deadsnakes: Ubuntu's PPA of
  newer CPythons, through apt (needs sudo, which TPU VM users have).
  """
  v = path(venv_dir)
  if via == "uv":
    make = (f"{{ command -v uv >/dev/null || [ -x \"$HOME\"/.local/bin/uv ] || "
            f"curl -LsSf {UV_URL} | env UV_INSTALL_DIR=\"$HOME\"/.local/bin "
            f"UV_NO_MODIFY_PATH=1 sh; }} && "
            f"PATH=\"$HOME/.local/bin:$PATH\" uv venv --seed --python {PYTHON} {v}")
  elif via == "deadsnakes":
    make = (f"sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get update -y && "
            f"sudo apt-get install -y python{PYTHON} python{PYTHON}-venv && "
            f"python{PYTHON} -m venv {v}")
  else:
    raise ValueError(f"unknown way to get Python {PYTHON}: {via!r}")
  check = (f"{v}/bin/python -c 'import sys; assert sys.version_info >= (3, 11), sys.version'")
  return f"{{ [ -x {v}/bin/python ] || {{ {make}; }}; }} && {check}"


def install(venv_dir: str, via: str, spec: str) -> str:
  """The venv, then `pip install spec` into it (pip, not uv pip: `./x.tar.gz[tpu]` works)."""
  pip = f"{path(venv_dir)}/bin/python -m pip"
  return (f"{venv(venv_dir, via)} && {pip} install --upgrade pip && "
          f"{pip} install {shlex.quote(spec)}")


def free_tpu() -> str:
  """Kills whatever still holds the TPU (a crashed or orphaned run) and clears libtpu's
  lockfile: otherwise the next run fails with 'TPU in use' or hangs at start-up."""
  # The TPU device files are /dev/accel* on v2-v4 and /dev/vfio/N on v5e, v5p and v6e;
  # /proc rather than lsof, which not every image has.
  return ("pids=$(sudo find /proc/[0-9]*/fd \\( -lname '/dev/accel*' -o -lname '/dev/vfio/[0-9]*' "
          "\\) 2>/dev/null | cut -d/ -f3 | sort -u); "
          f'if [ -n "$pids" ]; then echo "killing TPU holders: $pids"; sudo kill -9 $pids; '
          f"sleep 2; fi; sudo rm -f {LOCKFILE}")


def start(rdir: str, venv_dir: str, train: list[str], log: str) -> str:
  """From inside the unpacked bundle at rdir: free the TPU, start train under nohup with the
  venv's jaxpref-train, and leave its pid in rdir for `stop`."""
  exe = f"{path(venv_dir)}/bin/{shlex.join(train)}"
  return (f"{free_tpu()}; cd {path(rdir)} || exit 1; "
          f"nohup {exe} > {log} 2>&1 < /dev/null & echo $! > {PID}; "
          f'echo "started on $(hostname): pid $!, log {rdir}/{log}"')


def stop(rdir: str, grace: int) -> str:
  """SIGTERM (jaxpref checkpoints on it), up to `grace` seconds for it to exit, SIGKILL, then
  `free_tpu`. Exits 0 when nothing was running."""
  pid = f"{path(rdir)}/{PID}"
  return (f"if [ -f {pid} ] && kill -0 $(cat {pid}) 2>/dev/null; then p=$(cat {pid}); "
          f'kill -TERM $p; echo "$(hostname): SIGTERM to $p"; '
          f"for i in $(seq {grace}); do kill -0 $p 2>/dev/null || break; sleep 1; done; "
          f'kill -0 $p 2>/dev/null && {{ echo "$(hostname): SIGKILL to $p"; kill -9 $p; }}; '
          f"fi; rm -f {pid}; {free_tpu()}")


def startup_script(*, via: str, spec: str, bundle_b64: str, train: list[str], log: str,
                   rdir: str, venv_dir: str) -> str:
  """A boot script for unattended runs: runs as root on every worker at every boot, so after
  a maintenance restart the run resumes from its work dir's last checkpoint."""
  if not (rdir.startswith("/") and venv_dir.startswith("/")):
    raise ValueError("a startup script runs as root with no user home: give absolute "
                     "--remote-dir and --venv")
  lines = [
      "#!/bin/bash",
      "# jaxpref unattended run, written by tpu/launch.py; runs as root at every boot.",
      "exec >> /var/log/jaxpref-startup.log 2>&1",
      'export HOME="${HOME:-/root}"',
      "export UV_PYTHON_INSTALL_DIR=/opt/uv-python  # outside any home, readable by all",
      f"{install(venv_dir, via, spec)} || exit 1",
      f"mkdir -p {shlex.quote(rdir)}",
      f"base64 -d > {shlex.quote(rdir)}/bundle.tar.gz <<'JAXPREF_BUNDLE'",
      *[bundle_b64[i:i + 76] for i in range(0, len(bundle_b64), 76)],
      "JAXPREF_BUNDLE",
      f"tar -xzf {shlex.quote(rdir)}/bundle.tar.gz -C {shlex.quote(rdir)} || exit 1",
      start(rdir, venv_dir, train, log),
      ""]
  return "\n".join(lines)
