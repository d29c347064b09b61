"""float64 numpy references of every loss, written from the formulas in docs/losses.md.

Independent of the JAX code: no jaxpref import here. Each takes the float64 arrays
policy/ref/length/weight [B,K] / [B] (plus valid/scores for listwise) and hyperparameters,
and returns the scalar loss.
"""

import numpy as np


def logsig(z):
  return np.where(z >= 0, -np.log1p(np.exp(-np.abs(z))), z - np.log1p(np.exp(-np.abs(z))))


def sig(z):
  return np.exp(logsig(z))


def wmean(x, w):
  return np.sum(x * w) / np.sum(w)


def nll(policy, length, w):
  return np.sum(-policy[:, 0] * w) / np.sum(length[:, 0] * w)


def h_of(policy, ref):
  return (policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1])


def dpo(policy, ref, length, w, beta=0.1, label_smoothing=0.0, margin=0.0):
  z = beta * h_of(policy, ref) - margin
  return wmean(-(1 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z), w)


def robust_dpo(policy, ref, length, w, beta=0.1, label_smoothing=0.1):
  e, z = label_smoothing, beta * h_of(policy, ref)
  return wmean((-(1 - e) * logsig(z) + e * logsig(-z)) / (1 - 2 * e), w)


def ipo(policy, ref, length, w, beta=0.1, length_normalize=True):
  rho = policy - ref
  if length_normalize:
    rho = rho / length
  return wmean((rho[:, 0] - rho[:, 1] - 1 / (2 * beta)) ** 2, w)


def hinge(policy, ref, length, w, beta=0.1):
  return wmean(np.maximum(0, 1 - beta * h_of(policy, ref)), w)


def sigmoid_norm(policy, ref, length, w, beta=0.1):
  r = (policy - ref) / length
  return wmean(-logsig(beta * (r[:, 0] - r[:, 1])), w)


def rpo(policy, ref, length, w, beta=0.1, alpha=1.0):
  return wmean(-logsig(beta * h_of(policy, ref)), w) + alpha * nll(policy, length, w)


sft_dpo = rpo


def exo_pair(policy, ref, length, w, beta=0.1, label_smoothing=1e-3):
  e, z = max(label_smoothing, 1e-3), beta * h_of(policy, ref)
  return wmean(sig(z) * (logsig(z) - np.log(1 - e)) + sig(-z) * (logsig(-z) - np.log(e)), w)


def nca_pair(policy, ref, length, w, beta=0.1):
  r = beta * (policy - ref)
  return wmean(-logsig(r[:, 0]) - 0.5 * logsig(-r[:, 0]) - 0.5 * logsig(-r[:, 1]), w)


def bco_pair(policy, ref, length, w, beta=0.1):
  r = beta * (policy - ref)
  delta = np.sum(r * w[:, None]) / (2 * np.sum(w))
  return wmean(-logsig(r[:, 0] - delta) - logsig(delta - r[:, 1]), w)


def sppo_hard(policy, ref, length, w, beta=0.1):
  rho = policy - ref
  return wmean((rho[:, 0] - 0.5 / beta) ** 2 + (rho[:, 1] + 0.5 / beta) ** 2, w)


def _aot(a, b, w, beta, eps):
  real = w > 0
  d = np.sort(a[real]) - np.sort(b[real])
  z = beta * d
  return np.mean(-(1 - eps) * logsig(z) - eps * logsig(-z))


def aot(policy, ref, length, w, beta=0.1, label_smoothing=0.0):
  return _aot(policy[:, 0] - policy[:, 1], ref[:, 0] - ref[:, 1], w, beta, label_smoothing)


def aot_pair(policy, ref, length, w, beta=0.1, label_smoothing=0.0):
  rho = policy - ref
  return _aot(rho[:, 0], rho[:, 1], w, beta, label_smoothing)


def apo_zero(policy, ref, length, w, beta=0.1):
  r = beta * (policy - ref)
  return wmean(1 - sig(r[:, 0]) + sig(r[:, 1]), w)


