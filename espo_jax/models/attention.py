"""Attention without dense masks: one call convention, several implementations.

  attend(q [B,T,H,hd], k, v [B,S,K,hd], q_segment_ids i32[B,T], kv_segment_ids i32[B,S],
         impl, block, q_offset) -> [B,T,H,hd] in q.dtype        (H = K*G, GQA without repeat)

Query t sits at slot q_offset + t (q_offset = cache_index in the cached path, else 0), key s
at slot s. Query i may attend key j iff
  q_seg[i] == kv_seg[j] != 0 and j <= q_offset + i   (causal within a segment), or
  j == q_offset + i                                   (its own slot).
Segment id 0 is padding: a padding query sees only its own slot, so every row has a key
and stays finite (no NaN for a later `loss * mask` to spread); real rows never see padding.
Segments are usually contiguous runs (left-padded rows: 0...0 1...1; packed rows: 1..1 2..2
..0..0), but `dense` and `blockwise` are exact for any layout (block skipping is only
conservative). Padding-query outputs are unspecified (finite) and differ between impls.

Implementations (`ModelConfig.attention_impl`):
  dense      masks built from the segment ids, f32 scores [B,H,T,S]: small models, decode.
  blockwise  flash-style online softmax in plain XLA on every backend: O(T x block) memory,
             fully masked (causal / other-segment) blocks skipped, exact gradients by a
             custom VJP that recomputes each block (FlashAttention-2 backward).
  cudnn      jax.nn.dot_product_attention(implementation="cudnn") (GPU, bf16/f16). Its
             public API takes lengths: each row is rotated so that its one segment starts
             at 0 (left padding -> right padding), run causal with lengths, rotated back.
             Packed rows (several segments) are refused with a ValueError.
  splash     TPU Pallas splash attention with segment ids (kv heads repeated, T padded to
             the kernel block).
  auto       dense when the sequence fits in one block (a single block is dense anyway);
             else splash on TPU (head_dim % 128 == 0), cudnn on GPU (bf16/f16, unpacked
             rows), blockwise otherwise.
The KV-cache path (q_offset = cache_index, T = 1 in decode) always runs `dense`, over the
cache's [B,K,S,hd] layout (``dense_attention(heads_major=True)``).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from espo_jax.models.config import ATTENTION_IMPLS as IMPLS

# Finite "minus infinity" for the dense path: masked scores never overflow the softmax.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def resolve_impl(impl: str, *, seq_len: int, block: int, dtype, head_dim: int,
                 packed: bool) -> str:
    """The concrete implementation for `impl` on this backend and these (static) shapes."""
    if impl not in IMPLS:
        raise ValueError(f"attention_impl must be one of {list(IMPLS)}, got {impl!r}")
    low = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if impl == "auto":
        backend = jax.default_backend()
        if seq_len <= block:
            return "dense"
        if backend == "tpu" and head_dim % 128 == 0:
            return "splash"
        if backend in ("gpu", "cuda") and low and not packed and head_dim <= 128:
            return "cudnn"
        return "blockwise"
    if impl == "cudnn":
        if packed:
            raise ValueError("attention_impl='cudnn' takes sequence lengths, not packed segment "
                             "ids; use attention_impl='blockwise' (or 'auto') for packed rows")
        if not low:
            raise ValueError("attention_impl='cudnn' needs a bfloat16/float16 compute dtype "
                             f"(model.dtype), got {jnp.dtype(dtype).name}")
    return impl


def attend(q, k, v, q_segment_ids, kv_segment_ids, *, impl: str = "dense", block: int = 512,
           q_offset=0):
    """Dispatch to one (already resolved, non-auto) implementation; see the module doc."""
    if impl == "dense":
        return dense_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset)
    if q.shape[1] != k.shape[1] or not isinstance(q_offset, int) or q_offset != 0:
        raise ValueError(f"attention_impl={impl!r} is for self-attention without a cache "
                         "(the cached path uses 'dense')")
    if impl == "blockwise":
        return blockwise_attention(q, k, v, q_segment_ids, kv_segment_ids, block=block)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, q_segment_ids)
    if impl == "splash":
        return splash_attention(q, k, v, q_segment_ids)
    raise ValueError(f"attention_impl must be one of {list(IMPLS[1:])} here, got {impl!r}")


def allowed(q_seg, kv_seg, q_idx, kv_idx):
    """bool[B,Tq,Sk]: the attention rule of the module doc for slots q_idx [Tq], kv_idx [Sk]."""
    causal = kv_idx[None, :] <= q_idx[:, None]
    own = kv_idx[None, :] == q_idx[:, None]
    same = (q_seg[:, :, None] == kv_seg[:, None, :]) & (q_seg[:, :, None] != 0)
    return (same & causal[None]) | own[None]


# -- dense ------------------------------------------------------------------------------

def dense_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset=0, *,
                    heads_major: bool = False):
    """Grouped-query attention with f32 scores [B,K,G,T,S] (no kv-head repeat). k, v are
    [B,S,K,hd], or [B,K,S,hd] with ``heads_major`` (the KV cache's layout)."""
    b, t, h, hd = q.shape
    s_len, kh = (k.shape[2], k.shape[1]) if heads_major else (k.shape[1], k.shape[2])
    mask = allowed(q_segment_ids, kv_segment_ids, q_offset + jnp.arange(t), jnp.arange(s_len))
    qg = q.reshape(b, t, kh, h // kh, hd)
    if heads_major:  # plain batched matmuls over (b, k): the cache is read in place
        qk = qg.transpose(0, 2, 3, 1, 4).reshape(b, kh, -1, hd)              # [B,K,G*T,hd]
        s = jnp.einsum("bkqd,bksd->bkqs", qk, k, preferred_element_type=jnp.float32)
        s = s.reshape(b, kh, h // kh, t, s_len)
    else:
        s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    s = s * (1.0 / math.sqrt(hd))
    s = jnp.where(mask[:, None, None, :, :], s, _MASK_VALUE)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    if heads_major:
        o = jnp.einsum("bkqs,bksd->bkqd", p.reshape(b, kh, -1, s_len), v)
        o = o.reshape(b, kh, h // kh, t, hd).transpose(0, 3, 1, 2, 4)       # [B,T,K,G,hd]
    else:
        o = jnp.einsum("bkgts,bskd->btkgd", p, v)
    return o.reshape(b, t, h, hd).astype(q.dtype)


# -- blockwise (flash-style, plain XLA) -------------------------------------------------

def blockwise_attention(q, k, v, q_segment_ids, kv_segment_ids, *, block: int = 512):
    """Online-softmax attention over [block x block] tiles; memory O(T x block).

    T and S need not be multiples of the block (padded with segment 0 here).
    """
    b, t, h, hd = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    bq, bk = min(block, t), min(block, s_len)
    tp, sp = -(-t // bq) * bq, -(-s_len // bk) * bk
    qg = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0))).reshape(b, tp, kh, h // kh, hd)
    kp = jnp.pad(k, ((0, 0), (0, sp - s_len), (0, 0), (0, 0)))
    vp = jnp.pad(v, ((0, 0), (0, sp - s_len), (0, 0), (0, 0)))
    qs = jnp.pad(q_segment_ids.astype(jnp.int32), ((0, 0), (0, tp - t)))
    ks = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, sp - s_len)))
    need = _block_need(qs, ks, bq, bk)
    o = _flash(qg, kp, vp, qs, ks, need, bq, bk)
    return o[:, :t].reshape(b, t, h, hd)


