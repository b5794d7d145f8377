"""The graph path of ``convert_to_quantized(model, qmap, example_inputs=...)``: integer chains without name lists.

The module map sees modules, not what ``forward`` does between them. With example inputs the
converter traces the model with ``torch.fx`` (the float model: ``torch.nn`` layers and tquant's
quantized layers are leaves), converts the leaves with the map as without example inputs, and
then walks the graph once, in order, deciding for every tensor whether it is on an integer grid
and which quantizer put it there. The result is an ``fx.GraphModule`` with the original module
paths (``layer1.conv1``) plus the quantizers it inserted (``layer1.add_quant``).

What the walk does, and why (onnxruntime fuses ``DequantizeLinear → op → QuantizeLinear`` into
an integer kernel only when every input of the op comes from a DequantizeLinear and its output
goes to one QuantizeLinear; its QDQ selectors name the ops):

- **integer ops** (``+``/``add``, ``*``/``mul`` of two tensors, ``cat``, ``matmul``/``bmm``,
  ``softmax``, ``sigmoid``, ``mean``, ``avg_pool``/``adaptive_avg_pool``): every float input gets a
  quantizer, the result gets an output quantizer (``<scope>.<op>_quant``) — QLinearAdd, QLinearMul,
  QLinearConcat, QLinearMatMul, QLinearSoftmax, QLinearSigmoid, QLinear(Global)AveragePool;
- **layers** (converted Linear/Conv): a float input gets an input quantizer exactly there; their own
  output quantizer is kept (QGemm, QLinearConv);
- **grid-preserving ops** (``max_pool``, ``flatten``/``reshape``/``view``/``permute``/``transpose``/
  ``squeeze``/``unsqueeze``/``contiguous``, indexing, ``chunk``/``split``, dropout, identity): the result
  is on its input's grid, so nothing is inserted (onnxruntime propagates the DequantizeLinear
  through them or drops the pair around them);
- **activations**: with ``fold_activations``, a ReLU/ReLU6/Hardtanh/``clamp`` (module or functional)
  whose producer has no other user is folded into it: a converted Linear/Conv runs it before its
  output quantizer (``activation_function``), an integer op gets its output quantizer after the
  activation (onnxruntime's Relu/Clip-QuantizeLinear fusions remove it); GELU/SiLU after a Linear is
  folded the same way (QGemm with a float output, then the activation, then one QuantizeLinear);
- **batch norm**: with ``fold_batch_norm``, a converted Conv1d/2d/3d or Linear (``[N, C]`` output) whose
  only user is a batch norm becomes a :class:`~tquant.folding.QuantConvBn2d` (``QuantConvBn1d``,
  ``QuantConvBn3d``, ``QuantLinearBn1d``);
- **never twice**: a tensor is quantized at most once; every consumer that needs it quantized reads
  the same quantizer, and a tensor already on a grid (an output quantizer, through grid-preserving
  ops) is never quantized again; an ``input_activation_qconfig_map`` entry for a layer whose input is
  already quantized is ignored with a warning;
- **model outputs**: a Linear whose output is only a model output keeps it float (QGemm writes float
  directly; an output quantizer there would feed no integer op and only cost precision);
- **int32 biases** (``quantize_bias``): each Linear/Conv is linked to the quantizer its input comes
  from, wherever it sits in the graph;
- **attention**: ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` are converted to
  :class:`~tquant.attention.QuantMultiheadAttention` / :class:`~tquant.attention.QuantTransformerEncoderLayer`
  unless the map maps or excludes them.

Everything else (LayerNorm, GELU after a conv, ``x * 0.5``, an excluded module) runs in float on what
it receives; a quantized consumer after it gets an input quantizer.

Tracing: a submodule whose ``forward`` cannot be traced (data-dependent control flow, ...) is kept
as one opaque leaf, converted by the map inside, and named in a :class:`TracingFallbackWarning`;
when the top-level ``forward`` itself cannot be traced, the whole conversion falls back to the
module-level path, with the same warning giving the reason.
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Callable

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn import functional as F

from .attention import QuantMultiheadAttention, QuantTransformerEncoderLayer
from .base_modules import FP32Acts, QuantizationHijacker, QuantizedActivation, QuantizedModule
from .config import (
    ActivationQuantConfig,
    QuantizationMap,
    QuantizedModuleConfig,
    RangeEstimators,
    convert_act_config_to_kwargs_dict,
)
from .fixed_range import probability_quantizer
from .folding import FOLDED_CLASSES, fold_batch_norm
from .layers import QuantLinear
from .quantization_manager import QuantizationManager

__all__ = ["GRAPH_CONVERSIONS", "TracingFallbackWarning", "convert_graph", "trace"]

GRAPH_CONVERSIONS = {
    nn.MultiheadAttention: QuantMultiheadAttention,
    nn.TransformerEncoderLayer: QuantTransformerEncoderLayer,
}
"""Converted by the graph path with the map's ``default_qconfig`` unless the map maps or excludes them."""

