"""Sound output bounds of a network over an input region: IBP, CROWN and alpha-CROWN.

The engine works on the bound graph of `propdsl.verify.graph` (one rule per operation, see
`propdsl.verify.layers`). Conventions:

* Linear bounds are coefficient tensors A [B', S, *node_shape] (B' = 1 while they do not depend
  on the sample yet) plus a constant [B', S]. Only *lower* bounds are ever propagated: the upper
  bound of c . y is minus the lower bound of -c . y, so a specification C is stacked as [C; -C].
* Intermediate bounds (the inputs of activations) are CROWN's, computed only for the neurons
  whose relaxation depends on them (unstable ReLUs, every sigmoid neuron, ...) and intersected
  with interval bounds propagated through the already tightened earlier layers.
* The input region is a box or an Lp ball intersected with a box; a linear function is
  concretised over the box and, for L1 / L2 balls, over the ball with the dual norm, keeping the
  larger (both are sound).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import cast, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from propdsl.region import INF, Region, RegionError
from propdsl.registry import Method, NamedEnum
from propdsl.verify.graph import BoundGraph, build_graph
from propdsl.verify.layers import (
    ActivationRule,
    AffineRule,
    BoundRule,
    Call,
    Interval,
    NonlinearRule,
    Relaxation,
    UnsupportedLayerError,
    concretize_box,
    register_rule,
    sum_spec,
)
from propdsl.verify.patches import Patches, addcmul, affine_backward, unit_patches, writable

__all__ = ["AlphaOptions", "Method", "NamedEnum", "SplitConstraints", "bounds"]


# `Method` lives in the torch-free registry (the checker and the CLI parse it without torch);
# this module is where the engine and its callers import it from.


@dataclass(frozen=True, kw_only=True)
class AlphaOptions:
    """alpha-CROWN's optimiser: `iterations` Adam steps on the relaxation slopes, the first of
    rate `lr`, each next one's rate `lr_decay` times the previous (auto_LiRPA's schedule: large
    steps first, then refinement).

    `optimize_intermediate` also optimises the slopes used for the intermediate layers' bounds
    (one set per intermediate neuron, as auto_LiRPA does); without it only the output's are.
    """

    iterations: int = 20
    lr: float = 0.1
    lr_decay: float = 0.98
    optimize_intermediate: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int):
            raise TypeError(f"iterations must be an integer, got {self.iterations!r}")
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.lr_decay, int | float) and 0 < self.lr_decay <= 1):
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay!r}")


@dataclass(frozen=True, kw_only=True)
class SplitConstraints:
    """What branch and bound knows about each sub-domain (batch entry) of one propagation.

    `reference`: bounds [B, *shape] of pre-activation nodes known to hold on each sub-domain
    (its parent's bounds: a sub-domain is a subset of its parent); they are intersected with
    the bounds computed here. `signs`: per pre-activation node, [B, *shape] in {-1, 0, 1}: the
    sub-domain lies where z >= 0 (1, the neuron is split active) or z <= 0 (-1, split inactive);
    the node's bounds are clamped accordingly (lo := max(lo, 0), hi := min(hi, 0)). With
    `recompute=False` the intermediate bounds are interval arithmetic intersected with the
    references, without CROWN's backward passes (cheap bounds for branching look-ahead).
    """

    reference: dict[int, Interval] = field(default_factory=dict)
    signs: dict[int, Tensor] = field(default_factory=dict)
    recompute: bool = True


def bounds(
    model: nn.Module,
    lower: Tensor | None = None,
    upper: Tensor | None = None,
    *,
    region: Region | None = None,
    method: Method | str = Method.CROWN,
    C: Tensor | None = None,
    options: AlphaOptions | None = None,
) -> tuple[Tensor, Tensor]:
    """Sound lower and upper bounds of `model`'s outputs (or of `C @ model(x)`) over a region.

    Args:
        model: any single-input module made of supported layers (Linear, Conv2d, ReLU,
            LeakyReLU, Tanh, Sigmoid, Softplus, Flatten, AvgPool2d, BatchNorm in eval mode,
            Dropout, Identity, Normalize, residual additions, reshapes and scalings in
            `forward`); it is traced with torch.fx. More layers: `register_rule`.
        lower, upper: the input box, [B, *input_shape] each (for a model with several inputs,
            tuples of them, one per input).
        region: instead of a box, a `Region` (an L-inf, L2 or L1 ball intersected with a box),
            or a tuple of Regions, one per input of a model with several inputs.
        method: `Method.IBP`, `Method.CROWN_IBP` (CROWN's backward pass over IBP's
            intermediate bounds), `Method.CROWN` (default) or `Method.ALPHA_CROWN`, or its name.
        C: specification matrix [B, S, O] or [S, O] (shared by the batch) over the O flattened
            outputs, as in auto_LiRPA; CROWN's backward pass starts from it, so only the S
            rows are bounded. Without it, bounds of the outputs themselves.
        options: alpha-CROWN's optimiser settings.

    Returns:
        (lb, ub), each [B, S] with C, else [B, *output_shape]. IBP, CROWN-IBP and CROWN bounds
        are differentiable in the model's parameters and the region (for certified training);
        alpha-CROWN's are detached. alpha-CROWN is never looser than CROWN, and CROWN and
        CROWN-IBP never looser than IBP.

    Raises:
        UnsupportedLayerError: the model holds an operation without a bound rule.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    >>> x = torch.zeros(4, 2)
    >>> lb, ub = bounds(net, x - 0.1, x + 0.1, method="crown")
    >>> lb.shape, bool((lb <= net(x)).all() and (net(x) <= ub).all())
    (torch.Size([4, 1]), True)
    """
    if isinstance(lower, tuple | list) or isinstance(upper, tuple | list):
        if region is not None:
            raise ValueError("give either lower and upper, or region, not both")
        if not (isinstance(lower, tuple | list) and isinstance(upper, tuple | list)):
            raise ValueError(
                "a model with several inputs takes a tuple of lower bounds and one of upper bounds"
            )
        if len(lower) != len(upper):
            raise ValueError(f"{len(lower)} lower bounds for {len(upper)} upper bounds")
        joint = tuple(_input_region(lo, hi, None) for lo, hi in zip(lower, upper, strict=True))
        return compute_bounds(model, joint, method, C, options)
    if isinstance(region, tuple | list):
        return compute_bounds(model, tuple(region), method, C, options)
    return compute_bounds(model, _input_region(lower, upper, region), method, C, options)


def compute_bounds(
    model: nn.Module,
    region: Region | tuple[Region, ...],
    method: Method | str = Method.CROWN,
    C: Tensor | None = None,
    options: AlphaOptions | None = None,
    *,
    intersect_ibp: bool = True,
) -> tuple[Tensor, Tensor]:
    """`bounds` over a `Region` (a tuple of regions, one per input, for a model with several
    inputs). `intersect_ibp=False` returns CROWN's output bounds without intersecting them with
    IBP's (to compare with other CROWN implementations)."""
    method = _method(method)
    if options is not None and not isinstance(options, AlphaOptions):
        raise TypeError(f"options must be AlphaOptions, got {type(options).__name__}")
    parts = None
    if isinstance(region, tuple | list):
        model, region, parts = _join_inputs(model, tuple(region))
    lo, hi = region.bounding_box()
    example = ((lo[:1] + hi[:1]) / 2).repeat(2, *([1] * (lo.dim() - 1)))
    graph = build_graph(model, example)
    out_shape = graph.nodes[graph.output].shape
    spec = _spec(C, out_shape, lo)
    prop = _Propagation(graph, region, lo, hi, parts=parts)

    if method is Method.IBP:
        prop.run_ibp()
        if spec is None:
            return prop.bounds[graph.output]
        return _split(prop.ibp_spec_bound(spec), None)

    rows = spec if spec is not None else _identity_spec(out_shape, lo)
    if method is Method.CROWN_IBP:
        prop.run_ibp()
    else:
        prop.run_crown()
    lb = prop.spec_bound(rows)
    if intersect_ibp:
        lb = torch.maximum(lb, prop.ibp_spec_bound(rows))
    if method is Method.ALPHA_CROWN:
        lb = prop.optimise(rows, lb.detach(), options or AlphaOptions())
    return _split(lb, None if spec is not None else out_shape)


# -- arguments -----------------------------------------------------------------------------------


class _InputPart(nn.Module):
    """Input k of a model with several inputs, cut out of their flat concatenation."""

    def __init__(self, offset: int, shape: torch.Size):
        super().__init__()
        self.offset, self.shape = offset, shape

    def forward(self, z: Tensor) -> Tensor:
        n = math.prod(self.shape)
        return z[:, self.offset : self.offset + n].reshape(-1, *self.shape)


@register_rule(_InputPart)
class _InputPartRule(AffineRule):
    mixes = False
    nonnegative = True

    def __init__(self, call: Call):
        super().__init__(call)
        part = call.module
        self.offset, self.size = part.offset, math.prod(part.shape)
        self.total = call.in_shapes[0][0]

    def ibp(self, *inputs: Interval) -> Interval:
        ((lo, hi),) = inputs
        cut = slice(self.offset, self.offset + self.size)
        shape = (lo.shape[0], *self.call.out_shape)
        return lo[:, cut].reshape(shape), hi[:, cut].reshape(shape)

    def backward(self, A: Tensor) -> tuple[list[Tensor | None], Tensor | None]:
        flat = A.flatten(2)
        after = self.total - self.offset - self.size
        return [F.pad(flat, (self.offset, after))], None

    def forward_dual(self, v: Tensor, q: float) -> Tensor | None:
        return v[:, self.offset : self.offset + self.size].reshape(1, *self.call.out_shape)


class _Joined(nn.Module):
    """model(*inputs) as a function of the inputs' flat concatenation."""

    def __init__(self, model: nn.Module, shapes: tuple[torch.Size, ...]):
        super().__init__()
        self.model = model
        offsets = [0]
        for shape in shapes:
            offsets.append(offsets[-1] + math.prod(shape))
        self.parts = nn.ModuleList(_InputPart(o, s) for o, s in zip(offsets, shapes, strict=False))

    def forward(self, z: Tensor) -> Tensor:
        return self.model(*(part(z) for part in self.parts))


# One joined wrapper per (model, input shapes): its trace is cached like the model's.
_JOINED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, _Joined]] = weakref.WeakKeyDictionary()


