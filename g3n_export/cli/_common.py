"""Options, console and error reporting shared by the commands."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

from g3n_export.bundled import BUNDLED_MODEL

PIPE_WIDTH = 160  # table width when output goes to a file or a pipe


def _console(stderr: bool = False) -> Console:
    # Rich falls back to 80 columns when the output is a file or a pipe, which wraps the wide tables mid-word in logs.
    # COLUMNS still sets the width when given.
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or "COLUMNS" in os.environ else PIPE_WIDTH
    return Console(stderr=stderr, width=width)


# Results go to stdout; logs, progress and errors to stderr, so output can be piped.
console = _console()
err_console = _console(stderr=True)

ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help="Gemma 3n checkpoint: a local Hugging Face folder or a Hub id. "
                 "Defaults to the bundled model."),
]
DEFAULT_MODEL = str(BUNDLED_MODEL)


def setup_logging(verbosity: int) -> None:
    """Configure the root logger once, for the CLI only (library modules never configure logging)."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    # Third-party libraries log freely at INFO (ONNX Runtime's quantizer writes a line per skipped node). So only this
    # package's loggers get the chosen level, and other loggers show warnings and errors unless -v is given.
    logging.basicConfig(
        level=level if verbosity > 0 else logging.WARNING,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False, markup=False)],
        force=True,
    )
    logging.getLogger("g3n_export").setLevel(level)
    # ExecuTorch's partitioners print the whole graph per partition at DEBUG, which slows lowering by many minutes.
    for noisy in ("torch", "onnxscript", "onnx_ir", "httpx", "huggingface_hub", "transformers", "executorch"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # torchao warns at import about GPU kernels that a CPU build never has; torch about its own enum registrations.
    for chatty in ("torchao", "torch.utils._pytree"):
        logging.getLogger(chatty).setLevel(max(level, logging.ERROR))


def debug_enabled() -> bool:
    return os.environ.get("G3N_DEBUG", "") not in ("", "0")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def existing_path(value: str, what: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        from g3n_export.errors import G3nError

        raise G3nError(f"{what} {value!r} not found")
    return path
