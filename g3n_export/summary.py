"""Facts about a checkpoint for `g3n-export inspect`: the layer plan and parameter counts by group."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from g3n_export.checkpoint import Checkpoint
from g3n_export.config import TextConfig
from g3n_export.layout import parameter_group, tower_group

TEXT_GROUPS = ("embed_tokens", "ple_table", "ple_projection", "altup_projections", "attention", "mlp", "laurel",
               "ple_per_layer", "norms_and_altup")
OTHER_GROUPS = ("vision_tower", "audio_tower", "multimodal_embedders", "lm_head", "other")


@dataclass(frozen=True)
class LayerRow:
    index: int
    layer_type: str
    kv: str  # "own" or "reads <producer>"
    ffn_width: int
    sparsity: float


@dataclass(frozen=True)
class CheckpointSummary:
    """Counts taken from the stored tensors (not from the config), so they reflect what is really on disk."""

    config: TextConfig
    layers: list[LayerRow]
    text_params: dict[str, int]
    other_params: dict[str, int]
    bytes_on_disk: int
    dtypes: dict[str, int]

    @property
    def text_total(self) -> int:
        return sum(self.text_params.values())

    @property
    def effective(self) -> int:
        """Text parameters without the token embedding and the PLE table (Hugging Face's "effective" count)."""
        return self.text_total - self.text_params.get("embed_tokens", 0) - self.text_params.get("ple_table", 0)

    @property
    def total(self) -> int:
        return self.text_total + sum(self.other_params.values())


def layer_plan(config: TextConfig) -> list[LayerRow]:
    rows = []
    for i in range(config.num_hidden_layers):
        producer = config.kv_producer[i]
        rows.append(LayerRow(
            index=i,
            layer_type="full" if not config.is_sliding(i) else "sliding",
            kv="own" if producer is None else f"reads {producer}",
            ffn_width=config.intermediate_size[i],
            sparsity=config.activation_sparsity_pattern[i],
        ))
    return rows


def summarize(ckpt: Checkpoint) -> CheckpointSummary:
    text = Counter({g: 0 for g in TEXT_GROUPS})
    for name in ckpt.text_names():
        text[parameter_group(name)] += ckpt.info(ckpt.text_prefix + name).numel
    other = Counter()
    for name in ckpt.other_names():
        other[tower_group(name)] += ckpt.info(name).numel
    dtypes = Counter()
    for info in ckpt.tensors.values():
        dtypes[str(info.dtype).removeprefix("torch.")] += info.numel
    return CheckpointSummary(
        config=ckpt.text_config,
        layers=layer_plan(ckpt.text_config),
        text_params=dict(text),
        other_params=dict(other),
        bytes_on_disk=ckpt.nbytes_on_disk,
        dtypes=dict(dtypes),
    )
