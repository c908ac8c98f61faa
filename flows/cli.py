"""The `fermine` command. Each pipeline adds its subcommands in flows/commands/<name>.py.

Commands stay thin: they build a stage's config object from options and call the stage
(or its Prefect flow). User mistakes (missing file, bad artifact, bad option) print one clear
line and exit 2; they never show a stack trace.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import typer

from flows.runtime_env import apply_defaults

app = typer.Typer(
    name="fermine",
    help="Self-mining facial expression recognition: PASM, omni-supervised mining, Progressive "
    "Teacher, CAF and handcrafted feature losses as resumable Prefect + Ray pipelines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit status 2."""


def _register_commands() -> None:
    import flows.commands as pkg

    for m in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        mod = importlib.import_module(f"flows.commands.{m.name}")
        mod.register(app)


def main(argv: list[str] | None = None) -> None:
    apply_defaults()
    from storage.artifact import ArtifactError
    from storage.readers.base import DatasetFormatError

    _register_commands()
    try:
        app(args=argv, standalone_mode=False)
    except (UserError, ArtifactError, DatasetFormatError, FileNotFoundError, FileExistsError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
    except (ConnectionError, FloatingPointError) as e:
        # Not the user's typo, but nothing a traceback explains better: Ray unreachable, a
        # diverged training. The message says what happened and what to try.
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(1)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as e:  # usage errors (unknown command/option) arrive here in non-standalone mode
        if isinstance(e, _click_exceptions()):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, _stage_failures()):
            typer.secho(f"error: {e}\nRerun the same command to resume: finished shards are kept.", fg="red", err=True)
            sys.exit(1)
        raise


def _stage_failures() -> tuple[type, ...]:
    """A Ray stage whose shard kept failing. Looked up only if loaded: `fermine --help` must not import Ray."""
    mod = sys.modules.get("workers.sharded")
    return (mod.ShardFailedError,) if mod is not None else ()


def _click_exceptions() -> tuple[type, ...]:
    """Click's usage-error class: typer >= 0.24 vendors click as ``typer._click``, older ones use click."""
    classes: list[type] = []
    for mod in ("typer._click.exceptions", "click.exceptions"):
        try:
            classes.append(importlib.import_module(mod).ClickException)
        except ImportError:
            pass
    return tuple(classes)


if __name__ == "__main__":
    main()
