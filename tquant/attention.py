"""Quantized functional ops and a quantized ``nn.TransformerEncoderLayer`` (opt in through the map).

Attention's matmuls, softmax and the residual adds are functional ops, not modules, so a
:class:`~tquant.QuantizationMap` cannot reach them in a plain model. These modules give them
output quantizers (each is a :class:`~tquant.QuantizedActivation` that quantizes its result):

- :class:`QuantMatMul` ``a @ b`` — exported as ``DequantizeLinear → MatMul → QuantizeLinear``,
  which onnxruntime runs as ``QLinearMatMul``;
- :class:`QuantAdd` ``a + b`` — ``QLinearAdd``;
- :class:`QuantSoftmax` ``softmax(x, dim)`` — ``QLinearSoftmax``.

:class:`QuantTransformerEncoderLayer` rebuilds an ``nn.TransformerEncoderLayer`` from them and
:class:`~tquant.QuantLinear` / :class:`~tquant.QuantLayerNorm` layers, with every tensor quantized
once (the ReLU folded into ``linear1``). Opt in with::

    qmap.module_qconfig_map[nn.TransformerEncoderLayer] = tquant.QuantizedModuleConfig(
        QuantTransformerEncoderLayer, copy.deepcopy(qmap.default_qconfig))

With quantization off it computes the original layer (eval: dropout off) up to float rounding:
the attention scale ``1/sqrt(head_dim)`` is folded into the query projection's weight and bias,
and the packed ``in_proj`` is split into ``q_proj``/``k_proj``/``v_proj`` (so its state-dict keys
differ from the original layer's). Masks (``src_mask``, ``src_key_padding_mask``, ``is_causal``)
are applied to the quantized scores in float before the softmax.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base_modules import QuantizedActivation
from .fixed_range import probability_quantizer
from .layers import QuantLayerNorm, QuantLinear
from .states import QuantizedModel

__all__ = [
    "QuantAdd", "QuantMatMul", "QuantMultiheadAttention", "QuantSelfAttention", "QuantSoftmax",
    "QuantTransformerEncoderLayer",
]


class QuantMatMul(QuantizedActivation):
    """``a @ b`` with an output quantizer (``activation_quantizer``)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.quantize_activations(torch.matmul(a, b))


