"""Hugging Face ``transformers`` integration: causal-LM training loss without logits.

    >>> from fusedlm.integrations.transformers import patch, unpatch
    >>> patch(model)                      # any causal LM with an lm_head  # doctest: +SKIP
    >>> out = model(input_ids, labels=labels)   # out.loss via fusedlm, out.logits is None
    >>> unpatch(model)                    # exactly the original model again

How it works (generic, no per-family copy of forward code): when ``labels`` are given, the
patched ``forward`` calls the model's own ``forward`` *without* labels while the output
embedding module (``model.get_output_embeddings()``, the ``lm_head``) records its input --
the final hidden states -- and returns an empty ``[..., 0]`` stand-in for the logits. The
stand-in is a tensor subclass that records what the family's forward does to the logits
afterwards; a chain of scalings and one ``tanh`` (Gemma 2/3's ``final_logit_softcapping``,
Cohere's ``logit_scale``, Granite's ``logits_scaling``) is translated into
``linear_cross_entropy``'s ``softcap`` and a scaling of the hidden states, anything else
raises :class:`UnsupportedModelError` rather than computing a wrong loss. The loss is then
``fusedlm.linear_cross_entropy(hidden, lm_head.weight, labels, lm_head.bias, shift=True)``
with HF's semantics: labels shifted left (position t predicts label t+1), ``ignore_index``
-100, mean over the predicted tokens, or sum / ``num_items_in_batch`` when the Trainer
passes it (gradient accumulation), precomputed ``shift_labels`` honoured. What the forward
adds to ``self.loss_function``'s loss is read from its source at patch time and added as it
does: a MoE router aux loss with the coefficient that forward uses (``self.aux_loss_coef``,
``self.config.text_config.router_aux_loss_coef``, ...), Bamba's z-loss, a term computed
without labels (GraniteDocling's router loss); other terms, a loss over other logits than
those returned (GIT), changed labels, and subclasses that compute a loss of their own after
``super().forward()`` are refused. Tied embeddings work unchanged (the loss reads
``lm_head.weight``, the tied parameter).

Calls without ``labels`` (inference, ``generate``) run the original forward untouched.
"""
from __future__ import annotations

import ast
import functools
import inspect
import re
import textwrap
import threading
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cce import linear_cross_entropy

__all__ = ["patch", "unpatch", "is_patched", "UnsupportedModelError"]

_STATE_ATTR = "_fusedlm_patch"
_MISSING = None  # "no instance-level forward": survives deepcopy and pickling
_LOSS_OPTIONS = ("filter_eps", "accum_fp32", "z_loss", "label_smoothing")


class UnsupportedModelError(TypeError):
    """The model cannot be patched (or does something to its logits that the fused loss
    cannot reproduce)."""


# ----------------------------------------------------------------------------- the probe

_SCALE_OPS = {"mul", "__mul__", "__rmul__", "mul_", "__imul__", "multiply"}
_DIV_OPS = {"div", "__truediv__", "true_divide", "div_", "__itruediv__", "divide"}
_TANH_OPS = {"tanh", "tanh_"}
_IDENTITY_OPS = {"contiguous", "clone"}
_CASTS = {"float", "double", "half", "bfloat16", "to", "type", "type_as"}
# Calls that read a probe's values into Python (refused: the stand-in's values are not the
# logits'); other calls with non-tensor answers (size, dim, _is_view, ...) are metadata.
_VALUE_READS = {"item", "tolist", "numpy", "__float__", "__int__", "__index__", "__bool__",
                "__complex__", "__array__", "__iter__", "__reversed__", "__contains__", "equal",
                "allclose", "is_nonzero"}
# Attribute reads that say something about a tensor rather than compute from its values: a
# probe's answers are plain. (Wrapped, a probe's _base was a new probe view with a _base of
# its own, without end: dynamo (torch 2.11) recursed on that chain when it met the probe in a
# resumed frame.) Other tensor-valued attributes (.T, .mT, .data, .real, ...) are ops.
_METADATA_ATTRS = {"_base", "grad", "_grad"}
_INPLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
                    "__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__", "__ilshift__",
                    "__irshift__", "__setitem__"}


