"""Options and progress reports of the complete verifier."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from propdsl.verify.bounds import NamedEnum

__all__ = ["Branching", "CompleteOptions", "Progress", "SubdomainBound"]


class Branching(NamedEnum):
    """How sub-domains are split. `auto`: the input when the network has activations other
    than ReLU, or when the input has at most `input_split_dims` entries and CROWN leaves more
    than `relu_split_unstable` ReLUs unstable over the region; else ReLUs."""

    AUTO = "auto"
    INPUT = "input"
    RELU = "relu"


class SubdomainBound(NamedEnum):
    """The bound of each sub-domain: CROWN (no optimisation), alpha-CROWN (the output rows'
    ReLU slopes optimised) or beta-CROWN (slopes and the split constraints' multipliers)."""

    CROWN = "crown"
    ALPHA = "alpha"
    BETA = "beta"


def _positive_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class CompleteOptions:
    """Settings of `propdsl.verify.complete.solve`.

    Args:
        timeout: wall-clock seconds for the whole problem (falsifier, root bound and search).
        batch: sub-domains bounded per call of the bound engine (the children of batch / 2
            parents).
        branching: `Branching.AUTO`, `INPUT` or `RELU` (or its name).
        input_split_dims, relu_split_unstable: `auto` splits the input when it has at most
            `input_split_dims` entries, unless CROWN leaves at most `relu_split_unstable` ReLUs
            unstable over the whole region (a tree of ReLU splits is then small).
        bound: the sub-domains' bound with ReLU splitting (`SubdomainBound.BETA` by default);
            with input splitting `crown` is plain CROWN and `alpha` / `beta` optimise the slopes.
        iterations: alpha / beta optimisation steps per sub-domain bound.
        lr_alpha, lr_beta: Adam's step sizes for the slopes and the multipliers.
        root_iterations: alpha-CROWN steps at the root (ReLU splitting; intermediate slopes too).
        input_iterations: optimisation steps per sub-domain with input splitting (0: CROWN).
        recompute_intermediate: ReLU splitting re-bounds the intermediate layers of every
            sub-domain with CROWN (intersected with the parent's bounds); else it inherits them.
        split_disjuncts: ReLU splitting searches each disjunct the root leaves open on its
            own (easiest first) instead of all together.
        candidates: ReLU splitting looks ahead at this many candidate neurons per sub-domain
            (the best by the intercept score), bounding both children of each, and splits the
            one whose worse child is best (0: the intercept score alone).
        attack_steps, attack_restarts: the falsifier at the root (gradient steps, random starts
            besides the centre).
        probe_steps: gradient steps from each new open sub-domain's candidate points (its
            centre, its worst row's bound minimiser) before they are checked.
        attack_every, attack_domains: every this many rounds the falsifier also climbs from the
            worst-bounded open sub-domains (this many).
        lp_leaves: decide sub-domains with at most `lp_unstable` unstable neurons exactly by
            linear programming, one program per sign pattern of those neurons (boxes, L-inf
            and L1 balls).
        lp_unstable: see `lp_leaves`.
        dtype: the bound computations' precision (the user's model checks counterexamples).
        max_domains: open sub-domains kept at most (memory); beyond, the search stops with
            `unknown`.
        seed: the falsifier's random starts.
    """

    timeout: float = 60.0
    batch: int = 256
    branching: Branching | str = Branching.AUTO
    input_split_dims: int = 16
    relu_split_unstable: int = 16
    bound: SubdomainBound | str = SubdomainBound.BETA
    iterations: int = 20
    lr_alpha: float = 0.1
    lr_beta: float = 0.05
    root_iterations: int = 50
    input_iterations: int = 5
    recompute_intermediate: bool = True
    split_disjuncts: bool = True
    candidates: int = 3
    attack_steps: int = 100
    attack_restarts: int = 32
    probe_steps: int = 5
    attack_every: int = 5
    attack_domains: int = 32
    lp_leaves: bool = True
    lp_unstable: int = 2
    dtype: torch.dtype = torch.float64
    max_domains: int = 300_000
    seed: int = 0

    def __post_init__(self) -> None:
        _positive("timeout", self.timeout)
        if not math.isfinite(self.timeout):
            raise ValueError("timeout must be finite")
        _positive_int("batch", self.batch, 2)
        object.__setattr__(self, "branching", _member(Branching, self.branching, "branching"))
        object.__setattr__(self, "bound", _member(SubdomainBound, self.bound, "bound"))
        _positive_int("input_split_dims", self.input_split_dims, 0)
        _positive_int("relu_split_unstable", self.relu_split_unstable, 0)
        for name in ("iterations", "root_iterations", "input_iterations", "candidates"):
            _positive_int(name, getattr(self, name), 0)
        for name in ("attack_steps", "attack_restarts", "probe_steps", "lp_unstable"):
            _positive_int(name, getattr(self, name), 0)
        _positive_int("attack_every", self.attack_every)
        _positive_int("attack_domains", self.attack_domains, 0)
        _positive_int("max_domains", self.max_domains)
        _positive("lr_alpha", self.lr_alpha)
        _positive("lr_beta", self.lr_beta)
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {self.dtype}")


def _member(enum_cls, value, name: str):
    try:
        return value if isinstance(value, enum_cls) else enum_cls(value)
    except ValueError:
        names = ", ".join(m.value for m in enum_cls)
        raise ValueError(f"unknown {name} {value!r}; choose one of {names}") from None


@dataclass(frozen=True)
class Progress:
    """A snapshot of the search, passed to the progress callback after every round.

    `proved_share`: the share of the search space proved so far; with input splitting the
    share of the input box's volume, with ReLU splitting the share of the tree (each child
    counts half its parent). `worst_bound`: the smallest bound among the open sub-domains
    (the proof needs every one > 0).
    """

    elapsed: float
    rounds: int
    open_domains: int
    proved_domains: int
    proved_share: float
    worst_bound: float
    branching: str
