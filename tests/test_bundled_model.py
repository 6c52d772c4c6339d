"""Checks on the shipped model in g3n_export/assets/gemma3n-pydoc: layout, tokenizer, and the numbers in its log.

Perplexities are recomputed with transformers' Gemma3nForCausalLM (the reference implementation) on the held-out
paragraphs shipped next to the model, and must match what training recorded.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from g3n_export.bundled import BUNDLED_MODEL
from g3n_export.checkpoint import open_checkpoint
from g3n_export.config import FULL, SLIDING
from g3n_export.layout import is_unused_kv_name, layer_index
from g3n_export.matformer import make_plan
from g3n_export.tokenizer import BOS_ID, EOS_ID, PAD_ID, load_sentencepiece
from g3n_export.training.corpus import load_pydoc_corpus, read_heldout
from g3n_export.training.evaluate import heldout_windows, perplexity
from g3n_export.training.train import GENERATION_PROMPTS, generation_prompts

E2B_NAME = "Config for official E2B Model"
REL_TOL = 1e-3

pytestmark = pytest.mark.skipif(not (BUNDLED_MODEL / "config.json").is_file(), reason="bundled model not built")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two OpenMP threads on a shared two-core machine run these small models several times slower than one.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def checkpoint():
    return open_checkpoint(BUNDLED_MODEL)


@pytest.fixture(scope="module")
def training_log():
    return json.loads((BUNDLED_MODEL / "training_log.json").read_text())


@pytest.fixture(scope="module")
def heldout():
    return read_heldout((BUNDLED_MODEL / "heldout.json").read_text())


@pytest.fixture(scope="module")
def windows(heldout, training_log):
    return heldout_windows(load_sentencepiece(BUNDLED_MODEL), heldout, training_log["heldout_perplexity"]["window"])


@pytest.fixture(scope="module")
def full_model():
    from transformers import Gemma3nForCausalLM

    model, info = Gemma3nForCausalLM.from_pretrained(BUNDLED_MODEL, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


def test_structure_matches_e4b(checkpoint):
    c = checkpoint.text_config
    assert c.num_hidden_layers == 35
    assert c.num_kv_shared_layers == 15
    assert c.kv_layers == tuple(range(20))
    for layer in range(20, 35):
        assert c.kv_producer[layer] == (18 if c.layer_types[layer] == SLIDING else 19)
    assert [i for i, t in enumerate(c.layer_types) if t == FULL] == [4, 9, 14, 19, 24, 29, 34]
    assert c.activation_sparsity_pattern == (0.95,) * 10 + (0.0,) * 25
    assert c.altup_num_inputs == 4
    assert c.num_key_value_heads < c.num_attention_heads
    assert c.vocab_size > c.vocab_size_per_layer_input


def test_config_writes_lists_out():
    config = json.loads((BUNDLED_MODEL / "config.json").read_text())
    assert config["model_type"] == "gemma3n_text"
    assert config["architectures"] == ["Gemma3nForCausalLM"]
    for key in ("intermediate_size", "layer_types", "activation_sparsity_pattern"):
        assert isinstance(config[key], list) and len(config[key]) == 35, key
    assert set(config["rope_parameters"]) == {"sliding_attention", "full_attention"}


def test_checkpoint_tensors(checkpoint):
    c = checkpoint.text_config
    assert all(name.startswith("model.language_model.") for name in checkpoint.tensors)
    assert {info.dtype for info in checkpoint.tensors.values()} == {torch.bfloat16}
    size = sum(f.stat().st_size for f in BUNDLED_MODEL.glob("*.safetensors"))
    assert size <= 21 * 10**6

    embed = checkpoint.text_tensor("embed_tokens.weight")
    placeholders = embed[c.vocab_size_per_layer_input:]
    assert torch.equal(placeholders, embed[PAD_ID].expand_as(placeholders))

    for name in checkpoint.text_names():
        layer = layer_index(name)
        if layer is not None and c.is_kv_shared(layer) and is_unused_kv_name(name):
            assert not checkpoint.text_tensor(name).any(), name


def test_transformers_loads_every_weight(full_model):
    _, info = full_model
    assert not info["missing_keys"]
    assert not info["mismatched_keys"]
    # Only the k/v weights of KV-shared layers, which transformers 5 does not create, may be left over.
    assert all(is_unused_kv_name(k) for k in info["unexpected_keys"])


def test_full_perplexity_matches_log(full_model, windows, training_log):
    model, _ = full_model
    logged = training_log["heldout_perplexity"]["E4B"]
    assert perplexity(model, windows) == pytest.approx(logged, rel=REL_TOL)


def test_e2b_slice_perplexity_matches_log(checkpoint, windows, training_log):
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    recipe = training_log["recipes"][E2B_NAME]
    plan = make_plan(checkpoint.text_config, recipe["layers_to_skip"], recipe["ffn_widths"])
    model = Gemma3nForCausalLM(Gemma3nTextConfig.from_dict(plan.config_dict(checkpoint.config_dict)))
    state = {}
    for name in checkpoint.text_names():
        target = plan.target_name(name)
        if target is not None:
            state["model." + target] = plan.slice_tensor(name, checkpoint.text_tensor(name)).float()
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == ["lm_head.weight"]  # tied to model.embed_tokens.weight
    assert all(is_unused_kv_name(k) for k in result.unexpected_keys)
    model.tie_weights()

    logged = training_log["heldout_perplexity"]["E2B"]
    assert perplexity(model.eval(), windows) == pytest.approx(logged, rel=REL_TOL)


def test_slices_ordered_by_size(training_log):
    ppl = training_log["heldout_perplexity"]
    for name, value in ppl["intermediates"].items():
        assert ppl["E4B"] <= value <= ppl["E2B"], name
    assert ppl["E2B"] < ppl["unigram_baseline"]


def test_kv_sharing_without_cache(full_model, windows):
    model, _ = full_model
    ids = torch.tensor([max(windows, key=len)[:64]])
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
        out = model(input_ids=ids[:, :40], use_cache=True)
        steps = [out.logits]
        for t in range(40, ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), reference, atol=2e-3, rtol=0)


def test_tokenizers_agree(heldout):
    from pytorch_tokenizers import CppHFTokenizer
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    sp = load_sentencepiece(BUNDLED_MODEL)
    hf_json = Tokenizer.from_file(str(BUNDLED_MODEL / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(BUNDLED_MODEL)
    cpp = CppHFTokenizer()
    cpp.load(str(BUNDLED_MODEL / "tokenizer.json"))

    assert [sp.id_to_piece(i) for i in range(6)] == [
        "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    assert (auto.pad_token_id, auto.eos_token_id, auto.bos_token_id) == (PAD_ID, EOS_ID, BOS_ID)
    samples = list(heldout) + ["<start_of_turn>user\nWhat does é, ✓ or 𝔘 encode to?<end_of_turn>\n\tTab"]
    for text in samples:
        expected = [BOS_ID] + sp.encode(text)
        assert hf_json.encode(text).ids == expected, text
        assert auto(text).input_ids == expected, text
        assert cpp.encode(text, 1, 0) == expected, text


# Whitespace-separated tokens are words once these are stripped from both ends, so `"for"` and `object,` count.
WORD_PUNCTUATION = ".,;:!?()\"'*“”"
# A word is letters, optionally joined by hyphens or apostrophes: "built-in", "object’s", "doesn’t".
WORD = re.compile(r"[A-Za-z]+(?:[-'’][A-Za-z]+)*")


def is_corpus_word(word: str, corpus_words: set[str]) -> bool:
    """Return whether `word` is a word and each of its hyphen- or apostrophe-separated parts occurs in the corpus."""
    if not WORD.fullmatch(word):
        return False
    return all(part in corpus_words for part in re.findall("[a-z]+", word.lower()))


@pytest.fixture(scope="module")
def corpus_words(training_log):
    """Lower-cased alphabetic words of the training text (the running CPython's pydoc topics minus the held-out part)."""
    corpus = load_pydoc_corpus(training_log["settings"]["holdout_every"])
    return {word.lower() for text in corpus.train for word in re.findall(r"[A-Za-z]+", text)}


@pytest.mark.parametrize("index", range(GENERATION_PROMPTS))
def test_greedy_generation_is_english(index, full_model, heldout, corpus_words):
    """Greedy decoding (no repetition penalty) continues a held-out prose prompt with varied words of the corpus.

    Code fragments (`>>> '0000`, `x.__dict_list_list`) fail the share of words, and a loop on one or two words
    (`not not not`) fails the count of distinct words.
    """
    model, _ = full_model
    sp = load_sentencepiece(BUNDLED_MODEL)
    prompt = generation_prompts(heldout)[index]
    ids = torch.tensor([[BOS_ID] + sp.encode(prompt)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=32, do_sample=False, pad_token_id=PAD_ID)
    text = sp.decode(out[0, ids.shape[1]:].tolist())

    tokens = text.split()
    words = [token.strip(WORD_PUNCTUATION) for token in tokens]
    english = [word.lower() for word in words if is_corpus_word(word, corpus_words)]
    assert len(tokens) >= 10, f"{prompt!r} -> {text!r}"
    assert len(english) >= 0.7 * len(tokens), f"{prompt!r} -> {text!r}"
    assert len(set(english)) >= 6, f"{prompt!r} -> {text!r}"