def _scalar(x) -> Optional[Any]:
    """A python number or a one-element tensor that is not a probe; else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, Tensor) and not isinstance(x, _LogitsProbe) and x.numel() == 1:
        return x.detach().reshape(()).clone()  # (its value now: the model may change it later)
    return None


def _classify(func, args, kwargs, probe) -> tuple:
    name = getattr(func, "__name__", repr(func))
    if name in _IDENTITY_OPS:
        return ("id",)
    if name in _TANH_OPS and len(args) == 1 and not kwargs:
        return ("tanh",)
    if len(args) == 2 and all(v is None for v in kwargs.values()):
        a, b = args
        other = b if a is probe else a
        if (name in _SCALE_OPS or name in _DIV_OPS) and isinstance(other, Tensor) and other.requires_grad:
            # a learnable scale: folded into the loss it would get no gradient
            return ("unknown", f"{name} by a learnable (requires_grad) logit scale")
        if name in _SCALE_OPS:
            s = _scalar(other)
            if s is not None:
                return ("scale", s)
        if name in _DIV_OPS and a is probe:
            s = _scalar(b)
            if s is not None and bool(s != 0):
                return ("scale", 1.0 / s)
    return ("unknown", name)


def _cast_step(source: Tensor, result: Tensor) -> tuple:
    """A dtype conversion of the logits: the identity when it loses nothing (the fused loss
    works in float32), else an op the fused loss cannot reproduce."""
    a, b = source.dtype, result.dtype
    if a == b or (a.is_floating_point and b.is_floating_point and not a.is_complex and not b.is_complex
                  and torch.finfo(b).eps <= torch.finfo(a).eps and torch.finfo(b).max >= torch.finfo(a).max):
        return ("id",)
    return ("unknown", f"a cast to {b}")


def _written(name: str, args, kwargs) -> Optional[Tensor]:
    """The tensor an op writes into (an ``out=`` tensor, or its first argument for in-place
    ops, by name; writes by other names are caught by the version counters, see _integrity)."""
    if isinstance(kwargs.get("out"), Tensor):
        return kwargs["out"]
    inplace = (name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("_"))
               or kwargs.get("inplace") is True)
    return args[0] if inplace and args and isinstance(args[0], Tensor) else None


class _ProbeFamily:
    """Shared by a probe and every probe derived from it."""

    __slots__ = ("grad_enabled", "refused", "written")

    def __init__(self):
        self.grad_enabled = torch.is_grad_enabled()  # as the forward runs
        self.refused: Optional[str] = None  # what the forward did that cannot be followed
        self.written: list = []  # the probes written into (recorded writes)


class _LogitsProbe(Tensor):
    """Stand-in for the lm_head output: records the ops the model applies to its logits.

    Each probe also keeps its version counter at creation and the writes it recorded, so a
    write it did not see (through another view, ``.data``, an op by another name, ...)
    shows as a version the record does not explain."""

    _fusedlm_ops: tuple = ()
    _fusedlm_family: Optional[_ProbeFamily] = None
    _fusedlm_version: int = 0  # _version at creation, plus the writes recorded on it

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _probe_op(func, args, kwargs or {})


def _new_probe(t: Tensor, ops: tuple, family: Optional[_ProbeFamily]) -> _LogitsProbe:
    # Not a view of t (which only this module holds): a probe's _base is None, so no plain
    # alias of it leaks; it shares t's storage and version counter.
    res = Tensor._make_subclass(_LogitsProbe, t)
    res._fusedlm_ops = ops
    res._fusedlm_family = family
    res._fusedlm_version = res._version
    return res


def _storage_id(t: Tensor) -> int:
    with torch._C.DisableTorchFunctionSubclass():
        return t.untyped_storage()._cdata


@torch._dynamo.disable
def _integrity(probe: _LogitsProbe) -> Optional[str]:
    """Why ``probe``'s record does not describe its values, or None: a refused op, a write
    recorded on another probe sharing its storage, or a version its recorded writes do not
    explain (a write it did not see)."""
    family = probe._fusedlm_family
    if family is not None:
        if family.refused:
            return family.refused
        if any(w is not probe and _storage_id(w) == _storage_id(probe) for w in family.written):
            return "writes into its lm_head output through another view"
    if probe._version != probe._fusedlm_version:
        return "writes into its lm_head output by an op it cannot follow"
    return None


@torch._dynamo.disable
def _probe_op(func, args, kwargs):
    """One op on a probe (see _LogitsProbe), run eagerly: under torch.compile dynamo does
    not trace the bookkeeping on the empty stand-in."""
    name = getattr(func, "__name__", repr(func))
    attribute = name == "__get__"
    if attribute:
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    probes = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, _LogitsProbe)]
    target = _written(name, args, kwargs) if probes else None
    target_ok = isinstance(target, _LogitsProbe) and target._version == target._fusedlm_version
    try:
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
    except Exception as err:  # e.g. a [V] mask or bias against the stand-in's 0-wide last dim
        if not probes or probes[0]._fusedlm_family is None:
            raise
        # Refused in _finish. (Raising here would not do: torch turns a TypeError from a
        # binary operator into NotImplemented, then a bare "unsupported operand" error.)
        parent = probes[0]
        parent._fusedlm_family.refused = (f"applies `{name}` to its lm_head output, which failed "
                                          f"on the stand-in ({type(err).__name__}: {err})")
        with torch._C.DisableTorchFunctionSubclass():
            plain = parent.new_empty(parent.shape)
        return _new_probe(plain, parent._fusedlm_ops + (("unknown", name),), parent._fusedlm_family)
    if not probes or name in _METADATA_ATTRS:
        return out
    parent = probes[0]
    family = parent._fusedlm_family
    if family is not None and (name == "__set__" or (attribute and name == "data")):
        # (.data has a version counter of its own: writes through it would go unseen)
        family.refused = f"uses `.{getattr(getattr(func, '__self__', None), '__name__', name)}` of its lm_head output"
        return out
    if name in _VALUE_READS:
        if family is not None:
            family.refused = f"reads values of its lm_head output (`{name}`)"
        return out
    if not isinstance(out, (Tensor, tuple, list)):
        return out
    if target is None and args and out is args[0] and name not in _CASTS | _IDENTITY_OPS:
        target = out  # returned its input: in place (e.g. F.relu(x, inplace=True))
    if len(probes) > 1:
        step = ("unknown", name)
    elif family is not None and torch.is_grad_enabled() != family.grad_enabled:
        step = ("unknown", f"{name} with gradients {'on' if torch.is_grad_enabled() else 'off'}")
    elif name in _CASTS and isinstance(out, Tensor):
        step = _cast_step(parent, out)
    elif name == "__setitem__":
        step = ("unknown", "item assignment")
    else:
        step = _classify(func, args, kwargs, parent)
    if isinstance(target, _LogitsProbe):
        # A write recorded on the probe written (and counted in its version, if the record
        # described it before); views that do not see the write are caught by their
        # versions (see _integrity).
        target._fusedlm_ops = target._fusedlm_ops + (step if target is parent else ("unknown", name),)
        if target_ok:
            target._fusedlm_version = target._version
        if family is not None:
            family.written.append(target)
        return target if out is target else out
    if isinstance(out, Tensor):
        ops = parent._fusedlm_ops + (step,)
        if _integrity(parent) is not None:  # derived from values the record does not describe
            ops = ops + (("unknown", "a write it could not follow"),)
        if out is parent:  # an op returning its input (e.g. .float() of float32)
            parent._fusedlm_ops = ops
            return parent
        return _new_probe(out, ops, family)
    if any(isinstance(o, Tensor) for o in out):
        return type(out)(_new_probe(o, parent._fusedlm_ops + (("unknown", "split"),), family)
                         if isinstance(o, Tensor) else o for o in out)
    return out


def _interpret(ops: tuple, model_name: str):
    """(pre_scale, softcap) with logits' = softcap * tanh(pre_scale * z / softcap), or
    logits' = pre_scale * z when softcap is None."""
    before, after, tanh_seen = 1.0, 1.0, 0
    for step in ops:
        if step[0] == "id":
            continue
        if step[0] == "unknown":
            raise UnsupportedModelError(
                f"fusedlm.integrations.transformers: {model_name}'s forward applies "
                f"`{step[1]}` to the lm_head output; only scalings and one tanh (final-logit "
                "softcapping) can be folded into the fused loss. Use the unpatched model.")
        if step[0] == "tanh":
            tanh_seen += 1
            if tanh_seen > 1:
                raise UnsupportedModelError(
                    f"fusedlm.integrations.transformers: {model_name} applies tanh to its "
                    "logits more than once; cannot fold that into the fused loss")
            continue
        if tanh_seen:
            after = after * step[1]
        else:
            before = before * step[1]
    if not tanh_seen:
        return before, None
    softcap = float(after)
    if not softcap > 0:
        raise UnsupportedModelError(
            f"fusedlm.integrations.transformers: {model_name} scales tanh(logits) by "
            f"{softcap}; only a positive softcap is supported")
    return before * softcap, softcap


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def _dtensor_error(name: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"fusedlm.integrations.transformers: {name}'s lm_head weight or its input is a "
        "DTensor here (the lm_head is its own FSDP2 unit, or tensor-parallel). Keep the "
        "lm_head (and tied embeddings) in the root FSDP2 module: fully_shard the decoder "
        "layers, then the whole model, without a separate fully_shard(model.lm_head)")


