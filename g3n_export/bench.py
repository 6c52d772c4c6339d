"""Speed and memory benchmarks of an export folder's artifacts, each measured in a fresh subprocess.

`run_benchmarks` starts one worker process per artifact (`python -m g3n_export.bench --worker ...`), so the resident
memory it reports belongs to that runtime alone and not to the torch/transformers modules of the calling process.
A worker records:

* the resident memory of the bare interpreter, and after importing the runtime (the baseline),
* the load time and the peak/steady resident memory of loading,
* one untimed-for-speed first call, then a timed prefill of `prompt_len` random ids and `gen_len` timed decode steps,
* VmRSS, VmHWM (peak), RssAnon and RssFile from `/proc/self/status`, and the resident bytes of each artifact file's
  memory mappings from `/proc/self/smaps` (zero when the runtime read the file into its own buffers instead).

Artifacts: `executorch` (model.pte + ple.ptd through ExecuTorch's Python bindings), `onnx` (the `.onnx` graphs
through ONNX Runtime), `ort` (the ORT-format copies), and `executorch-cpp` (the same program through ExecuTorch's
C++ `Module` with memory-mapped loading, run by the `et_runner` binary built from `benchmarks/et_runner`).

Beside the measurements, `roofline` estimates the decode speed that memory bandwidth alone would allow: the bytes of
weights one decode step reads, divided by the measured read bandwidth of this machine.

Linux only: the memory figures come from `/proc`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from g3n_export.errors import G3nError

# Artifact name -> (runtime, files that must exist, relative to the export folder).
ARTIFACTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "executorch": ("executorch", ("executorch/model.pte", "executorch/ple.ptd")),
    "executorch-cpp": ("executorch", ("executorch/model.pte", "executorch/ple.ptd")),
    "onnx": ("onnxruntime", ("onnx/embed_tokens.onnx", "onnx/decoder_model_merged.onnx")),
    "ort": ("onnxruntime", ("onnx/embed_tokens.ort", "onnx/decoder_model_merged.ort")),
}
RUNTIME_CHOICES = ("executorch", "onnxruntime")
# Keys of /proc/self/status reported by the workers, all in kB there and in bytes here.
_STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


class BenchError(G3nError):
    """A benchmark that could not run: invalid arguments, missing artifacts, or a worker that failed."""


# /proc readers ------------------------------------------------------------------------------------------------------


def read_status() -> dict[str, int]:
    """Return VmRSS, VmHWM, RssAnon and RssFile of this process in bytes (from `/proc/self/status`)."""
    values: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in _STATUS_KEYS:
                values[key] = int(rest.split()[0]) * 1024
    return values


def reset_peak_rss() -> None:
    """Reset this process's VmHWM to its current VmRSS, so the next VmHWM is the peak of what follows (Linux 4.0+)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def mapping_rss(paths: list[Path]) -> dict[str, int]:
    """Return the resident bytes of this process's memory mappings of each file, keyed by file name.

    A file that the runtime read into its own buffers instead of mapping it has no mapping and reports 0.
    """
    wanted = {str(p.resolve()): p.name for p in paths}
    totals = dict.fromkeys(wanted.values(), 0)
    current = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=5)
            # Mapping headers start with an address range ("7f..-7f.."); field lines with a name ending in ":".
            if head and "-" in head[0] and not head[0].endswith(":"):
                current = wanted.get(head[5].strip()) if len(head) == 6 else None
            elif current is not None and head and head[0] == "Rss:":
                totals[current] += int(head[1]) * 1024
    return totals


# Worker: one artifact in one process --------------------------------------------------------------------------------


def _random_ids(count: int, vocab: int, seed: int) -> list[int]:
    import random

    generator = random.Random(seed)
    return [generator.randrange(vocab) for _ in range(count)]


