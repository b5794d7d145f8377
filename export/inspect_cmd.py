"""``tquant inspect FILE.onnx``: the Q/DQ pairs of an ONNX file and its weight bytes by storage type.

:func:`inspect_onnx` reads any QDQ model (not only tquant's): every ``QuantizeLinear`` →
(``Clip``) → ``DequantizeLinear`` chain is an activation quantizer, every ``DequantizeLinear``
of an integer initializer a stored weight. For each it reports the storage type, the bits and
integer grid (from the ``Clip`` bounds when present, else the storage type; for weights also the
range of codes actually stored), the scale and zero point (per-channel: count and range) and
the ``axis``. The CLI wiring (``tquant/cli.py``) calls :func:`add_parser` and :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["InspectReport", "QDQEntry", "add_parser", "check_readable", "inspect_onnx", "run"]

_BITS = {"INT4": 4, "UINT4": 4, "INT8": 8, "UINT8": 8, "INT16": 16, "UINT16": 16, "INT32": 32}
_FP8_MAX = {"FLOAT8E4M3FN": 448, "FLOAT8E5M2": 57344}


@dataclass
class QDQEntry:
    """One quantizer in the file: an activation Q/DQ pair or a stored weight feeding DequantizeLinear."""

    kind: str
    name: str
    storage: str
    bits: int
    grid: tuple[int, int]
    scale: list[float]
    zero_point: list[int]
    axis: int | None
    numel: int = 0
    nbytes: int = 0
    codes: tuple[int, int] | None = None

    @property
    def per_channel(self) -> bool:
        return self.axis is not None


@dataclass
class InspectReport:
    """What :func:`inspect_onnx` found; ``str(report)`` is the CLI's table."""

    path: str
    file_bytes: int
    opset: int
    producer: str
    entries: list[QDQEntry] = field(default_factory=list)
    bytes_by_type: dict[str, int] = field(default_factory=dict)
    count_by_type: dict[str, int] = field(default_factory=dict)
    quantized_weight_bytes: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    runtime: dict | None = None

    @property
    def activations(self) -> list[QDQEntry]:
        return [e for e in self.entries if e.kind == "activation"]

    @property
    def weights(self) -> list[QDQEntry]:
        return [e for e in self.entries if e.kind == "weight"]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def __str__(self) -> str:
        lines = [
            f"{self.path}: {_kib(self.file_bytes)}, opset {self.opset}, producer {self.producer}",
            f"Q/DQ pairs: {len(self.activations)} activation quantizers, {len(self.weights)} integer weights",
        ]
        head = ("kind", "quantizer", "storage", "bits", "grid", "scale", "zero point", "axis", "codes")
        rows = [head]
        for e in self.entries:
            rows.append(
                (
                    e.kind,
                    e.name,
                    e.storage.lower(),
                    str(e.bits),
                    f"[{e.grid[0]}, {e.grid[1]}]",
                    _summary(e.scale, True),
                    _summary(e.zero_point, False),
                    "-" if e.axis is None else str(e.axis),
                    "-" if e.codes is None else f"[{e.codes[0]}, {e.codes[1]}]",
                )
            )
        lines += _table(rows)
        lines.append("")
        lines.append("initializer bytes by storage type (quantized weights / all):")
        for dtype in sorted(self.bytes_by_type, key=lambda k: -self.bytes_by_type[k]):
            q = self.quantized_weight_bytes.get(dtype, 0)
            lines.append(
                f"  {dtype.lower():8s} {self.count_by_type[dtype]:5d} tensors  "
                f"{_kib(q):>11s} / {_kib(self.bytes_by_type[dtype]):>11s}"
            )
        total = sum(self.bytes_by_type.values())
        lines.append(
            f"  {'total':8s} {sum(self.count_by_type.values()):5d} tensors  "
            f"{_kib(sum(self.quantized_weight_bytes.values())):>11s} / {_kib(total):>11s}"
        )
        lines += runtime_lines(self.runtime)
        return "\n".join(lines)


