"""kdserve.core.half: float16 casts through torch (when loaded) equal numpy's, bit for bit
(NaNs stay NaN; torch may change their sign and payload bits)."""

import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # loaded: the casts below go through it

from kdserve.core.codecs import Bf16  # noqa: E402
from kdserve.core.half import MIN_SIZE, astype, bfloat16_bits  # noqa: E402

ALL_HALVES = np.arange(1 << 16, dtype=np.uint16).view(np.float16)  # every bit pattern


def _through_torch(cast, *args):
    """``cast(*args)``, and whether torch ran a copy for it (its profiler says)."""
    with torch.autograd.profiler.profile() as prof:
        out = cast(*args)
    return out, any(e.name == "aten::copy_" for e in prof.function_events)


def _assert_same_bits(got, expected):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got), nan)
    bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[got.dtype.itemsize]
    np.testing.assert_array_equal(got[~nan].view(bits), expected[~nan].view(bits))


@pytest.mark.parametrize("wide", [np.float32, np.float64])
def test_every_float16_widens_exactly_as_numpy_widens_it(wide):
    got, torch_ran = _through_torch(astype, ALL_HALVES, wide)
    assert torch_ran
    _assert_same_bits(got, ALL_HALVES.astype(wide))


def _hard_float32s():
    """float32s where rounding to float16 is hardest: every float16 value, the midpoints
    between neighbours (ties: to even), a float32 step either side of them, the subnormal
    and overflow ranges, and random bit patterns."""
    finite = ALL_HALVES[np.isfinite(ALL_HALVES)].astype(np.float64)
    finite = np.unique(finite)
    mids = ((finite[1:] + finite[:-1]) / 2).astype(np.float32)
    near = [mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf))]
    edges = np.float32([65504, 65519.99, 65520, 65536, 1e10, np.inf, -np.inf, np.nan, 0.0])
    tiny = np.float32(2.0**-25) * np.arange(-4096, 4096, dtype=np.float32)
    noise = np.random.default_rng(0).integers(0, 1 << 32, 1 << 20, dtype=np.uint32)
    return np.concatenate(
        [finite.astype(np.float32), *near, edges, -edges, tiny, noise.view(np.float32)]
    )


def test_float32_and_float64_round_to_float16_exactly_as_numpy_rounds_them():
    wide32 = _hard_float32s()
    with np.errstate(over="ignore", invalid="ignore"):
        got, torch_ran = _through_torch(astype, wide32, np.float16)
        assert torch_ran
        _assert_same_bits(got, wide32.astype(np.float16))
        # float64 just past half-way between two float16s: through float32 (torch's
        # way) it rounds to the tie first, then to even -- the wrong neighbour half the
        # time -- so numpy casts it.
        halves = ALL_HALVES[np.isfinite(ALL_HALVES)].astype(np.float64)
        ulp = np.spacing(ALL_HALVES[np.isfinite(ALL_HALVES)]).astype(np.float64)
        wide64 = np.concatenate([wide32.astype(np.float64), halves + ulp / 2 + ulp * 2.0**-20])
        _assert_same_bits(astype(wide64, np.float16), wide64.astype(np.float16))


def _bfloat16_reference(f32):
    """Round to nearest, ties to even, on the 16 bits that bfloat16 drops."""
    bits = f32.view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def test_bfloat16_rounding_through_torch_equals_ties_to_even_on_the_bits():
    every_top = np.arange(1 << 16, dtype=np.uint32) << 16  # every bfloat16, then nudged
    nudged = [every_top | low for low in (0, 0x7FFF, 0x8000, 0x8001, 0xFFFF)]
    f32 = np.concatenate([*(n.view(np.float32) for n in nudged), _hard_float32s()])
    got, torch_ran = _through_torch(bfloat16_bits, f32)
    assert torch_ran
    nan = np.isnan(f32)
    np.testing.assert_array_equal(got[~nan], _bfloat16_reference(f32)[~nan])
    assert np.isnan((got[nan].astype(np.uint32) << 16).view(np.float32)).all()
    step = len(f32) // (MIN_SIZE - 1)
    small = np.ascontiguousarray(f32[::step][: MIN_SIZE - 1])  # too few: numpy's passes
    small_got, torch_ran = _through_torch(bfloat16_bits, small)
    real = ~np.isnan(small)
    assert not torch_ran
    np.testing.assert_array_equal(small_got[real], _bfloat16_reference(small)[real])
    # the codec sets NaNs to one pattern and keeps finite values finite, either way
    coded = Bf16().encode(f32, "x")["data"]
    assert (coded[nan] == 0x7FC0).all()
    finite = np.isfinite(f32)
    assert ((coded[finite] & 0x7FFF) < 0x7F80).all()