def _is_one(x) -> bool:
    return isinstance(x, float) and abs(x - 1.0) < 1e-12


# ----------------------------------------------------------------------------- patching


class _Capture:
    __slots__ = ("hidden", "want_logits", "calls")

    def __init__(self, want_logits: bool):
        self.hidden = None
        self.want_logits = want_logits
        self.calls = 0


class _PatchState:
    """Options and what was there before; lives in ``model.__dict__``, so it follows the
    model through ``copy.deepcopy`` and pickling (the per-thread capture slot is rebuilt)."""

    def __init__(self, model, head, terms, options, return_logits, ignore_index):
        self.head = head
        self.terms = terms
        self.options = options
        self.return_logits = return_logits
        self.ignore_index = ignore_index
        self.saved_model_forward = model.__dict__.get("forward", _MISSING)
        self.saved_head_forward = head.__dict__.get("forward", _MISSING)  # None: class's
        self.local = threading.local()

    def __getstate__(self):
        d = dict(self.__dict__)
        d.pop("local")
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self.local = threading.local()

    def capture(self) -> Optional[_Capture]:
        return getattr(self.local, "capture", None)


def _original(obj, saved):
    """The forward that was in place before patching: an instance-level one, or the class's
    (bound by a partial: dynamo in torch 2.11 could not trace ``function.__get__``)."""
    return functools.partial(type(obj).forward, obj) if saved is _MISSING else saved