def _block_need(qs, ks, bq, bk):
    """bool[nq,nk]: tile (i,j) holds an allowed pair for some row (conservative, shared by
    the batch so that the loops are too). From per-tile [min,max] of the real segment ids."""
    b, tp = qs.shape
    nq, nk = tp // bq, ks.shape[1] // bk
    big = jnp.iinfo(jnp.int32).max
    qb, kb = qs.reshape(b, nq, bq), ks.reshape(b, nk, bk)
    qmin = jnp.min(jnp.where(qb > 0, qb, big), -1)
    qmax = jnp.max(jnp.where(qb > 0, qb, 0), -1)
    kmin = jnp.min(jnp.where(kb > 0, kb, big), -1)
    kmax = jnp.max(jnp.where(kb > 0, kb, 0), -1)
    overlap = (kmin[:, None, :] <= qmax[:, :, None]) & (qmin[:, :, None] <= kmax[:, None, :])
    q_first = jnp.arange(nq) * bq
    k_first = jnp.arange(nk) * bk
    causal = k_first[None, :] <= (q_first + bq - 1)[:, None]
    own = causal & ((k_first + bk - 1)[None, :] >= q_first[:, None])  # slot ranges meet
    return jnp.any(overlap & causal[None], axis=0) | own


def _range(need):
    """First and last True per row of bool[n,m] (lo > hi when none)."""
    m = need.shape[1]
    anyn = jnp.any(need, axis=1)
    lo = jnp.argmax(need, axis=1)
    hi = m - 1 - jnp.argmax(need[:, ::-1], axis=1)
    return jnp.where(anyn, lo, 0), jnp.where(anyn, hi, -1)