def test_store_memory_strides_and_odd_inputs_cast_without_warnings():
    big = np.random.default_rng(1).standard_normal((64, 512)).astype(np.float32)
    read_only = big.copy()
    read_only.flags.writeable = False  # as a store's memory-mapped arrays are
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps read-only numpy arrays
        cases = {
            "read-only": read_only,
            "strided": big[:, ::2],
            "broadcast": np.broadcast_to(big[0], (64, 512)),  # stride 0
            "unaligned": np.frombuffer(b"\0" + big.tobytes(), np.uint8)[1:].view(np.float32),
            "reversed": big[::-1],  # negative strides: numpy casts it (torch would abort)
            "big-endian": big.astype(">f4"),  # not a native float: numpy casts it
            "small": big[:2, :8],  # under MIN_SIZE: numpy casts it
        }
        for name, array in cases.items():
            got = astype(array, np.float16)
            _assert_same_bits(got, array.astype(np.float16))
            assert got.flags.writeable, name
    assert astype(big[:2, :8], np.float16).size < MIN_SIZE
    same, torch_ran = _through_torch(astype, big, np.float32)  # no float16: numpy's astype
    assert same is not big and not torch_ran
    ints, torch_ran = _through_torch(astype, np.arange(MIN_SIZE * 2), np.float16)
    assert not torch_ran and ints[-1] == np.float16(MIN_SIZE * 2 - 1)
    assert _through_torch(astype, read_only, np.float16)[1]  # store memory: torch reads it


def test_kdserve_never_imports_torch_itself():
    # the casts use torch only where the process loaded it: kdserve's core stays light
    code = "import sys, kdserve, kdserve.core.half; print('torch' in sys.modules)"
    run = [sys.executable, "-c", code]
    out = subprocess.run(run, check=True, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False"


_BIG = np.random.default_rng(2).standard_normal(1 << 20).astype(np.float32)


def _cast_in_child(conn):
    conn.send_bytes(astype(_BIG, np.float16).tobytes())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() of a threaded process
def test_a_child_forked_after_torch_used_its_threads_still_casts():
    # torch's OpenMP threads do not survive a fork: a child that enters a parallel region
    # hangs. The casts run in pieces torch keeps on the calling thread.
    import multiprocessing

    torch.ones(1 << 22).add_(1)  # a parallel region in the parent (2+ threads here)
    expected = astype(_BIG, np.float16)
    ctx = multiprocessing.get_context("fork")
    mine, theirs = ctx.Pipe()
    child = ctx.Process(target=_cast_in_child, args=(theirs,))
    child.start()
    try:
        assert mine.poll(30), "the forked child's cast hung"
        got = np.frombuffer(mine.recv_bytes(), np.float16)
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
    np.testing.assert_array_equal(got, expected)


def test_a_torch_that_cannot_cast_leaves_the_casts_to_numpy(monkeypatch):
    # A process may have loaded a torch older than kdserve's extra (no torch.from_dlpack):
    # the casts are numpy's then, the same values.
    import types

    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    wide = _BIG.reshape(1024, 1024)
    _assert_same_bits(astype(wide, np.float16), wide.astype(np.float16))
    np.testing.assert_array_equal(bfloat16_bits(wide), _bfloat16_reference(wide))
