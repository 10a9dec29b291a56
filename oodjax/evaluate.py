"""Scoring datasets with detectors and turning scores into OOD results: JSON, Markdown, PNGs.

`evaluate_ood` runs a list of detectors on the in-distribution test set against each OOD set.
With `holdout` set, every OOD set is split as in the ODIN paper's protocol (`tuning.split_holdout`:
`holdout` images of each set are held out for tuning) and EVERY detector is reported on the same
remaining images, so tuned and untuned detectors are compared on equal terms. ODIN is tuned on
the held-out part with OOD data (the paper's protocol) and, separately labelled, without any.
"""
from __future__ import annotations

import functools
import pathlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from oodjax import io
from oodjax import metrics
from oodjax.data.core import ImageDataset, normalize

METRIC_COLUMNS = (("fpr95", "FPR@95TPR ↓"), ("detection_error", "Det. err ↓"),
                  ("auroc", "AUROC ↑"), ("aupr_in", "AUPR-in ↑"), ("aupr_out", "AUPR-out ↑"))
ODIN = "odin"                # tuned on held-out OOD images: the paper's protocol
ODIN_NO_OOD = "odin_no_ood"  # tuned on held-out ID images alone
LABELS = {"msp": "Baseline (MSP)", "max_logit": "Max logit", "energy": "Energy",
          "t1000": "T1000", ODIN: "ODIN (tuned on OOD)", ODIN_NO_OOD: "ODIN (tuned without OOD)",
          "1c_sum": "1C-Sum", "supervised": "Supervised (upper bound)",
          "odin_sf": "ODIN (T=1000, ε=8e-4)"}
INDICATOR_PREFIX = "ind:"  # rows of single sample-free indicators, e.g. "ind:DMS"


def map_batches(fn: Callable[[jax.Array], Any], dataset: ImageDataset, batch_size: int) -> Any:
  """Applies a jitted `fn(x [B, H, W, C]) -> pytree of [B, ...]` over a dataset in batches.

  The last batch is padded to `batch_size` so `fn` compiles once; padding is cut off again.
  Returns the per-example outputs concatenated on the host as numpy arrays.
  """
  n = len(dataset)
  outputs = []
  for start in range(0, n, batch_size):
    images = dataset.images[start:start + batch_size]
    valid = images.shape[0]
    if valid < batch_size:
      images = np.concatenate([images, np.repeat(images[-1:], batch_size - valid, 0)])
    out = fn(normalize(images, dataset.mean, dataset.std))
    outputs.append(jax.tree.map(lambda a, v=valid: np.asarray(a)[:v], out))
  return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


def score_dataset(detector: Callable, apply_fn: Callable, variables: Any,
                  dataset: ImageDataset, batch_size: int = 500, **hyper) -> np.ndarray:
  """Scores every image of `dataset` with `detector(apply_fn, variables, x, **hyper)`.

  `detector`, `apply_fn` and the `hyper` values are static (hashable: pass `std` as a tuple);
  calls with the same ones reuse one compiled program.

  Returns:
    [N] float32 scores, higher = more out-of-distribution.
  """
  static = tuple(sorted(hyper.items()))
  return map_batches(lambda x: _score_batch(variables, x, detector=detector, apply_fn=apply_fn,
                                            hyper=static), dataset, batch_size)


# Module-level jits with the detector, network and hyperparameters static: scoring the ID set
# and every OOD set with the same detector reuses one compiled program instead of compiling a
# fresh jit wrapper per dataset.
@functools.partial(jax.jit, static_argnames=("detector", "apply_fn", "hyper"))
def _score_batch(variables, x, *, detector, apply_fn, hyper):
  return detector(apply_fn, variables, x, **dict(hyper))


@functools.partial(jax.jit, static_argnames=("model", "which"))
def _indicator_batch(variables, x, *, model, which):
  from oodjax.detectors import whitebox
  return whitebox.indicators(model, variables, x, which=which)


def accuracy(apply_fn: Callable, variables: Any, dataset: ImageDataset,
             batch_size: int = 500) -> float:
  """Top-1 accuracy of the network on a labelled dataset."""
  fn = jax.jit(lambda v, x: jnp.argmax(apply_fn(v, x), axis=-1))
  predictions = map_batches(lambda x: fn(variables, x), dataset, batch_size)
  return float(np.mean(predictions == dataset.labels))


