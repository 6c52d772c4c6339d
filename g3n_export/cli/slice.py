"""`g3n-export slice`: cut a MatFormer Mix-n-Match submodel out of a full checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from g3n_export.cli._common import DEFAULT_MODEL, ModelOpt, console, err_console, human_bytes, setup_logging
from g3n_export.cli.main import Quiet, Verbose, app
from g3n_export.cli.recipes import human_count, width_counts

EXAMPLES = """\
Examples:

  g3n-export slice --size e2b --out e2b-model

  g3n-export slice --model google/gemma-3n-E4B-it --size e2.69b-layer --out e2.69b --text-only

  g3n-export slice --size ./my-size.toml --out my-model --drop-unused-kv
"""


@app.command("slice", epilog=EXAMPLES)
def slice_command(
    size: Annotated[str, typer.Option("--size", "-s", help="Size recipe: a name from `g3n-export recipes` (e2b, e2.69b-layer, ...) or a TOML file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the sliced checkpoint.")],
    model: ModelOpt = DEFAULT_MODEL,
    text_only: Annotated[bool, typer.Option("--text-only", help="Leave out the vision and audio towers and write a text-only gemma3n_text config.")] = False,
    drop_unused_kv: Annotated[bool, typer.Option("--drop-unused-kv", help="Leave out k_proj, v_proj and k_norm of KV-shared layers, which transformers 5 and g3n-export never read.")] = False,
    max_shard_gib: Annotated[float, typer.Option("--max-shard-gib", min=0.001, help="Size limit of one safetensors shard, in GiB.")] = 4.0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Slice a Gemma 3n checkpoint to a smaller MatFormer submodel and write it as a Hugging Face checkpoint."""
    if quiet:
        setup_logging(-1)
    else:
        setup_logging(1 if verbose else 0)
    from g3n_export.checkpoint import open_checkpoint
    from g3n_export.matformer import effective_parameters
    from g3n_export.recipes import load_size_recipe
    from g3n_export.slicer import check_slice, slice_checkpoint

    # Every check runs before anything is printed or written: recipe, source, plan, tensors, output folder.
    recipe = load_size_recipe(size)
    source = open_checkpoint(model)
    plan = recipe.plan(source.text_config, drop_unused_kv=drop_unused_kv)
    total = sum(item.spec.nbytes for item in check_slice(source, plan, out, text_only=text_only, force=force))

    src = source.text_config
    options = [text for text, on in (("text only", text_only), ("unused k/v dropped", drop_unused_kv)) if on]
    skipped = str(list(plan.skipped)) if plan.skipped else "no layers"
    if not quiet:
        err_console.print(
            f"slicing {source.path} ({src.num_hidden_layers} layers, {human_count(effective_parameters(src))} "
            f"effective) with recipe {recipe.name!r}: skip {skipped}, FFN widths {width_counts(plan.ffn_widths)}"
            + "".join(f", {o}" for o in options),
            highlight=False,
        )

    with Progress(
        TextColumn("writing"), BarColumn(), DownloadColumn(binary_units=True), TransferSpeedColumn(),
        TimeRemainingColumn(), console=err_console, disable=quiet or not err_console.is_terminal, transient=True,
    ) as bar:
        task = bar.add_task("slice", total=total)

        def advance(n: int) -> None:
            bar.update(task, advance=n)

        result = slice_checkpoint(
            source, plan, out, text_only=text_only, force=force, recipe_name=recipe.name,
            max_shard_bytes=int(max_shard_gib * 1024**3), progress=advance,
        )

    console.print(
        f"wrote {result.out} ({len(plan.kept)} layers, {human_count(result.effective_parameters)} effective, "
        f"{result.tensors} tensors, {human_bytes(result.nbytes)}) in {result.seconds:.1f} s; "
        f"peak RSS {human_bytes(result.peak_rss_bytes)}",
        highlight=False,
    )

