"""The ``kdserve`` command line: a thin layer over the public API."""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
import numpy as np

import kdserve
from kdserve.errors import KdserveError
from kdserve.log import show_status
from kdserve.teacher.feeds import call_reader

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(kdserve.__version__, prog_name="kdserve")
def cli() -> None:
    """kdserve: decoupled knowledge distillation.

    Teachers write knowledge to stores or serve it over the network; students merge
    any mix of teachers and train on one stream.
    """
    show_status()


def _count(flag: str, default: int | None, help_text: str) -> Callable[[F], F]:
    """An option taking an int >= 1."""
    return click.option(
        flag,
        default=default,
        show_default=default is not None,
        type=click.IntRange(min=1),
        help=help_text,
    )


@cli.command()
@click.option(
    "--out",
    default="demo-output",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the demo writes its store and plot (replaced on each run).",
)
@click.option(
    "--port",
    default=0,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port of the online teacher (0: any free port).",
)
def demo(out: str, port: int) -> None:
    """Run the demo: distil a student from an online and an offline teacher on digits."""
    from kdserve.demo import run_demo

    run_demo(out=Path(out), port=port)


def _load(spec: str, what: str) -> Any:
    """Resolve ``module:attr`` (or ``path/to/file.py:attr``), importing from the current dir."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise click.BadParameter(
            f"{spec!r} is not MODULE:NAME (e.g. mymodels:teacher)", param_hint=what
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).resolve()
            sys.path.insert(0, str(path.parent))
            module_name = path.stem
        module = importlib.import_module(module_name)
    except (ImportError, TypeError, ValueError) as exc:  # TypeError: a relative name
        raise click.BadParameter(
            f"cannot import {module_name!r}: {exc} (give a module name, or a path to a .py file)",
            param_hint=what,
        ) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise click.BadParameter(
            f"module {module_name!r} has no {attr!r}", param_hint=what
        ) from None


@dataclass(frozen=True)
class _Job:
    """What a teacher command runs: the program, its reader config and the fields."""

    program: Callable[..., Any]
    reader_config: Any
    feeds: list[str]
    keep: list[str]
    use_fp16: bool


def _teacher_job(f: F) -> F:
    """The options every teacher command takes, turned into one ``job: _Job`` argument."""

    @click.option(
        "--program",
        required=True,
        metavar="MODULE:NAME",
        help="Callable: dict of feed arrays -> dict of output arrays.",
    )
    @click.option(
        "--reader",
        "reader_spec",
        required=True,
        metavar="MODULE:NAME",
        help="Generator function (of samples with --batch-size, else of batches), "
        "a Pantheon reader_config dict, or an iterable of batches.",
    )
    @click.option(
        "--feed", "feeds", multiple=True, required=True, help="Feed name, in reader order (repeat)."
    )
    @click.option(
        "--keep",
        "keep",
        multiple=True,
        required=True,
        help="Field to keep: a program output or a feed (repeat).",
    )
    @_count("--batch-size", None, "Batch the reader's samples.")
    @click.option("--drop-last", is_flag=True, help="Drop a last batch smaller than --batch-size.")
    @click.option("--fp16", "use_fp16", is_flag=True, help="Keep float fields as float16.")
    @functools.wraps(f)
    def wrapper(
        program: str,
        reader_spec: str,
        feeds: tuple[str, ...],
        keep: tuple[str, ...],
        batch_size: int | None,
        drop_last: bool,
        use_fp16: bool,
        **rest: Any,
    ) -> Any:
        fn = _load(program, "--program")
        if not callable(fn):
            raise click.BadParameter(f"{program!r} is not callable", param_hint="--program")
        reader = _load(reader_spec, "--reader")
        if isinstance(reader, dict):
            config: Any = reader
        elif batch_size is not None:
            config = {"sample_generator": reader, "batch_size": batch_size, "drop_last": drop_last}
        elif callable(reader):
            config = {"batch_generator": _batches_checked(reader, feeds)}
        else:
            config = reader
        return f(job=_Job(fn, config, list(feeds), list(keep), use_fp16), **rest)

    return wrapper  # type: ignore[return-value]


def _batches_checked(reader: Callable[..., Any], feeds: tuple[str, ...]) -> Callable[[int], Any]:
    """``reader`` as a batch generator of the pass that warns if its first batch looks like
    one sample (every feed a scalar or 1-D: rows of scalars): the reader may yield single
    samples, which only ``--batch-size`` batches (else each becomes a batch of its values)."""

    def batches(pass_: int) -> Any:
        for i, batch in enumerate(call_reader(reader, pass_)):
            if i == 0 and pass_ == 0:
                _warn_if_one_sample(batch, feeds)
            yield batch

    return batches


def _warn_if_one_sample(batch: Any, feeds: tuple[str, ...]) -> None:
    """Warn if every feed of ``batch`` is a scalar or 1-D (it may be a single sample)."""
    if isinstance(batch, dict):
        values = list(batch.values())
    else:
        values = list(batch) if isinstance(batch, (tuple, list)) else [batch]
    if values and all(np.ndim(v) <= 1 for v in values):
        shapes = {f: np.shape(v) for f, v in zip(feeds, values, strict=False)}
        click.echo(
            f"warning: the reader's first batch holds feeds of shapes {shapes}, read as "
            f"{np.size(values[0])} samples of scalars. If it yields single samples, pass "
            f"--batch-size N",
            err=True,
        )


@cli.command()
@_teacher_job
@click.option(
    "--out", "out_path", required=True, type=click.Path(file_okay=False), help="Store directory."
)
@_count("--shard-mb", 256, "Shard size bound in MB.")
@click.option("--overwrite", is_flag=True, help="Start the store over instead of resuming it.")
def dump(job: _Job, out_path: str, shard_mb: int, overwrite: bool) -> None:
    """Run a teacher over a reader once and write its knowledge to a store (resumable)."""
    with kdserve.Teacher(out_path, shard_bytes=shard_mb * 1024 * 1024, overwrite=overwrite) as t:
        written = t.start_knowledge_service(
            job.feeds, job.keep, job.program, job.reader_config, use_fp16=job.use_fp16
        )
        total = t.rows_stored
    click.echo(f"wrote {written} samples; {out_path} holds {total} samples")


@cli.command()
@_teacher_job
@click.option("--port", required=True, type=click.IntRange(0, 65535), help="Port to serve on.")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind; anything but loopback needs a token.",
)
@_count("--times", 1, "Passes to serve (each student generator call takes one).")
@click.option(
    "--out",
    "out_path",
    type=click.Path(file_okay=False),
    help="Also write the first pass to this store.",
)
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True), help="PEM certificate.")
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True), help="PEM private key.")
def serve(
    job: _Job,
    port: int,
    host: str,
    times: int,
    out_path: str | None,
    tls_cert: str | None,
    tls_key: str | None,
) -> None:
    """Serve a teacher's knowledge to students over the network (token: KDSERVE_TOKEN)."""
    teacher = kdserve.Teacher(out_path, port, host=host, tls_cert=tls_cert, tls_key=tls_key)
    with teacher:
        served = teacher.start_knowledge_service(
            job.feeds,
            job.keep,
            job.program,
            job.reader_config,
            use_fp16=job.use_fp16,
            times=times,
        )
    click.echo(f"served {served} samples over {times} pass(es)")


@cli.command()
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(store: str, as_json: bool) -> None:
    """Show a store's schema, rows, shards, bytes, codecs and teacher."""
    reader = kdserve.StoreReader(store)
    if as_json:
        click.echo(json.dumps(reader.manifest, indent=1))
        return
    m = reader.manifest
    click.echo(f"store     {store}")
    click.echo(f"teacher   {json.dumps(reader.teacher) if reader.teacher else '-'}")
    click.echo(
        f"status    {'complete' if reader.complete else 'INCOMPLETE (dump running or interrupted)'}"
    )
    click.echo(f"rows      {len(reader)}")
    click.echo(f"shards    {len(reader.shards)}")
    click.echo(f"bytes     {reader.nbytes} ({reader.nbytes / 1e6:.1f} MB)")
    click.echo(f"created   {m.get('created', '-')}   updated {m.get('updated', '-')}\n")
    rows = [("field", "dtype", "shape", "lod", "codec")]
    for f in reader.schema:
        codec = json.dumps(f.codec.to_json()) if f.codec else "-"
        shape = "(" + ", ".join("*" if d is None else str(d) for d in f.shape) + ")"
        rows.append((f.name, f.dtype.name, shape, str(f.lod_level), codec))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])


@cli.command()
@click.argument("store", type=click.Path(file_okay=False))
@click.option(
    "--repair",
    is_flag=True,
    help="Set damaged shards aside (renamed *.damaged, dropped from the manifest) so the "
    "store reads again; re-running the dump then regenerates their samples.",
)
def verify(store: str, repair: bool) -> None:
    """Check every shard of a store: size, crc32 and Arrow structure."""
    if repair:
        from kdserve.store import repair as repair_store

        lost = repair_store(store)
        for file, rows in lost:
            click.echo(f"set aside {file} (now {file}.damaged): {rows} samples lost")
        if lost:
            total = sum(rows for _, rows in lost)
            click.echo(
                f"{store}: {len(lost)} damaged shard(s) set aside and the store marked "
                f"incomplete. Re-run the dump to regenerate those {total} samples (it "
                f"resumes and writes only the missing ones)"
            )
        else:
            click.echo(f"{store}: no damaged shard, nothing to repair")
    reader = kdserve.StoreReader(store)
    reader.verify()
    state = "complete" if reader.complete else "incomplete"
    click.echo(
        f"OK: {store}: {len(reader)} rows in {len(reader.shards)} shards, crc32 verified ({state})"
    )


