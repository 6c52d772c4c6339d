"""A small Python runner over an exported ExecuTorch program (`model.pte` + `ple.ptd`) through its Python bindings.

It calls the program the way ExecuTorch's LLM runner does (`forward(tokens, input_pos)`, metadata methods), so the
parity checks, `generate` and `bench` exercise the same contract as a device.

The Python bindings of ExecuTorch 1.5.1 memory-map the `.ptd` (a shared read-only mapping, measured with
benchmarks/ple_mmap.py). They set no `madvise` hint, so kernel read-around can bring in more of the file than the
rows a sequence uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

METADATA_METHODS = (
    "get_bos_id", "get_eos_ids", "get_max_seq_len", "get_max_context_len", "get_vocab_size", "get_n_layers",
    "use_kv_cache", "enable_dynamic_shape",
)


def load_program_module(pte_path: str | Path, ptd_path: str | Path | None = None):
    """Load a program with its optional data file through `executorch.extension.pybindings.portable_lib`.

    The quantized embedding kernels (`quantized_decomposed::embedding_byte`, `embedding_4bit`) are registered first;
    in a C++ runner they are linked in with ExecuTorch's quantized kernel library.

    Raises:
        FileNotFoundError: a file is missing.
    """
    import executorch.kernels.quantized  # noqa: F401  (registers the quantized kernels with the runtime)
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    for path in (pte_path, ptd_path):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"ExecuTorch file {path} not found; export the model first")
    return _load_for_executorch(str(pte_path), data_path=None if ptd_path is None else str(ptd_path))


def planned_buffer_sizes(pte_path: str | Path) -> dict[str, list[int]]:
    """Return method name -> sizes in bytes of its memory-planned buffers (index 0 is reserved and always 0).

    A runtime allocates these buffers (activations, outputs, KV cache, each sized for the method's largest input)
    when it loads the method. Weights are not among them: XNNPACK keeps its packed copies in its own allocations.
    """
    import mmap

    from executorch.exir._serialize._program import deserialize_pte_binary

    with Path(pte_path).open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        program = deserialize_pte_binary(data)
    program = getattr(program, "program", program)
    return {plan.name: list(plan.non_const_buffer_sizes) for plan in program.execution_plan}


class ExecuTorchRunner:
    """Run an exported Gemma 3n program: logits for a chunk of tokens, and greedy generation.

    The program keeps its KV cache between `forward` calls; every sequence starts at `input_pos = 0`, which makes the
    previous sequence invisible to attention (no reset is needed). One call takes at most `max_call_len` tokens
    (`get_max_seq_len`) and the cache holds `max_context_len` positions (`get_max_context_len`); `prefill` splits
    longer inputs into calls as ExecuTorch's LLM runner does.

    Args:
        pte_path: the program (`model.pte`).
        ptd_path: its data file (`ple.ptd`), or None for a program without external constants.
    """

    def __init__(self, pte_path: str | Path, ptd_path: str | Path | None = None) -> None:
        self.module = load_program_module(pte_path, ptd_path)
        # The logits output is planned for the largest call: [1, max_call_len, V] when the program returns every
        # position, [1, 1, V] when it returns only the last.
        self.all_logits = int(self.module.method_meta("forward").output_tensor_meta(0).sizes()[1]) > 1
        self.metadata = {name: self._constant(name) for name in METADATA_METHODS}
        self.max_call_len = int(self.metadata["get_max_seq_len"])
        self.max_context_len = int(self.metadata["get_max_context_len"])
        self.vocab_size = int(self.metadata["get_vocab_size"])
        self.bos_id = int(self.metadata["get_bos_id"])
        eos = self.metadata["get_eos_ids"]
        self.eos_ids = {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}

    def _constant(self, name: str):
        outputs = self.module.run_method(name, ())
        return outputs[0] if len(outputs) == 1 else list(outputs)

    def forward(self, tokens: torch.Tensor, input_pos: int) -> torch.Tensor:
        """Return float32 logits for int64 `tokens` `[1, T]` at positions `input_pos ..`.

        The logits are `[1, T, V]` when the program returns every position (`all_logits`), else `[1, 1, V]` for the
        last token.

        Raises:
            ValueError: more than `max_call_len` tokens, or positions past the KV cache.
        """
        tokens = tokens.to(torch.int64).reshape(1, -1)
        if tokens.shape[1] > self.max_call_len:
            raise ValueError(
                f"{tokens.shape[1]} tokens in one call, but the program takes at most {self.max_call_len} "
                "(its prefill_chunk); feed them through prefill(), which splits them into calls"
            )
        if input_pos < 0 or input_pos + tokens.shape[1] > self.max_context_len:
            raise ValueError(
                f"positions {input_pos}..{input_pos + tokens.shape[1] - 1} do not fit the program's KV cache of "
                f"{self.max_context_len} positions (max_seq_len); shorten the prompt or export with a larger "
                "max_seq_len"
            )
        (logits,) = self.module.forward((tokens, torch.tensor([input_pos], dtype=torch.int64)))
        return logits

    def prefill(self, tokens: Sequence[int] | torch.Tensor, input_pos: int = 0) -> torch.Tensor:
        """Feed `tokens` from `input_pos` in calls of at most `max_call_len` tokens and return the logits.

        The result is `[1, T, V]` for a program that returns every position, else the last token's `[1, 1, V]`.
        """
        tokens = torch.as_tensor(tokens, dtype=torch.int64).reshape(1, -1)
        if tokens.shape[1] == 0:
            raise ValueError("invalid empty token sequence; prefill needs at least one token")
        outputs = []
        for start in range(0, tokens.shape[1], self.max_call_len):
            outputs.append(self.forward(tokens[:, start:start + self.max_call_len], input_pos + start))
        return torch.cat(outputs, dim=1) if self.all_logits else outputs[-1]

    def logits(self, tokens: Sequence[int] | torch.Tensor, *, chunk_sizes: Sequence[int] | None = None) -> torch.Tensor:
        """Return the logits of a sequence fed from position 0 whole or in the given chunks (each through `prefill`).

        The result is `[1, T, V]` for a program that returns every position. For one that returns only the last,
        it is `[1, C, V]`: the last position of each of the C chunks (`chunk_sizes=[1] * T` gives every position).
        """
        tokens = torch.as_tensor(tokens, dtype=torch.int64).reshape(1, -1)
        sizes = list(chunk_sizes) if chunk_sizes is not None else [tokens.shape[1]]
        if sum(sizes) != tokens.shape[1]:
            raise ValueError(f"chunk sizes {sizes} add up to {sum(sizes)}, but there are {tokens.shape[1]} tokens")
        outputs, start = [], 0
        for size in sizes:
            outputs.append(self.prefill(tokens[:, start:start + size], start))
            start += size
        return torch.cat(outputs, dim=1)

    def prefill_logits(self, tokens: Sequence[int] | torch.Tensor, positions: Sequence[int] | None = None) -> torch.Tensor:
        """Return logits `[1, P, V]` at `positions` (default: all) of a sequence prefilled from position 0.

        A program that returns only the last position runs one prefill per requested position, each on the prefix
        that ends there, so every row comes from a prefill as a device runs it.
        """
        tokens = torch.as_tensor(tokens, dtype=torch.int64).reshape(1, -1)
        positions = list(range(tokens.shape[1])) if positions is None else list(positions)
        if any(not 0 <= p < tokens.shape[1] for p in positions):
            raise ValueError(f"positions {positions} must lie in 0..{tokens.shape[1] - 1}")
        if self.all_logits:
            return self.prefill(tokens)[:, positions]
        return torch.cat([self.prefill(tokens[:, :p + 1]) for p in positions], dim=1)

    def generate(self, prompt: Sequence[int], max_new_tokens: int, *, stop_at_eos: bool = True) -> list[int]:
        """Greedy continuation of `prompt` (ids, BOS included if wanted): prefill, then one token a step.

        Stops after `max_new_tokens`, at an end-of-sequence id (included in the output) when `stop_at_eos`, or when
        the KV cache is full.
        """
        if not prompt:
            raise ValueError("the prompt must hold at least one token (usually BOS)")
        logits = self.prefill(list(prompt))
        position = len(prompt)
        generated: list[int] = []
        while len(generated) < max_new_tokens:
            token = int(logits[0, -1].argmax())
            generated.append(token)
            if (stop_at_eos and token in self.eos_ids) or position >= self.max_context_len:
                break
            logits = self.forward(torch.tensor([[token]]), position)
            position += 1
        return generated
