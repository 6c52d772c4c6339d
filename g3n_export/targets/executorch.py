"""ExecuTorch target: the decoder as an XNNPACK program (`model.pte`) with the PLE table in `ple.ptd`.

Pipeline (`export_executorch`):

1. load + quantize: build `Gemma3nDecoder` on the meta device and fill it one checkpoint tensor at a time, quantizing
   each tensor group as it arrives, so the float model never exists in memory as a whole.
2. export: `torch.export` (strict) with a dynamic sequence length `1 <= T <= prefill_chunk` per call, over a KV cache
   of `max_seq_len` positions.
3. lower: `to_edge_transform_and_lower` with one XNNPACK partitioner for quantized linears and float ops alike;
   the quantized gathers stay outside the delegate on ExecuTorch's quantized kernels.
4. emit: `to_executorch` with the PLE table (and its scales) tagged as external constants, written to `ple.ptd`;
   every other constant stays in `model.pte`.

Tensor groups and their quantization (`ExecuTorchSpec`):

* linears: torchao `8da4w` (group size from the spec) or `8da8w`, or float. A linear too narrow for whole int4 groups
  gets `8da8w` (see `g3n_export.quantize.linear_scheme_for`). The small AltUp router and coefficient linears stay
  float.
* token embedding: int8 per row, or int4 in groups of the spec's group size, gathered with
  `quantized_decomposed::embedding_byte` / `embedding_4bit`.
* LM head: tied to the token embedding in float. With a quantized embedding it is untied into its own linear of the
  spec's `lm_head` scheme (`8da4w` or `8da8w`), because XNNPACK packs a linear's weight into its delegate, where the
  gather cannot read it.
* PLE table: int8 or int4 with one scale per row and decoder layer (groups of `hidden_size_per_layer_input`), gathered
  by the same kernels. Only the rows of the input tokens are read, so a runtime that memory-maps `ple.ptd` keeps only
  those pages resident.

The program follows the contract ExecuTorch's LLM runner expects: `forward(tokens int64[1, T], input_pos int64[1])`
returns float32 logits, and constant methods give the runner its metadata (`RUNNER_METADATA`). The logits are those
of the last position, `[1, 1, V]`, unless the spec asks for every position (`[1, T, V]`). The runner reads only the
last row either way, and ExecuTorch's memory plan sizes every buffer for the largest T, so full logits would hold
T x V floats in memory for the program's lifetime. For the same reason a call takes at most `prefill_chunk` tokens
(`get_max_seq_len`), while the KV cache holds `max_seq_len` positions (`get_max_context_len`): ExecuTorch's LLM
runner prefills longer prompts in calls of `get_max_seq_len` tokens.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from g3n_export.config import TextConfig
from g3n_export.errors import CheckpointError
from g3n_export.layout import text_shapes
from g3n_export.memory import peak_rss_bytes
from g3n_export.model import Gemma3nDecoder, hf_name_map
from g3n_export.model.embedding import rounded_per_dtype
from g3n_export.quantize import TABLE_BITS, QuantizedTable, quantize_linear, quantize_table
from g3n_export.targets.recipe import ExecuTorchSpec
from g3n_export.targets.xnnpack_partition import xnnpack_partitioners

log = logging.getLogger(__name__)

PTE_FILE = "model.pte"
PLE_DATA_NAME = "ple"  # ExecuTorch writes the constants tagged with this name to "ple.ptd"
PLE_FILE = f"{PLE_DATA_NAME}.ptd"

TOKEN_EMBEDDING = "embedder.token_embedding.weight"
PLE_TABLE = "embedder.per_layer_embedding.weight"
PLE_MODULE = "embedder.per_layer_embedding"
# AltUp coefficients are clipped at load time, as transformers does in training and `load_hf_weights` does here.
_ALTUP_COEFFICIENTS = ("altup.prediction_coefs.weight", "altup.correction_coefs.weight")

ProgressCallback = Callable[[str, int, int], None]


# Quantized gathers --------------------------------------------------------------------------------------------------


def _register_quantized_ops() -> None:
    # Defines the quantized_decomposed embedding ops for tracing (their runtime kernels ship with ExecuTorch).
    import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401


def _gather(qvals: torch.Tensor, scales: torch.Tensor, bits: int, ids: torch.Tensor) -> torch.Tensor:
    if bits == 8:
        return torch.ops.quantized_decomposed.embedding_byte.dtype(
            qvals, scales, None, -128, 127, ids, dtype=torch.float32
        )
    return torch.ops.quantized_decomposed.embedding_4bit.dtype(qvals, scales, None, -8, 7, ids, dtype=torch.float32)


class QuantizedTokenEmbedding(nn.Module):
    """`TokenEmbedding` over a per-row quantized table: gathered rows times `sqrt(hidden_size)`."""

    def __init__(self, table: QuantizedTable) -> None:
        super().__init__()
        _register_quantized_ops()
        self.bits = table.bits
        self.register_buffer("qvals", table.qvals)
        self.register_buffer("scales", table.scales)
        self._scale = rounded_per_dtype(math.sqrt(table.row_width))[torch.float32]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return _gather(self.qvals, self.scales, self.bits, tokens) * self._scale


class QuantizedPerLayerEmbedding(nn.Module):
    """`PerLayerEmbedding` over a per-row quantized PLE table (same id mapping: ids outside the table read row 0)."""

    def __init__(self, table: QuantizedTable, num_layers: int, hidden_size_per_layer_input: int) -> None:
        super().__init__()
        _register_quantized_ops()
        self.bits = table.bits
        self.vocab_size_per_layer_input = table.num_rows
        self.num_layers = num_layers
        self.hidden_size_per_layer_input = hidden_size_per_layer_input
        self.register_buffer("qvals", table.qvals)
        self.register_buffer("scales", table.scales)
        self._scale = rounded_per_dtype(math.sqrt(hidden_size_per_layer_input))[torch.float32]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        in_table = (tokens >= 0) & (tokens < self.vocab_size_per_layer_input)
        rows = torch.where(in_table, tokens, torch.zeros_like(tokens))
        gathered = _gather(self.qvals, self.scales, self.bits, rows) * self._scale  # shape: [B, T, L * P]
        return gathered.reshape(tokens.shape[0], -1, self.num_layers, self.hidden_size_per_layer_input)


# Loading and quantizing ---------------------------------------------------------------------------------------------


@dataclass
class Stage:
    """Wall time and process peak RSS (so far) at the end of one export stage."""

    name: str
    seconds: float
    peak_rss_bytes: int


@dataclass
class ExecuTorchExport:
    """Files, sizes, quantization schemes and stage measurements of one `export_executorch` run.

    Attributes:
        pte_path, ptd_path: the program and the PLE data file.
        pte_bytes, ptd_bytes: their sizes.
        ple_bytes: bytes of the PLE table constants (values and scales) stored in the `.ptd`.
        schemes: quantization per tensor group: `embed_tokens`, `lm_head`, `ple_table`, `linears`, and
            `linears_fallback` when some linears could not use the requested scheme.
        stages: time and peak memory per stage, in order.
    """

    pte_path: Path
    ptd_path: Path
    pte_bytes: int
    ptd_bytes: int
    ple_bytes: int
    max_seq_len: int
    prefill_chunk: int
    schemes: dict[str, str]
    stages: list[Stage] = field(default_factory=list)


def table_scheme(kind: str, group_size: int) -> str:
    """Return a table's scheme for the manifest, e.g. `int4 symmetric, per row in groups of 256, float32 scales`."""
    if kind == "fp32":
        return "fp32"
    return f"{kind} symmetric, per row in groups of {group_size}, float32 scales"


