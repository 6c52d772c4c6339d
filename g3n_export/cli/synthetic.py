"""`g3n-export make-synthetic`: random-weight checkpoints in Google's exact layout."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

from g3n_export.cli._common import console, err_console, human_bytes
from g3n_export.cli.main import app
from g3n_export.memory import peak_rss_bytes
from g3n_export.synthetic import PRESETS, make_synthetic, total_bytes


@app.command("make-synthetic")
def make_synthetic_command(
    preset: Annotated[str, typer.Option("--preset", "-p", help=f"Dimensions: {', '.join(PRESETS)} (e2b/e4b: real dimensions, bf16).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (must not exist unless --force).")],
    seed: Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives identical files.")] = 0,
    text_only: Annotated[bool, typer.Option("--text-only", help="Leave out the vision and audio towers.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
) -> None:
    """Write a random-weight Gemma 3n checkpoint (config, sharded safetensors, tokenizer)."""
    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}", param_hint="--preset")
    size = total_bytes(preset, text_only=text_only)
    started = time.perf_counter()
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task(f"writing {preset}", total=size)
        make_synthetic(preset, out, seed=seed, text_only=text_only, force=force,
                       progress=lambda n: bar.advance(task, n))
    console.print(
        f"wrote {out} ({human_bytes(size)} of weights) in {time.perf_counter() - started:.1f} s, "
        f"peak memory {human_bytes(peak_rss_bytes())}",
        highlight=False,
    )
