"""Resident memory of a memory-mapped PLE table versus one inside the program, on a model with a real-size PLE table.

The bundled model's PLE table is 1.5 MB, too small to tell "rows touched" from "whole file". This script builds a
random-weight Gemma 3n text decoder with 4 narrow layers but Gemma 3n's real PLE vocabulary (262,144 rows) and
per-layer width (256). It exports the decoder with the android recipe's ExecuTorch quantization (`model.pte` +
`ple.ptd`), and a second time with the PLE table inside `model.pte`. Both run through `benchmarks/et_runner`
(ExecuTorch's C++ `Module`) in `Mmap` and `File` load modes; the `.ptd` variant also with a cold page cache, with
`MADV_RANDOM`, and through ExecuTorch's Python bindings. Only 4 layers keep the XNNPACK lowering to minutes on a
2-core machine.

    python benchmarks/ple_mmap.py --work /tmp/ple-scale --runner benchmarks/et_runner/build/et_runner

Writes `ple_mmap.json` into the work folder and prints Markdown tables. Reuses the checkpoint and programs found in
the work folder, so a second run only re-measures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from g3n_export.bench import BenchSettings, run_worker

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import tiny_text_config, write_tiny_checkpoint  # noqa: E402

PLE_ROWS = 262_144  # Gemma 3n's vocab_size_per_layer_input
PLE_WIDTH_PER_LAYER = 256  # Gemma 3n's hidden_size_per_layer_input


def make_checkpoint(path: Path) -> None:
    if (path / "config.json").is_file():
        return
    config = tiny_text_config(4, num_kv_shared_layers=2, layer_types=["sliding_attention", "full_attention"] * 2,
                              sparsity=[0.95, 0.0, 0.0, 0.0])
    config.update(vocab_size=PLE_ROWS + 256, vocab_size_per_layer_input=PLE_ROWS,
                  hidden_size_per_layer_input=PLE_WIDTH_PER_LAYER)
    write_tiny_checkpoint(path, config, seed=0)


def export_program_files(checkpoint: Path, out: Path, max_seq_len: int, *, inline: bool, logits: str = "last",
                         prefill_chunk: int | None = None) -> None:
    """Export `model.pte` (+ `ple.ptd` unless `inline`) with the android recipe's ExecuTorch quantization."""
    if (out / "model.pte").is_file():
        return
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    from g3n_export.checkpoint import open_checkpoint
    from g3n_export.targets.executorch import (
        build_decoder,
        call_length,
        export_executorch,
        export_program,
        runner_metadata,
    )
    from g3n_export.targets.recipe import load_target_recipe
    from g3n_export.targets.xnnpack_partition import xnnpack_partitioners

    source = open_checkpoint(str(checkpoint))
    spec = load_target_recipe("android").executorch
    spec = dataclasses.replace(spec, logits=logits, prefill_chunk=prefill_chunk or spec.prefill_chunk)
    call_len = call_length(spec, max_seq_len)
    config = source.text_config
    eos_ids = list(config.eos_token_ids)
    out.mkdir(parents=True, exist_ok=True)
    if not inline:
        export_executorch(source, out, spec, max_seq_len, bos_id=config.bos_token_id, eos_ids=eos_ids)
        # The Python-bindings worker of `g3n_export.bench` reads the PLE vocabulary from a manifest.
        (out.parent / "manifest.json").write_text(json.dumps({"model": {"vocab_size_per_layer_input": PLE_ROWS}}))
        return
    model, _ = build_decoder(source, spec, max_seq_len)
    edge = to_edge_transform_and_lower(
        export_program(model, call_len),
        partitioner=xnnpack_partitioners(),
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
        constant_methods=runner_metadata(config, max_seq_len, call_len, bos_id=config.bos_token_id, eos_ids=eos_ids),
    )
    # The same lowering as `export_executorch`, without `external_constants`: every constant stays in the program.
    program = edge.to_executorch(ExecutorchBackendConfig(
        extract_delegate_segments=True, memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False)))
    with (out / "model.pte").open("wb") as f:
        program.write_to_file(f)


def run_et_runner(runner: Path, pte: Path, ptd: Path | None, mode: str, advice: str, drop_cache: bool, vocab: int,
                  args) -> dict:
    command = [str(runner), "--pte", str(pte), "--load-mode", mode, "--prompt-len", str(args.prompt_len),
               "--gen-len", str(args.gen_len), "--threads", str(args.threads), "--vocab", str(vocab),
               "--sample-every", str(args.sample_every), "--advice", advice, "--drop-cache", str(int(drop_cache))]
    if ptd is not None:
        command += ["--ptd", str(ptd)]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(completed.stdout)


