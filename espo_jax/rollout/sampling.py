"""Logits processors and the per-step token sampler.

Order of operations (the same as Hugging Face's sampling warpers):
temperature -> top-k -> top-p -> sample. The log-prob returned for a sampled token
is its log-prob under the distribution it was actually drawn from, i.e.
``log_softmax(filter(logits / T))`` where ``filter`` sets the logits removed by
top-k / top-p to -inf and renormalises over the rest.

RL note: the scoring pass (``espo_jax.ops``) recomputes ``log_softmax(logits / T)``
over the FULL vocabulary. With ``top_p=1.0, top_k=0`` (the default) both agree
exactly; with truncation the sampler's log-probs are larger by ``-log(kept mass)``
and the sequences are off-policy for the untruncated policy. Use
``top_p=1, top_k=0`` for RL rollouts; truncation is meant for evaluation.

Greedy (``temperature == 0``): the token is the argmax of the raw logits and its
log-prob is reported under the untempered distribution ``log_softmax(logits)``
(the sampled "distribution" is a point mass, whose log-prob 0 is useless).

Shapes: B rows, V vocabulary. All outputs float32 / int32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def apply_top_k(logits: jax.Array, top_k: int) -> jax.Array:
    """Keep the ``top_k`` largest logits of each row, set the rest to -inf.

    logits f32[B, V]; ``top_k`` is a static int, 0 (or >= V) disables it.
    Ties with the k-th value are all kept.
    """
    vocab = logits.shape[-1]
    if top_k <= 0 or top_k >= vocab:
        return logits
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def apply_top_p(logits: jax.Array, top_p: jax.Array | float) -> jax.Array:
    """Nucleus filtering: keep the smallest set of most likely tokens whose
    probability mass reaches ``top_p``; the rest become -inf.

    logits f32[B, V] (may already contain -inf); top_p scalar in (0, 1] (traced ok).
    A token is kept when the mass of strictly more likely tokens is < top_p, so the
    most likely token is always kept. Tokens tied with the last kept one are kept too.
    """
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p
    # Smallest kept logit per row is the threshold (kept tokens are a sorted prefix).
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, NEG_INF, logits)


def process_logits(
    logits: jax.Array, temperature: jax.Array | float, top_p: jax.Array | float = 1.0,
    *, top_k: int = 0, use_top_p: bool | None = None,
) -> jax.Array:
    """Temperature-scale and filter logits: f32[B, V] -> f32[B, V] with -inf for
    removed tokens. ``log_softmax`` of the result is the sampling distribution.

    temperature must be > 0 (greedy is handled by ``sample_step``). ``use_top_p``
    is the static switch for the (sorting) nucleus filter; None means
    ``top_p < 1`` and requires a Python ``top_p``.
    """
    if use_top_p is None:
        use_top_p = float(top_p) < 1.0
    scaled = logits.astype(jnp.float32) / temperature
    scaled = apply_top_k(scaled, top_k)
    if use_top_p:
        scaled = apply_top_p(scaled, top_p)
    return scaled


def sample_step(
    logits: jax.Array, key: jax.Array, temperature: jax.Array | float,
    top_p: jax.Array | float = 1.0, *, top_k: int = 0, greedy: bool = False,
    use_top_p: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Draw one token per row.

    logits f32[B, V], key a PRNG key -> (tokens i32[B], logprobs f32[B]).
    ``greedy`` (static) takes the argmax and ignores temperature / filters.
    """
    logits = logits.astype(jnp.float32)
    if greedy:
        return greedy_rows(logits)
    filtered = process_logits(logits, temperature, top_p, top_k=top_k, use_top_p=use_top_p)
    tokens = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
    logp_all = jax.nn.log_softmax(filtered, axis=-1)
    logprobs = jnp.take_along_axis(logp_all, tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs


def _blocks(x: jax.Array, block: int, fill: float) -> jax.Array:
    """x [B, V] padded with ``fill`` to whole blocks -> [B, ceil(V / block), block]."""
    b, v = x.shape
    nb = -(-v // block)
    return jnp.pad(x, ((0, 0), (0, nb * block - v)), constant_values=fill).reshape(b, nb, block)


def greedy_rows(logits: jax.Array, block: int = 256) -> tuple[jax.Array, jax.Array]:
    """Argmax (the first of ties, as ``jnp.argmax``) and its log-prob under
    ``log_softmax(logits)``: logits f32[B, V] -> (tokens i32[B], logprobs f32[B]).

    Two levels, as ``_blocked_gumbel``: the maximum of each block of ``block`` tokens, the
    first block holding the row maximum, then the first maximum inside it. On CPU a flat
    argmax over V is one slow variadic reduction (about 1.1 ms of a 6 ms decode step at
    16 x 32k); the blocked one costs a plain max. The log-prob of the maximum m is
    -log(sum(exp(logits - m))), without materialising log_softmax.
    """
    lb = _blocks(logits, block, -jnp.inf)
    bmax = lb.max(-1)                                                      # [B, nb]
    blk = jnp.argmax(bmax, axis=-1)
    inner = jnp.take_along_axis(lb, blk[:, None, None], axis=1)[:, 0]      # [B, block]
    tok = (blk * block + jnp.argmax(inner, axis=-1)).astype(jnp.int32)
    m = jnp.take_along_axis(bmax, blk[:, None], axis=1)                    # [B, 1]
    logp = -jnp.log(jnp.sum(jnp.exp(logits - m), axis=-1))
    return tok, logp


def token_keys(key: jax.Array, rows: jax.Array, steps: jax.Array) -> jax.Array:
    """The key of token ``steps[i]`` of row ``rows[i]``: ``fold_in(fold_in(key, row), t)``.

    key: one PRNG key (typed or raw uint32[2]); rows, steps i32[B] -> B keys. A row's
    draws depend only on (key, row, t), never on which other rows share its batch, so
    the same key gives the same responses whatever the batch layout (static batch,
    continuous batching with any number of slots, any mesh).
    """
    return jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(key, r), t))(rows, steps)