def _join_inputs(
    model: nn.Module, regions: tuple[Region, ...]
) -> tuple[nn.Module, Region, list[tuple[int, int, Region]]]:
    """A model with several inputs, one region each, as a model of one flat input: the joined
    model, the product's bounding box and the parts (offset, size, region)."""
    if not regions or not all(isinstance(r, Region) for r in regions):
        raise TypeError("a model with several inputs takes a tuple of Regions, one per input")
    batch = {r.shape[0] for r in regions}
    if len(batch) != 1:
        raise ValueError(f"the inputs' regions have different batch sizes {sorted(batch)}")
    shapes = tuple(torch.Size(r.shape[1:]) for r in regions)
    cache = _JOINED.setdefault(model, {})
    joined = cache.get(shapes)
    if joined is None:
        joined = cache[shapes] = _Joined(model, shapes)
    boxes = [r.bounding_box() for r in regions]
    for r, (lo, hi) in zip(regions, boxes, strict=True):
        _check_region(r, lo, hi)
    lo = torch.cat([b[0].flatten(1) for b in boxes], 1)
    hi = torch.cat([b[1].flatten(1) for b in boxes], 1)
    parts, offset = [], 0
    for r in regions:
        n = math.prod(r.shape[1:])
        parts.append((offset, n, r))
        offset += n
    return joined, Region.box(lo, hi), parts


