"""Checkpoint reading and writing, synthetic checkpoints, and the errors users see for bad input."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from g3n_export.checkpoint import (
    INDEX_FILE, SINGLE_FILE, TensorSpec, atomic_output_dir, open_checkpoint, write_checkpoint,
)
from g3n_export.errors import CheckpointError, ConfigError, OutputError
from g3n_export.layout import TEXT_PREFIX, text_shapes, tower_shapes
from g3n_export.synthetic import PRESETS, _tensor_specs, make_synthetic, synthetic_config
from g3n_export.config import TextConfig

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_synthetic("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", seed=1)


def read_reference(name: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in (DATA / name).read_text().splitlines():
        if line.startswith("#"):
            continue
        tensor, shape, _ = line.split("\t")
        shapes[tensor] = tuple(int(s) for s in shape.strip("[]").split(","))
    return shapes


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "g3n_export", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


# Layout -------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, reference, total, text_total", [
    ("e4b", "gemma3n_E4B_hf_tensor_names_shapes.txt", 7_849_978_192, 6_866_696_688),
    ("e2b", "gemma3n_E2B_hf_tensor_names_shapes.txt", 5_439_438_272, 4_456_156_768),
])
def test_real_presets_match_google_layout(preset, reference, total, text_total):
    config = synthetic_config(PRESETS[preset], 262_144, text_only=False)
    specs = _tensor_specs(TextConfig.from_hf_dict(config), PRESETS[preset], text_only=False)
    shapes = {s.name: s.shape for s in specs}
    assert shapes == read_reference(reference)
    assert sum(math.prod(s.shape) for s in specs) == total
    assert sum(math.prod(s.shape) for s in specs if s.name.startswith(TEXT_PREFIX)) == text_total
    assert all(s.dtype == torch.bfloat16 for s in specs)


def test_tiny_preset_keeps_real_names(tiny):
    ckpt = open_checkpoint(tiny)
    real = set(read_reference("gemma3n_E4B_hf_tensor_names_shapes.txt"))
    assert set(ckpt.tensors) == real
    assert ckpt.text_config.num_hidden_layers == 35
    assert ckpt.text_config.kv_layers == tuple(range(20))


# Reading ------------------------------------------------------------------------------------------------------------

def test_sharded_checkpoint_loads(tiny):
    assert (tiny / INDEX_FILE).is_file()
    index = json.loads((tiny / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    ckpt = open_checkpoint(tiny)
    assert ckpt.is_multimodal
    assert ckpt.text_prefix == TEXT_PREFIX
    assert len(ckpt.other_names()) == len(tower_shapes())
    t = ckpt.text_tensor("layers.3.mlp.down_proj.weight")
    assert t.dtype == torch.bfloat16
    assert tuple(t.shape) == (32, 64)


def test_synthetic_is_deterministic(tiny, tmp_path):
    again = make_synthetic("tiny", tmp_path / "again", seed=1)
    other = make_synthetic("tiny", tmp_path / "other", seed=2)
    a, b, c = open_checkpoint(tiny), open_checkpoint(again), open_checkpoint(other)
    name = "layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.text_tensor(name), b.text_tensor(name))
    assert not torch.equal(a.text_tensor(name), c.text_tensor(name))


def copy_text_only(src: Path, dst: Path, prefix: str, single_file: bool) -> Path:
    """Rewrite a checkpoint as text-only with the given tensor prefix (the layouts transformers saves)."""
    ckpt = open_checkpoint(src)
    config = dict(ckpt.config_dict["text_config"])
    config["architectures"] = ["Gemma3nForCausalLM"]
    specs = [TensorSpec(prefix + n, ckpt.info(ckpt.text_prefix + n).dtype, ckpt.info(ckpt.text_prefix + n).shape)
             for n in ckpt.text_names()]
    produce = lambda spec: ckpt.text_tensor(spec.name[len(prefix):])  # noqa: E731
    return write_checkpoint(dst, config, specs, produce, extra_files=ckpt.extra_files(),
                            max_shard_bytes=1 << 40 if single_file else 1 << 20)


@pytest.mark.parametrize("prefix", [TEXT_PREFIX, "model."])
def test_text_only_prefixes_and_single_file(tiny, tmp_path, prefix):
    out = copy_text_only(tiny, tmp_path / "text", prefix, single_file=True)
    assert (out / SINGLE_FILE).is_file()
    assert not (out / INDEX_FILE).exists()
    ckpt = open_checkpoint(out)
    assert not ckpt.is_multimodal
    assert ckpt.text_prefix == prefix
    assert ckpt.other_names() == []
    name = "embed_tokens_per_layer.weight"
    assert torch.equal(ckpt.text_tensor(name), open_checkpoint(tiny).text_tensor(name))
    assert (out / "tokenizer.json").is_file()


def test_extra_files_are_carried(tiny):
    names = {p.name for p in open_checkpoint(tiny).extra_files()}
    assert {"tokenizer.json", "tokenizer.model"} <= names
    assert "config.json" not in names


# Writing ------------------------------------------------------------------------------------------------------------

def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "out"

    def produce(spec):
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_checkpoint(out, {"model_type": "gemma3n_text"}, [TensorSpec("a", torch.float32, (4,))], produce)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match="--force"):
        with atomic_output_dir(out):
            pass
    assert (out / "keep.txt").is_file()
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_chunked_producer_roundtrip(tmp_path):
    full = torch.arange(12 * 5, dtype=torch.float32).reshape(12, 5)
    spec = TensorSpec("t", torch.float32, (12, 5))
    write_checkpoint(tmp_path / "c", {"model_type": "x"}, [spec], lambda s: iter(full.split(5)))
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "c" / SINGLE_FILE)["t"], full)


# Bad input ----------------------------------------------------------------------------------------------------------

def test_missing_folder():
    with pytest.raises(CheckpointError, match="not found"):
        open_checkpoint("./does/not/exist")


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        open_checkpoint(tmp_path)


def test_folder_without_weights(tiny, tmp_path):
    shutil.copy(tiny / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="has no weights"):
        open_checkpoint(tmp_path)


def test_config_of_other_model(tiny, tmp_path):
    shutil.copytree(tiny, tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": {}}))
    with pytest.raises(ConfigError, match="model_type 'gemma3'"):
        open_checkpoint(tmp_path / "c")


def test_truncated_shard(tiny, tmp_path):
    shutil.copytree(tiny, tmp_path / "c")
    shard = sorted((tmp_path / "c").glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="is truncated"):
        open_checkpoint(tmp_path / "c")


def test_corrupt_shard(tiny, tmp_path):
    shutil.copytree(tiny, tmp_path / "c")
    shard = sorted((tmp_path / "c").glob("*.safetensors"))[0]
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        open_checkpoint(tmp_path / "c")


def test_wrong_shape(tmp_path):
    config = {"model_type": "gemma3n_text", "num_hidden_layers": 5, "num_kv_shared_layers": 0, "hidden_size": 8,
              "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
              "hidden_size_per_layer_input": 2, "vocab_size": 20, "vocab_size_per_layer_input": 16, "laurel_rank": 2}
    shapes = text_shapes(TextConfig.from_hf_dict(config))
    tensors = {TEXT_PREFIX + n: torch.zeros(s) for n, s in shapes.items()}
    tensors[TEXT_PREFIX + "layers.2.mlp.up_proj.weight"] = torch.zeros(12, 8)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tensors, tmp_path / SINGLE_FILE)
    with pytest.raises(CheckpointError, match=r"layers\.2\.mlp\.up_proj\.weight' has shape \[12, 8\].*\[16, 8\]"):
        open_checkpoint(tmp_path)


# CLI ----------------------------------------------------------------------------------------------------------------

def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in " ".join(lines), result.stderr


def test_cli_inspect_tiny(tiny):
    result = run_cli("inspect", str(tiny))
    assert result.returncode == 0, result.stderr
    assert "reads 18" in result.stdout
    assert "reads 19" in result.stdout
    result = run_cli("inspect", str(tiny), "--json")
    summary = json.loads(result.stdout)
    assert summary["total"] == sum(math.prod(i) for i in
                                   (s for s in (open_checkpoint(tiny).info(n).shape for n in open_checkpoint(tiny).tensors)))
    assert [row["kv"] for row in summary["layers"]][18:21] == ["own", "own", "reads 18"]
    config = open_checkpoint(tiny).text_config
    assert summary["altup_num_inputs"] == config.altup_num_inputs
    assert summary["laurel_rank"] == config.laurel_rank


def test_cli_errors_are_one_line(tiny, tmp_path):
    assert_one_line_error(run_cli("inspect", str(tmp_path / "missing")), "not found")
    assert_one_line_error(run_cli("inspect", str(tmp_path)), "has no config.json")
    assert_one_line_error(run_cli("inspect", "google/gemma-3n-E4B-it", env={"HF_HUB_OFFLINE": "1"}),
                          "google/gemma-3n-E4B-it", "--model")
    result = run_cli("make-synthetic", "--preset", "tiny", "--out", str(tiny))
    assert_one_line_error(result, "already exists", "--force")
    result = run_cli("make-synthetic", "--preset", "huge", "--out", str(tmp_path / "x"))
    assert result.returncode != 0
    assert "huge" in result.stderr
    assert not (tmp_path / "x").exists()
