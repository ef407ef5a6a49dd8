"""Sound bounds of a network's Jacobian over an input region, and Lipschitz constants from them.

`jacobian_bounds(model, lower, upper)` returns element-wise bounds `lo <= d f_o / d x <= hi`,
valid at every x of the region (Fast-Lip / RecurJac style, Weng et al. 2018, Zhang et al. 2019):

1. bounds of every pre-activation over the region come from the bound engine (CROWN's
   intermediate bounds, or IBP's);
2. each activation's derivative is then bounded per neuron over its pre-activation interval
   (ReLU: {0}, {1} or [0, 1]; tanh / sigmoid: the range of f' on [l, u]; ...);
3. the Jacobian is propagated backwards from the output as an interval matrix: exactly through
   affine layers (centre and radius: `A_mid M +- A_rad |M|`) and by interval products through
   the activations' derivative intervals;
4. where affordable (`JacobianRelaxation`), a CROWN-style linear pass in the derivatives keeps
   the correlations that interval products lose, and the two bounds are intersected.

`lipschitz_bound(lo, hi, p, q)` turns the bounds into a Lipschitz constant from the q-norm of the
input to the p-norm of the output, valid on the (convex) region by the mean-value theorem.
See docs/jacobian.md for the soundness argument and the table of norms.

The package, by concern:

* `interval`: the interval pass (`interval_pass`) and the rows asked for (`output_spec`);
* `linear`: the linear pass in the derivatives (`linear_pass`, `LINEAR_WORK_LIMIT`);
* `analysis`: the entry points `jacobian_bounds` and `lipschitz_constant` over a model's bound
  graph (`analyse`, `JacobianRelaxation`);
* `lipschitz`: operator norms of bounded matrices (`lipschitz_bound`) and the chain cuts;
* `explanations`: certified distances, cosines and top-k overlaps of explanation maps;
* `matching`: properties decided by Jacobian bounds (`to_jacobian_query`, `JacobianQuery`).

Each layer's derivative lives beside its bound rule (`propdsl.verify.layers`): an activation's
`derivative_range`, a nonlinear rule's `derivative_backward`, an affine rule's `abs_backward`
and `forward_linear`; `register_derivative` adds a range to a rule class one does not own.
"""

from propdsl.verify.jacobian.analysis import JacobianRelaxation, jacobian_bounds, lipschitz_constant
from propdsl.verify.jacobian.explanations import (
    cosine_lower_bound,
    distance_bound,
    mse_bound,
    product_bounds,
    topk_lower_bound,
)
from propdsl.verify.jacobian.linear import LINEAR_WORK_LIMIT
from propdsl.verify.jacobian.lipschitz import lipschitz_bound
from propdsl.verify.jacobian.matching import JacobianQuery, norm_of_difference, to_jacobian_query
from propdsl.verify.layers import DERIVATIVES, derivative_range, register_derivative

__all__ = [
    "DERIVATIVES",
    "LINEAR_WORK_LIMIT",
    "JacobianQuery",
    "JacobianRelaxation",
    "cosine_lower_bound",
    "derivative_range",
    "distance_bound",
    "jacobian_bounds",
    "lipschitz_bound",
    "lipschitz_constant",
    "mse_bound",
    "norm_of_difference",
    "product_bounds",
    "register_derivative",
    "to_jacobian_query",
    "topk_lower_bound",
]