def _inverse_cdf(probs: jax.Array, u: jax.Array, block: int = 256) -> jax.Array:
    """Index of the first cumulative probability > u * total, per row: probs f32[B, V]
    (>= 0), u f32[B] in [0, 1) -> i32[B]. Two levels (sums of blocks of ``block``
    tokens, then the chosen block's own cumsum) keep the float error of the running sums
    small; zero-probability tokens are never returned."""
    pb = _blocks(probs, block, 0.0)
    nb = pb.shape[1]
    sums = pb.sum(-1)                                                     # [B, nb]
    csum = jnp.cumsum(sums, -1)
    target = u * csum[:, -1]
    last_block = nb - 1 - jnp.argmax((sums > 0)[:, ::-1], axis=-1)
    blk = jnp.minimum(jnp.sum(csum <= target[:, None], -1), last_block)
    below = jnp.take_along_axis(csum - sums, blk[:, None], -1)[:, 0]
    inner = jnp.take_along_axis(pb, blk[:, None, None], 1)[:, 0]          # [B, block]
    rest = jnp.maximum(target - below, 0.0)
    last_tok = block - 1 - jnp.argmax((inner > 0)[:, ::-1], axis=-1)
    tok = jnp.minimum(jnp.sum(jnp.cumsum(inner, -1) <= rest[:, None], -1), last_tok)
    return (blk * block + tok).astype(jnp.int32)


SAMPLING_METHODS = ("gumbel", "inverse_cdf")


def _blocked_gumbel(x: jax.Array, keys: jax.Array, block: int = 256
                    ) -> tuple[jax.Array, jax.Array]:
    """One exact draw per row from softmax(x) (f32[B, V], -inf allowed, not normalised)
    by Gumbel-max in two levels, and its log-prob: (tokens i32[B], logprobs f32[B]).

    A block of ``block`` tokens by Gumbel-max over the blocks' log-masses, then a token
    of that block by Gumbel-max over its logits: P(token) = P(block) P(token | block)
    exactly, with V / block + block random numbers instead of V (row i's from keys[i]).
    One exp pass over [B, V]: the blocks' max and exp-sums give both the log-masses and
    the row's log-normaliser, so no [B, V] log-softmax is written.
    """
    lb = _blocks(x, block, -jnp.inf)
    nb = lb.shape[1]
    bmax = lb.max(-1)                                                      # [B, nb]
    shift = jnp.where(jnp.isfinite(bmax), bmax, 0.0)  # an all -inf block sums to 0
    mass = bmax + jnp.log(jnp.exp(lb - shift[..., None]).sum(-1))          # log sum exp
    top = mass.max(-1)
    lse = top + jnp.log(jnp.exp(mass - top[:, None]).sum(-1))              # [B]
    b = x.shape[0]
    k_block, k_tok = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    # Both draws in one threefry pass (on CPU each pass is a rolled loop of small
    # kernels). With JAX's default partitionable threefry a draw's numbers are per
    # element, so the first nb of a longer draw from k_block are those of a length-nb
    # draw: the same stream as two separate draws.
    width = max(nb, block)
    g = jax.vmap(lambda k: jax.random.gumbel(k, (width,)))(jnp.concatenate([k_block, k_tok]))
    blk = jnp.argmax(mass + g[:b, :nb], axis=-1)
    inner = jnp.take_along_axis(lb, blk[:, None, None], axis=1)[:, 0]      # [B, block]
    g_tok = g[b:, :block]
    tok = (blk * block + jnp.argmax(inner + g_tok, axis=-1)).astype(jnp.int32)
    return tok, jnp.take_along_axis(x, tok[:, None], axis=-1)[:, 0] - lse


def sample_rows(
    logits: jax.Array, keys: jax.Array, temperature: jax.Array | float,
    top_p: jax.Array | float = 1.0, *, top_k: int = 0, greedy: bool = False,
    use_top_p: bool | None = None, method: str = "gumbel",
) -> tuple[jax.Array, jax.Array]:
    """``sample_step`` with one key per row (``token_keys``): logits f32[B, V], keys [B]
    -> (tokens i32[B], logprobs f32[B]). Row i's token depends only on its logits and key.

    method (static): "gumbel" (default): Gumbel-max in two levels (``_blocked_gumbel``:
    ~2 sqrt(V) random numbers per row instead of V); a draw changes only if float noise
    in the logits (e.g. a different batch shape in the matmuls) reorders the top two
    perturbed (block) logits, so the same key reproduces the same responses across batch
    layouts. "inverse_cdf": one uniform per row against the running sum of probabilities
    (``_inverse_cdf``), the same distribution, but a ~1e-7 change of the logits moves the
    CDF boundaries and flips a few tokens per thousand at V = 32k: responses are
    reproducible only for identical batch shapes.
    """
    if method not in SAMPLING_METHODS:
        raise ValueError(f"sampling method must be one of {SAMPLING_METHODS}, got {method!r}")
    logits = logits.astype(jnp.float32)
    if greedy:
        return sample_step(logits, None, temperature, top_p, top_k=top_k, greedy=True)
    filtered = process_logits(logits, temperature, top_p, top_k=top_k, use_top_p=use_top_p)
    if method == "gumbel":
        return _blocked_gumbel(filtered, keys)
    logp_all = jax.nn.log_softmax(filtered, axis=-1)
    u = jax.vmap(jax.random.uniform)(keys)
    tokens = _inverse_cdf(jnp.exp(logp_all), u)
    logprobs = jnp.take_along_axis(logp_all, tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs
