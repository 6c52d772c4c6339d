"""`g3n-export bench DIR`: load time, prefill and decode speed and resident memory of each artifact in an export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from g3n_export.cli._common import console, err_console, human_bytes
from g3n_export.cli.main import app


def _mib(value: int | None) -> str:
    return "-" if value is None else human_bytes(value)


def speed_table(report: dict[str, Any]) -> Table:
    """Build the speed table of a `run_benchmarks` report: one row per artifact."""
    settings = report["settings"]
    machine = report["machine"]
    table = Table(
        title=f"speed: prompt {settings['prompt_len']} + decode {settings['gen_len']} tokens, "
              f"threads {settings['threads'] or 'default'}, {machine['cpu']} ({machine['cores']} cores)",
    )
    table.add_column("artifact", overflow="fold")
    for column in ("load s", "prefill tok/s", "decode tok/s", "bound tok/s", "load avg"):
        table.add_column(column, justify="right")
    for record in report["results"]:
        bound = record.get("roofline", {}).get("decode_tokens_per_s_bound")
        table.add_row(
            record["artifact"],
            f"{record['load_s']:.2f}",
            f"{record['prefill_tokens_per_s']:.1f}",
            f"{record['decode_tokens_per_s']:.1f}",
            "-" if bound is None else f"{bound:.0f}",
            " -> ".join(f"{value:.2f}" for value in record["load_average_1min"]),
        )
    return table


def memory_table(report: dict[str, Any]) -> Table:
    """Build the resident memory table of a `run_benchmarks` report: one row per artifact."""
    table = Table(title="resident memory (RSS)")
    table.add_column("artifact", overflow="fold")
    for column in ("baseline", "peak", "steady", "anon", "file"):
        table.add_column(column, justify="right")
    table.add_column("mapped files (resident)", overflow="fold")
    for record in report["results"]:
        rss = record["rss"]
        mapped = ", ".join(f"{name} {_mib(size)}" for name, size in record["file_mapping_rss"].items())
        table.add_row(
            record["artifact"], _mib(rss["baseline"]), _mib(rss["peak"]), _mib(rss["steady"]),
            _mib(rss["steady_anon"]), _mib(rss["steady_file"]), mapped,
        )
    return table


@app.command("bench")
def bench_command(
    folder: Annotated[Path, typer.Argument(help="Export folder written by g3n-export.")],
    runtime: Annotated[str | None, typer.Option(
        "--runtime", "-r", help="Measure only this runtime's artifacts: executorch or onnxruntime (.onnx and .ort). "
        "Default: every artifact in the folder.")] = None,
    prompt_len: Annotated[int, typer.Option("--prompt-len", help="Prompt length in tokens (random ids).")] = 64,
    gen_len: Annotated[int, typer.Option("--gen-len", help="Decode steps (tokens) to time.")] = 64,
    threads: Annotated[int | None, typer.Option(
        "--threads", help="Threads per runtime. Default: the runtime's own default (one per core).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random prompt and decode ids.")] = 0,
    json_path: Annotated[Path | None, typer.Option(
        "--json", help="Also write the full report to this JSON file.")] = None,
    et_runner: Annotated[Path | None, typer.Option(
        "--et-runner", help="C++ runner binary (benchmarks/build_et_runner.sh builds it); adds the ExecuTorch program "
        "run through the C++ Module with the .ptd memory-mapped.")] = None,
    no_bandwidth: Annotated[bool, typer.Option(
        "--no-bandwidth", help="Skip the memory bandwidth measurement and the decode roofline.")] = False,
) -> None:
    """Measure load time, prefill and decode speed and resident memory (RSS) of each artifact in an export folder.

    Each artifact runs in a fresh Python worker process, so its memory numbers exclude the imports of the command
    itself. The baseline column is the worker's RSS after importing the runtime, before loading the model.
    """
    from g3n_export.bench import BenchSettings, run_benchmarks

    report = run_benchmarks(
        folder,
        BenchSettings(prompt_len=prompt_len, gen_len=gen_len, threads=threads, seed=seed),
        runtime=runtime,
        et_runner=et_runner,
        bandwidth=not no_bandwidth,
        progress=lambda artifact: err_console.print(f"measuring {artifact} ...", highlight=False),
    )
    console.print(speed_table(report))
    console.print(memory_table(report))
    if "read_bandwidth_bytes_per_s" in report:
        console.print(
            f"read bandwidth {report['read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; 'bound tok/s' = bandwidth / "
            "estimated weight bytes read per decode step",
            highlight=False,
        )
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        err_console.print(f"wrote {json_path}", highlight=False)
