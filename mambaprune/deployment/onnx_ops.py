"""ONNX translations of the ``mambaprune::`` custom ops (for ``torch.onnx.export(..., dynamo=True)``).

``custom_translation_table(scan_form)`` maps ``torch.ops.mambaprune.selective_scan.default``,
``torch.ops.mambaprune.ssd_scan.default`` and ``torch.ops.mambaprune.pos_conv1d.default`` to
onnxscript functions that emit standard ONNX ops only, so the exported file runs on any ONNX
runtime without a custom-op library. The functions are
traced by the exporter (not ``@script``-compiled): Python control flow runs at export time and can
read the static sizes (token count L, channels D, state size N, groups G) from the symbolic inputs.
The batch dimension is never read, so it stays dynamic.

Selective scan, both forms share the same preamble (everything in float32, (batch, G, Dg, N, L)
layout so that grouped B/C (batch, G, N, L) broadcast over the Dg channels of their group)::

    dt   = softplus?(delta + delta_bias)            (batch, G, Dg, 1, L)
    dA   = exp(gap * dt * A)                        (batch, G, Dg, N, L)   gap = 1 when absent
    dBu  = dt * u * B                               (batch, G, Dg, N, L)
    h_t  = dA_t * h_{t-1} + dBu_t;   y_t = sum_n C_t * h_t;   y += D * u;   y *= silu(z)

- ``"scan"``: one ONNX ``Scan`` over the token axis carrying the (batch, G, Dg, N) state; the body is
  Mul, Add, Mul, ReduceSum. Graph size independent of L.
- ``"doubling"``: Hillis-Steele log-depth prefix scan with static L: ceil(log2 L) rounds of
  (a, b) <- (a_t * a_{t-s}, a_t * b_{t-s} + b_t) on whole (batch, G, Dg, N, L) tensors (shifts by
  Slice + Pad). Every decay is in (0, 1], so the products cannot overflow. O(L log L) work.

The SSD (Mamba-2) scan is written in the same layout and the same two forms, with Dg = heads per
group * head dim and one decay per head: dA is (batch, G, Dg, 1, L), broadcast over N.

Measured here (2-core CPU, no GPU, onnxruntime 1.32 CPUExecutionProvider, 2 intra-op threads, fp32,
batch 8, median of 50 runs (tiny) / 5 runs (224); file = the saved .onnx with weights)::

    model                                         form       file       ORT time / batch of 8
    tiny ViM (img 32, patch 8, depth 4, D=32)     scan        749 KB     15.3 ms
      dense                                       doubling   1055 KB     38.9 ms
    tiny ViM, pruned ratio 0.3                    scan       1065 KB     15.1 ms
                                                  doubling   1319 KB     27.0 ms
    ViM-T 224 (depth 24, D=192, L=197), dense     scan      30357 KB    9561 ms  (*)
                                                  doubling  33373 KB   20061 ms  (*)

(*) measured while other jobs shared the 2 cores (compare the forms, not the absolute numbers), and
before the scan form stopped expanding C to (batch, G, Dg, N, L) (now broadcast inside the body).
Pruned ViM-T 224 was not measured (time). Both forms matched PyTorch within 4e-6.

``"scan"`` is smaller and faster in every case measured, so it is the default (``DEFAULT_SCAN_FORM``);
``PrunedModel.export(path, scan_form="doubling")`` picks the other. Note that ORT's ``Scan`` runs
its body once per token (48 scans x 197 steps for ViM-T): its per-step overhead, not arithmetic,
dominates at 224, and a runtime with a fused scan kernel (or TensorRT) will do far better.

``pos_conv1d`` is translated exactly like its composite definition in ``runtime/token_ops.py``: a
static loop over the W slot shifts, the neighbour's actual position offset picks its tap (Gather on
the (C, W) kernel), a neighbour outside the window contributes zero (Where).
"""

from __future__ import annotations

import itertools
import math

import onnx
import onnx_ir as ir
import torch
from onnxscript import opset18 as op

from ..errors import InvalidArgumentError

SCAN_FORMS = ("scan", "doubling")
DEFAULT_SCAN_FORM = "scan"
ONNX_OPSET = 18
_FLOAT = ir.DataType.FLOAT
_SOFTPLUS_THRESHOLD = 20.0  # torch.nn.functional.softplus: identity above this

