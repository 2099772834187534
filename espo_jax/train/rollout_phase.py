"""The rollout phase of an RL step: prompts -> G responses each -> rewards, with DAPO
dynamic sampling (drop prompt groups whose rewards are all equal, refill from seeded extra
draws). Everything here is host numpy except the sampler call itself; the result is a
``batches.RolloutBatch``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from espo_jax.rollout import generate
from espo_jax.rollout.engine import engine_kwargs
from espo_jax.train.batches import RolloutBatch
from espo_jax.train.distributed import to_host
from espo_jax.train.tasks import Task, decode_responses, encode_prompts


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


@dataclasses.dataclass
class PromptSource:
    """Where a step's prompts come from and how they are sampled: the config's rollout
    settings, the task (train split + verifier), its tokenizer, the prompt order, the stop
    tokens (``tasks.stop_token_ids``) and the sharded samplers (None: the default jit):
    ``decode_fn`` for the static batch, ``engine_fn`` for continuous batching
    (``rollout.max_concurrent`` > 0), and the devices that split the rows (for
    ``rollout.max_concurrent_per_device``). Prompts are tokenised once and cached by
    index."""
    config: Any
    task: Task
    tokenizer: Any
    order: PromptOrder
    stop_ids: tuple[int, ...]
    decode_fn: Callable | None = None
    engine_fn: Callable | None = None
    batch_devices: int = 1
    prompt_cache: dict[int, list[int]] = dataclasses.field(default_factory=dict)


def sample_groups(src: PromptSource, policy, indices: list[int], key) -> RolloutBatch:
    """G responses for each prompt index, decoded and rewarded.
    ``policy``: the model to sample from (the state's compute-dtype copy, made once per
    rollout; for the engine, ``rollout.engine_sharding.decode_model`` of it); key: the
    PRNG key of this draw."""
    cfg = src.config
    r = cfg.rollout
    missing = [i for i in indices if i not in src.prompt_cache]
    if missing:
        enc = encode_prompts([src.task.train[i] for i in missing], cfg.task, src.tokenizer)
        src.prompt_cache.update(zip(missing, enc))
    ro = generate(policy, [src.prompt_cache[i] for i in indices],
                  max_new_tokens=int(r.max_new_tokens), temperature=float(r.temperature),
                  key=key, top_p=float(r.top_p), top_k=int(r.top_k),
                  eos_id=src.stop_ids, num_samples=int(r.group_size),
                  pad_id=src.tokenizer.pad_token_id, decode_fn=src.decode_fn,
                  engine_fn=src.engine_fn, **engine_kwargs(r, src.batch_devices))
    # Rows may be split over the mesh (and hosts): gather them on every host.
    prompt_tokens, prompt_mask, tokens, mask, sampler_logp = to_host(
        (ro.prompt_tokens, ro.prompt_mask, ro.tokens, ro.mask, ro.logprobs))
    mask = mask.astype(np.float32)
    examples = [src.task.train[i] for i in indices for _ in range(r.group_size)]
    texts = decode_responses(tokens, mask, src.tokenizer)
    correct, gradable = src.task.score(texts, examples)
    rewards = correct.copy()
    ov = cfg.dapo.overlong
    if ov.enable:
        from espo_jax.rewards import overlong_budget, overlong_penalty  # noqa: PLC0415
        max_len, buffer = overlong_budget(int(ov.max_len), int(ov.buffer),
                                          float(ov.buffer_frac), int(r.max_new_tokens))
        rewards = rewards + overlong_penalty(mask.sum(-1), max_len, buffer, float(ov.penalty))
    return RolloutBatch(
        prompt_tokens=prompt_tokens, prompt_mask=prompt_mask, tokens=tokens, mask=mask,
        sampler_logp=np.where(mask > 0, sampler_logp, 0.0).astype(np.float32),
        rewards=rewards.astype(np.float32), correct=correct.astype(np.float32),
        gradable=np.asarray(gradable), group_index=np.repeat(np.asarray(indices), r.group_size),
        texts=list(texts),
        # MoE: the experts of every slot, for routing replay and router agreement.
        routed_experts=None if ro.routed_experts is None else to_host(ro.routed_experts))


def collect(src: PromptSource, policy, step: int) -> tuple[RolloutBatch, dict]:
    """The step's rollout (with DAPO dynamic sampling when on) and its metrics."""
    cfg = src.config
    p, g = int(cfg.rollout.prompts_per_step), int(cfg.rollout.group_size)
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), step)
    first = sample_groups(src, policy, src.order.step(step, p), key)
    if not cfg.dapo.dynamic_sampling:
        return first, {}

    kept, dropped, tries = [], [], 0
    batch, n_all_equal = first, 0
    while True:
        r = batch.rewards.reshape(-1, g)
        varied = r.max(1) > r.min(1)
        n_all_equal += int((~varied).sum())
        for grp in range(p):
            (kept if varied[grp] else dropped).append(batch.rows(slice(grp * g, (grp + 1) * g)))
        if len(kept) >= p or tries >= int(cfg.dapo.max_sampling_tries):
            break
        tries += 1
        batch = sample_groups(src, policy, src.order.refill(step, tries, p),
                              jax.random.fold_in(key, tries))
    filled = max(0, p - len(kept))
    info = {"dynamic_sampling_tries": float(tries + 1),
            "dynamic_sampling_filled_frac": filled / p,
            "dynamic_sampling_all_equal_frac": n_all_equal / (p * (tries + 1))}
    return RolloutBatch.concat(kept[:p] + dropped[:filled], src.tokenizer.pad_token_id), info
