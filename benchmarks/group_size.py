"""Held-out fidelity of the android recipe's ExecuTorch quantization at several 8da4w group sizes, in eager PyTorch.

    python benchmarks/group_size.py --windows 40 --groups 32 64 128

Builds the decoder of the bundled model's E2B slice with `build_decoder` (the same torchao quantization the ExecuTorch
program carries, before lowering) and compares its logits with the float32 transformers reference on held-out
windows. Larger groups store fewer scales (0.5 + 4/group bytes per weight) at some cost in fidelity. Linears narrower
than a group fall back to 8da8w, and the bundled model's linears are narrow, so the fallback count is printed too.
"""

from __future__ import annotations

import argparse
import dataclasses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=40, help="held-out windows of up to 128 tokens")
    parser.add_argument("--groups", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--size", default="e2b")
    args = parser.parse_args()

    import torch

    from g3n_export.bundled import BUNDLED_MODEL
    from g3n_export.checkpoint import open_checkpoint
    from g3n_export.matformer import SlicedCheckpoint
    from g3n_export.parity import compare_logits
    from g3n_export.recipes import load_size_recipe
    from g3n_export.reference import reference_logits
    from g3n_export.targets.executorch import build_decoder
    from g3n_export.targets.recipe import load_target_recipe
    from g3n_export.tokenizer import load_sentencepiece
    from g3n_export.training.corpus import read_heldout
    from g3n_export.training.evaluate import heldout_windows
    from g3n_export.validate import load_reference_model

    torch.set_grad_enabled(False)
    source = open_checkpoint(BUNDLED_MODEL)
    source = SlicedCheckpoint(source, load_size_recipe(args.size).plan(source.text_config))
    texts = read_heldout((BUNDLED_MODEL / "heldout.json").read_text())
    windows = [torch.tensor([w]) for w in heldout_windows(load_sentencepiece(BUNDLED_MODEL), texts, 128)[:args.windows]]
    reference = load_reference_model(source)
    expected = torch.cat([reference_logits(reference, w) for w in windows], dim=1)

    base = load_target_recipe("android").executorch
    for group in args.groups:
        spec = dataclasses.replace(base, group_size=group, logits="all")
        model, schemes = build_decoder(source, spec, 128)
        actual = torch.cat([model(w, torch.tensor([0])) for w in windows], dim=1)
        metrics = compare_logits(expected, actual)
        fallback = schemes.get("linears_fallback", "none").split(":")[0]
        print(f"group {group}: top-1 {metrics.top1:.4f}, mean KL {metrics.mean_kl:.4f} over {metrics.positions} "
              f"positions; fallback: {fallback}", flush=True)


if __name__ == "__main__":
    main()
