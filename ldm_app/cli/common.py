"""What every `ldm-app` command shares: one-line errors, the shared options, notes on stderr.

Kept free of torch and diffusers imports so that `ldm-app --help` answers at once; commands import what they
need when they run."""

from __future__ import annotations

import errno
import math
import sys
from collections.abc import Callable

import click

from ..loading import DEFAULT_MODEL, DTYPES


class UserError(click.ClickException):
    """A problem with the user's input: printed as one line, exit code 2."""

    exit_code = 2


def one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class OneLineErrors(click.Group):
    """The one place where errors become one line on stderr: click's usage errors and the library's ValueErrors
    (what is wrong and how to fix it) exit 2, a full disk exits 1; never a traceback for either."""

    def main(self, *args, **kwargs):
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        except click.ClickException as e:
            hint = f" (see: {e.ctx.command_path} --help)" if getattr(e, "ctx", None) else ""
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(e.exit_code)
        except ValueError as e:  # the library's input checks (UnicodeDecodeError included)
            click.echo(f"error: {one_line(e)}", err=True)
            sys.exit(UserError.exit_code)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            where = f" writing {e.filename}" if e.filename else ""
            click.echo(f"error: no space left on the device{where}; free some space and run the command again "
                       "(files already written are complete).", err=True)
            sys.exit(1)


def model_option(help: str = "Pipeline folder, single-file SD-1.x .safetensors, hub id, or 'default' (the embedded "
                              "model).") -> Callable:
    return click.option("--model", default=DEFAULT_MODEL, help=help)


variant_option = click.option("--variant", default=None, metavar="NAME",
                              help="Load a pipeline folder's *.NAME.safetensors weights, e.g. fp16.")


device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto",
                             help="Where to run (auto: CUDA, then MPS, then the CPU).")
dtype_option = click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default="auto",
                            help="Weights dtype (auto: fp16 on CUDA, fp32 elsewhere).")


def quiet_option(help: str = "No progress bars or notes.") -> Callable:
    return click.option("-q", "--quiet", is_flag=True, help=help)


def notes(quiet: bool) -> Callable[[str], None]:
    """Where a command's notes go: stderr, or nowhere with --quiet (stdout is for the paths written)."""
    return (lambda msg: None) if quiet else (lambda msg: click.echo(msg, err=True))


def utf8_text(ctx: click.Context, param: click.Parameter, value):
    """Prompts must be text: bytes that are not UTF-8 (Python keeps them as lone surrogates) are refused here
    rather than failing inside the tokenizer or the PNG writer."""
    for text in value if isinstance(value, tuple) else [value]:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise click.BadParameter("is not valid UTF-8 text; pass the text in UTF-8 (check the terminal's "
                                         "or the script's encoding).") from None
    return value


def finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """nan and inf pass click's FloatRange; they are never a useful guidance scale or η."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number; pass e.g. 5.")
    return value


threads_option = click.option("--threads", type=click.IntRange(min=1), default=None, show_default="physical cores",
                              help="CPU threads for torch; on a machine busy with other work, fewer (even 1) is "
                                   "faster.")
