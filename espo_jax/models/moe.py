"""Routed-experts SwiGLU MLP (Qwen3-MoE): router, top-k, dropless grouped matmul.

Shapes: N tokens (B*T flattened), D width, E experts, k experts per token, F expert width.

Router (as transformers' Qwen3MoeTopKRouter): probs = softmax(x @ W_gate) in float32, the
top-k experts, their probs renormalised to sum 1 when `norm_topk_prob`. The router matmul is
computed in float32 too (it is D x E, cheap), so a bf16 run picks the same experts in the
sampler and the trainer whenever the f32 hidden states agree.

Experts ("ragged"): the N*k (token, expert) assignments are sorted by expert and each
expert's contiguous group goes through its own SwiGLU with `jax.lax.ragged_dot` (one
grouped matmul per projection, no Python loop over experts, no token dropping); outputs are
unsorted and summed with the routing weights. "dense" runs every expert on every token and
masks (E/k times the FLOPs): a reference for tests and benchmarks.

Expert parallelism (an active mesh whose "expert" axis is > 1, e.g. inside the jitted train
step under `jax.set_mesh`): `expert_parallel_swiglu`, a shard_map in which each device
all-gathers the tokens of its expert group (the devices along "expert"), runs only its
E/|expert| experts on the assignments routed to them, and reduce-scatters the partial
outputs back; expert weights are all-gathered over "fsdp" like any FSDP weight. Left to
GSPMD alone, the sorted-token ragged_dot with expert-sharded weights all-gathers every
token assignment on every device and all-reduces [N*k, F] partial products
(experiments/benchmarks/moe.py --ep counts both).

Routing replay: `routed` i32[..., k] forces the experts (e.g. those the rollout used); their
weights are the current router's probs at those experts (renormalised when
`norm_topk_prob`), so gradients still reach the router.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from espo_jax.models.config import ModelConfig
from espo_jax.models.layers import Linear, param
from espo_jax.models.sharding import batch_axes


def route(logits, k: int, norm_topk_prob: bool, routed=None):
    """Router logits f32[N,E] -> (weights f32[N,k], experts i32[N,k], topk i32[N,k],
    probs f32[N,E]).

    `experts` are the ones used (`routed` when given, else the top-k); `topk` is always the
    router's own top-k (for the agreement metric).
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_w, topk = jax.lax.top_k(probs, k)
    topk = topk.astype(jnp.int32)
    if routed is None:
        experts, w = topk, top_w
    else:
        experts = routed.astype(jnp.int32)
        w = jnp.take_along_axis(probs, experts, axis=-1)
    if norm_topk_prob:
        w = w / jnp.sum(w, axis=-1, keepdims=True)
    return w, experts, topk, probs


@jax.custom_vjp
def _grads_together(x, *ws):
    """Identity whose backward makes x's cotangent depend on every ws cotangent.

    Why: XLA's scheduler otherwise defers the expert weight gradients (matmuls over the
    [N*k, ...] sorted-token buffers) to the end of the backward pass, so those buffers of every
    layer stay alive at once (XLA:CPU, Qwen3-30B-A3B at 1k tokens: +1.6 GiB per layer, +0.3
    with this). `dx + 0 * sum(dw)` is dx whenever the weight gradients are finite (otherwise
    the update is non-finite anyway); an optimization_barrier did not survive XLA:CPU.
    """
    return (x,) + ws


def _grads_together_bwd(_, g):
    dep = (sum(jnp.sum(c.astype(jnp.float32)) for c in g[1:]) * 0).astype(g[0].dtype)
    return (g[0] + dep,) + tuple(g[1:])


_grads_together.defvjp(lambda x, *ws: ((x,) + ws, None), _grads_together_bwd)


@jax.custom_vjp
def _permute_rows(a, perm, inv):
    """a[perm] for a permutation `perm` with inverse `inv`; the backward is the gather g[inv]
    (autodiff's scatter-add into zeros would hold an extra [N*k, D] buffer)."""
    return jnp.take(a, perm, axis=0)


_permute_rows.defvjp(lambda a, perm, inv: (jnp.take(a, perm, axis=0), inv),
                     lambda inv, g: (jnp.take(g, inv, axis=0), None, None))


