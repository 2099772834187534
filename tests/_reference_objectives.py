"""Independent float64 NumPy reference of the objectives in ESPO.md (test helper).

Written from the formulas with explicit Python loops over sequences, groups and tokens;
it shares no code with espo_jax. Gradients with respect to logp are derived by hand,
honouring the stop-gradients of each objective. Inputs are arrays [B, T]; `adv` [B, T].
"""
from __future__ import annotations

import math

import numpy as np

DEFAULTS = {
    "grpo": dict(clip_low=0.2, clip_high=0.2, clip_ratio_c=None),
    "dapo": dict(clip_low=0.2, clip_high=0.28, clip_ratio_c=None),
    "gspo": dict(clip_low=3e-4, clip_high=4e-4),
    "gmpo": dict(clip_low=0.4, clip_high=0.4),
    "cispo": dict(clip_low=None, clip_high=4.0),
    "espo": dict(grouping="top_fraction", top_fraction=0.2, num_groups=4, entropy_edges=None,
                 token_ratio="group", clip_mode="adaptive", alpha=0.02, vocab_size=None,
                 eps_min=None, eps_max=None, clip_low=3e-4, clip_high=4e-4),
}


def ranks(entropy_row, valid_row):
    """Valid positions ordered by (entropy desc, position asc)."""
    positions = [t for t in range(len(valid_row)) if valid_row[t]]
    return sorted(positions, key=lambda t: (-float(entropy_row[t]), t))


def groups_of_row(entropy_row, valid_row, grouping, top_fraction=0.2, num_groups=4, entropy_edges=None):
    """dict group id -> list of positions (only non-empty groups)."""
    order = ranks(entropy_row, valid_row)
    L = len(order)
    out = {}
    for k, t in enumerate(order):
        if grouping == "top_fraction":
            n = math.ceil(top_fraction * L - 1e-6)
            gid = 0 if k < n else 1
        elif grouping == "quantile":
            gid = (k * num_groups) // L
        elif grouping == "ranges":
            gid = sum(1 for edge in entropy_edges if edge > entropy_row[t])
        elif grouping == "token":
            gid = k
        elif grouping == "sequence":
            gid = 0
        else:
            raise ValueError(grouping)
        out.setdefault(gid, []).append(t)
    return out


def group_ids(entropy, mask, grouping, **params):
    g = -np.ones(entropy.shape, np.int64)
    for i in range(entropy.shape[0]):
        for gid, members in groups_of_row(entropy[i], mask[i] != 0, grouping, **params).items():
            for t in members:
                g[i, t] = gid
    return g


def _clamp(x, m):
    return min(max(x, -m), m)


def _min_form(s, ds, adv, lo, hi, dual=None):
    """(loss, dloss/dlogp_t, clipped) of -min(sA, clip(s, lo, hi)A) for one token."""
    l1 = -adv * s
    l2 = -adv * min(max(s, lo), hi)
    if l2 > l1:
        loss, grad, clipped = l2, 0.0, True
    else:
        loss, grad, clipped = l1, -adv * ds, False
    if dual is not None and adv < 0 and -adv * dual < loss:
        loss, grad, clipped = -adv * dual, 0.0, True
    return loss, grad, clipped