class _PatchedModelForward:
    """``model.forward`` while patched. A module-level callable holding the model (not a
    closure), so deep copies and pickles of a patched model call their own parameters."""

    def __init__(self, model):
        self.model = model

    @property
    def __signature__(self):  # what Trainer inspects (it looks for **kwargs)
        return inspect.signature(self._original())

    @property
    def __wrapped__(self):
        return self._original()

    def _state(self) -> _PatchState:
        return self.model.__dict__[_STATE_ATTR]

    def _original(self):
        return _original(self.model, self._state().saved_model_forward)

    def __call__(self, *args, **kwargs):
        state = self._state()
        original = self._original()
        if "labels" in kwargs:
            labels = kwargs.pop("labels")
        else:
            names = list(inspect.signature(original).parameters)
            pos = names.index("labels") if "labels" in names else None
            if pos is not None and len(args) > pos:
                labels = args[pos]
                args = args[:pos] + (None,) + args[pos + 1:]
            else:
                labels = None
        want_logits = bool(kwargs.pop("return_logits", state.return_logits))
        if labels is None:
            return original(*args, **kwargs)
        if state.capture() is not None:
            raise RuntimeError("fusedlm.integrations.transformers: re-entrant forward with "
                               "labels on one thread is not supported")
        cap = _Capture(want_logits)
        state.local.capture = cap
        try:
            out = original(*args, **kwargs)
        finally:
            state.local.capture = None
        return _finish(self.model, state, cap, out, labels, kwargs)


class _CapturingHeadForward:
    """``lm_head.forward`` while patched: during a patched forward with labels, records the
    hidden states and returns a probe in place of the logits; otherwise the original."""

    def __init__(self, model, head):
        self.model = model
        self.head = head

    def __call__(self, hidden, *args, **kwargs):
        state = self.model.__dict__.get(_STATE_ATTR)
        original = _original(self.head, _MISSING if state is None else state.saved_head_forward)
        cap = None if state is None else state.capture()
        if cap is None:
            return original(hidden, *args, **kwargs)
        cap.calls += 1
        if cap.calls > 1:
            raise UnsupportedModelError(
                f"fusedlm.integrations.transformers: {_model_name(self.model)} calls its "
                "lm_head more than once per forward; cannot patch it")
        if _is_dtensor(hidden):  # (a probe cannot wrap a DTensor)
            raise _dtensor_error(_model_name(self.model))
        cap.hidden = hidden
        # An empty probe records what the model does to its logits; the logits themselves,
        # when asked for, are computed from that record in _finish (a full-size probe broke
        # torch.compile: dynamo recursed on it).
        return _new_probe(hidden.new_empty(*hidden.shape[:-1], 0), (), _ProbeFamily())


def is_patched(model: nn.Module) -> bool:
    """True if :func:`patch` was applied to ``model`` (and not undone)."""
    return _STATE_ATTR in getattr(model, "__dict__", {})


def _model_name(model) -> str:
    return type(model).__name__


# ----------------------------------------------------------------------------- the forward's source
# The patched forward runs the model's forward without labels, so what that forward does with
# them (a loss of its own, extra loss terms, relabelling) is read from its source instead.

_LOSS_CALL = re.compile(r"loss|entropy|nll|kl_div", re.IGNORECASE)  # F.cross_entropy, loss_fct, ...
_LABELS = ("labels", "shift_labels")
_BAMBA_Z_LOSS = "{}.logsumexp(dim=-1).to(dtype=loss.dtype).pow(2).mean()"


class _LossTerms:
    """What the model's forward adds to ``self.loss_function``'s loss, read from its source by
    _loss_terms. A coefficient is a number or an attribute path from the model, read at each
    forward as the forward reads it."""

    def __init__(self, known: bool = True, wrapper: Optional[str] = None):
        self.known = known  # False: the source was not available
        self.wrapper = wrapper  # a subclass whose forward uses the logits after super().forward()
        self.aux_coef = None  # `loss += coef * aux_loss` (MoE router aux loss)
        self.z_coef = None  # Bamba's `loss + coef * mean(logsumexp(logits) ** 2)`
        self.free_loss = False  # `loss = x if loss is None else loss + x`: x needs no labels


def _forward_nodes(forward) -> Optional[list]:
    """Every AST node of a forward's body (its docstring left out), or None without source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(forward))))
    except (OSError, TypeError, SyntaxError):
        return None
    fn = tree.body[0] if tree.body else None
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    body = fn.body[1:] if ast.get_docstring(fn) is not None else fn.body
    return [n for stmt in body for n in ast.walk(stmt)]


def _is_name(node, *names) -> bool:
    return isinstance(node, ast.Name) and node.id in names


def _name_of(node) -> str:
    """``x``, ``o.x`` and ``o["x"]`` -> "x"; anything else -> ""."""
    if isinstance(node, ast.Subscript):
        key = node.slice
        return key.value if isinstance(key, ast.Constant) and isinstance(key.value, str) else ""
    return node.id if isinstance(node, ast.Name) else getattr(node, "attr", "")


def _callee(node) -> str:
    return _name_of(node.func) if isinstance(node, ast.Call) else ""


def _targets(node) -> list:
    """What an assignment statement assigns to (tuple targets unpacked)."""
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        targets = [node.target]
    else:
        return []
    return [e for t in targets for e in (t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t])]


def _is_a_loss(node) -> bool:
    """Named as a loss: ``loss``, ``out.loss``, ``out["loss"]``, ``my_loss``, ..."""
    return _name_of(node).lower().endswith("loss")


def _is_none(value) -> bool:
    """No value, or the literal None."""
    return value is None or (isinstance(value, ast.Constant) and value.value is None)


def _passes_loss(value) -> bool:
    """None or an existing loss (``out.loss``, ``loss``): no loss computed here."""
    return _is_none(value) or _is_a_loss(value)


def _own_loss(nodes) -> Optional[str]:
    """Code by which a forward that calls ``super().forward`` computes a loss itself: a loss
    function's call, or another value than an existing loss assigned or passed as a loss."""
    for n in nodes:
        if isinstance(n, ast.Call) and _LOSS_CALL.search(_callee(n)):
            return ast.unparse(n)
        if isinstance(n, ast.keyword) and n.arg == "loss" and not _passes_loss(n.value):
            return ast.unparse(n)
        targets = _targets(n)
        if any(_is_a_loss(t) for t in targets) and (
                isinstance(n, ast.AugAssign) or len(targets) > 1 or not _passes_loss(n.value)):
            return ast.unparse(n)
    return None


