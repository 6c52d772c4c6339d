"""Read and write Gemma 3n checkpoints in the Hugging Face safetensors layout.

Reading is lazy: headers are parsed up front, tensors are memory-mapped one at a time on request, so a 16 GB
checkpoint never has to fit in memory. Writing is streamed tensor by tensor into a temporary folder that is renamed
into place at the end, so a failure never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from g3n_export.config import TextConfig, text_config_dict
from g3n_export.errors import CheckpointError, ConfigError, OutputError
from g3n_export.layout import TEXT_PREFIX, text_shapes

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files that are rewritten, never copied, when a checkpoint is written.
_MODEL_FILES = re.compile(r"^(config\.json|model\.safetensors\.index\.json|.*\.safetensors)$")
_HUB_FILES = ["config.json", "*.safetensors", INDEX_FILE, "tokenizer*", "special_tokens_map.json",
              "generation_config.json", "chat_template*", "preprocessor_config.json", "processor_config.json"]

DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """File, dtype and shape of a stored tensor, read from a safetensors header."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header and check that its data is complete.

    Raises:
        CheckpointError: the file is not safetensors, is corrupt, or is shorter than its header declares.
    """
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file is shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(size - 8, 100 * 1024 * 1024):
                raise ValueError(f"header length {header_len} is larger than the file")
            header = json.loads(f.read(header_len))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{path} is not a valid safetensors file ({e}); re-download or re-create the checkpoint"
        ) from None

    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, stop = entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: header entry for {name!r} is malformed; re-create the checkpoint") from None
        info = TensorInfo(name, path, dtype, shape)
        if stop - begin != info.nbytes:
            raise CheckpointError(
                f"{path}: tensor {name!r} takes {stop - begin} bytes but shape {list(shape)} of {entry['dtype']} "
                f"needs {info.nbytes}; the file is corrupt"
            )
        end = max(end, stop)
        tensors[name] = info
    if data_start + end > size:
        raise CheckpointError(
            f"{path} is truncated: its header describes {data_start + end:,} bytes but the file has {size:,}; "
            "re-download or re-create it"
        )
    return tensors


class Checkpoint:
    """A Gemma 3n checkpoint folder: parsed config, tensor index and lazy tensor access.

    Text decoder tensors are addressed by names relative to the text prefix (for example
    `layers.0.mlp.gate_proj.weight`) through `text_tensor`; every tensor by its full stored name through `tensor`.
    """

    def __init__(self, path: Path, *, check_shapes: bool = True) -> None:
        self.path = path
        config_path = path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{path} has no config.json; pass a Hugging Face Gemma 3n checkpoint folder")
        try:
            self.config_dict: dict = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path} is not valid JSON ({e})") from None
        self.text_config = TextConfig.from_hf_dict(self.config_dict)
        self.is_multimodal = self.config_dict.get("model_type") == "gemma3n"

        self.tensors: dict[str, TensorInfo] = {}
        for file in self._weight_files():
            for name, info in read_safetensors_header(file).items():
                if name in self.tensors:
                    raise CheckpointError(f"tensor {name!r} is stored twice ({self.tensors[name].file.name} and {file.name})")
                self.tensors[name] = info
        self.text_prefix = self._find_text_prefix()
        self._handles: dict[Path, object] = {}
        if check_shapes:
            self.check_text_shapes()

    # Index ----------------------------------------------------------------------------------------------------

    def _weight_files(self) -> list[Path]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index} is not a valid safetensors index (no 'weight_map')") from None
            files = sorted({self.path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shard files that are missing: {', '.join(missing[:5])}")
            return files
        single = self.path / SINGLE_FILE
        if single.is_file():
            return [single]
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"{self.path} has no weights: expected {SINGLE_FILE} or {INDEX_FILE} with its shards"
            )
        return files

    def _find_text_prefix(self) -> str:
        for prefix in (TEXT_PREFIX, "model.", ""):
            if prefix + "embed_tokens.weight" in self.tensors:
                return prefix
        raise CheckpointError(
            f"{self.path}: no text embedding found (looked for '{TEXT_PREFIX}embed_tokens.weight'); "
            "this does not look like a Gemma 3n checkpoint"
        )

    def text_names(self) -> list[str]:
        """Names of the stored text decoder tensors, relative to the text prefix."""
        p = self.text_prefix
        return [n[len(p):] for n in self.tensors if n.startswith(p) and not _is_tower(n)]

    def other_names(self) -> list[str]:
        """Full names of stored tensors outside the text decoder (towers, embedders, an untied lm_head)."""
        p = self.text_prefix
        return [n for n in self.tensors if not n.startswith(p) or _is_tower(n)]

    def check_text_shapes(self) -> None:
        """Check that every text tensor the config implies is stored with the right shape.

        Raises:
            CheckpointError: a tensor is missing or has the wrong shape.
        """
        stored = set(self.text_names())
        for name, shape in text_shapes(self.text_config).items():
            if name not in stored:
                # KV-shared layers' unused k/v tensors may have been dropped by a slicer.
                if _optional(name, self.text_config):
                    continue
                raise CheckpointError(
                    f"{self.path}: tensor {self.text_prefix + name!r} is missing, but config.json implies it "
                    f"(shape {list(shape)}); the checkpoint is incomplete or does not match its config"
                )
            info = self.tensors[self.text_prefix + name]
            if info.shape != shape:
                raise CheckpointError(
                    f"{info.file.name}: tensor {info.name!r} has shape {list(info.shape)}, but config.json implies "
                    f"{list(shape)}; the weights do not match the config"
                )

    # Access ---------------------------------------------------------------------------------------------------

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def tensor(self, name: str) -> torch.Tensor:
        """Load one tensor by full name (memory-mapped from its shard)."""
        info = self.info(name)
        handle = self._handles.get(info.file)
        if handle is None:
            try:
                handle = safe_open(str(info.file), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt files
                raise CheckpointError(f"cannot open {info.file}: {e}") from None
            self._handles[info.file] = handle
        return handle.get_tensor(name)

    def text_tensor(self, name: str) -> torch.Tensor:
        """Load one text decoder tensor by its name relative to the text prefix."""
        return self.tensor(self.text_prefix + name)

    def text_tensor_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Load rows `start:stop` (along the first dimension) of one text decoder tensor, in its stored dtype.

        Unlike `tensor`, this opens the shard for this read only. Pages read through a long-lived memory map stay
        resident and count towards RSS until the map is closed, so a pass over every tensor through `tensor` would
        end with the whole checkpoint in RSS.
        """
        info = self.info(self.text_prefix + name)
        with safe_open(str(info.file), framework="pt") as f:
            return f.get_slice(info.name)[start:stop]

    def text_state_dict(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (relative name, tensor) for every text decoder tensor, one at a time."""
        for name in self.text_names():
            t = self.text_tensor(name)
            yield name, (t.to(dtype) if dtype is not None else t)

    def extra_files(self) -> list[Path]:
        """Tokenizer, generation config and other non-weight files to carry into a derived checkpoint."""
        return sorted(p for p in self.path.iterdir() if p.is_file() and not _MODEL_FILES.match(p.name))

    @property
    def nbytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in {i.file for i in self.tensors.values()})


def _is_tower(name: str) -> bool:
    return name.startswith(("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio."))


def _optional(name: str, config: TextConfig) -> bool:
    from g3n_export.layout import is_unused_kv_name, layer_index

    layer = layer_index(name)
    return layer is not None and config.is_kv_shared(layer) and is_unused_kv_name(name)


# Opening ----------------------------------------------------------------------------------------------------------

def resolve_model_path(source: str | os.PathLike) -> Path:
    """Return a local folder for a checkpoint given as a folder path or a Hugging Face Hub id.

    Raises:
        CheckpointError: the folder does not exist, or the Hub download failed (offline, gated, not found).
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the checkpoint folder that holds config.json")
        return path
    text = str(source)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) or text.startswith((".", "/", "~")):
        raise CheckpointError(f"model folder {text!r} not found; pass an existing folder or a Hub id like google/gemma-3n-E4B-it")
    return _download(text)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except GatedRepoError:
        raise CheckpointError(
            f"{repo_id} is gated on the Hugging Face Hub: accept its license on the model page, then log in with "
            "`hf auth login` or set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id} was not found on the Hugging Face Hub (check the id, or log in for a private repo)") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"cannot download {repo_id}: the Hugging Face Hub is not reachable (offline) and the model is not in the "
            "local cache; download it where there is internet (`hf download " + repo_id + " --local-dir DIR`) and pass "
            "--model DIR"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"cannot download {repo_id} from the Hugging Face Hub: {e}; pass a local folder with --model") from None