def _method(method: Method | str) -> Method:
    """The one conversion at the engine's boundary (`bounds`, `compute_bounds` and the Jacobian
    bounds take a name too); callers inside propdsl pass a `Method`."""
    try:
        return method if isinstance(method, Method) else Method(method)
    except ValueError:
        names = ", ".join(m.value for m in Method)
        raise ValueError(f"unknown bound method {method!r}; choose one of {names}") from None


def _check_region(region: Region, lo: Tensor, hi: Tensor) -> None:
    """The engine's entry condition: every sample's region has a point and a finite box.

    The bounding box of an empty region is not a region (a clamped point or lo > hi), and bounds
    over it would prove anything; an infinite box gives NaN bounds. Callers decide empty
    samples themselves (a `forall` over one is vacuous) and pass only the others.
    """
    empty = region.is_empty()
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
        raise RegionError(
            f"the input region is empty for {len(rows)} of {empty.numel()} samples ({shown}): "
            "the ball does not meet the box, and bounds over an empty region mean nothing"
        )
    if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise RegionError("the input region is unbounded (an infinite box and no finite ball)")


def _input_region(lower: Tensor | None, upper: Tensor | None, region: Region | None) -> Region:
    if region is not None:
        if lower is not None or upper is not None:
            raise ValueError("give either lower and upper, or region, not both")
        return region
    if lower is None or upper is None:
        raise ValueError("give the input box (lower and upper) or a region")
    if lower.shape != upper.shape:
        raise ValueError(f"lower {list(lower.shape)} and upper {list(upper.shape)} differ in shape")
    if lower.dim() < 2:
        raise ValueError("lower and upper need a batch dimension: [B, *input_shape]")
    if bool((lower > upper).any()):
        raise ValueError("lower must not exceed upper")
    return Region.box(lower, upper)


def _spec(C: Tensor | None, out_shape: torch.Size, like: Tensor) -> Tensor | None:
    """C as stacked rows [C; -C] shaped [B' , 2S, *out_shape]."""
    if C is None:
        return None
    C = torch.as_tensor(C, dtype=like.dtype, device=like.device)
    outputs = math.prod(out_shape)
    if C.dim() == 2:
        C = C.unsqueeze(0)
    if C.dim() != 3 or C.shape[-1] != outputs or C.shape[0] not in (1, like.shape[0]):
        raise ValueError(
            f"C must be [B, S, {outputs}] or [S, {outputs}] for a batch of {like.shape[0]} and "
            f"{outputs} outputs, got {list(C.shape)}"
        )
    rows = torch.cat([C, -C], dim=1)
    return rows.reshape(C.shape[0], rows.shape[1], *out_shape)


def _identity_spec(shape: torch.Size, like: Tensor) -> Tensor:
    n = math.prod(shape)
    eye = torch.eye(n, dtype=like.dtype, device=like.device)
    return torch.cat([eye, -eye]).reshape(1, 2 * n, *shape)


def _split(lb: Tensor, shape: torch.Size | None) -> tuple[Tensor, Tensor]:
    """[B, 2S] lower bounds of [C; -C] -> (lb, ub) of C, reshaped to `shape` if given."""
    s = lb.shape[1] // 2
    lower, upper = lb[:, :s], -lb[:, s:]
    if shape is not None:
        lower, upper = lower.reshape(-1, *shape), upper.reshape(-1, *shape)
    return lower, upper


# -- propagation ---------------------------------------------------------------------------------


def _first_needed(need: Tensor, shared: bool = False) -> Tensor:
    """Indices of the neurons flagged in need [B, N].

    Per sample ([B, m], m the largest count; samples with fewer are padded with distinct
    unflagged neurons), or, with `shared` and when the batch's union is not much larger than m,
    the union ([u], shared by the batch: the rows then start without a batch dimension, which
    makes the first backward step B times cheaper). Every neuron flagged: all, in order.
    """
    n = need.shape[1]
    m = int(need.sum(1).max()) if need.numel() else 0
    if m == n:
        return torch.arange(n, device=need.device) if shared else _all(need.shape[0], n, need)
    if shared:
        union = need.any(0)
        if int(union.sum()) <= 1.5 * m:
            return union.nonzero().flatten()
    return torch.topk(need.to(torch.float32), m, dim=1).indices


def _all(batch: int, n: int, like: Tensor) -> Tensor:
    return torch.arange(n, device=like.device).expand(batch, n)


def _gather_neurons(t: Tensor, index: Tensor) -> Tensor:
    """[k, B, N] -> [k, B, m] at per-sample neuron indices [B, m]."""
    if index.shape[1] == t.shape[2]:
        return t.expand(-1, index.shape[0], -1)  # every neuron, in order
    return t.gather(2, index.unsqueeze(0).expand(t.shape[0], -1, -1))


