"""The rollout phase of an RL step: prompts -> G responses each -> rewards, with DAPO
dynamic sampling (drop prompt groups whose rewards are all equal, refill from seeded extra
draws). Everything here is host numpy except the sampler call itself.

The functions take the loop's context ``ctx`` (``espo_jax.train.loop._Ctx``): config, task,
tok, order (``PromptOrder``), prompt_cache (index -> token ids), stop_ids (the stop tokens,
``tasks.stop_token_ids``) and decode_fn (the mesh-sharded sampler, or None).
"""
from __future__ import annotations

import jax
import numpy as np

from espo_jax.rollout import generate
from espo_jax.rollout.engine import decode_model, engine_kwargs, sharded_engine_fn
from espo_jax.train.distributed import to_host
from espo_jax.train.tasks import decode_responses, encode_prompts


class PromptOrder:
    """Prompt indices for step k: block k of a stream of seeded per-epoch permutations;
    refill draws for DAPO dynamic sampling come from (seed, k, try)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def step(self, k: int, p: int) -> list[int]:
        out = []
        for pos in range((k - 1) * p, k * p):
            e, i = divmod(pos, self.n)
            out.append(int(self._perm(e)[i]))
        return out

    def refill(self, k: int, attempt: int, p: int) -> list[int]:
        rng = np.random.default_rng([self.seed, k, attempt, 7])
        return [int(i) for i in rng.choice(self.n, size=p, replace=self.n < p)]


def _left_pad(x: np.ndarray, width: int, value) -> np.ndarray:
    if x.shape[1] == width:
        return x
    return np.pad(x, ((0, 0), (width - x.shape[1], 0)), constant_values=value)


def _concat_rollouts(parts: list[dict], pad_id: int) -> dict:
    width = max(p["prompt_tokens"].shape[1] for p in parts)
    out = {}
    for key in parts[0]:
        xs = [p[key] for p in parts]
        if key == "prompt_tokens":
            xs = [_left_pad(x, width, pad_id) for x in xs]
        elif key == "prompt_mask":
            xs = [_left_pad(x, width, 0) for x in xs]
        out[key] = np.concatenate(xs) if isinstance(xs[0], np.ndarray) else sum(xs, [])
    return out


def sample_groups(ctx, policy, indices: list[int], key) -> dict:
    """G responses for each prompt index, decoded and scored (host numpy arrays).
    ``policy``: the model to sample from (the state's compute-dtype copy)."""
    cfg = ctx.config
    r = cfg.rollout
    missing = [i for i in indices if i not in ctx.prompt_cache]
    if missing:
        enc = encode_prompts([ctx.task.train[i] for i in missing], cfg.task, ctx.tok)
        ctx.prompt_cache.update(zip(missing, enc))
    ro = generate(policy, [ctx.prompt_cache[i] for i in indices],
                  max_new_tokens=int(r.max_new_tokens), temperature=float(r.temperature),
                  key=key, top_p=float(r.top_p), top_k=int(r.top_k),
                  eos_id=ctx.stop_ids, num_samples=int(r.group_size),
                  pad_id=ctx.tok.pad_token_id, decode_fn=ctx.decode_fn,
                  engine_fn=(sharded_engine_fn(ctx.mesh) if getattr(ctx, "mesh", None)
                             is not None else None), **engine_kwargs(r))
    # Rows may be split over the mesh (and hosts): gather them on every host.
    prompt_tokens, prompt_mask, tokens, mask, sampler_logp = to_host(
        (ro.prompt_tokens, ro.prompt_mask, ro.tokens, ro.mask, ro.logprobs))
    mask = mask.astype(np.float32)
    examples = [ctx.task.train[i] for i in indices for _ in range(r.group_size)]
    texts = decode_responses(tokens, mask, ctx.tok)
    correct, gradable = ctx.task.score(texts, examples)
    rewards = correct.copy()
    lengths = mask.sum(-1)
    ov = cfg.dapo.overlong
    if ov.enable:
        from espo_jax.rewards import overlong_budget, overlong_penalty  # noqa: PLC0415
        max_len, buffer = overlong_budget(int(ov.max_len), int(ov.buffer),
                                          float(ov.buffer_frac), int(r.max_new_tokens))
        rewards = rewards + overlong_penalty(lengths, max_len, buffer, float(ov.penalty))
    return dict(prompt_tokens=prompt_tokens, prompt_mask=prompt_mask, tokens=tokens, mask=mask,
                sampler_logp=np.where(mask > 0, sampler_logp, 0.0).astype(np.float32),
                rewards=rewards.astype(np.float32),
                correct=correct.astype(np.float32), gradable=gradable,
                group_index=np.repeat(np.asarray(indices), r.group_size), texts=texts)


def collect(ctx, state, step: int) -> tuple[dict, dict]:
    """The step's rollout batch (with DAPO dynamic sampling when on) and its metrics."""
    cfg = ctx.config
    p, g = int(cfg.rollout.prompts_per_step), int(cfg.rollout.group_size)
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), step)
    policy = state.compute_model()  # one compute-dtype copy per rollout
    if engine_kwargs(cfg.rollout)["max_concurrent"] is not None:
        # the engine decodes with TP-only (else replicated) weights, gathered once here
        policy = decode_model(policy)
    first = sample_groups(ctx, policy, ctx.order.step(step, p), key)
    info = {}
    if not cfg.dapo.dynamic_sampling:
        return first, info

    def split(batch):
        r = batch["rewards"].reshape(-1, g)
        varied = r.max(1) > r.min(1)
        return varied

    kept, dropped, n_kept, tries = [], [], 0, 0
    batch, n_all_equal = first, 0
    while True:
        varied = split(batch)
        n_all_equal += int((~varied).sum())
        for grp in range(p):
            target = kept if varied[grp] else dropped
            target.append(_take_group(batch, grp, g))
        n_kept = len(kept)
        if n_kept >= p or tries >= int(cfg.dapo.max_sampling_tries):
            break
        tries += 1
        batch = sample_groups(ctx, policy, ctx.order.refill(step, tries, p),
                               jax.random.fold_in(key, tries))
    filled = max(0, p - n_kept)
    groups = kept[:p] + dropped[:filled]
    info = {"dynamic_sampling_tries": float(tries + 1),
            "dynamic_sampling_filled_frac": filled / p,
            "dynamic_sampling_all_equal_frac": n_all_equal / (p * (tries + 1))}
    return _concat_rollouts(groups, ctx.tok.pad_token_id), info


def _take_group(batch: dict, grp: int, g: int) -> dict:
    sl = slice(grp * g, (grp + 1) * g)
    return {k: (v[sl] if isinstance(v, np.ndarray) else v[sl]) for k, v in batch.items()}