def open_checkpoint(source: str | os.PathLike, *, check_shapes: bool = True) -> Checkpoint:
    """Open a Gemma 3n checkpoint from a local folder or a Hub id, reading only headers.

    Raises:
        CheckpointError / ConfigError: the source is missing, unreadable, or not a consistent Gemma 3n checkpoint.
    """
    path = resolve_model_path(source)
    try:
        return Checkpoint(path, check_shapes=check_shapes)
    except ConfigError as e:
        raise ConfigError(f"{path / 'config.json'}: {e}") from None


# Writing ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its full name, dtype and shape. The data comes from a producer callback."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


# A producer returns the tensor for a spec, or an iterable of chunks along dim 0 (to bound memory for huge tables).
Producer = Callable[[TensorSpec], "torch.Tensor | Iterable[torch.Tensor]"]


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Group tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return [s for s in shards if s]


def _write_safetensors(path: Path, specs: list[TensorSpec], produce: Producer, on_bytes: Callable[[int], None]) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for spec in specs:
            out = produce(spec)
            chunks = [out] if isinstance(out, torch.Tensor) else out
            written = 0
            for chunk in chunks:
                if chunk.dtype != spec.dtype:
                    raise RuntimeError(f"producer returned {chunk.dtype} for {spec.name}, expected {spec.dtype}")
                data = chunk.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
                f.write(memoryview(data))
                written += data.nbytes
                on_bytes(data.nbytes)
            if written != spec.nbytes:
                raise RuntimeError(f"producer wrote {written} bytes for {spec.name} {list(spec.shape)}, expected {spec.nbytes}")