def apo_down(policy, ref, length, w, beta=0.1):
  r = beta * (policy - ref)
  return wmean(sig(r[:, 0]) + 1 - sig(r[:, 0] - r[:, 1]), w)


def discopop(policy, ref, length, w, beta=0.1, tau=0.05):
  z = beta * h_of(policy, ref)
  m = sig(z / tau)
  with np.errstate(over="ignore", invalid="ignore"):
    exp_term = np.where(m > 0, np.exp(-z + np.log(np.maximum(m, 1e-300))), 0.0)
  return wmean((1 - m) * -logsig(z) + exp_term, w)


def gamma_dpo(policy, ref, length, w, beta=0.1, gamma=1.0):
  z = beta * ((policy[:, 0] - policy[:, 1]) + gamma * (ref[:, 1] - ref[:, 0]))
  return wmean(-logsig(z), w)


def flex_dpo(policy, ref, length, w, beta_chosen=0.1, beta_rejected=0.1):
  rho = policy - ref
  return wmean(-logsig(beta_chosen * rho[:, 0] - beta_rejected * rho[:, 1]), w)


def simpo(policy, ref, length, w, beta=2.0, gamma_beta_ratio=0.25, label_smoothing=0.0,
          hinge=False, sft_weight=0.0, length_normalize=True):
  a = policy / length if length_normalize else policy
  z = beta * ((a[:, 0] - a[:, 1]) - gamma_beta_ratio)
  per = np.maximum(0, 1 - z) if hinge else -(1 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z)
  return wmean(per, w) + sft_weight * nll(policy, length, w)


def orpo(policy, ref, length, w, beta=0.1):
  a = policy / length
  logodds = a - np.log(-np.expm1(a))
  return nll(policy, length, w) - beta * wmean(logsig(logodds[:, 0] - logodds[:, 1]), w)


def cpo(policy, ref, length, w, beta=0.1, alpha=1.0, label_smoothing=0.0):
  z = beta * (policy[:, 0] - policy[:, 1])
  per = -(1 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z)
  return wmean(per, w) + alpha * nll(policy, length, w)


# Listwise: loops over the ordered list, as the formulas read.

def _lse(x):
  m = np.max(x)
  return m + np.log(np.sum(np.exp(x - m)))


def listmle(policy, ref, length, w, valid, scores=None, beta=0.1):
  out = []
  for b in range(len(w)):
    s = beta * (policy[b] - ref[b])[valid[b]]
    out.append(sum(_lse(s[i:]) - s[i] for i in range(len(s))))
  return wmean(np.array(out), w)


def ranknet(policy, ref, length, w, valid, scores=None, beta=0.1):
  out = []
  for b in range(len(w)):
    s = beta * (policy[b] - ref[b])[valid[b]]
    terms = [-logsig(s[i] - s[j]) for i in range(len(s)) for j in range(i + 1, len(s))]
    out.append(np.mean(terms))
  return wmean(np.array(out), w)


def pro(policy, ref, length, w, valid, scores=None, sft_weight=0.05):
  out = []
  for b in range(len(w)):
    v = valid[b]
    s = (policy[b] / length[b])[v]
    n = len(s)
    r = None if scores is None else scores[b][v]
    total = 0.0
    for k in range(n - 1):
      if r is None:
        t = np.ones(n)
      else:
        t = np.zeros(n)
        t[k + 1:] = r[k] - r[k + 1:]
        t[k] = np.max(t[k + 1:])
      total += _lse(t[k:] * s[k:]) - t[k] * s[k]
    total += sft_weight * (n - 1) ** 2 * -policy[b, 0]
    out.append(total)
  return wmean(np.array(out), w)


def dpo_scored(policy, ref, length, w, scores, beta=0.1, margin=0.0, score_margin=0.0):
  z = beta * h_of(policy, ref) - (margin + score_margin * (scores[:, 0] - scores[:, 1]))
  return wmean(-logsig(z), w)


def sppo(policy, ref, length, w, scores, beta=0.1):
  rho = policy - ref
  return wmean(0.5 * ((rho[:, 0] - (scores[:, 0] - 0.5) / beta) ** 2
                      + (rho[:, 1] - (scores[:, 1] - 0.5) / beta) ** 2), w)


