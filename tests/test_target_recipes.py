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
    # Their programs take calls far shorter than the KV cache, which keeps the activation arena small.
    assert recipe.executorch.prefill_chunk < recipe.max_seq_len


@pytest.mark.parametrize(("executorch", "message"), [
    ({"logits": "first"}, "executorch.logits is 'first'; allowed values are last, all"),
    ({"linear": "4w"}, "executorch.linear is '4w'"),
    ({"logit": "all"}, "unknown field 'executorch.logit'"),
    ({"lm_head": "int4"}, "executorch.lm_head is 'int4'; allowed values are 8da4w, 8da8w"),
    ({"prefill_chunk": 1}, "executorch.prefill_chunk must be an integer of at least 2, got 1"),
    ({"prefill_chunk": "128"}, "executorch.prefill_chunk must be an integer of at least 2, got '128'"),
    ({"prefill_chunk": True}, "executorch.prefill_chunk must be an integer of at least 2, got True"),
])
def test_invalid_executorch_fields_are_named(executorch, message):
    with pytest.raises(RecipeError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_target_recipe({"name": "custom", "executorch": executorch})


def test_logits_all_is_accepted():
    recipe = parse_target_recipe({"name": "custom", "executorch": {"logits": "all"}})
    assert recipe.executorch.logits == "all"
    assert "logits of every position" in recipe.executorch.describe()


@pytest.mark.parametrize(("quant", "lm_head", "precision"), [("int8", "8da8w", "int8"), ("int4", "8da4w", "int4")])
def test_quant_override_sets_the_lm_head(quant, lm_head, precision):
    # An int8 export must not keep the android recipe's 4-bit LM head, or its precision class would be int4.
    spec = load_target_recipe("android").with_quant(quant).executorch
    assert spec.lm_head == lm_head
    assert spec.precision == precision


def test_float_embedding_keeps_the_head_tied():
    spec = load_target_recipe("android").with_quant("fp32").executorch
    assert spec.precision == "fp32"
    assert "LM head tied" in spec.describe()