def _changes_labels(n) -> bool:
    """Whether a node of a forward changes its labels (masks, slices, replaces them)."""
    if isinstance(n, ast.Call):  # labels.masked_fill_(...)
        return _callee(n).endswith("_") and _is_name(getattr(n.func, "value", None), *_LABELS)
    for t in _targets(n):
        if _is_name(t.value if isinstance(t, (ast.Subscript, ast.Attribute)) else t, *_LABELS):
            f = getattr(n.value, "func", None)
            # (what is allowed: labels.to(logits.device), kwargs.pop("shift_labels", None))
            kept = isinstance(n, ast.Assign) and isinstance(f, ast.Attribute) and (
                (f.attr in ("to", "contiguous") and _is_name(f.value, *_LABELS))
                or (f.attr in ("get", "pop") and _is_name(f.value, "kwargs")))
            if not kept:
                return True
    return False


def _check_labels(nodes, where: str, prefix: str):
    """The patched forward does not pass the labels in: the fused loss takes them as given."""
    for n in nodes:
        if _changes_labels(n):
            raise UnsupportedModelError(prefix + f"{where} changes its labels (`{ast.unparse(n)}`); "
                                        "the patched forward does not pass them in")


def _coef_path(node):
    """A coefficient as the forward reads it: a number, or ``self.a.b`` as ("a", "b")."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    path = []
    while isinstance(node, ast.Attribute):
        path.append(node.attr)
        node = node.value
    return tuple(reversed(path)) if path and _is_name(node, "self") else None


def _plain_loss(value) -> bool:
    """None, ``self.loss_function(...)`` or a sub-model's ``.loss`` (Blip2's language model)."""
    if isinstance(value, ast.IfExp):
        return _plain_loss(value.body) and _plain_loss(value.orelse)
    return (_is_none(value) or _callee(value) == "loss_function"
            or (isinstance(value, ast.Attribute) and value.attr == "loss"))


def _add_term(terms: _LossTerms, term, nodes, logits: Optional[str]) -> bool:
    """Records ``loss += term`` if it is a known extra term: ``coef * aux_loss[.to(...)]``
    (MoE) or ``coef * z_loss`` with Bamba's z-loss; False if not."""
    if not (isinstance(term, ast.BinOp) and isinstance(term.op, ast.Mult)):
        return False
    coef, x = _coef_path(term.left), term.right
    if _callee(x) == "to":
        x = x.func.value
    if coef is None:
        return False  # (a coefficient it cannot find: refused, not dropped)
    if _is_name(x, "aux_loss"):
        terms.aux_coef = coef
        return True
    z_defs = [n.value for n in nodes if any(_is_name(t, "z_loss") for t in _targets(n))]
    if (_is_name(x, "z_loss") and logits is not None and len(z_defs) == 1
            and ast.unparse(z_defs[0]) == _BAMBA_Z_LOSS.format(logits)):
        terms.z_coef = coef
        return True
    return False


def _adds_free_loss(value, loss: str) -> bool:
    """``x if loss is None else loss + x`` (GraniteDocling's router loss, from router_labels):
    an x computed without labels is the loss of the label-free run, added back in _finish."""
    return (isinstance(value, ast.IfExp) and ast.unparse(value.test) == f"{loss} is None"
            and isinstance(value.orelse, ast.BinOp) and isinstance(value.orelse.op, ast.Add)
            and ast.unparse(value.orelse.left) == loss
            and ast.dump(value.orelse.right) == ast.dump(value.body))