def _tighten(t: Tensor, rows: Tensor, values: Tensor, pick) -> Tensor:
    """t [B, *shape] with the flat entries rows ([B, m] per sample, or [m] shared) replaced by
    pick(current, values) (out of place)."""
    flat = t.reshape(t.shape[0], -1)
    rows = rows.expand(t.shape[0], -1)
    return flat.scatter(1, rows, pick(flat.gather(1, rows), values)).reshape(t.shape)


def _keep_best(new: Tensor, best: Tensor, pick) -> Tensor:
    """pick(new, best) in value, with new's gradient everywhere (so slopes keep moving even
    where an earlier iteration's bound is still the tighter one)."""
    return new + (pick(new, best) - new).detach()


class _Propagation:
    """Bounds of every node of one graph over one region, for one call."""

    def __init__(
        self,
        graph: BoundGraph,
        region: Region,
        lo: Tensor,
        hi: Tensor,
        *,
        constraints: SplitConstraints | None = None,
        parts: list[tuple[int, int, Region]] | None = None,
    ):
        _check_region(region, lo, hi)
        self.graph = graph
        self.region = region
        self.constraints = constraints
        self.box = (lo, hi)
        self.batch = lo.shape[0]
        # Several inputs: the flat input is their concatenation, (offset, size, region) each; a
        # linear function is bounded over each input's region and the bounds are summed.
        self.parts = parts
        if parts is not None:
            self.ball = any(r.centre is not None and r.p != INF for _, _, r in parts)
        else:
            self.ball = region.centre is not None and region.p != INF
        self.bounds: list[Interval] = [self.box] * len(graph.nodes)
        self.relaxations: dict[int, Relaxation] = {}
        # Per pre-activation node, per sample: the neurons CROWN bounds ([B, m]).
        self.rows: dict[int, Tensor] = {}
        # alpha-CROWN, per activation: CROWN's parameters [k, B, *shape] and, per sample, the
        # neurons that get their own parameters ([B, m]).
        self.alpha_base: dict[int, Tensor] = {}
        self.alpha_index: dict[int, Tensor] = {}
        # alpha-CROWN's parameters of (start, activation) pairs whose rows reach the activation
        # as windows: the windows (their geometry), the parameters being [k, B, S, C, kh, kw].
        self.windows: dict[tuple[int, int], Patches] = {}

    # -- concretisation ----------------------------------------------------------------------
    def concretize(self, A: Tensor | Patches, bias: Tensor) -> Tensor:
        """Lower bound [B, S] of A . x + bias over the input region."""
        if isinstance(A, Patches):
            return self._concretize_patches(A, bias)
        if self.parts is None:
            return _concretize_region(A, self.region, *self.box) + bias
        flat, (lo, hi) = A.flatten(2), self.box
        for offset, size, region in self.parts:
            cut = slice(offset, offset + size)
            bias = bias + _concretize_region(flat[..., cut], region, lo[:, cut], hi[:, cut])
        return bias

    def _concretize_patches(self, A: Patches, bias: Tensor) -> Tensor:
        lo, hi = self.box
        mid, rad = ((hi + lo) / 2).unsqueeze(1), ((hi - lo) / 2).unsqueeze(1)
        lb = A.dot(mid) - A.dot(rad, absolute=True)
        if self.ball:
            centre, radius = cast(Tensor, self.region.centre), cast(Tensor, self.region.radius)
            dual = INF if self.region.p == 1 else 2.0
            # The windows are zero outside the image: their norms are the rows' norms.
            norm = torch.linalg.vector_norm(A.data.flatten(2), ord=dual, dim=-1)
            at_centre = A.dot(centre.unsqueeze(1))
            lb = torch.maximum(lb, at_centre - radius.reshape(-1, 1).to(lb) * norm)
        return lb + bias

    def _unit_spec(self, i: int, rows: Tensor | None) -> Tensor:
        """Rows [e_k; -e_k] selecting node i's neurons: all of them when rows is None, those in
        rows [m] (both [1, 2m, *shape], shared by the batch), or per sample ([B, 2m, *shape] for
        rows [B, m])."""
        shape = self.graph.nodes[i].shape
        n = math.prod(shape)
        lo = self.box[0]
        if rows is None:
            eye = torch.eye(n, dtype=lo.dtype, device=lo.device).unsqueeze(0)
        else:
            rows = rows if rows.dim() == 2 else rows.unsqueeze(0)
            eye = torch.zeros(*rows.shape, n, dtype=lo.dtype, device=lo.device)
            eye.scatter_(2, rows.unsqueeze(-1), 1.0)
        return torch.cat([eye, -eye], dim=1).reshape(eye.shape[0], -1, *shape)

    # -- IBP ---------------------------------------------------------------------------------
    def ibp_node(self, i: int) -> Interval:
        node = self.graph.nodes[i]
        lo, hi = cast(BoundRule, node.rule).ibp(*(self.bounds[j] for j in node.inputs))
        if self.ball and self.graph.is_direct(i):
            # An affine map of a ball: the dual norm can beat the bounding box.
            closed = self._ball_image(i)
            if closed is None:  # a layer without a closed form: one backward row per neuron
                n = math.prod(node.shape)
                lb = self.concretize(*self.backward(i, self._unit_spec(i, None)))
                ball_lo, ball_hi = lb[:, :n].reshape(lo.shape), -lb[:, n:].reshape(hi.shape)
            else:
                ball_lo, ball_hi = closed
            lo, hi = torch.maximum(lo, ball_lo), torch.minimum(hi, ball_hi)
        return lo, hi

    def _ball_image(self, i: int) -> Interval | None:
        """Bounds of node i, an affine function M x + b of the input (`is_direct`), over the
        ball ||x - c||_p <= r in closed form: M c + b -/+ r ||M_k||_q per neuron k (q the dual
        norm), with the rows' norms from the rules' `forward_dual` (no matrix, no backward
        pass). None when a rule on the chain has no closed form."""
        if self.parts is not None:
            return None
        chain = []
        j = i
        while j != 0:
            chain.append(self.graph.nodes[j])
            j = chain[-1].inputs[0]
        centre = cast(Tensor, self.region.centre)
        q = INF if self.region.p == 1 else 2.0
        weights = torch.ones(
            (1, *self.graph.nodes[0].shape), dtype=centre.dtype, device=centre.device
        )
        point = (centre, centre)
        for node in reversed(chain):
            rule = cast(AffineRule, node.rule)
            mapped = rule.forward_dual(weights, q)
            if mapped is None:
                return None
            weights = mapped
            point = rule.ibp(point)  # exact for a point: the chain's image of the centre
        norms = weights.sqrt() if q == 2 else weights
        radius = cast(Tensor, self.region.radius).reshape(-1, *([1] * (norms.dim() - 1)))
        spread = radius * norms
        return point[0] - spread, point[1] + spread

    def run_ibp(self) -> None:
        for i in range(1, len(self.graph.nodes)):
            self.bounds[i] = self._constrain(i, *self.ibp_node(i))

    def _constrain(self, i: int, lo: Tensor, hi: Tensor) -> Interval:
        """Node i's bounds intersected with what branch and bound knows of each sub-domain.
        Where the result is empty (lo > hi) the sub-domain is empty."""
        c = self.constraints
        if c is None:
            return lo, hi
        ref = c.reference.get(i)
        if ref is not None:
            lo, hi = torch.maximum(lo, ref[0]), torch.minimum(hi, ref[1])
        signs = c.signs.get(i)
        if signs is not None:
            lo = torch.where(signs > 0, lo.clamp_min(0.0), lo)
            hi = torch.where(signs < 0, hi.clamp_max(0.0), hi)
        return lo, hi

    def ibp_spec_bound(self, spec: Tensor) -> Tensor:
        """Interval bound of spec rows, folding the trailing affine layers into the rows (as
        auto_LiRPA folds C into the last linear layer): tighter than C times the interval."""
        i, A = self.graph.output, spec
        bias = torch.zeros((), dtype=spec.dtype, device=spec.device)
        while i != 0:
            node = self.graph.nodes[i]
            if not (isinstance(node.rule, AffineRule) and len(node.inputs) == 1):
                return concretize_box(A, *self.bounds[i]) + bias
            (coeff,), b = node.rule.backward(A)
            if b is not None:
                bias = bias + b
            if coeff is None:
                return bias.expand(self.batch, spec.shape[1])
            A, i = coeff, node.inputs[0]
        return self.concretize(A, bias)

    # -- CROWN -------------------------------------------------------------------------------
    def _relaxation(self, i: int, start: int, alphas: dict | None) -> Relaxation:
        node = self.graph.nodes[i]
        rule = cast(ActivationRule, node.rule)  # the caller dispatched on the rule's kind
        lo, hi = self.bounds[node.inputs[0]]
        if alphas is not None and (start, i) in alphas and (start, i) not in self.windows:
            return rule.relax(
                lo.unsqueeze(1), hi.unsqueeze(1), self._full_alpha(i, alphas[(start, i)])
            )
        cached = self.relaxations.get(i)
        if cached is None:
            r = rule.relax(lo, hi)
            cached = Relaxation(*(t.unsqueeze(1) if t.dim() else t for t in _fields(r)))
            self.relaxations[i] = cached
        return cached

    @overload
    def backward(
        self,
        start: int,
        spec: Tensor,
        alphas: dict | None = None,
        *,
        betas: dict[int, Tensor] | None = None,
        record: dict[int, Tensor] | None = None,
        windows: dict[int, Patches] | None = None,
    ) -> tuple[Tensor, Tensor]: ...

    @overload
    def backward(
        self,
        start: int,
        spec: Patches,
        alphas: dict | None = None,
        *,
        betas: dict[int, Tensor] | None = None,
        record: dict[int, Tensor] | None = None,
        windows: dict[int, Patches] | None = None,
    ) -> tuple[Tensor | Patches, Tensor]: ...

    def backward(
        self,
        start: int,
        spec: Tensor | Patches,
        alphas: dict | None = None,
        *,
        betas: dict[int, Tensor] | None = None,
        record: dict[int, Tensor] | None = None,
        windows: dict[int, Patches] | None = None,
    ) -> tuple[Tensor | Patches, Tensor]:
        """Linear lower bound A . x + bias of spec . node[start], in terms of the input
        (windowed rows stay `Patches` as far as the layers allow).

        `betas` (beta-CROWN, Wang et al. 2021): per split pre-activation node, multipliers
        [B, S, *shape] >= 0 of the split constraints `sign * z >= 0`; the term
        `-beta * sign * z`, never positive on the sub-domain, is added to the bounded function,
        so the bound stays sound there for every beta >= 0 and tightens with good ones.
        `record` receives the coefficients reaching each activation's output (for branching),
        `windows` the windowed rows reaching each activation's output.
        """
        coeffs: dict[int, Tensor | Patches] = {start: spec}
        like = spec.data if isinstance(spec, Patches) else spec
        bias = torch.zeros((), dtype=like.dtype, device=like.device)
        signs = self.constraints.signs if self.constraints is not None else {}
        for i in range(start, 0, -1):
            A = coeffs.pop(i, None)
            if A is None:
                continue
            if isinstance(A, Patches):
                step = self._patches_step(i, A, start, alphas, windows)
                if step is not None:
                    ins_p, b = step
                    if b is not None:
                        bias = bias + b
                    for j, piece in zip(self.graph.nodes[i].inputs, ins_p, strict=True):
                        if piece is not None:
                            coeffs[j] = piece if j not in coeffs else _add_rows(coeffs[j], piece)
                    continue
                A = A.to_dense()
            if betas is not None and i in betas:
                A = A - betas[i] * signs[i].unsqueeze(1)
            node = self.graph.nodes[i]
            rule = node.rule
            if record is not None and isinstance(rule, ActivationRule):
                record[i] = A
            if isinstance(rule, AffineRule):
                ins, b = rule.backward(A)
                if b is not None:
                    bias = bias + b
            elif isinstance(rule, ActivationRule):
                r = self._relaxation(i, start, alphas)
                lines, bias = _dense_lines(A, r, bias)
                ins = [lines]
                del lines  # not kept alive through the next layers
            elif isinstance(rule, NonlinearRule):
                ins, b = rule.backward(A, *self.bounds[node.inputs[0]])
                if b is not None:
                    bias = bias + b
            else:
                rule = cast(BoundRule, rule)
                raise UnsupportedLayerError(
                    f"{rule.call.describe()}: its rule {type(rule).__name__} has interval "
                    "bounds only; use method='ibp' or give it an AffineRule / ActivationRule / "
                    "NonlinearRule"
                )
            for j, coeff in zip(node.inputs, ins, strict=True):
                if coeff is not None:
                    coeffs[j] = coeff if j not in coeffs else _add_rows(coeffs[j], coeff)
        if 0 not in coeffs:  # every path was cut by a rule returning no coefficients
            rows = like.shape[:2]
            return like.new_zeros(*rows, *self.graph.nodes[0].shape), bias
        return coeffs[0], bias  # type: ignore[return-value]

    def _patches_step(
        self,
        i: int,
        A: Patches,
        start: int,
        alphas: dict | None,
        windows: dict[int, Patches] | None = None,
    ) -> tuple[list[Patches | None], Tensor | None] | None:
        """One backward step with windowed rows (`propdsl.verify.patches`), or None where the
        rows must become dense: a layer that is not a window map, or windows that have grown
        to cover the whole node (dense rows are then no larger)."""
        rule = self.graph.nodes[i].rule
        if A.kernel[0] >= A.shape[1] and A.kernel[1] >= A.shape[2]:
            return None
        if isinstance(rule, AffineRule):
            return affine_backward(rule, A)
        if isinstance(rule, ActivationRule):
            if windows is not None:
                windows[i] = A
            pos = A.data.clamp(min=0)
            if alphas is not None and (start, i) in self.windows:
                # Slopes per row and window entry: the lines are built in the windows.
                lo, hi = self.bounds[self.graph.nodes[i].inputs[0]]
                r = rule.relax(
                    A.gather(lo.unsqueeze(1)), A.gather(hi.unsqueeze(1)), alphas[(start, i)]
                )
                up, low = r.upper_slope, r.lower_slope
                data = torch.addcmul(A.data * up, pos, low - up)
                b = sum_spec(A.data * r.upper_bias) + sum_spec(pos * (r.lower_bias - r.upper_bias))
                return [A.with_data(data)], b
            r = self._relaxation(i, start, alphas)
            b = A.dot(r.upper_bias) + A.with_data(pos).dot(r.lower_bias - r.upper_bias)
            # data = A up + pos (low - up), the lines' slopes gathered at the windows. At real
            # sizes these window-sized tensors are the largest of a backward pass, so each
            # product is written into its own operand, and pos (low - up) is taken as
            # A (low - up) with (low - up) zeroed where A < 0 (the same numbers, pos being A
            # or 0), which lets pos go first: two such tensors besides A, not six.
            diff = r.lower_slope - r.upper_slope
            if diff.dim():
                diff = A.gather(diff)
                if writable(diff, A.data):
                    diff.masked_fill_(A.data < 0, 0.0)
                    pos = A.data
            data = A.times(r.upper_slope)
            data = addcmul(data, pos, diff, owned=True)
            return [A.with_data(data)], b
        return None

    def run_crown(self, alphas: dict | None = None, best: list[Interval] | None = None) -> None:
        """Bounds of every node: interval arithmetic from the tightened inputs, intersected,
        at the inputs of activations, with CROWN's bounds of the neurons that need them."""
        graph = self.graph
        recompute = self.constraints is None or self.constraints.recompute
        for i in range(1, len(graph.nodes)):
            lo, hi = self._constrain(i, *self.ibp_node(i))
            if recompute and graph.is_preactivation(i) and not graph.is_direct(i):
                rows = self.rows.get(i)
                if rows is None:
                    rows = self._rows_needing_bounds(i, lo, hi)
                    self.rows[i] = rows
                if rows.shape[-1]:
                    m = rows.shape[-1]
                    shape = self.graph.nodes[i].shape
                    unit: Tensor | Patches = (
                        unit_patches(tuple(shape), rows, lo)  # type: ignore[arg-type]
                        if len(shape) == 3
                        else self._unit_spec(i, rows)
                    )
                    lb = self.concretize(*self.backward(i, unit, alphas))
                    lo = _tighten(lo, rows, lb[:, :m], torch.maximum)
                    hi = _tighten(hi, rows, -lb[:, m:], torch.minimum)
            if best is not None:
                lo = _keep_best(lo, best[i][0], torch.maximum)
                hi = _keep_best(hi, best[i][1], torch.minimum)
                best[i] = (lo.detach(), hi.detach())
            self.bounds[i] = (lo, hi)

    def _rows_needing_bounds(self, i: int, lo: Tensor, hi: Tensor) -> Tensor:
        need = torch.zeros(lo.shape, dtype=torch.bool, device=lo.device)
        for c in self.graph.consumers[i]:
            rule = self.graph.nodes[c].rule
            if isinstance(rule, ActivationRule | NonlinearRule):
                need |= rule.needs_bounds(lo, hi)
        return _first_needed(need.reshape(self.batch, -1), shared=True)

    def spec_bound(self, spec: Tensor, alphas: dict | None = None) -> Tensor:
        return self.concretize(*self.backward(self.graph.output, spec, alphas))

    # -- alpha-CROWN -------------------------------------------------------------------------
    def _init_alphas(self, spec: Tensor, intermediate: bool) -> dict[tuple[int, int], Tensor]:
        """One parameter set per (start node, activation): [k, B, S_start, m_j], over m_j
        neurons per sample of activation j (those whose relaxation is not exact)."""
        starts = [(self.graph.output, spec.shape[1])]
        if intermediate:
            starts += [(i, 2 * rows.shape[-1]) for i, rows in self.rows.items() if rows.shape[-1]]
        alphas: dict[tuple[int, int], Tensor] = {}
        self.windows = {}
        for start, size in starts:
            reached: dict[int, Patches] = {}
            start_shape = self.graph.nodes[start].shape
            if start != self.graph.output and len(start_shape) == 3:
                # Which activations the start's rows reach as windows: those get parameters
                # per window entry (a dry CROWN pass finds the windows' geometry).
                unit = unit_patches(tuple(start_shape), self.rows[start], spec)  # type: ignore[arg-type]
                with torch.no_grad():
                    self.backward(start, unit, windows=reached)
            for j in self.graph.activations_before(start):
                if j not in self.alpha_base and not self._alpha_support(j):
                    continue
                base, index = self.alpha_base[j], self.alpha_index[j]
                window = reached.get(j)
                if window is not None:
                    init = torch.stack([window.gather(b.unsqueeze(1)) for b in base])
                    alphas[(start, j)] = init.clone().requires_grad_()
                    self.windows[(start, j)] = window
                    continue
                init = _gather_neurons(base.flatten(2), index).unsqueeze(2)
                shape = (init.shape[0], self.batch, size, index.shape[1])
                alphas[(start, j)] = init.expand(shape).clone().requires_grad_()
        return alphas

    def _alpha_support(self, j: int) -> bool:
        """Record CROWN's slopes of activation j and which neurons get parameters."""
        node = self.graph.nodes[j]
        rule = cast(ActivationRule, node.rule)
        lo, hi = (b.detach() for b in self.bounds[node.inputs[0]])
        init = rule.init_alpha(lo, hi)
        if init is None:
            return False
        index = _first_needed(rule.needs_bounds(lo, hi).reshape(self.batch, -1))
        if not index.shape[1]:
            return False
        self.alpha_base[j], self.alpha_index[j] = init, index
        return True

    def _full_alpha(self, j: int, alpha: Tensor) -> Tensor:
        """[k, B, S, m_j] parameters -> [k, B, S, *shape_j], CROWN's slopes elsewhere."""
        base, index = self.alpha_base[j], self.alpha_index[j]
        k, batch, size, m = alpha.shape
        shape = (k, batch, size, *base.shape[2:])
        if m == base[0, 0].numel():
            return alpha.reshape(shape)  # every neuron, in order
        full = base.flatten(2).unsqueeze(2).expand(k, batch, size, -1)
        return full.scatter(3, index[None, :, None, :].expand(k, batch, size, m), alpha).reshape(
            shape
        )

    def _project(self, alphas: dict[tuple[int, int], Tensor]) -> None:
        with torch.no_grad():
            for (start, j), alpha in alphas.items():
                node = self.graph.nodes[j]
                rule = cast(ActivationRule, node.rule)
                lo, hi = (b.detach() for b in self.bounds[node.inputs[0]])
                window = self.windows.get((start, j))
                if window is not None:
                    ranges = rule.alpha_range(
                        window.gather(lo.unsqueeze(1)), window.gather(hi.unsqueeze(1))
                    )
                    low, high = (
                        b if isinstance(b, Tensor) else torch.tensor(b).to(alpha) for b in ranges
                    )
                    alpha.copy_(torch.maximum(torch.minimum(alpha, high), low))
                    continue
                index = self.alpha_index[j]
                low, high = (
                    _gather_neurons(b.flatten(2), index).unsqueeze(2)
                    if isinstance(b, Tensor)
                    else torch.tensor(b).to(alpha)
                    for b in rule.alpha_range(lo, hi)
                )
                alpha.copy_(torch.maximum(torch.minimum(alpha, high), low))

    def optimise(self, spec: Tensor, crown: Tensor, options: AlphaOptions) -> Tensor:
        """alpha-CROWN: Adam on the relaxation slopes, maximising the sum of the lower bounds of
        the spec rows (both halves of [C; -C], so the widths shrink). Every iterate is sound;
        the elementwise best, CROWN's included, is returned (detached)."""
        # Neurons CROWN has made stable keep CROWN's bounds: re-bound only the others.
        self.rows = {i: self._rows_needing_bounds(i, *self.bounds[i]) for i in self.rows}
        alphas = self._init_alphas(spec, options.optimize_intermediate)
        if not alphas or options.iterations == 0:
            return crown
        params = list(alphas.values())
        optimiser = torch.optim.Adam(params, lr=options.lr)
        schedule = torch.optim.lr_scheduler.ExponentialLR(optimiser, options.lr_decay)
        fixed = [(lo.detach(), hi.detach()) for lo, hi in self.bounds]
        best_bounds = list(fixed)
        # Start from detached bounds: nothing built before the loop is differentiated again.
        self.bounds = list(fixed)
        self.relaxations.clear()
        best = crown
        with torch.enable_grad():
            for step in range(options.iterations + 1):
                if options.optimize_intermediate:
                    self.relaxations.clear()
                    self.run_crown(alphas, best_bounds)
                lb = self.spec_bound(spec, alphas)
                best = torch.maximum(best, lb.detach())
                if step == options.iterations:
                    break
                grads = torch.autograd.grad(-lb.sum(), params, allow_unused=True)
                for p, g in zip(params, grads, strict=True):
                    p.grad = torch.zeros_like(p) if g is None else g
                optimiser.step()
                schedule.step()
                self._project(alphas)
        return best


