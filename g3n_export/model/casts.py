"""Dtype casts that leave no node in an exported graph when the tensor already has the target dtype.

`x.float()` on a float32 tensor returns `x` in eager mode, but `torch.export` still records `aten.to` and a metadata
assert for it. A float32 Gemma 3n graph would carry thousands of such no-op nodes, and every ExecuTorch lowering pass
re-traces each one with symbolic shapes. Deciding from the static dtype at trace time keeps them out.
"""

from __future__ import annotations

import torch


def to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Return `x` cast to `dtype`, or `x` itself when it already has that dtype."""
    return x if x.dtype == dtype else x.to(dtype)


def to_float32(x: torch.Tensor) -> torch.Tensor:
    """Return `x` as float32 (the model's numeric islands), or `x` itself when it is float32 already."""
    return to_dtype(x, torch.float32)