def indicator_scores(model, variables: Any, dataset: ImageDataset, batch_size: int = 500,
                     which: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """Sample-free indicators of every image, from one forward pass per batch.

  Returns:
    {indicator: [N] float32}, higher = more OOD (`oodjax.detectors.whitebox.indicators`).
  """
  which = None if which is None else tuple(which)
  return map_batches(lambda x: _indicator_batch(variables, x, model=model, which=which),
                     dataset, batch_size)


_all_metrics_jit = jax.jit(metrics.all_metrics)


def metric_row(scores_in: np.ndarray, scores_out: np.ndarray) -> dict[str, float]:
  """All metrics of one detector on one (ID, OOD) pair, as Python floats."""
  metrics.check_scores(jnp.asarray(scores_in), "scores_in")
  metrics.check_scores(jnp.asarray(scores_out), "scores_out")
  # One compiled program per shape, instead of one per operation as an eager call compiles.
  return {k: float(v) for k, v in _all_metrics_jit(scores_in, scores_out).items()}


def evaluate_ood(apply_fn: Callable, variables: Any, id_test: ImageDataset,
                 ood_sets: Mapping[str, ImageDataset], detectors: Mapping[str, Callable],
                 batch_size: int = 500, *, odin: Mapping[str, Any] | None = None,
                 holdout: int | None = None, seed: int = 0, progress: bool = False,
                 model=None, sample_free: Mapping[str, Any] | None = None
                 ) -> tuple[dict, dict]:
  """Scores the ID test set and each OOD set with each detector.

  OOD sets are normalised with the in-distribution statistics, as the model saw its training
  data.

  Args:
    apply_fn: `apply_fn(variables, x) -> logits [B, K]`, the network in inference mode.
    variables: the network's variables.
    id_test: the in-distribution test set (labelled: accuracy is reported too).
    ood_sets: name -> OOD set with the same image shape.
    detectors: name -> `score(apply_fn, variables, x) -> [B]` for untuned detectors.
    batch_size: images per compiled call.
    odin: None, or the ODIN options {"temperatures", "epsilons", "no_ood_temperature",
      "tuned_on_ood" (bool), "tuned_without_ood" (bool), "chunk_size"}; needs `holdout`.
    holdout: images of each set held out for tuning (None: no split, every image is scored).
    seed: seed of the split.
    progress: show a progress bar.
    model: the Linen model `apply_fn` runs; needed for the sample-free indicators.
    sample_free: None, or the sample-free options {"indicators": bool (a row per indicator,
      named "ind:<NAME>"), "one_c_sum": bool, "supervised": bool (the paper's linear upper
      bound, fitted on half of each evaluation set), "odin": bool (ODIN at the paper's fixed
      T = 1000, ε = 8e-4), "noise_stats": the 1C-Sum noise statistics
      (`onecsum.fit_noise_stats`)}.

  Returns:
    (results, scores). results is JSON-able: {"accuracy", "num_in", "ood_sizes", "protocol",
    "detectors": {detector: {ood_set: {metric: value, and "temperature"/"epsilon" for ODIN}}},
    "odin_grid": {ood_set: {"temperatures", "epsilons", "fpr95" [T][E]}}}; scores maps
    ood_set -> detector -> (scores_in, scores_out) on the evaluation images, for plots.
  """
  for name, ds in ood_sets.items():
    if ds.image_shape != id_test.image_shape:
      raise ValueError(f"OOD set {name} has images of shape {ds.image_shape}, the "
                       f"in-distribution test set {id_test.image_shape}")
  if odin is not None and holdout is None:
    raise ValueError("ODIN is tuned on held-out images: set a holdout")
  ood_sets = {name: ds.with_stats(id_test.mean, id_test.std) for name, ds in ood_sets.items()}
  from oodjax import tuning  # the ODIN machinery, only needed here

  n_steps = len(detectors) * (1 + len(ood_sets))
  if sample_free is not None:
    if model is None:
      raise ValueError("the sample-free indicators need the model: pass model=")
    n_steps += 1 + len(ood_sets)
  if odin is not None:
    n_steps += len(ood_sets) * (bool(odin.get("tuned_on_ood", True)) +
                                bool(odin.get("tuned_without_ood", True)))
  bar = tqdm.tqdm(total=n_steps, disable=not progress, unit="step", dynamic_ncols=True)
  results = {"accuracy": accuracy(apply_fn, variables, id_test, batch_size),
             "num_in": len(id_test), "ood_order": list(ood_sets),
             "ood_sizes": {name: len(ds) for name, ds in ood_sets.items()},
             "protocol": {"holdout": holdout, "seed": seed},
             "detectors": {}, "odin_grid": {}}
  scores: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {name: {} for name in ood_sets}
  n_in = len(id_test)
  splits = {name: (tuning.split_holdout(n_in, len(ds), holdout, seed) if holdout is not None
                   else (None, np.arange(n_in), None, np.arange(len(ds))))
            for name, ds in ood_sets.items()}

  for det_name, detector in detectors.items():
    bar.set_description(f"{det_name} on in-distribution")
    all_in = score_dataset(detector, apply_fn, variables, id_test, batch_size)
    bar.update(1)
    table = results["detectors"][det_name] = {}
    for name, ds in ood_sets.items():
      bar.set_description(f"{det_name} on {name}")
      _, eval_in, _, eval_out = splits[name]
      s_in = all_in[eval_in]
      s_out = score_dataset(detector, apply_fn, variables, ds, batch_size)[eval_out]
      table[name] = metric_row(s_in, s_out)
      scores[name][det_name] = (s_in, s_out)
      bar.update(1)

  if sample_free is not None:
    _sample_free_rows(results, scores, model, variables, id_test, ood_sets, splits, sample_free,
                      batch_size, seed, bar)

  if odin is not None:
    x_in = normalize(id_test.images, id_test.mean, id_test.std)
    grid_args = dict(std=id_test.std, holdout=holdout, seed=seed,
                     chunk_size=int(odin.get("chunk_size", 250)))
    if odin.get("tuned_on_ood", True):
      _odin_tuned_on_ood(results, scores, apply_fn, variables, x_in, ood_sets, splits, odin,
                         id_test.std, bar)
    if odin.get("tuned_without_ood", True):
      bar.set_description("ODIN tuned without OOD")
      tuned = tuning.tune_odin_without_ood(
          apply_fn, variables, x_in, temperature=float(odin["no_ood_temperature"]),
          epsilons=odin["epsilons"], **grid_args)
      from oodjax.detectors import odin as odin_score
      table = results["detectors"][ODIN_NO_OOD] = {}
      hyper = dict(temperature=tuned["temperature"], epsilon=tuned["epsilon"],
                   std=tuple(id_test.std))
      for name, ds in ood_sets.items():
        eval_out = splits[name][3]
        s_in = tuned["scores_in"]  # the same evaluation ID images as every other row
        s_out = score_dataset(odin_score, apply_fn, variables, ds.take(eval_out), batch_size,
                              **hyper)
        table[name] = {**metric_row(s_in, s_out), "temperature": tuned["temperature"],
                       "epsilon": tuned["epsilon"]}
        scores[name][ODIN_NO_OOD] = (s_in, s_out)
        bar.update(1)
  bar.close()
  return results, scores


def _odin_tuned_on_ood(results, scores, apply_fn, variables, x_in, ood_sets, splits, odin, std,
                       bar) -> None:
  """ODIN rows tuned with the paper's protocol (as `tuning.tune_odin`, sharing work across sets).

  The held-out ID images are the same for every OOD set (`tuning.split_holdout`'s ID split
  depends only on the ID size, holdout and seed), so their [T, E] grid is scored once; each OOD
  set adds the grid of its own held-out images and one (T, ε) on its evaluation images.
  """
  from oodjax import sweep, tuning
  temperatures = np.asarray(odin["temperatures"], np.float64)
  epsilons = np.asarray(odin["epsilons"], np.float64)
  grid_args = dict(std=std, chunk_size=int(odin.get("chunk_size", 250)))
  tune_in, eval_in = next(iter(splits.values()))[:2]
  bar.set_description("ODIN grid on held-out in-distribution")
  grid_in = sweep.odin_grid(apply_fn, variables, x_in[tune_in], temperatures, epsilons,
                            **grid_args)  # [T, E, holdout]
  eval_in_scores = {}  # (t, e) -> ODIN scores of the evaluation ID images
  table = results["detectors"][ODIN] = {}
  for name, ds in ood_sets.items():
    bar.set_description(f"ODIN grid on {name}")
    _, _, tune_out, eval_out = splits[name]
    x_out = normalize(ds.images, ds.mean, ds.std)
    grid_out = sweep.odin_grid(apply_fn, variables, x_out[tune_out], temperatures, epsilons,
                               **grid_args)
    chosen = tuning.select_from_scores(grid_in, grid_out, temperatures, epsilons)
    t, e = chosen["t_index"], chosen["e_index"]
    one_t, one_e = temperatures[t:t + 1], epsilons[e:e + 1]
    if (t, e) not in eval_in_scores:
      eval_in_scores[t, e] = sweep.odin_grid(apply_fn, variables, x_in[eval_in], one_t, one_e,
                                             **grid_args)[0, 0]
    s_in = eval_in_scores[t, e]
    s_out = sweep.odin_grid(apply_fn, variables, x_out[eval_out], one_t, one_e,
                            **grid_args)[0, 0]
    table[name] = {**metric_row(s_in, s_out), "temperature": chosen["temperature"],
                   "epsilon": chosen["epsilon"], "tune_fpr95": chosen["tune_fpr95"]}
    results["odin_grid"][name] = {"temperatures": temperatures.tolist(),
                                  "epsilons": epsilons.tolist(),
                                  "fpr95": np.asarray(chosen["grid_fpr95"]).tolist(),
                                  "chosen": [t, e]}
    scores[name][ODIN] = (s_in, s_out)
    bar.update(1)


def _sample_free_rows(results, scores, model, variables, id_test, ood_sets, splits, options,
                      batch_size, seed, bar) -> None:
  """Adds the sample-free rows (single indicators, 1C-Sum, supervised bound) to the results."""
  from oodjax.detectors import onecsum
  from oodjax.detectors import odin as odin_score
  from oodjax.detectors import whitebox
  bar.set_description("indicators on in-distribution")
  ind_in = indicator_scores(model, variables, id_test, batch_size)
  names = list(ind_in)
  bar.update(1)
  stats = options.get("noise_stats")
  one_c = jax.jit(lambda s: onecsum.one_c_sum(s, stats))
  odin_hyper = dict(temperature=whitebox.T1000_TEMPERATURE, epsilon=whitebox.ODIN_EPSILON,
                    std=tuple(id_test.std))
  apply_fn = functools.partial(model.apply, train=False)  # one object: one compiled program
  odin_in = (score_dataset(odin_score, apply_fn, variables, id_test,
                           batch_size, **odin_hyper) if options.get("odin") else None)
  for name, ds in ood_sets.items():
    bar.set_description(f"indicators on {name}")
    _, eval_in, _, eval_out = splits[name]
    ind_out = indicator_scores(model, variables, ds, batch_size)
    rows = {}
    if options.get("indicators", True):
      for ind in names:
        rows[INDICATOR_PREFIX + ind] = (ind_in[ind][eval_in], ind_out[ind][eval_out])
    if options.get("odin"):
      rows["odin_sf"] = (odin_in[eval_in], score_dataset(
          odin_score, apply_fn, variables, ds.take(eval_out), batch_size, **odin_hyper))
    if options.get("one_c_sum", True):
      if stats is None:
        raise ValueError("1C-Sum needs noise statistics: sample_free['noise_stats']")
      rows["1c_sum"] = (np.asarray(one_c({k: ind_in[k][eval_in] for k in names})),
                        np.asarray(one_c({k: ind_out[k][eval_out] for k in names})))
    for row, (s_in, s_out) in rows.items():
      results["detectors"].setdefault(row, {})[name] = metric_row(s_in, s_out)
      scores[name][row] = (s_in, s_out)
    if options.get("supervised"):
      results["detectors"].setdefault("supervised", {})[name] = onecsum.supervised_upper_bound(
          {k: ind_in[k][eval_in] for k in names}, {k: ind_out[k][eval_out] for k in names},
          seed=seed)
    bar.update(1)


def _row_order(det_name: str) -> tuple[int, str]:
  """Report rows: baselines, ODIN variants, single indicators, then 1C-Sum and the bound."""
  order = ("msp", "max_logit", "energy", "t1000", "odin_sf", ODIN, ODIN_NO_OOD)
  if det_name in order:
    return order.index(det_name), ""
  if det_name.startswith(INDICATOR_PREFIX):
    return len(order), det_name
  return len(order) + 1 + ("1c_sum", "supervised").index(det_name) \
      if det_name in ("1c_sum", "supervised") else len(order) + 3, det_name


def _fmt_hyper(row: Mapping[str, float], key: str) -> str:
  return f"{row[key]:g}" if key in row else "–"


def markdown_report(results: dict, title: str = "OOD detection", level: int = 2) -> str:
  """Renders `evaluate_ood` results as Markdown: one table per OOD set, a row per detector."""
  hashes = "#" * level
  holdout = results.get("protocol", {}).get("holdout")
  split = (f" Each set's {holdout} held-out tuning images are excluded from every row."
           if holdout else "")
  lines = [f"{hashes} {title}", "",
           f"In-distribution test accuracy: {100 * results['accuracy']:.2f}% on "
           f"{results['num_in']} images. Metrics in %; in-distribution is the positive class; "
           f"scores are higher for more OOD inputs.{split}", ""]
  ood_names = results.get("ood_order", list(results["ood_sizes"]))
  header = ("| detector | " + " | ".join(label for _, label in METRIC_COLUMNS) + " | T | ε |")
  for ood in ood_names:
    lines += [f"{hashes}# {ood} ({results['ood_sizes'][ood]} images)", "", header,
              "|---" * (len(METRIC_COLUMNS) + 3) + "|"]
    for det_name in sorted(results["detectors"], key=_row_order):
      row = results["detectors"][det_name][ood]
      cells = " | ".join(f"{100 * row[key]:.2f}" for key, _ in METRIC_COLUMNS)
      lines.append(f"| {LABELS.get(det_name, det_name)} | {cells} | "
                   f"{_fmt_hyper(row, 'temperature')} | {_fmt_hyper(row, 'epsilon')} |")
    lines.append("")
  return "\n".join(lines)


def _slug(name: str) -> str:
  return name.replace("/", "_").replace(":", "_")


def write_results(results: dict, workdir: str | pathlib.Path, title: str = "OOD detection",
                  scores: Mapping[str, Mapping[str, tuple]] | None = None) -> str:
  """Writes results.json, results.md and (given scores) PNG plots to `workdir` atomically.

  Plots: `plots/roc_<set>.png` (ROC of every detector), `plots/hist_<set>.png` (ID vs OOD score
  histograms), `plots/odin_fpr95_<set>.png` (FPR@95 over the ODIN grid, the choice marked).
  Returns the Markdown.
  """
  from oodjax import plots
  workdir = pathlib.Path(workdir)
  report = markdown_report(results, title)
  if scores:
    plot_dir = workdir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    for ood, per_det in scores.items():
      curves = {LABELS.get(d, d): s for d, s in per_det.items()}
      with io.atomic_path(plot_dir / f"roc_{_slug(ood)}.png") as tmp:
        plots.plot_roc(curves, tmp, f"ROC: {ood}")
      with io.atomic_path(plot_dir / f"hist_{_slug(ood)}.png") as tmp:
        plots.plot_histograms(curves, tmp, f"Scores: {ood}")
    for ood, grid in results.get("odin_grid", {}).items():
      with io.atomic_path(plot_dir / f"odin_fpr95_{_slug(ood)}.png") as tmp:
        plots.plot_grid_heatmap(np.asarray(grid["fpr95"]), grid["temperatures"],
                                grid["epsilons"], tmp, f"ODIN held-out FPR@95: {ood}",
                                chosen=tuple(grid["chosen"]))
  io.atomic_write_json(workdir / "results.json", results)
  io.atomic_write_text(workdir / "results.md", report)
  return report