# ----------------------------------------------------------------------------- small helpers


def _ints(values) -> ir.Value:
    return op.Constant(value_ints=[int(v) for v in values])


def _float(value: float) -> ir.Value:
    return op.Constant(value_float=float(value))


def _static_shape(value, what: str) -> list:
    shape = getattr(value, "shape", None)
    if shape is None:
        raise ValueError(f"ONNX export of mambaprune ops needs a known rank for {what}")
    return [d if isinstance(d, int) else None for d in shape]


def _to_float(value):
    if getattr(value, "dtype", _FLOAT) != _FLOAT:
        return op.Cast(value, to=onnx.TensorProto.FLOAT)
    return value


def _softplus(x):
    return op.Where(op.Greater(x, _float(_SOFTPLUS_THRESHOLD)), x, op.Softplus(x))


def _shift_last(t, shift: int, length: int, fill, rank: int):
    """out[..., k] = t[..., k + shift] where that slot exists, else `fill` (a scalar ir.Value);
    t has `rank` dims (traced intermediates carry no shape, so the caller says)."""
    pads = [0] * (2 * rank)
    if shift > 0:
        part = op.Slice(t, _ints([shift]), _ints([length]), _ints([-1]))
        pads[2 * rank - 1] = shift
    else:
        part = op.Slice(t, _ints([0]), _ints([length + shift]), _ints([-1]))
        pads[rank - 1] = -shift
    return op.Pad(part, _ints(pads), fill)


# ----------------------------------------------------------------------------- selective scan


def _scan_preamble(u, delta, A, B, C, D, z, delta_bias, delta_softplus, gap):
    """-> (dA, dBu, C5, u_f, L, shapes) in the (batch, G, Dg, N, L) layout, all float32."""
    dim, length = _static_shape(u, "u")[1:]
    dim_a, dstate = _static_shape(A, "A")
    b_shape = _static_shape(B, "B")
    grouped = len(b_shape) == 4
    groups = b_shape[1] if grouped else 1
    if dim is None or length is None or dstate is None or groups is None:
        raise ValueError("ONNX export of mambaprune::selective_scan needs static channels, tokens and state "
                         f"size (got u {tuple(_static_shape(u, 'u'))}, A {(dim_a, dstate)})")
    per_group = dim // groups
    to5 = _ints([0, groups, per_group, 1, length])  # 0: copy the (dynamic) batch size

    u_f = _to_float(u)
    dt = _to_float(delta)
    if delta_bias is not None:
        dt = op.Add(dt, op.Unsqueeze(_to_float(delta_bias), _ints([1])))
    if delta_softplus:
        dt = _softplus(dt)
    decay_dt = dt if gap is None else op.Mul(dt, op.Unsqueeze(_to_float(gap), _ints([1])))
    A5 = op.Reshape(_to_float(A), _ints([1, groups, per_group, dstate, 1]))
    dA = op.Exp(op.Mul(op.Reshape(decay_dt, to5), A5))
    B4 = _to_float(B) if grouped else op.Unsqueeze(_to_float(B), _ints([1]))
    C4 = _to_float(C) if grouped else op.Unsqueeze(_to_float(C), _ints([1]))
    dBu = op.Mul(op.Reshape(op.Mul(dt, u_f), to5), op.Unsqueeze(B4, _ints([2])))
    C5 = op.Unsqueeze(C4, _ints([2]))  # (batch, G, 1, N, L)
    return dA, dBu, C5, u_f, (groups, per_group, dstate, length, dim)


def _scan_epilogue(y5, u, u_f, D, z, dim: int, length: int):
    y = op.Reshape(y5, _ints([0, dim, length]))
    if D is not None:
        y = op.Add(y, op.Mul(op.Unsqueeze(_to_float(D), _ints([1])), u_f))
    if z is not None:
        zf = _to_float(z)
        y = op.Mul(y, op.Mul(zf, op.Sigmoid(zf)))
    if getattr(u, "dtype", _FLOAT) != _FLOAT:
        y = op.Cast(y, to=int(u.dtype))
    return y


_BODY_COUNTER = itertools.count()


