"""Put a quantized model into export form for the duration of a ``with`` block.

:func:`export_mode` reads every quantizer's trained constants once (``QuantizationManager.
export_qparams()``, a host read) and temporarily routes

- each weight quantizer of a layer with ``_quant_w`` through ``tquant::dequantize_codes`` on
  integer codes computed here with the reference's numerics (so the ONNX file stores integer
  weights and the float weight drops out of the graph), and
- every other quantization manager through ``tquant::quantize_dequantize`` with its scale, zero
  point and grid,

registering the constants as buffers on the managers (``codes``, ``scale``, ``zero_point``), so
they become ONNX initializers named after the quantizer (``fc1.weight_quantizer.codes``). The
layers' eval weight cache is switched off meanwhile, and (``bias_add``) a Linear/Conv layer may
get an instance ``run_forward`` that adds its bias after the op, and a Linear layer a ``forward``
that runs inputs of rank > 2 on their 2-D view (see :class:`_FlattenLinear`). On exit the model is exactly as
before: the instance overrides and the buffers are removed, ``caching`` is restored.

The forwards it installs compute the same values as the model's eval forward with fixed ranges,
bit for bit (``tquant.kernels.qdq``), on the torch path.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

import tquant
from tquant.kernels.bias_codes import bias_codes
from tquant.kernels.fp8_reference import FP8_DTYPES
from tquant.kernels.qdq import ExportConstants, quantize_codes, shift_to_unsigned, storage_dtype

__all__ = [
    "BIAS_ADDS",
    "ExportError",
    "ExportPlan",
    "QuantizerExport",
    "WEIGHT_STORAGES",
    "export_mode",
    "flatten_outputs",
]

WEIGHT_STORAGES = ("auto", "int8", "int4")
BIAS_ADDS = ("auto", "fused", "separate")
MIN_OPSET = 18
INT4_OPSET = 21
FP8_OPSET = 19
"""QuantizeLinear/DequantizeLinear to and from float8 types."""
BLOCKED_OPSET = 21
"""DequantizeLinear with ``block_size`` (group-wise weights)."""


class ExportError(RuntimeError):
    """The model cannot be exported as asked (the message names the layer and what to change)."""


@dataclass
class QuantizerExport:
    """One quantizer as it is exported.

    ``name``: the manager's path in the model; ``kind``: ``"weight"`` (integer initializer →
    ``DequantizeLinear``) or ``"activation"`` (``QuantizeLinear`` → ``DequantizeLinear``);
    ``storage_bits``: 4, 8 or 16; ``constants``: the deployment constants as stored (after
    :func:`~tquant.kernels.qdq.shift_to_unsigned` unless ``signed_storage``), or ``None`` with
    ``error`` set when the quantizer has no range (raised if the export uses it); ``owner``: the
    layer whose weight it quantizes; ``separate_bias``: that layer's bias is a separate ``Add``;
    ``int32_bias``: that layer's bias is stored as int32 codes at input scale x weight scale.
    """

    name: str
    kind: str
    constants: ExportConstants | None
    storage_bits: int
    error: Exception | None = None
    owner: str = ""
    separate_bias: bool = False
    int32_bias: bool = False

    @property
    def per_channel(self) -> bool:
        return self.constants is not None and self.constants.axis >= 0


@dataclass
class ExportPlan:
    """What :func:`export_mode` did: every quantization manager of the model, in module order."""

    quantizers: list[QuantizerExport] = field(default_factory=list)

    @property
    def weights(self) -> list[QuantizerExport]:
        return [q for q in self.quantizers if q.kind == "weight"]

    @property
    def activations(self) -> list[QuantizerExport]:
        return [q for q in self.quantizers if q.kind == "activation"]


def check_eval(model: nn.Module) -> None:
    """Raise :class:`ExportError` naming the modules still in training mode."""
    training = [name or "<model>" for name, m in model.named_modules() if m.training]
    if training:
        more = f" (and {len(training) - 1} more)" if len(training) > 1 else ""
        raise ExportError(
            f"cannot export: layer '{training[0]}'{more} is in training mode; call model.eval() first "
            "(export needs fixed ranges and batch-norm running statistics)"
        )


def warn_estimating(model: nn.Module, what: str) -> None:
    """Warn when a quantizer updates its range on eval forwards (``estimate_ranges`` state)."""
    moving = [
        _manager_name(name, m)
        for name, m in model.named_modules()
        if isinstance(m, tquant.QuantizationManager) and m.is_initialized
        and m.state == tquant.Qstates.estimate_ranges
    ]
    if moving:
        warnings.warn(
            f"{what}: quantizer '{moving[0]}' (and {len(moving) - 1} more) is in the estimate_ranges "
            "state, so the PyTorch model changes its ranges on every eval forward while the ONNX file "
            "holds the current ones; call tquant.fix_ranges(model) first",
            stacklevel=3,
        )


def flatten_outputs(out) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, or nested tuples/lists/dicts of them), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_outputs(v)]
    return []


def _manager_name(path: str, manager: nn.Module) -> str:
    return getattr(manager, "layer_name", "") or path or "<model>"


def _constants(manager: nn.Module) -> ExportConstants:
    """``export_qparams()`` as :class:`ExportConstants` (storage dtype = narrowest holding the grid)."""
    p = manager.export_qparams()
    n_bits = int(p["n_bits"])
    scale = p["scale"].detach().to("cpu", torch.float32).clone()
    if not torch.isfinite(scale).all() or (scale <= 0).any():
        raise ExportError(
            f"cannot export: quantizer '{_manager_name('', manager)}' has a non-finite or "
            f"non-positive scale {scale.flatten()[:8].tolist()}"
        )
    axis = -1 if p["axis"] is None else int(p["axis"])
    if axis >= 0 and scale.dim() == 0:
        axis = -1
    fmt = p.get("fmt", "int")
    if fmt != "int":  # FP8: a float8 zero point names the format; no integer grid
        zero_point = torch.zeros(scale.shape, dtype=FP8_DTYPES[fmt])
        return ExportConstants(scale, zero_point, 0, 0, axis, n_bits, True, True, fmt=fmt)
    qmin, qmax = int(p["qmin"]), int(p["qmax"])
    signed = qmin < 0
    dtype = storage_dtype(n_bits, signed)
    zero_point = p["zero_point"].detach().to("cpu", torch.int64)
    return ExportConstants(
        scale, zero_point.to(dtype), qmin, qmax, axis, n_bits, bool(p["symmetric"]), signed,
        block_size=p.get("group_len") or 0,
    )


def _weight_storage_bits(n_bits: int, weight_storage: str, opset: int, name: str) -> int:
    if n_bits > 8:
        if opset < INT4_OPSET:
            raise ExportError(
                f"cannot export: weight quantizer '{name}' has {n_bits} bits; int16 weights need "
                f"opset >= {INT4_OPSET}, got opset {opset}"
            )
        return 16
    if n_bits <= 4 and weight_storage in ("auto", "int4"):
        if opset >= INT4_OPSET:
            return 4
        if weight_storage == "int4":
            raise ExportError(
                f"cannot export: weight_storage='int4' needs opset >= {INT4_OPSET}, got opset {opset}"
            )
    return 8


def _weight_owners(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """``id(weight manager) -> (owner path, owner)`` for layers that quantize their weight now."""
    owners = {}
    for name, m in model.named_modules():
        wq = getattr(m, "weight_quantizer", None)
        if isinstance(wq, tquant.QuantizationManager) and getattr(m, "_quant_w", False):
            if isinstance(getattr(m, "weight", None), torch.Tensor):
                owners[id(wq)] = (name, m)
    return owners


def _active_managers(model: nn.Module) -> set[int]:
    """ids of the managers whose owner's switches say they run (``_quant_w`` / ``_quant_a``)."""
    active = set()
    for _, m in model.named_modules():
        for attr, flag in (("weight_quantizer", "_quant_w"), ("activation_quantizer", "_quant_a")):
            q = getattr(m, attr, None)
            if isinstance(q, tquant.QuantizationManager) and getattr(m, flag, False):
                active.add(id(q))
    return active


