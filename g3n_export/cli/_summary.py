"""The one-screen summary printed at the end of an export."""

from __future__ import annotations

from rich.table import Table

from g3n_export.cli._common import console, human_bytes


def print_export_summary(result) -> None:
    manifest = result.manifest
    files = Table(title=f"Export folder {result.out}", show_edge=False)
    files.add_column("file")
    files.add_column("size", justify="right")
    total = 0
    for rel, entry in manifest["files"].items():
        files.add_row(rel, human_bytes(entry["bytes"]))
        total += entry["bytes"]
    files.add_row("[bold]total[/]", f"[bold]{human_bytes(total)}[/]")
    console.print(files)

    stages = ", ".join(f"{s.name} {s.seconds:.1f} s" for s in result.stages)
    peak = max((s.peak_rss for s in result.stages), default=0)
    console.print(f"stages: {stages}; peak memory {human_bytes(peak)}", highlight=False)
    ort_skipped = manifest.get("artifacts", {}).get("onnx", {}).get("ort_skipped")
    if ort_skipped:
        console.print(f"[bold yellow]ORT format not written:[/] {ort_skipped}", highlight=False)

    parity = manifest.get("parity")
    if parity is None:
        console.print("parity: not validated (--skip-validation); run `g3n-export validate "
                      f"{result.out}` to check it", highlight=False)
        return
    verdicts = Table(title="Parity against the float32 reference", show_edge=False)
    # Artifact names wrap instead of being cut, because on an 80-column terminal the ellipsis made `onnx/onn…` and
    # `ort/onnx…` look alike.
    verdicts.add_column("artifact / runtime", overflow="fold")
    for col in ("precision", "max |Δlogit|", "max mean KL", "min top-1", "min greedy match", "verdict"):
        verdicts.add_column(col, justify="left" if col in ("precision", "verdict") else "right")
    for name, entry in parity["artifacts"].items():
        verdicts.add_row(
            name, str(entry["precision"]), f"{entry['max_abs_logit']:.3g}", f"{entry['max_mean_kl']:.3g}",
            f"{entry['min_top1']:.3f}", f"{entry['min_greedy_match']:.3f}",
            "[green]pass[/]" if entry["passed"] else "[bold red]FAIL[/]",
        )
    console.print(verdicts)
    console.print(f"report: {result.out / 'parity.md'}", highlight=False)
