"""PyTorch: a trained teacher (an ``nn.Module`` wrapped by ``teacher_program``) dumps its
logits over a DataLoader with ``kd.dump``; a smaller student learns from them with
KnowledgeDataset + DataLoader (2 workers) and the Hinton loss kd_loss (T = 2).

Run: python examples/torch_training.py --out /tmp/kd-torch
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import kdserve as kd
from kdserve.torch import KnowledgeDataset, kd_loss, teacher_program

N, DIM, CLASSES, EPOCHS = 2048, 16, 4, 4
torch.manual_seed(0)
rng = np.random.default_rng(0)
inputs = rng.normal(size=(N, DIM)).astype(np.float32)
labels = (inputs @ rng.normal(size=(DIM, CLASSES))).argmax(1)  # a random linear rule


def train_teacher() -> nn.Module:
    """The teacher learns the rule from labels (a few hundred full-batch steps)."""
    model = nn.Sequential(nn.Linear(DIM, 64), nn.ReLU(), nn.Linear(64, CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.from_numpy(inputs), torch.from_numpy(labels)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def main(out: Path) -> None:
    store = out / "teacher"
    # The teacher's data is a DataLoader: its batches are tuples, so feeds= names them.
    data = DataLoader(TensorDataset(torch.from_numpy(inputs)), batch_size=256)
    kd.dump(
        teacher_program(train_teacher(), devices=["cpu"]),  # module(x) -> logits
        data,
        store,
        feeds=["x"],
        keep=["x", "logits"],  # keep the input feed too: the student trains on it
        overwrite=True,
    )

    student = nn.Linear(DIM, CLASSES)  # the (smaller) student
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    dataset = KnowledgeDataset([store], batch_size=64, shuffle=True, seed=0)
    # batch_size=None: the dataset yields ready-made batches (dicts of tensors).
    loader = DataLoader(dataset, batch_size=None, num_workers=2)
    losses = []
    for epoch in range(EPOCHS):
        dataset.set_epoch(epoch)  # a new shuffle order per epoch, agreed by all workers
        total, batches = 0.0, 0
        for batch in loader:
            loss = kd_loss(student(batch["x"]), batch["logits"], temperature=2.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
        losses.append(total / batches)
        print(f"epoch {epoch}: kd loss {losses[-1]:.4f} over {batches} batches")

    with torch.no_grad():
        accuracy = (student(torch.from_numpy(inputs)).argmax(1).numpy() == labels).mean()
    assert losses[-1] < losses[0], losses
    print(f"torch: kd loss {losses[0]:.4f} -> {losses[-1]:.4f}, accuracy {accuracy:.1%}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, help="output directory (default: a temp dir)")
    args = parser.parse_args()
    if args.out is not None:
        main(args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