def build_decoder(
    source,
    spec: ExecuTorchSpec,
    max_seq_len: int,
    *,
    progress: ProgressCallback | None = None,
) -> tuple[Gemma3nDecoder, dict[str, str]]:
    """Build the decoder from a checkpoint with every tensor group quantized as `spec` specifies.

    The model is created on the meta device; each parameter is read from `source`, cast to float32 and quantized
    before the next is read. Peak memory is therefore about the quantized model plus the largest float32 tensor
    (the token embedding when the LM head is quantized).

    Args:
        source: a `Checkpoint` or `SlicedCheckpoint` (anything with `text_config` and `text_tensor(name)`).
        spec: quantization per tensor group.
        max_seq_len: KV cache length.
        progress: called as `progress("load", done, total)` after each tensor.

    Returns:
        The eval-mode decoder and the scheme per tensor group.

    Raises:
        CheckpointError: a tensor is missing or has the wrong shape.
        ValueError: the spec names an unknown scheme, or a group size that does not divide the table rows.
    """
    config: TextConfig = source.text_config
    _check_spec(spec, config)
    with torch.device("meta"):
        model = Gemma3nDecoder(config, max_seq_len, logits_to_keep=1 if spec.logits == "last" else 0)
    mapping = hf_name_map(config)
    expected = text_shapes(config, include_unused_kv=False)
    fallback: set[str] = set()

    for done, (module_name, hf_name) in enumerate(mapping.items(), start=1):
        tensor = source.text_tensor(hf_name)
        if tuple(tensor.shape) != expected[hf_name]:
            raise CheckpointError(
                f"tensor {hf_name!r} has shape {list(tensor.shape)}, expected {list(expected[hf_name])}"
            )
        if module_name == PLE_TABLE:
            _load_ple(model, tensor, spec, config)
        elif module_name == TOKEN_EMBEDDING:
            _load_token_embedding(model, tensor, spec, fallback)
        else:
            _load_stack_tensor(model, module_name, hf_name, tensor, spec, config, fallback)
        del tensor
        if progress is not None:
            progress("load", done, len(mapping))

    model.reset_buffers()
    for layer in model.stack.layers:
        layer.altup.untie_correction_router()
    unfilled = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if unfilled:
        raise CheckpointError(f"no checkpoint tensor was loaded into {unfilled[:5]}; the name table is incomplete")

    schemes = {
        "embed_tokens": table_scheme(spec.embedding, _token_group_size(spec, config)),
        "lm_head": _lm_head_scheme(spec),
        "ple_table": table_scheme(spec.ple, config.hidden_size_per_layer_input),
        "linears": _linear_scheme(spec.linear, spec.group_size),
        "altup": "fp32 (router and coefficient linears)",
    }
    if fallback:
        schemes["linears_fallback"] = f"8da8w for {len(fallback)} linears narrower than the group: " + ", ".join(
            sorted(fallback)[:4]
        ) + (" ..." if len(fallback) > 4 else "")
    return model.eval(), schemes