def mib(value: float) -> str:
    return f"{value / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/ple-scale"))
    parser.add_argument("--runner", type=Path, default=Path(__file__).parent / "et_runner/build/et_runner")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=448)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sample-every", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--logits", choices=("last", "all"), default="last",
                        help="positions whose logits forward returns (the recipe field executorch.logits)")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="maximum tokens per call (the recipe field executorch.prefill_chunk; default: the android "
                             "recipe's)")
    args = parser.parse_args()

    checkpoint, android, inline = args.work / "checkpoint", args.work / "android", args.work / "inline"
    make_checkpoint(checkpoint)
    for out, inline_table in ((android / "executorch", False), (inline, True)):
        export_program_files(checkpoint, out, args.max_seq_len, inline=inline_table, logits=args.logits,
                             prefill_chunk=args.prefill_chunk)
    inline_pte = inline / "model.pte"

    vocab = PLE_ROWS
    pte, ptd = android / "executorch" / "model.pte", android / "executorch" / "ple.ptd"
    runs = {}
    # "cold": the .ptd is evicted from the page cache first, as after a reboot. "random": MADV_RANDOM on its mapping,
    # which turns off the kernel's read-around so that a fault brings in only its own page.
    for name, (program, data, mode, advice, cold) in {
        "ptd, C++ Mmap, warm cache": (pte, ptd, "mmap", "none", False),
        "ptd, C++ Mmap, cold cache": (pte, ptd, "mmap", "none", True),
        "ptd, C++ Mmap, cold cache, MADV_RANDOM": (pte, ptd, "mmap", "random", True),
        "ptd, C++ File": (pte, ptd, "file", "none", False),
        "inline, C++ Mmap": (inline_pte, None, "mmap", "none", False),
        "inline, C++ File": (inline_pte, None, "file", "none", False),
    }.items():
        runs[name] = run_et_runner(args.runner, program, data, mode, advice, cold, vocab, args)
        runs[name]["load_average_1min"] = os.getloadavg()[0]
    python = run_worker("executorch", android, BenchSettings(args.prompt_len, args.gen_len, args.threads))
    python["load_average_1min"] = os.getloadavg()[0]

    report = {
        "files": {"model.pte": pte.stat().st_size, "ple.ptd": ptd.stat().st_size,
                  "inline model.pte": inline_pte.stat().st_size},
        "et_runner": runs,
        "python_bindings": python,
    }
    (args.work / "ple_mmap.json").write_text(json.dumps(report, indent=2) + "\n")

    print(f"files: model.pte {mib(report['files']['model.pte'])} MiB, ple.ptd {mib(report['files']['ple.ptd'])} MiB,"
          f" inline model.pte {mib(report['files']['inline model.pte'])} MiB")
    print("| variant | after load VmRSS | steady VmRSS | RssAnon | RssFile | ple.ptd resident | model.pte resident |"
          " decode tok/s | load avg |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        print(f"| {name} | {mib(run['after_load']['vm_rss'])} | {mib(run['steady']['vm_rss'])} | "
              f"{mib(run['steady']['rss_anon'])} | {mib(run['steady']['rss_file'])} | {mib(run['ptd_rss_steady'])} | "
              f"{mib(run['pte_rss_steady'])} | {args.gen_len / run['decode_s']:.0f} | {run['load_average_1min']:.2f} |")
    rss = python["rss"]
    print(f"| ptd, Python bindings | {mib(rss['after_load'])} | {mib(rss['steady'])} | {mib(rss['steady_anon'])} | "
          f"{mib(rss['steady_file'])} | {mib(python['file_mapping_rss']['ple.ptd'])} | "
          f"{mib(python['file_mapping_rss']['model.pte'])} | {python['decode_tokens_per_s']:.0f} | "
          f"{python['load_average_1min']:.2f} |")
    for name in ("ptd, C++ Mmap, warm cache", "ptd, C++ Mmap, cold cache", "ptd, C++ Mmap, cold cache, MADV_RANDOM"):
        print(f"\nple.ptd resident while decoding ({name}):")
        print("| tokens decoded | distinct ids seen | ple.ptd resident MiB | VmRSS MiB |")
        print("|---|---|---|---|")
        for sample in runs[name]["samples"]:
            print(f"| {sample['decoded']} | {sample['distinct_ids']} | {mib(sample['ptd_rss'])} | "
                  f"{mib(sample['vm_rss'])} |")


if __name__ == "__main__":
    main()
