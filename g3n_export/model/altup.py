"""AltUp (alternating updates): the per-layer predict/correct steps over the A hidden-state streams.

The streams are a Python list of A tensors `[B, T, d]`, and the coefficient mixing is written as explicit per-stream
weighted sums (A² multiply-adds to predict, A to correct) rather than a permuted 4-D matmul. The router, the
coefficients and the mixing run in float32.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from g3n_export.model.casts import to_dtype, to_float32
from g3n_export.model.norm import RMSNorm


class AltUp(nn.Module):
    """Per-layer AltUp parameters and the predict/correct steps.

    Field names follow the checkpoint: `prediction_coefs` maps the A router outputs to the A×A prediction matrix
    (row-major, entry `A*i + j` weights stream j in prediction i), `correction_coefs` to A correction weights.

    The coefficients are not clipped at run time, because `weights.load_hf_weights` clips both to `altup_coef_clip`
    once. transformers 5.25 clips them only in training, so the two differ only where a stored coefficient exceeds the
    clip.
    """

    def __init__(self, hidden_size: int, num_streams: int, active_stream: int, eps: float) -> None:
        super().__init__()
        self.num_streams = num_streams
        self.active_stream = active_stream
        self.router_input_scale = 1.0 / hidden_size
        self.correct_output_scale = nn.Parameter(torch.zeros(hidden_size))
        self.correction_coefs = nn.Linear(num_streams, num_streams, bias=False)
        self.prediction_coefs = nn.Linear(num_streams, num_streams * num_streams, bias=False)
        self.modality_router = nn.Linear(hidden_size, num_streams, bias=False)
        self.router_norm = RMSNorm(hidden_size, eps)
        # One-hot rows that pick single coefficients through `linear`: XNNPACK (ExecuTorch 1.5.1) does not delegate a
        # slice of a tensor with a dynamic sequence length, and a slice in the middle of a layer splits its partition.
        for k in range(num_streams * num_streams):
            self.register_buffer(f"pick_prediction_{k}", self._one_hot(k, num_streams * num_streams), persistent=False)
        for k in range(num_streams):
            self.register_buffer(f"pick_correction_{k}", self._one_hot(k, num_streams), persistent=False)

    @staticmethod
    def _one_hot(index: int, size: int) -> torch.Tensor:
        row = torch.zeros(1, size)
        row[0, index] = 1.0
        return row

    def reset_buffers(self) -> None:
        """Rebuild the one-hot rows (after the module was built on the meta device)."""
        a = self.num_streams
        for k in range(a * a):
            setattr(self, f"pick_prediction_{k}", self._one_hot(k, a * a))
        for k in range(a):
            setattr(self, f"pick_correction_{k}", self._one_hot(k, a))

    def _pick(self, coefs: torch.Tensor, name: str) -> torch.Tensor:
        # `coefs` is float32 like the one-hot rows. Multiplying by exact zeros and one keeps finite coefficients exact.
        return nn.functional.linear(coefs, getattr(self, name))

    def untie_correction_router(self) -> None:
        """Give the correct step its own copy of the router norm and linear (same values).

        XNNPACK (ExecuTorch 1.5.1) delegates a linear whole only when no other linear reads its weight, and the
        predict and correct steps both route. The ExecuTorch target calls this, and eager results do not change.
        """
        self.correction_router_norm = copy.deepcopy(self.router_norm)
        self.correction_modality_router = copy.deepcopy(self.modality_router)

    def router_modalities(self, x: torch.Tensor, *, correction: bool = False) -> torch.Tensor:
        """Return `tanh(router(norm(x) / d))`, float32 `[B, T, A]` (with the correct step's copy for `correction`)."""
        norm, router = self.router_norm, self.modality_router
        if correction and hasattr(self, "correction_modality_router"):
            norm, router = self.correction_router_norm, self.correction_modality_router
        routed = router(norm(x) * self.router_input_scale)
        return torch.tanh(to_float32(routed))

    def predict(self, streams: list[torch.Tensor]) -> list[torch.Tensor]:
        """Return the A predictions `pred_i = H_i + sum_j C[i, j] * H_j`, with C chosen per token by the router."""
        dtype = streams[0].dtype
        a = self.num_streams
        modalities = self.router_modalities(streams[self.active_stream])
        coefs = to_float32(self.prediction_coefs(to_dtype(modalities, dtype)))  # shape: [B, T, A*A]

        predictions = []
        for i in range(a):
            mixed = to_float32(streams[i])
            for j in range(a):
                mixed = mixed + self._pick(coefs, f"pick_prediction_{a * i + j}") * to_float32(streams[j])
            predictions.append(to_dtype(mixed, dtype))
        return predictions

    def correct(self, predictions: list[torch.Tensor], activated: torch.Tensor) -> list[torch.Tensor]:
        """Return `pred_i + c_i * (activated - pred_active)`, with `c = correction_coefs(router(activated)) + 1`."""
        dtype = activated.dtype
        modalities = self.router_modalities(activated, correction=True)
        coefs = to_float32(self.correction_coefs(to_dtype(modalities, dtype))) + 1.0  # shape: [B, T, A]
        innovation = to_float32(activated) - to_float32(predictions[self.active_stream])  # shape: [B, T, d]
        return [
            to_dtype(self._pick(coefs, f"pick_correction_{i}") * innovation + to_float32(predictions[i]), dtype)
            for i in range(self.num_streams)
        ]

    def scale_output(self, x: torch.Tensor) -> torch.Tensor:
        return to_dtype(to_float32(x) * to_float32(self.correct_output_scale), x.dtype)
