"""Target recipes: the shipped ones load, and invalid fields are named with their allowed values."""

from __future__ import annotations

import pytest

from g3n_export.errors import RecipeError
from g3n_export.targets.recipe import load_target_recipe, parse_target_recipe


@pytest.mark.parametrize("name", ["android", "ios", "desktop"])
def test_shipped_recipes_load(name):
    recipe = load_target_recipe(name)
    assert recipe.name == name
    # Phones and desktops alike generate text, so their programs return only the last position's logits.
    assert recipe.executorch.logits == "last"


@pytest.mark.parametrize(("executorch", "message"), [
    ({"logits": "first"}, "executorch.logits is 'first'; allowed values are last, all"),
    ({"linear": "4w"}, "executorch.linear is '4w'"),
    ({"logit": "all"}, "unknown field 'executorch.logit'"),
])
def test_invalid_executorch_fields_are_named(executorch, message):
    with pytest.raises(RecipeError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_target_recipe({"name": "custom", "executorch": executorch})


def test_logits_all_is_accepted():
    recipe = parse_target_recipe({"name": "custom", "executorch": {"logits": "all"}})
    assert recipe.executorch.logits == "all"
    assert "logits of every position" in recipe.executorch.describe()
