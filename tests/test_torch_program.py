"""kdserve.torch.teacher_program: an nn.Module as a teacher program."""

import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import kdserve as kd  # noqa: E402
from _helpers import torch_devices, wait_for  # noqa: E402
from kdserve.torch import teacher_program  # noqa: E402

X = np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(0.5), nn.Linear(12, 5))


def _direct(model, *arrays):
    model.eval()
    with torch.no_grad():
        return model(*(torch.from_numpy(a) for a in arrays)).numpy()


class _Tuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x):
        h = self.lin(x)
        return h, h.argmax(-1)


class _Dict(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x, y):
        return {"logits": self.lin(x) + y, "hidden": x * 2, "extra": None}


def test_tensor_output_equals_the_module_in_eval_mode():
    model = _mlp()
    model.train()
    program = teacher_program(model, inputs=["x"], devices=["cpu"])
    assert not model.training and program.module is model and program.replicas == [model]
    feed = {"x": X, "label": np.arange(16)}
    first = program(feed)
    assert set(first) == {"logits"} and isinstance(first["logits"], np.ndarray)
    assert first["logits"].dtype == np.float32 and first["logits"].shape == (16, 5)
    np.testing.assert_array_equal(first["logits"], program(feed)["logits"])  # dropout is off
    np.testing.assert_allclose(first["logits"], _direct(model, X), rtol=1e-5, atol=1e-6)


def test_batchnorm_uses_running_stats_and_no_grad_is_tracked():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    bn = model[1]
    bn.running_mean.fill_(3.0)
    bn.running_var.fill_(4.0)
    seen = []
    model.register_forward_hook(
        lambda m, i, o: seen.append((o.requires_grad, torch.is_grad_enabled()))
    )
    out = teacher_program(model, devices=["cpu"])({"x": X[:1]})["logits"]  # batch of 1: ok
    lin = model[0]
    expected = (X[:1] @ lin.weight.detach().numpy().T + lin.bias.detach().numpy() - 3.0) / np.sqrt(
        4.0 + bn.eps
    ) * bn.weight.detach().numpy() + bn.bias.detach().numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert bn.running_mean.eq(3.0).all()  # not updated
    assert seen == [(False, False)]


def test_default_inputs_are_all_feeds_in_order_except_sample_id():
    calls = []

    class Two(nn.Module):
        def forward(self, a, b):
            calls.append((a.shape, b.shape))
            return a.sum(-1) + b

    program = teacher_program(Two(), outputs="s", devices=["cpu"])
    out = program({"a": X, "b": np.ones(16, np.float32), "sample_id": np.arange(16)})
    np.testing.assert_allclose(out["s"], X.sum(-1) + 1, rtol=1e-5, atol=1e-6)
    assert calls == [(torch.Size([16, 6]), torch.Size([16]))]
    # explicit inputs pick and order the feeds; read-only feed arrays are fine
    ro = X.copy()
    ro.flags.writeable = False
    out = teacher_program(Two(), inputs=["b", "a"], outputs=["s"], devices=["cpu"])(
        {"a": np.ones((16,), np.float32), "b": ro, "c": "ignored"}
    )
    np.testing.assert_allclose(out["s"], X.sum(-1) + 1, rtol=1e-5, atol=1e-6)


def test_tuple_and_dict_outputs():
    model = _Tuple()
    out = teacher_program(model, outputs=["logits", "pred"], devices=["cpu"])({"x": X})
    direct = _direct(model.lin, X)
    np.testing.assert_allclose(out["logits"], direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["pred"], direct.argmax(-1))
    assert out["pred"].dtype == np.int64

    d = _Dict()
    y = np.full((16, 3), 0.5, np.float32)
    out = teacher_program(d, devices=["cpu"])({"x": X, "y": y})  # default: "logits" selected
    assert list(out) == ["logits"]
    np.testing.assert_allclose(out["logits"], _direct(d.lin, X) + 0.5, rtol=1e-5, atol=1e-6)
    out = teacher_program(d, outputs=["hidden", "logits"], devices=["cpu"])({"x": X, "y": y})
    assert list(out) == ["hidden", "logits"]
    np.testing.assert_array_equal(out["hidden"], X * 2)


