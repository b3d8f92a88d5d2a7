"""``kdserve demo``: distil a small student from two teachers on real data, through kdserve.

The data is scikit-learn's bundled handwritten digits (8x8 images, 10 classes; no
download). Two different teachers learn it from all training labels in seconds: an MLP
(PyTorch), served *online* by a separate process, and an RBF support-vector machine,
dumped *offline* to a knowledge store. A student -- a small MLP that sees only 30
labelled images -- is trained twice with the same seed: on those labels alone, and
distilled from the two teachers' merged soft labels on every training image, received
through a kdserve Student that merges the online and the offline teacher by sample id.

Uses only the public API. Needs the ``demo`` extra (PyTorch, scikit-learn, matplotlib).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import secrets
import shutil
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import click
import numpy as np

import kdserve as kd
from kdserve.core.wait import POLL
from kdserve.log import show_status

__all__ = ["await_child", "run_demo"]

_SEED = 0
_LABELLED = 30  # images the label-only student may learn from (3 per class)
_EPOCHS = 40
_BATCH = 64
_STALL = 600.0  # seconds a child process may go without reporting progress


@dataclass
class _Data:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _require_extra() -> None:
    missing = []
    for module in ("torch", "sklearn", "matplotlib"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise kd.KdserveError(
            f"kdserve demo needs {', '.join(missing)}: pip install 'kdserve[demo]' (on a "
            f"CPU-only machine install a CPU build of torch first, e.g. torch==2.13.0)"
        )


def _load() -> _Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.3, random_state=_SEED, stratify=digits.target
    )
    return _Data(x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64))


def _mlp(hidden: int) -> Any:
    import torch

    torch.manual_seed(_SEED)
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)
    )


def _fit(model: Any, x: np.ndarray, targets: np.ndarray, steps: int, soft: bool = False) -> Any:
    """Full-batch Adam on labels (cross-entropy) or on soft labels (KL, kdserve's kd_loss)."""
    import torch

    from kdserve.torch import kd_loss

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    inputs, wanted = torch.from_numpy(x), torch.from_numpy(targets)
    for _ in range(steps):
        optimizer.zero_grad()
        out = model(inputs)
        loss = (
            kd_loss(out, wanted, teacher_is_probs=True)
            if soft
            else torch.nn.functional.cross_entropy(out, wanted)
        )
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    return model


def _accuracy(predict: Any, data: _Data) -> float:
    return float((np.asarray(predict(data.x_test)) == data.y_test).mean())


def _serve_mlp_teacher(conn: Connection, token: str, port: int, times: int) -> None:
    """The online teacher's process: train the MLP, then serve its soft labels. It tells
    the parent what it is doing, so that a slow machine is told apart from a hang."""
    conn.send({"status": "importing PyTorch"})
    import torch

    torch.set_num_threads(1)
    conn.send({"status": "training the MLP teacher"})
    data = _load()
    model = _fit(_mlp(128), data.x_train, data.y_train, steps=300)
    model.eval()

    def program(feed: dict[str, Any]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            probs = torch.softmax(model(torch.from_numpy(np.asarray(feed["x"]))), dim=-1)
        return {"probs": probs.numpy()}

    def samples() -> Any:
        for i, x in enumerate(data.x_train):
            yield x, i

    try:
        teacher = kd.Teacher(out_port=port, token=token, name="mlp-teacher", progress=False)
        teacher.start()
    except kd.KdserveError as exc:
        conn.send({"error": str(exc)})
        return
    with teacher:
        accuracy = _accuracy(lambda x: program({"x": x})["probs"].argmax(1), data)
        conn.send({"address": teacher.address, "accuracy": accuracy})
        teacher.start_knowledge_service(
            feed_list=["x", kd.SAMPLE_ID],
            schema=["probs"],
            program=program,
            reader_config={"sample_generator": samples, "batch_size": 100},
            use_fp16=True,  # soft labels travel as float16
            times=times,
        )


def _svm_teacher_store(data: _Data, path: Path) -> float:
    """Train the SVM teacher and dump its soft labels (top-5 coded) to a store."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import SVC

    svm = CalibratedClassifierCV(SVC(gamma=0.02, C=5.0), ensemble=False).fit(
        data.x_train, data.y_train
    )
    schema = kd.Schema([kd.Field("probs", "float32", (10,), codec=kd.TopK(5, kind="probs"))])
    with kd.Teacher(path, name="svm-teacher", model="sklearn SVC(rbf)", progress=False) as t:
        t.start_knowledge_service(
            feed_list=["x"],
            schema=schema,
            program=lambda feed: {"probs": svm.predict_proba(feed["x"]).astype(np.float32)},
            reader_config=[(data.x_train[i : i + 200],) for i in range(0, len(data.x_train), 200)],
        )
    return _accuracy(svm.predict, data)


def _distil(data: _Data, address: str, store: Path, token: str) -> tuple[Any, float, int]:
    """Train the student on the merged knowledge; return it, the seconds it waited for
    knowledge, and the batches it received."""
    import torch

    from kdserve.torch import kd_loss

    student_model = _mlp(32)
    optimizer = torch.optim.Adam(student_model.parameters(), lr=1e-2, weight_decay=1e-4)
    with kd.Student(merge_strategy={"probs": "mean"}, token=token, connect_timeout=60) as s:
        s.register_teacher(in_address=address, name="mlp")
        s.register_teacher(in_path=store, name="svm")
        s.start()
        reader = s.get_knowledge_generator(batch_size=_BATCH)
        waited, batches = 0.0, 0
        for _ in range(_EPOCHS):
            started = time.perf_counter()
            for batch in reader():
                waited += time.perf_counter() - started
                ids, soft = batch[kd.SAMPLE_ID], batch["probs"]
                batches += 1
                optimizer.zero_grad()
                out = student_model(torch.from_numpy(data.x_train[ids]))
                loss = kd_loss(out, torch.tensor(soft), teacher_is_probs=True)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                started = time.perf_counter()
    return student_model, waited, batches


def await_child(
    conn: Connection, process: BaseProcess, what: str, stall: float = _STALL
) -> dict[str, Any]:
    """The first message from a child process that is not a ``{"status": ...}`` report.

    Waits as long as the child is alive and reports progress (each status is shown on
    stderr); fails at once when it dies, or after ``stall`` seconds without a report
    once it has reported (starting a process only needs it to be alive).
    """
    status, since = "starting", float("inf")
    while True:
        message: dict[str, Any] | None = None
        if conn.poll(POLL):
            with contextlib.suppress(EOFError):  # the child closed its end: it is exiting
                message = conn.recv()
        if message is not None and "status" not in message:
            return message
        if message is not None:
            status, since = message["status"], time.monotonic()
            click.echo(f"[demo] {what}: {status}", err=True)
        elif not process.is_alive():
            raise kd.TeacherUnavailableError(
                f"{what} exited (code {process.exitcode}) while {status}; its error is above"
            )
        elif time.monotonic() - since > stall:
            raise kd.TeacherUnavailableError(
                f"{what} is alive but has not progressed for {stall:g} s (still {status}); is "
                f"the machine overloaded?"
            )


def run_demo(out: Path | None = None, port: int = 0) -> None:
    """Train, serve, dump, distil; print the table and write the plot."""
    show_status()
    _require_extra()
    import torch

    torch.set_num_threads(1)
    out = Path(out or "demo-output")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.perf_counter()
    data = _load()
    token = secrets.token_urlsafe(16)
    parent, child = mp.get_context("spawn").Pipe()
    server = mp.get_context("spawn").Process(
        target=_serve_mlp_teacher, args=(child, token, port, _EPOCHS), daemon=True
    )
    server.start()
    try:
        svm_accuracy = _svm_teacher_store(data, out / "svm-teacher")
        hello = await_child(parent, server, "the online teacher's process")
        if "error" in hello:
            raise kd.KdserveError(hello["error"])
        student, waited, batches = _distil(data, hello["address"], out / "svm-teacher", token)
        server.join(timeout=60)
    finally:
        if server.is_alive():
            server.kill()
    labels_only = _fit(_mlp(32), data.x_train[:_LABELLED], data.y_train[:_LABELLED], steps=300)

    def predict(model: Any) -> Any:
        return lambda x: model(torch.from_numpy(x)).argmax(1).numpy()

    results = {
        "MLP teacher (online)": hello["accuracy"],
        "SVM teacher (store)": svm_accuracy,
        f"student, {_LABELLED} labels only": _accuracy(predict(labels_only), data),
        "student, distilled": _accuracy(predict(student), data),
    }
    _report(results, batches, waited, time.perf_counter() - started, out)


def _report(
    results: dict[str, float], batches: int, waited: float, total: float, out: Path
) -> None:
    click.echo(
        f"\nkdserve demo: handwritten digits, {_EPOCHS} passes of merged knowledge "
        f"(online MLP teacher + offline SVM teacher)\n"
    )
    click.echo(f"  {'model':<28} {'test accuracy':>14}")
    for name, accuracy in results.items():
        click.echo(f"  {name:<28} {100 * accuracy:>13.1f}%")
    click.echo(
        f"\n  knowledge: {batches} merged batches of {_BATCH} received; the student waited "
        f"{waited:.2f} s for them in all ({1e3 * waited / max(batches, 1):.2f} ms per batch, "
        f"{batches * _BATCH / max(waited, 1e-9):,.0f} samples/s); whole demo {total:.1f} s"
    )
    plot = out / "kdserve-demo.png"
    _plot(results, plot)
    click.echo(f"  plot: {plot}; stores in {out}/ (try: kdserve inspect {out}/svm-teacher)")


def _plot(results: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = list(results)
    values = [100 * v for v in results.values()]
    colors = ["#8da0cb", "#8da0cb", "#fc8d62", "#66c2a5"]
    bars = ax.barh(names[::-1], values[::-1], color=colors[::-1])
    ax.bar_label(bars, fmt="%.1f%%", padding=3)
    ax.set_xlim(0, 105)
    ax.set_xlabel("test accuracy (%)")
    ax.set_title("Distilling a small student on digits through kdserve")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
