"""`g3n-export generate DIR --prompt TEXT`: stream text from an export folder."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from g3n_export.cli._common import err_console
from g3n_export.cli.main import app
from g3n_export.errors import G3nError
from g3n_export.manifest import read_manifest
from g3n_export.runtime.stream import RUNTIMES, TextStreamer, greedy_stream

CHAT_TURN = "<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n"


@app.command("generate")
def generate_command(
    folder: Annotated[Path, typer.Argument(help="Export folder written by g3n-export.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")],
    runtime: Annotated[Optional[str], typer.Option("--runtime", "-r", help="executorch or onnxruntime (ORT-format files when present). Default: executorch when the folder has it, else onnxruntime.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Maximum tokens to generate.")] = 64,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in Gemma's chat turn format.")] = False,
) -> None:
    """Generate text greedily from an export folder, streaming it to stdout."""
    from tokenizers import Tokenizer

    manifest = read_manifest(folder)
    if runtime is None:
        runtime = "executorch" if "executorch" in manifest.get("artifacts", {}) else "onnxruntime"
    if runtime not in RUNTIMES:
        raise G3nError(f"unknown --runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    part = "executorch" if runtime == "executorch" else "onnx"
    if part not in manifest.get("artifacts", {}):
        have = ", ".join(manifest.get("artifacts", {})) or "none"
        raise G3nError(f"{folder} has no {part} artifact (it has: {have}); choose another --runtime")
    if max_new_tokens < 1:
        raise G3nError(f"invalid --max-new-tokens {max_new_tokens}; use at least 1")

    tokenizer = Tokenizer.from_file(str(folder / part / "tokenizer.json"))
    model = manifest["model"]
    text = CHAT_TURN.format(prompt=prompt) if chat else prompt
    ids = [model["bos_token_id"], *tokenizer.encode(text, add_special_tokens=False).ids]
    room = model["max_seq_len"] - len(ids)
    if room < 1:
        raise G3nError(f"the prompt has {len(ids)} tokens, which fills the export's max_seq_len {model['max_seq_len']}")

    streamer = TextStreamer(tokenizer)
    started = time.perf_counter()
    count = 0
    for token in greedy_stream(folder, runtime, ids, min(max_new_tokens, room), set(model["eos_token_ids"])):
        count += 1
        sys.stdout.write(streamer.push(token))
        sys.stdout.flush()
    sys.stdout.write(streamer.flush() + "\n")
    seconds = time.perf_counter() - started
    err_console.print(f"{count} tokens in {seconds:.2f} s ({count / seconds:.1f} tokens/s, {runtime})", highlight=False)
