"""``torch.compile`` (default inductor backend, ``fullgraph=True``) of freshly converted models.

Each model is converted, copied, and the copy compiled once; both then run the same QAT
schedule — 3 training steps (forward, backward, SGD step) from the first, initialising one,
eval, training again, eval again, then ``learn_ranges`` training and ``fix_ranges`` training.
Every step starts both from the same state (the twin loads the eager model's state first). Where
inductor runs the float ops around the quantizers as eager does (the MLP: matmuls are external
calls), outputs and every quantizer's state (range, delta, zero point) must be equal bit for bit.
Where it generates its own kernels for them (batch norm, layer norm, attention's softmax), their
outputs differ from eager's in the last bits, and so do the ranges estimated from them: there the
ranges must agree to float rounding, and the outputs within a few steps of the output quantizer
(a code flipped upstream moves the codes after it) and 2 % relative L2 error.
Gradients are compared (to float rounding) at every step whose outputs are equal, at least half
of them. Dynamo's graph count shows that the initialising step and every later one share one
graph (no recompile between step 1 and step 2) and that switching train/eval more than once adds
none.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import tquant

from helpers import assert_bits_equal, tie_values
from models import cnn_case, make_qmap, mlp_case, transformer_case


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def encoder_case(**qkw):
    """``nn.TransformerEncoderLayer`` (through ``MultiheadAttention``): its Linear/LayerNorm layers."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
    return layer, make_qmap(**qkw), lambda b: torch.randn(b, 5, 16)


CASES = [
    pytest.param(mlp_case, dict(per_channel=True), True, id="mlp"),
    pytest.param(cnn_case, dict(per_channel=True), False, id="resnet-bn"),
    pytest.param(encoder_case, dict(per_channel=True, symmetric=False), False, id="encoder-layer"),
    pytest.param(transformer_case, dict(per_channel=False), False, id="embedding-layernorm"),
]


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def assert_same_state(eager: nn.Module, twin: nn.Module, exact: bool, what: str, grads: bool = True) -> None:
    """Quantizer state bit for bit when ``exact``, else to float rounding; gradients to float rounding
    (called only when the outputs agree: a flipped code also flips straight-through masks)."""
    for (name, a), b in zip(eager.named_parameters(), twin.parameters()):
        if not grads or (a.grad is None and b.grad is None):
            continue
        tol = dict(rtol=1e-5, atol=1e-7) if exact else dict(rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(b.grad, a.grad, **tol, msg=f"{what}: gradient of {name}")
    for (name, a), b in zip(eager.state_dict().items(), twin.state_dict().values()):
        if "quantizer" not in name:
            continue
        if exact:
            assert torch.equal(a, b) or (a.isnan().all() and b.isnan().all()), f"{what}: quantizer state {name}"
        else:  # ranges follow the float ops' rounding, and flipped codes upstream when outputs differ
            tol = 1e-5 if grads else 1e-2
            torch.testing.assert_close(b, a, rtol=tol, atol=tol * 0.1, equal_nan=True, msg=f"{what}: {name}")


def assert_same_output(y_e: torch.Tensor, y_c: torch.Tensor, exact: bool, what: str) -> bool:
    """Whether the outputs are equal; when not, that they are close (and ``exact`` is False)."""
    if exact or torch.equal(y_e, y_c):
        assert torch.equal(y_e, y_c), f"{what}: outputs differ"
        return True
    # codes flipped by float rounding upstream propagate through the following quantized layers:
    # a few output steps at most, and a small relative error overall
    step = y_e.detach().flatten().unique().diff().min() if y_e.numel() > 1 else torch.tensor(0.0)
    diff = (y_c - y_e).detach().abs()
    assert diff.max() <= 3 * float(step) + 1e-6, f"{what}: outputs differ by {diff.max()} (step {step})"
    rel = diff.norm() / y_e.detach().norm().clamp_min(1e-12)
    assert rel <= 0.02, f"{what}: relative L2 difference {rel:.3g}"
    return False


def loss_of(y: torch.Tensor) -> torch.Tensor:
    return y.float().square().mean()


@pytest.mark.parametrize("case, qkw, exact", CASES)
def test_compiled_qat_matches_eager_from_a_fresh_conversion(case, qkw, exact):
    model, qmap, sample = case(**qkw)
    eager = tquant.convert_to_quantized(model, qmap)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.01)
    opt_c = torch.optim.SGD(twin.parameters(), lr=0.01)
    torch.manual_seed(2)
    batches = [sample(4) for _ in range(4)]
    steps_compared: list[bool] = []

    def train_step(x, what):
        twin.load_state_dict(eager.state_dict())  # same starting point: isolates this step
        y_e, y_c = eager(x), compiled(x)
        same = assert_same_output(y_e, y_c, exact, what)
        loss_of(y_e).backward()
        loss_of(y_c).backward()
        assert_same_state(eager, twin, exact, what, grads=same)
        steps_compared.append(same)
        for opt in (opt_e, opt_c):
            opt.step()
            opt.zero_grad()

    def eval_step(x, what):
        twin.load_state_dict(eager.state_dict())
        eager.eval()
        twin.eval()
        assert_same_output(eager(x), compiled(x), exact, what)
        eager.train()
        twin.train()

    train_step(batches[0], "step 1 (initialises every quantizer)")
    after_first = graphs()
    for step, x in enumerate(batches[1:3], 2):
        train_step(x, f"step {step}")
    assert graphs() == after_first, "a later training step recompiled"
    eval_step(batches[3], "eval")
    train_step(batches[1], "train after eval")
    eval_step(batches[2], "eval again")
    assert graphs() == after_first + 1, "train/eval switches must reuse the two graphs"

    for state_fn in (tquant.learn_ranges, tquant.fix_ranges):
        state_fn(eager)
        state_fn(twin)
        opt_e = torch.optim.SGD(eager.parameters(), lr=0.01)  # learn_ranges adds trainable parameters
        opt_c = torch.optim.SGD(twin.parameters(), lr=0.01)
        for step, x in enumerate(batches[:2], 1):
            train_step(x, f"{state_fn.__name__} step {step}")
    assert sum(steps_compared) >= len(steps_compared) // 2, "too few steps with equal outputs to compare gradients"
    if qkw.get("symmetric", True) is False:
        learned = [m.quantizer._delta for m in twin.modules() if isinstance(m, tquant.QuantizationManager)]
        assert learned and all(d.requires_grad for d in learned)


