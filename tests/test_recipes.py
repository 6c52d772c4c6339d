"""Size recipes: the shipped files against Google's slicing table, parsing errors, and `g3n-export recipes`."""

import ast
import csv
import json
import re
import sys
from pathlib import Path

import pytest

from g3n_export.cli.main import main
from g3n_export.config import TextConfig
from g3n_export.errors import RecipeError
from g3n_export.layout import TEXT_PREFIX
from g3n_export.matformer import effective_parameters
from g3n_export.recipes import (
    fraction_to_width, list_size_recipes, load_size_recipe, parse_size_recipe, recipe_dir, shipped_recipe_names,
)
from g3n_export.synthetic import PRESETS, synthetic_config

DATA = Path(__file__).parent / "data"
E4B = TextConfig.from_hf_dict(synthetic_config(PRESETS["e4b"], 262_144, text_only=False))
TINY = TextConfig.from_hf_dict(synthetic_config(PRESETS["tiny"], 96, text_only=False))


def google_rows() -> dict[str, dict]:
    """Google's slicing table: name -> skipped layers, FFN widths (the CSV writes them as "2_048 * 4"), B params."""
    rows = {}
    with (DATA / "gemma3n_slicing_configs.csv").open() as f:
        for row in csv.DictReader(f):
            widths = [int(a.replace("_", "")) * int(b) for a, b in re.findall(r"([\d_]+) \* (\d+)", row["FFN Hidden Dims"])]
            skipped = ast.literal_eval(row["Layers Skipped"]) if row["Layers Skipped"].strip() else []
            rows[row["name"]] = {
                "layers": int(row["# Layers"]),
                "skip": skipped,
                "widths": widths,
                "effective_b": float(row["# Effective Params (B)"]),
                "mmlu": float(row["MMLU PT accuracy"].rstrip("%")),
            }
    return rows


def read_reference(name: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in (DATA / name).read_text().splitlines():
        if not line.startswith("#"):
            tensor, shape, _ = line.split("\t")
            shapes[tensor] = tuple(int(s) for s in shape.strip("[]").split(","))
    return shapes


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["g3n-export", *args])
    monkeypatch.setenv("COLUMNS", "200")
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# Shipped recipes ---------------------------------------------------------------------------------------------------

def test_every_google_row_has_a_recipe():
    recipes = {r.published.csv_row: r for r in list_size_recipes()}

    assert set(recipes) == set(google_rows())
    assert len(shipped_recipe_names("sizes")) == 16


@pytest.mark.parametrize("row_name, row", google_rows().items())
def test_recipe_matches_google_row(row_name, row):
    recipe = next(r for r in list_size_recipes() if r.published.csv_row == row_name)

    plan = recipe.plan(E4B)

    assert list(plan.skipped) == row["skip"]
    assert len(plan.kept) == row["layers"]
    assert list(plan.ffn_widths) == row["widths"]
    assert recipe.published.effective_params_b == row["effective_b"]
    assert recipe.published.mmlu_pt_percent == row["mmlu"]
    # Google's numbers are rounded and up to 0.019B above the per-tensor count for some rows.
    assert abs(effective_parameters(plan.target) / 1e9 - row["effective_b"]) <= 0.02


def test_e2b_and_e4b_exact_sizes():
    e2b = load_size_recipe("e2b").plan(E4B)
    e4b = load_size_recipe("e4b").plan(E4B)

    assert effective_parameters(e2b.target) == 1_905_495_648
    assert effective_parameters(e4b.target) == 3_980_491_248
    assert e4b.is_identity


def test_e2b_plan_gives_reference_shapes():
    reference = read_reference("gemma3n_E2B_hf_tensor_names_shapes.txt")
    text = {n[len(TEXT_PREFIX):]: s for n, s in reference.items() if n.startswith(TEXT_PREFIX)}

    plan = load_size_recipe("e2b").plan(E4B)

    assert plan.target_shapes() == text
    assert plan.target.num_kv_shared_layers == 10
    assert plan.target.kv_producer[20:] == (18, 18, 18, 18, 19) * 2


@pytest.mark.parametrize("name", shipped_recipe_names("sizes"))
def test_shipped_file_is_self_documenting(name):
    path = recipe_dir("sizes") / f"{name}.toml"
    text = path.read_text()
    recipe = load_size_recipe(name)

    assert recipe.name == name
    assert recipe.description
    assert text.startswith("# Size recipe")
    assert f"g3n-export slice --size {name} --out" in text
    assert "copy this file" in text
    assert load_size_recipe(str(path)) == recipe


