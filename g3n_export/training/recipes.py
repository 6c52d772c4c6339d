"""Google's Gemma 3n slicing table, scaled to any source FFN width.

Google publishes 16 Mix-n-Match configurations for E4B (the `google/gemma3n-slicing-configs` dataset, `configs.csv`).
Every FFN width in it is either 8 x 2048 = 16384 (E4B's full width) or 4 x 2048 = 8192 (half), and the only skipped
layers are 20-24. The table is stored here as one digit per kept layer (8 = full, 4 = half), so a row scales to a
model of another width: full width x digit / 8.
"""

from __future__ import annotations

from dataclasses import dataclass

from g3n_export.config import TextConfig
from g3n_export.matformer import SlicePlan, make_plan

E2B_SKIP = (20, 21, 22, 23, 24)
FULL_NAME = "Main model"
E2B_NAME = "Config for official E2B Model"

# (name as in configs.csv, layers skipped, FFN width per kept layer in units of full width / 8)
SLICING_TABLE: tuple[tuple[str, tuple[int, ...], str], ...] = (
    (FULL_NAME, (), "88888888888888888888888888888888888"),
    (E2B_NAME, E2B_SKIP, "444444444444444444444444444444"),
    ("Config for E1.96B (layer-level)", E2B_SKIP, "444484444444444444444444444444"),
    ("Config for E2.54B (layer-level)", (), "44448444444444444444888884444444444"),
    ("Config for E2.69B (layer-level)", (), "44448444484444844448888884444444444"),
    ("Config for E2.98B (layer-level)", (), "44444444444444488888888884444488888"),
    ("Config for E3.18B (layer-level)", (), "44448444488888888888888884444844448"),
    ("Config for E3.39B (layer-level)", (), "44448444488888888888888888888844448"),
    ("Config for E3.59B (layer-level)", (), "44448888888888888888888888888844448"),
    ("Config for E3.79B (layer-level)", (), "44448888888888888888888888888888888"),
    ("Config for E2.49B (block-level)", (), "44444444444444444444888884444444444"),
    ("Config for E2.73B (block-level)", (), "44444444444444488888888884444444444"),
    ("Config for E2.98B (block-level)", (), "44444444448888888888888884444444444"),
    ("Config for E3.24B (block-level)", (), "44444444448888888888888888888844444"),
    ("Config for E3.49B (block-level)", (), "44444888888888888888888888888844444"),
    ("Config for E3.79B (block-level)", (), "44444888888888888888888888888888888"),
)


@dataclass(frozen=True)
class Recipe:
    """One row of the slicing table, scaled to a source model."""

    name: str
    layers_to_skip: tuple[int, ...]
    ffn_widths: tuple[int, ...]

    def plan(self, source: TextConfig) -> SlicePlan:
        return make_plan(source, self.layers_to_skip, self.ffn_widths)


def scaled_recipes(source: TextConfig) -> dict[str, Recipe]:
    """Return every row of the table, keyed by its name, with widths scaled to `source`'s per-layer FFN widths.

    Raises:
        ValueError: `source` has a layer count other than E4B's 35, or a width that is not divisible by 8.
    """
    if source.num_hidden_layers != 35:
        raise ValueError(f"the slicing table is for 35-layer models, got {source.num_hidden_layers} layers")
    recipes = {}
    for name, skip, digits in SLICING_TABLE:
        kept = [i for i in range(35) if i not in skip]
        widths = []
        for layer, digit in zip(kept, digits):
            full = source.intermediate_size[layer]
            if full % 8:
                raise ValueError(f"FFN width {full} of layer {layer} is not divisible by 8, so the table cannot scale")
            widths.append(full * int(digit) // 8)
        recipes[name] = Recipe(name, skip, tuple(widths))
    return recipes
