"""The sweep report's plots (matplotlib, Agg)."""
from __future__ import annotations

import pathlib

import numpy as np

from harness.results import VariantResult


def _plt():
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    return plt


def _colors(n: int):
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def smooth(ys: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average along the last axis (window 1 = unchanged)."""
    if window <= 1 or ys.shape[-1] < window:
        return ys
    c = np.cumsum(np.pad(ys, [(0, 0)] * (ys.ndim - 1) + [(1, 0)]), axis=-1)
    out = np.empty_like(ys)
    n = ys.shape[-1]
    for i in range(n):
        lo = max(0, i + 1 - window)
        out[..., i] = (c[..., i + 1] - c[..., lo]) / (i + 1 - lo)
    return out


def _band(ax, res: VariantResult, key: str, color, *, min_step: int = 0, label=None):
    """Seed mean with a min..max band; per-update series (min_step=1) of more than 40 steps
    are smoothed with a trailing moving average of len/20 steps (said in the label)."""
    x, ys = res.stack(key, min_step=min_step)
    if not len(x):
        return
    w = max(1, len(x) // 20) if min_step >= 1 and len(x) > 40 else 1
    ys = smooth(ys, w)
    if w > 1:
        label = f"{label or res.variant.name} (avg {w})"
    m = ys.mean(0)
    ax.plot(x, m, color=color, lw=1.6, label=label or res.variant.name,
            marker="o" if len(x) <= 12 else None, ms=3)
    if ys.shape[0] > 1:
        ax.fill_between(x, ys.min(0), ys.max(0), color=color, alpha=0.18, lw=0)


def _save(plt, fig, path: pathlib.Path) -> pathlib.Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _metric_plot(results, path: pathlib.Path, key: str, ylabel: str, title: str, *,
                 min_step: int = 1, target: float | None = None) -> pathlib.Path:
    """One panel: ``key`` over steps, one band (mean over seeds, min..max) per result."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=90)
    for res, c in zip(results, _colors(len(results))):
        _band(ax, res, key, c, min_step=min_step)
    if target is not None:
        ax.axhline(target, color="grey", ls=":", lw=1, label=f"target {target:.2f}")
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(plt, fig, path)


def plot_accuracy(results, path: pathlib.Path, *, target: float | None = None, title=""):
    return _metric_plot(results, path, "eval_accuracy", "greedy eval accuracy",
                        title or "Eval accuracy (mean over seeds; band = min..max)",
                        min_step=0, target=target)


def plot_clip(results, path: pathlib.Path, *, title=""):
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=90, sharey=False)
    for key, ax in zip(("clip_frac_high", "clip_frac_low"), axes):
        for res, c in zip(results, _colors(len(results))):
            _band(ax, res, key, c, min_step=1)
        ax.set(xlabel="step", ylabel=key.replace("_", " "),
               title=("high: A > 0, ratio above range" if key.endswith("high")
                      else "low: A < 0, ratio below range"))
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title or "Clip fractions per update (mean over seeds; band = min..max)",
                 fontsize=10)
    return _save(plt, fig, path)


def plot_entropy_clip(res: VariantResult, path: pathlib.Path, *, title=""):
    """One variant's old-policy entropy and clip fraction over training on twin axes."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=90)
    _band(ax, res, "entropy_mean", "tab:blue", min_step=1, label="entropy (nats/token)")
    ax.set(xlabel="step", ylabel="mean token entropy (nats)")
    ax.yaxis.label.set_color("tab:blue")
    ax2 = ax.twinx()
    _band(ax2, res, "clip_frac", "tab:red", min_step=1, label="clip fraction")
    ax2.set_ylabel("clip fraction")
    ax2.yaxis.label.set_color("tab:red")
    h = ax.get_legend_handles_labels()
    h2 = ax2.get_legend_handles_labels()
    ax.legend(h[0] + h2[0], h[1] + h2[1], fontsize=8, loc="upper center")
    ax.grid(alpha=0.3)
    ax.set_title(title or f"{res.variant.name}: entropy and clip fraction over training")
    return _save(plt, fig, path)


def plot_groups(res: VariantResult, path: pathlib.Path, *, title="") -> pathlib.Path | None:
    """ESPO's per-group metrics (group<k>/clip_frac, group<k>/eps_mean) over training."""
    keys = sorted({k.split("/")[0] for rec in res.records for r in rec for k in r
                   if k.startswith("group") and "/" in k})
    if not keys:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=90)
    for g, c in zip(keys, _colors(len(keys))):
        _band(axes[0], res, f"{g}/clip_frac", c, min_step=1, label=g)
        _band(axes[1], res, f"{g}/eps_mean", c, min_step=1, label=g)
    axes[0].set(xlabel="step", ylabel="clip fraction", title="clip fraction by entropy group")
    axes[1].set(xlabel="step", ylabel="mean ε", title="adaptive clip range ε by group",
                yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or f"{res.variant.name}: per-group metrics (group 0 = highest entropy)",
                 fontsize=10)
    return _save(plt, fig, path)


