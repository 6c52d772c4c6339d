"""The `g3n-export` application: the main export job plus subcommands."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from g3n_export.cli import _common
from g3n_export.errors import G3nError

app = typer.Typer(
    name="g3n-export",
    help="Slice, quantize, export and validate Gemma 3n for on-device runtimes (ExecuTorch, ONNX Runtime).",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _register() -> None:
    # Each command lives in its own module; importing registers it on `app`.
    from g3n_export.cli import export  # noqa: F401

    for optional in ("inspect", "synthetic", "slice", "recipes", "validate", "generate", "bench"):
        try:
            __import__(f"g3n_export.cli.{optional}")
        except ModuleNotFoundError as e:
            if e.name != f"g3n_export.cli.{optional}":
                raise


def main() -> None:
    """Console-script entry point: run the app, turning expected errors into one line and exit code 1."""
    _register()
    try:
        app(standalone_mode=False)
    except G3nError as e:
        if _common.debug_enabled():
            raise
        _common.err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        _common.err_console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        _common.err_console.print("interrupted")
        sys.exit(130)
    except Exception as e:  # click's usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Log warnings and errors only.")]
