"""The optimizer: gradient-norm clipping -> AdamW with a linear warm-up, from config.train."""
from __future__ import annotations

import optax


def learning_rate_schedule(lr: float, warmup_steps: int) -> optax.Schedule:
    """Linear warm-up from lr/(warmup+1) to lr over ``warmup_steps`` optimizer updates, then
    constant. Counts applied updates (skipped non-finite updates do not advance it)."""
    if lr <= 0:
        raise ValueError(f"train.lr must be > 0, got {lr}")
    if warmup_steps < 0:
        raise ValueError(f"train.warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps == 0:
        return optax.constant_schedule(lr)
    # Start at lr/(w+1) rather than 0 so the very first update is not a no-op.
    warm = optax.linear_schedule(lr / (warmup_steps + 1), lr, warmup_steps)
    return optax.join_schedules([warm, optax.constant_schedule(lr)], [warmup_steps])


def make_optimizer(train_cfg) -> optax.GradientTransformation:
    """``clip_by_global_norm(grad_clip)`` (if > 0) then AdamW(lr schedule, weight_decay)."""
    sched = learning_rate_schedule(float(train_cfg.lr), int(train_cfg.warmup_steps))
    parts = []
    if train_cfg.grad_clip and train_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(train_cfg.grad_clip)))
    parts.append(optax.adamw(sched, b1=float(train_cfg.get("b1", 0.9)),
                             b2=float(train_cfg.get("b2", 0.999)),
                             eps=float(train_cfg.get("eps", 1e-8)),
                             weight_decay=float(train_cfg.weight_decay)))
    return optax.chain(*parts)