class _ActivationForward:
    """Replacement ``forward`` of an activation manager: ``tquant::quantize_dequantize``."""

    def __init__(self, manager: nn.Module, entry: QuantizerExport):
        self.manager = manager
        self.entry = entry

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        entry = self.entry
        if entry.error is not None:
            raise entry.error
        c = entry.constants
        m = self.manager
        return torch.ops.tquant.quantize_dequantize(x, m.scale, m.zero_point, c.qmin, c.qmax, c.axis)


class _WeightForward:
    """Replacement ``forward`` of a weight manager: ``tquant::dequantize_codes`` on the stored codes."""

    def __init__(self, manager: nn.Module, entry: QuantizerExport):
        self.manager = manager
        self.entry = entry

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        m, c = self.manager, self.entry.constants
        if tuple(w.shape) != tuple(m.codes.shape):
            raise ExportError(
                f"cannot export: weight quantizer '{self.entry.name}' was called with a tensor of shape "
                f"{tuple(w.shape)}, but its layer's weight has shape {tuple(m.codes.shape)}"
            )
        y = torch.ops.tquant.dequantize_codes(m.codes, m.scale, m.zero_point, c.axis, self.entry.storage_bits)
        return y if w.dtype == torch.float32 else y.to(w.dtype)


class _GroupWeightForward:
    """Replacement ``forward`` of a group-wise weight manager: ``tquant::dequantize_blocked`` on its codes.

    The codes are stored as the weight's ``[C, K]`` view (blocks along axis 1, reshaped to the weight's
    shape after ``DequantizeLinear``) or, for a Linear layer (see :class:`_GroupLinear`), transposed to
    ``[K, C]`` (blocks along axis 0: the ``MatMul`` input onnxruntime fuses into ``MatMulNBits``)."""

    def __init__(self, manager: nn.Module, entry: QuantizerExport, axis: int, shape: tuple):
        self.manager, self.entry, self.axis, self.shape = manager, entry, axis, shape

    def dequantized(self) -> torch.Tensor:
        m, e = self.manager, self.entry
        return torch.ops.tquant.dequantize_blocked(m.codes, m.scale, m.zero_point, self.axis, e.constants.block_size,
                                                   e.storage_bits)

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        if tuple(w.shape) != self.shape:
            raise ExportError(
                f"cannot export: weight quantizer '{self.entry.name}' was called with a tensor of shape "
                f"{tuple(w.shape)}, but its layer's weight has shape {self.shape}"
            )
        y = self.dequantized()
        if self.axis == 0:
            y = y.t()
        elif len(self.shape) > 2:  # a conv's [C, K] view back to its kernel
            y = y.reshape(self.shape)
        return y if w.dtype == torch.float32 else y.to(w.dtype)


