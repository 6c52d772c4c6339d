"""Training corpus of the bundled model: the help topics that CPython ships in `pydoc_data/topics.py`.

The topics are English prose with Python code, about 465,000 characters in 79 topics on CPython 3.11. The held-out
part is every `holdout_every`-th paragraph (blank-line-separated block) in sorted topic order. A topic-level split was
rejected because every 10th topic gives only about 2,700 tokens: the held-out topics happen to be short ones.

The topics are plain text hard-wrapped at about 70 characters. Wrapped prose paragraphs are joined into one line
each (`unwrap_paragraph`), because with a newline after every 10 to 12 words, the newline token (and the indentation
that follows newlines in code examples) outranks any single next word wherever the next word is uncertain, and greedy
decoding turns prose into code. Code, grammar rules, headings and definition lists keep their line breaks.

topics.py differs between CPython versions, so the held-out paragraphs are saved next to the model and evaluation
reads that copy, never the running Python's.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from dataclasses import dataclass

# A heading underline (`*****`, `=====`, `-----`, ...) or a list marker (`* `, `- `, `+ `, `1. `).
HEADING_UNDERLINE = re.compile(r"([*=\-~^\"#+])\1+")
LIST_MARKER = re.compile(r"([*+-]|\d+\.) ")


@dataclass(frozen=True)
class Corpus:
    """Training topics (held-out paragraphs removed) and the held-out paragraphs with their topic keys."""

    train: tuple[str, ...]
    heldout: tuple[str, ...]
    heldout_keys: tuple[str, ...]
    sha256: str  # of the topics.py file itself
    python_version: str


def unwrap_paragraph(paragraph: str) -> str:
    """Join the lines of a hard-wrapped prose paragraph with single spaces; return any other paragraph unchanged.

    A paragraph is wrapped prose when its first line starts (after its indentation) with a capital letter, a quote,
    `*`, `(` or a list marker. Every later line must be indented to where the first line's text starts, which is
    past the list marker when there is one. Paragraphs with a heading underline, a doctest line (`>>>`, `...`) or a
    grammar rule (`::=`) are never joined. The first line keeps its indentation and trailing newlines stay.
    """
    text = paragraph.rstrip("\n")
    trailing = paragraph[len(text):]
    lines = text.split("\n")
    if len(lines) < 2:
        return paragraph

    first = lines[0]
    indent = len(first) - len(first.lstrip(" "))
    body = first[indent:]
    marker = LIST_MARKER.match(body)
    hanging = indent + (marker.end() if marker else 0)
    if not (marker or body[:1].isupper() or body[:1] in "\"*("):
        return paragraph
    for line in lines[1:]:
        if not line.strip() or len(line) - len(line.lstrip(" ")) != hanging:
            return paragraph
    for line in lines:
        stripped = line.strip()
        if HEADING_UNDERLINE.fullmatch(stripped) or stripped.startswith((">>>", "...")) or "::=" in stripped:
            return paragraph
    return " ".join([first] + [line.strip() for line in lines[1:]]) + trailing


def load_pydoc_corpus(holdout_every: int = 20) -> Corpus:
    """Read the running CPython's pydoc topics, unwrap prose paragraphs and hold out every `holdout_every`-th one.

    Paragraphs are numbered across all topics in sorted key order, and those numbered holdout_every - 1,
    2 * holdout_every - 1, ... are held out. A training topic is its remaining paragraphs joined by blank lines.
    """
    import pydoc_data.topics
    from pydoc_data.topics import topics

    with open(pydoc_data.topics.__file__, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()

    train, heldout, heldout_keys = [], [], []
    number = 0
    for key in sorted(topics):
        kept = []
        for paragraph in topics[key].split("\n\n"):
            if not paragraph.strip():
                continue
            paragraph = unwrap_paragraph(paragraph)
            if number % holdout_every == holdout_every - 1:
                heldout.append(paragraph)
                heldout_keys.append(key)
            else:
                kept.append(paragraph)
            number += 1
        train.append("\n\n".join(kept))
    return Corpus(tuple(train), tuple(heldout), tuple(heldout_keys), digest, platform.python_version())


def heldout_json(corpus: Corpus) -> str:
    """Return the held-out paragraphs as the JSON document shipped next to the model."""
    return json.dumps(
        {"source": "pydoc_data/topics.py", "python_version": corpus.python_version, "corpus_sha256": corpus.sha256,
         "paragraphs": [{"topic": k, "text": t} for k, t in zip(corpus.heldout_keys, corpus.heldout)]},
        indent=1, ensure_ascii=False,
    ) + "\n"


def read_heldout(text: str) -> list[str]:
    """Return the held-out paragraphs from the shipped JSON document."""
    return [p["text"] for p in json.loads(text)["paragraphs"]]
