"""The type rules of the built-in functions, one method `_rule_<rule>` per rule named by the
records of `propdsl.builtins` (a rule serves every built-in of the same shape: `elementwise`
types `abs`, `exp`, ... alike). The arity and the keywords come from the record."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from propdsl import ast as A
from propdsl import ir as I
from propdsl.builtins import BUILTINS, Builtin
from propdsl.check.base import MAX_RANGE, ErrTy
from propdsl.check.constants import NOT_CONST, const_or
from propdsl.check.results import show_value
from propdsl.check.scope import Names, NetEntry, Scope, given, keyword_name_span, visible_networks
from propdsl.source import Span
from propdsl.types import NAT, REAL, IndexTy, TensorTy, is_numeric, is_scalar, shape_of

# Rules that type their arguments themselves (a network by name, a variable to differentiate).
_OWN_ARGUMENTS = ("grad", "explainer")


class Builtins(Names):
    """Calls of built-in functions."""

    def builtin(self, fid: str, e: A.Call, scope: Scope) -> I.Node:
        rec = BUILTINS[fid]
        spec = rec.keywords
        for k in e.keywords:
            if k.name not in spec:
                hint = self.did_you_mean(k.name, list(spec))
                self.error(
                    f"'{fid}' has no keyword '{k.name}'",
                    keyword_name_span(k),
                    f"did you mean '{hint}'?"
                    if hint
                    else (
                        f"its keywords are {', '.join(spec)}"
                        if spec
                        else f"'{fid}' takes positional arguments only"
                    ),
                )
                return self.bad(e.span)
        if rec.rule in _OWN_ARGUMENTS:
            rule: Callable[..., I.Node] = getattr(self, f"_rule_{rec.rule}")
            return rule(rec, e, scope)
        args = [self.infer(a, scope) for a in e.args]
        if any(isinstance(a.ty, ErrTy) for a in args):
            return self.bad(e.span)
        rule = getattr(self, f"_rule_{rec.rule}")
        return rule(rec, e, args)

    def arity(self, rec: Builtin, e: A.Call, args: list[I.Node]) -> bool:
        fid, counts = rec.name, rec.arity
        if len(args) in counts:
            return True
        want = " or ".join(map(str, counts))
        noun = "argument" if counts == (1,) else "arguments"
        self.error(f"'{fid}' takes {want} {noun}, but {given(len(args))}", e.span)
        return False

    def numeric(self, fid: str, node: I.Node, span: Span | None) -> bool:
        if is_numeric(node.ty):
            return True
        self.error(f"'{fid}' needs a number or tensor, but this is {node.ty}", span)
        return False

    def _rule_elementwise(self, rec: Builtin, e: A.Call, args: list[I.Node]) -> I.Node:
        fid = rec.name
        if not self.arity(rec, e, args) or not self.numeric(fid, args[0], e.args[0].span):
            return self.bad(e.span)
        ty = args[0].ty
        return I.Fn(
            fid, tuple(args), REAL if ty == NAT or isinstance(ty, IndexTy) else ty, span=e.span
        )

    def _rule_vector_map(self, rec: Builtin, e: A.Call, args: list[I.Node]) -> I.Node:
        fid = rec.name
        if not self.arity(rec, e, args):
            return self.bad(e.span)
        ty = args[0].ty
        if not isinstance(ty, TensorTy) or len(ty.shape) != 1:
            self.error(f"'{fid}' needs a vector Tensor[K], but this is {ty}", e.args[0].span)
            return self.bad(e.span)
        return I.Fn(fid, tuple(args), ty, span=e.span)

    def _rule_reduction(self, rec: Builtin, e: A.Call, args: list[I.Node]) -> I.Node:
        fid = rec.name
        if not self.arity(rec, e, args) or not self.numeric(fid, args[0], e.args[0].span):
            return self.bad(e.span)
        return I.Fn(fid, tuple(args), REAL, span=e.span)

    def same_shape(self, fid: str, e: A.Call, args: list[I.Node]) -> bool:
        a, b = shape_of(args[0].ty), shape_of(args[1].ty)
        if a is None or b is None or a != b:
            self.error(
                f"'{fid}' needs two tensors of the same shape, got {args[0].ty} and {args[1].ty}",
                e.span,
            )
            return False
        return True

    def _rule_pair(self, rec: Builtin, e: A.Call, args: list[I.Node]) -> I.Node:
        fid = rec.name
        if not self.arity(rec, e, args) or not self.same_shape(fid, e, args):
            return self.bad(e.span)
        return I.Fn(fid, tuple(args), REAL, span=e.span)

    def _rule_topk_overlap(self, rec: Builtin, e: A.Call, args: list[I.Node]) -> I.Node:
        fid = rec.name
        if not self.arity(rec, e, args) or not self.same_shape(fid, e, args[:2]):
            return self.bad(e.span)
        k = self.const_of(args[2], e.args[2].span, "k")
        shape = shape_of(args[0].ty) or ()
        size = math.prod(shape)
        if k is None or not isinstance(k, int) or not 1 <= k <= size:
            self.error(f"k must be a constant between 1 and {size}", e.args[2].span)
            return self.bad(e.span)
        return I.Fn(fid, tuple(args[:2]), REAL, (("k", k),), span=e.span)

    def _rule_norm(self, rec: Builtin, e: A.Call, args: list[I.Node]) -> I.Node:
        fid = rec.name
        if not self.arity(rec, e, args) or not self.numeric(fid, args[0], e.args[0].span):
            return self.bad(e.span)
        p: Any = 2
        if len(args) == 2:
            p = self.const_of(args[1], e.args[1].span, "the norm's p")
            if p is None:
                return self.bad(e.span)
            if p not in (1, 2, math.inf):
                self.error(f"norm's p must be 1, 2 or inf, got {show_value(p)}", e.args[1].span)
                return self.bad(e.span)
        return I.Fn("norm", (args[0],), REAL, (("p", float(p)),), span=e.span)

    def _rule_extreme(self, rec: Builtin, e: A.Call, args: list[I.Node]) -> I.Node:
        fid = rec.name
        if not self.arity(rec, e, args):
            return self.bad(e.span)
        if len(args) == 1:
            if not isinstance(args[0].ty, TensorTy):
                self.error(f"'{fid}' of one argument needs a tensor, got {args[0].ty}", e.span)
                return self.bad(e.span)
            return I.Fn(fid, (args[0],), REAL, span=e.span)
        fake = A.Binary(fid, e.args[0], e.args[1], span=e.span)
        return self.arith(fid, args[0], args[1], fake)

    def _rule_argmax(self, rec: Builtin, e: A.Call, args: list[I.Node]) -> I.Node:
        fid = rec.name
        if not self.arity(rec, e, args):
            return self.bad(e.span)
        ty = args[0].ty
        if not isinstance(ty, TensorTy) or len(ty.shape) != 1:
            self.error(f"'{fid}' needs a vector Tensor[K], but this is {ty}", e.args[0].span)
            return self.bad(e.span)
        return I.Fn(fid, (args[0],), IndexTy(ty.shape[0], True), span=e.span)

    def _rule_uniform(self, rec: Builtin, e: A.Call, args: list[I.Node]) -> I.Node:
        if not self.arity(rec, e, args):
            return self.bad(e.span)
        return I.Fn(rec.name, (), REAL, span=e.span)

    def _rule_clamp(self, rec: Builtin, e: A.Call, args: list[I.Node]) -> I.Node:
        fid = rec.name
        if not self.arity(rec, e, args):
            return self.bad(e.span)
        for a, s in zip(args, e.args, strict=True):
            if not self.numeric(fid, a, s.span):
                return self.bad(e.span)
        for a, s in zip(args[1:], e.args[1:], strict=True):
            if not is_scalar(a.ty):
                self.error("clamp's bounds must be scalars", s.span)
                return self.bad(e.span)
        ty = args[0].ty
        return I.Fn(fid, tuple(args), REAL if is_scalar(ty) else ty, span=e.span)

    def _rule_cross_entropy(self, rec: Builtin, e: A.Call, args: list[I.Node]) -> I.Node:
        fid = rec.name
        if not self.arity(rec, e, args):
            return self.bad(e.span)
        logits, label = args
        if not isinstance(logits.ty, TensorTy) or len(logits.ty.shape) != 1:
            self.error(f"cross_entropy needs logits Tensor[K], got {logits.ty}", e.args[0].span)
            return self.bad(e.span)
        k = logits.ty.shape[0]
        if not isinstance(label.ty, IndexTy) or label.ty.k != k:
            self.error(f"cross_entropy needs a label Label[{k}], got {label.ty}", e.args[1].span)
            return self.bad(e.span)
        return I.Fn(fid, (logits, label), REAL, span=e.span)

    def _rule_ball(self, rec: Builtin, e: A.Call, args: list[I.Node]) -> I.Node:
        if not self.arity(rec, e, args):
            return self.bad(e.span)
        centre, radius = args[0], args[1]
        if not is_numeric(centre.ty):
            self.error(f"a ball's centre must be a tensor, got {centre.ty}", e.args[0].span)
            return self.bad(e.span)
        if not is_scalar(radius.ty):
            self.error(f"a ball's radius must be a Real number, got {radius.ty}", e.args[1].span)
            return self.bad(e.span)
        r = self.const(radius)
        if r is not NOT_CONST and r < 0:
            self.error(f"a ball's radius must be non-negative, got {show_value(r)}", e.args[1].span)
            return self.bad(e.span)
        p: Any = math.inf
        if len(args) == 3:
            p = self.const_of(args[2], e.args[2].span, "the ball's norm")
            if p is None:
                return self.bad(e.span)
            if p not in (1, 2, math.inf):
                self.error(
                    f"a ball's norm must be 1, 2 or inf, got {show_value(p)}", e.args[2].span
                )
                return self.bad(e.span)
        return I.Ball(centre, radius, float(p), span=e.span)

    def _rule_box(self, rec: Builtin, e: A.Call, args: list[I.Node]) -> I.Node:
        if not self.arity(rec, e, args):
            return self.bad(e.span)
        lo, hi = args
        for a, s in zip(args, e.args, strict=True):
            if not self.numeric(rec.name, a, s.span):
                return self.bad(e.span)
        ls, hs = shape_of(lo.ty), shape_of(hi.ty)
        if ls and hs and ls != hs:
            self.error(f"a box's bounds differ in shape: {lo.ty} and {hi.ty}", e.span)
            return self.bad(e.span)
        a, b = self.const(lo), self.const(hi)
        if NOT_CONST not in (a, b) and is_scalar(lo.ty) and is_scalar(hi.ty) and a > b:
            self.error(f"an empty box: the lower bound {a} exceeds the upper bound {b}", e.span)
            return self.bad(e.span)
        return I.Box(lo, hi, span=e.span)

    def _rule_range(self, rec: Builtin, e: A.Call, args: list[I.Node]) -> I.Node:
        if not self.arity(rec, e, args):
            return self.bad(e.span)
        k = self.const_of(args[0], e.args[0].span, "range's size")
        if k is None:
            return self.bad(e.span)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            self.error(f"range needs a positive integer, got {show_value(k)}", e.args[0].span)
            return self.bad(e.span)
        if k > MAX_RANGE:
            self.error(
                f"range({k}) is too large: a finite domain holds at most {MAX_RANGE:,} values",
                e.args[0].span,
                "the backends evaluate every value for every sample; quantify over a ball or "
                "a box, or over fewer values",
            )
            return self.bad(e.span)
        return I.Range(k, False, span=e.span)

    def _rule_grad(self, rec: Builtin, e: A.Call, scope: Scope) -> I.Node:
        if len(e.args) not in rec.arity:
            self.error(
                f"'grad' takes {rec.arity[0]} arguments, but {given(len(e.args))}",
                e.span,
                "grad(expression, variable)",
            )
            return self.bad(e.span)
        wrt = self.infer(e.args[1], scope)
        if isinstance(wrt.ty, ErrTy):
            return self.bad(e.span)
        if not isinstance(wrt, I.Var) or not isinstance(wrt.ty, TensorTy):
            self.error(
                "grad differentiates with respect to a tensor variable (a property parameter "
                "or a quantified variable)",
                e.args[1].span,
            )
            return self.bad(e.span)
        expr = self.infer(e.args[0], scope)
        if isinstance(expr.ty, ErrTy):
            return self.bad(e.span)
        if not is_scalar(expr.ty):
            self.error(f"grad needs a Real expression, but this is {expr.ty}", e.args[0].span)
            return self.bad(e.span)
        return I.Fn("grad", (expr, wrt), wrt.ty, span=e.span)

    def _rule_explainer(self, rec: Builtin, e: A.Call, scope: Scope) -> I.Node:
        fid = rec.name
        if len(e.args) not in rec.arity:
            self.error(
                f"'{fid}' takes {rec.arity[0]} arguments (network, input, label), but "
                f"{given(len(e.args))}",
                e.span,
            )
            return self.bad(e.span)
        f = e.args[0]
        entry = scope.lookup(f.id) if isinstance(f, A.Name) else None
        if entry is None and isinstance(f, A.Name) and f.id in self.failed:
            return self.bad(e.span)
        if not isinstance(entry, NetEntry):
            nets = visible_networks(self.networks, scope)
            net = nets[0] if len(nets) == 1 else "f"
            self.error(
                f"the first argument of '{fid}' must be a network",
                f.span,
                f"pass the network itself, as in {fid}({net}, x, y)",
            )
            return self.bad(e.span)
        x = self.infer(e.args[1], scope)
        y = self.infer(e.args[2], scope)
        if isinstance(x.ty, ErrTy) or isinstance(y.ty, ErrTy):
            return self.bad(e.span)
        if x.ty != entry.ty.inp:
            self.error(f"'{fid}' needs an input {entry.ty.inp}, but this is {x.ty}", e.args[1].span)
            return self.bad(e.span)
        k = entry.ty.out.shape[0]
        if not (isinstance(y.ty, IndexTy) and y.ty.k == k) and not (
            y.ty == NAT and 0 <= const_or(y, self.params, -1) < k
        ):
            self.error(f"'{fid}' needs a class Label[{k}], but this is {y.ty}", e.args[2].span)
            return self.bad(e.span)
        opts: list[tuple[str, object]] = [("net", entry.name)]
        for kw in e.keywords:
            node = self.infer(kw.value, scope)
            if isinstance(node.ty, ErrTy):
                return self.bad(e.span)
            v = self.const_of(node, kw.value.span, f"'{kw.name}'")
            if v is None:
                return self.bad(e.span)
            value = self.in_range(v, rec.keywords[kw.name], kw.name, kw.value)
            if value is NOT_CONST:
                return self.bad(e.span)
            opts.append((kw.name, value))
        return I.Fn(fid, (x, y), entry.ty.inp, tuple(opts), span=e.span)