def test_inline_quantizer_math_is_the_reference_bit_for_bit(monkeypatch):
    """On the CPU inductor compiles the reference expressions (``kernels/inline.py``) in place of the
    ops: outputs, sign of zero included, ranges and parameters must be the reference's bits, for
    ties, zeros of both signs, non-finite values, fp16, both estimators' branches and all grids."""
    import importlib

    import tquant.kernels as K
    from tquant.kernels import reference as ref

    def not_inline(*args):
        raise AssertionError("the compiled code called a tquant op instead of inlining its math")

    monkeypatch.setattr(importlib.import_module("tquant.kernels.fake_quant"), "_fake_quant_impl", not_inline)
    monkeypatch.setattr(importlib.import_module("tquant.kernels.range_update"), "_update_range_impl", not_inline)

    torch.manual_seed(0)
    x = torch.cat([torch.randn(120) * 3, tie_values(0.05, 4)[::3], torch.tensor([0.0, -0.0, -1e-9, 1e-9])])
    x[::17] = float("nan")
    x[5], x[9] = float("inf"), -float("inf")
    x = x[: 8 * (x.numel() // 8)].reshape(8, -1)
    configs = [(sym, axis, bits, est) for sym in (True, False) for axis in (-1, 0)
               for bits, est in ((4, K.ESTIMATOR_RUNNING), (8, K.ESTIMATOR_ALL))]

    def fresh_state(axis):
        shape = () if axis < 0 else (x.shape[0],)
        return [torch.full(shape, float("nan")), torch.full(shape, float("nan")), torch.zeros(shape),
                torch.zeros(shape), torch.zeros((), dtype=torch.bool)]

    def run(xs, states):  # two batches per config: the initialising update, then the estimator's
        out = []
        for (sym, axis, bits, est), st in zip(configs, states):
            for xb in xs:
                K.update_range(xb.detach(), *st, bits, sym, axis, est, 0.9, False)
                out.append(K.fake_quant(xb, *st[2:], bits, sym, axis))
        return out

    xs = [x, (x.flip(1) * 1.5).half()]
    with K.use_backend("torch"):
        compiled_states = [fresh_state(axis) for _, axis, _, _ in configs]
        got = torch.compile(run, fullgraph=True)(xs, compiled_states)
    i = 0
    for (sym, axis, bits, est), st in zip(configs, compiled_states):
        old = fresh_state(axis)[:2]
        for xb in xs:
            bmin, bmax = ref.batch_minmax_reference(xb, axis)
            old = ref.update_range_reference(bmin, bmax, *old, est, 0.9)
            d, z, s = ref.qparams_from_range(*old, bits, sym)
            expected = ref.fake_quant_reference(xb, d, z, s, bits, sym, axis)
            what = f"sym={sym} axis={axis} bits={bits} est={est} {xb.dtype}"
            assert_bits_equal(got[i], expected, what)
            i += 1
        for have, want in zip(st, (*old, d, z, s)):
            assert_bits_equal(have, want, what)


def test_export_graph_has_the_tquant_ops():
    model, qmap, sample = mlp_case(per_channel=True)
    qmodel = tquant.convert_to_quantized(model, qmap)
    qmodel(sample(8))
    qmodel.eval()
    exported = torch.export.export(qmodel, (sample(2),))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "tquant.fake_quant.default" in targets, sorted(targets)
    x = sample(2)
    assert torch.equal(exported.module()(x), qmodel(x))


def test_old_checkpoint_of_uninitialised_per_channel_quantizers_loads():
    """Before fixed shapes, an uninitialised per-channel quantizer saved 0-dim NaN state."""
    model, qmap, _ = mlp_case(per_channel=True)
    qmodel = tquant.convert_to_quantized(model, qmap)
    state = qmodel.state_dict()
    old = {k: (torch.tensor(float("nan")) if k.endswith("weight_quantizer.quantizer._delta") else v)
           for k, v in state.items() if not k.endswith(("current_xmin", "current_xmax"))}
    qmodel.load_state_dict(old)
    q = qmodel.fc1.module.weight_quantizer.quantizer
    assert q._delta.shape == (256,) and q._delta.isnan().all() and not q.is_initialized
    bad = dict(state, **{"fc2.weight_quantizer.quantizer._delta": torch.ones(7)})
    with pytest.raises(RuntimeError, match="fc2.weight_quantizer: the checkpoint's per-channel range has shape"):
        qmodel.load_state_dict(bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_capture_a_full_qat_step_without_host_syncs():
    """``mode="reduce-overhead"``: the QAT step replays as CUDA graphs; no step synchronises the host."""
    model, qmap, sample = mlp_case(per_channel=True)
    qmodel = tquant.convert_to_quantized(model, qmap).cuda()
    compiled = torch.compile(qmodel, mode="reduce-overhead", fullgraph=True)
    opt = torch.optim.SGD(qmodel.parameters(), lr=0.01)
    x = sample(8).cuda()

    def step():
        loss_of(compiled(x)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # the first, initialising step, then the warm-up runs that record the graphs
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert not counters["inductor"].get("cudagraph_skips"), dict(counters["inductor"])
    q = qmodel.fc2.weight_quantizer.quantizer
    assert q.is_initialized and torch.isfinite(q._delta).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_triton_lane_on_cuda_is_eager_bit_for_bit_and_launches_its_kernels_itself():
    """Inductor launches the quantizer kernels itself (``tquant::*_triton`` triton ops decomposed into
    ``wrap_triton`` calls): the generated code names the kernels and calls no ``tquant`` op, and the QAT
    steps give eager's outputs, gradients and quantizer state bit for bit (the MLP: matmuls are extern)."""
    from torch._inductor.utils import run_and_get_code

    model, qmap, sample = mlp_case(per_channel=True)
    eager = tquant.convert_to_quantized(model, qmap).cuda()
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True)
    torch.manual_seed(3)
    for step in range(3):
        x = sample(8).cuda()
        twin.load_state_dict(eager.state_dict())
        y_e = eager(x)
        if step == 0:
            y_c, code = run_and_get_code(compiled, x)
            source = "\n".join(code)
            assert "_update_range_kernel" in source and "_fake_quant_fwd_kernel" in source
            assert "torch.ops.tquant" not in source, "an opaque tquant op in the compiled graph"
        else:
            y_c = compiled(x)
        assert_same_output(y_e, y_c, True, f"step {step}")
        loss_of(y_e).backward()
        loss_of(y_c).backward()
        assert_same_state(eager, twin, True, f"step {step}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_eager_qat_step_replays_in_a_cuda_graph():
    """An eager QAT step on the Triton lane (forward with range estimation, backward, SGD step) captured
    with ``torch.cuda.graph`` after warm-up: replays track new data like eager steps do."""
    model, qmap, sample = mlp_case(per_channel=True)
    qmodel = tquant.convert_to_quantized(model, qmap).cuda()
    reference = copy.deepcopy(qmodel)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (qmodel, reference)]
    x = sample(8).cuda()
    static_x = x.clone()

    def step(m, opt, inp):
        loss = loss_of(m(inp))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: plans, compiles and binds every kernel outside the capture
        for _ in range(2):
            step(qmodel, opts[0], static_x)
            step(reference, opts[1], x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(qmodel, opts[0], static_x)
    for i in range(3):
        new = sample(8).cuda() * (1 + i)
        static_x.copy_(new)
        graph.replay()
        expected = step(reference, opts[1], new)
        torch.testing.assert_close(static_loss, expected, rtol=0, atol=0)
    assert_same_state(reference, qmodel, True, "after replays", grads=False)