class _GroupLinear:
    """Replacement ``forward`` of a Linear layer with group-wise weights: ``x @ W^T + b`` as
    ``MatMul(x, DequantizeLinear(codes [K, N], axis=0, block_size))`` then ``Add(bias)``, the pattern
    onnxruntime's QDQ optimiser turns into one ``MatMulNBits`` with the bias inside (power-of-two blocks
    >= 16; 2-, 4- or 8-bit codes), then the layer's activation and output quantizer.

    A 2-D input runs as ``[1, B, K]`` (``Unsqueeze`` → ``MatMul`` → ``Add`` → ``Squeeze``): onnxruntime
    (1.32) rewrites a 2-D ``MatMul`` + ``Add`` into ``Gemm`` first, and its QDQ selector never takes a
    ``MatMul``/``Gemm`` whose only consumer is a ``Relu``/``Clip`` without a ``QuantizeLinear`` after it
    (it expects a clip made redundant by that Q), so a Linear followed by a ReLU would stay a
    ``DequantizeLinear`` + ``Gemm``. The 3-D form is never rewritten that way."""

    def __init__(self, layer: nn.Module, weight: _GroupWeightForward):
        self.layer, self.weight = layer, weight

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        w = self.weight.dequantized()
        w = w if x.dtype == torch.float32 else w.to(x.dtype)
        flat = x.dim() == 2
        y = torch.matmul(x.unsqueeze(0) if flat else x, w)
        if self.layer.bias is not None:
            y = y + self.layer.bias
        return self.layer.quantize_activations(y.squeeze(0) if flat else y)