def _loss_logits(nodes, where: str, prefix: str) -> Optional[str]:
    """The logits the forward passes to ``self.loss_function``: they must be the logits it
    returns (the fused loss is computed from what was done to those), unchanged after."""
    calls = [n for n in nodes if _callee(n) == "loss_function"]
    returned = {ast.unparse(k.value) for n in nodes if isinstance(n, ast.Call) and n not in calls
                for k in n.keywords if k.arg == "logits"}
    logits = None
    for call in calls:
        arg = next((k.value for k in call.keywords if k.arg == "logits"), call.args[0] if call.args else None)
        logits = ast.unparse(arg) if arg is not None else "no logits"
        if not isinstance(arg, (ast.Name, ast.Attribute)) or (returned and logits not in returned):
            raise UnsupportedModelError(
                prefix + f"{where} passes `{logits}` to self.loss_function, not the logits it "
                f"returns (`{'`, `'.join(sorted(returned))}`): e.g. GIT leaves out its image tokens")
        for n in nodes:  # e.g. `logits = logits * 2` after the loss
            if (getattr(n, "lineno", 0) > call.lineno and any(ast.unparse(t) == logits for t in _targets(n))
                    and (isinstance(n, ast.AugAssign) or logits in map(ast.unparse, ast.walk(n.value)))):
                raise UnsupportedModelError(prefix + f"{where} changes its logits after computing "
                                            f"the loss (`{ast.unparse(n)}`)")
    return logits


def _loss_forward_terms(nodes, where: str, prefix: str, wrapper: Optional[str]) -> _LossTerms:
    """The terms of the forward that calls ``self.loss_function``; refuses anything else it
    does to the loss, its labels, or the logits of the loss."""
    terms = _LossTerms(wrapper=wrapper)
    logits = _loss_logits(nodes, where, prefix)
    _check_labels(nodes, where, prefix)
    for n in nodes:
        if isinstance(n, ast.keyword) and n.arg == "loss" and not (
                _is_name(n.value, "loss") or _plain_loss(n.value)):
            raise UnsupportedModelError(prefix + f"{where} returns `{ast.unparse(n.value)}` as its loss")
        targets = _targets(n)
        if not any(_name_of(t) == "loss" for t in targets):
            continue  # (terms such as aux_loss are read where they are added)
        this, value = ast.unparse(targets[0]), n.value
        if len(targets) != 1:
            ok = False
        elif isinstance(n, ast.AugAssign):
            ok = isinstance(n.op, ast.Add) and _add_term(terms, value, nodes, logits)
        elif (isinstance(value, ast.BinOp) and isinstance(value.op, ast.Add)
              and ast.unparse(value.left) == this):  # loss = loss + term
            ok = _add_term(terms, value.right, nodes, logits)
        elif _plain_loss(value):
            ok = True
        else:
            ok = terms.free_loss = _adds_free_loss(value, this)
        if not ok:
            raise UnsupportedModelError(prefix + f"{where} computes its loss with `{ast.unparse(n)}`, "
                                        "which the fused loss does not reproduce")
    return terms


def _loss_terms(model, prefix: str) -> _LossTerms:
    """Reads the model's forward that calls ``self.loss_function`` (transformers' causal-LM
    loss, which the patch replaces), following ``super().forward`` calls of subclasses down
    the MRO. Refuses forwards that compute a loss of their own or change the labels; a
    forward without source is taken on trust (but see _extra_losses)."""
    wrapper = None
    for cls in type(model).__mro__:
        forward = cls.__dict__.get("forward")
        if forward is None:
            continue
        nodes = _forward_nodes(forward)
        if nodes is None:
            return _LossTerms(known=False, wrapper=wrapper)
        where = f"{cls.__name__}.forward"
        if any(_name_of(n) == "loss_function" for n in nodes):
            return _loss_forward_terms(nodes, where, prefix, wrapper)
        if not any(_callee(n) == "super" for n in nodes):
            # (e.g. Qwen2Audio: it drops padded positions and ignores num_items_in_batch itself)
            raise UnsupportedModelError(prefix + "its forward computes its loss itself instead of "
                                        "calling self.loss_function, which the fused loss reproduces")
        _check_labels(nodes, where, prefix)
        own = _own_loss(nodes)
        if own is not None:
            raise UnsupportedModelError(prefix + f"{where} computes a loss of its own after super()"
                                        f".forward() (`{own}`), which the fused loss would replace")
        if wrapper is None and any(_name_of(n) == "logits" or getattr(n, "arg", None) == "logits"
                                   for n in nodes):
            wrapper = cls.__name__  # (what it does to them after super().forward() is not in the loss)
    return _LossTerms(wrapper=wrapper)


def _check_patchable(model) -> tuple:
    """(the lm_head, the _LossTerms of its forward), or UnsupportedModelError."""
    name = _model_name(model)
    prefix = f"fusedlm.integrations.transformers.patch: cannot patch {name}: "
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(prefix + "not a torch.nn.Module")
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):
        raise UnsupportedModelError(prefix + "it is a torch.compile wrapper: patch the model "
                                    "first, then compile the patched model")
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(model, "get_output_embeddings", None)):
        raise UnsupportedModelError(prefix + "not a Hugging Face transformers model (no "
                                    "`config` / `get_output_embeddings`)")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(prefix + "encoder-decoder models are not supported (only "
                                    "decoder-only causal LMs, whose labels are shifted)")
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    takes_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "labels" not in params and not takes_kwargs:
        raise UnsupportedModelError(prefix + "its forward takes no `labels`")
    loss_type = getattr(model, "loss_type", None)
    if loss_type is not None:
        try:
            from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
        except ImportError:  # pragma: no cover - very old transformers
            LOSS_MAPPING, ForCausalLMLoss = {}, None
        fn = LOSS_MAPPING.get(loss_type)
        if fn is not None and fn is not ForCausalLMLoss:
            raise UnsupportedModelError(prefix + f"its loss is {loss_type} "
                                        f"({getattr(fn, '__name__', fn)}), not a causal-LM "
                                        "cross-entropy over the vocabulary")
    terms = _loss_terms(model, prefix) if hasattr(type(model), "loss_function") else _LossTerms(False)
    head = model.get_output_embeddings()
    if head is None:
        head = getattr(model, "lm_head", None)
    if head is None:
        raise UnsupportedModelError(prefix + "it has no lm_head (get_output_embeddings() is "
                                    "None)")
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise UnsupportedModelError(
            prefix + f"its lm_head is a {type(head).__name__}, not a plain nn.Linear (adaptive, "
            "quantised or adapter-wrapped heads compute something other than e @ W.T + b)")
    w = head.weight
    if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise UnsupportedModelError(prefix + "its lm_head weight is not a floating-point "
                                    "(V, D) tensor")
    return head, terms


