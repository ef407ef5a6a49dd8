"""Verify properties on samples: falsify first, then prove with bound propagation.

For each property and batch of samples:
1. the falsifier (a strong APGD attack on the logic-independent signed violation) looks for a
   point of the region where the property is false; where it finds one, the exact Boolean
   semantics confirms it, the verdict is `falsified` and the point is kept;
2. for the other samples the property becomes a query (`to_query`) whose linear rows are
   bounded over the region (IBP, CROWN-IBP, CROWN or alpha-CROWN; `chunk` samples per call);
   `verified` only where the bounds prove every needed row, `unknown` elsewhere. Lipschitz and
   explanation-stability properties, outside the linear fragment, are decided from Jacobian
   bounds instead (`propdsl.verify.jacobian`, docs/jacobian.md).
A sample is never `verified` when a counterexample was found: falsification comes first.
Properties outside the linear fragment get `unsupported` (with a positioned reason) unless the
falsifier refutes them.

A point refutes a property only when every quantifier over a region is universal (a `forall` in
a positive position of the normal form): then the point is an assignment of the quantified
variables under which the body is false. Where a region quantifier is existential (an `exists`,
or a `forall` in the premise of an implication) or a `max` / `min` over a region, a failed search
proves nothing and the sample stays open. Dually, a property whose region quantifiers are all
existential is `verified` by the attack's point when the body holds there (a witness).

Empty regions (a ball that misses its box) are decided before anything else, per sample: when
the property starts with `forall` over regions (possibly several, `forall x1 in R1, x2 in R2`,
or nested ones whose regions do not depend on the outer variables) and one of them is empty,
it holds vacuously: `verified`, reason "the region is empty ...". Dually a leading `exists` over
an empty region is `falsified` with that reason and no witness. Elsewhere in a formula a
quantifier over an empty region takes its vacuous value in the exact evaluation (the compiler
never evaluates its body at a point outside the region), and where every region the property
evaluates for a sample is empty that evaluation is exact and decides the sample. The bound
engine never sees an empty region (it refuses one). Every verdict that is neither `verified`
nor `falsified`, and every one decided by an empty region, has a per-sample reason
(`PropertyVerdicts.reasons`).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from propdsl import distributed
from propdsl import ir as I
from propdsl.attacks import APGD
from propdsl.errors import UsageError
from propdsl.interpret import EmptyRegionWarning, differentiates
from propdsl.verify.bounds import AlphaOptions, Method, bounds
from propdsl.verify.jacobian import JacobianQuery, to_jacobian_query
from propdsl.verify.layers import UnsupportedLayerError
from propdsl.verify.query import Query, Unsupported, to_query

VERIFIED = "verified"
FALSIFIED = "falsified"
UNKNOWN = "unknown"
TIMEOUT = "unknown (timeout)"
UNSUPPORTED = "unsupported"
STATUSES = (VERIFIED, FALSIFIED, UNKNOWN, TIMEOUT, UNSUPPORTED)


@dataclass
class PropertyVerdicts:
    """Per-sample verdicts of one property.

    Attributes:
        status: one of `verified`, `falsified`, `unknown`, `unknown (timeout)`, `unsupported`.
        margin: the smallest certified row margin per sample (>= 0 where verified; NaN where no
            bound was computed).
        counterexamples: {variable: Tensor[B, ...]} points (valid where status is falsified by
            a counterexample; NaN rows where the variable's region is empty).
        witnesses: {variable: Tensor[B, ...]} the attack's points of a property whose region
            quantifiers are all existential (valid where status is verified without a reason:
            the body holds there); empty for other properties.
        seconds: wall time spent on this property.
        reason: why the property is unsupported, with its position, if it is (property-level).
        reasons: per sample, why it got its verdict where that needs saying: every
            `unknown`, `unknown (timeout)` and `unsupported` verdict (the certified margin that
            fell short, the budget spent, the unsupported form) and every verdict decided by an
            empty region; None for plain `verified` (bounds or witness) and `falsified`
            (counterexample) verdicts.
    """

    name: str
    status: list[str]
    margin: Tensor
    counterexamples: dict[str, Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    reason: str | None = None
    reasons: list[str | None] = field(default_factory=list)
    witnesses: dict[str, Tensor] = field(default_factory=dict)

    def rate(self, status: str) -> float:
        return sum(s == status for s in self.status) / max(1, len(self.status))


DEFAULT_CHUNK = 32  # samples bounded per call


def default_falsifier(steps: int = 50, restarts: int = 2) -> APGD:
    return APGD(steps=steps, restarts=restarts)


def verify_property(
    spec: Any,
    name: str,
    model: nn.Module,
    x: Tensor,
    y: Tensor | None,
    *,
    method: Method | str = Method.CROWN,
    falsifier: Any = None,
    timeout: float | None = None,
    alpha: AlphaOptions | None = None,
    generator: torch.Generator | None = None,
    chunk: int = DEFAULT_CHUNK,
    complete: bool = False,
    partner: tuple[Tensor, Tensor] | None = None,
) -> PropertyVerdicts:
    """Verdicts of property `name` for each sample of (x, y); see the module docstring.

    The samples the falsifier leaves open are bounded `chunk` at a time: bounds are per sample,
    so the verdicts do not depend on it, but memory does (alpha-CROWN keeps slopes and their
    optimiser state per sample, intermediate neuron and row).

    With `complete`, every sample the bounds leave `unknown` goes to the complete verifier
    (`propdsl.verify.complete`, branch and bound) with `timeout` seconds of its own (default
    COMPLETE_TIMEOUT; the bounds then run without a deadline): `verified` when it proves the
    property, `falsified` with its counterexample when it finds one (only for properties whose
    region quantifiers are all universal, where a point refutes), else `unknown` or
    `unknown (timeout)` with its reason. The CPU only, linear properties (not the Jacobian
    ones)."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise UsageError(f"chunk must be a positive integer, got {chunk!r}")
    if not isinstance(complete, bool):
        raise UsageError(f"complete must be True or False, got {complete!r}")
    _check_inputs(x)
    if complete and (
        x.device.type != "cpu"
        or any(t.device.type != "cpu" for t in [*model.parameters(), *model.buffers()])
    ):
        raise UsageError("complete verification runs on the CPU: use device cpu")
    t0 = time.perf_counter()
    prop = spec.property(name)
    batch = x.shape[0]
    if prop.paired and partner is None:
        if y is None:
            raise UsageError(f"property '{name}' is a property of a pair: it needs labels y")
        # no partners given: drawn from the samples themselves, as the property says
        from propdsl.partners import draw

        partner = draw(prop.partner, model, x, y, x, y)
    status = [UNKNOWN] * batch
    reasons: list[str | None] = [None] * batch
    margin = torch.full((batch,), float("nan"), dtype=torch.float64)
    deadline = None if timeout is None or complete else t0 + timeout * batch
    method = as_method(method)
    still_open: list[int] = []  # unknown after the bounds: the complete verifier's samples
    was = model.training
    model.eval()
    try:
        attack = falsifier or default_falsifier()
        if differentiates(prop.formula) and getattr(attack, "surrogate_beta", None) is None:
            attack = dataclasses.replace(attack, surrogate_beta=10.0)
        loss = spec.loss(name, logic="dl2", attack=attack, generator=generator)
        with warnings.catch_warnings():
            # Empty regions are reported per sample below, with their verdicts.
            warnings.simplefilter("ignore", EmptyRegionWarning)
            out = loss(model, x, y, partner=partner)
        satisfied = out.satisfied.detach().cpu()
        # points per sample only (a region quantifier under a finite one has K points per sample)
        counterexamples = {
            k: v.detach() for k, v in out.counterexample.items() if v.shape[0] == batch
        }
        kinds = _region_quantifiers(prop.formula)
        refutable = kinds <= {"forall"}
        witnessed = bool(kinds) and kinds <= {"exists"}
        lead_kind, lead_vars = _leading_region_quantifiers(prop.formula)
        lead_empty = torch.zeros(batch, dtype=torch.bool)
        for v in lead_vars:
            mask = out.empty.get(v)
            if mask is not None and mask.shape[0] == batch:
                lead_empty |= mask.cpu()
        all_empty = (
            out.all_empty.cpu()
            if out.all_empty is not None
            else torch.zeros(batch, dtype=torch.bool)
        )
        open_idx = []
        for i in range(batch):
            if bool(lead_empty[i]):
                status[i] = VERIFIED if lead_kind == "forall" else FALSIFIED
                reasons[i] = _empty_reason(lead_kind, lead_vars, out.empty, i)
            elif bool(all_empty[i]):
                status[i] = VERIFIED if bool(satisfied[i]) else FALSIFIED
                reasons[i] = (
                    "every region the property quantifies over is empty for this sample (the "
                    "ball does not meet the box): its quantifiers take their vacuous values, "
                    "and the formula is decided exactly"
                )
            elif not bool(satisfied[i]) and refutable:
                status[i] = FALSIFIED
            elif bool(satisfied[i]) and witnessed:
                status[i] = VERIFIED
            else:
                open_idx.append(i)
        witnesses = counterexamples if witnessed else {}
        if not refutable:
            counterexamples = {}
        reason = None
        if open_idx:
            networks = {n: t.out.shape[0] for n, t in spec.networks.items()}
            models = {n: model for n in spec.networks}
            params = [p for p, _ in prop.params]
            try:
                for start in range(0, len(open_idx), chunk):
                    part = open_idx[start : start + chunk]
                    if deadline is not None and time.perf_counter() > deadline:
                        for i in part:
                            status[i] = TIMEOUT
                            reasons[i] = _timeout_reason(timeout, batch, before=True)
                        continue
                    idx = torch.tensor(part, device=x.device)
                    sub_y = y[idx] if y is not None else None
                    with torch.no_grad():
                        sub_partner = (
                            None if partner is None else (partner[0][idx], partner[1][idx])
                        )
                        query = _to_query(
                            prop.formula, params, networks, x[idx], sub_y, models, sub_partner
                        )
                    if query is None:
                        # no quantified input: the exact evaluation above decided it
                        for i in part:
                            status[i] = VERIFIED if bool(satisfied[i]) else FALSIFIED
                        continue
                    proved, margins, strict = _prove(query, model, method, alpha)
                    late = deadline is not None and time.perf_counter() > deadline
                    for j, i in enumerate(part):
                        margin[i] = float(margins[j])
                        if bool(proved[j]):
                            status[i] = VERIFIED
                        elif late:
                            status[i] = TIMEOUT
                            reasons[i] = _timeout_reason(timeout, batch, before=False)
                        else:
                            status[i] = UNKNOWN
                            reasons[i] = _loose_reason(method, float(margins[j]), strict)
                            if isinstance(query, Query):
                                still_open.append(i)
                if complete and still_open:
                    idx = torch.tensor(still_open, device=x.device)
                    sub_y = y[idx] if y is not None else None
                    with torch.no_grad():
                        query = _to_query(prop.formula, params, networks, x[idx], sub_y, models)
                    counterexamples = _complete(
                        query,
                        model,
                        still_open,
                        timeout,
                        refutable,
                        status,
                        reasons,
                        counterexamples,
                    )
            except Unsupported as err:
                reason = _positioned(spec, err)
                for i in open_idx:
                    status[i] = UNSUPPORTED
                    reasons[i] = reason
            except UnsupportedLayerError as err:
                reason = f"the bound engine does not cover the model: {err}"
                for i in open_idx:
                    status[i] = UNSUPPORTED
                    reasons[i] = reason
    finally:
        model.train(was)
    seconds = time.perf_counter() - t0
    return PropertyVerdicts(
        name, status, margin, counterexamples, seconds, reason, reasons, witnesses
    )


COMPLETE_TIMEOUT = 60.0  # seconds per sample of the complete verifier, unless `timeout`


def _complete(
    query: Any,
    model: nn.Module,
    samples: list[int],
    timeout: float | None,
    refutable: bool,
    status: list[str],
    reasons: list[str | None],
    counterexamples: dict[str, Tensor],
) -> dict[str, Tensor]:
    """The complete verifier on the samples the bounds left unknown; fills status, reasons
    and (for falsified samples) the counterexamples of the query's variable."""
    from propdsl.verify.complete import CompleteOptions, complete_verdicts

    if not isinstance(query, Query) or query.region is None or query.variable is None:
        return counterexamples  # not a linear query over one region: stays unknown
    batch = len(status)
    if query.region.shape[0] != len(samples):
        for i in samples:  # a region per point of a finite quantifier: not one problem each
            reasons[i] = f"{reasons[i]}; the complete verifier takes one region per sample"
        return counterexamples
    options = CompleteOptions(timeout=timeout if timeout is not None else COMPLETE_TIMEOUT)
    try:
        verdicts, why, points = complete_verdicts(query, model, options)
    except (Unsupported, UnsupportedLayerError, UsageError) as err:
        # the bounds' verdicts stand; the samples stay unknown, with the reason
        for i in samples:
            reasons[i] = f"{reasons[i]}; the complete verifier cannot take it: {err}"
        return counterexamples
    out = dict(counterexamples)
    for j, i in enumerate(samples):
        verdict = verdicts[j]
        if verdict == FALSIFIED and not refutable:
            verdict = UNKNOWN
            why[j] = (
                "the complete verifier found a point where the property's body fails, but a "
                "region quantifier is existential here: a point refutes nothing"
            )
        status[i] = verdict
        reasons[i] = f"complete verifier: {why[j]}" if why[j] else None
        if verdict == FALSIFIED:
            var = query.variable
            if var not in out:
                out[var] = torch.full((batch, *points.shape[1:]), math.nan, dtype=points.dtype)
            out[var] = out[var].clone()
            out[var][i] = points[j].to(out[var])
    return out


def _check_inputs(x: Tensor) -> None:
    """Verification needs finite inputs: a NaN centre makes every region and bound NaN."""
    if not isinstance(x, Tensor):
        raise UsageError(f"x must be a tensor, got {type(x).__name__}")
    if x.is_floating_point():
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            rows = bad.reshape(x.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
            shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
            raise UsageError(
                f"x has {int(bad.sum())} NaN or infinite values (samples {shown}): "
                "verification needs finite inputs"
            )


def _leading_region_quantifiers(formula: I.Node) -> tuple[str | None, list[str]]:
    """The kind and variables of the region quantifiers the formula starts with: a chain of
    `forall` (or of `exists`) over regions, each region free of the chain's earlier variables,
    so that the chain ranges over the product of its regions (empty when one of them is)."""
    node: I.Node = formula
    kind: str | None = None
    names: list[str] = []
    while (
        isinstance(node, I.Quant)
        and node.kind in ("forall", "exists")
        and kind in (None, node.kind)
        and not any(isinstance(d, I.Range) for d in node.domains)
        and not any(I.free_vars(d) & set(names) for d in node.domains)
    ):
        kind = node.kind
        names += [v.name for v in node.vars]
        node = node.body
    return kind, names


def _empty_reason(kind: str | None, names: list[str], empty: dict[str, Tensor], i: int) -> str:
    which = [v for v in names if v in empty and bool(empty[v][i])]
    where = f"the region of {', '.join(which)}" if which else "the region"
    if kind == "forall":
        return f"the region is empty ({where} does not meet its box): 'forall' holds vacuously"
    return f"the region is empty ({where} does not meet its box): 'exists' has no witness"


def _loose_reason(method: Method, margin: float, strict: bool) -> str:
    if math.isnan(margin):
        return f"the {method.value} bounds proved nothing (no finite certified margin)"
    need = "> 0 (a strict comparison)" if strict and margin >= 0 else ">= 0"
    return (
        f"the {method.value} bounds are too loose: certified margin {margin:.4g}, a proof "
        f"needs {need}; a tighter method or a smaller region may prove it"
    )


def _timeout_reason(timeout: float | None, batch: int, *, before: bool) -> str:
    assert timeout is not None  # only called when a deadline was set
    when = "before its bounds were computed" if before else "while its bounds were computed"
    return (
        f"timeout: the budget of {timeout:g} s per sample ({timeout * batch:g} s for "
        f"{batch} samples) ran out {when}"
    )


def _to_query(
    formula, params, networks, x, y, models, partner=None
) -> Query | JacobianQuery | None:
    """The linear query of the formula; outside the linear fragment, the Jacobian query of a
    Lipschitz or explanation-stability property; else the linear verifier's Unsupported. The
    partner of a property of a pair is a constant input."""
    try:
        return to_query(formula, params, networks, x, y, models, partner=partner)
    except Unsupported:
        query = to_jacobian_query(formula, params, networks, x, y, models, partner=partner)
        if query is None:
            raise
        return query


def _prove(query, model, method: Method, alpha) -> tuple[Tensor, Tensor, bool]:
    """Per sample: proved, the certified margin, and whether the query has strict rows."""
    if isinstance(query, JacobianQuery):
        proved, margins = query.prove(model, method)
        return proved.cpu(), margins.detach().cpu(), False
    C, d, strict = query.matrix()
    if C.shape[1] == 0:
        lower = torch.zeros(C.shape[0], 0, dtype=C.dtype, device=C.device)
    else:
        with torch.no_grad() if method is not Method.ALPHA_CROWN else torch.enable_grad():
            lower, _ = bounds(model, region=query.region, method=method, C=C, options=alpha)
        lower = lower.detach()
    proved = query.decide(lower)
    margins = query.margins(lower).cpu()
    return proved.cpu(), margins, bool(strict.any())


def _region_quantifiers(formula: I.Node) -> set[str]:
    """The effective kinds of the quantifiers over regions: `forall` / `exists` after polarity
    (the premise of an implication and the operand of a `not` flip it), `both` for a `max` /
    `min` over a region or a quantifier inside a condition."""
    kinds: set[str] = set()

    def visit(node: I.Node, positive: bool | None) -> None:
        if isinstance(node, I.Quant) and not all(isinstance(d, I.Range) for d in node.domains):
            if node.kind in ("forall", "exists") and positive is not None:
                universal = (node.kind == "forall") == positive
                kinds.add("forall" if universal else "exists")
            else:
                kinds.add("both")
        if isinstance(node, I.Not):
            visit(node.operand, None if positive is None else not positive)
            return
        if isinstance(node, I.Implies):
            visit(node.left, None if positive is None else not positive)
            visit(node.right, positive)
            return
        if isinstance(node, I.Cond):
            visit(node.cond, None)
            visit(node.then, positive)
            visit(node.orelse, positive)
            return
        if isinstance(node, I.Linear):
            node = node.atom
        boolean = isinstance(node, I.And | I.Or | I.Quant)
        for c in node.children():
            visit(c, positive if boolean else None)

    visit(formula, True)
    return kinds


def _positioned(spec: Any, err: Unsupported) -> str:
    if err.span is None:
        return err.reason
    return f"{spec.name}:{err.span.line}:{err.span.col}: {err.reason}"


def verify(
    spec: Any,
    model: nn.Module,
    x: Tensor,
    y: Tensor | None = None,
    properties: list[str] | None = None,
    method: Method | str = Method.CROWN,
    **options: Any,
) -> dict[str, PropertyVerdicts]:
    """Verdicts per property and sample (see `verify_property` for the options)."""
    names = properties if properties is not None else _default_properties(spec)
    for n in names:
        spec.property(n)  # a clear error for unknown names
    if hasattr(model, "input_shape") and hasattr(model, "num_outputs"):
        check_model_fits(spec, model)  # an imported network (load_onnx) knows its shapes
    chosen = as_method(method)
    if distributed.active():
        return {n: _verify_sharded(spec, n, model, x, y, chosen, options) for n in names}
    return {n: verify_property(spec, n, model, x, y, method=chosen, **options) for n in names}


def check_model_fits(spec: Any, model: nn.Module, network: str | None = None) -> None:
    """A usage error, naming both, when the model does not fit the spec's network `network`
    (default: the verify (else train) block's, else every network the spec declares).

    A model with `input_shape` and `num_outputs` (`propdsl.load_onnx`'s) is compared with the
    network's type directly; another module runs on one zero input of the network's shape.
    """
    if network is None:
        block = spec.verify_block or spec.train_block
        names = [block.network] if block is not None else list(spec.networks)
    else:
        names = [network]
    source = getattr(model, "source", None)
    what = f"the model {source}" if source else "the model"
    for name in names:
        net = spec.networks[name]
        want_in, want_out = tuple(net.inp.shape), math.prod(net.out.shape)
        if hasattr(model, "input_shape") and hasattr(model, "num_outputs"):
            got_in = tuple(int(d) for d in getattr(model, "input_shape", ()))
            got_out = int(getattr(model, "num_outputs", 0))
        else:
            try:
                dtype = next((p.dtype for p in model.parameters()), torch.get_default_dtype())
                with torch.no_grad():
                    out = model(torch.zeros(1, *want_in, dtype=dtype))
            except RuntimeError as err:
                raise UsageError(
                    f"{what} does not take the inputs of {spec.name}'s network '{name}', "
                    f"{net.show()}: {str(err).splitlines()[0]}"
                ) from None
            got_in, got_out = want_in, out[0].numel()
        if got_in != want_in or got_out != want_out:
            raise UsageError(
                f"{what} does not fit {spec.name}: its network '{name}' is {net.show()}, but "
                f"the model takes Tensor[{', '.join(map(str, got_in))}] and gives {got_out} "
                "outputs"
            )


def _verify_sharded(
    spec: Any, name: str, model: nn.Module, x: Tensor, y: Tensor | None, method: Method, options
) -> PropertyVerdicts:
    """`verify_property` in a distributed job: each rank decides its part of the samples (the
    falsifier's random starts drawn for the whole batch, `distributed.sharded_batch`), and every
    rank gets every sample's verdict, in order: the verdicts of one process."""
    with distributed.sharded_batch(x.shape[0]) as part:
        sub_y = y[part.lo : part.hi] if y is not None else None
        own_options = dict(options)
        if own_options.get("partner") is not None:  # a pair property's partners, per sample
            xt, yt = own_options["partner"]
            own_options["partner"] = (xt[part.lo : part.hi], yt[part.lo : part.hi])
        own = verify_property(
            spec, name, model, x[part.lo : part.hi], sub_y, method=method, **own_options
        )
    if not part.sharded:
        return own
    reasons = [r for r in distributed.gather([own.reason]) if r is not None]
    return PropertyVerdicts(
        name,
        distributed.gather(own.status),
        part.gather(own.margin),
        {k: part.gather(v) for k, v in own.counterexamples.items()},
        max(distributed.gather([own.seconds])),
        reasons[0] if reasons else None,
        distributed.gather(own.reasons),
        {k: part.gather(v) for k, v in own.witnesses.items()},
    )


def as_method(method: Method | str) -> Method:
    """A bound method given by the library's caller (`spec.verify(method="crown")`), converted
    once here; inside propdsl it travels as a `Method`."""
    if isinstance(method, Method):
        return method
    try:
        return Method(method)
    except ValueError:
        known = ", ".join(m.value for m in Method)
        raise UsageError(f"unknown verification method {method!r}; use {known}") from None


def _default_properties(spec: Any) -> list[str]:
    block = spec.verify_block
    if block is not None and block.get("properties"):
        return list(block.get("properties"))
    names = list(spec.properties)
    if not names:
        raise UsageError("the spec has no properties to verify")
    return names
