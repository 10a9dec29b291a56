"""OOD detectors: `score(apply_fn, variables, x, *, ...) -> [B]`, higher = more out-of-distribution.

`apply_fn(variables, x) -> logits [B, K]` is the network in inference mode (for a Linen model,
`functools.partial(model.apply, train=False)`); `x` is a batch of normalised inputs.

`DETECTORS` holds the detectors that can be called as `score(apply_fn, variables, x)` with no
further arguments, so a config can name them. ODIN is not among them: it needs the dataset's
normalisation `std` and a (T, ε) chosen per the paper's protocol, which `oodjax.tuning.tune_odin`
(tuned on held-out OOD data) and `oodjax.tuning.tune_odin_without_ood` provide.
"""
import functools

from oodjax.detectors.softmax import (energy, max_logit, msp, odin, odin_input_gradient,
                                      odin_perturbation, temperature_scaled)

DETECTORS = {
    "msp": msp,
    "max_logit": max_logit,
    "energy": energy,
    # Temperature scaling alone at T = 1000: the sample-free "T1000" baseline (ODIN with ε = 0).
    "t1000": functools.partial(temperature_scaled, temperature=1000.0),
}
