"""SentencePiece tokenizer of the bundled model, in Gemma's id layout, plus its Hugging Face `tokenizer.json` twin.

Gemma reserves ids 0-3 for `<pad>`, `<eos>`, `<bos>` and `<unk>` and marks the chat turns with `<start_of_turn>` and
`<end_of_turn>`. The bundled tokenizer keeps that layout so that code written for Gemma's ids works unchanged:

    0 <pad>  1 <eos>  2 <bos>  3 <unk>  4 <start_of_turn>  5 <end_of_turn>  6..261 byte pieces <0x00>..<0xFF>

Like Gemma's, it is a BPE model with byte fallback and no text normalization: spaces become "▁", no dummy prefix is
added, digits are split, and runs of spaces or newlines can be single pieces (code indentation is common in the corpus).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
CHAT_PIECES = (START_OF_TURN, END_OF_TURN)

SENTENCEPIECE_FILE = "tokenizer.model"
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def train_sentencepiece(texts: Iterable[str], vocab_size: int) -> bytes:
    """Train the BPE model on `texts` and return the serialized `tokenizer.model`.

    Each text is split at blank lines, because the trainer sees one "sentence" at a time and a whole pydoc topic is
    longer than it accepts. Newlines inside a paragraph stay, so "\\n" and indentation runs become ordinary pieces.
    Training uses one thread, which makes the result deterministic.
    """
    import sentencepiece as spm

    def paragraphs() -> Iterable[str]:
        for text in texts:
            for paragraph in text.split("\n\n"):
                if paragraph.strip():
                    yield paragraph

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=paragraphs(),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=list(CHAT_PIECES),
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        # Characters outside the most common 99.95 % go to byte pieces instead of taking a vocabulary slot each.
        character_coverage=0.9995,
        max_sentence_length=100_000,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def write_tokenizer_files(sentencepiece_model: bytes, out_dir: Path) -> list[Path]:
    """Write `tokenizer.model` and the equivalent Hugging Face files into `out_dir`; return the paths written.

    `tokenizer.json` comes from transformers' own Gemma conversion (`GemmaTokenizer` reading a `tokenizer.model`),
    so it has the same normalizer, byte fallback and decoder as the released Gemma tokenizers. It adds `<bos>` when
    encoding, as Gemma's does.
    """
    from transformers import GemmaTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    sp_path = out_dir / SENTENCEPIECE_FILE
    sp_path.write_bytes(sentencepiece_model)

    # mask_token=None: GemmaTokenizer otherwise appends a `<mask>` token past the SentencePiece vocabulary.
    hf = GemmaTokenizer.from_pretrained(str(out_dir), mask_token=None, add_bos_token=True, add_eos_token=False)
    hf.save_pretrained(str(out_dir))

    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    # These keys record the machine that ran the conversion (an absolute path, a hub flag), not the tokenizer.
    for key in ("vocab_file", "is_local", "local_files_only"):
        config.pop(key, None)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    # transformers 5 no longer writes this file; older readers (transformers 4.x, some runtimes) still look for it.
    special = {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "additional_special_tokens": list(CHAT_PIECES),
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return [sp_path] + [out_dir / name for name in HF_FILES]


def load_sentencepiece(folder: Path):
    """Load `tokenizer.model` from a model folder as a `sentencepiece.SentencePieceProcessor`."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(Path(folder) / SENTENCEPIECE_FILE))
