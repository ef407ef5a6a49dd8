"""Bounds of a batch of sub-domains: the bound engine with split constraints, alpha and beta.

One call bounds B sub-domains at once (they are the engine's batch): each has its own input
region (input splitting) or its own split constraints and reference bounds (ReLU splitting).
Intermediate bounds are CROWN's (or, for the branching look-ahead, interval arithmetic)
intersected with the references and clamped by the splits (`SplitConstraints`); the output rows
are then bounded by CROWN's backward pass, optionally optimised: the ReLU lower slopes (alpha,
Xu et al. 2021, "Fast and complete") and the split constraints' Lagrange multipliers (beta, Wang
et al. 2021, "Beta-CROWN"), by Adam on the sum of the open rows' lower bounds. Every iterate is
sound; each row keeps its best bound.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from propdsl.region import INF, Region
from propdsl.verify.bounds import AlphaOptions, SplitConstraints, _Propagation
from propdsl.verify.graph import build_graph
from propdsl.verify.layers import ActivationRule, Interval, ReLURule

__all__ = ["Bounded", "Bounder"]


@dataclass
class Bounded:
    """The bounds of one batch of sub-domains (all detached).

    lower [B, R]: lower bounds of the rows `A_r y`. pre: per ReLU layer t, the bounds of its
    input [B, n_t] (flat). infeasible [B]: the sub-domain is empty (some neuron's bounds cross).
    alphas: per ReLU layer, the output rows' slopes [B, R, n_t] (None without optimisation).
    betas: per ReLU layer, the multipliers [B, R, n_t] (None without splits or optimisation).
    relu_coeffs: per ReLU layer, the coefficients [B, R, n_t] of the rows' linear bound on
    that layer's output (branching scores). input_coeffs [B, R, n_in] and input_bias [B, R]:
    the rows' linear lower bounds `A_r y >= input_coeffs_r . x + input_bias_r` (the last
    iterate's), valid on the sub-domain.
    """

    lower: Tensor
    pre: list[Interval]
    infeasible: Tensor
    alphas: list[Tensor] | None
    betas: list[Tensor] | None
    relu_coeffs: list[Tensor]
    input_coeffs: Tensor
    input_bias: Tensor
    box: tuple[Tensor, Tensor] | None = None  # the sub-domains' input boxes, flat (input splitting)

    def unstable(self) -> Tensor:
        """[B] the number of neurons whose sign the bounds leave open."""
        count = torch.zeros_like(self.infeasible, dtype=torch.int64)
        for lo, hi in self.pre:
            count += ((lo < 0) & (hi > 0)).sum(dim=1)
        return count


class Bounder:
    """Bounds of the rows of a problem over batches of sub-domains of one model.

    The model is copied (in `dtype`, parameters frozen); its bound graph is built once.
    """

    def __init__(self, model: nn.Module, example: Tensor, A: Tensor, dtype: torch.dtype):
        self.model = copy.deepcopy(model).to(dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        ex = example.to(dtype)
        self.graph = build_graph(self.model, ex.expand(2, *ex.shape[1:]).clone())
        self.in_shape = tuple(ex.shape[1:])
        out_shape = self.graph.nodes[self.graph.output].shape
        self.spec = A.to(dtype).reshape(1, A.shape[0], *out_shape)
        self.dtype = dtype
        nodes = self.graph.nodes
        activations = [n for n in nodes if isinstance(n.rule, ActivationRule)]
        # ReLU splitting needs every nonlinearity to be a ReLU (its two pieces are linear).
        self.relu_only = all(isinstance(n.rule, ReLURule) for n in activations)
        self.relus = [n.index for n in activations if isinstance(n.rule, ReLURule)]
        self.pre_nodes = [nodes[j].inputs[0] for j in self.relus]
        self.sizes = [math.prod(nodes[i].shape) for i in self.pre_nodes]

    def with_rows(self, A: Tensor) -> Bounder:
        """The same network and graph, bounding other rows."""
        other = copy.copy(self)
        out_shape = self.graph.nodes[self.graph.output].shape
        other.spec = A.to(self.dtype).reshape(1, A.shape[0], *out_shape)
        return other

    # -- one batch ---------------------------------------------------------------------------
    def bound(
        self,
        region: Region,
        *,
        signs: list[Tensor] | None = None,
        reference: list[Interval] | None = None,
        recompute: bool = True,
        iterations: int = 0,
        lr_alpha: float = 0.1,
        lr_beta: float = 0.05,
        alpha_init: list[Tensor] | None = None,
        beta_init: list[Tensor] | None = None,
        weights: Tensor | None = None,
        root: AlphaOptions | None = None,
        deadline: float | None = None,
    ) -> Bounded:
        """Bounds of the rows over each sub-domain of the batch.

        Args:
            region: the sub-domains' input regions, batched [B, ...].
            signs: per ReLU layer [B, n_t] in {-1, 0, 1}: the split constraints.
            reference: per ReLU layer bounds [B, n_t] known to hold (the parents').
            recompute: CROWN's intermediate bounds (else interval arithmetic only).
            iterations: alpha / beta optimisation steps on the output rows (0: CROWN).
            alpha_init, beta_init: warm starts per ReLU layer [B, R, n_t].
            weights: [B, R] the rows whose bounds the optimisation raises (default all).
            root: instead, alpha-CROWN with optimised intermediate slopes (the root bound).
            deadline: `time.perf_counter()` after which the optimisation stops early (every
                iterate is sound).
        """
        lo, hi = region.bounding_box()
        lo, hi = lo.to(self.dtype), hi.to(self.dtype)
        batch = lo.shape[0]
        constraints = None
        if signs is not None or reference is not None:
            constraints = SplitConstraints(
                reference={} if reference is None else self._node_dict(reference),
                signs={} if signs is None else self._node_dict([s.to(self.dtype) for s in signs]),
                recompute=recompute,
            )
        prop = _Propagation(self.graph, region, lo, hi, constraints=constraints)
        spec = self.spec
        root_lower = None
        with torch.no_grad():
            if root is not None:
                prop.run_crown()
                crown = torch.maximum(prop.spec_bound(spec), prop.ibp_spec_bound(spec))
                root_lower = prop.optimise(spec, crown, root)
                prop.bounds = [(a.detach(), b.detach()) for a, b in prop.bounds]
                prop.relaxations.clear()
                prop.alpha_base.clear()
                prop.alpha_index.clear()
            elif recompute:
                prop.run_crown()
            else:
                prop.run_ibp()
        pre = [
            (prop.bounds[i][0].reshape(batch, -1), prop.bounds[i][1].reshape(batch, -1))
            for i in self.pre_nodes
        ]
        # Empty when a neuron's lower bound exceeds its upper one by more than rounding could:
        # the two come from different sums, and a neuron pinned to one value (a split at the
        # boundary z = 0, a box of width 0) may see them cross by an ulp.
        infeasible = torch.zeros(batch, dtype=torch.bool, device=lo.device)
        eps = 64 * torch.finfo(self.dtype).eps
        for a, b in pre:
            infeasible |= (a - b > eps * (1 + a.abs() + b.abs())).any(dim=1)
        if weights is None:
            weights = torch.ones(batch, spec.shape[1], dtype=self.dtype, device=lo.device)
        lower, alphas, betas, record, A_in, bias_in = self._output(
            prop, spec, iterations, lr_alpha, lr_beta, alpha_init, beta_init, weights, deadline
        )
        with torch.no_grad():
            lower = torch.maximum(lower, prop.ibp_spec_bound(spec))
            if root_lower is not None:
                lower = torch.maximum(lower, root_lower)
        relu_coeffs = [
            record[j].reshape(-1, spec.shape[1], n).expand(batch, -1, -1)
            if j in record
            else torch.zeros(batch, spec.shape[1], n, dtype=self.dtype, device=lo.device)
            for j, n in zip(self.relus, self.sizes, strict=True)
        ]
        return Bounded(
            lower=lower.detach(),
            pre=pre,
            infeasible=infeasible,
            alphas=alphas,
            betas=betas,
            relu_coeffs=relu_coeffs,
            input_coeffs=A_in.reshape(A_in.shape[0], A_in.shape[1], -1).expand(batch, -1, -1),
            input_bias=bias_in.detach().expand(batch, spec.shape[1]),
        )

    def _node_dict(self, per_layer: list) -> dict:
        out = {}
        for i, v in zip(self.pre_nodes, per_layer, strict=True):
            if v is None:
                continue
            shape = self.graph.nodes[i].shape
            if isinstance(v, tuple):
                out[i] = tuple(t.reshape(t.shape[0], *shape) for t in v)
            else:
                out[i] = v.reshape(v.shape[0], *shape)
        return out

    def _output(
        self,
        prop: _Propagation,
        spec: Tensor,
        iterations: int,
        lr_alpha: float,
        lr_beta: float,
        alpha_init: list[Tensor] | None,
        beta_init: list[Tensor] | None,
        weights: Tensor,
        deadline: float | None = None,
    ) -> tuple[Tensor, list[Tensor] | None, list[Tensor] | None, dict[int, Tensor], Tensor, Tensor]:
        """The output rows' bound: CROWN, or alpha / beta optimised for `iterations` steps."""
        out = self.graph.output
        batch = prop.batch
        record: dict[int, Tensor] = {}
        if iterations == 0:
            with torch.no_grad():
                A, bias = prop.backward(out, spec, record=record)
                return prop.concretize(A, bias), None, None, record, A, bias
        alphas = prop._init_alphas(spec, intermediate=False)  # noqa: SLF001 - the engine's own
        if alpha_init is not None:
            with torch.no_grad():
                for t, j in enumerate(self.relus):
                    key = (out, j)
                    if key not in alphas:
                        continue
                    index = prop.alpha_index[j]  # [B, m]
                    k, _, rows, m = alphas[key].shape
                    full = alpha_init[t].to(self.dtype).reshape(1, batch, rows, -1)
                    picked = full.gather(3, index[None, :, None, :].expand(1, batch, rows, m))
                    alphas[key].copy_(picked.expand(k, -1, -1, -1))
                prop._project(alphas)  # noqa: SLF001
        signs = prop.constraints.signs if prop.constraints is not None else {}
        betas: dict[int, Tensor] = {}
        for t, i in enumerate(self.pre_nodes):
            if i not in signs or not bool((signs[i] != 0).any()):
                continue
            shape = self.graph.nodes[i].shape
            if beta_init is not None:
                init = beta_init[t].to(self.dtype).reshape(batch, spec.shape[1], *shape)
            else:
                init = torch.zeros(batch, spec.shape[1], *shape, dtype=self.dtype)
            betas[i] = init.clone().clamp_min_(0.0).requires_grad_()
        params = list(alphas.values()) + list(betas.values())
        if not params:
            with torch.no_grad():
                A, bias = prop.backward(out, spec, record=record)
                return prop.concretize(A, bias), None, None, record, A, bias
        rates = [lr_alpha] * len(alphas) + [lr_beta] * len(betas)
        optimiser = _Adam(params, rates)
        best: Tensor | None = None
        A = spec
        for step in range(iterations + 1):
            last = step == iterations or (deadline is not None and time.perf_counter() > deadline)
            with torch.set_grad_enabled(not last):
                A, bias = prop.backward(
                    out, spec, alphas, betas=betas or None, record=record if last else None
                )
                lb = prop.concretize(A, bias)
            best = lb.detach() if best is None else torch.maximum(best, lb.detach())
            if last:
                break
            grads = torch.autograd.grad(-(lb * weights).sum(), params, allow_unused=True)
            optimiser.step(grads)
            prop._project(alphas)  # noqa: SLF001
            with torch.no_grad():
                for b in betas.values():
                    b.clamp_min_(0.0)
        assert best is not None
        full_alphas = []
        for t, j in enumerate(self.relus):
            key = (out, j)
            n = self.sizes[t]
            if key in alphas:
                full = prop._full_alpha(j, alphas[key].detach())  # noqa: SLF001
                full_alphas.append(full[0].reshape(batch, spec.shape[1], n))
            else:
                lo, hi = prop.bounds[self.pre_nodes[t]]
                base = (hi >= -lo).to(self.dtype).reshape(batch, 1, n)
                full_alphas.append(base.expand(batch, spec.shape[1], n))
        full_betas = []
        for t, i in enumerate(self.pre_nodes):
            n = self.sizes[t]
            if i in betas:
                full_betas.append(betas[i].detach().reshape(batch, spec.shape[1], n))
            else:
                full_betas.append(torch.zeros(batch, spec.shape[1], n, dtype=self.dtype))
        return best, full_alphas, full_betas, record, A.detach(), bias.detach()

    # -- leaves --------------------------------------------------------------------------------
    def affine_forms(
        self, region: Region, signs: list[Tensor] | None, reference: list[Interval] | None
    ) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
        """On sub-domains where no neuron is unstable the network is affine: the rows
        `A_r y = G_r x + g_r` ([B, R, n_in], [B, R]) and, per ReLU layer, the pre-activations
        `z = W x + c` ([B, n_t, n_in], [B, n_t]), exact there (every relaxation is exact)."""
        lo, hi = region.bounding_box()
        lo, hi = lo.to(self.dtype), hi.to(self.dtype)
        batch = lo.shape[0]
        constraints = SplitConstraints(
            reference={} if reference is None else self._node_dict(reference),
            signs={} if signs is None else self._node_dict([s.to(self.dtype) for s in signs]),
        )
        prop = _Propagation(self.graph, region, lo, hi, constraints=constraints)
        with torch.no_grad():
            prop.run_crown()
            G, g = prop.backward(self.graph.output, self.spec)
            G = G.reshape(G.shape[0], G.shape[1], -1).expand(batch, -1, -1)
            g = g.expand(batch, self.spec.shape[1])
            layers = []
            for i in self.pre_nodes:
                n = math.prod(self.graph.nodes[i].shape)
                eye = torch.eye(n, dtype=self.dtype).reshape(1, n, *self.graph.nodes[i].shape)
                W, c = prop.backward(i, eye)
                W = W.reshape(W.shape[0], n, -1).expand(batch, -1, -1)
                c = c.expand(batch, n)
                layers.append((W, c))
        return G, g, layers


class _Adam:
    """Adam (Kingma & Ba 2015) on a few tensors, one step size each: torch.optim's first use
    imports torch's compiler stack, seconds that a verifier answering in a second should not
    spend."""

    def __init__(self, params: list[Tensor], rates: list[float], betas=(0.9, 0.999), eps=1e-8):
        self.params, self.rates = params, rates
        self.b1, self.b2, self.eps = betas[0], betas[1], eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self, grads) -> None:
        self.t += 1
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        for p, g, m, v, lr in zip(self.params, grads, self.m, self.v, self.rates, strict=True):
            if g is None:
                continue
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            p.sub_(lr * (m / c1) / ((v / c2).sqrt() + self.eps))


def region_batch(region: Region, batch: int, lo: Tensor | None = None, hi: Tensor | None = None):
    """`region` (one sample) repeated `batch` times, its box replaced by [lo, hi] if given."""
    centre = radius = None
    if region.centre is not None:
        centre = region.centre.expand(batch, *region.centre.shape[1:])
        radius = cast(Tensor, region.radius).expand(batch)
    if lo is None or hi is None:
        lo = region.lo
        hi = region.hi
        if centre is None:
            assert lo is not None and hi is not None
            lo = lo.expand(batch, *lo.shape[1:])
            hi = hi.expand(batch, *hi.shape[1:])
    return Region(centre, radius, region.p if centre is not None else INF, lo, hi)
