"""`g3n-export validate DIR`: re-run the parity checks of an export folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from g3n_export.cli._common import console
from g3n_export.cli.main import app
from g3n_export.errors import G3nError
from g3n_export.manifest import read_manifest, write_manifest


@app.command("validate")
def validate_command(
    folder: Annotated[Path, typer.Argument(help="Export folder written by g3n-export.")],
) -> None:
    """Check every artifact of an export folder against the float reference named in its manifest."""
    from g3n_export.validate_folder import validate_export

    manifest = read_manifest(folder)

    def show(case) -> None:
        verdict = "[green]pass[/]" if case.passed else "[bold red]FAIL[/] " + "; ".join(case.failures)
        console.print(f"{case.artifact:10} {case.runtime:24} {case.prompt:9} {case.mode:15} {verdict}")

    report = validate_export(folder, manifest=manifest, on_case=show)
    report.write(folder)
    manifest["parity"] = report.summary()
    write_manifest(folder, manifest)
    console.print(f"report: {folder / 'parity.md'}", highlight=False)
    if not report.passed:
        raise G3nError("validation failed: " + "; ".join(report.failures()[:5]))