def objective(name, logp, old, adv, mask, entropy=None, ref_logp=None, *, max_log_ratio=20.0,
              beta=0.0, **hp):
    """Returns (loss, grad [B, T], dict clip_frac/clip_frac_high/clip_frac_low)."""
    hp = {**DEFAULTS[name], **hp}
    logp, old, adv = (np.asarray(a, np.float64) for a in (logp, old, adv))
    valid = np.asarray(mask) != 0
    B, T = logp.shape
    m = max_log_ratio
    lengths = [int(valid[i].sum()) for i in range(B)]
    n_seq = sum(1 for L in lengths if L > 0)
    n_tok = sum(lengths)
    loss = 0.0
    grad = np.zeros((B, T))
    clip = np.zeros((B, T), bool)
    capped_high = np.zeros((B, T), bool)
    capped_low = np.zeros((B, T), bool)
    weight = np.zeros((B, T))
    for i in range(B):
        L = lengths[i]
        if L == 0:
            continue
        toks = [t for t in range(T) if valid[i, t]]
        d = {t: logp[i, t] - old[i, t] for t in toks}
        if name in ("grpo", "dapo"):
            for t in toks:
                w = 1.0 / (n_seq * L) if name == "grpo" else 1.0 / n_tok
                s = math.exp(_clamp(d[t], m))
                ds = s if abs(d[t]) < m else 0.0
                lt, gt, c = _min_form(s, ds, adv[i, t], 1 - hp["clip_low"], 1 + hp["clip_high"],
                                      hp["clip_ratio_c"])
                loss += w * lt
                grad[i, t] += w * gt
                clip[i, t], weight[i, t] = c, w
        elif name == "gspo":
            s = math.exp(_clamp(sum(d.values()) / L, m))
            for t in toks:
                w = 1.0 / (n_seq * L)
                lt, gt, c = _min_form(s, s, adv[i, t], 1 - hp["clip_low"], 1 + hp["clip_high"])
                loss += w * lt
                grad[i, t] += w * gt
                clip[i, t], weight[i, t] = c, w
        elif name == "espo":
            groups = groups_of_row(entropy[i], valid[i], hp["grouping"], hp["top_fraction"],
                                   hp["num_groups"], hp["entropy_edges"])
            K = len(groups)
            for members in groups.values():
                mean_d = sum(d[t] for t in members) / len(members)
                s_group = math.exp(_clamp(mean_d, m))
                if hp["clip_mode"] == "adaptive":
                    eps = hp["alpha"] * (sum(entropy[i, t] for t in members) / len(members)) \
                        / math.log(hp["vocab_size"])
                    if hp["eps_min"] is not None:
                        eps = max(eps, hp["eps_min"])
                    if hp["eps_max"] is not None:
                        eps = min(eps, hp["eps_max"])
                    lo, hi = 1 - eps, 1 + eps
                else:
                    lo, hi = 1 - hp["clip_low"], 1 + hp["clip_high"]
                for t in members:
                    if hp["token_ratio"] == "group":
                        s, ds = s_group, s_group
                    else:
                        s = s_group * math.exp(_clamp(d[t], m))
                        ds = s if abs(d[t]) < m else 0.0
                    w = 1.0 / (n_seq * K * len(members))
                    lt, gt, c = _min_form(s, ds, adv[i, t], lo, hi)
                    loss += w * lt
                    grad[i, t] += w * gt
                    clip[i, t], weight[i, t] = c, w
        elif name == "gmpo":
            cl, ch = hp["clip_low"], hp["clip_high"]
            star, keep = {}, {}
            for t in toks:
                a = adv[i, t]
                cut = (a > 0 and d[t] > ch) or (a < 0 and d[t] < -cl)
                clip[i, t] = cut
                star[t] = min(max(d[t], -cl), ch) if cut else d[t]
                keep[t] = 0.0 if cut else 1.0
            mean_star = sum(star.values()) / L
            R = math.exp(_clamp(mean_star, m))
            dR = R if abs(mean_star) < m else 0.0
            abar = sum(adv[i, t] for t in toks) / L
            loss += -abar * R / n_seq
            for t in toks:
                grad[i, t] += -abar * dR * keep[t] / L / n_seq
                weight[i, t] = 1.0 / (n_seq * L)
        elif name == "cispo":
            for t in toks:
                r = math.exp(_clamp(d[t], m))
                wis = r
                if hp["clip_high"] is not None and r > 1 + hp["clip_high"]:
                    wis, capped_high[i, t] = 1 + hp["clip_high"], True
                if hp["clip_low"] is not None and r < 1 - hp["clip_low"]:
                    wis, capped_low[i, t] = 1 - hp["clip_low"], True
                w = 1.0 / n_tok
                loss += -w * wis * adv[i, t] * logp[i, t]
                grad[i, t] += -w * wis * adv[i, t]
                weight[i, t] = w
        else:
            raise ValueError(name)
        if ref_logp is not None and beta > 0:
            for t in toks:
                x = _clamp(ref_logp[i, t] - logp[i, t], m)
                loss += beta * weight[i, t] * (math.exp(x) - x - 1)
                if abs(ref_logp[i, t] - logp[i, t]) < m:
                    grad[i, t] += beta * weight[i, t] * (1 - math.exp(x))
    denom = max(n_tok, 1)
    if name == "cispo":
        fracs = dict(clip_frac=(capped_high | capped_low).sum() / denom,
                     clip_frac_high=capped_high.sum() / denom, clip_frac_low=capped_low.sum() / denom)
    else:
        fracs = dict(clip_frac=clip.sum() / denom, clip_frac_high=(clip & (adv > 0)).sum() / denom,
                     clip_frac_low=(clip & (adv < 0)).sum() / denom)
    return loss, grad, fracs


def advantages(rewards, group_size, estimator="grpo", gradable=None, valid_only=False, eps=1e-6):
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    for start in range(0, len(rewards), group_size):
        idx = [j for j in range(start, start + group_size)
               if not valid_only or bool(gradable[j])]
        if not idx:
            continue
        vals = [rewards[j] for j in idx]
        mu = sum(vals) / len(vals)
        for j in idx:
            if estimator == "drgrpo":
                out[j] = rewards[j] - mu
            elif len(idx) > 1:
                sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1))
                out[j] = (rewards[j] - mu) / (sd + eps)
    return out


# ----------------------------------------------------------------------------- test data
ENTROPY_LEVELS = np.array([0.0, 0.0, 0.3, 0.3, 0.9, 1.5, 1.5, 2.2, 3.0, 4.5])  # many ties, zeros


def make_batch(seed, B=6, T=12, lengths=None, per_token_adv=False, garbage=True):
    """Random batch with variable lengths (incl. an empty row and a full row), a row with
    holes in its mask, entropy ties, a spread of per-row policy shifts so every clip range
    is exercised, and NaN/inf garbage in the masked positions."""
    rng = np.random.default_rng(seed)
    if lengths is None:
        lengths = [T, 0] + list(rng.integers(1, T + 1, size=B - 2))
    mask = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
    if B > 3 and lengths[3] > 3:
        mask[3, 1] = False  # a hole: masks need not be prefixes
    scales = np.array([0.001, 0.01, 0.05, 0.3, 1.0, 2.0])[rng.integers(0, 6, size=B)][:, None]
    logp = -rng.uniform(0.05, 3.0, size=(B, T))
    old = logp - scales * rng.standard_normal((B, T))
    entropy = rng.choice(ENTROPY_LEVELS, size=(B, T)) + (rng.random((B, T)) < 0.3) * rng.random((B, T))
    if per_token_adv:
        adv = rng.standard_normal((B, T))
    else:
        adv = rng.standard_normal(B)
        adv[rng.integers(0, B)] = 0.0
    ref = logp + 0.2 * rng.standard_normal((B, T))
    if garbage:
        logp = np.where(mask, logp, -np.inf)
        old = np.where(mask, old, np.nan)
        entropy = np.where(mask, entropy, np.nan)
        ref = np.where(mask, ref, np.inf)
        if per_token_adv:
            adv = np.where(mask, adv, np.nan)
    f32 = lambda x: np.asarray(x, np.float32)
    return dict(logp=f32(logp), old=f32(old), adv=f32(adv), mask=mask, entropy=f32(entropy), ref=f32(ref))