@pytest.mark.parametrize("name", shipped_recipe_names("sizes"))
def test_recipe_applies_to_small_widths(name):
    """Recipes are relative, so they slice a model with FFN width 64 (like the bundled one) to 32 or 64."""
    plan = load_size_recipe(name).plan(TINY)
    e4b_plan = load_size_recipe(name).plan(E4B)

    assert plan.kept == e4b_plan.kept
    assert [w * 16_384 // 64 for w in plan.ffn_widths] == list(e4b_plan.ffn_widths)


# Width rounding ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction, width, expected", [
    (0.5, 16_384, 8_192),
    (1.0, 64, 64),
    (0.5, 5, 3),  # 2.5 rounds up
    (0.3, 5, 2),  # 1.5 exactly on the decimal value, rounds up (binary 0.3 * 5 is 1.4999...)
    (0.75, 6, 5),  # 4.5 rounds up
    (0.7, 6, 4),  # 4.2
    (1 / 3, 9, 3),
    (0.001, 64, 0),  # rejected later by make_plan as a non-positive width
])
def test_fraction_to_width(fraction, width, expected):
    assert fraction_to_width(fraction, width) == expected


def test_fractions_scale_per_source_layer():
    source = TextConfig.from_hf_dict({**synthetic_config(PRESETS["tiny"], 96, text_only=False)["text_config"],
                                      "intermediate_size": [64] * 30 + [128] * 5})
    recipe = parse_size_recipe({"name": "mixed", "layers_to_skip": [20, 21, 22, 23, 24], "ffn_fraction": 0.25})

    assert recipe.plan(source).ffn_widths == (16,) * 25 + (32,) * 5


# Invalid recipes ---------------------------------------------------------------------------------------------------

VALID = {"name": "x", "layers_to_skip": [], "ffn_fraction": 0.5}


@pytest.mark.parametrize("changes, message", [
    ({"ffn_fractions": 0.5}, "unknown key 'ffn_fractions'; did you mean 'ffn_fraction'?"),
    ({"colour": "red"}, "unknown key 'colour'; allowed keys are name, description"),
    ({"name": None}, 'missing key "name"'),
    ({"name": 3}, "name must be a non-empty string, got 3"),
    ({"description": ["a"]}, "description must be a string"),
    ({"layers_to_skip": 20}, "layers_to_skip must be a list of layer indices"),
    ({"layers_to_skip": [20, "21"]}, "layers_to_skip must be a list of layer indices"),
    ({"layers_to_skip": [-1]}, "layers_to_skip must be a list of layer indices"),
    ({"ffn_width": 8192}, "both ffn_fraction and ffn_width are set; keep only one"),
    ({"ffn_fraction": None}, "missing FFN widths; set ffn_fraction"),
    ({"ffn_fraction": 0}, "ffn_fraction must be numbers in (0, 1]"),
    ({"ffn_fraction": 1.5}, "ffn_fraction must be numbers in (0, 1]"),
    ({"ffn_fraction": True}, "ffn_fraction must be numbers in (0, 1]"),
    ({"ffn_fraction": "0.5"}, "ffn_fraction must be numbers in (0, 1]"),
    ({"ffn_fraction": [0.5, 2.0]}, "ffn_fraction entries must be numbers in (0, 1], such as 0.5; got entry 1 = 2.0"),
    ({"ffn_fraction": []}, "ffn_fraction is an empty list"),
    ({"ffn_fraction": None, "ffn_width": 8192.0}, "ffn_width must be positive integers"),
    ({"ffn_fraction": None, "ffn_width": [8192, 0]}, "ffn_width entries must be positive integers, such as 8192; got entry 1 = 0"),
    ({"published": 3}, "published must be a table"),
    ({"published": {"mmlu": 50.0}}, "unknown key 'published.mmlu'; did you mean 'mmlu_pt_percent'?"),
    ({"published": {"effective_params_b": "1.9"}}, "published.effective_params_b must be a number"),
])
def test_invalid_field_is_named(changes, message):
    data = {**VALID, **changes}
    data = {k: v for k, v in data.items() if v is not None}

    with pytest.raises(RecipeError) as e:
        parse_size_recipe(data, Path("my.toml"))
    assert message in str(e.value)
    assert str(e.value).startswith("invalid size recipe my.toml: ")


def test_all_problems_reported_together():
    with pytest.raises(RecipeError) as e:
        parse_size_recipe({"nam": "x", "layers_to_skip": 3, "ffn_fraction": 2})
    message = str(e.value)

    assert "did you mean 'name'?" in message
    assert 'missing key "name"' in message
    assert "layers_to_skip must be a list" in message
    assert "ffn_fraction must be numbers in (0, 1]" in message