def grouped_swiglu(x, experts, weights, gate, up, down, dtype):
    """sum_j weights[n,j] * SwiGLU_{experts[n,j]}(x[n]) via sorted tokens + ragged_dot.

    x [N,D]; experts i32[N,k]; weights f32[N,k]; gate, up [E,D,F]; down [E,F,D] -> [N,D] dtype.
    An expert id >= E (not one of these experts) contributes nothing.
    """
    n, k = experts.shape
    e = gate.shape[0]
    x, weights, gate, up, down = _grads_together(x, weights, gate, up, down)
    flat = experts.reshape(-1)                                   # [N*k]
    order = jnp.argsort(flat, stable=True)                       # assignments sorted by expert
    sizes = jnp.bincount(flat, length=e + 1)[:e].astype(jnp.int32)  # [E] group sizes
    xs = jnp.take(x.astype(dtype), order // k, axis=0)           # [N*k, D]
    g = jax.lax.ragged_dot(xs, gate.astype(dtype), sizes)
    u = jax.lax.ragged_dot(xs, up.astype(dtype), sizes)
    ys = jax.lax.ragged_dot(jax.nn.silu(g) * u, down.astype(dtype), sizes)  # [N*k, D]
    ys = _permute_rows(ys, jnp.argsort(order), order).reshape(n, k, -1)
    ys = jnp.where((experts < e)[..., None], ys, 0)              # rows outside every group
    return jnp.einsum("nkd,nk->nd", ys, weights.astype(dtype))


def _ep_axes(mesh, n, d, f, e):
    """(row axes, fsdp axis or None, tensor axis or None) when the expert-parallel shard_map
    applies to these shapes on `mesh`, else None."""
    if mesh.empty or "expert" not in mesh.axis_names or mesh.shape["expert"] <= 1:
        return None
    if "expert" in getattr(mesh, "manual_axes", ()):  # inside a shard_map (the per-device
        return None                                     # rollout engine): local experts all

    big = lambda a: a in mesh.axis_names and mesh.shape[a] > 1  # noqa: E731
    rows = tuple(a for a in batch_axes(mesh) if big(a))
    fs = "fsdp" if big("fsdp") else None
    tp = "tensor" if big("tensor") else None
    size = lambda a: mesh.shape[a] if a else 1  # noqa: E731
    nrows = 1
    for a in rows:
        nrows *= mesh.shape[a]
    if n % nrows or e % mesh.shape["expert"] or d % size(fs) or f % size(tp):
        return None
    return rows, fs, tp


def expert_parallel_swiglu(x, experts, weights, gate, up, down, dtype, mesh, axes):
    """`grouped_swiglu` under shard_map: tokens gathered within each expert group, local
    experts only, partial outputs reduce-scattered back (see the module docstring).

    x [N,D] rows split over `axes[0]`; gate, up [E,D,F] as ("expert", fsdp, tensor); down
    [E,F,D] as ("expert", tensor, fsdp). Returns [N,D] split like x.
    """
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415
    rows, fs, tp = axes
    el = gate.shape[0] // mesh.shape["expert"]
    row = P(rows, None)

    def local(x, ex, w, g, u, dn):
        gather = lambda a: jax.lax.all_gather(a, "expert", tiled=True)  # noqa: E731
        x, ex, w = gather(x), gather(ex), gather(w)                # this expert group's tokens
        if fs is not None:                                         # FSDP: whole D per expert
            g = jax.lax.all_gather(g, fs, axis=1, tiled=True)
            u = jax.lax.all_gather(u, fs, axis=1, tiled=True)
            dn = jax.lax.all_gather(dn, fs, axis=2, tiled=True)
        loc = ex - jax.lax.axis_index("expert") * el               # local expert ids
        mine = (loc >= 0) & (loc < el)
        y = grouped_swiglu(x, jnp.where(mine, loc, el), jnp.where(mine, w, 0.0), g, u, dn, dtype)
        if tp is not None:                                         # F split: partial sums
            y = jax.lax.psum(y, tp)
        return jax.lax.psum_scatter(y, "expert", tiled=True)

    fn = jax.shard_map(local, mesh=mesh, out_specs=row,
                       in_specs=(row, row, row, P("expert", fs, tp), P("expert", fs, tp),
                                 P("expert", tp, fs)))
    return fn(x, experts, weights.astype(jnp.float32), gate, up, down)


def dense_swiglu(x, experts, weights, gate, up, down, dtype):
    """Same result as `grouped_swiglu`, computing all E experts on all tokens (reference)."""
    e = gate.shape[0]
    x = x.astype(dtype)
    g = jnp.einsum("nd,edf->enf", x, gate.astype(dtype))
    u = jnp.einsum("nd,edf->enf", x, up.astype(dtype))
    ys = jnp.einsum("enf,efd->end", jax.nn.silu(g) * u, down.astype(dtype))
    comb = jnp.sum(jax.nn.one_hot(experts, e, dtype=jnp.float32) * weights[..., None], axis=1)
    return jnp.einsum("end,ne->nd", ys, comb.astype(dtype))


class Experts(nnx.Module):
    """E stacked SwiGLU experts: gate_proj, up_proj [E,D,F], down_proj [E,F,D]."""

    def __init__(self, cfg: ModelConfig, *, rngs, param_dtype):
        e, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        init = jax.nn.initializers.normal(0.02)
        up, down = ("experts", "embed", "mlp"), ("experts", "mlp", "embed")
        self.gate_proj = param(init(rngs.params(), (e, d, f), param_dtype), up)
        self.up_proj = param(init(rngs.params(), (e, d, f), param_dtype), up)
        self.down_proj = param(init(rngs.params(), (e, f, d), param_dtype), down)


class MoE(nnx.Module):
    """Qwen3-MoE sparse MLP block: `gate` (router [D,E]) + `experts`."""

    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, ("embed", None), bias=False, rngs=rngs,
                           dtype=dtype, param_dtype=param_dtype)
        self.experts = Experts(cfg, rngs=rngs, param_dtype=param_dtype)
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.impl = cfg.moe_impl
        self.dtype = dtype

    def __call__(self, x, routed=None):
        """x [B,T,D]; routed i32[B,T,k] or None -> (y [B,T,D], routing).

        routing: {"experts": i32[B,T,k] the router's own top-k, "probs": f32[B,T,E]}.
        """
        b, t, d = x.shape
        xf = x.reshape(b * t, d)
        logits = jnp.dot(xf.astype(jnp.float32), self.gate.kernel[...].astype(jnp.float32),
                         preferred_element_type=jnp.float32)
        rf = None if routed is None else routed.reshape(b * t, -1)
        w, experts, topk, probs = route(logits, self.top_k, self.norm_topk_prob, rf)
        ex = self.experts
        args = (xf, experts, w, ex.gate_proj[...], ex.up_proj[...], ex.down_proj[...], self.dtype)
        mesh = jax.sharding.get_abstract_mesh()
        axes = None
        if self.impl == "ragged":
            _, f = ex.gate_proj.get_value().shape[1:]
            axes = _ep_axes(mesh, b * t, d, f, ex.gate_proj.get_value().shape[0])
        if axes is not None:
            y = expert_parallel_swiglu(*args, mesh, axes)
        else:
            y = (grouped_swiglu if self.impl == "ragged" else dense_swiglu)(*args)
        routing = {"experts": topk.reshape(b, t, -1), "probs": probs.reshape(b, t, -1)}
        return y.reshape(b, t, d), routing