def patch(model: nn.Module, *, return_logits: bool = False, ignore_index: int = -100,
          **loss_options) -> nn.Module:
    """Make ``model`` compute its causal-LM training loss with
    :func:`fusedlm.linear_cross_entropy` on the final hidden states (no ``[B, T, V]``
    logits). Returns ``model`` (patched in place). Patch before wrapping with DDP/FSDP.

    Args:
        model: a ``transformers`` causal LM (``...ForCausalLM``, ``GPT2LMHeadModel``,
            ``...ForConditionalGeneration``, ...) whose output embedding is an ``nn.Linear``.
        return_logits: also compute and return the logits when labels are given (needed by
            e.g. ``Trainer.evaluate`` with ``compute_metrics``); per call, pass
            ``return_logits=True`` to the forward. Without labels the logits are always
            returned (the original forward runs).
        ignore_index: label value that is not predicted (HF: -100).
        **loss_options: passed to :func:`fusedlm.linear_cross_entropy`: ``filter_eps``,
            ``accum_fp32``, ``z_loss``, ``label_smoothing``. The softcap comes from the model
            (Gemma 2/3's ``config.final_logit_softcapping``).

    Raises:
        UnsupportedModelError: the model has no plain linear lm_head, is not a decoder-only
            causal LM, does something with its labels or loss that the fused loss cannot
            reproduce (read from its forward's source: a loss of its own, an unknown extra
            term, changed labels, a loss over other logits than it returns), or (at the first
            forward with labels) post-processes its logits in a way other than scalings and a
            final-logit softcap.
    """
    unknown = set(loss_options) - set(_LOSS_OPTIONS)
    if unknown:
        raise TypeError(f"patch() got unsupported loss options {sorted(unknown)}; allowed: "
                        f"{list(_LOSS_OPTIONS)} (shift, reduction and softcap follow the model)")
    if is_patched(model):
        unpatch(model)
    head, terms = _check_patchable(model)
    state = _PatchState(model, head, terms, dict(loss_options), bool(return_logits), int(ignore_index))
    model.__dict__[_STATE_ATTR] = state
    model.forward = _PatchedModelForward(model)
    head.forward = _CapturingHeadForward(model, head)
    return model


def _coefficient(model, coef):
    """A coefficient of an extra loss term, read as the forward reads it (see _coef_path)."""
    if not isinstance(coef, tuple):
        return coef
    value = model
    try:
        for attr in coef:
            value = getattr(value, attr)
    except AttributeError as err:
        raise UnsupportedModelError(
            f"fusedlm.integrations.transformers: {_model_name(model)}'s forward weighs a loss "
            f"term by self.{'.'.join(coef)}, which it cannot find ({err})") from None
    return value


def _extra_losses(out, at, terms: _LossTerms, name: str) -> tuple:
    """(a loss the label-free run returned, a router aux loss its forward adds), or None for
    those it does not have; refuses what it cannot account for."""
    if at is None:
        free, aux = getattr(out, "loss", None), getattr(out, "aux_loss", None)
    else:  # HF tuples drop None fields: before the logits come those of (loss, aux_loss) set
        pre = list(out[:at])
        if len(pre) == 2:
            free, aux = pre
        elif not pre:
            free = aux = None
        elif terms.free_loss and terms.aux_coef is None:
            free, aux = pre[0], None
        elif terms.aux_coef is not None and not terms.free_loss:
            free, aux = None, pre[0]
        else:
            raise UnsupportedModelError(
                f"fusedlm.integrations.transformers: {name} returns {len(pre)} value(s) before "
                "its logits (return_dict=False) that cannot be told apart; use return_dict=True")
    if free is not None and not terms.free_loss:
        raise UnsupportedModelError(
            f"fusedlm.integrations.transformers: {name}'s forward returned a loss without "
            "labels, which the fused loss would replace; cannot patch it")
    if aux is not None and terms.aux_coef is None:
        if terms.known:  # its forward does not add it to the loss
            return free, None
        raise UnsupportedModelError(
            f"fusedlm.integrations.transformers: {name} returns a router aux loss, but its "
            "forward's source is not available to tell how it adds it to the loss")
    return free, aux