@cli.group()
def pool() -> None:
    """Teacher pools on Ray (the ray extra)."""


@pool.command("status")
@click.argument("name")
@click.option(
    "--address",
    default="auto",
    show_default=True,
    help="The Ray cluster to attach to (ray.init's address).",
)
def pool_status(name: str, address: str) -> None:
    """Show a pool's replicas: address, samples dumped and samples/s."""
    try:
        import ray

        from kdserve.ray import pool_status as status
    except ImportError:
        raise click.ClickException("kdserve pool needs Ray: pip install 'kdserve[ray]'") from None
    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except ConnectionError as exc:
        raise click.ClickException(
            f"no Ray cluster to attach to at --address {address} ({exc}); start one with "
            f"`ray start --head`, or pass its address"
        ) from None
    try:
        replicas = status(name)
    finally:
        ray.shutdown()
    click.echo(f"pool {name}: {len(replicas['replicas'])} replica(s)")
    for replica, info in replicas["replicas"].items():
        click.echo(
            f"  {replica:<24} {info['address']:<22} dumped {info['samples']:>9} "
            f"({info['samples_per_s']:.1f}/s), answered {info['answered']:>9}"
        )
    for student, figures in replicas["students"].items():
        click.echo(
            f"  student {student}: {figures['batches']:.0f} batches, stalled "
            f"{figures['stall_s']:.2f} s, {figures['in_flight']:.1f} in flight"
        )


_terminated: list[int] = []  # the SIGTERM received, if any


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM (``kill``, ``docker stop``, a scheduler) stops a job as Ctrl-C does: a
    dump leaves its store valid and resumable, a teacher removes its token file."""
    _terminated.append(signum)
    raise KeyboardInterrupt


def main() -> None:
    """Entry point of the console script; kdserve errors become one-line messages, exit 1."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("terminated" if _terminated else "aborted", err=True)
        sys.exit(128 + signal.SIGTERM if _terminated else 130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KdserveError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
