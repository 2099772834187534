"""The typed values an RL step passes along, all host numpy (every host holds the full
batch; ``distributed.device_put_global`` places each host's rows on its devices):

  rollout_phase.collect -> RolloutBatch -> (scoring pass) -> ScoredBatch -> minibatches
                                                                            -> train_step

B = prompts x G rows (the G samples of a prompt consecutive), P prompt slots (left padded),
N response slots.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np


def _left_pad(x: np.ndarray, width: int, value) -> np.ndarray:
    """Left-pad axis 1 of ``x`` to ``width``."""
    if x.shape[1] == width:
        return x
    pad = ((0, 0), (width - x.shape[1], 0)) + ((0, 0),) * (x.ndim - 2)
    return np.pad(x, pad, constant_values=value)


@dataclasses.dataclass(frozen=True)
class RolloutBatch:
    """One step's sampled responses, decoded and rewarded.

    prompt_tokens i32[B,P], prompt_mask i32[B,P], tokens i32[B,N], mask f32[B,N] (1 up to
    and including the stop token), sampler_logp f32[B,N] (0 where masked), rewards f32[B]
    (correctness + shaping), correct f32[B], gradable bool[B], group_index i64[B] (the
    prompt's index in the training set), texts (the decoded responses), routed_experts
    u8[B,P+N,L,k] for MoE models (None otherwise).
    """
    prompt_tokens: np.ndarray
    prompt_mask: np.ndarray
    tokens: np.ndarray
    mask: np.ndarray
    sampler_logp: np.ndarray
    rewards: np.ndarray
    correct: np.ndarray
    gradable: np.ndarray
    group_index: np.ndarray
    texts: list[str]
    routed_experts: np.ndarray | None = None

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    def rows(self, sl: slice) -> "RolloutBatch":
        """The rows ``sl`` (e.g. one prompt's group)."""
        return RolloutBatch(**{f.name: (None if (v := getattr(self, f.name)) is None else v[sl])
                               for f in dataclasses.fields(self)})

    @staticmethod
    def concat(parts: list["RolloutBatch"], pad_id: int) -> "RolloutBatch":
        """Rows of several rollouts (prompt widths may differ: left padded to the widest)."""
        width = max(p.prompt_tokens.shape[1] for p in parts)
        n = parts[0].tokens.shape[1]
        cat = np.concatenate
        routed = None
        if parts[0].routed_experts is not None:  # slots follow the prompt width
            routed = cat([_left_pad(p.routed_experts, width + n, 0) for p in parts])
        return RolloutBatch(
            prompt_tokens=cat([_left_pad(p.prompt_tokens, width, pad_id) for p in parts]),
            prompt_mask=cat([_left_pad(p.prompt_mask, width, 0) for p in parts]),
            tokens=cat([p.tokens for p in parts]), mask=cat([p.mask for p in parts]),
            sampler_logp=cat([p.sampler_logp for p in parts]),
            rewards=cat([p.rewards for p in parts]), correct=cat([p.correct for p in parts]),
            gradable=cat([p.gradable for p in parts]),
            group_index=cat([p.group_index for p in parts]),
            texts=sum((p.texts for p in parts), []), routed_experts=routed)


@dataclasses.dataclass(frozen=True)
class ScoredBatch:
    """A rollout with what the scoring phase adds: the arrays ``train_step`` consumes
    (layout in ``espo_jax.train.step``).

    old_logp, entropy f32[B,N] (pi_old at the sampling temperature), advantages f32[B];
    optional ref_logp f32[B,N] (KL on), groups i32[B,N] (ESPO's entropy groups, once per
    rollout), is_weights f32[B,N] (rollout correction), routed_experts (MoE).
    """
    rollout: RolloutBatch
    old_logp: np.ndarray
    entropy: np.ndarray
    advantages: np.ndarray
    ref_logp: np.ndarray | None = None
    groups: np.ndarray | None = None
    is_weights: np.ndarray | None = None

    def train_arrays(self) -> dict[str, np.ndarray]:
        """The train step's batch dict (absent optional arrays are left out)."""
        ro = self.rollout
        out = dict(prompt_tokens=ro.prompt_tokens, prompt_mask=ro.prompt_mask,
                   tokens=ro.tokens, mask=ro.mask, old_logp=self.old_logp,
                   entropy=self.entropy, advantages=self.advantages.astype(np.float32))
        for key in ("ref_logp", "groups", "is_weights"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if ro.routed_experts is not None:
            out["routed_experts"] = ro.routed_experts
        return out

    def minibatches(self, *, seed: int, step: int, num_epochs: int,
                    num_minibatches: int) -> Iterator[tuple[int, np.ndarray, dict]]:
        """(update index u, rows i64[B/n], arrays) for epoch-major updates; each epoch is a
        fresh permutation from (seed, step, epoch), so update 0 is on-policy."""
        full = self.train_arrays()
        b = self.rollout.size
        mb = b // num_minibatches
        u = 0
        for epoch in range(num_epochs):
            perm = np.random.default_rng([seed, step, epoch, 11]).permutation(b)
            for j in range(num_minibatches):
                rows = perm[j * mb:(j + 1) * mb]
                yield u, rows, {k: v[rows] for k, v in full.items()}
                u += 1