def _concretize_region(A: Tensor, region: Region, lo: Tensor, hi: Tensor) -> Tensor:
    """min of A . x over the region: over its bounding box [lo, hi] and, for an L1 / L2 ball,
    over the ball with the dual norm; both are sound for the intersection, the larger is kept."""
    lb = concretize_box(A, lo, hi)
    if region.centre is not None and region.p != INF:
        centre, radius = region.centre, cast(Tensor, region.radius)
        flat = A.flatten(2)
        dual = INF if region.p == 1 else 2.0
        norm = torch.linalg.vector_norm(flat, ord=dual, dim=-1)
        at_centre = (flat @ centre.reshape(lo.shape[0], -1, 1)).squeeze(-1)
        lb = torch.maximum(lb, at_centre - radius.reshape(-1, 1).to(lb) * norm)
    return lb


def _add_rows(a: Tensor | Patches, b: Tensor | Patches) -> Tensor | Patches:
    """The sum of two sets of coefficients on one node (dense unless both are the same
    windows)."""
    if isinstance(a, Patches) and isinstance(b, Patches):
        both = a.add(b)
        if both is not None:
            return both
    dense_a = a.to_dense() if isinstance(a, Patches) else a
    dense_b = b.to_dense() if isinstance(b, Patches) else b
    return dense_a + dense_b


