"""The ``kdserve`` command line: a thin layer over the public API."""

from __future__ import annotations

import sys

import click

import kdserve
from kdserve.errors import KdserveError

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(kdserve.__version__, prog_name="kdserve")
def cli() -> None:
    """kdserve: decoupled knowledge distillation.

    Teachers write knowledge to stores or serve it over the network; students merge
    any mix of teachers and train on one stream.
    """


@cli.command()
@click.option("--samples", default=2048, show_default=True, help="Samples per teacher.")
@click.option("--batch-size", default=64, show_default=True, help="The student's batch size.")
def demo(samples: int, batch_size: int) -> None:
    """Run the demo: two teachers' knowledge merged and re-batched for a student."""
    from kdserve.demo import run_demo

    run_demo(samples=samples, batch_size=batch_size)


def main() -> None:
    """Entry point of the console script; kdserve errors become one-line messages, exit 1."""
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KdserveError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