def osp(policy, ref, length, w, scores, beta=0.1, temperature=1.0):
  p = sig((scores[:, 0] - scores[:, 1]) / temperature)
  z = beta * h_of(policy, ref)
  return wmean(-(p * logsig(z) + (1 - p) * logsig(-z)), w)


# Unpaired: member 0 labelled (label 1/0), member 1 the mismatched KL completion.

def _kto_form(rho, label, w, beta, wd, wu, z):
  per = np.where(label == 1, wd * (1 - sig(beta * (rho - z))), wu * (1 - sig(beta * (z - rho))))
  return wmean(per, w)


def kto(policy, ref, length, w, label, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
  rho = policy - ref
  z = max(0.0, wmean(rho[:, 1], w))
  return _kto_form(rho[:, 0], label, w, beta, desirable_weight, undesirable_weight, z)


def apo(policy, ref, length, w, label, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0,
        kl_min=-5.0, kl_max=5.0):
  rho = policy - ref
  z = min(max(wmean(rho[:, 1], w), kl_min), kl_max)
  return _kto_form(rho[:, 0], label, w, beta, desirable_weight, undesirable_weight, z)


def apo_zero_unpaired(policy, ref, length, w, label, beta=0.1):
  r = beta * (policy - ref)[:, 0]
  return wmean(np.where(label == 1, 1 - sig(r), sig(r)), w)


def bco(policy, ref, length, w, label, beta=0.1):
  r = beta * (policy - ref)[:, 0]
  delta = wmean(r, w)
  return wmean(np.where(label == 1, -logsig(r - delta), -logsig(delta - r)), w)


def f_dpo(policy, ref, length, w, beta=0.1, divergence="reverse_kl", alpha=1.0, label_smoothing=0.0):
  rho = policy - ref
  if divergence == "reverse_kl":
    logit = rho[:, 0] - rho[:, 1]
  elif divergence == "js_divergence":
    # log(2u/(1+u)) at u = exp(rho), differenced between chosen and rejected.
    f = lambda r: np.log(2.0) + r - np.logaddexp(0.0, r)
    logit = f(rho[:, 0]) - f(rho[:, 1])
  else:
    logit = (np.exp(-alpha * rho[:, 1]) - np.exp(-alpha * rho[:, 0])) / alpha
  z = beta * logit
  return wmean(-(1 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z), w)


def sft(policy, ref, length, w):
  return nll(policy, length, w)


def ld_dpo(policy_tok, ref, mask, w, beta=0.1, ld_alpha=0.5, label_smoothing=0.0):
  """policy_tok/mask [B,2,T]; ref [B,2] summed."""
  b = policy_tok.shape[0]
  pol = np.zeros((b, 2))
  for i in range(b):
    lengths = [int(mask[i, k].sum()) for k in range(2)]
    public = min(lengths)
    for k in range(2):
      resp = policy_tok[i, k][mask[i, k] > 0]  # response tokens in order
      pol[i, k] = resp[:public].sum() + ld_alpha * resp[public:].sum()
  z = beta * ((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1]))
  return wmean(-(1 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z), w)


def ranklist(policy, ref, length, w, valid, scores=None, beta=0.1, skip=0):
  out = []
  for b in range(len(w)):
    s = beta * (policy[b] - ref[b])[valid[b]]
    if skip == 0:
      out.append(sum(-logsig(s[i] - _lse(s[i + 1:])) for i in range(len(s) - 1)))
    else:
      out.append(sum(-logsig(s[i] - s[i + skip]) for i in range(len(s) - skip)))
  return wmean(np.array(out), w)


def hierarchical_pairwise(policy, ref, length, w, valid, scores=None, beta=0.1, tau=1.0, margin=0.0):
  out = []
  for b in range(len(w)):
    s = beta * (policy[b] - ref[b])[valid[b]]
    terms = [-logsig((s[i] - s[j]) / tau - margin * (j - i))
             for i in range(len(s)) for j in range(i + 1, len(s))]
    out.append(np.mean(terms))
  return wmean(np.array(out), w)


