"""Command-line interface: `g3n-export` and its subcommands."""