class QuantAdd(QuantizedActivation):
    """``a + b`` with an output quantizer (a residual connection)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.quantize_activations(a + b)


class QuantSoftmax(QuantizedActivation):
    """``softmax(x, dim)`` with an output quantizer on the fixed ``1/2^b`` grid (onnxruntime's
    QLinearSoftmax requantizes exactly on it: :mod:`tquant.fixed_range`)."""

    def __init__(self, dim: int = -1, **quant_params):
        super().__init__(**quant_params)
        self.dim = dim
        self.activation_quantizer = probability_quantizer(self.activation_quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize_activations(torch.softmax(x, dim=self.dim))


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, activation=None, **quant_params) -> QuantLinear:
    out_features, in_features = weight.shape
    layer = QuantLinear(in_features, out_features, bias=bias is not None, activation=activation, **quant_params)
    with torch.no_grad():
        layer.weight.copy_(weight.detach())
        if bias is not None:
            layer.bias.copy_(bias.detach())
    return layer.to(weight.device)


def _layer_norm(norm: nn.LayerNorm, **quant_params) -> QuantLayerNorm:
    layer = QuantLayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                           bias=norm.bias is not None, **quant_params)
    with torch.no_grad():
        if norm.weight is not None:
            layer.weight.copy_(norm.weight)
        if norm.bias is not None:
            layer.bias.copy_(norm.bias)
    return layer.to(norm.weight.device if norm.weight is not None else "cpu")


class QuantMultiheadAttention(QuantizedModel):
    """``nn.MultiheadAttention`` from quantized pieces: the same call and, with quantization off, the same result.

    ``q_proj`` (scaled by ``1/sqrt(head_dim)``), ``k_proj``, ``v_proj``, ``out_proj``: QuantLinear;
    ``scores`` (``q @ k^T``) and ``context`` (``attn @ v``): QuantMatMul; ``softmax``: QuantSoftmax.
    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` returns ``(output, weights or None)`` as
    ``nn.MultiheadAttention`` does (the weights are the quantized softmax). Exported, the projections
    run as QGemm, the matmuls as QLinearMatMul and the softmax as QLinearSoftmax. Built by the
    converter as ``QuantMultiheadAttention(original, quantization_map=..., **quant_params)``.
    """

    _qkv_same_embed_dim = True
    in_proj_bias = None  # nn.TransformerEncoder's fast-path check reads it: never take the fused path

    def __init__(self, attn: nn.MultiheadAttention, quantization_map=None, **quant_params):
        super().__init__()
        if not isinstance(attn, nn.MultiheadAttention):
            raise TypeError(f"{type(self).__name__}: expected an nn.MultiheadAttention, got {type(attn).__name__}")
        if attn.bias_k is not None or attn.add_zero_attn:
            raise ValueError(f"{type(self).__name__}: bias_k/bias_v and add_zero_attn are not supported")
        d, h = attn.embed_dim, attn.num_heads
        self.embed_dim, self.num_heads, self.head_dim, self.batch_first = d, h, d // h, attn.batch_first
        scale = 1.0 / math.sqrt(self.head_dim)
        b = attn.in_proj_bias
        if attn._qkv_same_embed_dim:
            weights = [attn.in_proj_weight[i * d:(i + 1) * d] for i in range(3)]
        else:
            weights = [attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight]
        biases = [None if b is None else b[i * d:(i + 1) * d] for i in range(3)]
        self.q_proj = _linear(weights[0] * scale, None if biases[0] is None else biases[0] * scale, **quant_params)
        self.k_proj = _linear(weights[1], biases[1], **quant_params)
        self.v_proj = _linear(weights[2], biases[2], **quant_params)
        self.out_proj = _linear(attn.out_proj.weight, attn.out_proj.bias, **quant_params)
        self.scores = QuantMatMul(**quant_params)
        self.softmax = QuantSoftmax(-1, **quant_params)
        self.context = QuantMatMul(**quant_params)
        self.dropout = nn.Dropout(attn.dropout)
        self.train(attn.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out, attn = self._attend(query, key, value, attn_mask, key_padding_mask, is_causal)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, attn.mean(1) if average_attn_weights else attn

    def _attend(self, query, key, value, attn_mask, key_padding_mask, is_causal):
        """Batch-first attention: ``([batch, tq, embed], [batch, heads, tq, tk] softmax)``."""
        b, tq, d = query.shape
        tk = key.shape[1]
        h, hd = self.num_heads, self.head_dim
        q = self.q_proj(query).reshape(b, tq, h, hd).transpose(1, 2)
        k = self.k_proj(key).reshape(b, tk, h, hd).transpose(1, 2)
        v = self.v_proj(value).reshape(b, tk, h, hd).transpose(1, 2)
        scores = self.scores(q, k.transpose(-2, -1))
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(tq, tk, dtype=torch.bool, device=query.device).triu(1)
        if attn_mask is not None:
            scores = _apply_mask(scores, attn_mask.reshape(b, h, tq, tk) if attn_mask.dim() == 3 else attn_mask)
        if key_padding_mask is not None:
            scores = _apply_mask(scores, key_padding_mask[:, None, None, :])
        attn = self.softmax(scores)
        ctx = self.context(self.dropout(attn), v).transpose(1, 2).reshape(b, tq, d)
        return self.out_proj(ctx), attn


class QuantSelfAttention(QuantMultiheadAttention):
    """Self-attention of a :class:`QuantTransformerEncoderLayer`: ``forward(x, attn_mask, key_padding_mask,
    is_causal)`` on ``[batch, seq, embed]`` whatever ``batch_first`` says (the layer transposes;
    ``batch_first`` mirrors the original because ``nn.TransformerEncoder`` reads it)."""

    def __init__(self, attn: nn.MultiheadAttention, **quant_params):
        if not attn._qkv_same_embed_dim:
            raise ValueError("QuantSelfAttention: only self-attention with a packed in_proj is supported")
        super().__init__(attn, **quant_params)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        return self._attend(x, x, x, attn_mask, key_padding_mask, is_causal)[0]


def _apply_mask(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask (True: masked out) or an additive float mask, as ``nn.MultiheadAttention`` takes them."""
    if mask.dtype == torch.bool:
        return scores.masked_fill(mask, float("-inf"))
    return scores + mask


class QuantTransformerEncoderLayer(QuantizedModel):
    """``nn.TransformerEncoderLayer`` with quantized projections, matmuls, softmax, residual adds and norms.

    Built by the converter as ``QuantTransformerEncoderLayer(original_layer, quantization_map=...,
    **quant_params)`` (see the module docstring). ``linear1`` carries the ReLU (folded: its output
    quantizer sits after it) or GELU of the original.
    """

    def __init__(self, org_model: nn.Module, **quant_params):
        super().__init__()
        quant_params.pop("quantization_map", None)
        if not isinstance(org_model, nn.TransformerEncoderLayer):
            raise TypeError(
                f"QuantTransformerEncoderLayer.org_model must be an nn.TransformerEncoderLayer, "
                f"got {type(org_model).__name__}"
            )
        kind = getattr(org_model, "activation_relu_or_gelu", 0)
        if kind not in (1, 2):
            raise ValueError("QuantTransformerEncoderLayer: only relu and gelu activations are supported")
        self.norm_first = org_model.norm_first
        self.self_attn = QuantSelfAttention(org_model.self_attn, **quant_params)
        act = nn.ReLU() if kind == 1 else nn.GELU()
        self.linear1 = _linear(org_model.linear1.weight, org_model.linear1.bias, activation=act, **quant_params)
        self.linear2 = _linear(org_model.linear2.weight, org_model.linear2.bias, **quant_params)
        self.norm1 = _layer_norm(org_model.norm1, **quant_params)
        self.norm2 = _layer_norm(org_model.norm2, **quant_params)
        self.add1 = QuantAdd(**quant_params)
        self.add2 = QuantAdd(**quant_params)
        self.dropout = nn.Dropout(org_model.dropout.p)
        self.dropout1 = nn.Dropout(org_model.dropout1.p)
        self.dropout2 = nn.Dropout(org_model.dropout2.p)
        self.train(org_model.training)

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = src if self.self_attn.batch_first else src.transpose(0, 1)
        if self.norm_first:
            x = self.add1(x, self._sa(self.norm1(x), src_mask, src_key_padding_mask, is_causal))
            x = self.add2(x, self._ff(self.norm2(x)))
        else:
            x = self.norm1(self.add1(x, self._sa(x, src_mask, src_key_padding_mask, is_causal)))
            x = self.norm2(self.add2(x, self._ff(x)))
        return x if self.self_attn.batch_first else x.transpose(0, 1)

    def _sa(self, x, mask, padding_mask, is_causal) -> torch.Tensor:
        return self.dropout1(self.self_attn(x, mask, padding_mask, is_causal))

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(self.linear1(x))))



