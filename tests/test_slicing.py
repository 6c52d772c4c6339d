"""Streaming MatFormer slicer and `g3n-export slice`: layout, exact weights, transformers logits, rejected input."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_logits_close, random_text_tensor

from g3n_export.bundled import BUNDLED_MODEL
from g3n_export.checkpoint import INDEX_FILE, TensorInfo, TensorSpec, open_checkpoint, write_checkpoint
from g3n_export.cli.main import main
from g3n_export.config import TextConfig, text_config_dict
from g3n_export.errors import OutputError, RecipeError
from g3n_export.layout import TEXT_PREFIX, is_unused_kv_name, layer_index, text_shapes, tower_shapes
from g3n_export.matformer import SlicedCheckpoint, effective_parameters, make_plan
from g3n_export.model import Gemma3nDecoder
from g3n_export.reference import load_reference, reference_logits
from g3n_export.recipes import load_size_recipe, parse_size_recipe
from g3n_export.slicer import SLICE_INFO_FILE, _stream_tensor, plan_slice_tensors, slice_checkpoint
from g3n_export.synthetic import PRESETS, synthetic_config

DATA = Path(__file__).parent / "data"
# Our decoder and transformers sum in different orders. On these 30- and 35-layer random models without activation
# sparsity, float32 logits of magnitude about 7 differ by up to 1.6e-3 (measured on e4b, e2b, e1.96b-layer and
# e3.18b-layer slices), while a wrong slice moves them by far more. With Gaussian top-k sparsity on layers 0-9 the
# gap grows to 2e-3..4e-2 on unsliced sources too, so the sparse source is compared only with transformers.
DECODER_ATOL = 5e-3
VOCAB = 96  # PLE vocabulary of the tiny test checkpoints; embed_tokens has 64 more rows
TOWER_TENSORS = 3  # tower tensors kept per group, so text-only slicing has something to drop


def read_reference(name: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in (DATA / name).read_text().splitlines():
        if line.startswith("#"):
            continue
        tensor, shape, _ = line.split("\t")
        shapes[tensor] = tuple(int(s) for s in shape.strip("[]").split(","))
    return shapes


def write_tiny(out: Path, *, text_only: bool, seed: int = 0, dtype=torch.bfloat16, dense: bool = False) -> Path:
    """Write a random tiny checkpoint with E4B's 35-layer structure (and a few tiny tower tensors when multimodal).

    `dense` turns off the activation sparsity of layers 0-9.
    """
    config = synthetic_config(PRESETS["tiny"], VOCAB, text_only=text_only)
    if dense:
        text_config_dict(config)["activation_sparsity_pattern"] = [0.0] * 35
    text = TextConfig.from_hf_dict(config)
    specs = [TensorSpec(TEXT_PREFIX + n, dtype, s) for n, s in text_shapes(text).items()]
    if not text_only:
        per_group: dict[str, int] = {}
        for name, shape in tower_shapes().items():
            group = name.split(".")[1]
            per_group[group] = per_group.get(group, 0) + 1
            if per_group[group] <= TOWER_TENSORS:
                specs.append(TensorSpec(name, dtype, tuple(min(s, 4) for s in shape)))
    generator = torch.Generator().manual_seed(seed)

    def produce(spec: TensorSpec) -> torch.Tensor:
        if spec.name.startswith(TEXT_PREFIX):
            return random_text_tensor(spec.name[len(TEXT_PREFIX):], spec.shape, generator).to(spec.dtype)
        return torch.randn(spec.shape, generator=generator).to(spec.dtype)

    extras = out.parent / f"{out.name}-extras"
    extras.mkdir(parents=True, exist_ok=True)
    (extras / "tokenizer_config.json").write_text('{"model_max_length": 256}\n')
    (extras / "preprocessor_config.json").write_text("{}\n")
    return write_checkpoint(out, config, specs, produce, extra_files=sorted(extras.iterdir()), max_shard_bytes=256 * 1024)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Run torch on one thread: these matrices are tiny, and on a busy machine a second thread makes them 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_e4b(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("src") / "tiny", text_only=False)


@pytest.fixture(scope="module")
def tiny_e4b_text(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("src") / "tiny-text", text_only=True, seed=1, dtype=torch.float32, dense=True)


def stored(path: Path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(path)
    return {name: ckpt.tensor(name) for name in ckpt.tensors}


def sliced_in_memory(source: Path, plan) -> dict[str, torch.Tensor]:
    """The submodel's text weights cut with `SlicePlan.slice_tensor` on whole tensors, without the slicer."""
    ckpt = open_checkpoint(source)
    out = {}
    for name in ckpt.text_names():
        target = plan.target_name(name)
        if target is not None:
            out["model." + target] = plan.slice_tensor(name, ckpt.text_tensor(name)).float()
    return out