def _scan_body() -> ir.Graph:
    """Scan body: (h, dA_t, dBu_t, C_t) -> (h' = dA_t * h + dBu_t, y_t = sum_n C_t * h').

    ONNX names are global across subgraphs (SSA), so every value of every body gets a unique name.
    """
    tag = f"mambaprune_scan{next(_BODY_COUNTER)}"

    def value(name):
        return ir.Value(name=f"{tag}_{name}", type=ir.TensorType(_FLOAT))

    def node(op_type, inputs, name, attributes=()):
        made = ir.Node("", op_type, inputs, attributes=list(attributes), num_outputs=1, name=f"{tag}_{name}")
        made.outputs[0].name = f"{tag}_{name}"
        return made

    h, a_t, b_t, c_t = value("h"), value("dA_t"), value("dBu_t"), value("C_t")
    axes = node("Constant", [], "axes", [ir.AttrTensor("value", ir.tensor([-1], dtype=ir.DataType.INT64))])
    decayed = node("Mul", [a_t, h], "decayed")
    new_h = node("Add", [decayed.outputs[0], b_t], "h_next")
    read = node("Mul", [new_h.outputs[0], c_t], "read")
    y_t = node("ReduceSum", [read.outputs[0], axes.outputs[0]], "y_t", [ir.AttrInt64("keepdims", 0)])
    new_h.outputs[0].type = y_t.outputs[0].type = ir.TensorType(_FLOAT)
    return ir.Graph(inputs=[h, a_t, b_t, c_t], outputs=[new_h.outputs[0], y_t.outputs[0]],
                    nodes=[axes, decayed, new_h, read, y_t], opset_imports={"": ONNX_OPSET}, name=tag)


def _record_scan(inputs: list, body: ir.Graph, num_scan_inputs: int, axis: int):
    """Emit a 2-output ONNX Scan node. The exporter's op recorder sizes a node's outputs from the
    schema (one, for Scan's variadic output), so the node is recorded through it directly."""
    from onnxscript import evaluator
    recorder = evaluator.default()
    if not hasattr(recorder, "_call_op"):  # pragma: no cover - depends on torch's exporter internals
        raise RuntimeError("the ONNX Scan form needs torch.onnx's dynamo exporter (OpRecorder); "
                           "export with scan_form='doubling' instead")
    signature = ir.schemas.OpSignature.from_op_schema(onnx.defs.get_schema("Scan", ONNX_OPSET))
    attrs = {"body": body, "num_scan_inputs": num_scan_inputs,
             "scan_input_axes": [axis] * num_scan_inputs, "scan_output_axes": [axis - 1]}
    return recorder._call_op(signature, {"initial_state_and_scan_inputs": inputs}, attrs, 2)


def _selective_scan_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, gap=None):
    dA, dBu, C5, u_f, (groups, per_group, dstate, length, dim) = _scan_preamble(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, gap)
    # h0 = zeros(batch, G, Dg, N): shaped from dA so the batch stays dynamic
    h0 = op.ReduceSum(op.Mul(dA, _float(0.0)), _ints([4]), keepdims=0)
    # C stays (batch, G, 1, N, L): Scan only needs equal lengths along the scan axis, the body broadcasts
    _, y5 = _record_scan([h0, dA, dBu, C5], _scan_body(), 3, 4)  # y5: (batch, G, Dg, L)
    return _scan_epilogue(y5, u, u_f, D, z, dim, length)


def _selective_scan_doubling(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             gap=None):
    dA, dBu, C5, u_f, (groups, per_group, dstate, length, dim) = _scan_preamble(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, gap)
    y5 = op.ReduceSum(op.Mul(_doubling(dA, dBu, length), C5), _ints([3]), keepdims=0)  # (batch, G, Dg, L)
    return _scan_epilogue(y5, u, u_f, D, z, dim, length)


def _doubling(a, b, length: int):
    """States of h_t = a_t h_{t-1} + b_t along the last axis of 5-D tensors (a may broadcast over b)."""
    one, zero = _float(1.0), _float(0.0)
    for round_ in range(math.ceil(math.log2(length)) if length > 1 else 0):
        step = 1 << round_
        a_prev = _shift_last(a, -step, length, one, 5)   # a[t - step], 1 before the start
        b_prev = _shift_last(b, -step, length, zero, 5)  # b[t - step], 0 before the start
        b = op.Add(op.Mul(a, b_prev), b)
        if (step << 1) < length:  # the last round does not need the composed decays
            a = op.Mul(a, a_prev)
    return b


