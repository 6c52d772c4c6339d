"""Greedy generation over the two ONNX graphs (`embed_tokens`, `decoder_model_merged`) with ONNX Runtime.

The loop follows the export folder contract: `embed_tokens` maps token ids to `inputs_embeds` and `per_layer_inputs`;
the decoder takes them with an all-ones `attention_mask`, `position_ids` `P .. P+T-1` and the past keys/values of the
KV-owning layers, and returns logits and the presents. The first call passes empty pasts (P = 0). Each call feeds the
previous presents back unchanged because the graph applies the sliding window itself.

Shape notation: B batch, T new tokens, P past tokens, H_kv key/value heads, D head_dim.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EMBED_GRAPH = "embed_tokens"
DECODER_GRAPH = "decoder_model_merged"

_PAST_KEY = re.compile(r"^past_key_values\.(\d+)\.key$")


def past_names(kv_layers: Iterable[int]) -> list[str]:
    """Return the decoder's past inputs in feed order: `past_key_values.{i}.key`, `.value` for each KV-owning layer."""
    return [f"past_key_values.{i}.{part}" for i in kv_layers for part in ("key", "value")]


def present_names(kv_layers: Iterable[int]) -> list[str]:
    """Return the decoder's present outputs in order: `present.{i}.key`, `.value` for each KV-owning layer."""
    return [f"present.{i}.{part}" for i in kv_layers for part in ("key", "value")]


def decoder_input_names(kv_layers: Iterable[int]) -> list[str]:
    return ["inputs_embeds", "per_layer_inputs", "attention_mask", "position_ids", *past_names(kv_layers)]


def decoder_output_names(kv_layers: Iterable[int]) -> list[str]:
    return ["logits", *present_names(kv_layers)]


def build_decoder_feed(
    inputs_embeds: np.ndarray,
    per_layer_inputs: np.ndarray,
    past: dict[str, np.ndarray] | None,
    kv_layers: Sequence[int],
    num_kv_heads: int,
    head_dim: int,
) -> dict[str, np.ndarray]:
    """Build the complete decoder input feed for one call, as the Android app's loop builds it.

    Args:
        inputs_embeds: float32 `[B, T, hidden_size]` from `embed_tokens`.
        per_layer_inputs: float32 `[B, T, num_hidden_layers, hidden_size_per_layer_input]` from `embed_tokens`.
        past: the previous call's presents keyed by their input names (`past_key_values.{i}.key` ...), or None for
            the first call, which then gets float32 `[B, H_kv, 0, D]` tensors.
        kv_layers: the KV-owning layers, in order.
        num_kv_heads, head_dim: the key/value widths.

    Returns:
        `inputs_embeds`, `per_layer_inputs`, int64 `attention_mask` `[B, P + T]` of ones, int64 `position_ids`
        `[B, T]` = `P .. P+T-1`, and every past tensor.

    Raises:
        ValueError: a past tensor is missing, or the past tensors disagree on P.
    """
    batch, new_tokens = inputs_embeds.shape[:2]
    names = past_names(kv_layers)
    if past is None:
        empty = np.zeros((batch, num_kv_heads, 0, head_dim), dtype=np.float32)
        past = {name: empty for name in names}
    missing = [name for name in names if name not in past]
    if missing:
        raise ValueError(f"past is missing {missing[:4]}; pass the presents of the previous call or None")
    past_lengths = {past[name].shape[2] for name in names}
    if len(past_lengths) != 1:
        raise ValueError(f"past tensors disagree on the past length: {sorted(past_lengths)}")
    past_length = past_lengths.pop()

    feed = {
        "inputs_embeds": np.ascontiguousarray(inputs_embeds, dtype=np.float32),
        "per_layer_inputs": np.ascontiguousarray(per_layer_inputs, dtype=np.float32),
        "attention_mask": np.ones((batch, past_length + new_tokens), dtype=np.int64),
        "position_ids": np.tile(np.arange(past_length, past_length + new_tokens, dtype=np.int64), (batch, 1)),
    }
    for name in names:
        feed[name] = past[name]
    return feed


@dataclass(frozen=True)
class GraphPaths:
    """The two graph files one generator runs."""

    embed: Path
    decoder: Path


