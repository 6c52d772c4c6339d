"""The small Gemma 3n model that ships with the package and is the default `--model` of every command."""

from pathlib import Path

BUNDLED_MODEL_NAME = "gemma3n-pydoc"
BUNDLED_MODEL = Path(__file__).parent / "assets" / BUNDLED_MODEL_NAME
