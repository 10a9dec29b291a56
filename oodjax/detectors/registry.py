"""The registry: every detector oodjax ships, one explicit `Detector` entry each.

A config names entries in `eval.detectors`; `oodjax.evaluate` fits them, scores them in one
compiled program per (model, batch shape), and reports one row per entry (the "indicators"
entry gives one row per indicator). Entries are plain module-level functions over the methods'
modules: nothing here computes anything new. A user's own detector goes into a registry of the
user's own, `{**REGISTRY, "mine": Detector(...)}` (see `oodjax.detectors.protocol`).

| name                      | fit sees                      | paper                               |
|---------------------------|-------------------------------|-------------------------------------|
| msp                       | nothing                       | Hendrycks & Gimpel 2017 (baseline)  |
| max_logit, energy, t1000  | nothing                       | MaxLogit, energy, T1000             |
| odin_fixed                | nothing (T, ε from options)   | ODIN at a fixed (T, ε); sample-free |
| odin_tuned_on_ood         | held-out ID + held-out OOD    | ODIN, Sec. 4.4 protocol             |
| odin_tuned_without_ood    | held-out ID                   | ODIN, ε chosen as Generalized ODIN  |
| indicators                | nothing                       | sample-free, Eqs. 7-30 (19 rows)    |
| 1c_sum                    | generated noise               | sample-free, Eq. 31                 |
| supervised                | held-out ID + held-out OOD    | sample-free, supervised upper bound |
| vmdls_b                   | ID training set               | VMDLS_b, Secs. 3.1-3.2              |
| vmdls                     | ID training set               | VMDLS, Sec. 3.3 (trains its AE)     |
| envise_gate               | nothing                       | ENVISE gate, Sec. 3-4 (BSN, L_f)    |
| envise_gate_rvsn          | nothing                       | ENVISE gate with the RvSN (L_f)     |
| msp_gated                 | nothing                       | ENVISE's MSP baseline (BSN, L_d)    |
| odin_gated                | held-out ID                   | ENVISE's ODIN baseline (BSN, L_d)   |

The VMDLS entries score a VMDLS encoder (`oodjax.vmdls.train_vmdls`), not a classifier: their
`model` is the encoder, and `oodjax run` evaluates them on it beside the classifier's rows.

The ENVISE entries are gates: the deployed student's score, by which an image is routed to the
teacher (higher = more likely an outlier = routed). They differ in the student they score
(`Detector.network`), i.e. in how it was adapted online, not only in the score: "envise_gate"
is the max softmax of the binary student trained with L_f = L_d + 0.2 L_at (Eq. 6), the
paper's method; "msp_gated" the same score on a binary student trained with L_d alone (the
paper's ED / Hendrycks-Gimpel baseline); "odin_gated" ODIN on that L_d student, with T = 1000
and ε chosen on held-out inliers only (a deployed gate never sees its outliers: the fit of
"odin_tuned_without_ood"); "envise_gate_rvsn" the max softmax of the
real-valued twin trained with L_f (Tables 2-4 of the paper). `oodjax.envise.pipeline` adapts
the students and evaluates these entries per scenario, inlier classes against outlier classes.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import jax
import numpy as np

from oodjax.batching import map_padded
from oodjax.detectors import softmax
from oodjax.detectors.odin import preprocessing, tuning
from oodjax.detectors.protocol import (HELDOUT_ID, HELDOUT_OOD, ID_TRAIN, NOISE, Detector,
                                       FitData, fixed_state)
from oodjax.detectors.sample_free import whitebox
from oodjax.detectors.sample_free import onecsum, supervised
from oodjax.models.autoencoder import ConvAutoencoder
from oodjax.models.insides import inference_apply
from oodjax.vmdls import scoring as vmdls_scoring


# --- Scores: (model, variables, state, x) -> [B] -----------------------------------------------


def score_msp(model, variables, state, x):
  del state
  return softmax.msp(inference_apply(model), variables, x)


def score_max_logit(model, variables, state, x):
  del state
  return softmax.max_logit(inference_apply(model), variables, x)


def score_energy(model, variables, state, x):
  return softmax.energy(inference_apply(model), variables, x, temperature=state["temperature"])


def score_temperature_scaled(model, variables, state, x):
  return softmax.temperature_scaled(inference_apply(model), variables, x,
                                    temperature=state["temperature"])


def score_odin(model, variables, state, x):
  """Every ODIN row, whichever way its (T, ε) was chosen, is scored here."""
  return preprocessing.odin_score(inference_apply(model), variables, x,
                                  temperature=state["temperature"], epsilon=state["epsilon"],
                                  std=state["std"])


def score_indicators(model, variables, state, x):
  del state
  return whitebox.indicators(model, variables, x)


def score_one_c_sum(model, variables, state, x):
  # All indicators, as the "indicators" entry computes them: XLA merges the two forward passes.
  return onecsum.one_c_sum(whitebox.indicators(model, variables, x), state)


def score_supervised(model, variables, state, x):
  return supervised.supervised_score(whitebox.indicators(model, variables, x), state)


# --- Fits: (model, variables, data, options) -> (state, info) ---------------------------------


def _odin_state(temperature: float, epsilon: float, data: FitData) -> dict[str, Any]:
  return {"temperature": np.float32(temperature), "epsilon": np.float32(epsilon),
          "std": np.asarray(data.std, np.float32)}


def fit_odin_fixed(model, variables, data, options):
  del model, variables
  temperature, epsilon = float(options["temperature"]), float(options["epsilon"])
  softmax.check_temperature(temperature)
  softmax.check_epsilon(epsilon)
  return (_odin_state(temperature, epsilon, data),
          {"temperature": temperature, "epsilon": epsilon})


def fit_odin_tuned_on_ood(model, variables, data, options):
  """The paper's protocol: per OOD set, the (T, ε) of least held-out FPR at 95% TPR."""
  choices = tuning.tune_on_heldout(
      inference_apply(model), variables, data.heldout_id, data.heldout_ood, std=data.std,
      temperatures=options["temperatures"], epsilons=options["epsilons"],
      chunk_size=int(options["chunk_size"]))
  states, infos = {}, {}
  for name, c in choices.items():
    states[name] = _odin_state(c["temperature"], c["epsilon"], data)
    infos[name] = {"temperature": c["temperature"], "epsilon": c["epsilon"],
                   "tune_fpr95": c["tune_fpr95"],
                   "grid": {"temperatures": [float(t) for t in options["temperatures"]],
                            "epsilons": [float(e) for e in options["epsilons"]],
                            "fpr95": np.asarray(c["grid_fpr95"]).tolist(),
                            "chosen": [c["t_index"], c["e_index"]]}}
  return states, infos


