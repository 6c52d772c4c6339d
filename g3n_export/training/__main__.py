"""Command line: `python -m g3n_export.training [--out DIR] [--steps N] ...` trains and writes the bundled model."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields
from pathlib import Path

from g3n_export.bundled import BUNDLED_MODEL
from g3n_export.training.model import Dims
from g3n_export.training.train import TrainSettings, run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m g3n_export.training",
        description="Train the bundled Gemma 3n (MatFormer, pydoc corpus) and write it in the Hugging Face layout.",
    )
    parser.add_argument("--out", type=Path, default=BUNDLED_MODEL, help="output folder (default: the bundled model)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    for group in (TrainSettings, Dims):
        for f in fields(group):
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                                help=f"{group.__name__}.{f.name} (default: %(default)s)")
    if argv is None:
        argv = sys.argv[1:]
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    settings = TrainSettings(**{f.name: getattr(args, f.name) for f in fields(TrainSettings)})
    dims = Dims(**{f.name: getattr(args, f.name) for f in fields(Dims)})
    run(args.out, dims, settings, force=args.force, command=["python", "-m", "g3n_export.training", *argv])


if __name__ == "__main__":
    main()
