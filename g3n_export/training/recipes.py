"""The rows of Google's Gemma 3n slicing table that training uses, read from the shipped size recipes.

Google publishes 16 Mix-n-Match configurations for E4B (the `google/gemma3n-slicing-configs` dataset, `configs.csv`).
Each one is a shipped size recipe under `recipes/sizes/`, whose `published.csv_row` names its row in that table. The
recipes store FFN widths as fractions of the source's widths (0.5 or 1.0), so they scale to the bundled model's
widths as they do to E4B's.
"""

from __future__ import annotations

from dataclasses import dataclass

from g3n_export.config import TextConfig
from g3n_export.matformer import SlicePlan, make_plan
from g3n_export.recipes import list_size_recipes

FULL_NAME = "Main model"
E2B_NAME = "Config for official E2B Model"
TABLE_ROW_COUNT = 16


@dataclass(frozen=True)
class Recipe:
    """One row of the slicing table, scaled to a source model."""

    name: str
    layers_to_skip: tuple[int, ...]
    ffn_widths: tuple[int, ...]

    def plan(self, source: TextConfig) -> SlicePlan:
        return make_plan(source, self.layers_to_skip, self.ffn_widths)


def scaled_recipes(source: TextConfig) -> dict[str, Recipe]:
    """Return every row of the table, keyed by its `configs.csv` name, with widths scaled to `source`.

    Raises:
        RecipeError: a shipped recipe does not fit `source` (for example, a layer count other than E4B's 35).
        RuntimeError: the shipped recipes do not cover the 16 rows of the table once each.
    """
    recipes: dict[str, Recipe] = {}
    for size in list_size_recipes():
        row = size.published.csv_row
        if row is None:
            continue
        if row in recipes:
            raise RuntimeError(f"two shipped size recipes name the table row {row!r}; keep one of them")
        recipes[row] = Recipe(row, size.layers_to_skip, tuple(size.ffn_widths(source)))
    if len(recipes) != TABLE_ROW_COUNT or FULL_NAME not in recipes or E2B_NAME not in recipes:
        raise RuntimeError(
            f"the shipped size recipes cover {len(recipes)} rows of the slicing table, expected all {TABLE_ROW_COUNT} "
            f"including {FULL_NAME!r} and {E2B_NAME!r}; reinstall g3n-export"
        )
    return recipes
