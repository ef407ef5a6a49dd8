"""The interpreter of the IR, shared by the loss side and the verification side.

* `env`: environments (`Env`, `EvalConfig`, `sample_env`) and their helpers;
* `evaluator`: the `Interpreter` (IR -> batched closures) and its closures (`Code`);
* `builtins`: the tensor implementations of the built-in functions;
* `domains`: quantifier domains as `propdsl.region.Region`s (`Interpreter.domain`).

The loss side (`propdsl.loss.compile.Compiler`) extends the `Interpreter` with logics' losses,
attack-driven quantifiers and certified terms; the verifier (`propdsl.verify.query`,
`propdsl.verify.jacobian.matching`) evaluates with it what does not depend on the quantified
input, and the regions. Nothing here imports `propdsl.loss` or `propdsl.verify`.

>>> import torch
>>> import propdsl
>>> from propdsl.interpret import BOOLEAN, Interpreter, sample_env
>>> spec = propdsl.load('''
... network f : Tensor[2] -> Tensor[2]
... property p(x) = forall x' in ball(x, 0.5, inf): f(x')[0] >= f(x)[1]''')
>>> formula = spec.property("p").formula
>>> interp = Interpreter()
>>> env = sample_env({"f": torch.nn.Identity()}, ["x"], torch.zeros(3, 2), None, logic=BOOLEAN)
>>> interp.domain(formula.domains[0])(env).bounding_box()[1][0].tolist()
[0.5, 0.5]
>>> interp(formula.body.atom.right)(env).tolist()  # f(x)[1], the part free of x'
[0.0, 0.0, 0.0]
"""

from propdsl.interpret.builtins import EXPLAINERS, FUNCTIONS, differentiates, explanation
from propdsl.interpret.domains import EmptyRegionWarning, compile_domain, warn_empty
from propdsl.interpret.env import (
    CompileError,
    Env,
    EvalConfig,
    as_batch,
    column,
    env_device,
    env_dtype,
    env_tensors,
    lookup,
    rebind,
    sample_env,
)
from propdsl.interpret.evaluator import BOOLEAN, Code, Interpreter, Lambda

__all__ = [
    "BOOLEAN",
    "EXPLAINERS",
    "FUNCTIONS",
    "Code",
    "CompileError",
    "EmptyRegionWarning",
    "Env",
    "EvalConfig",
    "Interpreter",
    "Lambda",
    "as_batch",
    "column",
    "compile_domain",
    "differentiates",
    "env_device",
    "env_dtype",
    "env_tensors",
    "explanation",
    "lookup",
    "rebind",
    "sample_env",
    "warn_empty",
]