def fit_odin_tuned_without_ood(model, variables, data, options):
  choice = tuning.tune_without_ood_on_heldout(
      inference_apply(model), variables, data.heldout_id, std=data.std,
      temperature=float(options["no_ood_temperature"]), epsilons=options["epsilons"],
      chunk_size=int(options["chunk_size"]))
  return (_odin_state(choice["temperature"], choice["epsilon"], data),
          {"temperature": choice["temperature"], "epsilon": choice["epsilon"]})


def fit_nothing(model, variables, data, options):
  del model, variables, data, options
  return {}, {}


def fit_one_c_sum(model, variables, data, options):
  """1C-Sum's only fit: each member indicator's mean and std on uniform noise (Eq. 31)."""
  stats = onecsum.fit_noise_stats(model, variables, data.image_shape, data.mean, data.std,
                                  n=int(options["noise_n"]), seed=int(options["noise_seed"]),
                                  batch_size=data.batch_size)
  state = {"indicators": {name: {"mean": np.float32(v["mean"]), "std": np.float32(v["std"])}
                          for name, v in stats["indicators"].items()}}
  return state, {"noise_n": stats["n"], "noise_seed": stats["seed"],
                 "noise_stats": stats["indicators"]}


_indicators_jit = jax.jit(whitebox.indicators, static_argnums=0)