def _finish(model, state: _PatchState, cap: _Capture, out, labels, kwargs):
    name = _model_name(model)
    if cap.hidden is None:
        raise UnsupportedModelError(
            f"fusedlm.integrations.transformers: {name}'s forward did not call its lm_head "
            "(get_output_embeddings()); cannot patch it")
    is_tuple = isinstance(out, tuple)
    # A tuple (return_dict=False) drops None fields: MoE models put their router aux loss
    # before the logits.
    at = next((i for i, o in enumerate(out) if isinstance(o, _LogitsProbe)), 0) if is_tuple else None
    logits = out[at] if is_tuple else getattr(out, "logits", None)
    if not isinstance(logits, _LogitsProbe):
        raise UnsupportedModelError(
            f"fusedlm.integrations.transformers: {name}'s output logits are not derived from "
            "its lm_head output by elementwise scalings/softcapping; cannot patch it")
    trouble = _integrity(logits)
    if trouble is not None:
        raise UnsupportedModelError(
            f"fusedlm.integrations.transformers: {name}'s forward {trouble}; cannot fold "
            "that into the fused loss. Use the unpatched model.")
    pre_scale, softcap = _interpret(logits._fusedlm_ops, name)
    terms = state.terms
    if terms.wrapper is not None and not (softcap is None and _is_one(pre_scale)):
        # (the parent's loss saw its own scalings only; the record holds the subclass's too)
        raise UnsupportedModelError(
            f"fusedlm.integrations.transformers: {terms.wrapper}.forward uses the logits after "
            "super().forward(), whose loss does not see what it does to them, and they are "
            "scaled or softcapped: cannot tell whose that is. Use the unpatched model.")

    head = state.head
    hidden, weight, bias = cap.hidden, head.weight, head.bias
    if _is_dtensor(weight) or _is_dtensor(hidden):
        raise _dtensor_error(name)
    if not (isinstance(pre_scale, float) and _is_one(pre_scale)):
        hidden = hidden * pre_scale
        bias = bias * pre_scale if bias is not None else None
    shift_labels = kwargs.get("shift_labels")
    if shift_labels is not None:
        targets, shift = shift_labels.to(hidden.device), False
    else:
        targets, shift = labels.to(hidden.device), True
    if targets.shape != hidden.shape[:-1]:
        # (unpatched, either an error too or a loss over part of the logits, as Blip2's)
        raise UnsupportedModelError(
            f"fusedlm.integrations.transformers: {name}'s labels have shape "
            f"{tuple(targets.shape)}, its lm_head ran on {tuple(hidden.shape[:-1])} positions: "
            "labels of another length (or logits_to_keep), or a forward that takes its loss "
            "over part of the logits (e.g. after an image-token prefix), which the fused loss "
            "cannot reproduce")
    free, aux = _extra_losses(out, at, terms, name)
    num_items = kwargs.get("num_items_in_batch")
    z_coef = 0.0 if terms.z_coef is None else _coefficient(model, terms.z_coef)
    loss = linear_cross_entropy(
        hidden, weight, targets, bias, ignore_index=state.ignore_index,
        reduction="sum" if num_items is not None else "mean", softcap=softcap, shift=shift,
        return_lse=z_coef > 0, **state.options)
    loss, lse = loss if z_coef > 0 else (loss, None)
    if num_items is not None:
        if torch.is_tensor(num_items):
            num_items = num_items.to(loss.device)
        loss = loss / num_items
    if lse is not None:  # Bamba's z-loss: a mean over every position, ignored ones included
        loss = loss + z_coef * lse.pow(2).mean()
    if free is not None:
        loss = loss + free.to(loss.device)
    if aux is not None:
        loss = loss + _coefficient(model, terms.aux_coef) * aux.to(loss.device)

    plain_logits = None
    if cap.want_logits:  # the model's logits: its lm_head output, scaled / softcapped
        z = F.linear(cap.hidden, head.weight, head.bias)
        if softcap is None:
            plain_logits = z if _is_one(pre_scale) else z * pre_scale
        else:
            plain_logits = torch.tanh(z * (pre_scale / softcap)) * softcap
        plain_logits = plain_logits.to(logits.dtype)
    if is_tuple:  # (the label-free run's loss, if any, came first: now part of the loss)
        return ((loss,) + tuple(out[int(free is not None):at])
                + ((plain_logits,) if plain_logits is not None else ()) + tuple(out[at + 1:]))
    fields = {k: v for k, v in out.items()}
    fields["loss"] = loss
    fields["logits"] = plain_logits
    try:
        return type(out)(**fields)
    except TypeError:  # not a dataclass-style ModelOutput: set the fields in place
        out["loss"] = loss
        out.logits = plain_logits
        return out


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: the model's and the lm_head's ``forward`` are restored exactly
    (including any instance-level forward that was there before, e.g. accelerate hooks).
    A no-op on an unpatched model. Returns ``model``."""
    state = model.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return model
    for obj, saved in ((model, state.saved_model_forward), (state.head, state.saved_head_forward)):
        if saved is _MISSING:
            obj.__dict__.pop("forward", None)
        else:
            obj.__dict__["forward"] = saved
    return model