def _tile(qb, kb, qsb, ksb, q0, k0, scale):
    """Scores f32[B,K,G,bq,bk] (masked ones -inf) and the mask bool[B,bq,bk] of one tile."""
    s = jnp.einsum("bqkgd,bskd->bkgqs", qb, kb, preferred_element_type=jnp.float32) * scale
    ok = allowed(qsb, ksb, q0 + jnp.arange(qb.shape[1]), k0 + jnp.arange(kb.shape[1]))
    return jnp.where(ok[:, None, None], s, -jnp.inf), ok


def _sl(x, start, size):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _flash(q, k, v, qs, ks, need, bq, bk):
    return _flash_fwd(q, k, v, qs, ks, need, bq, bk)[0]


def _flash_fwd(q, k, v, qs, ks, need, bq, bk):
    """q [B,Tp,K,G,hd]; k, v [B,Sp,K,hd] -> o [B,Tp,K,G,hd], residuals (lse f32[B,K,G,Tp])."""
    b, tp, kh, g, hd = q.shape
    scale = 1.0 / math.sqrt(hd)
    lo, hi = _range(need)

    def q_block(i):
        qb, qsb = _sl(q, i * bq, bq), _sl(qs, i * bq, bq)

        def body(j, carry):
            def compute(carry):
                m, l, acc = carry
                kb, vb, ksb = _sl(k, j * bk, bk), _sl(v, j * bk, bk), _sl(ks, j * bk, bk)
                s, _ = _tile(qb, kb, qsb, ksb, i * bq, j * bk, scale)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.exp(s - m_new[..., None])
                corr = jnp.exp(m - m_new)
                pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), vb,
                                preferred_element_type=jnp.float32)
                return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv
            return jax.lax.cond(need[i, j], compute, lambda c: c, carry)

        init = (jnp.full((b, kh, g, bq), _MASK_VALUE, jnp.float32),
                jnp.zeros((b, kh, g, bq), jnp.float32),
                jnp.zeros((b, kh, g, bq, hd), jnp.float32))
        m, l, acc = jax.lax.fori_loop(lo[i], hi[i] + 1, body, init)
        empty = l == 0  # only padded query rows beyond every key slot
        l = jnp.where(empty, 1.0, l)
        o = (acc / l[..., None]).astype(q.dtype)
        lse = jnp.where(empty, 0.0, m + jnp.log(l))
        return o.transpose(0, 3, 1, 2, 4), lse  # [B,bq,K,G,hd], [B,K,G,bq]

    o, lse = jax.lax.map(q_block, jnp.arange(tp // bq))
    o = o.transpose(1, 0, 2, 3, 4, 5).reshape(b, tp, kh, g, hd)
    lse = lse.transpose(1, 2, 3, 0, 4).reshape(b, kh, g, tp)
    return o, (q, k, v, qs, ks, need, o, lse)


def _flash_bwd(bq, bk, res, do):
    q, k, v, qs, ks, need, o, lse = res
    b, tp, kh, g, hd = q.shape
    sp = k.shape[1]
    scale = 1.0 / math.sqrt(hd)
    # D_i = sum_d dO_i * O_i  (= sum_j P_ij dP_ij), f32 [B,K,G,Tp]
    dsum = jnp.einsum("bqkgd,bqkgd->bkgq", do.astype(jnp.float32), o.astype(jnp.float32))

    def probs(i, j):
        """P, dS of tile (i, j), both f32[B,K,G,bq,bk]."""
        qb, qsb, dob = _sl(q, i * bq, bq), _sl(qs, i * bq, bq), _sl(do, i * bq, bq)
        kb, vb, ksb = _sl(k, j * bk, bk), _sl(v, j * bk, bk), _sl(ks, j * bk, bk)
        s, ok = _tile(qb, kb, qsb, ksb, i * bq, j * bk, scale)
        lse_b = jax.lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=3)
        d_b = jax.lax.dynamic_slice_in_dim(dsum, i * bq, bq, axis=3)
        p = jnp.where(ok[:, None, None], jnp.exp(s - lse_b[..., None]), 0.0)
        dp = jnp.einsum("bqkgd,bskd->bkgqs", dob, vb, preferred_element_type=jnp.float32)
        return p, p * (dp - d_b[..., None]), qb, kb, dob

    lo, hi = _range(need)

    def dq_block(i):
        def body(j, dq):
            def compute(dq):
                _, ds, _, kb, _ = probs(i, j)
                return dq + jnp.einsum("bkgqs,bskd->bqkgd", ds.astype(k.dtype), kb,
                                       preferred_element_type=jnp.float32)
            return jax.lax.cond(need[i, j], compute, lambda x: x, dq)
        dq = jax.lax.fori_loop(lo[i], hi[i] + 1, body, jnp.zeros((b, bq, kh, g, hd), jnp.float32))
        return (dq * scale).astype(q.dtype)

    qlo, qhi = _range(need.T)

    def dkv_block(j):
        def body(i, carry):
            def compute(carry):
                dk, dv = carry
                p, ds, qb, _, dob = probs(i, j)
                dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(do.dtype), dob,
                                     preferred_element_type=jnp.float32)
                dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds.astype(q.dtype), qb,
                                     preferred_element_type=jnp.float32)
                return dk, dv
            return jax.lax.cond(need[i, j], compute, lambda c: c, carry)
        z = jnp.zeros((b, bk, kh, hd), jnp.float32)
        dk, dv = jax.lax.fori_loop(qlo[j], qhi[j] + 1, body, (z, z))
        return (dk * scale).astype(k.dtype), dv.astype(v.dtype)

    dq = jax.lax.map(dq_block, jnp.arange(tp // bq))
    dq = dq.transpose(1, 0, 2, 3, 4, 5).reshape(q.shape)
    dk, dv = jax.lax.map(dkv_block, jnp.arange(sp // bk))
    dk = dk.transpose(1, 0, 2, 3, 4).reshape(k.shape)
    dv = dv.transpose(1, 0, 2, 3, 4).reshape(v.shape)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# -- cuDNN (GPU) ------------------------------------------------------------------------

def cudnn_attention(q, k, v, segment_ids, *, implementation="cudnn"):
    """Rows with one contiguous segment (left and/or right padding) through the length-based
    API: rotate each row so its segment starts at slot 0, causal attention with
    query/key lengths, rotate back. RoPE is already applied, so the rotation is exact.
    `implementation="xla"` runs the same mapping on CPU (tests)."""
    b, t = segment_ids.shape
    valid = segment_ids > 0
    lead = jnp.argmax(valid, axis=1).astype(jnp.int32)  # leading padding (0 if none valid)
    n = valid.sum(axis=1).astype(jnp.int32)
    fwd = (jnp.arange(t)[None] + lead[:, None]) % t
    back = (jnp.arange(t)[None] - lead[:, None]) % t

    def rot(x, idx):
        return jnp.take_along_axis(x, idx[:, :, None, None], axis=1)

    o = jax.nn.dot_product_attention(
        rot(q, fwd), rot(k, fwd), rot(v, fwd), is_causal=True, query_seq_lengths=n,
        key_value_seq_lengths=n, implementation=implementation)
    o = rot(o.astype(q.dtype), back)
    return jnp.where(valid[:, :, None, None], o, jnp.zeros_like(o))


# -- splash (TPU) -----------------------------------------------------------------------

def splash_attention(q, k, v, segment_ids, *, block: int = 512, interpret: bool = False):
    """Pallas splash attention (causal + segment ids), vmapped over the batch.

    Padding queries (segment 0) attend to earlier padding keys causally (always at least
    themselves), so they stay finite; T is padded to a multiple of 128 with segment -1.
    Under a mesh (`jax.set_mesh`) it runs in `shard_map`: rows over the batch axes, heads
    over "tensor" when they divide.
    """
    b, h, kh = q.shape[0], q.shape[2], k.shape[2]
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:  # a Pallas call is not auto-partitioned: run it per shard
        from jax.sharding import PartitionSpec as P  # noqa: PLC0415

        from espo_jax.models.sharding import BATCH_AXES  # noqa: PLC0415
        baxes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
        if b % math.prod(mesh.shape[a] for a in baxes):
            baxes = ()
        tp_ax = "tensor" if "tensor" in mesh.axis_names and mesh.shape["tensor"] > 1 else None
        if tp_ax and (h % mesh.shape[tp_ax] or kh % mesh.shape[tp_ax]):
            tp_ax = None
        ba = baxes or None
        spec = P(ba, None, tp_ax, None)
        f = functools.partial(_splash_local, block=block, interpret=interpret)
        if jax.sharding.AxisType.Explicit in mesh.axis_types:
            q, k, v = (jax.sharding.reshard(x, spec) for x in (q, k, v))
            segment_ids = jax.sharding.reshard(segment_ids, P(ba, None))
        return jax.shard_map(f, in_specs=(spec, spec, spec, P(ba, None)), out_specs=spec,
                             check_vma=False)(q, k, v, segment_ids)
    return _splash_local(q, k, v, segment_ids, block=block, interpret=interpret)


def _splash_local(q, k, v, segment_ids, *, block, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415
        splash_attention_kernel as sk, splash_attention_mask as sm)
    b, t, h, hd = q.shape
    kh = k.shape[2]
    tp = -(-t // 128) * 128
    blk = min(block, tp)
    while tp % blk:
        blk //= 2
    pad = ((0, 0), (0, tp - t), (0, 0), (0, 0))
    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, tp - t)), constant_values=-1)
    qh = (jnp.pad(q, pad) * (1.0 / math.sqrt(hd))).astype(q.dtype).transpose(0, 2, 1, 3)
    kr = jnp.repeat(jnp.pad(k, pad), h // kh, axis=2).transpose(0, 2, 1, 3)
    vr = jnp.repeat(jnp.pad(v, pad), h // kh, axis=2).transpose(0, 2, 1, 3)
    mask = sm.MultiHeadMask([sm.CausalMask((tp, tp)) for _ in range(h)])
    sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                          block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk,
                          block_kv_dq=blk)
    kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes,
                                interpret=interpret)
    o = jax.vmap(lambda qq, kk, vv, ss: kernel(qq, kk, vv, segment_ids=sk.SegmentIds(ss, ss)))(
        qh, kr, vr, seg)
    return o.transpose(0, 2, 1, 3)[:, :t].astype(q.dtype)
