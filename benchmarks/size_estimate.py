"""Computed (not measured) on-disk size of a `--target android` export, from a checkpoint's config and the recipe.

    python benchmarks/size_estimate.py /work/scratch/e2b                      # real-dimension E2B
    python benchmarks/size_estimate.py g3n_export/assets/gemma3n-pydoc --size e2b --compare /tmp/bench-android

Bytes per weight of each scheme (values plus scales and zero points, no container overhead):

* ExecuTorch `8da4w`, group 32: 4-bit values and one float32 scale per group, 0.5 + 4/32 bytes.
* ExecuTorch int8 / int4 tables: values plus one float32 scale per row (token embedding) or per row and decoder layer
  (PLE table). The LM head is an untied linear over the token embedding's shape in the recipe's `lm_head` scheme
  (`8da8w`: int8 with a float32 scale per row).
* ONNX `MatMulNBits` int4, block 32, asymmetric: 0.5 + 4/32 (float32 scale) + 0.5/32 (4-bit zero point) bytes.
  The LM head is one of these linears.
* ONNX `GatherBlockQuantized`, block 32, asymmetric: int8 1 + 4/32 + 1/32 bytes, int4 0.5 + 4/32 + 0.5/32 bytes.
* Float weights (norms, AltUp router and coefficients): 4 bytes.

With `--compare FOLDER`, the same arithmetic is applied to that export's model and printed beside its real file sizes,
which shows how far the arithmetic is from what the exporters write.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from g3n_export.config import TextConfig
from g3n_export.layout import text_shapes
from g3n_export.targets.recipe import load_target_recipe

INT4_ET = 0.5 + 4 / 32
INT4_ONNX = 0.5 + 4 / 32 + 0.5 / 32
INT8_ONNX_TABLE = 1 + 4 / 32 + 1 / 32
FLOAT_ONLY = re.compile(r"norm|altup\.(modality_router|prediction_coefs|correction_coefs|correct_output_scale)")


def group_parameters(config: TextConfig) -> dict[str, int]:
    """Count the text decoder's parameters by how the android recipe stores them."""
    groups = {"linears": 0, "float": 0, "token_embedding": 0, "ple_table": 0}
    for name, shape in text_shapes(config, include_unused_kv=False).items():
        count = 1
        for size in shape:
            count *= size
        if name == "embed_tokens.weight":
            groups["token_embedding"] += count
        elif name == "embed_tokens_per_layer.weight":
            groups["ple_table"] += count
        elif len(shape) == 1 or FLOAT_ONLY.search(name):
            groups["float"] += count
        else:
            groups["linears"] += count
    return groups


def estimate(config: TextConfig) -> dict[str, dict[str, float]]:
    """Return the computed bytes of each android artifact file, split by tensor group."""
    groups = group_parameters(config)
    vocab, hidden = config.vocab_size, config.hidden_size
    ple_rows, layers = config.vocab_size_per_layer_input, config.num_hidden_layers
    lm_head = vocab * hidden
    head = load_target_recipe("android").executorch.lm_head
    return {
        "executorch/model.pte": {
            "linears (8da4w)": groups["linears"] * INT4_ET,
            f"lm_head ({head})": lm_head * INT4_ET if head == "8da4w" else lm_head + vocab * 4,
            "token embedding (int8 per row)": groups["token_embedding"] + vocab * 4,
            "float weights": groups["float"] * 4,
        },
        "executorch/ple.ptd": {"PLE table (int4 per row and layer)": groups["ple_table"] / 2 + ple_rows * layers * 4},
        "onnx/embed_tokens.onnx": {
            "token embedding (GatherBlockQuantized int8)": groups["token_embedding"] * INT8_ONNX_TABLE,
            "PLE table (GatherBlockQuantized int4)": groups["ple_table"] * INT4_ONNX,
        },
        "onnx/decoder_model_merged.onnx": {
            "linears + lm_head (MatMulNBits int4)": (groups["linears"] + lm_head) * INT4_ONNX,
            "float weights": groups["float"] * 4,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="Checkpoint folder (only config.json is read).")
    parser.add_argument("--size", default=None, help="Size recipe to slice with first (e.g. e2b); default: as is.")
    parser.add_argument("--compare", type=Path, default=None, help="Export folder whose real file sizes to print.")
    args = parser.parse_args()

    config = TextConfig.from_hf_dict(json.loads((args.checkpoint / "config.json").read_text()))
    if args.size:
        from g3n_export.recipes import load_size_recipe

        config = load_size_recipe(args.size).plan(config).target
    real = {}
    if args.compare is not None:
        files = json.loads((args.compare / "manifest.json").read_text())["files"]
        real = {rel: entry["bytes"] for rel, entry in files.items()}

    print("| file | computed MB | measured MB | parts (computed MB) |")
    print("|---|---|---|---|")
    totals = {"executorch": 0.0, "onnx": 0.0}
    for rel, parts in estimate(config).items():
        size = sum(parts.values())
        totals[rel.split("/")[0]] += size
        measured = f"{real[rel] / 1e6:,.1f}" if rel in real else "-"
        detail = ", ".join(f"{name} {value / 1e6:,.1f}" for name, value in parts.items())
        print(f"| {rel} | {size / 1e6:,.1f} | {measured} | {detail} |")
    for rel in ("onnx/embed_tokens.ort", "onnx/decoder_model_merged.ort"):
        if rel in real:
            print(f"| {rel} | (same as .onnx) | {real[rel] / 1e6:,.1f} | |")
    folder = totals["executorch"] + 2 * totals["onnx"]
    print(f"ExecuTorch files: {totals['executorch'] / 1e9:.3f} GB computed; ONNX files: {totals['onnx'] / 1e9:.3f} GB "
          f"computed; with the ORT copies the android folder holds {folder / 1e9:.3f} GB computed")


if __name__ == "__main__":
    main()