class _ExecuTorchStepper:
    """forward(tokens, input_pos) -> last logits row, over ExecuTorch's Python bindings."""

    def __init__(self, folder: Path, threads: int | None) -> None:
        from executorch.extension.pybindings import portable_lib

        from g3n_export.runtime.executorch import ExecuTorchRunner

        if threads:
            portable_lib._unsafe_reset_threadpool(threads)
        self.runner = ExecuTorchRunner(folder / "executorch" / "model.pte", folder / "executorch" / "ple.ptd")

    def __call__(self, ids: list[int], position: int) -> int:
        import torch

        logits = self.runner.prefill(torch.tensor([ids], dtype=torch.int64), position)
        return int(logits[0, -1].argmax())


class _OnnxStepper:
    """The same call over the two ONNX Runtime sessions, keeping the presents between calls."""

    def __init__(self, folder: Path, threads: int | None, prefer_ort: bool) -> None:
        from g3n_export.runtime.onnx import OnnxGenerator

        self.generator = OnnxGenerator(folder / "onnx", prefer_ort=prefer_ort, threads=threads)
        self.past = None

    def __call__(self, ids: list[int], position: int) -> int:
        import numpy as np

        if position == 0:
            self.past = None
        logits, self.past = self.generator.logits(np.asarray([ids], dtype=np.int64), self.past)
        return int(np.argmax(logits[0, -1]))


def _import_runtime(runtime: str) -> None:
    # Imports the modules a runtime needs, so that their resident memory lands in the baseline and not in "load".
    if runtime == "executorch":
        import executorch.kernels.quantized  # noqa: F401
        import torch  # noqa: F401
        from executorch.extension.pybindings import portable_lib  # noqa: F401
    else:
        import numpy  # noqa: F401
        import onnxruntime  # noqa: F401


def _file_sizes(folder: Path, files: tuple[str, ...] | list[str]) -> dict[str, int]:
    # An ONNX graph's weights live in `<graph>.onnx.data` beside it, which the roofline must count.
    sizes = {}
    for name in files:
        for candidate in (name, name + ".data"):
            if (folder / candidate).is_file():
                sizes[candidate] = (folder / candidate).stat().st_size
    return sizes


def measure_artifact(artifact: str, folder: Path, prompt_len: int, gen_len: int, threads: int | None,
                     seed: int) -> dict[str, Any]:
    """Measure one artifact in this process (meant to run in a fresh worker process). Returns the result record."""
    runtime, files = ARTIFACTS[artifact]
    manifest = json.loads((folder / "manifest.json").read_text())
    vocab = int(manifest["model"]["vocab_size_per_layer_input"])
    paths = [folder / f for f in files]
    interpreter = read_status()

    _import_runtime(runtime)
    baseline = read_status()
    reset_peak_rss()

    started = time.perf_counter()
    if runtime == "executorch":
        step = _ExecuTorchStepper(folder, threads)
    else:
        step = _OnnxStepper(folder, threads, prefer_ort=artifact == "ort")
    load_s = time.perf_counter() - started
    after_load = read_status()
    reset_peak_rss()

    prompt = _random_ids(prompt_len, vocab, seed)
    decode_inputs = _random_ids(gen_len, vocab, seed + 1)

    # The first call pays one-time costs (allocations, first touch of the weights), so it is timed apart.
    started = time.perf_counter()
    step(prompt, 0)
    first_call_s = time.perf_counter() - started
    started = time.perf_counter()
    step(prompt, 0)
    prefill_s = time.perf_counter() - started

    # Decode feeds random ids rather than the argmax, so each step reads a new PLE row as a long generation would.
    # The argmax is still computed, so the work per step is that of greedy decoding.
    started = time.perf_counter()
    for offset, token in enumerate(decode_inputs):
        step([token], prompt_len + offset)
    decode_s = time.perf_counter() - started
    steady = read_status()

    return {
        "artifact": artifact,
        "runtime": runtime,
        "files": _file_sizes(folder, files),
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "threads": threads,
        "load_s": load_s,
        "first_call_s": first_call_s,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "prefill_tokens_per_s": prompt_len / prefill_s,
        "decode_tokens_per_s": gen_len / decode_s if gen_len else None,
        "rss": {
            "interpreter": interpreter["VmRSS"],
            "baseline": baseline["VmRSS"],
            "after_load": after_load["VmRSS"],
            "peak_load": after_load["VmHWM"],
            "peak_run": steady["VmHWM"],
            "peak": max(after_load["VmHWM"], steady["VmHWM"]),
            "steady": steady["VmRSS"],
            "steady_anon": steady["RssAnon"],
            "steady_file": steady["RssFile"],
        },
        "file_mapping_rss": mapping_rss(paths),
    }


