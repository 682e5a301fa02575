"""The precision rule: compute in `config.dtype`, keep state in at least float32.

Convs, matmuls and activations run in the compute dtype (`compute_dtype`: bfloat16 on GPU and
TPU by default, float32 on CPU). Parameters, BatchNorm statistics, optimizer state, membrane
potentials, logits and losses are `wide`: float32 under bfloat16 or float32 compute, float64
under float64 compute. float64 (which needs JAX's 64-bit mode) is for exactness checks: runs
that must agree beyond float32 rounding, e.g. N devices against one.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
AUTO_DTYPE = {"gpu": jnp.bfloat16, "tpu": jnp.bfloat16}  # backend -> compute dtype; else float32


def compute_dtype(name: str) -> Any:
    """The compute dtype `config.dtype` names: 'auto' is bfloat16 on GPU and TPU and float32
    on CPU; 'float32', 'bfloat16' and 'float64' are themselves everywhere."""
    if name == "auto":
        return AUTO_DTYPE.get(jax.default_backend(), jnp.float32)
    return DTYPES[name]


def wide_dtype(dtype: Any) -> Any:
    """The dtype of state kept beside `dtype` compute: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def wide(x: jax.Array) -> jax.Array:
    """`x` in at least float32: bfloat16 -> float32; float32 and float64 unchanged."""
    return x.astype(wide_dtype(x.dtype))
