"""kdserve.torch.staging: a teacher_program lane's reused (pinned) input buffers."""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kdserve as kd  # noqa: E402
from _helpers import torch_devices  # noqa: E402
from kdserve.torch import teacher_program  # noqa: E402
from kdserve.torch.staging import Staging  # noqa: E402

RNG = np.random.default_rng(3)


def _staging(device):
    # Pinning needs an accelerator: on the CPU the same buffers, in ordinary memory.
    return Staging(torch.device(device), pin=device == "cuda")


@pytest.mark.parametrize("device", torch_devices())
def test_arrays_of_every_kind_arrive_on_the_device_unchanged(device):
    staging = _staging(device)
    images = RNG.integers(0, 256, size=(4, 3, 8, 8), dtype=np.uint8)
    read_only = RNG.normal(size=(4, 5)).astype(np.float16)
    read_only.flags.writeable = False
    inputs = [
        ("images", images),
        ("ids", np.arange(4, dtype=np.int64)),
        ("mask", np.array([True, False, True, True])),
        ("strided", RNG.normal(size=(4, 6)).astype(np.float32)[:, ::2]),
        ("reversed", np.arange(8, dtype=np.int32)[::-1]),
        ("read_only", read_only),
        ("scalar", np.array(2.5)),
        ("empty", np.zeros((0, 3), np.float32)),
        ("tensor", torch.arange(3)),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning about read-only arrays
        out = staging.copy(inputs)
    for (name, value), tensor in zip(inputs, out, strict=True):
        assert tensor.device.type == device, name
        expected = value.numpy() if isinstance(value, torch.Tensor) else value
        assert tensor.cpu().numpy().dtype == expected.dtype, name
        np.testing.assert_array_equal(tensor.cpu().numpy(), expected, err_msg=name)
    # only arrays with bytes go through buffers, each its own, pinned where it can be
    assert sorted(staging.buffers) == [
        "ids",
        "images",
        "mask",
        "read_only",
        "reversed",
        "scalar",
        "strided",
    ]
    assert all(b.is_pinned() == (device == "cuda") for b in staging.buffers.values())


@pytest.mark.parametrize("device", torch_devices())
def test_buffers_are_reused_and_grow_to_a_power_of_two(device):
    staging = _staging(device)
    first = RNG.normal(size=(256, 100)).astype(np.float32)  # 102,400 bytes
    (a,) = staging.copy([("x", first)])
    buffer = staging.buffers["x"]
    assert buffer.numel() == 131072
    (b,) = staging.copy([("x", first[:10] + 1)])  # a smaller batch: the same buffer
    assert staging.buffers["x"].data_ptr() == buffer.data_ptr()
    # each call's tensor is a copy of its own: refilling the buffer changed neither
    np.testing.assert_array_equal(a.cpu().numpy(), first)
    np.testing.assert_array_equal(b.cpu().numpy(), first[:10] + 1)
    larger = RNG.normal(size=(400, 100)).astype(np.float32)  # 160,000 bytes
    (c,) = staging.copy([("x", larger)])
    assert staging.buffers["x"].numel() == 262144
    np.testing.assert_array_equal(c.cpu().numpy(), larger)


@pytest.mark.parametrize("device", torch_devices())
def test_what_no_buffer_can_hold_gets_torchs_own_error(device):
    staging = _staging(device)
    with pytest.raises(TypeError, match="feed 'words' is ragged"):
        staging.copy([("words", np.array(["a", None], dtype=object))])
    with pytest.raises(ValueError, match="byte order"):
        staging.copy([("big_endian", np.arange(3, dtype=">f4"))])
    assert not staging.buffers


@pytest.mark.parametrize("device", torch_devices())
def test_pinned_and_pageable_inputs_give_the_same_knowledge(tmp_path, device):
    # On a GPU the default lanes stage their inputs in pinned buffers and copy them on the
    # lane's stream; kd.dump calls both lanes at once, with a short last batch.
    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))

        def forward(self, x):
            return self.net(x.float() / 255)

    images = RNG.integers(0, 256, size=(90, 3, 8, 8), dtype=np.uint8)
    feeds = [{"x": images[i : i + 32]} for i in range(0, 90, 32)]
    stored = {}
    for pin in (True, False):
        program = teacher_program(Scale(), devices=[device], pin_inputs=pin)
        assert program.pin_inputs is pin
        kd.dump(program, feeds, tmp_path / str(pin), progress=False)
        stored[pin] = kd.from_record_batch(kd.StoreReader(tmp_path / str(pin)).read(0, 90))
    np.testing.assert_allclose(stored[True]["logits"], stored[False]["logits"], rtol=1e-5)
    with torch.inference_mode():
        expected = Scale()(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(stored[True]["logits"], expected, rtol=1e-4, atol=1e-5)


def test_a_buffer_that_cannot_be_pinned_is_an_ordinary_one_and_says_so(caplog):
    # Without an accelerator torch cannot pin memory: the lane still works, copying from
    # ordinary memory, and says why (on a machine with CUDA the pinning succeeds).
    staging = Staging(torch.device("cpu"), pin=True)
    images = RNG.integers(0, 256, size=(4, 3, 8, 8), dtype=np.uint8)
    with caplog.at_level("WARNING", logger="kdserve"):
        (out,) = staging.copy([("images", images)])
    np.testing.assert_array_equal(out.numpy(), images)
    pinned = torch.cuda.is_available()
    assert staging.pin is pinned and staging.buffers["images"].is_pinned() is pinned
    assert ("could not pin 1024 bytes for input 'images'" in caplog.text) is not pinned
