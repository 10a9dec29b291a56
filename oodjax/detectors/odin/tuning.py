"""Choosing ODIN's temperature and perturbation magnitude, with and without OOD data.

The paper's protocol (Liang et al., 2018, section 4.4, "Choosing parameters"): for each OOD set,
hold out 1,000 of its images, pick T from `PAPER_TEMPERATURES` and ε from `PAPER_EPSILONS` to
minimise the FPR at 95% TPR on the held-out images, and report metrics on the remaining images.
The paper does not say which in-distribution images the FPR is computed against; we hold out the
same number of ID images and report on the rest, so no image is both tuned on and evaluated on.

Tuning on OOD samples of the very distribution being tested flatters ODIN (the hyperparameters see
the test distribution). `tune_odin_without_ood` is the OOD-free alternative used by Generalized
ODIN (Hsu et al., 2020): at a fixed T, pick the ε that maximises the mean max-softmax score of the
perturbed held-out ID images. Report its numbers separately, as "ODIN (tuned without OOD)".

The splits are seeded: the ID split depends only on (n_in, holdout, seed), so it is the same for
every OOD set and for both tuning variants, and the evaluation ID images are shared by all of them.
The returned index arrays let other detectors be scored on exactly the same evaluation images.

The protocol is written once, in two halves:

* tuning, on held-out images only: `tune_on_heldout` scores the held-out ID images' [T, E] grid
  ONCE and selects a (T, ε) for each of several OOD sets against it (the ID split is shared, so
  its grid is too); `tune_without_ood_on_heldout` is the OOD-free variant. These are what the
  detector registry's ODIN entries call (`oodjax.detectors.registry`).
* scoring, at the chosen (T, ε): `odin_score` (`preprocessing.py`), the one ODIN scoring path,
  batched by `oodjax.evaluate` or by `odin_scores` here.

`tune_odin` and `tune_odin_without_ood` run split -> tune -> score for one OOD set, for users
who call the protocol from Python.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from oodjax import metrics
from oodjax.batching import map_padded
from oodjax.detectors.odin.grid import odin_grid
from oodjax.detectors.odin.preprocessing import odin_score
from oodjax.detectors.softmax import ApplyFn, T1000_TEMPERATURE, check_grid

# Section 4.4 of the paper.
PAPER_TEMPERATURES = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
# "21 evenly spaced numbers starting from 0 and ending at 0.004", written out to avoid the
# rounding noise of 0.0002 * i.
PAPER_EPSILONS = (0.0, 0.0002, 0.0004, 0.0006, 0.0008, 0.001, 0.0012, 0.0014, 0.0016, 0.0018,
                  0.002, 0.0022, 0.0024, 0.0026, 0.0028, 0.003, 0.0032, 0.0034, 0.0036, 0.0038,
                  0.004)
PAPER_HOLDOUT = 1000


def _split_one(n: int, holdout: int, seed_seq: np.random.SeedSequence, what: str
               ) -> tuple[np.ndarray, np.ndarray]:
  if holdout < 1 or holdout >= n:
    raise ValueError(f"holdout must be in [1, {n - 1}] so that both parts of the {what} set are "
                     f"non-empty; got holdout={holdout} for {n} images.")
  perm = np.random.default_rng(seed_seq).permutation(n)
  # Sorted, so that gathering the parts keeps the dataset's order.
  return np.sort(perm[:holdout]), np.sort(perm[holdout:])


def _seed_streams(seed: int) -> list[np.random.SeedSequence]:
  # Independent streams for the ID and the OOD split: the ID split must not depend on n_out.
  return np.random.SeedSequence(seed).spawn(2)


def split_holdout(n_in: int, n_out: int, holdout: int = PAPER_HOLDOUT, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Seeded random split of an ID set and an OOD set into tuning and evaluation indices.

  Args:
    n_in: N, number of in-distribution images.
    n_out: M, number of out-of-distribution images.
    holdout: images held out for tuning from EACH set; 1 <= holdout < min(N, M).
    seed: the split's seed. The ID split depends only on (n_in, holdout, seed).

  Returns:
    (idx_tune_in [holdout], idx_eval_in [N - holdout], idx_tune_out [holdout],
     idx_eval_out [M - holdout]), sorted int64 indices; each pair partitions its set.

  Raises:
    ValueError: a holdout that leaves either part of either set empty.
  """
  stream_in, stream_out = _seed_streams(seed)
  tune_in, eval_in = _split_one(n_in, holdout, stream_in, "in-distribution")
  tune_out, eval_out = _split_one(n_out, holdout, stream_out, "out-of-distribution")
  return tune_in, eval_in, tune_out, eval_out


