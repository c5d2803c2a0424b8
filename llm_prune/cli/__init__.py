"""The `llm-prune` console script. Each command lives in its own module and registers itself;
errors a user can cause print one line and exit with status 2."""

from __future__ import annotations

import os
import sys

import typer

from llm_prune.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Structured pruning, recovery-data selection and retraining of LLMs.")


@app.callback()
def _root() -> None:
    """Structured pruning, recovery-data selection and retraining of LLMs."""


def _register() -> None:
    from llm_prune.cli import evaluate, export, prune, run, select
    from service import cli as service_cli

    for module in (prune, evaluate, select, run, export, service_cli):
        module.register(app)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _register()
    try:
        app(args=argv, standalone_mode=True)
    except UserError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