MAX_OPAQUE_RETRIES = 16
"""Submodules the tracer may give up on (each kept as an opaque leaf) before the graph path gives up."""


class TracingFallbackWarning(UserWarning):
    """The graph path could not trace (part of) the model: that part was converted module by module."""


class GraphTraceError(RuntimeError):
    """``torch.fx`` could not trace the model's top-level ``forward``."""


# -- op tables -------------------------------------------------------------------------------------
# call_function targets and call_method names, by what the walk does with them
_ADD = {operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__radd__"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_", "__mul__", "__rmul__"}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_MATMUL = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm", "__matmul__"}
_UNARY_INTEGER = {
    F.softmax, torch.softmax, "softmax", torch.sigmoid, F.sigmoid, "sigmoid", torch.mean, "mean",
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
}
_GRID = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.flatten, torch.reshape, torch.permute, torch.transpose,
    torch.squeeze, torch.unsqueeze, torch.t, torch.chunk, torch.split, torch.unbind, torch.narrow,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.max_pool1d, torch.max_pool2d, torch.max_pool3d,
    "flatten", "view", "reshape", "permute", "transpose", "contiguous", "squeeze", "unsqueeze", "t",
    "chunk", "split", "unbind", "narrow", "expand", "expand_as", "view_as", "reshape_as", "unflatten",
    "swapaxes", "movedim", operator.getitem,
}
_INTEGER_MODULES = (nn.Softmax, nn.Sigmoid, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_GRID_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout,
                 nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_FOLDABLE_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
_FLOAT_ACTIVATION_MODULES = (nn.GELU, nn.SiLU)
"""Folded into a Linear only: QGemm can output float, QLinearConv cannot."""
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _foldable_activation(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The module equivalent of a ReLU-family activation node (None when it is not one)."""
    if node.op == "call_module":
        m = modules[node.target]
        return copy.deepcopy(m) if isinstance(m, _FOLDABLE_MODULES) else None
    if node.op not in ("call_function", "call_method"):
        return None
    t = node.target
    if t in (F.relu, torch.relu, torch.relu_, F.relu_, "relu", "relu_"):
        return nn.ReLU()
    if t in (F.relu6, "relu6"):
        return nn.ReLU6()
    if t in (F.hardtanh, F.hardtanh_):
        lo, hi = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
        return nn.Hardtanh(float(lo), float(hi)) if _number(lo) and _number(hi) else None
    if t in (torch.clamp, torch.clip, "clamp", "clip", "clamp_", "clip_", torch.clamp_min, "clamp_min", "clamp_min_"):
        lo = _arg(node, 1, "min")
        hi = None if "min" in str(t) else _arg(node, 2, "max")
        if lo == 0 and hi is None:
            return nn.ReLU()
        if _number(lo) and _number(hi) and lo < hi:
            return nn.ReLU6() if (lo, hi) == (0, 6) else nn.Hardtanh(float(lo), float(hi))
    return None


def _float_activation(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    """GELU/SiLU as a module (folded into a Linear producer only)."""
    if node.op == "call_module":
        m = modules[node.target]
        return copy.deepcopy(m) if isinstance(m, _FLOAT_ACTIVATION_MODULES) else None
    if node.op == "call_function" and node.target is F.gelu:
        return nn.GELU(approximate=node.kwargs.get("approximate", "none"))
    if node.op == "call_function" and node.target is F.silu:
        return nn.SiLU()
    return None


# -- tracing -----------------------------------------------------------------------------------------
class _Tracer(fx.Tracer):
    """``torch.fx`` tracer with extra leaves: tquant's quantized modules and the opaque submodules."""

    def __init__(self, opaque: set[str]):
        super().__init__()
        self.opaque = opaque
        self.failed_at: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.opaque or isinstance(m, QuantizedModule):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:  # the innermost module whose forward failed
                self.failed_at = self.path_of_module(m)
            raise


def trace(model: nn.Module) -> tuple[fx.GraphModule, dict[str, str]]:
    """``(graph module, {opaque submodule path: why})``: ``model`` traced with ``torch.fx``.

    A submodule whose ``forward`` fails to trace is retried as a leaf (up to :data:`MAX_OPAQUE_RETRIES`).

    Raises:
        GraphTraceError: the top-level ``forward`` cannot be traced (the message says why).
    """
    opaque: dict[str, str] = {}
    for _ in range(MAX_OPAQUE_RETRIES + 1):
        tracer = _Tracer(set(opaque))
        try:
            graph = tracer.trace(model)
        except Exception as e:  # fx raises TraceError, TypeError, AttributeError... from user code
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
            if not tracer.failed_at or tracer.failed_at in opaque:
                raise GraphTraceError(reason) from e
            opaque[tracer.failed_at] = reason
            continue
        return fx.GraphModule(tracer.root, graph, class_name=type(model).__name__), opaque
    raise GraphTraceError(f"more than {MAX_OPAQUE_RETRIES} submodules could not be traced")


def _as_args(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        "convert_to_quantized: example_inputs must be a tensor or a tuple of inputs, got "
        f"{type(example_inputs).__name__}"
    )


def _run_eval(model: nn.Module, fn: Callable) -> None:
    """``fn()`` with ``model`` in eval mode and without gradients; training flags restored after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            fn()
    finally:
        for m, mode in modes.items():
            m.training = mode


# -- the walk -----------------------------------------------------------------------------------------
class _Placer:
    """One pass over the traced, converted graph: folds, quantizers, bias links (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, qmap: QuantizationMap, skipped_scopes: set[str]):
        self.gm = gm
        self.graph = gm.graph
        self.qmap = qmap
        self.skipped = skipped_scopes
        self.modules = dict(gm.named_modules())
        act = qmap.default_qconfig.activation_quant
        self.act_cfg: ActivationQuantConfig | None = act if act.n_bits > 0 else None
        self.qsrc: dict[fx.Node, object] = {}  # node -> QuantizationManager, None, or a tuple of them
        self.qversion: dict[fx.Node, fx.Node] = {}  # float node -> its quantizer node
        self.deferred: set[fx.Node] = set()  # activations that get their producer's output quantizer
        self.inserted: dict[str, str] = {}  # quantizer path -> what it quantizes
        self.bias_inputs: dict[int, tuple[QuantizationHijacker, set[int], QuantizationManager | None]] = {}
        self.ignored_inputs: list[str] = []
        self.container_outputs: dict[str, object] = {}
        self.quantized_params: set[str] = set()

    # helpers --------------------------------------------------------------------------------------
    def _is_float_tensor(self, value) -> bool:
        if not isinstance(value, fx.Node):
            return False
        meta = value.meta.get("tensor_meta")
        return hasattr(meta, "dtype") and meta.dtype.is_floating_point

    def _scope(self, node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        return next(reversed(stack.values()))[0] if stack else ""

    def _in_skipped_scope(self, node: fx.Node) -> bool:
        stack = node.meta.get("nn_module_stack") or {}
        return any(path in self.skipped for path, _ in stack.values())

    @staticmethod
    def _label(node: fx.Node) -> str:
        if node.op == "call_module":
            return str(node.target).rsplit(".", 1)[-1]
        if node.op == "get_attr":
            return str(node.target).replace(".", "_")
        if node.op == "call_function":
            return getattr(node.target, "__name__", "op").strip("_")
        return str(node.target if node.op == "call_method" else node.name).strip("_")

    def _new_quantizer(self, owner: str, label: str, cfg: ActivationQuantConfig, param: bool) -> tuple[str, nn.Module]:
        kwargs = convert_act_config_to_kwargs_dict(cfg)
        if param:  # a parameter is one fixed tensor: its current range is exact
            kwargs.update(act_range_method=RangeEstimators.current_minmax, act_range_options={})
        module = QuantizedActivation(**kwargs)
        parent = self.modules[owner] if owner else self.gm
        name, k = f"{label}_quant", 1
        while hasattr(parent, name):
            name, k = f"{label}_quant_{k}", k + 1
        parent.add_module(name, module)
        path = f"{owner}.{name}" if owner else name
        self.modules[path] = module
        return path, module

    def _insert_after(self, node: fx.Node, path: str) -> fx.Node:
        anchor = node
        if node.op == "placeholder":  # keep the placeholders first
            anchor = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
        with self.graph.inserting_after(anchor):
            qnode = self.graph.call_module(path, (node,))
        qnode.meta = {k: node.meta[k] for k in ("tensor_meta", "nn_module_stack") if k in node.meta}
        return qnode

    def _quantize_input(self, consumer: fx.Node, value, cfg: ActivationQuantConfig | None = None):
        """Make ``consumer`` read ``value`` quantized; returns the manager (None: not a float tensor / no config)."""
        if not self._is_float_tensor(value):
            return None
        current = self.qsrc.get(value)
        if isinstance(current, QuantizationManager):
            return current
        qnode = self.qversion.get(value)
        if qnode is None:
            if value.op == "placeholder":  # the model input: the map's root entry, if any
                cfg = cfg or self.qmap.input_activation_qconfig_map.get("")
            cfg = cfg or self.act_cfg
            if cfg is None:
                return None
            owner = self._scope(value) if value.op not in ("placeholder", "get_attr") else ""
            if value.op == "get_attr":
                owner = str(value.target).rpartition(".")[0]
            path, module = self._new_quantizer(owner, self._label(value), cfg, param=value.op == "get_attr")
            qnode = self._insert_after(value, path)
            self.qversion[value] = qnode
            self.qsrc[qnode] = module.activation_quantizer
            self.inserted[path] = f"input of {consumer.name}" if value.op != "get_attr" else f"parameter {value.target}"
            if value.op == "get_attr":
                self.quantized_params.add(str(value.target))
        consumer.replace_input_with(value, qnode)
        return self.qsrc[qnode]

    def _quantize_output(self, node: fx.Node, label: str | None = None) -> None:
        if self.act_cfg is None:
            self.qsrc[node] = None
            return
        path, module = self._new_quantizer(self._scope(node), label or self._label(node), self.act_cfg, param=False)
        qnode = self._insert_after(node, path)
        node.replace_all_uses_with(qnode, delete_user_cb=lambda user: user is not qnode)
        self.qsrc[node] = None
        self.qsrc[qnode] = module.activation_quantizer
        self.inserted[path] = f"output of {node.name}"

    # the walk -------------------------------------------------------------------------------------
    def run(self) -> None:
        for node in list(self.graph.nodes):
            if node.op in ("placeholder", "get_attr", "output"):
                self.qsrc.setdefault(node, None)
                continue
            self._visit(node)
        self._float_model_outputs()
        self.graph.lint()
        self.gm.recompile()

    def _float_model_outputs(self) -> None:
        """A Linear whose output is only a model output writes it in float (QGemm can): quantizing it
        would feed no integer op and only add error (logits keep their full precision)."""
        output = next(n for n in self.graph.nodes if n.op == "output")
        for value in output.all_input_nodes:
            module = self.modules.get(value.target) if value.op == "call_module" else None
            if (isinstance(module, QuantLinear) and set(value.users) == {output}
                    and isinstance(module.activation_quantizer, QuantizationManager)):
                module.activation_quantizer = FP32Acts()
                self.qsrc[value] = None

    def _visit(self, node: fx.Node) -> None:
        modules = self.modules
        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, QuantizationHijacker):
                return self._layer(node, module)
            if any(isinstance(m, QuantizedModule) for m in module.modules()):
                return self._container(node, module)
        if self._in_skipped_scope(node) and node.op != "call_module":
            self.qsrc[node] = None
            return
        if self.qmap.fold_activations and _foldable_activation(node, modules) is not None:
            return self._activation(node, _foldable_activation(node, modules))
        if self.qmap.fold_activations and _float_activation(node, modules) is not None:
            return self._activation(node, _float_activation(node, modules), linear_only=True)
        integer = self._integer_op(node)
        if integer is not None:
            return self._integer(node, *integer)
        if self._grid_op(node):
            return self._grid(node)
        self.qsrc[node] = None

    def _integer_op(self, node: fx.Node) -> tuple[str, list] | None:
        """``(label, inputs)`` of an op onnxruntime runs on integers, or None."""
        if node.op == "call_module":
            integer = isinstance(self.modules[node.target], _INTEGER_MODULES) and node.args
            return (self._label(node), [node.args[0]]) if integer else None
        if node.op not in ("call_function", "call_method"):
            return None
        t = node.target
        if t in _ADD or t in _MUL or t in _MATMUL:
            a, b = node.args[0] if node.args else None, node.args[1] if len(node.args) > 1 else None
            if not (self._is_float_tensor(a) and self._is_float_tensor(b)) or node.kwargs.get("alpha", 1) != 1:
                return None
            return self._label(node), [a, b]
        if t in _CAT:
            tensors = _arg(node, 0, "tensors")
            if isinstance(tensors, (list, tuple)) and tensors and all(self._is_float_tensor(v) for v in tensors):
                return self._label(node), list(tensors)
            return None
        if t in _UNARY_INTEGER and node.args and self._is_float_tensor(node.args[0]):
            return self._label(node), [node.args[0]]
        return None

    def _grid_op(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            m = self.modules[node.target]
            return isinstance(m, _GRID_MODULES) and not getattr(m, "return_indices", False)
        if node.op in ("call_function", "call_method"):
            try:
                hit = node.target in _GRID
            except TypeError:  # unhashable target
                return False
            return hit and not node.kwargs.get("return_indices", False)
        return False

    def _layer(self, node: fx.Node, module: QuantizationHijacker) -> None:
        data = node.args[0] if node.args else None
        wants_int = isinstance(module, (nn.Linear, *_CONV_TYPES))
        requested = self.qmap.input_activation_qconfig_map.get(str(node.target))
        manager = None
        if wants_int or requested is not None:
            if requested is not None and isinstance(self.qsrc.get(data), QuantizationManager):
                self.ignored_inputs.append(str(node.target))
            manager = self._quantize_input(node, data, requested)
        if wants_int and (getattr(module, "bias", None) is not None or hasattr(module, "bn")):
            _, seen, _ = self.bias_inputs.setdefault(id(module), (module, set(), manager))
            seen.add(id(manager))
            if len(seen) > 1:  # one module called on differently quantized inputs: no single s_x
                self.bias_inputs[id(module)] = (module, seen, None)
        act = module.activation_quantizer
        self.qsrc[node] = act if isinstance(act, QuantizationManager) and module.n_bits_act > 0 else None

    def _container(self, node: fx.Node, module: nn.Module) -> None:
        n_data = 3 if isinstance(module, QuantMultiheadAttention) else 1
        for value in list(node.args[:n_data]):
            self._quantize_input(node, value)
        self.qsrc[node] = self.container_outputs.get(str(node.target))

    def _activation(self, node: fx.Node, act: nn.Module, linear_only: bool = False) -> None:
        if node in self.deferred:
            return self._quantize_output(node)
        producer = node.args[0] if node.args else None
        is_module = isinstance(producer, fx.Node) and producer.op == "call_module"
        module = self.modules.get(producer.target) if is_module else None
        kinds = (nn.Linear,) if linear_only else (nn.Linear, *_CONV_TYPES)
        foldable = (
            isinstance(module, QuantizationHijacker) and isinstance(module, kinds)
            and module.activation_function is None and len(producer.users) == 1
            and not self._in_skipped_scope(node)
        )
        if not foldable:
            self.qsrc[node] = None
            return
        module.activation_function = act
        module.unfolded_activation = None
        node.replace_all_uses_with(producer)
        self.graph.erase_node(node)

    def _integer(self, node: fx.Node, label: str, inputs: list) -> None:
        if self.act_cfg is None:
            self.qsrc[node] = None
            return
        for value in inputs:
            self._quantize_input(node, value)
        users = list(node.users)
        if (self.qmap.fold_activations and len(users) == 1
                and _foldable_activation(users[0], self.modules) is not None
                and not self._in_skipped_scope(users[0])):
            self.deferred.add(users[0])
            self.qsrc[node] = None
            return
        self._quantize_output(node, label)
        if self._is_softmax(node):  # onnxruntime requantizes a softmax exactly on the 1/2^b grid only
            module = self.modules[str(next(iter(node.users)).target)]
            module.activation_quantizer = probability_quantizer(module.activation_quantizer)
            self.qsrc[next(iter(node.users))] = module.activation_quantizer

    def _is_softmax(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(self.modules[node.target], nn.Softmax)
        return node.target in (F.softmax, torch.softmax, "softmax")

    def _grid(self, node: fx.Node) -> None:
        source = node.args[0] if node.args else None
        q = self.qsrc.get(source) if isinstance(source, fx.Node) else None
        if node.target is operator.getitem and isinstance(q, tuple):
            index = node.args[1]
            q = q[index] if isinstance(index, int) and -len(q) <= index < len(q) else None
        self.qsrc[node] = q

    def link_biases(self) -> None:
        """Int32 biases at the scale of each layer's input quantizer (``QuantizationMap.quantize_bias``)."""
        for module, _, manager in self.bias_inputs.values():
            per_tensor = manager is not None and not manager.quantizer.per_channel
            module.set_bias_input_quantizer(manager if per_tensor else None)
            module.float_bias_note = None if per_tensor else (
                "bias kept float: the layer's input is not quantized per tensor by a single quantizer in the "
                "traced graph"
            )


def _probe_containers(gm: fx.GraphModule, args: tuple, paths: list[str]) -> dict[str, object]:
    """For each opaque container, the quantization manager its output comes from (None: float).

    One eval forward with hooks: a container's output is quantized when it is (a view of) the output
    of one of the quantized modules inside it.
    """
    modules = dict(gm.named_modules())
    produced: list[tuple[torch.Tensor, QuantizationManager]] = []
    outputs: dict[str, object] = {}
    handles = []

    def record(module, _inputs, out):
        manager = getattr(module, "activation_quantizer", None)
        if isinstance(out, torch.Tensor) and isinstance(manager, QuantizationManager) and module.n_bits_act > 0:
            produced.append((out, manager))

    def match(t) -> QuantizationManager | None:
        if not isinstance(t, torch.Tensor):
            return None
        for out, manager in reversed(produced):
            if t is out or (t.numel() == out.numel() and t.untyped_storage().data_ptr()
                            == out.untyped_storage().data_ptr() and t.storage_offset() == out.storage_offset()):
                return manager
        return None

    def container_hook(path):
        def hook(_module, _inputs, out):
            outputs[path] = tuple(match(t) for t in out) if isinstance(out, (tuple, list)) else match(out)
        return hook

    for m in gm.modules():
        if isinstance(m, (QuantizationHijacker, QuantizedActivation)):
            handles.append(m.register_forward_hook(record))
    for path in paths:
        handles.append(modules[path].register_forward_hook(container_hook(path)))
    try:
        _run_eval(gm, lambda: gm(*args))
    finally:
        for h in handles:
            h.remove()
    return outputs


def _graph_map(qmap: QuantizationMap) -> QuantizationMap:
    """The map the module-level pass runs with inside the graph path: the graph does folding and input
    quantizers; attention types are added unless mapped or excluded by name."""
    gmap = copy.copy(qmap)
    gmap.fold_activations = gmap.fold_batch_norm = False
    gmap.input_activation_qconfig_map = {}
    gmap.batch_norm_pairs = {}
    gmap.module_qconfig_map = dict(qmap.module_qconfig_map)
    if qmap.module_qconfig_map and (qmap.default_qconfig.weight_quant.n_bits > 0
                                    or qmap.default_qconfig.activation_quant.n_bits > 0):
        for module_type, quant_type in GRAPH_CONVERSIONS.items():
            gmap.module_qconfig_map.setdefault(
                module_type, QuantizedModuleConfig(quant_type, copy.deepcopy(qmap.default_qconfig)))
    return gmap


def _batch_norm_pair(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The converted layer a batch-norm node folds into (its only input's producer, only used by it), or None."""
    producer = node.args[0] if node.args else None
    if node.op != "call_module" or not isinstance(producer, fx.Node) or producer.op != "call_module":
        return None
    layer = modules[producer.target]
    folded = FOLDED_CLASSES.get(type(layer))
    if folded is None or type(modules[node.target]) is not folded[1] or len(producer.users) != 1:
        return None
    meta = producer.meta.get("tensor_meta")
    if isinstance(layer, nn.Linear) and getattr(meta, "shape", None) is not None and len(meta.shape) != 2:
        return None  # BatchNorm1d normalises dim 1, a Linear's features only in a [N, C] output
    return str(producer.target)


def _fold_batch_norms(gm: fx.GraphModule, qmap: QuantizationMap) -> None:
    """Fold each converted Conv/Linear whose only user is a batch norm (and the named ``batch_norm_pairs``)."""
    modules = dict(gm.named_modules())
    pairs = dict(qmap.batch_norm_pairs)
    if qmap.fold_batch_norm:
        for node in gm.graph.nodes:
            layer = _batch_norm_pair(node, modules)
            if layer is not None and layer not in pairs:
                pairs[layer] = node.target
    if not pairs:
        return
    try:
        fold_batch_norm(gm, pairs, qmap.bn_freeze_step)
    except ValueError as e:
        from .errors import QuantizationConfigError

        raise QuantizationConfigError(f"QuantizationMap.batch_norm_pairs: {e}") from e
    for node in list(gm.graph.nodes):  # the batch norms are identities now
        if node.op == "call_module" and node.target in pairs.values():
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.recompile()


def convert_graph(model: nn.Module, qmap: QuantizationMap, example_inputs, strict: bool) -> nn.Module | None:
    """The graph path of :func:`tquant.convert_to_quantized` (see the module docstring).

    Returns the converted ``fx.GraphModule``, or None (after a :class:`TracingFallbackWarning`) when
    the model cannot be traced, for the caller to convert module by module.
    """
    from . import conversion

    args = _as_args(example_inputs)
    float_model = copy.deepcopy(model)
    try:
        gm, opaque = trace(float_model)
        _run_eval(gm, lambda: ShapeProp(gm).propagate(*args))
    except GraphTraceError as e:
        warnings.warn(
            f"convert_to_quantized: the graph path cannot trace {type(model).__name__}.forward with torch.fx "
            f"({e}); converted module by module as without example_inputs, so functional ops between layers "
            "stay unquantized (make forward traceable, e.g. no Python control flow on tensor values)",
            TracingFallbackWarning, stacklevel=3,
        )
        return None
    if opaque:
        detail = "; ".join(f"'{path}' ({reason})" for path, reason in opaque.items())
        warnings.warn(
            f"convert_to_quantized: the graph path cannot trace {detail}: converted module by module inside, "
            "so functional ops in there stay unquantized",
            TracingFallbackWarning, stacklevel=3,
        )
    gmap = _graph_map(qmap)
    summary = conversion._new_summary(model, qmap)
    done: set[int] = set()
    conversion._quantize(gm, gmap, "", summary, done)
    _fold_batch_norms(gm, qmap)
    skipped = set(summary.excluded) | set(summary.kept)
    placer = _Placer(gm, qmap, skipped)
    containers = [
        str(n.target) for n in gm.graph.nodes if n.op == "call_module"
        and not isinstance(placer.modules[n.target], QuantizationHijacker)
        and any(isinstance(m, QuantizedModule) for m in placer.modules[n.target].modules())
    ]
    placer.container_outputs = _probe_containers(gm, args, containers) if containers else {}
    placer.run()
    for path, what in placer.inserted.items():  # output quantizers of integer ops are not "input quantizers"
        if not what.startswith("output of"):
            summary.input_quantizers[path] = what
    for name in placer.ignored_inputs:
        warnings.warn(
            f"convert_to_quantized: input_activation_qconfig_map[{name!r}] ignored: the input of '{name}' is "
            "already quantized in the traced graph (a tensor is quantized once)",
            conversion.ConversionWarning, stacklevel=3,
        )
    conversion._float_leftovers(gm, "", done, summary)
    for path in list(summary.left_float):  # parameters the graph quantizes where they are used
        own = [f"{path}.{n}" if path else n for n, _ in placer.modules[path].named_parameters(recurse=False)]
        if all(name in placer.quantized_params for name in own):
            del summary.left_float[path]
    conversion._report(summary, "convert_to_quantized", strict)
    conversion.disable_fused_transformer_fast_path(gm)
    conversion.enable_quant_states(gm)
    if qmap.quantize_bias:
        placer.link_biases()
    conversion.name_quantizers(gm)
    return gm
