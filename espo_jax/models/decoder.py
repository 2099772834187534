"""The decoder-only transformer (Qwen3 / Qwen2 / Llama via `ModelConfig` flags).

Call convention (B rows, T tokens, S cache slots, D width, V vocab):
  model(ids i32[B,T], positions=None, attention_mask=None) -> logits f32[B,T,V]
      attention_mask i32[B,T]: 1 = real token (left padding etc.); positions default to
      cumsum(mask) - 1. Converted to segment ids (= mask != 0).
  model(ids, positions=None, segment_ids=seg i32[B,T]) -> logits f32[B,T,V]
      packed rows: several sequences per row, each a run of one segment id > 0 (0 =
      padding), causal within a segment; positions default to the index within the run.
  model(ids, positions, attention_mask=kv_mask i32[B,S], cache=cache, cache_index=i)
      -> (logits f32[B,T,V], new_cache)
`hidden_states` takes the same arguments. No [B,T,S] mask is ever built outside the
`dense` attention implementation (see `espo_jax.models.attention`).
MoE models (config.is_moe, L = len(config.moe_layers) sparse layers, k experts per token):
  routed_experts=i32[B,T,L,k] replays the given experts in every sparse layer;
  return_routing=True appends routing {"experts": i32[B,T,L,k] (each router's own top-k),
  "probs": f32[B,T,L,E]} to the outputs: (out, routing) where out is what the call
  returns without it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from espo_jax.models import cache as cache_lib
from espo_jax.models.attention import resolve_impl
from espo_jax.models.config import REMAT_POLICIES, ModelConfig
from espo_jax.models.dtypes import canonical_dtype as _as_dtype
from espo_jax.models.layers import Block, RMSNorm, param, rope_inv_freq


def positions_from_mask(mask):
    """Left padding: positions = cumsum(mask) - 1, clipped at 0. mask [B,T] -> i32[B,T]."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def positions_from_segment_ids(segment_ids):
    """Packed rows: the index of each token within its run of equal segment ids (0 for
    padding). segment_ids i32[B,T] -> i32[B,T]."""
    seg = segment_ids.astype(jnp.int32)
    t = seg.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), seg.shape)
    starts = jnp.concatenate([jnp.ones_like(seg[..., :1], bool), seg[..., 1:] != seg[..., :-1]],
                             axis=-1)
    run_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=seg.ndim - 1)
    return jnp.where(seg != 0, idx - run_start, 0)


