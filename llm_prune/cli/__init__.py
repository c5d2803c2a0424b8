"""The `llm-prune` console script. Each command lives in its own module and registers itself;
errors a user can cause print one line and exit with status 2."""

from __future__ import annotations

import errno
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


def _click_exceptions():
    """Typer 0.2x carries its own copy of click; earlier releases use click itself."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def main(argv: list[str] | None = None) -> None:
    click = _click_exceptions()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _register()
    try:
        code = app(args=argv, standalone_mode=False)
    except UserError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(2)
    except click.NoArgsIsHelpError as exc:  # `llm-prune jobs` alone: the group's help, as click shows it
        exc.show()
        sys.exit(exc.exit_code)
    except click.UsageError as exc:  # a mistyped option or value: one line, like every other refusal
        command = exc.ctx.command_path.partition(" ")[2] if exc.ctx is not None else ""
        hint = f" (llm-prune {command} --help)".replace("  ", " ") if exc.ctx is not None else ""
        print(f"error: {exc.format_message()}{hint}", file=sys.stderr)
        sys.exit(2)
    except click.ClickException as exc:
        print(f"error: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except UnicodeEncodeError as exc:
        if "surrogates not allowed" not in str(exc):
            raise
        # An argument in another encoding than UTF-8 (kept by Python as surrogates) sent where text goes.
        shown = exc.object[:80].encode("utf-8", "backslashreplace").decode("utf-8")
        print(f"error: '{shown}' is not UTF-8 text (bytes of another encoding?); give it in UTF-8",
              file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise  # anything else is a bug to see in full
        # The machine's disk, not the input: one line, and what was written before stays whole.
        print(f"error: no space left on the disk ({exc.filename or 'while writing'}); free some and run "
              "the command again", file=sys.stderr)
        sys.exit(1)
    except (KeyboardInterrupt, typer.Abort):
        code = 130
    if code == 130:  # typer turns Ctrl-C into Exit(130), which comes back as the return value here
        print("interrupted", file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)  # as click's standalone mode does