def split_holdout_in(n_in: int, holdout: int = PAPER_HOLDOUT, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
  """The ID half of `split_holdout` alone (no OOD set needed): (idx_tune_in, idx_eval_in)."""
  return _split_one(n_in, holdout, _seed_streams(seed)[0], "in-distribution")


def select_from_grid(fpr_grid, tie_break=None) -> tuple[int, int]:
  """The (t, e) index of the smallest FPR in a [T, E] grid, with deterministic tie-breaking.

  On a 1,000-image holdout the FPR moves in steps of 1/1000 and is often 0 over a whole region of
  the grid, so ties are common. They are broken, in order:
    1. by the smallest value of `tie_break` (if given; `tune_odin` passes the held-out detection
       error, a threshold-free refinement of the same goal);
    2. by the first position in row-major order: the smallest t index, then the smallest e index.
       With grids in increasing order (as `PAPER_TEMPERATURES`, `PAPER_EPSILONS`) this prefers
       the lower temperature and then the smaller perturbation.
  Values are compared exactly (no tolerance): FPRs are ratios of integer counts.

  Args:
    fpr_grid: [T, E] FPR at 95% TPR (or any loss to minimise), no NaN.
    tie_break: optional [T, E] secondary loss to minimise among the tied points, no NaN.

  Returns:
    (t_index, e_index) as Python ints.

  Raises:
    ValueError: a grid that is not 2-D, is empty, contains NaN, or shapes that differ.
  """
  fpr = np.asarray(fpr_grid, np.float64)
  if fpr.ndim != 2 or fpr.size == 0:
    raise ValueError(f"fpr_grid must be a non-empty [T, E] grid, got shape {fpr.shape}.")
  if np.isnan(fpr).any():
    raise ValueError("fpr_grid contains NaN.")
  candidates = fpr == fpr.min()  # [T, E]
  if tie_break is not None:
    second = np.asarray(tie_break, np.float64)
    if second.shape != fpr.shape:
      raise ValueError(f"tie_break has shape {second.shape}, fpr_grid {fpr.shape}.")
    if np.isnan(second).any():
      raise ValueError("tie_break contains NaN.")
    candidates &= second == second[candidates].min()
  # argmax of a boolean array is its first True in row-major (C) order.
  t_index, e_index = np.unravel_index(int(np.argmax(candidates)), fpr.shape)
  return int(t_index), int(e_index)


def select_from_scores(grid_in, grid_out, temperatures, epsilons) -> dict[str, Any]:
  """The paper's choice of (T, ε) from held-out score grids: minimum FPR at 95% TPR.

  The score-level half of `tune_on_heldout`, for callers that hold the grids already.

  Args:
    grid_in: [T, E, N] held-out ID scores (`odin_grid`).
    grid_out: [T, E, M] held-out OOD scores.
    temperatures: [T] the grid's temperatures.
    epsilons: [E] the grid's epsilons.

  Returns:
    dict with "temperature", "epsilon" (float, as given), "t_index", "e_index" (int),
    "tune_fpr95" (float), "grid_fpr95" and "grid_detection_error" ([T, E] numpy). Ties in FPR go
    to the lower held-out detection error, then to the first point in row-major order.
  """
  temperatures, epsilons = np.asarray(temperatures, np.float64), np.asarray(epsilons, np.float64)
  grid_in, grid_out = np.asarray(grid_in), np.asarray(grid_out)
  want = (temperatures.shape[0], epsilons.shape[0])
  if grid_in.shape[:2] != want or grid_out.shape[:2] != want:
    raise ValueError(f"score grids must be [T, E, n] with (T, E) = {want}, got {grid_in.shape} "
                     f"and {grid_out.shape}.")
  table = metrics.metrics_grid(grid_in, grid_out)
  grid_fpr = np.asarray(table["fpr95"])
  grid_err = np.asarray(table["detection_error"])
  t_index, e_index = select_from_grid(grid_fpr, tie_break=grid_err)
  return {
      "temperature": float(temperatures[t_index]),
      "epsilon": float(epsilons[e_index]),
      "t_index": t_index,
      "e_index": e_index,
      "tune_fpr95": float(grid_fpr[t_index, e_index]),
      "grid_fpr95": grid_fpr,
      "grid_detection_error": grid_err,
  }


def _as_float_dict(table: dict) -> dict[str, float]:
  return {k: float(v) for k, v in table.items()}


@functools.partial(jax.jit, static_argnames="apply_fn")
def _odin_batch(apply_fn, variables, x, temperature, epsilon, std):
  return odin_score(apply_fn, variables, x, temperature=temperature, epsilon=epsilon, std=std)


def odin_scores(apply_fn: ApplyFn, variables: Any, x, *, temperature: float, epsilon: float, std,
                chunk_size: int = 256) -> np.ndarray:
  """`odin_score` over many images in padded chunks: one compiled program for all (T, ε) values.

  Args:
    apply_fn: the network in inference mode; static for `jit`, so it should hash by value
      (`oodjax.models.inference_apply(model)` or a module-level function).
    variables: the network's variables.
    x: [N, H, W, C] normalised inputs.
    temperature, epsilon: the ODIN hyperparameters (traced).
    std: [C] the per-channel std the inputs were normalised with.
    chunk_size: images per compiled call.

  Returns:
    [N] float32 numpy scores, higher = more OOD.
  """
  return map_padded(
      lambda chunk: _odin_batch(apply_fn, variables, chunk, jnp.float32(temperature),
                                jnp.float32(epsilon), jnp.asarray(std, jnp.float32)),
      np.asarray(x), chunk_size)


def tune_on_heldout(apply_fn: ApplyFn, variables: Any, x_tune_in,
                    x_tune_out: Mapping[str, Any], *, std, temperatures=PAPER_TEMPERATURES,
                    epsilons=PAPER_EPSILONS, chunk_size: int = 256,
                    forward_batch: int | None | str = "auto") -> dict[str, dict[str, Any]]:
  """The paper's (T, ε) for each OOD set, from held-out images: minimum FPR at 95% TPR.

  The held-out ID images' grid is scored once and shared by every OOD set; each set adds the
  grid of its own held-out images. Ties go to the lower held-out detection error, then to the
  first point in row-major order (`select_from_grid`).

  Args:
    apply_fn: `apply_fn(variables, x) -> logits [B, K]`, the network in inference mode.
    variables: the network's variables.
    x_tune_in: [N, H, W, C] held-out normalised ID images.
    x_tune_out: {name: [M, H, W, C]} held-out OOD images of each set, normalised with the ID
      statistics.
    std: [C] the per-channel std the inputs were normalised with.
    temperatures: [T] grid, > 0.
    epsilons: [E] grid, >= 0, in [0, 1]-pixel units.
    chunk_size, forward_batch: passed to `odin_grid`.

  Returns:
    {name: `select_from_scores`'s dict} ("temperature", "epsilon", "t_index", "e_index",
    "tune_fpr95", "grid_fpr95", "grid_detection_error").

  References:
    Liang, Li, Srikant. ODIN. ICLR 2018, section 4.4 ("Choosing parameters").
  """
  check_grid(temperatures, "temperatures", positive=True)
  check_grid(epsilons, "epsilons", positive=False)
  # float64 copies, so the chosen values come back as given (0.0012, not float32's 0.00120000006).
  temperatures, epsilons = np.asarray(temperatures, np.float64), np.asarray(epsilons, np.float64)
  grid = dict(std=std, chunk_size=chunk_size, forward_batch=forward_batch)
  grid_in = odin_grid(apply_fn, variables, x_tune_in, temperatures, epsilons, **grid)
  return {name: select_from_scores(grid_in,
                                   odin_grid(apply_fn, variables, x_out, temperatures, epsilons,
                                             **grid), temperatures, epsilons)
          for name, x_out in x_tune_out.items()}


def tune_without_ood_on_heldout(apply_fn: ApplyFn, variables: Any, x_tune_in, *, std,
                                temperature: float = T1000_TEMPERATURE, epsilons=PAPER_EPSILONS,
                                chunk_size: int = 256,
                                forward_batch: int | None | str = "auto") -> dict[str, Any]:
  """ODIN's ε chosen from held-out in-distribution images alone, as Generalized ODIN does.

  At the fixed `temperature`, ε maximises the mean max-softmax probability S(x̃; T) of the
  perturbed held-out ID images, i.e. minimises their mean ODIN score 1 − S(x̃; T). No OOD image
  is used (the function takes none). Ties go to the smallest ε index.

  Args:
    apply_fn: `apply_fn(variables, x) -> logits [B, K]`, the network in inference mode.
    variables: the network's variables.
    x_tune_in: [N, H, W, C] held-out normalised ID images.
    std: [C] the per-channel std the inputs were normalised with.
    temperature: the fixed T (> 0); Generalized ODIN's ODIN baseline uses 1000.
    epsilons: [E] grid, >= 0, in [0, 1]-pixel units.
    chunk_size, forward_batch: passed to `odin_grid`.

  Returns:
    dict with "temperature", "epsilon" (float), "e_index" (int) and "grid_mean_max_softmax" [E]
    numpy (the mean max-softmax probability of the perturbed held-out ID images per ε).

  References:
    Hsu, Shen, Jin, Kira. Generalized ODIN: detecting out-of-distribution image without learning
    from out-of-distribution data. CVPR 2020: its ε search on in-distribution validation data
    (maximise the mean score of the perturbed images). Only that selection rule is borrowed; the
    perturbation is still ODIN's (eq. 2 of Liang et al.), not G-ODIN's label-free variant.
  """
  check_grid([temperature], "temperature", positive=True)
  check_grid(epsilons, "epsilons", positive=False)
  temperatures = np.asarray([temperature], np.float64)
  epsilons = np.asarray(epsilons, np.float64)
  tune_scores = odin_grid(apply_fn, variables, x_tune_in, temperatures, epsilons, std=std,
                          chunk_size=chunk_size, forward_batch=forward_batch)[0]  # [E, N]
  # Mean in float64: the differences between ε at T = 1000 are ~1e-5 of a score near 1 - 1/K.
  mean_max_softmax = 1.0 - tune_scores.astype(np.float64).mean(axis=-1)  # [E]
  e_index = int(np.argmax(mean_max_softmax))  # the first maximum: the smallest ε on a tie
  return {"temperature": float(temperatures[0]), "epsilon": float(epsilons[e_index]),
          "e_index": e_index, "grid_mean_max_softmax": mean_max_softmax}


def tune_odin(apply_fn: ApplyFn, variables: Any, x_in, x_out, *, std,
              temperatures=PAPER_TEMPERATURES, epsilons=PAPER_EPSILONS,
              holdout: int = PAPER_HOLDOUT, seed: int = 0, chunk_size: int = 256,
              forward_batch: int | None | str = "auto") -> dict[str, Any]:
  """The paper's protocol for one OOD set: tune (T, ε) on held-out images, evaluate on the rest.

  1. `split_holdout` holds out `holdout` images of each set (seeded).
  2. `tune_on_heldout` picks (T, ε) with the minimum held-out FPR at 95% TPR.
  3. `odin_scores` at the choice scores the remaining images; the metrics are computed on them.

  Args:
    apply_fn: `apply_fn(variables, x) -> logits [B, K]`, the network in inference mode.
    variables: the network's variables.
    x_in: [N, H, W, C] normalised in-distribution images (e.g. the ID test set).
    x_out: [M, H, W, C] OOD images, normalised with the ID statistics.
    std: [C] the per-channel std the inputs were normalised with.
    temperatures: [T] grid, > 0.
    epsilons: [E] grid, >= 0, in [0, 1]-pixel units.
    holdout: images held out from each set for tuning.
    seed: seed of the split.
    chunk_size, forward_batch: passed to `odin_grid` (and `chunk_size` to `odin_scores`).

  Returns:
    dict with
      "temperature", "epsilon": the chosen values (float);
      "t_index", "e_index": their grid positions (int);
      "tune_fpr95": held-out FPR at 95% TPR of the choice (float);
      "grid_fpr95", "grid_detection_error": [T, E] numpy, on the held-out images;
      "metrics": {metric: float} of the choice on the evaluation images (`metrics.all_metrics`);
      "scores_in" [N - holdout], "scores_out" [M - holdout]: the evaluation scores (numpy);
      "idx_tune_in", "idx_eval_in", "idx_tune_out", "idx_eval_out": the split (numpy int).

  References:
    Liang, Li, Srikant. ODIN. ICLR 2018, section 4.4 ("Choosing parameters").
  """
  x_in, x_out = np.asarray(x_in), np.asarray(x_out)
  tune_in, eval_in, tune_out, eval_out = split_holdout(len(x_in), len(x_out), holdout, seed)
  choice = tune_on_heldout(apply_fn, variables, x_in[tune_in], {"ood": x_out[tune_out]}, std=std,
                           temperatures=temperatures, epsilons=epsilons, chunk_size=chunk_size,
                           forward_batch=forward_batch)["ood"]
  chosen = dict(temperature=choice["temperature"], epsilon=choice["epsilon"], std=std,
                chunk_size=chunk_size)
  scores_in = odin_scores(apply_fn, variables, x_in[eval_in], **chosen)
  scores_out = odin_scores(apply_fn, variables, x_out[eval_out], **chosen)
  return {
      **choice,
      "metrics": _as_float_dict(metrics.all_metrics(jnp.asarray(scores_in),
                                                    jnp.asarray(scores_out))),
      "scores_in": scores_in,
      "scores_out": scores_out,
      "idx_tune_in": tune_in,
      "idx_eval_in": eval_in,
      "idx_tune_out": tune_out,
      "idx_eval_out": eval_out,
  }


def tune_odin_without_ood(apply_fn: ApplyFn, variables: Any, x_in, *, std,
                          temperature: float = T1000_TEMPERATURE, epsilons=PAPER_EPSILONS,
                          holdout: int = PAPER_HOLDOUT, seed: int = 0, chunk_size: int = 256,
                          forward_batch: int | None | str = "auto") -> dict[str, Any]:
  """`tune_without_ood_on_heldout` on `split_holdout_in`'s held-out ID images, then scoring.

  The held-out ID images are the same as `split_holdout`'s for the same (holdout, seed), so the
  evaluation ID images match `tune_odin`'s. The caller scores OOD sets with `odin_scores` at
  the returned (T, ε) and reports them separately from the OOD-tuned numbers.

  Args:
    apply_fn: `apply_fn(variables, x) -> logits [B, K]`, the network in inference mode.
    variables: the network's variables.
    x_in: [N, H, W, C] normalised in-distribution images.
    std: [C] the per-channel std the inputs were normalised with.
    temperature: the fixed T (> 0).
    epsilons: [E] grid, >= 0, in [0, 1]-pixel units.
    holdout: ID images held out for tuning.
    seed: seed of the split.
    chunk_size, forward_batch: passed to `odin_grid` (and `chunk_size` to `odin_scores`).

  Returns:
    `tune_without_ood_on_heldout`'s dict plus "scores_in" [N - holdout] numpy (ODIN scores of
    the evaluation ID images at the choice), "idx_tune_in", "idx_eval_in".
  """
  x_in = np.asarray(x_in)
  tune_in, eval_in = split_holdout_in(len(x_in), holdout, seed)
  choice = tune_without_ood_on_heldout(apply_fn, variables, x_in[tune_in], std=std,
                                       temperature=temperature, epsilons=epsilons,
                                       chunk_size=chunk_size, forward_batch=forward_batch)
  scores_in = odin_scores(apply_fn, variables, x_in[eval_in], temperature=choice["temperature"],
                          epsilon=choice["epsilon"], std=std, chunk_size=chunk_size)
  return {**choice, "scores_in": scores_in, "idx_tune_in": tune_in, "idx_eval_in": eval_in}
