"""OOD detectors: `score(apply_fn, variables, x, *, ...) -> [B]`, higher = more out-of-distribution.

`apply_fn(variables, x) -> logits [B, K]` is the network in inference mode (for a Linen model,
`functools.partial(model.apply, train=False)`); `x` is a batch of normalised inputs.
"""
from oodjax.detectors.softmax import msp

DETECTORS = {
    "msp": msp,
}
