"""OOD detectors, higher score = more out-of-distribution, and the registry that runs them.

Functions, `score(apply_fn, variables, x, *, hyperparameters) -> [B]` with
`apply_fn(variables, x) -> logits [B, K]` the network in inference mode
(`oodjax.models.inference_apply(model)`):

* `softmax`: `msp`, `max_logit`, `energy`, `temperature_scaled`;
* `odin`: `odin_score`, its (T, ε) grid and the paper's tuning protocol;
* `sample_free`: the white-box indicators, 1C-Sum, the supervised bound, Section 5 thresholds.

The registry (`REGISTRY`, `Detector`, `FitData`; see `protocol` and `registry`) turns each into
an entry that `oodjax.evaluate` fits, scores and reports.
"""
from oodjax.detectors import odin, sample_free
from oodjax.detectors.odin import odin_score
from oodjax.detectors.protocol import (HELDOUT_ID, HELDOUT_OOD, ID_TRAIN, NOISE, NOTHING, SEES,
                                       Detector, FitData, fixed_state)
from oodjax.detectors.registry import REGISTRY
from oodjax.detectors.softmax import (T1000_TEMPERATURE, energy, max_logit, msp,
                                      temperature_scaled)

__all__ = ["HELDOUT_ID", "HELDOUT_OOD", "ID_TRAIN", "NOISE", "NOTHING", "REGISTRY", "SEES",
           "T1000_TEMPERATURE", "Detector", "FitData", "energy", "fixed_state", "max_logit",
           "msp", "odin", "odin_score", "sample_free", "temperature_scaled"]