class _Fp8Forward:
    """Replacement ``forward`` of an FP8 manager: ``tquant::dequantize_fp8`` on the stored float8 codes (a
    weight) or ``tquant::quantize_dequantize_fp8`` (an activation)."""

    def __init__(self, manager: nn.Module, entry: QuantizerExport):
        self.manager, self.entry = manager, entry

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m, e = self.manager, self.entry
        if e.error is not None:
            raise e.error
        if e.kind == "activation":
            return torch.ops.tquant.quantize_dequantize_fp8(x, m.scale, m.zero_point, e.constants.axis)
        if tuple(x.shape) != tuple(m.codes.shape):
            raise ExportError(
                f"cannot export: weight quantizer '{e.name}' was called with a tensor of shape {tuple(x.shape)}, "
                f"but its layer's weight has shape {tuple(m.codes.shape)}"
            )
        y = torch.ops.tquant.dequantize_fp8(m.codes, m.scale, m.zero_point, e.constants.axis)
        return y if x.dtype == torch.float32 else y.to(x.dtype)


def _group_weight(manager: nn.Module, owner: nn.Module, entry: QuantizerExport, weight: torch.Tensor,
                  bufs: dict) -> tuple[_GroupWeightForward, bool]:
    """The forward of a group-wise weight manager and whether its layer runs as :class:`_GroupLinear`; puts the
    constants in ``bufs`` in the layout that form needs (``[K, N]`` codes for a Linear, else ``[C, K]``)."""
    shape = tuple(weight.shape)
    codes = bufs["codes"].reshape(shape[0], -1)
    if isinstance(owner, nn.Linear) and hasattr(owner, "quantize_activations") and weight.dim() == 2:
        bufs.update(codes=codes.t().contiguous(), scale=bufs["scale"].t().contiguous(),
                    zero_point=bufs["zero_point"].t().contiguous())
        return _GroupWeightForward(manager, entry, 0, shape), True
    bufs["codes"] = codes
    return _GroupWeightForward(manager, entry, 1, shape), False


def _check_opset(c: ExportConstants | None, opset: int, name: str) -> None:
    if c is not None and c.fmt != "int" and opset < FP8_OPSET:
        raise ExportError(f"cannot export: quantizer '{name}' is {c.fmt}; float8 QuantizeLinear/DequantizeLinear "
                          f"need opset >= {FP8_OPSET}, got opset {opset}")
    if c is not None and c.block_size and opset < BLOCKED_OPSET:
        raise ExportError(f"cannot export: weight quantizer '{name}' is group-wise; blocked DequantizeLinear "
                          f"needs opset >= {BLOCKED_OPSET}, got opset {opset}")


class _SeparateBias:
    """Replacement ``run_forward`` of a Linear/Conv layer: the op without bias, then ``+ bias``.

    Exports ``MatMul``/``Conv`` followed by ``Add`` instead of a bias inside ``Gemm``/``Conv``, which
    onnxruntime's BiasQuantization pass would round onto the int32 grid of input scale x weight scale.
    """

    def __init__(self, layer: nn.Module):
        self.run = layer.run_forward
        self.spatial = len(layer.kernel_size) if isinstance(layer, nn.modules.conv._ConvNd) else 0

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, offsets=None):
        y = self.run(x, weight, None, offsets=offsets)
        if bias is None:
            return y
        shape = [1] * y.dim()
        shape[y.dim() - 1 - self.spatial if self.spatial else -1] = -1
        return y + bias.reshape(shape)


