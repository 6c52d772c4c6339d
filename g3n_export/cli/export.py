"""The main job: `g3n-export [--model M] --size S --target T ...`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from g3n_export.cli._common import DEFAULT_MODEL, ModelOpt, setup_logging
from g3n_export.cli.main import Quiet, Verbose, app
from g3n_export.errors import G3nError


@app.callback(invoke_without_command=True)
def export(
    ctx: typer.Context,
    model: ModelOpt = DEFAULT_MODEL,
    size: Annotated[Optional[str], typer.Option("--size", "-s", help="Size recipe: a name from `g3n-export recipes` (e2b, e4b, ...) or a TOML file.")] = None,
    target: Annotated[Optional[str], typer.Option("--target", "-t", help="Target recipe: android, ios, desktop, or a TOML file.")] = None,
    quant: Annotated[Optional[str], typer.Option("--quant", help="Override the target's quantization: fp32, int8 or int4.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder. Default: exports/<model>-<size>-<target>.")] = None,
    max_seq_len: Annotated[Optional[int], typer.Option("--max-seq-len", help="Static maximum sequence length in tokens (prompt + generated).")] = None,
    formats: Annotated[Optional[str], typer.Option("--formats", help="Comma-separated subset of the target's formats: pte, onnx, ort.")] = None,
    skip_validation: Annotated[bool, typer.Option("--skip-validation", help="Do not run the parity checks.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Export a Gemma 3n submodel for a device target, then validate it against the float reference."""
    verbosity = 0
    if quiet:
        verbosity = -1
    elif verbose:
        verbosity = 1
    setup_logging(verbosity)
    if ctx.invoked_subcommand is not None:
        return
    if size is None or target is None:
        if size is None and target is None and quant is None and out is None:
            typer.echo(ctx.get_help())
            raise typer.Exit(0)
        missing = " and ".join(f"--{n}" for n, v in (("size", size), ("target", target)) if v is None)
        raise G3nError(f"missing {missing}; for example: g3n-export --size e2b --target android")

    from g3n_export.cli._summary import print_export_summary
    from g3n_export.pipeline import ExportRequest, run_export

    request = ExportRequest(
        model=model, size=size, target=target, quant=quant, out=out, max_seq_len=max_seq_len,
        formats=formats, skip_validation=skip_validation, force=force, quiet=quiet,
    )
    result = run_export(request)
    print_export_summary(result)
    if result.passed is False:
        raise G3nError(
            "validation failed: " + "; ".join(result.report_failures[:5])
            + f" (full report: {result.out / 'parity.md'})"
        )