def test_mismatched_outputs_and_inputs_raise_clear_errors():
    feed = {"x": X}
    with pytest.raises(ValueError, match=r"tuple of 2 items.*outputs=\[\.\.\.\] with 2 names"):
        teacher_program(_Tuple(), devices=["cpu"])(feed)
    with pytest.raises(ValueError, match=r"tuple of 2 items but outputs=\['a'\] names 1"):
        teacher_program(_Tuple(), outputs=["a"], devices=["cpu"])(feed)
    with pytest.raises(ValueError, match=r"lacks outputs \['probs'\].*'logits', 'hidden'"):
        teacher_program(_Dict(), outputs=["probs"], devices=["cpu"])({"x": X, "y": X[:, :3]})
    with pytest.raises(TypeError, match=r"output 'extra' is a NoneType, not a Tensor"):
        teacher_program(_Dict(), outputs=["extra"], devices=["cpu"])({"x": X, "y": X[:, :3]})
    with pytest.raises(ValueError, match=r"one tensor but outputs=\['a', 'b'\] names 2"):
        teacher_program(_mlp(), outputs=["a", "b"], devices=["cpu"])(feed)
    with pytest.raises(ValueError, match=r"inputs \['z'\] are not in the feed.*\['x'\]"):
        teacher_program(_mlp(), inputs=["z"], devices=["cpu"])(feed)

    class Scalar(nn.Module):
        def forward(self, x):
            return 3

    with pytest.raises(TypeError, match=r"returned a int; .*Tensor"):
        teacher_program(Scalar(), devices=["cpu"])(feed)
    with pytest.raises(ValueError, match=r"ragged input 'y' has row lengths \[1, 3\]"):
        teacher_program(_Dict(), devices=["cpu"])(
            {"x": [np.ones(2), np.ones(3)], "y": [np.ones(1), np.ones(3)]}
        )
    with pytest.raises(TypeError, match=r"nn\.Module"):
        teacher_program(lambda f: f)
    with pytest.raises(TypeError, match=r"floating torch\.dtype"):
        teacher_program(_mlp(), autocast=torch.int8)
    with pytest.raises(ValueError, match="at least one device"):
        teacher_program(_mlp(), devices=[])
    with pytest.raises(ValueError, match="repeat a name"):
        teacher_program(_mlp(), outputs=["a", "a"])


@pytest.mark.parametrize("device", torch_devices())
def test_autocast_bf16_is_close_to_fp32(device):
    model = _mlp()
    fp32 = teacher_program(model, devices=[device])({"x": X})["logits"]
    bf16 = teacher_program(model, devices=[device], autocast=torch.bfloat16)({"x": X})["logits"]
    assert bf16.dtype == np.float32
    assert not np.array_equal(bf16, fp32)  # autocast really ran the linears in bf16
    np.testing.assert_allclose(bf16, fp32, rtol=3e-2, atol=3e-2)


class _Sleepy(nn.Module):
    def __init__(self, log):
        super().__init__()
        self.lin = nn.Linear(6, 2)
        self.log = log
        self.meet = None  # a Barrier: the first calls must be inside forward at the same time
        self.pause = 0.3  # seconds a call not meeting another sleeps

    def forward(self, x):
        self.log.append((id(self), threading.get_ident()))
        # Only the first round meets: which lane a later call takes depends on which
        # call of the round finished first (lanes balance by calls pending), so a later
        # pair may share a lane and would wait for each other in vain.
        if self.meet is not None and len(self.log) <= self.meet.parties:
            self.meet.wait(timeout=10)  # BrokenBarrierError if the calls were serialised
        else:
            time.sleep(self.pause)
        return self.lin(x)