# Dense rows of more entries than this go through an activation's lines in slices of rows.
LINES_SLICE = 1 << 20


def _dense_lines(A: Tensor, r: Relaxation, bias: Tensor) -> tuple[Tensor, Tensor]:
    """Dense rows A through an activation's lines: the rows on its input and `bias` plus the
    lines' offsets. A lower bound of A . f(z) takes f's lower line where A >= 0 and its upper
    line where A < 0: A u + relu(A) (l - u), for the slopes and the offsets alike.

    The rows are the largest tensors of a dense pass (at width 1600 of the scaling benchmark,
    76 MiB each), so without autograd the sum is written into the product A u, and relu(A) is
    made a slice of rows at a time: A, the result and one slice, where the whole relu(A) would
    be a third tensor of A's size."""
    diff = r.lower_slope - r.upper_slope
    out = A * r.upper_slope
    offsets = r.lower_bias - r.upper_bias
    rows = A.shape[1]
    if A.numel() <= LINES_SLICE or not (writable(out, A) and writable(out, diff)):
        pos = A.clamp(min=0)
        bias = bias + _dot(A, r.upper_bias) + _dot(pos, offsets)
        return addcmul(out, pos, diff, owned=True), bias
    step = max(1, LINES_SLICE * rows // A.numel())
    parts = []
    for start in range(0, rows, step):
        cut = slice(start, start + step)
        pos = A[:, cut].clamp(min=0)
        parts.append(_dot(pos, _row_slice(offsets, cut)))
        out[:, cut].addcmul_(pos, _row_slice(diff, cut))
        del pos  # before the next slice is made
    return out, bias + _dot(A, r.upper_bias) + torch.cat(parts, 1)


def _row_slice(t: Tensor, cut: slice) -> Tensor:
    """The rows `cut` of per-row values [B, S, ...]; values shared by the rows as they are."""
    return t if t.dim() == 0 or t.shape[1] == 1 else t[:, cut]


def _dot(A: Tensor, c: Tensor) -> Tensor:
    """sum over the neurons of A * c -> [B, S], for c [B, 1, *shape] (one line per neuron),
    [B, S, *shape] (one per spec row) or a scalar; without materialising A * c when possible."""
    if c.dim() == 0:
        return A.flatten(2).sum(-1) * c
    if c.shape[1] == 1:
        return (A.flatten(2) @ c.flatten(2).transpose(1, 2)).squeeze(-1)
    return (A * c).flatten(2).sum(-1)


def _fields(r: Relaxation) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return r.lower_slope, r.lower_bias, r.upper_slope, r.upper_bias
