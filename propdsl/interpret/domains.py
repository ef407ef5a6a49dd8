"""Domains of quantifiers as regions: an IR domain (a ball, boxes, their intersection) becomes,
for the batch of an environment, a `propdsl.region.Region`.

The loss side's attacks search these regions, the verifier bounds networks over them, and
export writes their boxes: one evaluation of a domain for all of them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from torch import Tensor

from propdsl import ir as I
from propdsl.interpret.env import CompileError, Env
from propdsl.region import Region

__all__ = ["EmptyRegionWarning", "compile_domain", "region_shape", "warn_empty"]

Compile = Callable[[I.Node], Callable[[Env], Tensor]]


class EmptyRegionWarning(UserWarning):
    """A quantifier ranged over an empty region for some samples (the ball misses the box):
    it took its vacuous value there (`forall` true, `exists` false)."""


def warn_empty(names: tuple[str, ...], kind: str) -> None:
    """Warn that the region of a `kind` quantifier over `names` is empty for some samples."""
    # One message per quantifier kind and variables: the default filter shows it once.
    meaning = {
        "forall": "true there (no loss)",
        "exists": "false there (a constant loss without gradient)",
        "max": "-inf there",
        "min": "+inf there",
    }[kind]
    warnings.warn(
        f"the region of {', '.join(names)} is empty for some samples (the ball does not meet "
        f"the box: are the data in the box's units?); '{kind}' over it is {meaning}",
        EmptyRegionWarning,
        stacklevel=2,
    )


def region_shape(d: I.Domain, env: Env) -> tuple[int, ...]:
    """The shape [B, *shape] of the domain's points for the environment's batch."""
    shape = d.shape or ()
    return (env.batch, *shape)


def compile_domain(compile: Compile, d: I.Domain) -> Callable[[Env], Region]:
    """`env -> Region` of a domain that is not a finite range: a ball, boxes, or a ball
    intersected with boxes. `compile` turns the domain's expressions (centre, radius, bounds)
    into closures (an `Interpreter`). The region is detached from the graph of its expressions,
    and every ball's radius is scaled by the environment's `config.radius_scale`.

    Raises:
        CompileError: an intersection of two balls (no region has that form).
    """
    parts = d.parts if isinstance(d, I.Inter) else (d,)
    balls = [p for p in parts if isinstance(p, I.Ball)]
    boxes = [p for p in parts if isinstance(p, I.Box)]
    if len(balls) > 1:
        raise CompileError("an intersection of two balls is not supported by the attack")
    ball = balls[0] if balls else None
    ball_code = (compile(ball.centre), compile(ball.radius)) if ball else None
    box_codes = [(compile(b.lo), compile(b.hi)) for b in boxes]

    def run(env: Env) -> Region:
        region: Region | None = None
        if ball_code is not None:
            assert ball is not None
            centre = ball_code[0](env).detach()
            radius = ball_code[1](env).detach() * env.config.radius_scale
            region = Region.ball(centre, radius.reshape(-1) if radius.dim() else radius, ball.p)
        for lo_c, hi_c in box_codes:
            lo, hi = lo_c(env).detach(), hi_c(env).detach()
            if region is None:
                like_shape = region_shape(d, env)
                region = Region.box(lo.expand(like_shape).clone(), hi.expand(like_shape).clone())
            else:
                region = region.intersect_box(lo, hi)
        assert region is not None
        return region

    return run
