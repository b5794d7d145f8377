"""torch.compile(fullgraph=True) of quantized models: no graph breaks, same results as eager."""

import copy

import pytest
import torch
from torch import nn

import tquant

from helpers import small_qmap


def mlp():
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))


def cnn():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 5))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles new model instances: start from an empty dynamo cache."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


CASES = [pytest.param(mlp, (6, 12), id="mlp"), pytest.param(cnn, (2, 3, 8, 8), id="cnn")]


@pytest.mark.parametrize("build, shape", CASES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_fullgraph_compile_matches_eager(build, shape, symmetric, backend):
    torch.manual_seed(0)
    eager = tquant.convert_to_quantized(build(), small_qmap(8, 8, symmetric=symmetric, per_channel=True))
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    for step in range(2):  # the first step initialises the quantizers inside the compiled graph
        x = torch.randn(shape) * (step + 1)
        y_e, y_c = eager(x), compiled(x)
        torch.testing.assert_close(y_c, y_e, rtol=0, atol=0)
        y_e.square().sum().backward()
        y_c.square().sum().backward()
    for (name, p_e), p_c in zip(eager.named_parameters(), twin.parameters()):
        if p_e.grad is not None:
            torch.testing.assert_close(p_c.grad, p_e.grad, msg=name)
    for (name, b_e), b_c in zip(eager.named_buffers(), twin.buffers()):
        assert torch.equal(b_e, b_c), name
    eager.eval()
    twin.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(compiled(x), eager(x), rtol=0, atol=0)


def test_fullgraph_compile_learned_ranges():
    model = tquant.convert_to_quantized(mlp(), small_qmap(4, 8, symmetric=False))
    model(torch.randn(6, 12))
    tquant.learn_ranges(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(torch.randn(6, 12)).sum().backward()
    q = model[0].weight_quantizer.quantizer
    assert q._delta.grad is not None and q._zero_float.grad is not None
