"""ONNX translations of the ``mambaprune::`` custom ops (for ``torch.onnx.export(..., dynamo=True)``).

``custom_translation_table(scan_form)`` maps ``torch.ops.mambaprune.selective_scan.default``,
``torch.ops.mambaprune.ssd_scan.default`` and ``torch.ops.mambaprune.pos_conv1d.default`` to
onnxscript functions that emit standard ONNX ops only, so the exported file runs on any ONNX
runtime without a custom-op library. The functions are traced by the exporter (not
``@script``-compiled): Python control flow runs at export time and can read the static sizes (token
count L, channels D, state size N, groups G) from the symbolic inputs. The batch dimension is never
read, so it stays dynamic.

Both scans are written tokens first, in the (L, batch, G, N, Dg) layout (everything in float32; Dg
the channels of a group, SSD: heads per group * head dim), so that the recurrence walks the
outermost axis (each step reads and writes one contiguous (batch, G, N, Dg) block) and every
broadcast runs along the long innermost channel axis::

    dt   = softplus?(delta + delta_bias)            (L, batch, G, 1, Dg)
    dA   = exp(gap * dt * A)                        (L, batch, G, N, Dg)   SSD: (L, batch, G, 1, Dg)
    dBu  = dt * u * B                               (L, batch, G, N, Dg)
    h_t  = dA_t * h_{t-1} + dBu_t                   the states, (L, batch, G, N, Dg)
    y    = sum_n C * h;   y += D * u;   y *= silu(z)

- ``"scan"`` (default): one ONNX ``Scan`` over the tokens carrying the (batch, G, N, Dg) state; its
  body is Mul, Add and an Identity (the state is also the scan output); the read-out by C is one
  Mul + ReduceSum over all tokens after the loop. Graph size independent of L.
- ``"doubling"``: Hillis-Steele log-depth prefix scan with static L, no loop op: ceil(log2 L) rounds
  of (a, b) <- (a_t * a_{t-s}, a_t * b_{t-s} + b_t) on whole tensors (shifts by Slice + Pad). Every
  decay is in (0, 1], so the products cannot overflow. O(L log L) work.

Measured (benchmarks/onnx_scan.py, results/onnx_scan.md: the scan alone at ViM-T's shape, D=384,
N=16, L=197, onnxruntime 1.32 CPU, 2-core VM, 2026-12-06): ONNX Runtime spends its time in per-op
and per-step overhead, not arithmetic (about 13 us per body op on a 6K-float state, 17 us of loop
per step). The former layout, (batch, G, Dg, N, L) with C read out inside the body (4 ops per step
and a Scan over the innermost axis), took 9.9 ms at batch 1 and 80.5 ms at batch 8; this one 6.2 and
48.5 ms; PyTorch's C++ kernel 2.3 and 18.1 ms. A chunked Scan (16 tokens per step, unrolled: fewer
loop steps, Split + Concat per chunk) was slower in both layouts (11.3 / 85.0 ms time-major); a
two-op body (dA_t * h as the scan output, dBu added after the loop, no Identity) was no faster
(5.98 vs 5.92 ms, 50.8 vs 47.9 ms, interleaved); the doubling form is 4-6x slower than the Scan. Without a fused scan kernel (a custom op, or TensorRT)
ONNX Runtime stays several times slower than PyTorch on the scan.

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


def _shift(t, shift: int, length: int, fill, rank: int, axis: int):
    """out[.., k, ..] = t[.., k + shift, ..] along `axis` where that slot exists, else `fill` (a scalar
    ir.Value); t has `rank` dims (traced intermediates carry no shape, so the caller says)."""
    pads = [0] * (2 * rank)
    if shift > 0:
        part = op.Slice(t, _ints([shift]), _ints([length]), _ints([axis]))
        pads[rank + axis] = shift
    else:
        part = op.Slice(t, _ints([0]), _ints([length + shift]), _ints([axis]))
        pads[axis] = -shift
    return op.Pad(part, _ints(pads), fill)


def _gated(y, u_f, D, z, dtype):
    """y + D * u, times silu(z), cast back to the input's dtype (D broadcast by the caller's shape)."""
    if D is not None:
        y = op.Add(y, op.Mul(D, u_f))
    if z is not None:
        zf = _to_float(z)
        y = op.Mul(y, op.Mul(zf, op.Sigmoid(zf)))
    return op.Cast(y, to=int(dtype)) if dtype != _FLOAT else y


# ----------------------------------------------------------------------------- the recurrence


_BODY_COUNTER = itertools.count()


def _scan_body() -> ir.Graph:
    """Scan body: (h, dA_t, dBu_t) -> (h' = dA_t * h + dBu_t, h' again as the scan output).

    ONNX names are global across subgraphs (SSA), so every value of every body gets a unique name.
    """
    tag = f"mambaprune_scan{next(_BODY_COUNTER)}"
    nodes = []

    def value(name):
        return ir.Value(name=f"{tag}_{name}", type=ir.TensorType(_FLOAT))

    def node(op_type, inputs, name):
        made = ir.Node("", op_type, inputs, num_outputs=1, name=f"{tag}_{name}")
        made.outputs[0].name = f"{tag}_{name}"
        made.outputs[0].type = ir.TensorType(_FLOAT)
        nodes.append(made)
        return made.outputs[0]

    h, a_t, b_t = value("h"), value("dA_t"), value("dBu_t")
    new_h = node("Add", [node("Mul", [a_t, h], "decayed"), b_t], "h_next")
    state = node("Identity", [new_h], "h_out")  # a graph output may not be listed twice
    return ir.Graph(inputs=[h, a_t, b_t], outputs=[new_h, state], nodes=nodes, opset_imports={"": ONNX_OPSET},
                    name=tag)


def _record_scan(inputs: list, body: ir.Graph, num_scan_inputs: int):
    """Emit a 2-output ONNX Scan node over axis 0. The exporter's op recorder sizes a node's outputs from
    the schema (one, for Scan's variadic output), so the node is recorded through it directly."""
    from onnxscript import evaluator
    recorder = evaluator.default()
    if not hasattr(recorder, "_call_op"):  # pragma: no cover - depends on torch's exporter internals
        raise RuntimeError("the ONNX Scan form needs torch.onnx's dynamo exporter (OpRecorder); "
                           "export with scan_form='doubling' instead")
    signature = ir.schemas.OpSignature.from_op_schema(onnx.defs.get_schema("Scan", ONNX_OPSET))
    attrs = {"body": body, "num_scan_inputs": num_scan_inputs}
    return recorder._call_op(signature, {"initial_state_and_scan_inputs": inputs}, attrs, 2)


def _states_by_scan(dA, dBu, length: int):
    """(L, batch, G, N, Dg) states of h_t = dA_t h_{t-1} + dBu_t (dA may broadcast over N)."""
    h0 = op.ReduceSum(op.Mul(dBu, _float(0.0)), _ints([0]), keepdims=0)  # zeros (batch, G, N, Dg), batch dynamic
    _, states = _record_scan([h0, dA, dBu], _scan_body(), 2)
    return states


def _states_by_doubling(a, b, length: int):
    """The same states by log-depth doubling along axis 0 of 5-D tensors (a may broadcast over b)."""
    one, zero = _float(1.0), _float(0.0)
    for round_ in range(math.ceil(math.log2(length)) if length > 1 else 0):
        step = 1 << round_
        a_prev = _shift(a, -step, length, one, 5, 0)   # a[t - step], 1 before the start
        b_prev = _shift(b, -step, length, zero, 5, 0)  # b[t - step], 0 before the start
        b = op.Add(op.Mul(a, b_prev), b)
        if (step << 1) < length:  # the last round does not need the composed decays
            a = op.Mul(a, a_prev)
    return b


_STATES = {"scan": _states_by_scan, "doubling": _states_by_doubling}


def _read_out(states, C5):
    """y_t = sum_n C_t h_t: (L, batch, G, N, Dg) x (L, batch, G, N, 1) -> (L, batch, G, Dg)."""
    return op.ReduceSum(op.Mul(states, C5), _ints([3]), keepdims=0)


# ----------------------------------------------------------------------------- selective scan


def _tokens_first(t, length: int, groups: int, per_group: int):
    """(batch, G * Dg, L) -> (L, batch, G, 1, Dg); the 0 copies the dynamic batch size."""
    return op.Reshape(op.Transpose(t, perm=[2, 0, 1]), _ints([length, 0, groups, 1, per_group]))


def _selective_scan(states_of, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, gap=None):
    dim, length = _static_shape(u, "u")[1:]
    dstate = _static_shape(A, "A")[1]
    b_shape = _static_shape(B, "B")
    groups = b_shape[1] if len(b_shape) == 4 else 1
    if dim is None or length is None or dstate is None or groups is None:
        raise ValueError("ONNX export of mambaprune::selective_scan needs static channels, tokens and state "
                         f"size (got u {tuple(_static_shape(u, 'u'))}, A {tuple(_static_shape(A, 'A'))})")
    per_group = dim // groups
    u_f = _to_float(u)
    dt = _to_float(delta)
    if delta_bias is not None:
        dt = op.Add(dt, op.Unsqueeze(_to_float(delta_bias), _ints([1])))
    if delta_softplus:
        dt = _softplus(dt)
    decay_dt = dt if gap is None else op.Mul(dt, op.Unsqueeze(_to_float(gap), _ints([1])))
    A5 = op.Transpose(op.Reshape(_to_float(A), _ints([groups, per_group, dstate])), perm=[0, 2, 1])  # (G, N, Dg)
    dA = op.Exp(op.Mul(_tokens_first(decay_dt, length, groups, per_group), A5))

    def per_token(t):  # (batch, N, L) or (batch, G, N, L) -> (L, batch, G, N, 1)
        t4 = _to_float(t) if len(b_shape) == 4 else op.Unsqueeze(_to_float(t), _ints([1]))
        return op.Unsqueeze(op.Transpose(t4, perm=[3, 0, 1, 2]), _ints([4]))

    dBu = op.Mul(_tokens_first(op.Mul(dt, u_f), length, groups, per_group), per_token(B))
    y4 = _read_out(states_of(dA, dBu, length), per_token(C))  # (L, batch, G, Dg)
    y = op.Transpose(op.Reshape(y4, _ints([length, 0, dim])), perm=[1, 2, 0])
    D1 = None if D is None else op.Unsqueeze(_to_float(D), _ints([1]))
    return _gated(y, u_f, D1, z, getattr(u, "dtype", _FLOAT))


# ----------------------------------------------------------------------------- SSD (Mamba-2) scan


def _ssd_scan(states_of, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, gap=None):
    """The SSD scan in the same layout, Dg = heads per group * head dim, one decay per head (dA
    (L, batch, G, 1, Dg), broadcast over N in the recurrence)."""
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
    to6 = _ints([length, 0, groups, 1, per_group, 1])  # (L, batch, G, 1, Hg, 1)
    to5 = _ints([length, 0, groups, 1, per_group * headdim])

    def per_head(t):  # (batch, L, H) -> (L, batch, G, 1, Hg, 1)
        return op.Reshape(op.Transpose(t, perm=[1, 0, 2]), to6)

    exponent = op.Mul(per_head(decay_step), op.Reshape(_to_float(A), _ints([groups, 1, per_group, 1])))
    dA = op.Reshape(op.Expand(op.Exp(exponent), _ints([1, 1, 1, 1, 1, headdim])), to5)
    x6 = op.Reshape(op.Transpose(x_f, perm=[1, 0, 2, 3]), _ints([length, 0, groups, 1, per_group, headdim]))
    dt_x = op.Reshape(op.Mul(per_head(step), x6), to5)

    def per_token(t):  # (batch, L, G, N) -> (L, batch, G, N, 1)
        return op.Unsqueeze(op.Transpose(_to_float(t), perm=[1, 0, 2, 3]), _ints([4]))

    y4 = _read_out(states_of(dA, op.Mul(dt_x, per_token(B)), length), per_token(C))  # (L, batch, G, Dg)
    y = op.Transpose(op.Reshape(y4, _ints([length, 0, heads, headdim])), perm=[1, 0, 2, 3])  # (batch, L, H, P)
    D_f = None
    if D is not None:
        D_f = _to_float(D)
        D_f = op.Unsqueeze(D_f, _ints([1])) if len(_static_shape(D, "D")) == 1 else D_f  # (H, 1) or (H, P)
    return _gated(y, x_f, D_f, z, getattr(x, "dtype", _FLOAT))


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
        offset = op.Sub(_shift(pos, shift, tokens, far, 2, 1), pos)  # (B, K); far off where no slot
        tap = op.Add(offset, op.Constant(value_int=left))
        hit = op.And(op.GreaterOrEqual(tap, op.Constant(value_int=0)), op.Less(tap, op.Constant(value_int=taps)))
        clamped = op.Where(hit, tap, op.Constant(value_int=0))
        tap_weight = op.Transpose(op.Gather(kernel, clamped, axis=1), perm=[1, 0, 2])  # (B, C, K)
        contribution = op.Mul(tap_weight, _shift(xf, shift, tokens, zero, 3, 2))
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
    states_of = _STATES[scan_form]

    def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, gap=None):
        return _selective_scan(states_of, u, delta, A, B, C, D, z, delta_bias, delta_softplus, gap)

    def ssd_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, gap=None):
        return _ssd_scan(states_of, x, dt, A, B, C, D, z, dt_bias, dt_softplus, gap)

    return {
        torch.ops.mambaprune.selective_scan.default: selective_scan,
        torch.ops.mambaprune.ssd_scan.default: ssd_scan,
        torch.ops.mambaprune.pos_conv1d.default: _pos_conv1d,
        torch.ops.aten.sort.stable: _sort_stable,
        torch.ops.aten.sort.default: _sort_default,
    }