def spo(policy, ref, length, w, scores=None, beta=0.1, degree_weight=0.1, num_degrees=4,
        degree_margin=1.0):
  """DPO + degree_weight * CE of the degree class (score gap, rounded, clipped) under a
  softmax whose class c has logit -(z - c * degree_margin)^2 / 2, z = beta h."""
  z = beta * h_of(policy, ref)
  per = -logsig(z)
  if scores is not None:
    for b in range(len(w)):
      d = int(min(max(np.round(scores[b, 0] - scores[b, 1]), 0), num_degrees - 1))
      logits = np.array([-0.5 * (z[b] - c * degree_margin) ** 2 for c in range(num_degrees)])
      per[b] += degree_weight * (_lse(logits) - logits[d])
  return wmean(per, w)


def lipo_list(s, psi):
  """LiPO-lambda on one list of valid members: mean over psi_i > psi_j of
  |2^psi_i - 2^psi_j| |1/log2(1 + tau_i) - 1/log2(1 + tau_j)| (-logsig(s_i - s_j)),
  tau the 1-based rank under s (descending, ties by position)."""
  n = len(s)
  tau = np.empty(n)
  for rank, i in enumerate(sorted(range(n), key=lambda i: (-s[i], i)), start=1):
    tau[i] = rank
  terms = []
  for i in range(n):
    for j in range(n):
      if psi[i] > psi[j]:
        delta = abs(2.0 ** psi[i] - 2.0 ** psi[j]) * abs(1 / np.log2(1 + tau[i]) - 1 / np.log2(1 + tau[j]))
        terms.append(delta * -logsig(s[i] - s[j]))
  return np.mean(terms) if terms else 0.0


def lipo(policy, ref, length, w, valid, scores=None, beta=0.1):
  out = []
  for b in range(len(w)):
    s = beta * (policy[b] - ref[b])[valid[b]]
    psi = scores[b][valid[b]] if scores is not None else np.arange(len(s))[::-1].astype(float)
    out.append(lipo_list(s, psi))
  return wmean(np.array(out), w)


def wpo(policy, ref, length, w, beta=0.01, label_smoothing=0.0, align=True, prob_sq=None):
  """cDPO per pair times pi(y_w)^(1/L_w) * pi(y_l)^(1/L_l) (capped at 1), the weight
  evaluated as a number (no gradient flows through it in the loss). `align`: each token's
  probability is first divided by sum_v pi(v)^2, i.e. S - prob_sq in place of S."""
  s = policy - prob_sq if align else policy
  weight = np.minimum(np.exp(s[:, 0] / length[:, 0]) * np.exp(s[:, 1] / length[:, 1]), 1.0)
  z = beta * h_of(policy, ref)
  return wmean(weight * (-(1 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z)), w)


def mcts_dpo_scored(policy, ref, length, w, scores=None, beta=0.1, conservative=True, ipo=False,
                    length_normalize=False, length_penalty=1.0):
  """MCTS-DPO per pair as the official trainer's loop reads: scores = visit counts."""
  out = []
  for b in range(len(w)):
    r_w, r_l = policy[b, 0] - ref[b, 0], policy[b, 1] - ref[b, 1]
    if length_normalize or ipo:
      r_w, r_l = r_w / length[b, 0] ** length_penalty, r_l / length[b, 1] ** length_penalty
    h = r_w - r_l
    if ipo:
      out.append((h - 1 / (2 * beta)) ** 2)
      continue
    eps = 0.0
    if conservative and scores is not None:
      n_w, n_l = max(scores[b, 0], 0.0), max(scores[b, 1], 0.0)
      confidence = 1 / (1 + n_l / max(1.0, n_w))
      eps = min(1 - confidence, 0.5)
    out.append(-(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h))
  return wmean(np.array(out), w)


def mcts_dpo(policy, ref, length, w, **hp):
  return mcts_dpo_scored(policy, ref, length, w, None, **hp)
