"""Target recipes: which artifacts to emit for a device class, how to quantize each tensor group, and the parity bars.

A target recipe is a TOML file under `recipes/targets/` (or any path). `--quant fp32|int8|int4` on the command line
replaces the recipe's linear and embedding quantization as a whole; see `TargetRecipe.with_quant`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from g3n_export.errors import RecipeError
from g3n_export.recipes import read_recipe_toml, resolve_recipe_path

FORMATS = ("pte", "onnx", "ort")
ET_LINEAR = ("fp32", "8da8w", "8da4w")
ET_LOGITS = ("last", "all")
ET_LM_HEAD = ("8da4w", "8da8w")
ONNX_LINEAR = ("fp32", "int8", "int4")
TABLE_QUANT = ("fp32", "int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
PRECISIONS = ("fp32", "int8", "int4")


@dataclass(frozen=True)
class ExecuTorchSpec:
    """ExecuTorch program settings (XNNPACK backend)."""

    linear: str = "8da4w"  # 8-bit dynamic activations with 4-bit grouped weights
    group_size: int = 32
    embedding: str = "int8"  # token embedding, gathered by id; the LM head shares it only when it is fp32
    ple: str = "int4"  # PLE table, per-row, stored in ple.ptd
    # A quantized token embedding is gathered outside XNNPACK, which packs a linear's weight into its own layout, so
    # the LM head becomes an untied linear of its own scheme. With a float embedding the head stays tied and float.
    lm_head: str = "8da4w"
    # Positions whose logits forward returns. "last" is all a generation loop reads. "all" suits scoring whole
    # sequences but costs an output buffer of prefill_chunk x vocab floats.
    logits: str = "last"
    # Maximum number of tokens per forward call (the program's get_max_seq_len). The KV cache keeps max_seq_len
    # positions (get_max_context_len). ExecuTorch plans every activation buffer for the longest call, so this bounds
    # the program's working memory. Longer prompts are prefilled in calls of this size, as ExecuTorch's LLM runner does.
    prefill_chunk: int = 128

    @property
    def precision(self) -> str:
        schemes = [self.linear, self.embedding, self.ple]
        if self.embedding != "fp32":
            schemes.append(self.lm_head)  # an untied LM head of its own scheme
        return _precision(*schemes)

    def describe(self) -> str:
        head = "tied" if self.embedding == "fp32" else self.lm_head
        positions = "every position" if self.logits == "all" else "the last position"
        return (f"linears {self.linear} (group {self.group_size}), token embedding {self.embedding}, LM head {head}, "
                f"PLE {self.ple}, logits of {positions}, calls of up to {self.prefill_chunk} tokens")


@dataclass(frozen=True)
class OnnxSpec:
    """ONNX graph settings (ONNX Runtime CPU, ORT format for ONNX Runtime Mobile)."""

    linear: str = "int4"  # weight-only MatMulNBits with 4 or 8 bits
    block_size: int = 32
    accuracy_level: int = 4  # MatMulNBits compute type: 0 = unset (fp32), 4 = int8 activations
    embedding: str = "int8"
    ple: str = "int8"
    opset: int = 21

    @property
    def precision(self) -> str:
        return _precision(self.linear, self.embedding, self.ple)

    def describe(self) -> str:
        return (f"linears {self.linear} (block {self.block_size}, accuracy level {self.accuracy_level}), "
                f"token embedding {self.embedding}, PLE {self.ple}, opset {self.opset}")


@dataclass(frozen=True)
class ParityBars:
    """Pass/fail thresholds for one precision class, measured against the float32 reference logits."""

    max_abs_logit: float | None = None  # max |Δlogit| over all prompts and positions; None = not checked
    max_mean_kl: float | None = None  # mean KL(reference ‖ artifact) per position, in nats
    min_top1: float | None = None  # fraction of positions whose argmax equals the reference's
    min_greedy_match: float | None = None  # fraction of greedy tokens identical to the reference's greedy tokens


@dataclass(frozen=True)
class TargetRecipe:
    name: str
    description: str
    formats: tuple[str, ...]
    max_seq_len: int
    executorch: ExecuTorchSpec
    onnx: OnnxSpec
    bars: dict[str, ParityBars]
    path: Path | None = None

    def with_quant(self, quant: str | None) -> TargetRecipe:
        """Return the recipe with linear and embedding quantization replaced by one level (fp32, int8, int4)."""
        if quant is None:
            return self
        if quant not in PRECISIONS:
            raise RecipeError(f"invalid --quant {quant!r}; choose one of {', '.join(PRECISIONS)}")
        et_linear = {"fp32": "fp32", "int8": "8da8w", "int4": "8da4w"}[quant]
        et = dataclasses.replace(self.executorch, linear=et_linear, embedding=quant, ple=quant,
                                 lm_head=self.executorch.lm_head if quant == "fp32" else et_linear)
        onnx = dataclasses.replace(self.onnx, linear=quant, embedding=quant, ple=quant)
        return dataclasses.replace(self, executorch=et, onnx=onnx)

    def with_formats(self, formats: str | None) -> TargetRecipe:
        """Return the recipe restricted to a comma-separated subset of its formats."""
        if formats is None:
            return self
        chosen = tuple(f.strip() for f in formats.split(",") if f.strip())
        unknown = [f for f in chosen if f not in FORMATS]
        if unknown or not chosen:
            raise RecipeError(f"invalid --formats {formats!r}; use a comma-separated subset of {', '.join(FORMATS)}")
        if "ort" in chosen and "onnx" not in chosen:
            raise RecipeError("--formats ort needs onnx too, because the .ort files are converted from the .onnx files")
        return dataclasses.replace(self, formats=chosen)

    def bars_for(self, precision: str) -> ParityBars:
        return self.bars.get(precision, ParityBars())


def _precision(*schemes: str) -> str:
    # The lowest bit width used by any tensor group names the precision class (8da4w counts as 4 bits).
    if any("4" in s for s in schemes):
        return "int4"
    if any("8" in s for s in schemes):
        return "int8"
    return "fp32"


def load_target_recipe(name_or_path: str | Path) -> TargetRecipe:
    """Load and validate a target recipe by shipped name (android, ios, desktop) or TOML path.

    Raises:
        RecipeError: the file is missing or a field is invalid; the message names the field and the allowed values.
    """
    path = resolve_recipe_path("targets", name_or_path)
    return parse_target_recipe(read_recipe_toml(path), path)


def parse_target_recipe(data: dict[str, Any], path: Path | None = None) -> TargetRecipe:
    where = f"target recipe {path}" if path else "target recipe"
    errors: list[str] = []

    def check_keys(table: dict[str, Any], allowed: set[str], prefix: str) -> None:
        for key in table:
            if key not in allowed:
                errors.append(f"unknown field {prefix + key!r} (allowed: {', '.join(sorted(allowed))})")

    check_keys(data, {"name", "description", "formats", "max_seq_len", "executorch", "onnx", "validation"}, "")
    name = data.get("name", path.stem if path else "")
    formats = data.get("formats", ["pte"])
    if not isinstance(formats, list) or not formats or any(f not in FORMATS for f in formats):
        errors.append(f"formats must be a non-empty list from {list(FORMATS)}, got {formats!r}")
        formats = []
    max_seq_len = data.get("max_seq_len", 1024)
    if not isinstance(max_seq_len, int) or max_seq_len < 8:
        errors.append(f"max_seq_len must be an integer of at least 8, got {max_seq_len!r}")

    et_data = data.get("executorch", {})
    check_keys(et_data, {f.name for f in dataclasses.fields(ExecuTorchSpec)}, "executorch.")
    et = ExecuTorchSpec(**{k: v for k, v in et_data.items() if k in {f.name for f in dataclasses.fields(ExecuTorchSpec)}})
    _check_choice(errors, "executorch.linear", et.linear, ET_LINEAR)
    _check_choice(errors, "executorch.group_size", et.group_size, GROUP_SIZES)
    _check_choice(errors, "executorch.embedding", et.embedding, TABLE_QUANT)
    _check_choice(errors, "executorch.ple", et.ple, TABLE_QUANT)
    _check_choice(errors, "executorch.logits", et.logits, ET_LOGITS)
    _check_choice(errors, "executorch.lm_head", et.lm_head, ET_LM_HEAD)
    if not isinstance(et.prefill_chunk, int) or isinstance(et.prefill_chunk, bool) or et.prefill_chunk < 2:
        errors.append(f"executorch.prefill_chunk must be an integer of at least 2, got {et.prefill_chunk!r}")

    onnx_data = data.get("onnx", {})
    check_keys(onnx_data, {f.name for f in dataclasses.fields(OnnxSpec)}, "onnx.")
    onnx = OnnxSpec(**{k: v for k, v in onnx_data.items() if k in {f.name for f in dataclasses.fields(OnnxSpec)}})
    _check_choice(errors, "onnx.linear", onnx.linear, ONNX_LINEAR)
    _check_choice(errors, "onnx.block_size", onnx.block_size, GROUP_SIZES)
    _check_choice(errors, "onnx.accuracy_level", onnx.accuracy_level, (0, 1, 2, 3, 4))
    _check_choice(errors, "onnx.embedding", onnx.embedding, TABLE_QUANT)
    _check_choice(errors, "onnx.ple", onnx.ple, TABLE_QUANT)

    bars: dict[str, ParityBars] = {}
    validation = data.get("validation", {})
    check_keys(validation, set(PRECISIONS), "validation.")
    bar_fields = {f.name for f in dataclasses.fields(ParityBars)}
    for precision, table in validation.items():
        if precision not in PRECISIONS or not isinstance(table, dict):
            continue
        check_keys(table, bar_fields, f"validation.{precision}.")
        values = {k: v for k, v in table.items() if k in bar_fields}
        for k, v in values.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                errors.append(f"validation.{precision}.{k} must be a non-negative number, got {v!r}")
        bars[precision] = ParityBars(**values)

    if errors:
        raise RecipeError(f"invalid {where}: " + "; ".join(errors))
    return TargetRecipe(name=name, description=data.get("description", ""), formats=tuple(formats),
                        max_seq_len=max_seq_len, executorch=et, onnx=onnx, bars=bars, path=path)


def _check_choice(errors: list[str], field: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        errors.append(f"{field} is {value!r}; allowed values are {', '.join(map(str, allowed))}")
