"""`g3n-export inspect PATH`: layer plan, parameter counts by group, bytes on disk."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from g3n_export.checkpoint import open_checkpoint
from g3n_export.cli._common import DEFAULT_MODEL, console, human_bytes
from g3n_export.cli.main import app
from g3n_export.summary import OTHER_GROUPS, TEXT_GROUPS, summarize


@app.command("inspect")
def inspect_command(
    path: Annotated[str, typer.Argument(help="Checkpoint folder or Hub id. Defaults to the bundled model.")] = DEFAULT_MODEL,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Show a checkpoint's layer plan, parameter counts by group and size on disk."""
    ckpt = open_checkpoint(path)
    s = summarize(ckpt)
    c = s.config
    if as_json:
        console.print_json(json.dumps({
            "path": str(ckpt.path),
            "layers": [vars(row) for row in s.layers],
            "text_params": s.text_params, "other_params": s.other_params,
            "text_total": s.text_total, "effective": s.effective, "total": s.total,
            "bytes_on_disk": s.bytes_on_disk, "dtypes": s.dtypes,
            "altup_num_inputs": c.altup_num_inputs, "altup_active_idx": c.altup_active_idx,
            "laurel_rank": c.laurel_rank,
        }))
        return

    console.print(f"[bold]{ckpt.path}[/]  ({'multimodal' if ckpt.is_multimodal else 'text-only'}, "
                  f"text prefix '{ckpt.text_prefix}')", highlight=False)
    console.print(
        f"hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads} heads / "
        f"{c.num_key_value_heads} KV heads x {c.head_dim}, vocab {c.vocab_size:,} (PLE {c.vocab_size_per_layer_input:,} "
        f"x {c.num_hidden_layers} x {c.hidden_size_per_layer_input}), sliding window {c.sliding_window}, "
        f"{len(c.kv_layers)} KV-owning layers, {c.num_kv_shared_layers} KV-shared, AltUp {c.altup_num_inputs} streams "
        f"(active {c.altup_active_idx}), LAuReL rank {c.laurel_rank}",
        highlight=False,
    )

    plan = Table(title="Layer plan", show_edge=False)
    for col in ("layer", "attention", "KV cache", "FFN width", "sparsity"):
        plan.add_column(col, justify="right" if col in ("layer", "FFN width", "sparsity") else "left")
    for row in s.layers:
        plan.add_row(str(row.index), row.layer_type, row.kv, f"{row.ffn_width:,}",
                     f"{row.sparsity:.2f}" if row.sparsity else "-")
    console.print(plan)

    params = Table(title="Parameters by group", show_edge=False)
    params.add_column("group")
    params.add_column("parameters", justify="right")
    for group in TEXT_GROUPS:
        params.add_row(f"text: {group}", f"{s.text_params.get(group, 0):,}")
    params.add_row("[bold]text total[/]", f"[bold]{s.text_total:,}[/]")
    params.add_row("effective (text without embed_tokens and PLE table)", f"{s.effective:,}")
    for group in OTHER_GROUPS:
        if s.other_params.get(group):
            params.add_row(group, f"{s.other_params[group]:,}")
    params.add_row("[bold]total[/]", f"[bold]{s.total:,}[/]")
    console.print(params)
    dtypes = ", ".join(f"{k} {v:,}" for k, v in s.dtypes.items())
    console.print(f"bytes on disk: {s.bytes_on_disk:,} ({human_bytes(s.bytes_on_disk)}); dtypes: {dtypes}",
                  highlight=False)