def _check_spec(spec: ExecuTorchSpec, config: TextConfig) -> None:
    from g3n_export.quantize import check_group_size
    from g3n_export.targets.recipe import ET_LINEAR, ET_LM_HEAD, ET_LOGITS, TABLE_QUANT

    if spec.linear not in ET_LINEAR:
        raise ValueError(f"executorch linear scheme {spec.linear!r} is not one of {', '.join(ET_LINEAR)}")
    if spec.lm_head not in ET_LM_HEAD:
        raise ValueError(f"executorch LM head scheme {spec.lm_head!r} is not one of {', '.join(ET_LM_HEAD)}")
    if spec.logits not in ET_LOGITS:
        raise ValueError(f"executorch logits {spec.logits!r} is not one of {', '.join(ET_LOGITS)}")
    for name, value in (("embedding", spec.embedding), ("ple", spec.ple)):
        if value not in TABLE_QUANT:
            raise ValueError(f"executorch {name} scheme {value!r} is not one of {', '.join(TABLE_QUANT)}")
    if spec.ple in TABLE_BITS:
        check_group_size(config.ple_width, config.hidden_size_per_layer_input, TABLE_BITS[spec.ple])
    if spec.embedding in TABLE_BITS:
        check_group_size(config.hidden_size, _token_group_size(spec, config), TABLE_BITS[spec.embedding])


def _token_group_size(spec: ExecuTorchSpec, config: TextConfig) -> int:
    # int8 rows keep one scale per row. int4 rows use the spec's group size, because 15 levels per row lose too much.
    if spec.embedding == "int4" and config.hidden_size % spec.group_size == 0:
        return spec.group_size
    return config.hidden_size


def _lm_head_scheme(spec: ExecuTorchSpec) -> str:
    if spec.embedding == "fp32":
        return "fp32, tied to embed_tokens"
    if spec.lm_head == "8da8w":
        return "8da8w (untied copy of embed_tokens)"
    return f"8da4w group size {spec.group_size} (untied copy of embed_tokens)"


def _linear_scheme(linear: str, group_size: int) -> str:
    return f"8da4w group size {group_size}" if linear == "8da4w" else linear