# ----------------------------------------------------------------------------- SSD (Mamba-2) scan


def _ssd_preamble(x, dt, A, B, C, D, z, dt_bias, dt_softplus, gap):
    """The SSD scan in the selective scan's (batch, G, Dg, N, L) layout, Dg = heads per group * headdim:
    -> (dA (batch, G, Dg, 1, L): one decay per head, broadcast over N; dBu; C5; x_f; shapes)."""
    length, heads, headdim = _static_shape(x, "x")[1:]
    groups, dstate = _static_shape(B, "B")[2:]
    if None in (length, heads, headdim, groups, dstate):
        raise ValueError("ONNX export of mambaprune::ssd_scan needs static tokens, heads, head dim, groups and "
                         f"state size (got x {tuple(_static_shape(x, 'x'))}, B {tuple(_static_shape(B, 'B'))})")
    per_group = heads // groups
    x_f = _to_float(x)  # (batch, L, H, P)
    step = _to_float(dt)  # (batch, L, H)
    if dt_bias is not None:
        step = op.Add(step, _to_float(dt_bias))
    if dt_softplus:
        step = _softplus(step)
    decay_step = step if gap is None else op.Mul(step, op.Unsqueeze(_to_float(gap), _ints([2])))
    to6 = _ints([0, groups, per_group, 1, 1, length])  # (batch, G, Hg, 1, 1, L); 0 copies the batch
    to5 = _ints([0, groups, per_group * headdim, 1, length])
    exponent = op.Reshape(op.Transpose(op.Mul(decay_step, _to_float(A)), perm=[0, 2, 1]), to6)
    dA = op.Reshape(op.Expand(op.Exp(exponent), _ints([1, 1, 1, headdim, 1, 1])), to5)
    x6 = op.Reshape(op.Transpose(x_f, perm=[0, 2, 3, 1]), _ints([0, groups, per_group, headdim, 1, length]))
    dt_x = op.Reshape(op.Mul(op.Reshape(op.Transpose(step, perm=[0, 2, 1]), to6), x6), to5)
    B5 = op.Unsqueeze(op.Transpose(_to_float(B), perm=[0, 2, 3, 1]), _ints([2]))  # (batch, G, 1, N, L)
    C5 = op.Unsqueeze(op.Transpose(_to_float(C), perm=[0, 2, 3, 1]), _ints([2]))
    return dA, op.Mul(dt_x, B5), C5, x_f, (heads, headdim, length)


def _ssd_epilogue(y5, x, x_f, D, z, heads: int, headdim: int, length: int):
    """(batch, G, Dg, L) -> (batch, L, H, P), + D x, * silu(z), in x's dtype."""
    y = op.Transpose(op.Reshape(y5, _ints([0, heads, headdim, length])), perm=[0, 3, 1, 2])
    if D is not None:
        D_f = _to_float(D)
        D_f = op.Unsqueeze(D_f, _ints([1])) if len(_static_shape(D, "D")) == 1 else D_f  # (H, 1) or (H, P)
        y = op.Add(y, op.Mul(D_f, x_f))
    if z is not None:
        zf = _to_float(z)
        y = op.Mul(y, op.Mul(zf, op.Sigmoid(zf)))
    if getattr(x, "dtype", _FLOAT) != _FLOAT:
        y = op.Cast(y, to=int(x.dtype))
    return y


def _ssd_scan_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, gap=None):
    dA, dBu, C5, x_f, (heads, headdim, length) = _ssd_preamble(x, dt, A, B, C, D, z, dt_bias, dt_softplus, gap)
    h0 = op.ReduceSum(op.Mul(dBu, _float(0.0)), _ints([4]), keepdims=0)  # zeros (batch, G, Dg, N)
    _, y5 = _record_scan([h0, dA, dBu, C5], _scan_body(), 3, 4)  # the body broadcasts dA over N
    return _ssd_epilogue(y5, x, x_f, D, z, heads, headdim, length)