class _Int32Bias:
    """Replacement ``quantize_bias`` of a layer with an int32 bias: ``tquant::dequantize_bias`` on its codes."""

    def __init__(self, layer: nn.Module, axis: int):
        self.layer = layer
        self.axis = axis

    def __call__(self, bias: torch.Tensor) -> torch.Tensor:
        y = torch.ops.tquant.dequantize_bias(self.layer.bias_codes, self.layer.bias_scale, self.axis)
        return y if bias.dtype == torch.float32 else y.to(bias.dtype)


def _int32_bias(owner: nn.Module, weight_constants: ExportConstants) -> tuple[int, dict] | None:
    """``(axis, buffers)`` for a layer whose bias is quantized to int32 in QAT (``bias_input_quantizer``)."""
    source = owner.bias_input_quantizer() if hasattr(owner, "bias_input_quantizer") else None
    if source is None or not hasattr(owner, "get_weight_bias"):
        return None
    bias = owner.get_weight_bias()[1]
    if bias is None or not source.is_initialized:
        return None
    s_x = _constants(source)
    if s_x.axis >= 0:
        return None
    scale = s_x.scale.reshape(()) * weight_constants.scale
    axis = 0 if scale.dim() > 0 else -1
    return axis, {"bias_codes": bias_codes(bias.detach().cpu(), scale), "bias_scale": scale}


class _FlattenLinear:
    """Replacement ``forward`` of a Linear layer: inputs of rank > 2 run the whole layer in 2-D.

    ``x[..., in] -> reshape(-1, in) -> layer (linear, activation, output quantizer) -> reshape(..., out)``:
    the same values, but the exporter writes ``Reshape → Gemm(transB=1) → (Relu) → QuantizeLinear
    → DequantizeLinear → Reshape`` (the weight stays ``[out, in]``, no ``Transpose``) instead of
    ``MatMul`` on a transposed weight plus a float ``Add``, so onnxruntime fuses a QGemm with the
    bias (and a folded ReLU) inside; a MatMul followed by a bias Add only becomes
    MatMulIntegerToFloat + a float Add.
    """

    def __init__(self, layer: nn.Module):
        self.forward = layer.forward

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        if x.dim() <= 2:
            return self.forward(x, *args, **kwargs)
        y = self.forward(x.reshape(-1, x.shape[-1]), *args, **kwargs)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _flattens(owner: nn.Module) -> bool:
    """A Linear layer whose output quantizer (if any) is per tensor: it can run on the 2-D view."""
    if not isinstance(owner, nn.Linear) or not hasattr(owner, "run_forward"):
        return False
    act = getattr(owner, "activation_quantizer", None)
    return not (isinstance(act, tquant.QuantizationManager) and act.quantizer.per_channel)


def _wants_separate_bias(owner: nn.Module, storage_bits: int, bias_add: str) -> bool:
    if bias_add == "fused" or not isinstance(owner, (nn.Linear, nn.modules.conv._ConvNd)):
        return False
    if getattr(owner, "bias", None) is None or not hasattr(owner, "run_forward"):
        return False
    return bias_add == "separate" or storage_bits == 4