def _load_ple(model: Gemma3nDecoder, tensor: torch.Tensor, spec: ExecuTorchSpec, config: TextConfig) -> None:
    if spec.ple == "fp32":
        _assign(model, PLE_TABLE, tensor.to(torch.float32))
        return
    table = quantize_table(tensor, TABLE_BITS[spec.ple], config.hidden_size_per_layer_input)
    model.embedder.per_layer_embedding = QuantizedPerLayerEmbedding(
        table, config.num_hidden_layers, config.hidden_size_per_layer_input
    )


def _load_token_embedding(model: Gemma3nDecoder, tensor: torch.Tensor, spec: ExecuTorchSpec, fallback: set[str]) -> None:
    config = model.config
    weight = tensor.to(torch.float32)
    if spec.embedding == "fp32":
        _assign(model, TOKEN_EMBEDDING, weight)
        model.stack.lm_head.weight = model.embedder.token_embedding.weight
        return
    bits = TABLE_BITS[spec.embedding]
    model.embedder.token_embedding = QuantizedTokenEmbedding(quantize_table(weight, bits, _token_group_size(spec, config)))
    lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    lm_head.weight = nn.Parameter(weight, requires_grad=False)
    if quantize_linear(lm_head, spec.lm_head, spec.group_size) != spec.lm_head:
        fallback.add("stack.lm_head")
    model.stack.lm_head = lm_head


def _load_stack_tensor(
    model: Gemma3nDecoder,
    module_name: str,
    hf_name: str,
    tensor: torch.Tensor,
    spec: ExecuTorchSpec,
    config: TextConfig,
    fallback: set[str],
) -> None:
    tensor = tensor.to(torch.float32)
    clip = config.altup_coef_clip
    if clip is not None and hf_name.endswith(_ALTUP_COEFFICIENTS):
        tensor = tensor.clamp(-clip, clip)
    _assign(model, module_name, tensor)

    module_path = module_name.rpartition(".")[0]
    module = model.get_submodule(module_path)
    # The AltUp router and coefficients are tiny and numerically sensitive, so they stay float.
    quantizable = module_path != "stack.lm_head" and ".altup." not in module_path
    if spec.linear != "fp32" and isinstance(module, nn.Linear) and quantizable:
        if quantize_linear(module, spec.linear, spec.group_size) != spec.linear:
            fallback.add(module_path)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path)
    if not isinstance(getattr(module, attr, None), nn.Parameter):
        raise CheckpointError(f"the decoder has no parameter {name!r}; the name table and the model disagree")
    setattr(module, attr, nn.Parameter(tensor, requires_grad=False))


# Export and lowering ------------------------------------------------------------------------------------------------


def runner_metadata(
    config: TextConfig, max_seq_len: int, call_len: int, *, bos_id: int, eos_ids: list[int]
) -> dict[str, object]:
    """Return the constant methods ExecuTorch's LLM runner reads from the program, by method name.

    `get_max_seq_len` is the maximum number of tokens per call and `get_max_context_len` the KV cache length.
    """
    return {
        "get_bos_id": bos_id,
        "get_eos_ids": list(eos_ids),
        "get_max_seq_len": call_len,
        "get_max_context_len": max_seq_len,
        "get_vocab_size": config.vocab_size,
        "get_n_layers": config.num_hidden_layers,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": False,
        "enable_dynamic_shape": True,
    }


def call_length(spec: ExecuTorchSpec, max_seq_len: int) -> int:
    """Return the maximum number of tokens per program call: the spec's `prefill_chunk`, capped at the cache length.

    Raises:
        ValueError: `max_seq_len` or `prefill_chunk` is below 2 (a dynamic dimension needs a range of at least 2).
    """
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    if spec.prefill_chunk < 2:
        raise ValueError(f"prefill_chunk must be at least 2, got {spec.prefill_chunk}")
    return min(spec.prefill_chunk, max_seq_len)


def export_program(model: Gemma3nDecoder, call_len: int) -> torch.export.ExportedProgram:
    """Run `torch.export` (strict) on `forward(tokens, input_pos)` with a dynamic sequence length up to `call_len`."""
    _register_quantized_ops()
    seq_len = torch.export.Dim("seq_len", min=1, max=call_len)
    example = (torch.zeros(1, 2, dtype=torch.int64), torch.tensor([0]))
    with torch.no_grad():
        return torch.export.export(
            model, example, dynamic_shapes={"tokens": {1: seq_len}, "input_pos": None}, strict=True
        )