def _ssd_scan_doubling(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, gap=None):
    dA, dBu, C5, x_f, (heads, headdim, length) = _ssd_preamble(x, dt, A, B, C, D, z, dt_bias, dt_softplus, gap)
    y5 = op.ReduceSum(op.Mul(_doubling(dA, dBu, length), C5), _ints([3]), keepdims=0)
    return _ssd_epilogue(y5, x, x_f, D, z, heads, headdim, length)


# ----------------------------------------------------------------------------- pos_conv1d


def _pos_conv1d(x, weight, bias, pos, left: int):
    _, _, tokens = _static_shape(x, "x")
    channels, _, taps = _static_shape(weight, "weight")
    if tokens is None or taps is None:
        raise ValueError("ONNX export of mambaprune::pos_conv1d needs static token count and kernel width")
    xf = _to_float(x)
    kernel = op.Reshape(_to_float(weight), _ints([channels, taps]))  # (C, W)
    out = op.Mul(op.Reshape(op.Gather(kernel, _ints([left]), axis=1), _ints([1, channels, 1])), xf)
    far = op.Constant(value_int=-(2**62))
    zero = _float(0.0)
    for shift in range(-left, taps - left):
        if shift == 0 or abs(shift) >= tokens:
            continue
        offset = op.Sub(_shift_last(pos, shift, tokens, far, 2), pos)  # (B, K); far off where no slot
        tap = op.Add(offset, op.Constant(value_int=left))
        hit = op.And(op.GreaterOrEqual(tap, op.Constant(value_int=0)), op.Less(tap, op.Constant(value_int=taps)))
        clamped = op.Where(hit, tap, op.Constant(value_int=0))
        tap_weight = op.Transpose(op.Gather(kernel, clamped, axis=1), perm=[1, 0, 2])  # (B, C, K)
        contribution = op.Mul(tap_weight, _shift_last(xf, shift, tokens, zero, 3))
        out = op.Add(out, op.Where(op.Unsqueeze(hit, _ints([1])), contribution, zero))
    if bias is not None:
        out = op.Add(out, op.Unsqueeze(_to_float(bias), _ints([1])))
    if getattr(x, "dtype", _FLOAT) != _FLOAT:
        out = op.Cast(out, to=int(x.dtype))
    return out


# ----------------------------------------------------------------------------- stable sort


def _sort_stable(self, *, stable=None, dim: int = -1, descending: bool = False):
    """aten.sort.stable (torch.argsort(stable=True) lowers to it; the exporter has no translation).

    ONNX TopK breaks ties by index ("the element with the lower index appears first"), so a TopK with
    k = the full axis is a stable sort in both directions.
    """
    shape = _static_shape(self, "sorted tensor")
    axis = dim % len(shape)
    if shape[axis] is not None:
        k = _ints([shape[axis]])
    else:
        k = op.Gather(op.Shape(self), _ints([axis]), axis=0)
    values, indices = op.TopK(self, k, axis=axis, largest=int(bool(descending)), sorted=1)
    return values, indices


def _sort_default(self, dim: int = -1, descending: bool = False):
    return _sort_stable(self, stable=True, dim=dim, descending=descending)


# ----------------------------------------------------------------------------- table


def custom_translation_table(scan_form: str = DEFAULT_SCAN_FORM) -> dict:
    """{torch op overload: onnxscript function} for torch.onnx.export(custom_translation_table=...)."""
    if scan_form not in SCAN_FORMS:
        raise InvalidArgumentError(f"scan_form must be one of {SCAN_FORMS}; got {scan_form!r}")
    import mambaprune.runtime  # noqa: F401  registers the ops
    scan = _selective_scan_scan if scan_form == "scan" else _selective_scan_doubling
    ssd = _ssd_scan_scan if scan_form == "scan" else _ssd_scan_doubling
    return {
        torch.ops.mambaprune.selective_scan.default: scan,
        torch.ops.mambaprune.ssd_scan.default: ssd,
        torch.ops.mambaprune.pos_conv1d.default: _pos_conv1d,
        torch.ops.aten.sort.stable: _sort_stable,
        torch.ops.aten.sort.default: _sort_default,
    }