def test_replicas_run_concurrent_calls_in_parallel():
    log = []
    model = _Sleepy(log)
    program = teacher_program(model, devices=["cpu", "cpu"])
    assert len(program.replicas) == 2 and program.replicas[0] is model
    assert program.replicas[1] is not model and not program.replicas[1].training
    torch.testing.assert_close(program.replicas[1].lin.weight, model.lin.weight)
    program.replicas[1].log = log  # deepcopy copied the list too; share it to observe
    meet = threading.Barrier(2)
    for replica in program.replicas:
        replica.meet = meet
    results = [None, None]

    def call(i):
        results[i] = program({"x": X})["logits"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not meet.broken and results[0] is not None and results[1] is not None
    for replica in program.replicas:
        replica.meet = None
    assert {r for r, _ in log} == {id(program.replicas[0]), id(program.replicas[1])}
    assert len({t for _, t in log}) == 2
    np.testing.assert_array_equal(results[0], results[1])

    # Sequential calls go round-robin.
    log.clear()
    for _ in range(4):
        program({"x": X})
    ids = [r for r, _ in log]
    assert ids[0] != ids[1] and ids[0] == ids[2] and ids[1] == ids[3]

    # Three concurrent calls on two replicas: one waits for a free replica.
    log.clear()
    threads = [threading.Thread(target=program, args=({"x": X},)) for _ in range(3)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    assert len(log) == 3 and elapsed > 0.55  # two rounds of 0.3 s: one call had to wait


def test_teacher_stores_the_models_logits(tmp_path):
    model = _mlp(3)
    n = 50
    xs = np.random.default_rng(1).normal(size=(n, 6)).astype(np.float32)

    def samples():
        for i in range(n):
            yield xs[i], i % 5, i

    with kd.Teacher(tmp_path / "store", progress=False) as teacher:
        written = teacher.start_knowledge_service(
            feed_list=["x", "label", "sample_id"],
            schema=["logits", "label"],
            program=teacher_program(model, inputs=["x"], devices=["cpu"]),
            reader_config={"sample_generator": samples, "batch_size": 8},
        )
    assert written == n
    reader = kd.StoreReader(tmp_path / "store")
    assert len(reader) == n
    stored = kd.from_record_batch(reader.read(0, n))
    np.testing.assert_array_equal(stored["sample_id"], np.arange(n))
    np.testing.assert_allclose(stored["logits"], _direct(model, xs), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(stored["label"], np.arange(n) % 5)


@pytest.mark.parametrize("device", torch_devices())
def test_teacher_runs_replicas_concurrently_with_inference_threads(tmp_path, device):
    log = []
    model = _Sleepy(log)
    program = teacher_program(model, devices=[device, device])
    meet = threading.Barrier(2)
    for replica in program.replicas:
        replica.log, replica.meet = log, meet  # the first two calls wait for each other
    _dump_with_two_threads_and_check(program, model, tmp_path)
    assert not meet.broken  # the first two calls met: two replicas ran at the same time
    assert {r for r, _ in log} == {id(r) for r in program.replicas}


def _dump_with_two_threads_and_check(program, model, tmp_path):
    """Dump 40 rows in 4 batches with num_inference_threads=2; the stored logits are the
    model's."""
    x = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    # A declared schema: an inferred one would run the first batch alone, to learn it.
    schema = kd.Schema([kd.Field("logits", "float32", (2,))])
    with kd.Teacher(tmp_path / "store", progress=False) as teacher:
        teacher.start_knowledge_service(
            ["x"],
            schema,
            program,
            [(x[i : i + 10],) for i in range(0, 40, 10)],
            num_inference_threads=2,
        )
    stored = kd.from_record_batch(kd.StoreReader(tmp_path / "store").read(0, 40))
    with torch.inference_mode():
        expected = model.lin.cpu()(torch.from_numpy(x)).numpy()
    # A GPU's kernels round differently from the CPU's: a tolerance that fits both.
    np.testing.assert_allclose(stored["logits"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", torch_devices())
def test_output_dtype_casts_on_the_device_before_the_copy(tmp_path, device):
    model = _mlp(4)
    expected = _direct(model, X)
    program = teacher_program(model, inputs=["x"], devices=[device], output_dtype=torch.float16)
    out = program({"x": X})["logits"]
    assert out.dtype == np.float16
    np.testing.assert_allclose(out, expected, rtol=2e-3, atol=2e-3)
    kd.dump(program, [{"x": X}], tmp_path / "s", progress=False)
    assert kd.StoreReader(tmp_path / "s").schema["logits"].dtype == np.float16
    with pytest.raises(TypeError, match="numpy has no bfloat16"):
        teacher_program(model, output_dtype=torch.bfloat16)


class _Scaled(nn.Module):
    """x times ``scale``, with -inf (a masked entry) in column 0."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return torch.cat([torch.full_like(x[:, :1], -torch.inf), x[:, 1:] * self.scale], 1)


def test_a_plain_program_may_return_bfloat16_tensors(tmp_path):
    def program(feed):  # not a teacher_program: kdserve converts what it returns
        return {"logits": (torch.as_tensor(feed["x"]) * 3).to(torch.bfloat16)}

    kd.dump(program, [{"x": X}], tmp_path / "s", progress=False)
    stored = kd.from_record_batch(kd.StoreReader(tmp_path / "s").read(0, len(X)))
    assert stored["logits"].dtype == np.float32  # numpy has no bfloat16
    np.testing.assert_allclose(stored["logits"], X * 3, rtol=1e-2)


@pytest.mark.parametrize("device", torch_devices())
def test_output_dtype_float16_refuses_values_it_would_make_inf(tmp_path, device):
    half = dict(devices=[device], outputs="feat", output_dtype=torch.float16)
    out = teacher_program(_Scaled(1e4), **half)({"x": X})["feat"]  # within 65504
    assert out.dtype == np.float16 and np.isneginf(out[:, 0]).all()  # -inf stays
    np.testing.assert_allclose(out[:, 1:], X[:, 1:] * 1e4, rtol=1e-3)
    with pytest.raises(ValueError, match=r"beyond float16's range \(max \|x\| = .* leave output"):
        kd.dump(teacher_program(_Scaled(1e5), **half), [{"x": X}], tmp_path / "s", progress=False)


@pytest.mark.parametrize("device", torch_devices())
def test_streams_run_two_calls_on_one_replica_at_once(tmp_path, device):
    log = []
    model = _Sleepy(log)
    program = teacher_program(model, devices=[device], streams=2)
    assert program.replicas == [model]  # one copy of the weights, two lanes
    model.meet = threading.Barrier(2)  # the first two calls wait for each other
    _dump_with_two_threads_and_check(program, model, tmp_path)
    assert not model.meet.broken and len(log) == 4
    assert len({t for _, t in log}) == 2  # two threads ran the one module concurrently
    with pytest.raises(ValueError, match="streams must be an int >= 1"):
        teacher_program(model, devices=["cpu"], streams=0)


@pytest.mark.parametrize("device", torch_devices())
def test_two_streams_per_gpu_by_default_and_as_many_inference_threads(tmp_path, device):
    # A GPU gets two lanes per device by default (copies overlap the other lane's forward
    # pass); kd.dump calls the program from program.concurrency threads unless told: one
    # per lane.
    lanes = 2 if device == "cuda" else 1
    assert teacher_program(_mlp(), devices=[device]).concurrency == lanes
    assert teacher_program(_mlp(), devices=[device, device]).concurrency == 2 * lanes
    assert teacher_program(_mlp(), devices=[device], streams=3).concurrency == 3
    log = []
    model = _Sleepy(log)
    program = teacher_program(model, devices=[device, device], streams=1)
    meet = threading.Barrier(2)
    for replica in program.replicas:
        replica.log, replica.meet = log, meet  # the first two calls wait for each other
    x = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    schema = kd.Schema([kd.Field("logits", "float32", (2,))])
    kd.dump(
        program,
        [{"x": x[i : i + 10]} for i in range(0, 40, 10)],
        tmp_path / "s",
        keep=schema,
        progress=False,
    )  # no inference_threads=: the program's 2
    assert not meet.broken and len({t for _, t in log}) == 2  # each lane on its thread
    stored = kd.from_record_batch(kd.StoreReader(tmp_path / "s").read(0, 40))
    with torch.inference_mode():
        expected = model.lin.cpu()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(stored["logits"], expected, rtol=1e-4, atol=1e-5)


class _CausalLM(nn.Module):
    """A tiny causal LM: embedding, causal attention over the prefix, logits per position."""

    def __init__(self, vocab=11, dim=8):
        super().__init__()
        torch.manual_seed(5)
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)
        self.masks = []

    def forward(self, tokens, attention_mask=None):
        self.masks.append(attention_mask)
        h = self.emb(tokens)
        steps = tokens.shape[1]
        causal = torch.ones(steps, steps, device=tokens.device).tril()
        h = (causal / causal.sum(-1, keepdim=True)) @ h  # each position: mean of its prefix
        return self.out(h)


def test_ragged_token_feeds_are_padded_masked_and_stored_without_padding(tmp_path):
    model = _CausalLM()
    seqs = [np.array([1, 2, 3]), np.array([4]), np.array([5, 6, 7, 8, 9])]
    program = teacher_program(
        model, inputs=["tokens"], devices=["cpu"], mask_arg="attention_mask", pad_value=0
    )
    out = program({"tokens": seqs})
    assert out["logits"].shape == (3, 5, 11) and out["logits_lengths"].tolist() == [3, 1, 5]
    mask = model.masks[-1]
    assert mask.dtype == torch.int64 and mask.tolist()[1] == [1, 0, 0, 0, 0]
    kd.dump(program, [{"tokens": seqs}], tmp_path / "s", progress=False)
    reader = kd.StoreReader(tmp_path / "s")
    assert reader.schema.names == ["logits"]  # logits_lengths only describes logits
    stored = kd.from_record_batch(reader.read(0, 3))["logits"]
    assert isinstance(stored, kd.Ragged) and stored.lengths.tolist() == [3, 1, 5]
    for i, s in enumerate(seqs):  # position j: the distribution after token j (causal)
        with torch.inference_mode():
            alone = model(torch.as_tensor(s)[None])[0].numpy()
        np.testing.assert_allclose(stored[i], alone, rtol=1e-5, atol=1e-6)


class _Scorer(nn.Module):
    """Per token, the log-probability of the next one (B, L): what sampled-token losses
    take; and four layer means per sequence (B, 4, dim), which are not per position."""

    def __init__(self):
        super().__init__()
        self.lm = _CausalLM()

    def forward(self, tokens):
        log_p = torch.log_softmax(self.lm(tokens), -1)[:, :-1]
        scores = log_p.gather(-1, tokens[:, 1:, None])[..., 0]
        layers = self.lm.emb(tokens).mean(1, keepdim=True).expand(-1, 4, -1)
        return {"logprob": nn.functional.pad(scores, (0, 1)), "layers": layers}


def test_per_token_outputs_get_lengths_and_sequence_outputs_overrides_the_guess(tmp_path):
    model = _Scorer()
    seqs = [np.array([1, 2, 3]), np.array([4, 5, 6, 7])]  # longest 4: as many as "layers"
    guessed = teacher_program(model, inputs=["tokens"], outputs=["logprob"], devices=["cpu"])
    with pytest.raises(ValueError, match=r"\['logprob'\] have shape \(batch, max_len\)"):
        guessed({"tokens": seqs})  # per token, or per sample? it must be said
    named = teacher_program(
        model, inputs=["tokens"], outputs=["logprob", "layers"], devices=["cpu"],
        sequence_outputs=["logprob"],
    )  # fmt: skip
    out = named({"tokens": seqs})
    assert "logprob_lengths" in out and "layers_lengths" not in out  # layers stay whole
    data = [{"tokens": seqs}, {"tokens": [np.array([8, 9]), np.array([1])]}]
    kd.dump(named, data, tmp_path / "s", progress=False)
    stored = kd.from_record_batch(kd.StoreReader(tmp_path / "s").read(0, 4))
    assert stored["logprob"].lengths.tolist() == [3, 4, 2, 1]
    assert stored["layers"].shape == (4, 4, 8)
    with torch.inference_mode():
        alone = model(torch.tensor([[4, 5, 6, 7]]))["logprob"][0].numpy()
    np.testing.assert_allclose(stored["logprob"][1], alone, rtol=1e-5, atol=1e-6)
    wrong = teacher_program(model, inputs=["tokens"], outputs=["logprob", "layers"],
                            devices=["cpu"], sequence_outputs=["layers"])  # fmt: skip
    with pytest.raises(ValueError, match=r"'layers' has shape \(2, 4, 8\), not \(batch, max_len"):
        wrong({"tokens": [np.array([1, 2])] * 2})
    with pytest.raises(ValueError, match=r"names \['scores'\], which the module does not"):
        teacher_program(model, inputs=["tokens"], outputs=["logprob"], devices=["cpu"],
                        sequence_outputs=["scores"])({"tokens": seqs})  # fmt: skip
    with pytest.raises(TypeError, match=r"pass \['logprob'\]"):
        teacher_program(model, sequence_outputs="logprob")


@pytest.mark.parametrize("device", torch_devices())
def test_a_lanes_calls_run_on_its_own_thread_whichever_thread_calls(device):
    # PyTorch keeps cuDNN's autotuning per thread: kd.dump and kd.serve call the program
    # from new threads, so each lane runs on a thread of its own, made once.
    log = []
    model = _Sleepy(log)
    model.pause = 0.0
    program = teacher_program(model, devices=[device])
    callers = []
    for _ in range(3):
        caller = threading.Thread(target=lambda: callers.append(program({"x": X})))
        caller.start()
        caller.join(timeout=20)
    program({"x": X})
    assert len(callers) == 3 and len(log) == 4
    lane_threads = {t for _, t in log}
    assert len(lane_threads) == 1 and threading.get_ident() not in lane_threads
    with pytest.raises(ValueError, match="returned a tuple"):  # the lane's errors reach the caller
        teacher_program(_Tuple(), devices=[device])({"x": X})


class _Gated(nn.Module):
    """Doubles its input once ``gate`` opens (shared by every replica); ``seen`` records
    the first input value of each call that ran."""

    gate: threading.Event
    seen: list[float]

    def forward(self, x):
        assert self.gate.wait(timeout=20), "the test never opened the gate"
        self.seen.append(float(x[0, 0]))
        return x * 2


def test_submit_queues_a_call_and_a_queued_call_cancelled_never_runs():
    model = _Gated()
    program = teacher_program(model, devices=["cpu", "cpu"])
    gate, seen = threading.Event(), []
    for replica in program.replicas:  # set after the copy: an Event cannot be copied
        replica.gate, replica.seen = gate, seen
    lanes = program._calls
    running = [program.submit({"x": X + i}) for i in range(2)]  # one on each lane
    queued = program.submit({"x": X + 2})  # behind one of them
    last = program.submit({"x": X + 3})  # behind the other
    assert lanes.pending == [2, 2]
    wait_for(lambda: all(f.running() for f in running), 10, "the first two calls to start")
    assert not any(f.cancel() for f in running)  # running: too late to cancel
    assert queued.cancel() and queued.cancelled()
    gate.set()
    for i, future in ((0, running[0]), (1, running[1]), (3, last)):
        np.testing.assert_array_equal(future.result(timeout=20)["logits"], (X + i) * 2)
    assert sorted(seen) == [X[0, 0] + i for i in (0, 1, 3)]  # never the cancelled one
    wait_for(lambda: lanes.pending == [0, 0], 10, "the lanes to count it done")
    failing = teacher_program(_Tuple(), devices=["cpu"]).submit({"x": X})
    assert isinstance(failing.exception(timeout=20), ValueError)  # the lane's error, as is


def test_kd_dump_keeps_one_call_queued_behind_each_running_one(tmp_path):
    # The lane starts its next batch as one ends, without waiting for kdserve's thread.
    seen = []

    class Watched(nn.Module):
        def forward(self, x):
            time.sleep(0.05)
            seen.append(list(program._calls.pending))  # as the call ends
            return x * 2

    program = teacher_program(Watched(), devices=["cpu", "cpu"])
    xs = np.arange(24 * 6, dtype=np.float32).reshape(24, 6)
    data = [{"x": xs[i : i + 2]} for i in range(0, 24, 2)]
    assert kd.dump(program, data, tmp_path / "s", progress=False) == 24
    stored = kd.from_record_batch(kd.StoreReader(tmp_path / "s").read(0, 24))
    np.testing.assert_array_equal(stored["logits"], xs * 2)
    assert max(max(p) for p in seen) == 2  # one running, one queued, never more
    assert sum(p == [2, 2] for p in seen) >= 3  # both lanes held a call in reserve


class _OutOfMemory(nn.Module):
    def forward(self, x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_with_two_streams_says_how_to_hold_one_batch():
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"streams=2.*pass streams=1"):
        teacher_program(_OutOfMemory(), devices=["cpu"], streams=2)({"x": X})
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"20\.00 GiB$"):  # one stream: as is
        teacher_program(_OutOfMemory(), devices=["cpu"])({"x": X})


def test_a_programs_lane_threads_end_with_it():
    before = set(threading.enumerate())
    program = teacher_program(_mlp(), devices=["cpu", "cpu"])
    program({"x": X})
    program({"x": X})
    lanes = [t for t in set(threading.enumerate()) - before if t.name.startswith("kdserve-lane")]
    assert len(lanes) == 2  # one thread per lane, started by its first call
    del program
    import gc

    gc.collect()
    for thread in lanes:
        thread.join(timeout=10)
    assert not any(t.is_alive() for t in lanes)


_FORKED = {}  # what a forked child calls (fork copies it; nothing is pickled)


def _call_in_child(conn):
    conn.send_bytes(_FORKED["program"]({"x": X})["logits"].tobytes())


def _logits_from_a_forked_child(program, held=()):
    """What ``program`` returns when called in a child forked while the parent holds the
    locks ``held``."""
    import multiprocessing
    from contextlib import ExitStack

    _FORKED["program"] = program
    ctx = multiprocessing.get_context("fork")
    mine, theirs = ctx.Pipe()
    with ExitStack() as holding:
        for lock in held:
            holding.enter_context(lock)
        child = ctx.Process(target=_call_in_child, args=(theirs,))
        child.start()
    try:
        assert mine.poll(30), "the forked child's call never returned"
        return np.frombuffer(mine.recv_bytes(), dtype=np.float32)
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() of a threaded process
def test_a_forked_child_gets_lane_threads_of_its_own():
    # fork copies the program but not its lane threads: a child's calls must not wait
    # forever on a thread that exists only in the parent.
    program = teacher_program(_mlp(), devices=["cpu"])
    expected = program({"x": X})["logits"]  # the parent's lane thread is running
    got = _logits_from_a_forked_child(program)
    np.testing.assert_array_equal(got.reshape(expected.shape), expected)
    np.testing.assert_array_equal(program({"x": X})["logits"], expected)  # parent still fine


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() of a threaded process
def test_a_child_forked_while_a_parent_thread_holds_the_programs_locks_does_not_hang():
    # A fork copies a lock held by another thread as held, and never releases it there:
    # the child's program gets new ones (here the parent holds them across the fork, as a
    # thread choosing a lane or starting a lane thread at that instant would).
    program = teacher_program(_mlp(), devices=["cpu"])
    expected = program({"x": X})["logits"]
    got = _logits_from_a_forked_child(program, (program._calls._lock,))
    np.testing.assert_array_equal(got.reshape(expected.shape), expected)