def write_checkpoint(
    out: Path,
    config: dict,
    specs: list[TensorSpec],
    produce: Producer,
    *,
    extra_files: Iterable[Path] = (),
    max_shard_bytes: int = 4 * 1024**3,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write a sharded safetensors checkpoint with its index, config and extra files, atomically.

    Tensors are produced and written one at a time, so peak memory is one tensor (or one chunk) plus buffers.

    Raises:
        OutputError: `out` exists and `force` is false, or its parent cannot be written.
    """
    out = Path(out)
    with atomic_output_dir(out, force=force) as tmp:
        check_free_space(tmp, sum(s.nbytes for s in specs))
        shards = plan_shards(specs, max_shard_bytes)
        weight_map: dict[str, str] = {}
        on_bytes = progress or (lambda n: None)
        for k, shard in enumerate(shards):
            name = SINGLE_FILE if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(tmp / name, shard, produce, on_bytes)
            weight_map.update({spec.name: name for spec in shard})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for f in extra_files:
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
    return out


def check_free_space(folder: Path, needed: int) -> None:
    """Raise OutputError when `folder`'s file system has less than `needed` bytes (plus 1% slack) free."""
    free = shutil.disk_usage(folder).free
    if free < needed * 1.01:
        raise OutputError(
            f"not enough disk space in {folder.parent}: {needed / 1024**3:.2f} GiB needed, {free / 1024**3:.2f} GiB "
            "free; free some space or choose another --out"
        )


class atomic_output_dir:
    """Context manager that yields a temporary folder and renames it to `out` only when the block succeeds."""

    def __init__(self, out: Path, *, force: bool = False) -> None:
        self.out = Path(out)
        self.force = force

    def __enter__(self) -> Path:
        if self.out.exists() and not self.force:
            raise OutputError(f"{self.out} already exists; choose another --out or pass --force to replace it")
        parent = self.out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.tmp = parent / f".{self.out.name}.partial-{os.getpid()}"
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
        except OSError as e:
            raise OutputError(f"cannot create output folder under {parent}: {e.strerror}") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