def _ple_placeholders(program) -> set[str]:
    signature = program.graph_signature
    constants = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    return {node for node, fqn in constants.items() if fqn.startswith(PLE_MODULE + ".")}


def export_executorch(
    source,
    out_dir: str | Path,
    spec: ExecuTorchSpec,
    max_seq_len: int,
    *,
    bos_id: int,
    eos_ids: list[int],
    progress: ProgressCallback | None = None,
) -> ExecuTorchExport:
    """Export the decoder to `out_dir/model.pte` (XNNPACK) and `out_dir/ple.ptd` (the PLE table).

    Files are written into `out_dir` directly; the caller makes the folder atomic.

    Args:
        source: a `Checkpoint` or `SlicedCheckpoint`.
        out_dir: folder for the two files (created if missing).
        spec: quantization per tensor group.
        max_seq_len: static KV cache length; prompt plus generated tokens must fit. A call takes at most
            `min(spec.prefill_chunk, max_seq_len)` tokens.
        bos_id, eos_ids: token ids the runner prepends and stops at (its metadata methods return them).
        progress: called as `progress(stage, done, total)`; stages are "load", "export", "lower", "write".

    Returns:
        Paths, sizes, the quantization scheme per tensor group, and time and peak memory per stage.

    Raises:
        CheckpointError: the checkpoint is incomplete.
        ValueError: invalid spec or max_seq_len.
        RuntimeError: the PLE table did not end up in the data file.
    """
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    call_len = call_length(spec, max_seq_len)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config: TextConfig = source.text_config
    stages: list[Stage] = []
    clock = time.perf_counter()

    def finish(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stages.append(Stage(name, now - clock, peak_rss_bytes()))
        log.info("executorch %s: %.1f s, peak RSS %.2f GiB", name, now - clock, stages[-1].peak_rss_bytes / 2**30)
        if progress is not None:
            progress(name, 1, 1)
        clock = now

    model, schemes = build_decoder(source, spec, max_seq_len, progress=progress)
    finish("load")

    program = export_program(model, call_len)
    del model
    finish("export")

    edge = to_edge_transform_and_lower(
        program,
        partitioner=xnnpack_partitioners(),
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
        constant_methods=runner_metadata(config, max_seq_len, call_len, bos_id=bos_id, eos_ids=eos_ids),
    )
    del program
    ple_nodes = _ple_placeholders(edge.exported_program())
    if not ple_nodes:
        raise RuntimeError("the lowered program has no PLE table constant to place in the data file")
    finish("lower")

    et_program = edge.to_executorch(
        ExecutorchBackendConfig(
            extract_delegate_segments=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            external_constants=lambda node: PLE_DATA_NAME if node.name in ple_nodes else None,
        )
    )
    del edge
    pte_path = out_dir / PTE_FILE
    with pte_path.open("wb") as f:
        et_program.write_to_file(f)
    et_program.write_tensor_data_to_file(str(out_dir))
    ptd_path = out_dir / PLE_FILE
    if not ptd_path.is_file():
        raise RuntimeError(f"ExecuTorch wrote no {PLE_FILE} into {out_dir}; the PLE table was not tagged as external")
    ple_bytes = _ple_constant_bytes(source.text_config, spec)
    del et_program
    finish("write")

    result = ExecuTorchExport(
        pte_path=pte_path,
        ptd_path=ptd_path,
        pte_bytes=pte_path.stat().st_size,
        ptd_bytes=ptd_path.stat().st_size,
        ple_bytes=ple_bytes,
        max_seq_len=max_seq_len,
        prefill_chunk=call_len,
        schemes=schemes,
        stages=stages,
    )
    log.info("wrote %s (%.1f MiB) and %s (%.1f MiB)", pte_path, result.pte_bytes / 2**20, ptd_path,
             result.ptd_bytes / 2**20)
    return result


def _ple_constant_bytes(config: TextConfig, spec: ExecuTorchSpec) -> int:
    rows, width = config.vocab_size_per_layer_input, config.ple_width
    if spec.ple == "fp32":
        return rows * width * 4
    values = rows * width * TABLE_BITS[spec.ple] // 8
    return values + rows * (width // config.hidden_size_per_layer_input) * 4