@contextlib.contextmanager
def export_mode(
    model: nn.Module,
    *,
    weight_storage: str = "auto",
    opset: int = INT4_OPSET,
    signed_storage: bool = False,
    signed_weights: bool = True,
    bias_add: str = "auto",
) -> Iterator[ExportPlan]:
    """Route the model's quantizers through the export ops inside the block; restore it afterwards.

    Args:
        model: a converted tquant model in eval mode.
        weight_storage: ``"auto"`` (int4/uint4 for <= 4-bit weights when ``opset >= 21``, else
            int8/uint8), ``"int8"`` (always 8-bit storage, 16-bit for wider weights) or ``"int4"``
            (like auto, but an error below opset 21).
        opset: the target ONNX opset (>= 18; int4 and 16-bit storage need 21).
        signed_storage: store signed grids in signed types (int8/int4/int16, zero point as trained:
            the convention of TensorRT). Default False: every grid is stored in the unsigned type
            (a signed grid shifted by half the type's range, e.g. int8 ``[-128, 127]``, zp 0 →
            uint8 ``[0, 255]``, zp 128), which gives identical values and is what onnxruntime's x86
            integer kernels run without u8s8 saturation (see :func:`tquant.kernels.qdq.shift_to_unsigned`).
        signed_weights: store signed *weight* grids in signed types even when ``signed_storage`` is
            False (default True): uint8 activations with int8 weights (zero point 0 for symmetric
            grids) is onnxruntime's U8S8 layout, what its ``quantize_static`` writes and the fast
            path of its x86 VNNI / AVX-512 and ARM kernels (its U8U8 path is about twice as slow).
            On AVX2 CPUs without VNNI, U8S8 products can saturate: check with ``validate_onnx``
            there, or pass False.
        bias_add: ``"auto"`` (a separate ``Add`` for the bias of Linear/Conv layers whose weights are
            stored in 4 bits, which onnxruntime cannot fuse anyway), ``"fused"`` (bias inside
            ``Gemm``/``Conv``: lets onnxruntime fuse QGemm/QLinearConv, at the price of its int32
            bias rounding) or ``"separate"``.

    Raises:
        ExportError: a layer in training mode, bad options, a weight quantizer called with a
            tensor that is not its layer's weight.
        tquant.QuantizerNotInitializedError: an active quantizer never saw data (raised here for
            quantizers whose layer switches say they run, else when the block's forward uses it).

    Yields:
        the :class:`ExportPlan`.
    """
    if weight_storage not in WEIGHT_STORAGES:
        raise ValueError(f"export: weight_storage must be one of {WEIGHT_STORAGES}, got {weight_storage!r}")
    if bias_add not in BIAS_ADDS:
        raise ValueError(f"export: bias_add must be one of {BIAS_ADDS}, got {bias_add!r}")
    for flag, value in (("signed_storage", signed_storage), ("signed_weights", signed_weights)):
        if not isinstance(value, bool):
            raise ValueError(f"export: {flag} must be True or False, got {value!r}")
    if opset < MIN_OPSET:
        raise ValueError(f"export: opset must be >= {MIN_OPSET} (dynamo exporter), got {opset}")
    check_eval(model)
    owners = _weight_owners(model)
    active = _active_managers(model)
    plan = ExportPlan()
    installs: list[tuple[nn.Module, str, object, dict[str, torch.Tensor]]] = []
    for path, m in model.named_modules():
        if not isinstance(m, tquant.QuantizationManager):
            continue
        name = _manager_name(path, m)
        try:
            c, error = _constants(m), None
        except tquant.QuantizerNotInitializedError as e:
            if id(m) in active:
                raise
            c, error = None, e
        device = m.quantizer._delta.device
        if id(m) in owners or id(m) in active:
            _check_opset(c, opset, name)
        if id(m) in owners:
            owner_path, owner = owners[id(m)]
            bits = 8 if c.fmt != "int" else _weight_storage_bits(c.n_bits, weight_storage, opset, name)
            if c.fmt == "int" and not (signed_storage or signed_weights):
                c, _ = shift_to_unsigned(c, bits)
            entry = QuantizerExport(name, "weight", c, bits, None, owner_path)
            # the weight the layer quantizes: for a QuantConvBn2d the BN-folded one
            weight = owner.get_weight_bias()[0] if hasattr(owner, "get_weight_bias") else owner.weight
            bufs = {"codes": quantize_codes(weight.detach(), c), "scale": c.scale, "zero_point": c.zero_point}
            group_linear = False
            if c.fmt != "int":
                forward = _Fp8Forward(m, entry)
            elif c.block_size:
                forward, group_linear = _group_weight(m, owner, entry, weight, bufs)
                if group_linear:
                    installs.append((owner, "forward", _GroupLinear(owner, forward), {}))
            else:
                forward = _WeightForward(m, entry)
            installs.append((m, "forward", forward, bufs))
            int32 = _int32_bias(owner, c)
            if int32 is not None:
                entry.int32_bias = True
                int32_bufs = {k: v.to(device) for k, v in int32[1].items()}
                installs.append((owner, "quantize_bias", _Int32Bias(owner, int32[0]), int32_bufs))
            # (a group-wise Linear's own forward adds its bias after the MatMul)
            if not group_linear and _wants_separate_bias(owner, bits, bias_add):
                entry.separate_bias = True
                installs.append((owner, "run_forward", _SeparateBias(owner), {}))
            elif not group_linear and _flattens(owner):
                installs.append((owner, "forward", _FlattenLinear(owner), {}))
        else:
            bits = 16 if c is not None and c.n_bits > 8 else 8
            if c is not None and bits == 16 and opset < INT4_OPSET and id(m) in active:
                raise ExportError(
                    f"cannot export: quantizer '{name}' has {c.n_bits} bits; 16-bit "
                    f"QuantizeLinear needs opset >= {INT4_OPSET}, got opset {opset}"
                )
            fp8 = c is not None and c.fmt != "int"
            if c is not None and not signed_storage and not fp8:
                c, _ = shift_to_unsigned(c, bits)
            if c is not None and bits == 16 and c.axis >= 0 and (c.qmax - c.qmin) < 2**16 - 1:
                raise ExportError(
                    f"cannot export: quantizer '{name}' is per-channel with a {c.n_bits}-bit grid "
                    "in 16-bit storage, which ONNX cannot clip per channel"
                )
            entry = QuantizerExport(name, "activation", c, bits, error)
            bufs = {} if c is None else {"scale": c.scale, "zero_point": c.zero_point}
            installs.append((m, "forward", (_Fp8Forward if fp8 else _ActivationForward)(m, entry), bufs))
        for key, value in bufs.items():
            bufs[key] = value.to(device)
        plan.quantizers.append(entry)

    caching = [(m, m.caching) for m in model.modules() if isinstance(m, tquant.QuantizedModule)]
    patched: list[tuple[nn.Module, str, object, list[str]]] = []
    try:
        for m, c in caching:
            if c:
                m.caching = False
        for m, attr, fn, bufs in installs:
            for key in bufs:
                if key in m._buffers or key in m._parameters or key in m._modules or hasattr(type(m), key):
                    raise ExportError(
                        f"cannot export: module '{_manager_name('', m)}' already has an attribute {key!r}"
                    )
            patched.append((m, attr, m.__dict__.get(attr, _MISSING), list(bufs)))
            for key, value in bufs.items():
                m.register_buffer(key, value, persistent=False)
            setattr(m, attr, fn)
        yield plan
    finally:
        for m, attr, previous, keys in reversed(patched):
            for key in keys:
                m._buffers.pop(key, None)
            if previous is _MISSING:
                m.__dict__.pop(attr, None)
            else:
                m.__dict__[attr] = previous
        for m, c in caching:
            if m.caching != c:
                m.caching = c


_MISSING = object()


def describe_constants(c: ExportConstants) -> str:
    """``"scale=0.0123 zp=0"`` or a per-channel summary, for messages and tables."""
    if c.axis < 0:
        return f"scale={c.scale.item():.6g} zp={int(c.zero_point.item())}"
    s = c.scale
    return f"scale[{s.numel()}]={s.min().item():.4g}..{s.max().item():.4g} axis={c.axis}"
