"""PNG plots of a run's metrics, and of several runs side by side."""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from jaxpref import paths  # noqa: E402

PANELS = (("loss", "loss"), ("rewards/margin", "reward margin"), ("rewards/accuracy", "reward accuracy"))
ONLINE_PANELS = (("reward/mean", "reward"), ("loss", "loss"), ("length/mean", "response length"))


def _series(rows: Sequence[dict], split: str, key: str):
  pts = [(r["step"], r[key]) for r in rows if r["split"] == split and key in r]
  return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(rows: Sequence[dict], path: str, title: str = "",
             panels: Sequence[tuple[str, str]] = PANELS) -> None:
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
  for ax, (key, label) in zip(axes, panels):
    for split, style in (("train", "-"), ("eval", "o-")):
      xs, ys = _series(rows, split, key)
      if xs:
        ax.plot(xs, ys, style, label=split, markersize=3)
    ax.set_title(label)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  with paths.open(path, "wb") as f:  # a gs:// workdir's too
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)


def plot_runs(runs: Mapping[str, Sequence[dict]], path: str, split: str = "eval",
              panels: Sequence[tuple[str, str]] = PANELS) -> None:
  """One panel per metric, one line per run (a sweep's comparison plot); legend at the right."""
  colors = plt.cm.tab20.colors
  styles = ("-", "--", ":")
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 2.2, 3.6))
  for ax, (key, label) in zip(axes, panels):
    for i, (name, rows) in enumerate(runs.items()):
      xs, ys = _series(rows, split, key)
      if xs:
        ax.plot(xs, ys, styles[i // len(colors) % len(styles)], color=colors[i % len(colors)],
                marker="o", markersize=2.5, label=name)
    ax.set_title(f"{split} {label}")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="center right", fontsize=7, ncol=1 + len(labels) // 16)
  fig.tight_layout(rect=(0, 0, 1 - 0.07 * (1 + len(labels) // 16), 1))
  with paths.open(path, "wb") as f:  # a gs:// workdir's too
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)