def find_graphs(folder: str | os.PathLike, prefer_ort: bool = True) -> GraphPaths:
    """Locate `embed_tokens` and `decoder_model_merged` in an export's `onnx/` folder (or the folder itself).

    With `prefer_ort`, the `.ort` files are used when both exist, else the `.onnx` files.

    Raises:
        FileNotFoundError: neither format has both graphs.
    """
    folder = Path(folder)
    if (folder / "onnx").is_dir():
        folder = folder / "onnx"
    suffixes = (".ort", ".onnx") if prefer_ort else (".onnx",)
    for suffix in suffixes:
        embed, decoder = folder / f"{EMBED_GRAPH}{suffix}", folder / f"{DECODER_GRAPH}{suffix}"
        if embed.is_file() and decoder.is_file():
            return GraphPaths(embed, decoder)
    raise FileNotFoundError(
        f"{folder} has no {EMBED_GRAPH} and {DECODER_GRAPH} graphs ({' or '.join(suffixes)}); "
        "export them with g3n-export --target onnx"
    )


class OnnxGenerator:
    """Greedy generation over the two graphs with ONNX Runtime's CPU execution provider.

    Args:
        graphs: an export folder (or its `onnx/` folder), or explicit `GraphPaths`.
        prefer_ort: load the `.ort` copies when the folder has them.
        threads: intra-op threads per session; None lets ONNX Runtime choose.

    Attributes:
        kv_layers: the KV-owning layers, read from the decoder's input names.
        paths: the graph files in use.
    """

    def __init__(self, graphs: str | os.PathLike | GraphPaths, *, prefer_ort: bool = True, threads: int | None = None):
        import onnxruntime as ort

        self.paths = graphs if isinstance(graphs, GraphPaths) else find_graphs(graphs, prefer_ort)
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        self.embed_session = ort.InferenceSession(str(self.paths.embed), options, providers=providers)
        self.decoder_session = ort.InferenceSession(str(self.paths.decoder), options, providers=providers)

        inputs = {i.name: i for i in self.decoder_session.get_inputs()}
        self.kv_layers = [int(m.group(1)) for name in inputs if (m := _PAST_KEY.match(name))]
        first_past = inputs[past_names(self.kv_layers)[0]] if self.kv_layers else None
        self.num_kv_heads = int(first_past.shape[1]) if first_past else 0
        self.head_dim = int(first_past.shape[3]) if first_past else 0
        self.output_names = decoder_output_names(self.kv_layers)
        unknown = sorted(set(inputs) - set(decoder_input_names(self.kv_layers)))
        if unknown:
            raise ValueError(f"{self.paths.decoder} has inputs outside the decoder contract: {unknown}")

    def embed(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run `embed_tokens` on int64 `tokens` `[B, T]`; returns (`inputs_embeds`, `per_layer_inputs`)."""
        inputs_embeds, per_layer_inputs = self.embed_session.run(
            ["inputs_embeds", "per_layer_inputs"], {"input_ids": np.asarray(tokens, dtype=np.int64)}
        )
        return inputs_embeds, per_layer_inputs

    def logits(
        self, tokens: np.ndarray | Sequence[int], past: dict[str, np.ndarray] | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run both graphs on `tokens` (`[T]` or `[B, T]`) after `past`.

        Returns:
            float32 logits `[B, T, vocab_size]` and the presents keyed by the past input names, ready to be passed as
            `past` of the next call.
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim == 1:
            tokens = tokens[None, :]
        inputs_embeds, per_layer_inputs = self.embed(tokens)
        feed = build_decoder_feed(inputs_embeds, per_layer_inputs, past, self.kv_layers, self.num_kv_heads, self.head_dim)
        outputs = self.decoder_session.run(self.output_names, feed)
        present = dict(zip(past_names(self.kv_layers), outputs[1:]))
        return outputs[0], present

    def prefill(self, prompt_ids: Sequence[int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run the whole prompt in one call; returns the last position's logits `[vocab_size]` and the presents."""
        if len(prompt_ids) == 0:
            raise ValueError("prompt_ids is empty; pass at least the BOS token")
        logits, present = self.logits(prompt_ids)
        return logits[0, -1], present

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, eos_ids: Iterable[int] = ()) -> list[int]:
        """Greedy-decode up to `max_new_tokens` tokens after `prompt_ids` (which should start with BOS).

        Stops after the first token in `eos_ids` (it is included in the result).
        """
        eos = set(eos_ids)
        generated: list[int] = []
        if max_new_tokens <= 0:
            return generated
        last_logits, past = self.prefill(prompt_ids)
        while True:
            token = int(np.argmax(last_logits))
            generated.append(token)
            if token in eos or len(generated) >= max_new_tokens:
                return generated
            logits, past = self.logits([token], past)
            last_logits = logits[0, -1]