def load_transformers(path: Path):
    """Load a checkpoint with the project's float32 reference loader (transformers, eager attention).

    `load_reference` raises when a text parameter is missing or was loaded with values that differ from the file.
    """
    return load_reference(path)


def transformers_from_state(plan, source_config: dict, state: dict[str, torch.Tensor]):
    """Build transformers' model for the submodel config directly from in-memory tensors (no files involved)."""
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    text = {k: v for k, v in plan.text_updates(text_config_dict(source_config)).items() if k != "model_type"}
    model = Gemma3nForCausalLM(Gemma3nTextConfig(**text, attn_implementation="eager")).eval()
    result = model.load_state_dict(state, strict=False)
    assert set(result.missing_keys) <= {"lm_head.weight"}  # tied to embed_tokens
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert all(is_unused_kv(name, plan.target) for name in result.unexpected_keys)
    return model


def is_unused_kv(name: str, config: TextConfig) -> bool:
    """True for k/v weights of a KV-shared layer, which transformers 5 does not create."""
    layer = layer_index(name)
    return layer is not None and config.is_kv_shared(layer) and is_unused_kv_name(name)


def transformers_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return reference_logits(model, ids)


def decoder_logits(model: Gemma3nDecoder, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, torch.tensor([0]))


def token_ids(n: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(7))


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["g3n-export", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# Layout at E4B dimensions, without weights ------------------------------------------------------------------------

def test_e2b_slice_of_e4b_list():
    """Run the slicer's tensor planning on Google's E4B tensor list: it must give exactly Google's E2B list."""
    e4b = read_reference("gemma3n_E4B_hf_tensor_names_shapes.txt")
    e2b = read_reference("gemma3n_E2B_hf_tensor_names_shapes.txt")
    source = TextConfig.from_hf_dict(synthetic_config(PRESETS["e4b"], 262_144, text_only=False))
    plan = load_size_recipe("e2b").plan(source)
    tensors = {n: TensorInfo(n, Path("unused"), torch.bfloat16, s) for n, s in e4b.items()}

    items = plan_slice_tensors(plan, tensors, TEXT_PREFIX)

    assert {item.spec.name: item.spec.shape for item in items} == e2b
    assert effective_parameters(plan.target) == 1_905_495_648
    assert len(items) == len(e2b)


def test_text_only_e2b_slice_drops_towers_only():
    e4b = read_reference("gemma3n_E4B_hf_tensor_names_shapes.txt")
    e2b = read_reference("gemma3n_E2B_hf_tensor_names_shapes.txt")
    source = TextConfig.from_hf_dict(synthetic_config(PRESETS["e4b"], 262_144, text_only=False))
    plan = load_size_recipe("e2b").plan(source, drop_unused_kv=True)
    tensors = {n: TensorInfo(n, Path("unused"), torch.bfloat16, s) for n, s in e4b.items()}

    names = {item.spec.name for item in plan_slice_tensors(plan, tensors, TEXT_PREFIX, text_only=True)}

    expected = {n for n in e2b if n.startswith(TEXT_PREFIX)}
    unused = {f"{TEXT_PREFIX}layers.{i}.self_attn.{t}.weight" for i in range(20, 30) for t in ("k_proj", "v_proj", "k_norm")}
    assert names == expected - unused
    assert len(unused & expected) == 30


# Tiny checkpoints on disk -----------------------------------------------------------------------------------------

def test_e2b_slice_writes_plan_tensors(tiny_e4b, tmp_path):
    source = open_checkpoint(tiny_e4b)
    plan = load_size_recipe("e2b").plan(source.text_config)

    result = slice_checkpoint(source, plan, tmp_path / "e2b", recipe_name="e2b", max_shard_bytes=64 * 1024)

    out = open_checkpoint(tmp_path / "e2b")
    assert out.text_config == plan.target
    assert {n: out.info(TEXT_PREFIX + n).shape for n in out.text_names()} == plan.target_shapes()
    assert out.text_config.num_hidden_layers == 30
    assert out.text_config.intermediate_size == (32,) * 30
    assert out.text_config.num_kv_shared_layers == 10
    assert sorted(out.other_names()) == sorted(source.other_names())
    assert result.tensors == len(out.tensors)
    assert result.effective_parameters == effective_parameters(plan.target)
    assert (tmp_path / "e2b" / INDEX_FILE).is_file()  

    expected = sliced_in_memory(tiny_e4b, plan)
    for name in out.text_names():
        assert torch.equal(out.text_tensor(name).float(), expected["model." + name]), name
    for name in source.other_names():
        assert torch.equal(out.tensor(name), source.tensor(name)), name


def test_slice_copies_extra_files_and_records_recipe(tiny_e4b, tmp_path):
    source = open_checkpoint(tiny_e4b)
    plan = load_size_recipe("e2b").plan(source.text_config)

    slice_checkpoint(source, plan, tmp_path / "e2b", recipe_name="e2b")

    out = tmp_path / "e2b"
    assert (out / "tokenizer_config.json").read_text() == (tiny_e4b / "tokenizer_config.json").read_text()
    assert (out / "preprocessor_config.json").is_file()
    info = json.loads((out / SLICE_INFO_FILE).read_text())
    assert info["recipe"] == "e2b"
    assert info["layers_to_skip"] == [20, 21, 22, 23, 24]
    assert info["ffn_widths"] == [32] * 30
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3n"
    assert len(config["text_config"]["layer_types"]) == 30
    assert config["text_config"]["activation_sparsity_pattern"] == [0.95] * 10 + [0.0] * 20


def test_identity_slice_reproduces_source(tiny_e4b, tmp_path):
    source = open_checkpoint(tiny_e4b)
    plan = load_size_recipe("e4b").plan(source.text_config)
    assert plan.is_identity

    slice_checkpoint(source, plan, tmp_path / "same")

    out = open_checkpoint(tmp_path / "same")
    assert out.config_dict == source.config_dict
    assert list(out.tensors) == list(source.tensors)
    for name in source.tensors:
        a, b = source.tensor(name), out.tensor(name)
        assert a.dtype == b.dtype, name
        assert torch.equal(a, b), name


def test_row_chunks_give_identical_tensors(tiny_e4b, tmp_path):
    source = open_checkpoint(tiny_e4b)
    plan = load_size_recipe("e2.69b-layer").plan(source.text_config)

    slice_checkpoint(source, plan, tmp_path / "whole", chunk_bytes=1 << 30)
    slice_checkpoint(source, plan, tmp_path / "chunks", chunk_bytes=1000)

    whole, chunks = stored(tmp_path / "whole"), stored(tmp_path / "chunks")
    assert list(whole) == list(chunks)
    for name in whole:
        assert torch.equal(whole[name], chunks[name]), name


def test_large_tensors_are_streamed_in_row_blocks(tiny_e4b):
    source = open_checkpoint(tiny_e4b)
    plan = load_size_recipe("e2b").plan(source.text_config)
    items = {i.text_name: i for i in plan_slice_tensors(plan, source.tensors, source.text_prefix)}

    ple = list(_stream_tensor(items["embed_tokens_per_layer.weight"], plan, chunk_bytes=2048))
    gate = list(_stream_tensor(items["layers.0.mlp.gate_proj.weight"], plan, chunk_bytes=256))

    ple_row_bytes = 35 * 8 * 2
    assert len(ple) == math.ceil(VOCAB / (2048 // ple_row_bytes))
    assert max(c.numel() * c.element_size() for c in ple) <= 2048
    assert torch.equal(torch.cat(ple), plan.slice_tensor("embed_tokens_per_layer.weight", source.text_tensor("embed_tokens_per_layer.weight")))
    assert len(gate) == 32 // (256 // 64)  # only the 32 kept rows are read, 4 rows of 64 bytes per block
    assert torch.equal(torch.cat(gate), source.text_tensor("layers.0.mlp.gate_proj.weight")[:32])


def test_sliced_view_reads_row_blocks(tiny_e4b):
    # Blocks of 5 rows end inside the kept FFN rows, and the PLE table and its projection are cut by layer.
    source = open_checkpoint(tiny_e4b)
    view = SlicedCheckpoint(source, load_size_recipe("e2b").plan(source.text_config))
    for name in view.text_names():
        whole = view.text_tensor(name)
        blocks = [view.text_tensor_rows(name, start, min(start + 5, whole.shape[0]))
                  for start in range(0, whole.shape[0], 5)]
        assert torch.equal(torch.cat(blocks), whole), name


def test_text_only_slice_loads_in_transformers(tiny_e4b, tmp_path):
    source = open_checkpoint(tiny_e4b)
    plan = load_size_recipe("e2b").plan(source.text_config)

    slice_checkpoint(source, plan, tmp_path / "text", text_only=True)

    out = tmp_path / "text"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3n_text"
    assert config["architectures"] == ["Gemma3nForCausalLM"]
    assert config["num_hidden_layers"] == 30
    assert not (out / "preprocessor_config.json").exists()
    assert (out / "tokenizer_config.json").is_file()
    assert open_checkpoint(out).other_names() == []

    loaded = load_transformers(out).state_dict()
    expected = sliced_in_memory(tiny_e4b, plan)
    for name, tensor in expected.items():
        if name in loaded:
            assert torch.equal(loaded[name], tensor), name
        else:
            assert is_unused_kv(name, plan.target), name


@pytest.mark.parametrize("source_name, recipe", [
    ("tiny_e4b", "e2b"),
    ("tiny_e4b_text", "e1.96b-layer"),
    ("tiny_e4b_text", "e3.18b-layer"),
])
def test_sliced_logits_match_in_memory_slice(request, tmp_path, source_name, recipe):
    path = request.getfixturevalue(source_name)
    source = open_checkpoint(path)
    plan = load_size_recipe(recipe).plan(source.text_config)
    slice_checkpoint(source, plan, tmp_path / recipe)
    state = sliced_in_memory(path, plan)
    ids = token_ids()

    expected = transformers_logits(transformers_from_state(plan, source.config_dict, state), ids)
    on_disk = load_transformers(tmp_path / recipe)
    ours = Gemma3nDecoder.from_checkpoint(open_checkpoint(tmp_path / recipe), max_seq_len=ids.shape[1])
    ours_in_memory = Gemma3nDecoder.from_hf_state_dict(
        plan.target, {name.removeprefix("model."): t for name, t in state.items()}, max_seq_len=ids.shape[1],
    )

    assert on_disk.config.num_hidden_layers == len(plan.kept)
    assert torch.equal(transformers_logits(on_disk, ids), expected)
    assert torch.equal(decoder_logits(ours, ids), decoder_logits(ours_in_memory, ids))
    if not any(plan.target.activation_sparsity_pattern):
        assert_logits_close(decoder_logits(ours, ids), expected, f"{recipe}: our decoder vs transformers",
                            atol=DECODER_ATOL)


def test_narrow_ffn_equals_zeroed_units(tiny_e4b_text, tmp_path):
    """Cutting an FFN to its first d units must equal the full model with units d.. zeroed.

    Gaussian top-k sparsity takes statistics over the whole width, so this holds only for dense layers: the source is
    dense, and layers 0-9 (sparse in Google's models) keep their full width anyway.
    """

    source = open_checkpoint(tiny_e4b_text)
    widths = [64] * 10 + [16] * 25
    plan = make_plan(source.text_config, [], widths)
    slice_checkpoint(source, plan, tmp_path / "narrow")

    narrow = load_transformers(tmp_path / "narrow")
    full = load_transformers(tiny_e4b_text)
    with torch.no_grad():
        for i, layer in enumerate(full.model.layers):
            layer.mlp.gate_proj.weight[widths[i]:] = 0
            layer.mlp.up_proj.weight[widths[i]:] = 0
            layer.mlp.down_proj.weight[:, widths[i]:] = 0

    ids = token_ids()
    torch.testing.assert_close(transformers_logits(narrow, ids), transformers_logits(full, ids), rtol=1e-5, atol=1e-5)


def test_identity_slice_gives_same_logits(tiny_e4b_text, tmp_path):
    source = open_checkpoint(tiny_e4b_text)
    slice_checkpoint(source, load_size_recipe("e4b").plan(source.text_config), tmp_path / "same")

    ids = token_ids()
    a = transformers_logits(load_transformers(tiny_e4b_text), ids)
    b = transformers_logits(load_transformers(tmp_path / "same"), ids)
    assert torch.equal(a, b)


def test_drop_unused_kv_keeps_logits(tiny_e4b_text, tmp_path):
    source = open_checkpoint(tiny_e4b_text)
    kept = load_size_recipe("e2b").plan(source.text_config)
    dropped = load_size_recipe("e2b").plan(source.text_config, drop_unused_kv=True)
    slice_checkpoint(source, kept, tmp_path / "kept")
    slice_checkpoint(source, dropped, tmp_path / "dropped")

    names = open_checkpoint(tmp_path / "dropped").text_names()
    assert "layers.19.self_attn.k_proj.weight" in names
    assert "layers.20.self_attn.k_proj.weight" not in names
    assert len(open_checkpoint(tmp_path / "kept").text_names()) - len(names) == 3 * 10

    ids = token_ids()
    a = transformers_logits(load_transformers(tmp_path / "kept"), ids)
    b = transformers_logits(load_transformers(tmp_path / "dropped"), ids)
    assert torch.equal(a, b)


# Rejected input ---------------------------------------------------------------------------------------------------

def test_plan_for_other_config_is_rejected(tiny_e4b, tmp_path):
    other = TextConfig.from_hf_dict({**open_checkpoint(tiny_e4b).config_dict["text_config"], "sliding_window": 32})
    plan = load_size_recipe("e2b").plan(other)

    with pytest.raises(RecipeError, match="different model config"):
        slice_checkpoint(open_checkpoint(tiny_e4b), plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_out_containing_source_is_rejected(tiny_e4b):
    source = open_checkpoint(tiny_e4b)
    plan = load_size_recipe("e2b").plan(source.text_config)

    for out in (tiny_e4b, tiny_e4b.parent):
        with pytest.raises(OutputError, match="would replace the source"):
            slice_checkpoint(source, plan, out, force=True)
    assert open_checkpoint(tiny_e4b).tensors.keys() == source.tensors.keys()


def test_existing_out_needs_force(tiny_e4b, tmp_path):
    source = open_checkpoint(tiny_e4b)
    plan = load_size_recipe("e2b").plan(source.text_config)
    (tmp_path / "out").mkdir()

    with pytest.raises(OutputError, match="already exists"):
        slice_checkpoint(source, plan, tmp_path / "out")
    slice_checkpoint(source, plan, tmp_path / "out", force=True)
    assert open_checkpoint(tmp_path / "out").text_config.num_hidden_layers == 30


# Command line -----------------------------------------------------------------------------------------------------

def test_cli_slice_writes_checkpoint(tiny_e4b, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "slice", "--model", str(tiny_e4b), "--size", "e2b",
                             "--out", str(tmp_path / "e2b"), "--text-only", "--drop-unused-kv")

    assert code == 0, err
    assert "wrote" in out
    assert "peak RSS" in out
    assert "recipe 'e2b'" in err
    config = json.loads((tmp_path / "e2b" / "config.json").read_text())
    assert config["model_type"] == "gemma3n_text"
    assert config["num_hidden_layers"] == 30


@pytest.mark.parametrize("recipe, message", [
    ("layers_to_skip = [18, 19, 20, 21, 22, 23, 24]\nffn_fraction = 0.5", "are reserved"),
    ("layers_to_skip = [20, 21]\nffn_fraction = 0.5", "partial blocks: 20-24"),
    ("layers_to_skip = []\nffn_fraction = [0.5, 0.5]", "ffn_fraction has 2 entries, but the source keeps 35 layers"),
    ("layers_to_skip = []\nffn_width = 65", "larger than the source's 64"),
    ("layers_to_skip = []\nffn_fraction = 0.001", "must be a positive integer, got 0"),
    ("layers_to_skip = []\nffn_fractions = 0.5", "did you mean 'ffn_fraction'"),
    ("layers_to_skip = 20\nffn_fraction = 0.5", "layers_to_skip must be a list"),
    ("layers_to_skip = [\nffn_fraction = 0.5", "is not valid TOML"),
])
def test_cli_rejects_bad_recipe_before_writing(tiny_e4b, tmp_path, monkeypatch, capsys, recipe, message):
    path = tmp_path / "bad.toml"
    path.write_text(f'name = "bad"\n{recipe}\n')

    code, out, err = run_cli(monkeypatch, capsys, "slice", "--model", str(tiny_e4b), "--size", str(path),
                             "--out", str(tmp_path / "out"))

    assert code == 1
    assert message in err
    assert err.startswith("error:")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.toml"]


@pytest.mark.parametrize("args, message", [
    (["--size", "e3b"], "unknown size recipe 'e3b'"),
    (["--size", "missing.toml"], "size recipe file 'missing.toml' not found"),
    (["--size", "e2b", "--model", "no/such/folder"], "not found"),
])
def test_cli_rejects_bad_arguments(tiny_e4b, tmp_path, monkeypatch, capsys, args, message):
    if "--model" not in args:
        args = [*args, "--model", str(tiny_e4b)]

    code, out, err = run_cli(monkeypatch, capsys, "slice", *args, "--out", str(tmp_path / "out"))

    assert code == 1
    assert message in err
    assert not (tmp_path / "out").exists()


def test_cli_existing_out_is_rejected(tiny_e4b, tmp_path, monkeypatch, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")

    code, out, err = run_cli(monkeypatch, capsys, "slice", "--model", str(tiny_e4b), "--size", "e2b",
                             "--out", str(tmp_path / "out"))

    assert code == 1
    assert "already exists" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_parsed_recipe_slices_like_shipped_one(tiny_e4b, tmp_path):
    source = open_checkpoint(tiny_e4b)
    custom = parse_size_recipe({"name": "half", "layers_to_skip": [20, 21, 22, 23, 24], "ffn_width": 32})

    slice_checkpoint(source, custom.plan(source.text_config), tmp_path / "custom")
    slice_checkpoint(source, load_size_recipe("e2b").plan(source.text_config), tmp_path / "e2b")

    a, b = stored(tmp_path / "custom"), stored(tmp_path / "e2b")
    assert list(a) == list(b)
    assert all(torch.equal(a[n], b[n]) for n in a)


# Bundled model ----------------------------------------------------------------------------------------------------

BUNDLED_LOG = BUNDLED_MODEL / "training_log.json"


@pytest.mark.skipif(not BUNDLED_LOG.is_file(), reason="the bundled model and its training_log.json are not built yet")
def test_bundled_e2b_slice_keeps_trained_perplexity(tmp_path):
    """Slicing the shipped model to e2b must give the held-out perplexity training measured for that submodel."""
    from g3n_export.tokenizer import load_sentencepiece
    from g3n_export.training.corpus import read_heldout
    from g3n_export.training.evaluate import heldout_windows, perplexity

    log = json.loads(BUNDLED_LOG.read_text())
    record = log["heldout_perplexity"]
    window = record.get("window", log["settings"]["seq_len"])
    source = open_checkpoint(BUNDLED_MODEL)
    plan = load_size_recipe("e2b").plan(source.text_config)
    trained = log["recipes"]["Config for official E2B Model"]
    assert list(plan.skipped) == trained["layers_to_skip"]
    assert list(plan.ffn_widths) == trained["ffn_widths"]

    slice_checkpoint(source, plan, tmp_path / "e2b", text_only=True)

    texts = read_heldout((BUNDLED_MODEL / log["corpus"]["heldout_file"]).read_text())
    windows = heldout_windows(load_sentencepiece(tmp_path / "e2b"), texts, window)
    model = load_transformers(tmp_path / "e2b")
    measured = perplexity(model, windows)
    print(f"e2b held-out perplexity: sliced {measured:.4f}, training log {record['E2B']:.4f}")
    # Training evaluated the same bf16 weights in float32; only the attention kernel may differ.
    assert measured == pytest.approx(record["E2B"], rel=1e-4)
