"""The `llm-prune` console script. Each command lives in its own module and registers itself;
errors a user can cause print one line and exit with status 2."""

from __future__ import annotations

import os
import sys

import typer

from llm_prune.errors import NOT_UTF8, UserError, disk_full, shown_text

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


def _one_line(text: str) -> str:
    """A message quoting what the user typed stays one line: control characters (a newline in a
    value, an escape sequence) are shown escaped, not acted on."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in text)


def main(argv: list[str] | None = None) -> None:
    click = _click_exceptions()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        _register()  # the commands' imports take a moment: a Ctrl-C during them is an interruption too
        code = app(args=argv, standalone_mode=False)
    except UserError as exc:
        print(f"error: {_one_line(exc.message)}", file=sys.stderr)
        sys.exit(2)
    except click.NoArgsIsHelpError as exc:  # `llm-prune jobs` alone: the group's help, as click shows it
        exc.show()
        sys.exit(exc.exit_code)
    except click.UsageError as exc:  # a mistyped option or value: one line, like every other refusal
        command = exc.ctx.command_path.partition(" ")[2] if exc.ctx is not None else ""
        hint = f" (llm-prune {command} --help)".replace("  ", " ") if exc.ctx is not None else ""
        print(f"error: {_one_line(exc.format_message())}{hint}", file=sys.stderr)
        sys.exit(2)
    except click.ClickException as exc:
        print(f"error: {_one_line(exc.format_message())}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except UnicodeEncodeError as exc:
        if "surrogates not allowed" not in str(exc):
            raise
        # An argument in another encoding than UTF-8 (kept by Python as surrogates) sent where text goes.
        print(f"error: '{shown_text(exc.object)}' {NOT_UTF8}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        code = 130
    except Exception as exc:
        full = disk_full(exc)
        if full is None:
            raise  # anything else is a bug to see in full
        # The machine's disk, not the input: one line, and what was written before stays whole.
        print(f"error: no space left on the disk ({full}); free some and run the command again", file=sys.stderr)
        sys.exit(1)
    if code == 130:  # typer turns Ctrl-C into Exit(130), which comes back as the return value here
        print("interrupted", file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)  # as click's standalone mode does
