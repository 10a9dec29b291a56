"""The detector protocol: every detector is a `Detector`, a pair of pure functions and a label.

In the spirit of stax's `(init, apply)` pairs:

    state, info = detector.fit(model, variables, data, options)   # once per trained model
    scores = detector.score(model, variables, state, x)           # [B], higher = more OOD

* `model` is the Flax Linen module (hashable: compiled programs are keyed on it, so equal
  models share them), `variables` its variables, `x` a batch [B, H, W, C] of inputs
  normalised with the in-distribution statistics.
* `state` is a pytree of arrays: everything the score needs besides the network, hyperparameters
  included (ODIN's T and ε, 1C-Sum's noise statistics, a fitted classifier's weights). It is an
  argument of the compiled scorer, so new values never recompile; only its structure is static.
  A detector with nothing to learn returns `{}` (MSP) or its fixed hyperparameters (T1000).
* `info` is a JSON-able dict for the report (ODIN's chosen T and ε, its held-out grid).
* `score` may return a dict {row: [B]} instead of one [B] array: a family of detectors computed
  together (the sample-free indicators), one report row each, named `row_prefix + row`.

What `fit` may see is declared in `sees`, and `oodjax.evaluate` hands it exactly that in a
`FitData` (everything else is None), so a report can say which rows used OOD data:

* `NOTHING` (the empty set): hyperparameters come from the options alone;
* `ID_TRAIN`: the in-distribution training set;
* `HELDOUT_ID`: in-distribution test images held out from evaluation;
* `HELDOUT_OOD`: held-out images of each OOD set the detector is then tested on (ODIN tuned on
  OOD, the supervised bound). Such a detector is fitted once per OOD set: its `fit` returns
  `({ood_set: state}, {ood_set: info})`, and it is marked as having seen OOD data;
* `NOISE`: generated noise (1C-Sum); noise needs no data, only the input shape and
  normalisation, which every `FitData` carries.

A user's own detector is one more entry in a registry the user builds, without editing oodjax:

    my_registry = {**oodjax.detectors.REGISTRY,
                   "mine": Detector(label="Mine", fit=fit_mine, score=score_mine)}
    oodjax.evaluate.run_evaluation(config, workdir, model, variables, registry=my_registry)

with "mine" named in `config.eval.detectors`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from oodjax.data.core import ImageDataset

PyTree = Any

NOTHING: frozenset[str] = frozenset()
ID_TRAIN = "id_train"
HELDOUT_ID = "heldout_id"
HELDOUT_OOD = "heldout_ood"
NOISE = "noise"
# What each kind of data is, in the words a report uses.
SEES = {ID_TRAIN: "the in-distribution training set",
        HELDOUT_ID: "held-out in-distribution test images",
        HELDOUT_OOD: "held-out images of the OOD set it is tested on",
        NOISE: "generated noise"}

# The networks a detector can score (`Detector.network`): the experiment's classifier, a VMDLS
# encoder, and ENVISE's students after their online adaptation (`oodjax.envise.pipeline`): the
# binary student trained with L_d + L_at, the binary student trained with L_d only, and the
# real-valued twin trained with L_d + L_at.
NETWORKS = ("classifier", "vmdls", "envise_bsn", "envise_bsn_ld", "envise_rvsn")

# A fit: (model, variables, data, options) -> (state, info).
FitFn = Callable[[Any, PyTree, "FitData", Mapping[str, Any]], tuple[PyTree, dict]]
# A score: (model, variables, state, x [B, ...]) -> [B] or {row: [B]} (a classify: [B] int).
ScoreFn = Callable[[Any, PyTree, PyTree, Any], Any]


@dataclasses.dataclass(frozen=True)
class FitData:
  """What a detector's `fit` may see; only the fields its entry declares in `sees` are set.

  Attributes:
    image_shape: (H, W, C) of one network input.
    mean: [C] in-distribution normalisation mean (pixels on the [0, 1] scale).
    std: [C] in-distribution normalisation std; inputs are (pixels - mean) / std.
    seed: the evaluation's seed, for fits that draw random numbers (noise).
    batch_size: images per compiled call, for fits that run the network.
    id_train: the in-distribution training set (`ID_TRAIN`).
    heldout_id: [N, H, W, C] normalised held-out in-distribution test images (`HELDOUT_ID`).
    heldout_ood: {ood_set: [M, H, W, C]} normalised held-out images of each OOD set
      (`HELDOUT_OOD`).
    workdir: a folder of its own where a fit may keep what it trains, so a second evaluation
      resumes or reuses it (VMDLS's autoencoder); None: nothing is kept.
  """
  image_shape: tuple[int, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  seed: int = 0
  batch_size: int = 500
  id_train: ImageDataset | None = None
  heldout_id: np.ndarray | None = None
  heldout_ood: Mapping[str, np.ndarray] | None = None
  workdir: str | None = None


@dataclasses.dataclass(frozen=True)
class Detector:
  """One registry entry.

  Attributes:
    label: the name reports show.
    fit: `fit(model, variables, data: FitData, options) -> (state, info)`.
    score: `score(model, variables, state, x) -> [B]` (or {row: [B]}), higher = more OOD;
      traced inside one compiled scorer per (model, batch shape): a pure jnp function.
    sees: what `fit` may see (`NOTHING`, or a set of `ID_TRAIN`, `HELDOUT_ID`, `HELDOUT_OOD`,
      `NOISE`).
    options: the `config.eval` section holding this detector's options (None: none).
    defaults: default options, overridden by that section.
    row_prefix: for a `score` that returns a dict, the prefix of its row names.
    halves_without_holdout: for a detector that sees held-out data, fit it on a random half of
      each set and report it on the other half when the evaluation holds nothing out (the
      sample-free paper's supervised protocol); otherwise such a detector needs a holdout.
    classify: `classify(model, variables, state, x) -> [B] int`, the class an accepted input
      is given in open-set recognition (VMDLS: the best Gaussian's class); None: the argmax of
      the model's output, for detectors on a classifier.
    network: which trained network `model` is: "classifier" (the experiment's classifier),
      "vmdls" (a VMDLS encoder, trained by `oodjax.vmdls.train_vmdls`), or one of ENVISE's
      adapted students, "envise_bsn", "envise_bsn_ld", "envise_rvsn" (`oodjax.envise.pipeline`).
  """
  label: str
  fit: FitFn
  score: ScoreFn
  sees: frozenset[str] = NOTHING
  options: str | None = None
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  row_prefix: str | None = None
  halves_without_holdout: bool = False
  classify: ScoreFn | None = None
  network: str = "classifier"

  def __post_init__(self):
    if self.network not in NETWORKS:
      raise ValueError(f"unknown network {self.network!r}; known: {NETWORKS}")
    unknown = set(self.sees) - set(SEES)
    if unknown:
      raise ValueError(f"unknown kinds of data in sees: {sorted(unknown)}; known: {sorted(SEES)}")

  @property
  def per_ood_set(self) -> bool:
    """Fitted once per OOD set (it sees that set's held-out images)."""
    return HELDOUT_OOD in self.sees

  @property
  def sees_heldout(self) -> bool:
    return bool({HELDOUT_ID, HELDOUT_OOD} & self.sees)


def fixed_state(**hyperparameters) -> FitFn:
  """A `fit` that sees nothing and returns the options named here as the state.

  `fixed_state(temperature=1.0)` gives a fit returning ({"temperature": T}, {"temperature": T})
  with T = options.get("temperature", 1.0): the state for the scorer, the info for the report.
  A temperature must be > 0 and an epsilon >= 0 (checked here: under jit they cannot be).
  """
  def fit(model, variables, data, options):
    del model, variables, data
    values = {k: float(options.get(k, v)) for k, v in hyperparameters.items()}
    for name, value in values.items():
      if (name == "temperature" and not value > 0) or (name == "epsilon" and not value >= 0):
        raise ValueError(f"{name} = {value} is out of range (temperature > 0, epsilon >= 0)")
    return {k: np.float32(v) for k, v in values.items()}, values
  return fit
