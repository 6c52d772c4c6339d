"""Recipes: TOML files that name a configuration, shipped under `recipes/` or written by users.

Size recipes (`recipes/sizes/*.toml`) choose a MatFormer Mix-n-Match submodel: which decoder layers to skip and the
FFN width of each kept layer. Widths are stored as fractions of the source's widths, so one recipe applies both to
Google's E4B and to the small bundled model. `SizeRecipe.plan` turns a recipe into a validated `SlicePlan`.

A recipe is given either by name (the file stem of a shipped recipe, such as `e2b`) or by the path of a TOML file.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from g3n_export.config import TextConfig
from g3n_export.errors import RecipeError
from g3n_export.matformer import SlicePlan, make_plan

# Shipped recipes live in `recipes/` at the repository root, next to the package, which serves a source checkout and
# an editable install. A wheel must carry them inside the package as `g3n_export/data/recipes/`, searched first.
_PACKAGE_DIR = Path(__file__).resolve().parent
_RECIPE_ROOTS = (_PACKAGE_DIR / "data" / "recipes", _PACKAGE_DIR.parent / "recipes")


# Shared helpers for every kind of recipe ---------------------------------------------------------------------------

def recipe_dir(kind: str) -> Path:
    """Return the folder of the shipped recipes of one kind (`sizes`, ...).

    Raises:
        RecipeError: no shipped recipe folder was found, so the installation is incomplete.
    """
    for root in _RECIPE_ROOTS:
        if (root / kind).is_dir():
            return root / kind
    searched = ", ".join(str(root / kind) for root in _RECIPE_ROOTS)
    raise RecipeError(f"the shipped {kind} recipes were not found (searched {searched}); reinstall g3n-export")


def shipped_recipe_names(kind: str) -> list[str]:
    """Names of the shipped recipes of one kind, sorted."""
    return sorted(p.stem for p in recipe_dir(kind).glob("*.toml"))


def resolve_recipe_path(kind: str, name_or_path: str | Path) -> Path:
    """Return the TOML file for a recipe given by shipped name or by path.

    A value is a path when it ends in `.toml`, contains a path separator or names an existing file.

    Raises:
        RecipeError: the file does not exist, or no shipped recipe has that name.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if text.endswith(".toml") or "/" in text or "\\" in text or path.is_file():
        if not path.is_file():
            raise RecipeError(f"{kind[:-1]} recipe file {text!r} not found; pass an existing .toml file or a recipe name")
        return path

    names = shipped_recipe_names(kind)
    if text not in names:
        hint = did_you_mean(text, names)
        raise RecipeError(
            f"unknown {kind[:-1]} recipe {text!r}; {hint + ' ' if hint else ''}choose one of {', '.join(names)}, "
            "or pass a .toml file"
        )
    return recipe_dir(kind) / f"{text}.toml"


def read_recipe_toml(path: Path) -> dict[str, Any]:
    """Parse a recipe file.

    Raises:
        RecipeError: the file cannot be read or is not valid TOML.
    """
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path} is not valid TOML: {e}") from None
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path}: {e.strerror}") from None


def did_you_mean(value: str, options: list[str] | tuple[str, ...]) -> str:
    """Return a hint such as "did you mean 'e2.98b-block' or 'e2.98b-layer'?", or "" when nothing is close."""
    close = [o for o in options if o.startswith(value)] or difflib.get_close_matches(value, options, n=1)
    if not close:
        return ""
    return "did you mean " + " or ".join(repr(o) for o in close[:3]) + "?"


def _unknown_keys(data: dict[str, Any], allowed: tuple[str, ...], prefix: str) -> list[str]:
    errors = []
    for key in data:
        if key not in allowed:
            hint = did_you_mean(key, allowed) or f"allowed keys are {', '.join(allowed)}"
            errors.append(f"unknown key {prefix + key!r}; {hint}")
    return errors


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Size recipes ------------------------------------------------------------------------------------------------------