def _kib(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB"


def _summary(values: list, is_float: bool) -> str:
    fmt = (lambda v: f"{v:.4g}") if is_float else (lambda v: str(int(v)))
    if len(values) == 1:
        return fmt(values[0])
    lo, hi = min(values), max(values)
    return f"[{len(values)}] {fmt(lo)}" if lo == hi else f"[{len(values)}] {fmt(lo)}..{fmt(hi)}"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for i, r in enumerate(rows):
        out.append("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def _quantizer_name(scale_name: str) -> str:
    return scale_name[: -len(".scale")] if scale_name.endswith(".scale") else scale_name


def inspect_onnx(path: str | os.PathLike) -> InspectReport:
    """Read ``path`` and describe its quantizers and initializer bytes (see the module docstring)."""
    import onnx
    from onnx import numpy_helper

    path = os.fspath(path)
    model = onnx.load(path)
    graph = model.graph
    type_name = {v: k for k, v in onnx.TensorProto.DataType.items()}
    inits = {init.name: init for init in graph.initializer}
    consts = dict(inits)
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = node.attribute[0].t
    producers = {out: node for node in graph.node for out in node.output}
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    def array(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(consts[name]) if name in consts else None

    def axis_of(node, scale: np.ndarray) -> int | None:
        if scale.ndim == 0 or scale.size == 1:
            return None
        return next((a.i for a in node.attribute if a.name == "axis"), 1)

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    report = InspectReport(
        path,
        os.path.getsize(path),
        opset,
        f"{model.producer_name} {model.producer_version}".strip(),
        metadata={p.key: p.value for p in model.metadata_props},
    )
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            if len(node.input) < 2 or node.input[1] not in consts:
                continue
            scale = array(node.input[1]).astype(np.float32)
            zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
            zp = array(zp_name) if zp_name else np.zeros(scale.shape, np.uint8)
            storage = type_name[consts[zp_name].data_type] if zp_name in consts else "UINT8"
            bits = _BITS.get(storage, 8)
            info = _storage_range(storage)
            grid = info
            src = producers.get(node.input[0])
            if src is not None and src.op_type == "Clip" and scale.size == 1 and len(src.input) == 3:
                lo, hi = array(src.input[1]), array(src.input[2])  # 16-bit storage clips the float input
                if lo is not None and hi is not None:
                    z = int(np.asarray(zp).reshape(-1)[0])
                    s0 = float(scale.reshape(-1)[0])
                    grid = (int(np.rint(float(lo) / s0)) + z, int(np.rint(float(hi) / s0)) + z)
                    bits = int(math.ceil(math.log2(grid[1] - grid[0] + 1)))
            nxt = consumers.get(node.output[0], [])
            if len(nxt) == 1 and nxt[0].op_type == "Clip":
                lo = array(nxt[0].input[1]) if len(nxt[0].input) > 1 and nxt[0].input[1] else None
                hi = array(nxt[0].input[2]) if len(nxt[0].input) > 2 and nxt[0].input[2] else None
                grid = (int(lo) if lo is not None else info[0], int(hi) if hi is not None else info[1])
                bits = int(math.ceil(math.log2(grid[1] - grid[0] + 1)))
            report.entries.append(
                QDQEntry(
                    "activation",
                    _quantizer_name(node.input[1]),
                    storage,
                    bits,
                    grid,
                    [float(v) for v in scale.reshape(-1)],
                    [int(v) for v in np.asarray(zp).reshape(-1)],
                    axis_of(node, scale),
                )
            )
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits:
            w = inits[node.input[0]]
            storage = type_name[w.data_type]
            codes = numpy_helper.to_array(w).astype(np.int64)
            scale = array(node.input[1]).astype(np.float32) if node.input[1] in consts else np.zeros(())
            zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
            zp = array(zp_name) if zp_name else np.zeros(scale.shape, np.int64)
            report.entries.append(
                QDQEntry(
                    "weight",
                    _quantizer_name(node.input[1]),
                    storage,
                    _BITS.get(storage, 8),
                    _storage_range(storage),
                    [float(v) for v in scale.reshape(-1)],
                    [int(v) for v in np.asarray(zp).reshape(-1)],
                    axis_of(node, scale),
                    int(codes.size),
                    _tensor_bytes(w),
                    (int(codes.min()), int(codes.max())) if codes.size else None,
                )
            )
    weight_inits = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    for init in graph.initializer:
        dtype = type_name[init.data_type]
        report.bytes_by_type[dtype] = report.bytes_by_type.get(dtype, 0) + _tensor_bytes(init)
        report.count_by_type[dtype] = report.count_by_type.get(dtype, 0) + 1
        if init.name in weight_inits:
            report.quantized_weight_bytes[dtype] = report.quantized_weight_bytes.get(
                dtype, 0
            ) + _tensor_bytes(init)
    report.runtime = runtime_report(path)
    return report


# -- what onnxruntime makes of the file ----------------------------------------------------------
def runtime_report(path: str) -> dict:
    """What onnxruntime's optimiser (CPU, all optimisations) leaves of the file, as a JSON-able dict.

    ``q_left`` / ``dq_left``: QuantizeLinear / DequantizeLinear nodes left (each a float boundary
    at run time); ``integer_nodes``: fused integer node counts; ``float_nodes``: ``[op, node name]``
    of the compute nodes that still run in float (why a model is slow); ``error``: onnxruntime's
    message when it cannot load the file (it names the node and the op it lacks), else None.
    """
    from .ort_graph import optimized_graph

    try:
        g = optimized_graph(path)
    except ImportError as e:
        return {"error": f"onnxruntime is not installed ({e})"}
    except RuntimeError as e:
        return {"error": str(e)}
    return {
        "q_left": g.quantize,
        "dq_left": g.dequantize,
        "integer_nodes": g.integer_nodes,
        "float_nodes": [list(pair) for pair in g.float_nodes],
        "error": None,
    }


def runtime_lines(runtime: dict | None) -> list[str]:
    """The ``tquant inspect`` section for :func:`runtime_report`'s dict."""
    if runtime is None:
        return []
    lines = ["", "after onnxruntime's optimisation (CPU, all optimisations):"]
    if runtime.get("error"):
        return lines + [f"  cannot load: {runtime['error']}"]
    fused = ", ".join(f"{k} {v}" for k, v in runtime["integer_nodes"].items()) or "none"
    lines.append(f"  Q/DQ left: {runtime['q_left']} QuantizeLinear / {runtime['dq_left']} DequantizeLinear")
    lines.append(f"  integer nodes: {fused}")
    floats = runtime["float_nodes"]
    lines.append(f"  nodes left float: {len(floats)}" + ("" if floats else " (fully integer)"))
    lines += [f"    {op:20s} {name}" for op, name in floats]
    return lines


def _storage_range(storage: str) -> tuple[int, int]:
    if storage in _FP8_MAX:  # FP8: the largest finite magnitude (the values in between are not a grid)
        return -_FP8_MAX[storage], _FP8_MAX[storage]
    bits = _BITS.get(storage, 8)
    if storage.startswith("U"):
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _tensor_bytes(init) -> int:
    """Bytes the tensor's data takes in the file (4-bit types packed two per byte)."""
    from onnx import helper

    numel = int(np.prod(init.dims)) if len(init.dims) else 1
    name = helper.tensor_dtype_to_string(init.data_type)
    if name.endswith("INT4"):
        return (numel + 1) // 2
    return numel * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize if numel else 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``inspect`` on the CLI's subparsers (``argparse``); returns the parser."""
    p = subparsers.add_parser(
        "inspect",
        help="list the Q/DQ pairs of an ONNX file (bits, scales, zero points, axes) and its weight bytes",
        description="List the QuantizeLinear/DequantizeLinear pairs of an ONNX file with their bits, scales, "
        "zero points and axes, and the size of its weights by storage type.",
    )
    p.add_argument("file", help="the .onnx file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)
    return p


def check_readable(path: str) -> str | None:
    """Why ``path`` cannot be an ONNX file (one line), or None when it is worth parsing."""
    if os.path.isdir(path):
        return f"{path} is a directory, not an .onnx file"
    if not os.path.exists(path):
        return f"no such file: {path}"
    if not os.path.isfile(path):
        return f"{path} is not a regular file"
    if not os.access(path, os.R_OK):
        return f"cannot read {path}: permission denied"
    if os.path.getsize(path) == 0:
        return f"{path} is empty (0 bytes): not an ONNX model (an export that failed half-way?)"
    return None


def _print_to_closed_pipe_safely(text: str) -> None:
    """Print ``text``; a reader that closed the pipe early (``| head -1``) ends the output quietly.

    Python would report the ``BrokenPipeError`` and then fail again flushing stdout at exit;
    pointing stdout at ``/dev/null`` after the first failure keeps the exit quiet.
    """
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # stdout without a descriptor: nothing to flush
            pass
        finally:
            os.close(devnull)


def run(args: argparse.Namespace) -> int:
    """Run ``tquant inspect``; returns the exit status (0, or 2 with one line on stderr when the file
    is missing, a directory, empty, unreadable or not ONNX)."""
    problem = check_readable(args.file)
    if problem is not None:
        print(f"tquant inspect: error: {problem}", file=sys.stderr)
        return 2
    try:
        report = inspect_onnx(args.file)
    except Exception as e:  # a corrupt or non-ONNX file: report it, no traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"tquant inspect: error: cannot read {args.file} as ONNX: {first}", file=sys.stderr)
        return 2
    _print_to_closed_pipe_safely(report.to_json() if getattr(args, "json", False) else str(report))
    return 0
