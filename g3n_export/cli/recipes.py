"""`g3n-export recipes`: list the shipped size recipes with their sizes on a given model."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from g3n_export.cli._common import DEFAULT_MODEL, ModelOpt, console, err_console, setup_logging
from g3n_export.cli.main import Quiet, Verbose, app

EXAMPLES = """\
Examples:

  g3n-export recipes

  g3n-export recipes --model google/gemma-3n-E4B-it
"""


@app.command("recipes", epilog=EXAMPLES)
def recipes_command(model: ModelOpt = DEFAULT_MODEL, verbose: Verbose = False, quiet: Quiet = False) -> None:
    """List the size recipes, with the layers, FFN widths and effective parameters each gives on the model."""
    if quiet:
        setup_logging(-1)
    else:
        setup_logging(1 if verbose else 0)
    from g3n_export.config import TextConfig
    from g3n_export.errors import G3nError
    from g3n_export.matformer import check_source, effective_parameters
    from g3n_export.recipes import SIZES, list_size_recipes, recipe_dir

    source = TextConfig.from_hf_dict(_read_source_config(model))
    check_source(source)

    rows = []
    for recipe in list_size_recipes():
        try:
            plan = recipe.plan(source)
        except G3nError as e:
            err_console.print(f"[yellow]warning:[/] {e}", highlight=False, soft_wrap=True)
            continue
        rows.append((effective_parameters(plan.target), recipe, plan))
    rows.sort(key=lambda row: (row[0], row[1].name))

    widths = sorted(set(source.intermediate_size))
    table = Table(
        title=f"Size recipes for {model} ({source.num_hidden_layers} layers, FFN width "
              f"{'/'.join(str(w) for w in widths)}, {human_count(effective_parameters(source))} effective)",
        caption=f"Published: Google's numbers on the real E4B. Recipe files: {recipe_dir(SIZES)}; copy one and pass "
                "its path to --size.",
    )
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("layers")
    table.add_column("FFN widths")
    table.add_column("effective params", justify="right")
    table.add_column("published eff.", justify="right")
    table.add_column("MMLU PT", justify="right")
    for effective, recipe, plan in rows:
        published = recipe.published
        skipped = f" (skip {_ranges(plan.skipped)})" if plan.skipped else ""
        table.add_row(
            recipe.name,
            f"{len(plan.kept)}{skipped}",
            width_counts(plan.ffn_widths),
            human_count(effective),
            f"{published.effective_params_b:.2f}B" if published.effective_params_b is not None else "-",
            f"{published.mmlu_pt_percent:.1f}%" if published.mmlu_pt_percent is not None else "-",
        )
    console.print(table)


def _read_source_config(model: str) -> dict:
    """Read only the config.json of a local folder or a Hub repository; the weights are not needed here."""
    from g3n_export.errors import CheckpointError

    path = Path(model).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise CheckpointError(f"{path} has no config.json; pass a Hugging Face Gemma 3n checkpoint folder")
    elif path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint folder that contains config.json")
    else:
        config = _download_config(model)
    try:
        return json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config} is not valid JSON ({e})") from None


def _download_config(repo_id: str) -> Path:
    import re

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from g3n_export.errors import CheckpointError

    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo_id):
        raise CheckpointError(f"model folder {repo_id!r} not found; pass an existing folder or a Hub id like google/gemma-3n-E4B-it")
    try:
        return Path(hf_hub_download(repo_id, "config.json"))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"cannot download the config of {repo_id}: the Hugging Face Hub is not reachable and it is not in the "
            "local cache; pass a local folder with --model"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"cannot download the config of {repo_id} from the Hugging Face Hub: {e}") from None


def human_count(n: int) -> str:
    """Parameter count such as `1.905B`, `12.35M` or `381.9K`."""
    if n >= 1e9:
        return f"{n / 1e9:.3f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.1f}K"


def _ranges(indices: tuple[int, ...]) -> str:
    """Compact form such as `20-24` or `3, 7-9`."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def width_counts(widths: tuple[int, ...]) -> str:
    """Count of layers per width, widest first, such as `16384 x10, 8192 x25`."""
    counts: dict[int, int] = {}
    for w in widths:
        counts[w] = counts.get(w, 0) + 1
    return ", ".join(f"{w} x{counts[w]}" for w in sorted(counts, reverse=True))