def router_agreement(topk, routed, valid):
    """Share of (token, layer) pairs whose top-k SET equals the replayed one.

    topk, routed i32[B,T,L,k]; valid bool[B,T] -> f32[] (sum, count) pair as a tuple.
    """
    same = jnp.all(jnp.sort(topk, axis=-1) == jnp.sort(routed, axis=-1), axis=-1)  # [B,T,L]
    v = jnp.broadcast_to(valid[..., None], same.shape)
    return jnp.sum(same & v).astype(jnp.float32), jnp.sum(v).astype(jnp.float32)


def load_balancing_terms(topk, probs, valid, num_experts: int):
    """Per-expert (token count, prob sum) over valid tokens, summed over layers.

    topk i32[B,T,L,k]; probs f32[B,T,L,E]; valid bool[B,T] -> (f32[E], f32[E], f32[] rows),
    rows = valid tokens x layers. transformers' load_balancing_loss_func is
    E * sum_e (count_e / rows) * (prob_e / rows) (with counts over the k choices).
    """
    vm = valid.astype(jnp.float32)[..., None, None]                       # [B,T,1,1]
    counts = jnp.sum(jax.nn.one_hot(topk, num_experts, dtype=jnp.float32).sum(-2) * vm,
                     axis=(0, 1, 2))
    psum = jnp.sum(probs * vm, axis=(0, 1, 2))
    rows = jnp.sum(vm) * probs.shape[2]
    return counts, psum, rows