SIZES = "sizes"
_SIZE_KEYS = ("name", "description", "layers_to_skip", "ffn_fraction", "ffn_width", "published")
_PUBLISHED_KEYS = ("csv_row", "effective_params_b", "mmlu_pt_percent", "note")


@dataclass(frozen=True)
class Published:
    """Google's published numbers for a size recipe, measured on the real E4B (documentation only)."""

    csv_row: str | None = None
    effective_params_b: float | None = None
    mmlu_pt_percent: float | None = None
    note: str | None = None


@dataclass(frozen=True)
class SizeRecipe:
    """A Mix-n-Match submodel choice: layers to skip and the FFN width of each kept layer.

    Exactly one of `ffn_fraction` and `ffn_width` is set. Each is either one value for every kept layer or a tuple
    with one value per kept layer, in order.
    """

    name: str
    description: str
    layers_to_skip: tuple[int, ...]
    ffn_fraction: float | tuple[float, ...] | None
    ffn_width: int | tuple[int, ...] | None
    published: Published
    path: Path | None = None

    def ffn_widths(self, source: TextConfig) -> list[int]:
        """Return the FFN width of each kept layer of `source`, in new layer order.

        A fraction f of a source layer of width w gives round(f * w), with halves rounded up. The product is taken
        on the decimal value written in the file, so 0.3 * 5 gives 2 (1.5 rounded up), never 1.

        Raises:
            RecipeError: a per-layer list does not have one entry per kept layer.
        """
        kept = [i for i in range(source.num_hidden_layers) if i not in set(self.layers_to_skip)]
        field = "ffn_fraction" if self.ffn_fraction is not None else "ffn_width"
        value = self.ffn_fraction if self.ffn_fraction is not None else self.ffn_width
        values = value if isinstance(value, tuple) else (value,) * len(kept)
        if len(values) != len(kept):
            raise RecipeError(
                f"{self._where()}{field} has {len(values)} entries, but the source keeps {len(kept)} layers "
                f"({source.num_hidden_layers} minus {len(self.layers_to_skip)} skipped); give one entry per kept "
                "layer, or a single number for all of them"
            )
        if self.ffn_width is not None:
            return list(values)
        return [fraction_to_width(f, source.intermediate_size[old]) for f, old in zip(values, kept)]

    def plan(self, source: TextConfig, *, drop_unused_kv: bool = False) -> SlicePlan:
        """Validate the recipe against `source` and return its slice plan. Nothing is read or written.

        Raises:
            RecipeError: naming the recipe and every problem found.
        """
        widths = self.ffn_widths(source)
        try:
            return make_plan(source, self.layers_to_skip, widths, drop_unused_kv=drop_unused_kv)
        except RecipeError as e:
            raise RecipeError(self._where() + str(e).removeprefix("invalid size recipe: ")) from None

    def _where(self) -> str:
        if self.path:
            return f"invalid size recipe {self.name!r} ({self.path}): "
        return f"invalid size recipe {self.name!r}: "


def fraction_to_width(fraction: float, source_width: int) -> int:
    """Return round(fraction * source_width) with halves rounded up, computed exactly on the decimal fraction."""
    exact = Fraction(repr(float(fraction))) * source_width
    return math.floor(exact + Fraction(1, 2))


def load_size_recipe(name_or_path: str | Path) -> SizeRecipe:
    """Load and validate a size recipe given by shipped name (`e2b`) or by the path of a TOML file.

    Only the recipe itself is checked here; `SizeRecipe.plan` checks it against a source model.

    Raises:
        RecipeError: the recipe is not found, or a field is missing, unknown or of the wrong type (all problems are
            listed, each naming the field and the fix).
    """
    path = resolve_recipe_path(SIZES, name_or_path)
    return parse_size_recipe(read_recipe_toml(path), path)


def list_size_recipes() -> list[SizeRecipe]:
    """Load every shipped size recipe, ordered by name."""
    return [load_size_recipe(name) for name in shipped_recipe_names(SIZES)]


