"""Export-friendly PyTorch implementation of the Gemma 3n text decoder.

Free of export, ONNX, ExecuTorch and quantization imports: targets wrap these modules, quantizers swap the
`nn.Linear` projections.
"""

from g3n_export.model.decoder import DecoderStack, FunctionalKVDecoder, Gemma3nDecoder
from g3n_export.model.embedding import Embedder, PerLayerEmbedding, TokenEmbedding
from g3n_export.model.kv_cache import FunctionalKV, KeyValues, StaticKVCache
from g3n_export.model.weights import hf_name_map

__all__ = [
    "DecoderStack",
    "Embedder",
    "FunctionalKV",
    "FunctionalKVDecoder",
    "Gemma3nDecoder",
    "KeyValues",
    "PerLayerEmbedding",
    "StaticKVCache",
    "TokenEmbedding",
    "hf_name_map",
]