def _indicators_of(model, variables, x, batch_size: int) -> dict[str, np.ndarray]:
  """{indicator: [N]} of N images, in padded batches through one compiled program."""
  return map_padded(lambda batch: _indicators_jit(model, variables, batch), x, batch_size)


def fit_supervised(model, variables, data, options):
  """Per OOD set, a logistic regression on every indicator of the held-out images."""
  del options
  features_in = _indicators_of(model, variables, data.heldout_id, data.batch_size)
  states = {}
  for name, x_out in data.heldout_ood.items():
    features_out = _indicators_of(model, variables, x_out, data.batch_size)
    states[name] = supervised.fit_supervised(features_in, features_out)
  return states, {name: {} for name in states}


# The autoencoder of the "vmdls" entry (Sec. 3.3); its output has the input's channels, so one
# definition serves 28x28x1 and 32x32x3. Half the default widths, so that it costs a fraction of
# the main job's time and of VMDLS's scoring on 2 CPU cores. Another architecture is another entry:
# `{**REGISTRY, "vmdls_big": vmdls_detector(ConvAutoencoder(widths=(64, 128)))}`.
VMDLS_AUTOENCODER = ConvAutoencoder(widths=(16, 32), latent_channels=8)


def vmdls_b_detector(members: str = "pooled") -> Detector:
  """The "vmdls_b" entry: class Gaussians of the ID training set's feature ensembles (Sec. 3.1).

  `members` picks the ensemble's block members (`oodjax.vmdls.scoring.ensemble_blocks`):
  "pooled" (the default) or "blocks" (a max-pooling network's block outputs before the pool),
  e.g. `{**REGISTRY, "vmdls_b_blocks": vmdls_b_detector("blocks")}`.
  """
  if members not in vmdls_scoring.MEMBERS:
    raise ValueError(f"members must be one of {vmdls_scoring.MEMBERS}, got {members!r}")

  def fit(model, variables, data, options):
    state = vmdls_scoring.fit_vmdls(model, variables, data.id_train,
                                    batch_size=data.batch_size, ridge=float(options["ridge"]),
                                    members=members)
    return state, {"feature_dim": int(state["means"].shape[-1])}

  def score(model, variables, state, x):
    return vmdls_scoring.score_vmdls_b(model, variables, state, x, members=members)[0]

  def classify(model, variables, state, x):
    return vmdls_scoring.best_log_likelihood(model, variables, state, x, members=members)[1]

  return Detector("VMDLS_b", fit, score, sees=frozenset({ID_TRAIN}), options="vmdls_eval",
                  defaults={"ridge": 1e-6}, classify=classify, network="vmdls")


def vmdls_detector(autoencoder: Any = VMDLS_AUTOENCODER, members: str = "pooled") -> Detector:
  """The "vmdls" entry with `autoencoder` (a Linen module mapping x to its reconstruction).

  Its fit trains the autoencoder on the ID training set (`oodjax.vmdls.train_autoencoder`,
  resumed or reused from `FitData.workdir`/autoencoder) with `options["autoencoder"]`, then
  fits the class Gaussians and the weighting's constants (`oodjax.vmdls.scoring.fit_vmdls`).
  `members` as for `vmdls_b_detector`.
  """
  from oodjax.vmdls.train import autoencoder_config, train_autoencoder  # pylint: disable=g-import-not-at-top
  if members not in vmdls_scoring.MEMBERS:
    raise ValueError(f"members must be one of {vmdls_scoring.MEMBERS}, got {members!r}")

  def fit(model, variables, data, options):
    ae_config = autoencoder_config(**dict(options["autoencoder"]))
    with tempfile.TemporaryDirectory() as scratch:
      workdir = os.path.join(data.workdir or scratch, "autoencoder")
      ae_state, ae_summary = train_autoencoder(ae_config, workdir, model=autoencoder,
                                               train_ds=data.id_train, progress=False)
    state = vmdls_scoring.fit_vmdls(
        model, variables, data.id_train, batch_size=data.batch_size,
        ridge=float(options["ridge"]), autoencoder=autoencoder,
        autoencoder_params=jax.device_get(ae_state.params), shift=bool(options["shift"]),
        members=members)
    return state, {"feature_dim": int(state["means"].shape[-1]),
                   "autoencoder_steps": int(ae_summary["step"])}

  def score(model, variables, state, x):
    return vmdls_scoring.score_vmdls(model, variables, state, x, autoencoder=autoencoder,
                                     members=members)[0]

  def classify(model, variables, state, x):
    return vmdls_scoring.best_log_likelihood(model, variables, state, x, members=members)[1]

  return Detector("VMDLS", fit, score, sees=frozenset({ID_TRAIN}), options="vmdls_eval",
                  defaults={"ridge": 1e-6, "shift": True,
                            "autoencoder": {"num_epochs": 2, "batch_size": 128,
                                            "learning_rate": 1e-3, "seed": 0}},
                  classify=classify, network="vmdls")