class Decoder(nnx.Module):
    """Decoder-only LM. `dtype` is the compute dtype; logits are always float32."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        dtype, param_dtype = _as_dtype(dtype), _as_dtype(param_dtype)
        self.config = config
        self.dtype = dtype
        v, d = config.vocab_size, config.hidden_size
        self.embed_tokens = param(
            jax.nn.initializers.normal(0.02)(rngs.params(), (v, d), param_dtype),
            ("vocab", "embed"))
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        # A real Python list of layers (nnx.data marks it as pytree data).
        sparse = set(config.moe_layers)
        self.layers = nnx.data([Block(config, sparse=i in sparse, **kw)
                                for i in range(config.num_layers)])
        self.norm = RMSNorm(d, eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = param(
                jax.nn.initializers.normal(0.02)(rngs.params(), (d, v), param_dtype),
                ("embed", "vocab"))

    # -- public API -------------------------------------------------------------------------
    def unembedding(self):
        """The output projection W [D,V] (tied embedding transposed, or lm_head), param dtype."""
        if self.lm_head is None:
            return self.embed_tokens[...].T
        return self.lm_head[...]

    def init_cache(self, batch_size: int, max_len: int, dtype=None):
        """Zeroed KV cache: list over layers of {"k","v": [B,K,S,hd]} (S = max_len)."""
        return cache_lib.init_cache(self.config, batch_size, max_len,
                                    _as_dtype(dtype) if dtype is not None else self.dtype)

    def hidden_states(self, input_ids, positions=None, attention_mask=None, cache=None,
                      cache_index=None, *, segment_ids=None, routed_experts=None,
                      return_routing=False):
        """Final-norm hidden states f32[B,T,D] (plus the new cache when `cache` is given;
        plus routing with `return_routing`, see the module docstring)."""
        h, new_cache, routing = self._trunk(input_ids, positions, attention_mask, cache,
                                            cache_index, segment_ids, routed_experts)
        h = self.norm(h, out_dtype=jnp.float32)
        out = h if cache is None else (h, new_cache)
        return (out, routing) if return_routing else out

    def __call__(self, input_ids, positions=None, attention_mask=None, cache=None,
                 cache_index=None, *, segment_ids=None, routed_experts=None,
                 return_routing=False):
        """Logits f32[B,T,V]; with `cache`, returns (logits, new_cache)."""
        out, routing = self.hidden_states(input_ids, positions, attention_mask, cache, cache_index,
                                          segment_ids=segment_ids, routed_experts=routed_experts,
                                          return_routing=True)
        h, new_cache = (out, None) if cache is None else out
        w = self.unembedding().astype(jnp.float32)
        logits = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
        out = logits if cache is None else (logits, new_cache)
        return (out, routing) if return_routing else out

    # -- internals --------------------------------------------------------------------------
    def _trunk(self, input_ids, positions, attention_mask, cache, cache_index, segment_ids,
               routed=None):
        b, t = input_ids.shape
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)
        if segment_ids is not None and (attention_mask is not None or cache is not None):
            raise ValueError("segment_ids: pass either segment_ids (packed rows, no cache) or "
                             "attention_mask, not both")
        kv_seg = None
        if cache is None:
            packed = segment_ids is not None
            if packed:
                if segment_ids.shape != (b, t):
                    raise ValueError(f"segment_ids must be [B,T]={(b, t)}, got {segment_ids.shape}")
                seg = segment_ids.astype(jnp.int32)
                if positions is None:
                    positions = positions_from_segment_ids(seg)
            else:
                if attention_mask is None:
                    attention_mask = jnp.ones((b, t), jnp.int32)
                seg = (attention_mask != 0).astype(jnp.int32)
                if positions is None:
                    positions = positions_from_mask(attention_mask)
            cfg = self.config
            impl = resolve_impl(cfg.attention_impl, seq_len=t, block=cfg.attention_chunk,
                                dtype=self.dtype, head_dim=cfg.head_dim, packed=packed)
        else:
            s = cache_lib.cache_length(cache)
            if cache_index is None:
                raise ValueError("cache_index is required when a cache is given")
            kv = (jnp.ones((b, s), jnp.int32) if attention_mask is None
                  else attention_mask.astype(jnp.int32))
            if kv.shape != (b, s):
                raise ValueError(f"attention_mask with a cache must be the kv mask [B,S]={(b, s)}, "
                                 f"got {kv.shape}")
            kv_seg = (kv != 0).astype(jnp.int32)
            q_slot = jnp.minimum(cache_index + jnp.arange(t), s - 1)  # [T]
            seg = jnp.take(kv_seg, q_slot, axis=1)  # the queries' own slots say if they are real
            if positions is None:
                positions = jnp.take(positions_from_mask(kv), q_slot, axis=1)
            impl = "dense"
        positions = positions.astype(jnp.int32)
        inv_freq = rope_inv_freq(self.config)

        if cache is None and self.config.scan_layers and len(self.layers) > 1:
            # Dense models only (ModelConfig refuses scan_layers for MoE: routing is per layer).
            return (_scan_layers(self.layers, x, positions, seg, inv_freq, impl, self.config), None,
                    None)
        new_cache = [] if cache is not None else None
        routings = []
        for i, layer in enumerate(self.layers):
            # Sparse layer j of the model replays routed[:, :, j].
            r = None if routed is None or not layer.sparse else routed[:, :, len(routings)]
            if cache is None:
                if self.config.remat:
                    x, rt = _remat_layer(layer, x, positions, seg, inv_freq, impl,
                                         remat_policy(self.config.remat_policy), r)
                else:
                    x, _, rt = layer(x, positions, seg, inv_freq, impl=impl, routed=r)
            else:
                x, c, rt = layer(x, positions, seg, inv_freq, cache[i], cache_index, kv_seg,
                                 routed=r)
                new_cache.append(c)
            if rt is not None:
                routings.append(rt)
        routing = None
        if routings:  # stack the sparse layers on axis 2: [B,T,L,...]
            routing = {k: jnp.stack([r[k] for r in routings], axis=2) for k in routings[0]}
        return x, new_cache, routing


def remat_policy(name: str):
    """`ModelConfig.remat_policy` -> a jax.checkpoint policy. "nothing": keep only each
    layer's input (compute dtype) and recompute the rest; "matmuls": also keep the outputs
    of the weight matmuls (dots without batch dims; not the attention scores)."""
    if name == "nothing":
        return jax.checkpoint_policies.nothing_saveable
    if name == "matmuls":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    raise ValueError(f"remat_policy must be one of {list(REMAT_POLICIES)}, got {name!r}")


def _remat_layer(layer, x, positions, segment_ids, inv_freq, impl, policy, routed):
    """(x, routing or None) of one rematerialised layer."""
    def f(lay, x, positions, segment_ids, inv_freq, routed):
        x, _, routing = lay(x, positions, segment_ids, inv_freq, impl=impl, routed=routed)
        return x, routing
    return nnx.remat(f, policy=policy)(layer, x, positions, segment_ids, inv_freq, routed)


def _scan_layers(layers, x, positions, segment_ids, inv_freq, impl, cfg):
    """The training/scoring forward as one `lax.scan` over the layers (compile time does not
    grow with depth). The parameters stay a list of layers (HF paths, shardings and
    checkpoints unchanged); they are stacked here, and the stack's gradient flows back to
    each layer. Needs identical layers (same structure and shapes)."""
    splits = [nnx.split(layer) for layer in layers]
    graphdef = splits[0][0]
    leaves0, treedef = jax.tree.flatten(splits[0][1])
    flat = []
    for g, st in splits:
        leaves, td = jax.tree.flatten(st)
        if g != graphdef or td != treedef or [a.shape for a in leaves] != [
            a.shape for a in leaves0]:
            raise ValueError("model.scan_layers=True needs identical decoder layers; "
                             "set model.scan_layers=False for this model")
        flat.append(leaves)
    stacked = [jnp.stack(xs) for xs in zip(*flat)]

    def body(h, leaves):
        layer = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        return layer(h, positions, segment_ids, inv_freq, impl=impl)[0], None

    if cfg.remat:
        body = jax.checkpoint(body, policy=remat_policy(cfg.remat_policy), prevent_cse=False)
    x, _ = jax.lax.scan(body, x, stacked)
    return x
