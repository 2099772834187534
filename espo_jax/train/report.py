"""End-of-run report: PNG plots of the training curves and a short summary.md.

Written by process 0 only (the caller checks), through ``etils.epath`` (local or gs://).
"""
from __future__ import annotations

import io

import numpy as np
from etils import epath

from espo_jax.train.writers import read_metrics

PLOTS = (
    ("reward", ("reward_mean",)),
    ("eval_accuracy", ("eval_accuracy",)),
    ("clip_fraction", ("clip_frac_high", "clip_frac_low", "clip_frac")),
    ("entropy", ("entropy_mean",)),
    ("response_length", ("response_len_mean",)),
)


def _series(records: list[dict], key: str):
    xs, ys = [], []
    for r in records:
        v = r.get(key) if "event" not in r else None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r["step"])
            ys.append(float(v))
    return np.asarray(xs), np.asarray(ys)


def write_plots(workdir) -> list[epath.Path]:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    wd = epath.Path(workdir)
    records = read_metrics(wd / "metrics.jsonl", events=False)
    out = []
    for name, keys in PLOTS:
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        for key in keys:
            x, y = _series(records, key)
            if len(x):
                ax.plot(x, y, marker="o" if len(x) < 30 else None, ms=3, label=key)
        ax.set_xlabel("step")
        ax.set_title(name.replace("_", " "))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = wd / f"{name}.png"
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        path.write_bytes(buf.getvalue())
        out.append(path)
    return out


def write_summary(workdir, config, *, wall_time_s: float | None = None,
                  stopped_early: str | None = None) -> epath.Path:
    wd = epath.Path(workdir)
    records = read_metrics(wd / "metrics.jsonl", events=False)
    x_acc, acc = _series(records, "eval_accuracy")
    _, rew = _series(records, "reward_mean")
    _, clip = _series(records, "clip_frac")
    _, ent = _series(records, "entropy_mean")
    lines = [
        "# espo-jax run summary", "",
        f"- objective: `{config.objective.name}`; task: `{config.task.name}`; "
        f"model: `{config.model.path}`",
        f"- steps: {int(records[-1]['step']) if records else 0} of {config.num_steps}; "
        f"{config.rollout.prompts_per_step} prompts x G={config.rollout.group_size} per step",
    ]
    if wall_time_s is not None:
        lines.append(f"- wall time: {wall_time_s:.1f} s")
    if len(acc):
        lines.append(f"- eval accuracy: {acc[0]:.3f} (step {int(x_acc[0])}) -> {acc[-1]:.3f} "
                     f"(step {int(x_acc[-1])}), change {acc[-1] - acc[0]:+.3f}; best {acc.max():.3f}")
    if len(rew):
        lines.append(f"- train reward: first {rew[0]:.3f}, last {rew[-1]:.3f}, mean {rew.mean():.3f}")
    if len(clip):
        lines.append(f"- clip fraction: mean {clip.mean():.4f}, last {clip[-1]:.4f}")
    if len(ent):
        lines.append(f"- entropy (old policy, nats/token): first {ent[0]:.3f}, last {ent[-1]:.3f}")
    if stopped_early:
        lines.append(f"- stopped early: {stopped_early}")
    lines += ["", "Plots: " + ", ".join(f"`{n}.png`" for n, _ in PLOTS),
              "Metrics: `metrics.jsonl`; config: `config.json`; final policy: `final_policy/`."]
    path = wd / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path