def plot_length(results, path: pathlib.Path, *, title=""):
    return _metric_plot(results, path, "response_len_mean", "mean response length (tokens)",
                        title or "Response length (sampled, mean over seeds; band = min..max)")


def plot_minibatch_clip(results, path: pathlib.Path, *, max_updates: int = 4, title=""):
    """Clip fraction of each minibatch update u (``minibatch{u}/clip_frac``): u = 0 is
    on-policy, u >= 1 off-policy; one panel per logged u (at most ``max_updates``), one
    line per arm."""
    found = {int(k.split("/")[0][len("minibatch"):]) for res in results for rec in res.records
             for r in rec for k in r if k.startswith("minibatch") and k.endswith("/clip_frac")
             and k.count("/") == 1}
    updates = max(1, min(max_updates, max(found, default=0) + 1))
    plt = _plt()
    fig, axes = plt.subplots(1, updates, figsize=(3.2 * updates, 3.4), dpi=90, sharey=True)
    axes = np.atleast_1d(axes)
    for u, ax in enumerate(axes):
        for res, c in zip(results, _colors(len(results))):
            _band(ax, res, f"minibatch{u}/clip_frac", c, min_step=1)
        ax.set(xlabel="step", title=f"minibatch {u}" + (" (on-policy)" if u == 0 else ""))
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("clip fraction")
    axes[0].legend(fontsize=7)
    fig.suptitle(title or "Clip fraction per minibatch update (mean over seeds; band = "
                 "min..max)", fontsize=10)
    return _save(plt, fig, path)


def plot_entropy(results, path: pathlib.Path, *, title=""):
    return _metric_plot(results, path, "entropy_mean", "mean token entropy (nats)",
                        title or "Old-policy entropy of sampled tokens (mean over seeds; "
                                 "band = min..max)")


def plot_group_clip_vs_entropy(res: VariantResult, path: pathlib.Path, *, title=""
                               ) -> pathlib.Path | None:
    """ESPO's per-group clip fraction against its mean entropy, one point per (step,
    seed-mean), coloured by step: does the clip fraction rise as entropy falls?"""
    groups = sorted({k.split("/")[0] for rec in res.records for r in rec for k in r
                     if k.startswith("group") and k.endswith("/clip_frac")})
    if not groups:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), 3.8), dpi=90,
                             squeeze=False)
    for g, ax in zip(groups, axes[0]):
        xe, e = res.stack("entropy_mean", min_step=1)
        xc, c = res.stack(f"{g}/clip_frac", min_step=1)
        common = np.intersect1d(xe, xc)
        if not len(common):
            continue
        ev = e[:, np.searchsorted(xe, common)].mean(0)
        cv = c[:, np.searchsorted(xc, common)].mean(0)
        sc = ax.scatter(ev, cv, c=common, cmap="viridis", s=14)
        ax.set(xlabel="mean token entropy (nats)", ylabel=f"{g} clip fraction",
               title=f"{g}" + (" (highest entropy)" if g == "group0" else ""))
        ax.grid(alpha=0.3)
        fig.colorbar(sc, ax=ax, label="step")
    fig.suptitle(title or f"{res.variant.name}: group clip fraction vs entropy (seed means)",
                 fontsize=10)
    return _save(plt, fig, path)
