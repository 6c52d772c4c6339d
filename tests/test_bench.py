"""`g3n-export bench` on a small ONNX export of the bundled model: JSON report, errors, and the /proc readers."""

import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from g3n_export.bench import _file_sizes, bytes_per_decode_step, mapping_rss, measure_read_bandwidth


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "g3n_export", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, timeout=600)


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "onnx"
    result = run_cli("--size", "e2b", "--target", "android", "--formats", "onnx", "--skip-validation",
                     "--max-seq-len", "64", "--out", str(out))
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def test_bench_writes_json_report(onnx_export, tmp_path):
    report_path = tmp_path / "bench.json"
    result = run_cli("bench", str(onnx_export), "--prompt-len", "8", "--gen-len", "4", "--threads", "1",
                     "--no-bandwidth", "--json", str(report_path))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "decode tok/s" in result.stdout

    report = json.loads(report_path.read_text())
    assert report["settings"] == {"prompt_len": 8, "gen_len": 4, "threads": 1, "seed": 0}
    assert [r["artifact"] for r in report["results"]] == ["onnx"]
    for record in report["results"]:
        assert record["load_s"] > 0
        assert record["prefill_tokens_per_s"] > 0
        assert record["decode_tokens_per_s"] > 0
        rss = record["rss"]
        for key in ("interpreter", "baseline", "after_load", "peak", "steady", "steady_anon", "steady_file"):
            assert rss[key] > 0, key
        # The worker is a fresh process: loading the model adds to what importing the runtime cost.
        assert rss["steady"] > rss["baseline"]
        assert rss["peak"] >= rss["steady"]
        assert set(record["file_mapping_rss"]) == {"embed_tokens.onnx", "decoder_model_merged.onnx"}


def test_bench_rejects_non_export_folder(tmp_path):
    result = run_cli("bench", str(tmp_path))
    assert result.returncode == 1
    assert "not a g3n-export folder" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_bench_rejects_missing_runtime(onnx_export):
    result = run_cli("bench", str(onnx_export), "--runtime", "executorch")
    assert result.returncode == 1
    assert "has no executorch artifact" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_rejects_workload_past_max_seq_len(onnx_export):
    result = run_cli("bench", str(onnx_export), "--prompt-len", "60", "--gen-len", "8")
    assert result.returncode == 1
    assert "exceed the export's max_seq_len 64" in result.stderr


def test_mapping_rss_counts_touched_pages(tmp_path):
    path = tmp_path / "table.bin"
    size = 64 * mmap.PAGESIZE
    path.write_bytes(b"\1" * size)
    with path.open("rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mapped:
        # A fresh mapping is resident only where it has been read (the page cache may map a few neighbors too).
        assert mapped[0] == 1
        assert mapped[10 * mmap.PAGESIZE] == 1
        resident = mapping_rss([path])[path.name]
        assert resident >= 2 * mmap.PAGESIZE
        assert resident <= size
    assert mapping_rss([path])[path.name] == 0


def test_bytes_per_decode_step_excludes_tables():
    manifest = {
        "model": {"vocab_size": 1000, "vocab_size_per_layer_input": 900, "hidden_size": 64, "num_hidden_layers": 4,
                  "hidden_size_per_layer_input": 8},
        "target_recipe": {"onnx": {"embedding": "int8", "ple": "int4", "block_size": 32},
                          "executorch": {"embedding": "int8", "ple": "int4", "group_size": 32}},
    }
    # ONNX: blocks of 32 with a float32 scale and a zero point each; ExecuTorch: float32 scales per row (token
    # embedding) and per row and layer (PLE table), no zero points.
    onnx_token, onnx_ple = 1000 * (64 + 2 * 4 + 2), 900 * (16 + 4) + 900 // 2
    et_token, et_ple = 1000 * (64 + 4), 900 * (16 + 4 * 4)
    cases = {
        "onnx": ({"onnx/embed_tokens.onnx": onnx_token + onnx_ple + 100, "onnx/decoder_model_merged.onnx": 50_000},
                 onnx_token, onnx_ple, 50_100 + 74 + 20),
        "executorch": ({"executorch/model.pte": et_token + 40_000, "executorch/ple.ptd": et_ple},
                       et_token, et_ple, 40_000 + et_token // 1000 + et_ple // 900),
    }
    for artifact, (files, token_table, ple_table, per_step) in cases.items():
        traffic = bytes_per_decode_step(manifest, artifact, files)
        assert traffic["token_embedding_table"] == token_table, artifact
        assert traffic["ple_table"] == ple_table, artifact
        assert traffic["per_step"] == per_step, artifact


def test_read_bandwidth_is_positive():
    assert measure_read_bandwidth(threads=1, array_bytes=32 * 2**20, repeats=2) > 0


def test_file_sizes_include_external_data(tmp_path):
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "decoder.onnx").write_bytes(b"g" * 10)
    (tmp_path / "onnx" / "decoder.onnx.data").write_bytes(b"w" * 1000)
    (tmp_path / "onnx" / "embed.onnx").write_bytes(b"g" * 7)

    sizes = _file_sizes(tmp_path, ("onnx/decoder.onnx", "onnx/embed.onnx"))

    assert sizes == {"onnx/decoder.onnx": 10, "onnx/decoder.onnx.data": 1000, "onnx/embed.onnx": 7}