def _worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m g3n_export.bench")
    parser.add_argument("--worker", required=True, choices=[a for a in ARTIFACTS if a != "executorch-cpp"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--prompt-len", type=int, required=True)
    parser.add_argument("--gen-len", type=int, required=True)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = measure_artifact(args.worker, args.folder, args.prompt_len, args.gen_len, args.threads or None, args.seed)
    # The parent reads the last stdout line; runtimes may print their own lines before it.
    print(json.dumps(result), flush=True)


# C++ runner ---------------------------------------------------------------------------------------------------------


def measure_et_runner(runner: Path, folder: Path, prompt_len: int, gen_len: int, threads: int | None, seed: int,
                      load_mode: str = "mmap") -> dict[str, Any]:
    """Measure the ExecuTorch program through the C++ `et_runner` binary and return a record like `measure_artifact`.

    Raises:
        BenchError: the binary is missing or failed.
    """
    if not runner.is_file() or not os.access(runner, os.X_OK):
        raise BenchError(
            f"C++ runner {runner} not found or not executable; build it with benchmarks/build_et_runner.sh"
        )
    manifest = json.loads((folder / "manifest.json").read_text())
    pte, ptd = folder / "executorch" / "model.pte", folder / "executorch" / "ple.ptd"
    command = [
        str(runner), "--pte", str(pte), "--ptd", str(ptd), "--load-mode", load_mode,
        "--prompt-len", str(prompt_len), "--gen-len", str(gen_len), "--threads", str(threads or 0),
        "--seed", str(seed), "--vocab", str(manifest["model"]["vocab_size_per_layer_input"]),
    ]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise BenchError(f"{runner.name} failed (exit code {completed.returncode}): {completed.stderr.strip()[-800:]}")
    raw = json.loads(completed.stdout)
    return {
        "artifact": "executorch-cpp",
        "runtime": f"executorch C++ Module, LoadMode {load_mode}",
        "files": _file_sizes(folder, ARTIFACTS["executorch-cpp"][1]),
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "threads": threads,
        "load_s": raw["load_s"],
        "first_call_s": raw["first_call_s"],
        "prefill_s": raw["prefill_s"],
        "decode_s": raw["decode_s"],
        "prefill_tokens_per_s": prompt_len / raw["prefill_s"],
        "decode_tokens_per_s": gen_len / raw["decode_s"] if gen_len else None,
        "rss": {
            "interpreter": None,
            "baseline": raw["start"]["vm_rss"],
            "after_load": raw["after_load"]["vm_rss"],
            "peak_load": raw["after_load"]["vm_hwm"],
            "peak_run": raw["steady"]["vm_hwm"],
            "peak": max(raw["after_load"]["vm_hwm"], raw["steady"]["vm_hwm"]),
            "steady": raw["steady"]["vm_rss"],
            "steady_anon": raw["steady"]["rss_anon"],
            "steady_file": raw["steady"]["rss_file"],
        },
        "file_mapping_rss": {"model.pte": raw["pte_rss_steady"], "ple.ptd": raw["ptd_rss_steady"]},
        "ptd_rss_samples": raw["samples"],
    }


# Roofline -----------------------------------------------------------------------------------------------------------


def measure_read_bandwidth(threads: int, array_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Measure memory read bandwidth in bytes/s: the best of `repeats` sums of a large array, split over threads.

    NumPy releases the GIL inside large reductions, so `threads` Python threads read their slices in parallel. The
    array is much larger than the last-level cache, so the sums stream from DRAM.
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    data = np.ones(array_bytes // 8, dtype=np.float64)
    slices = np.array_split(data, max(1, threads))
    best = float("inf")
    with ThreadPoolExecutor(max_workers=len(slices)) as pool:
        for _ in range(repeats):
            started = time.perf_counter()
            list(pool.map(np.sum, slices))
            best = min(best, time.perf_counter() - started)
    return data.nbytes / best


def _table_bytes(rows: int, width: int, kind: str, group: int, zero_points: bool = False) -> int:
    # Values plus one float32 scale (and, for asymmetric tables, one zero point of the value width) per group.
    if kind == "fp32":
        return rows * width * 4
    bits = {"int8": 8, "int4": 4}[kind]
    groups = rows * (width // group)
    return rows * width * bits // 8 + groups * 4 + (groups * bits // 8 if zero_points else 0)


def bytes_per_decode_step(manifest: dict[str, Any], artifact: str, file_bytes: dict[str, int]) -> dict[str, int]:
    """Estimate the bytes of weights one decode step reads for an artifact.

    All bytes of the artifact's model files, minus the two gathered tables (token embedding and PLE table), plus
    the one row of each that the step gathers. The table sizes are computed from the manifest's dimensions and
    quantization: ExecuTorch tables have float32 scales per row (token embedding) or per row and layer (PLE table);
    ONNX `GatherBlockQuantized` tables have a float32 scale and a zero point per block. The estimate is therefore off
    by the files' non-weight content (graph, metadata) and ignores the KV cache and activations.
    """
    model = manifest["model"]
    recipe = manifest.get("target_recipe", {})
    hidden = int(model["hidden_size"])
    ple_width = int(model["num_hidden_layers"]) * int(model["hidden_size_per_layer_input"])
    if artifact.startswith("executorch"):
        spec = recipe.get("executorch", {})
        embedding_kind, ple_kind = spec.get("embedding", "fp32"), spec.get("ple", "fp32")
        # int4 token embeddings are grouped like the linears; int8 ones have one scale per row.
        embedding_group = int(spec.get("group_size", 32)) if embedding_kind == "int4" else hidden
        ple_group, zero_points = int(model["hidden_size_per_layer_input"]), False
    else:
        spec = recipe.get("onnx", {})
        embedding_kind, ple_kind = spec.get("embedding", "fp32"), spec.get("ple", "fp32")
        embedding_group = ple_group = int(spec.get("block_size", 32))
        zero_points = True
    token_table = _table_bytes(int(model["vocab_size"]), hidden, embedding_kind, embedding_group, zero_points)
    ple_table = _table_bytes(int(model["vocab_size_per_layer_input"]), ple_width, ple_kind, ple_group, zero_points)
    rows = (_table_bytes(1, hidden, embedding_kind, embedding_group, zero_points)
            + _table_bytes(1, ple_width, ple_kind, ple_group, zero_points))
    files = sum(size for name, size in file_bytes.items() if not name.endswith(".txt"))
    return {
        "file_bytes": files,
        "token_embedding_table": token_table,
        "ple_table": ple_table,
        "per_step": max(0, files - token_table - ple_table) + rows,
    }


# Orchestration ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSettings:
    """Workload of every artifact: prompt and decode lengths, threads per runtime (None: the runtime's default)."""

    prompt_len: int = 64
    gen_len: int = 64
    threads: int | None = None
    seed: int = 0


def select_artifacts(folder: Path, manifest: dict[str, Any], runtime: str | None, et_runner: Path | None) -> list[str]:
    """Return the artifacts of `folder` to measure, in order: all present ones, or those of `runtime`.

    Raises:
        BenchError: unknown runtime, or the folder has no artifact for it.
    """
    if runtime is not None and runtime not in RUNTIME_CHOICES:
        raise BenchError(f"unknown --runtime {runtime!r}; choose one of {', '.join(RUNTIME_CHOICES)}")
    chosen = []
    for name, (artifact_runtime, files) in ARTIFACTS.items():
        if runtime is not None and artifact_runtime != runtime:
            continue
        if name == "executorch-cpp" and et_runner is None:
            continue
        if all((folder / f).is_file() for f in files):
            chosen.append(name)
    if not chosen:
        have = ", ".join(manifest.get("artifacts", {})) or "none"
        missing = f"no {runtime} artifact" if runtime else "no artifact files"
        raise BenchError(f"{folder} has {missing} (its manifest lists: {have}); export them or choose another --runtime")
    return chosen


def run_worker(artifact: str, folder: Path, settings: BenchSettings, timeout_s: float | None = None) -> dict[str, Any]:
    """Measure one artifact in a fresh Python process and return its record.

    Raises:
        BenchError: the worker failed or printed no result.
    """
    command = [
        sys.executable, "-m", "g3n_export.bench", "--worker", artifact, str(folder),
        "--prompt-len", str(settings.prompt_len), "--gen-len", str(settings.gen_len),
        "--threads", str(settings.threads or 0), "--seed", str(settings.seed),
    ]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise BenchError(f"benchmark of {artifact} timed out after {timeout_s:.0f} s") from None
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        raise BenchError(
            f"benchmark of {artifact} failed (exit code {completed.returncode}): {completed.stderr.strip()[-800:]}"
        )
    return json.loads(lines[-1])


def run_benchmarks(
    folder: Path,
    settings: BenchSettings,
    *,
    runtime: str | None = None,
    et_runner: Path | None = None,
    bandwidth: bool = True,
    progress=None,
) -> dict[str, Any]:
    """Benchmark every selected artifact of an export folder and return the JSON-ready report.

    Args:
        folder: an export folder (its manifest is read and its files' sha256 verified).
        settings: prompt and decode lengths, threads, seed.
        runtime: only the artifacts of this runtime (`executorch` or `onnxruntime`); None for all.
        et_runner: path of the C++ runner binary; when given, the ExecuTorch program is also measured through it.
        bandwidth: measure the memory read bandwidth and add the roofline estimate per artifact.
        progress: called with each artifact name before it runs.

    Raises:
        ExportFolderError: not an export folder, or its files changed since export.
        BenchError: invalid settings, no artifact to measure, or a measurement failed.
    """
    from g3n_export.manifest import read_manifest

    if settings.prompt_len < 1 or settings.gen_len < 1:
        raise BenchError(
            f"invalid workload: --prompt-len {settings.prompt_len}, --gen-len {settings.gen_len}; both must be >= 1"
        )
    if settings.threads is not None and settings.threads < 1:
        raise BenchError(f"invalid --threads {settings.threads}; use at least 1, or leave it out for the default")
    manifest = read_manifest(folder)
    artifacts = select_artifacts(folder, manifest, runtime, et_runner)
    max_seq_len = int(manifest["model"]["max_seq_len"])
    if settings.prompt_len + settings.gen_len > max_seq_len:
        raise BenchError(
            f"--prompt-len {settings.prompt_len} + --gen-len {settings.gen_len} exceed the export's max_seq_len "
            f"{max_seq_len}; shorten them"
        )

    results = []
    for artifact in artifacts:
        if progress is not None:
            progress(artifact)
        load_before = os.getloadavg()[0]
        if artifact == "executorch-cpp":
            record = measure_et_runner(et_runner, folder, settings.prompt_len, settings.gen_len, settings.threads,
                                       settings.seed)
        else:
            record = run_worker(artifact, folder, settings)
        record["load_average_1min"] = [load_before, os.getloadavg()[0]]
        results.append(record)

    report: dict[str, Any] = {
        "folder": str(folder),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_description(),
        "settings": {"prompt_len": settings.prompt_len, "gen_len": settings.gen_len, "threads": settings.threads,
                     "seed": settings.seed},
        "results": results,
    }
    if bandwidth:
        threads = settings.threads or os.cpu_count() or 1
        read_bandwidth = measure_read_bandwidth(threads)
        report["read_bandwidth_bytes_per_s"] = read_bandwidth
        for record in results:
            traffic = bytes_per_decode_step(manifest, record["artifact"], record["files"])
            record["roofline"] = {**traffic, "decode_tokens_per_s_bound": read_bandwidth / traffic["per_step"]}
    return report


def machine_description() -> dict[str, Any]:
    """Return the CPU model, logical core count and kernel of this machine."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": os.uname().release}


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