# --- The registry ---------------------------------------------------------------------------

REGISTRY: dict[str, Detector] = {
    "msp": Detector("Baseline (MSP)", fit_nothing, score_msp),
    "max_logit": Detector("Max logit", fit_nothing, score_max_logit),
    "energy": Detector("Energy", fixed_state(temperature=1.0), score_energy, options="energy"),
    # Temperature scaling alone at T = 1000: the sample-free "T1000" (ODIN with ε = 0).
    "t1000": Detector("T1000", fixed_state(temperature=softmax.T1000_TEMPERATURE),
                      score_temperature_scaled),
    "odin_fixed": Detector(
        "ODIN (fixed T, ε)", fit_odin_fixed, score_odin, options="odin_fixed",
        defaults={"temperature": softmax.T1000_TEMPERATURE,
                  "epsilon": whitebox.ODIN_EPSILON}),
    "odin_tuned_on_ood": Detector(
        "ODIN (tuned on OOD)", fit_odin_tuned_on_ood, score_odin,
        sees=frozenset({HELDOUT_ID, HELDOUT_OOD}), options="odin",
        defaults={"temperatures": tuning.PAPER_TEMPERATURES, "epsilons": tuning.PAPER_EPSILONS,
                  "chunk_size": 250}),
    "odin_tuned_without_ood": Detector(
        "ODIN (tuned without OOD)", fit_odin_tuned_without_ood, score_odin,
        sees=frozenset({HELDOUT_ID}), options="odin",
        defaults={"no_ood_temperature": softmax.T1000_TEMPERATURE,
                  "epsilons": tuning.PAPER_EPSILONS, "chunk_size": 250}),
    "indicators": Detector("Sample-free indicators", fit_nothing, score_indicators,
                           row_prefix="ind:"),
    "1c_sum": Detector("1C-Sum", fit_one_c_sum, score_one_c_sum, sees=frozenset({NOISE}),
                       options="sample_free", defaults={"noise_n": 10_000, "noise_seed": 0}),
    "supervised": Detector("Supervised (upper bound)", fit_supervised, score_supervised,
                           sees=frozenset({HELDOUT_ID, HELDOUT_OOD}),
                           halves_without_holdout=True),
    "vmdls_b": vmdls_b_detector(),
    "vmdls": vmdls_detector(),
    # ENVISE's gates: the deployed student's max softmax (Hendrycks & Gimpel, as the paper's
    # Sec. 4 routes), or ODIN on it; the network says which adapted student.
    "envise_gate": Detector("ENVISE gate (BSN, L_d + L_at)", fit_nothing, score_msp,
                            network="envise_bsn"),
    "envise_gate_rvsn": Detector("ENVISE gate (RvSN, L_d + L_at)", fit_nothing, score_msp,
                                 network="envise_rvsn"),
    "msp_gated": Detector("MSP-gated BSN (L_d only)", fit_nothing, score_msp,
                          network="envise_bsn_ld"),
    "odin_gated": Detector(
        "ODIN-gated BSN (L_d only)", fit_odin_tuned_without_ood, score_odin,
        sees=frozenset({HELDOUT_ID}), options="odin", network="envise_bsn_ld",
        defaults={"no_ood_temperature": softmax.T1000_TEMPERATURE,
                  "epsilons": tuning.PAPER_EPSILONS, "chunk_size": 250}),
}