def parse_size_recipe(data: dict[str, Any], path: Path | None = None) -> SizeRecipe:
    """Validate the parsed TOML of a size recipe and build the recipe.

    Raises:
        RecipeError: listing every invalid field with its fix.
    """
    errors = _unknown_keys(data, _SIZE_KEYS, "")

    name = data.get("name")
    if name is None:
        errors.append('missing key "name"; add a short name such as name = "my-size"')
    elif not isinstance(name, str) or not name.strip():
        errors.append(f"name must be a non-empty string, got {name!r}")

    description = data.get("description", "")
    if not isinstance(description, str):
        errors.append(f"description must be a string, got {description!r}")

    skip = data.get("layers_to_skip", [])
    if not isinstance(skip, list) or not all(_is_int(i) and i >= 0 for i in skip):
        errors.append(f"layers_to_skip must be a list of layer indices (integers >= 0), got {skip!r}; use [] to keep every layer")
        skip = []

    fraction = data.get("ffn_fraction")
    width = data.get("ffn_width")
    if fraction is not None and width is not None:
        errors.append("both ffn_fraction and ffn_width are set; keep only one of them")
    elif fraction is None and width is None:
        errors.append("missing FFN widths; set ffn_fraction (relative to the source, e.g. 0.5) or ffn_width (absolute)")
    if fraction is not None:
        fraction = _check_per_layer(fraction, "ffn_fraction", _is_fraction, "numbers in (0, 1], such as 0.5", errors)
    if width is not None:
        width = _check_per_layer(width, "ffn_width", _is_width, "positive integers, such as 8192", errors)

    published, published_errors = _parse_published(data.get("published", {}))
    errors += published_errors

    if errors:
        label = f"{path}" if path else f"size recipe {name!r}"
        raise RecipeError(f"invalid size recipe {label}: " + "; ".join(errors))
    return SizeRecipe(
        name=name,
        description=description,
        layers_to_skip=tuple(skip),
        ffn_fraction=fraction,
        ffn_width=width,
        published=published,
        path=path,
    )


def _is_fraction(value: Any) -> bool:
    return _is_number(value) and 0 < value <= 1


def _is_width(value: Any) -> bool:
    return _is_int(value) and value > 0


def _check_per_layer(value: Any, field: str, valid, expected: str, errors: list[str]):
    """Return `value` as a scalar or a tuple when every entry is valid; otherwise record the error."""
    if isinstance(value, list):
        bad = [(k, v) for k, v in enumerate(value) if not valid(v)]
        if not value:
            errors.append(f"{field} is an empty list; give one entry per kept layer, or a single value")
        elif bad:
            shown = ", ".join(f"entry {k} = {v!r}" for k, v in bad[:3])
            errors.append(f"{field} entries must be {expected}; got {shown}")
        return tuple(float(v) if field == "ffn_fraction" else v for v in value)
    if not valid(value):
        errors.append(f"{field} must be {expected} (one for every kept layer) or a list of them, got {value!r}")
    return float(value) if field == "ffn_fraction" and _is_number(value) else value


def _parse_published(data: Any) -> tuple[Published, list[str]]:
    if not isinstance(data, dict):
        return Published(), [f"published must be a table ([published]), got {data!r}"]
    errors = _unknown_keys(data, _PUBLISHED_KEYS, "published.")
    for key in ("csv_row", "note"):
        if key in data and not isinstance(data[key], str):
            errors.append(f"published.{key} must be a string, got {data[key]!r}")
    for key in ("effective_params_b", "mmlu_pt_percent"):
        if key in data and not _is_number(data[key]):
            errors.append(f"published.{key} must be a number, got {data[key]!r}")
    if errors:
        return Published(), errors
    return Published(
        csv_row=data.get("csv_row"),
        effective_params_b=float(data["effective_params_b"]) if "effective_params_b" in data else None,
        mmlu_pt_percent=float(data["mmlu_pt_percent"]) if "mmlu_pt_percent" in data else None,
        note=data.get("note"),
    ), []