@pytest.mark.parametrize("data, message", [
    ({"layers_to_skip": [18, 19, 20, 21, 22, 23, 24], "ffn_fraction": 0.5}, "layers [18, 19] are reserved"),
    ({"layers_to_skip": [3], "ffn_fraction": 0.5}, "partial blocks: 0-4"),
    ({"layers_to_skip": [35, 36, 37, 38, 39], "ffn_fraction": 0.5}, "layers_to_skip contains [35, 36, 37, 38, 39]"),
    ({"layers_to_skip": [20, 21, 22, 23, 24], "ffn_fraction": [0.5] * 35}, "ffn_fraction has 35 entries, but the source keeps 30 layers"),
    ({"layers_to_skip": [], "ffn_width": [8192] * 30}, "ffn_width has 30 entries, but the source keeps 35 layers"),
    ({"layers_to_skip": [], "ffn_width": 20_000}, "FFN width 20000 for layer 0 (new index 0) is larger than the source's 16384"),
])
def test_plan_errors_name_recipe_and_fix(data, message):
    recipe = parse_size_recipe({"name": "mine", **data}, Path("mine.toml"))

    with pytest.raises(RecipeError) as e:
        recipe.plan(E4B)
    assert message in str(e.value)
    assert str(e.value).startswith("invalid size recipe 'mine' (mine.toml): ")


def test_unknown_name_suggests_close_match():
    with pytest.raises(RecipeError, match=r"unknown size recipe 'e2.69b'; did you mean 'e2.69b-layer'\?"):
        load_size_recipe("e2.69b")
    with pytest.raises(RecipeError, match=r"did you mean 'e2.98b-block' or 'e2.98b-layer'\?"):
        load_size_recipe("e2.98b")
    with pytest.raises(RecipeError, match=r"did you mean 'e2b'\?"):
        load_size_recipe("e2bb")


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(RecipeError, match="size recipe file .* not found"):
        load_size_recipe(str(tmp_path / "nope.toml"))


def test_copied_recipe_loads_by_path(tmp_path):
    text = (recipe_dir("sizes") / "e2b.toml").read_text().replace('name = "e2b"', 'name = "my-e2b"')
    path = tmp_path / "my-e2b.toml"
    path.write_text(text)

    recipe = load_size_recipe(str(path))

    assert recipe.name == "my-e2b"
    assert recipe.path == path
    assert recipe.plan(E4B).ffn_widths == load_size_recipe("e2b").plan(E4B).ffn_widths


def test_invalid_toml_is_reported(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('name = "x"\nffn_fraction = [0.5,\n')

    with pytest.raises(RecipeError, match="broken.toml is not valid TOML"):
        load_size_recipe(str(path))


# `g3n-export recipes` ----------------------------------------------------------------------------------------------

def write_config(folder: Path, config: dict) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_cli_recipes_lists_every_recipe(tmp_path, monkeypatch, capsys):
    model = write_config(tmp_path / "e4b", synthetic_config(PRESETS["e4b"], 262_144, text_only=False))

    code, out, err = run_cli(monkeypatch, capsys, "recipes", "--model", str(model))

    assert code == 0, err
    for name in shipped_recipe_names("sizes"):
        assert f" {name} " in out, name
    assert "1.905B" in out  # e2b computed on this model
    assert "1.91B" in out  # e2b as published
    assert "50.9%" in out
    assert "3.729B" in out  # the block-level E3.79B row, computed
    assert "3.74B" in out  # the same row, as the CSV writes it
    assert out.index(" e2b ") < out.index(" e4b ")  # smallest first


def test_cli_recipes_rejects_non_e4b_model(tmp_path, monkeypatch, capsys):
    text = synthetic_config(PRESETS["tiny"], 96, text_only=True)
    model = write_config(tmp_path / "odd", {**text, "num_hidden_layers": 12, "num_kv_shared_layers": 2,
                                            "intermediate_size": [64] * 12, "layer_types": None,
                                            "activation_sparsity_pattern": None})

    code, out, err = run_cli(monkeypatch, capsys, "recipes", "--model", str(model))

    assert code == 1
    assert err.startswith("error: the source model is not a Gemma 3n E4B-style checkpoint")


def test_cli_recipes_missing_model(tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "recipes", "--model", str(tmp_path / "absent"))

    assert code == 1
    assert "not found" in err
