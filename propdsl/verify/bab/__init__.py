"""Branch and bound for complete verification; the public entry is `propdsl.verify.complete`.

`spec` (the problem's rows and what bounds decide), `engine` (batched bounds of sub-domains
with split constraints, alpha and beta), `search` (the loop, input and ReLU splitting), `lp`
(leaves decided by linear programming), `falsify` (gradient ascent on the violation),
`options` (settings and progress reports).
"""
