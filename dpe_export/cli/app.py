"""The dpe-export click group: one-line errors, exit codes, signals and logging (commands are in commands.py)."""
from __future__ import annotations

import logging
import os
import signal
import sys

import click

from dpe_export import __version__
from dpe_export.errors import DPEExportError, UsageError

DEBUG_ENV = "DPE_EXPORT_DEBUG"  # set to 1 to see tracebacks of unexpected errors


MAIN_EPILOG = """\b
Examples:
  dpe-export convert ./Meta-Llama-3-8B-Instruct -o ./llama3-dpe --preset meta-llama-3-8b-instruct
  dpe-export convert ./my-llama -o ./my-llama-dpe --window 1024 --scale-factors 2,8,2,8,32,32,32,4
  dpe-export presets
  dpe-export push ./my-llama-dpe --repo-id my-org/my-llama-dpe
  dpe-export upgrade ./my-llama-dpe   # an export written by an earlier dpe-export
  dpe-export eval ./my-llama-dpe --task passkey --lengths 4096,8192 --json scores.json

The exported directory loads with
AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True) (transformers>=5,<6).
DPE is Dimension-wise Positional Embeddings Manipulation, arXiv 2504.18857.
"""


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _print_error(message: str) -> None:
    click.echo(f"Error: {_one_line(message)}", err=True)


class _CLIGroup(click.Group):
    """A click group that reports every failure as one `Error: ...` line on stderr, never a traceback.

    Exit status: 0 on success, 1 for errors, 2 for usage errors (as click), 130 when interrupted.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UsageError as e:  # a library's verdict on how the command was called: a usage error of the command
            name = ctx.invoked_subcommand
            command = self.get_command(ctx, name) if name else None
            sub = click.Context(command, info_name=name, parent=ctx) if command is not None else ctx
            raise click.UsageError(str(e), ctx=sub) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        previous = _terminate_as_interrupt()
        try:
            rv = super().main(
                args=args,
                prog_name=prog_name or "dpe-export",
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
            code = rv if isinstance(rv, int) else 0
        except click.exceptions.Abort:  # click turns KeyboardInterrupt/EOF into Abort
            _print_error("interrupted")
            code = 130
        except KeyboardInterrupt:
            _print_error("interrupted")
            code = 130
        except click.ClickException as e:
            message = e.format_message()
            ctx = getattr(e, "ctx", None)
            if isinstance(e, click.UsageError) and ctx is not None:
                message += f" (see '{ctx.command_path} --help')"
            _print_error(message)
            code = e.exit_code
        except DPEExportError as e:
            _print_error(str(e))
            code = 1
        except OSError as e:
            _print_error(str(e) or type(e).__name__)
            code = 1
        except Exception as e:
            if os.environ.get(DEBUG_ENV):
                raise
            _print_error(f"unexpected {type(e).__name__}: {e} (set {DEBUG_ENV}=1 to see the traceback)")
            code = 1
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if standalone_mode:
            sys.exit(code)
        return code


def _terminate_as_interrupt():
    """SIGTERM (kill, a job scheduler's timeout) unwinds like Ctrl-C, so a convert removes what it had started
    writing. Returns the previous handler (None where it cannot be set: not the main thread)."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


class _WarningsToStderr(logging.Handler):
    """Shows dpe_export warnings as `Warning: ...` lines (through click, so tests can capture them)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(f"Warning: {_one_line(record.getMessage())}", err=True)
        except Exception:  # pragma: no cover
            self.handleError(record)


def setup_logging() -> None:
    logger = logging.getLogger("dpe_export")
    if not any(isinstance(h, _WarningsToStderr) for h in logger.handlers):
        logger.addHandler(_WarningsToStderr(logging.WARNING))
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


def quiet_transformers() -> None:
    """Base-model config warnings from transformers are noise here; its errors become our one-line errors.

    Read by transformers when it is first imported (a TRANSFORMERS_VERBOSITY the user set wins); set
    directly when it is already imported, as in tests. Importing it here would slow down quick failures.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


@click.group(
    cls=_CLIGroup,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    epilog=MAIN_EPILOG,
)
@click.version_option(__version__, "-V", "--version", prog_name="dpe-export")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Convert a RoPE LLM checkpoint into one that runs DPE attention.

    DPE (Dimension-wise Positional Embeddings Manipulation) extends the usable context of a RoPE model
    without training: attention within a local window is unchanged, and beyond it the relative positions
    of each group of rotary frequencies are scaled by that group's factor. The export keeps the weights
    unchanged and adds generated trust_remote_code modeling files.
    """
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


