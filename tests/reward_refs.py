"""float64 numpy references of the reward-model losses and metrics, written from
docs/reward_models.md#formulas-and-sources (no jaxpref import). Rewards r [B, 2] (chosen, rejected), weights w [B],
scores s [B, 2], embeddings v [B, 2, 2k]."""

import numpy as np


def logsig(z):
  return np.where(z >= 0, -np.log1p(np.exp(-np.abs(z))), z - np.log1p(np.exp(-np.abs(z))))


def sig(z):
  return 1.0 / (1.0 + np.exp(-z))


def wmean(x, w):
  return np.sum(x * w) / np.sum(w)


def bt(r, w, eps=None, margin=0.0, tau=1.0, label_smoothing=0.0, center_rewards=0.0):
  e = label_smoothing if eps is None else eps
  z = (r[:, 0] - r[:, 1] - margin) / tau
  return wmean(-(1 - e) * logsig(z) - e * logsig(-z) + center_rewards * (r[:, 0] + r[:, 1]) ** 2, w)


def bt_adaptive_margin(r, w, s, margin_scale=1.0, margin_clip=0.0, tau=1.0):
  mu = s[:, 0] - s[:, 1]
  if margin_clip:
    mu = np.minimum(np.maximum(mu, -margin_clip), margin_clip)
  return wmean(-logsig((r[:, 0] - r[:, 1] - margin_scale * mu) / tau), w)


def bt_flip(r, w, s, flip_below=0.0, tau=1.0):
  out = []
  for (rw, rl), (sw, sl) in zip(r, s):
    if sw - sl < flip_below:
      rw, rl = rl, rw
    out.append(-logsig(np.array((rw - rl) / tau)))
  return wmean(np.array(out), w)


def bt_soft(r, w, s, tau=1.0, score_temperature=1.0):
  p = sig((s[:, 0] - s[:, 1]) / score_temperature)
  z = (r[:, 0] - r[:, 1]) / tau
  return wmean(-p * logsig(z) - (1 - p) * logsig(-z), w)


def rotation(k):
  """The block-diagonal R of GPM: k blocks [[0, -1], [1, 0]]."""
  R = np.zeros((2 * k, 2 * k))
  for b in range(k):
    R[2 * b, 2 * b + 1] = -1.0
    R[2 * b + 1, 2 * b] = 1.0
  return R


def gpm_score(vw, vl, gate=None):
  """<R v_w, v_l> as a matrix product, [B]; with `gate` [B, k] each pair's own
  R(x) = blockdiag(lambda_b [[0, -1], [1, 0]]) (GPM's prompt-gated eigenvalues)."""
  k = vw.shape[-1] // 2
  if gate is None:
    return np.einsum("bi,bi->b", vw @ rotation(k).T, vl)
  out = np.zeros(len(vw))
  for i in range(len(vw)):
    Rx = rotation(k) * np.repeat(gate[i], 2)[:, None]  # row 2b and 2b+1 scaled by lambda_b
    out[i] = vw[i] @ Rx.T @ vl[i]
  return out


def gpm_gate(h, W):
  """lambda(x) = k softmax(W h / sqrt(D)) (docs/reward_models.md#gpm), h [B, D], W [D, k]."""
  z = h @ W / np.sqrt(h.shape[-1])
  e = np.exp(z - z.max(-1, keepdims=True))
  return W.shape[1] * e / e.sum(-1, keepdims=True)


def gpm(v, w, tau=0.1, margin=0.0, normalize=False, gate=None):
  if normalize:
    v = v / np.linalg.norm(v, axis=-1, keepdims=True)
  s = gpm_score(v[:, 0], v[:, 1], gate)
  return wmean(-logsig((s - margin) / tau), w)


def ece(p, w, bins=10):
  """Confidence ECE (Guo et al. 2017) of P(chosen wins) = p: confidence max(p, 1-p), correct
  when p > 1/2 (a tie half), equal-width bins over [0, 1], bins weighted by pair weight."""
  conf = np.maximum(p, 1 - p)
  correct = np.where(p > 0.5, 1.0, np.where(p == 0.5, 0.5, 0.0))
  idx = np.minimum(np.floor(conf * bins), bins - 1).astype(int)
  total = 0.0
  for b in range(bins):
    sel = idx == b
    if sel.any():
      total += abs(np.sum(w[sel] * (conf[sel] - correct[sel]))) / np.sum(w)
  return total
