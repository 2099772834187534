"""Dtype names <-> jnp dtypes, validated with a clear error."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16",
            "f16": "float16", "half": "float16", "float": "float32"}


def canonical_dtype(dtype):
    """'bfloat16' / 'float32' / 'float16' (or aliases, or a jnp/np dtype) -> jnp dtype."""
    if isinstance(dtype, str):
        name = _ALIASES.get(dtype.lower(), dtype.lower())
        if name.startswith("torch."):
            name = name[len("torch."):]
        if name not in DTYPES:
            raise ValueError(f"unknown dtype name {dtype!r}; expected one of {sorted(DTYPES)}")
        return DTYPES[name]
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}") from e
    if dt.name not in DTYPES:
        raise ValueError(f"unsupported dtype {dt.name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dt.name]


def dtype_name(dtype) -> str:
    return np.dtype(canonical_dtype(dtype)).name
