"""Evaluation: fit the registry's detectors, score every dataset, return the rows of a report.

    results, scores = evaluate_ood(model, variables, id_test, ood_sets, ["msp", "1c_sum"])
    results = run_evaluation(config, workdir, model, variables)  # what `oodjax evaluate` runs

The protocol, in order:

1. Splits. With `holdout` set, `holdout` images of the ID test set and of each OOD set are held
   out (`oodjax.detectors.odin.tuning.split_holdout`, the ODIN paper's protocol; the ID split
   depends only on the ID size, holdout and seed, so it is shared by every OOD set) and EVERY
   row is reported on the remaining images, tuned or not. Without a holdout every image is
   scored; a detector that needs held-out data is then fitted on a random half of each set and
   reported on the other half if its entry allows it (the sample-free paper's supervised
   protocol), and is an error otherwise.
2. Fits. Each entry's `fit` gets a `FitData` holding only what its `sees` declares. Fitted
   states of the entries that see data are saved under `state_dir` as JSON with a record of
   what they were fitted on (the weights' hash, the options, the data), and reused while that
   record matches exactly; anything else is refitted and overwritten.
3. Scores. Every requested entry is scored by ONE compiled program per (model, batch shape)
   and group: `_score_rows`, jitted with the model and the score functions static and the
   states traced. One program serves the ID set and every OOD set, and every hyperparameter
   value. Entries fitted per OOD set form a second group (their state changes with the set,
   so they re-score the ID images per set). XLA merges the forward passes the rows share.
4. Rows. `metrics.all_metrics` of each row on each OOD set, with the fit's info (ODIN's T, ε).

`oodjax.report` renders the results (Markdown, plots, JSON) and imports no JAX.
"""
from __future__ import annotations

import functools
import hashlib
import json
import pathlib
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from oodjax import fileio, metrics
from oodjax.batching import map_padded
from oodjax.data.core import ImageDataset, normalize
from oodjax.detectors.odin.tuning import split_holdout
from oodjax.detectors.protocol import (HELDOUT_ID, HELDOUT_OOD, ID_TRAIN, Detector, FitData,
                                       SEES)
from oodjax.detectors.registry import REGISTRY
from oodjax.detectors.sample_free.supervised import paper_halves
from oodjax.models.insides import inference_apply

_STATE_FORMAT = "oodjax-detector-state"
# Bumped whenever a fitted state's meaning changes, so an old file is refitted, not reused:
# 2 = issue 8 redefined DMS/DMS-AOS/DSS/DSS-EXT and ANG+, which 1C-Sum's noise statistics and
# the supervised bound's coefficients are fitted on; 3 = issue 9 made the pooled maps VMDLS's
# ensemble members for max-pooling networks (same dimensions, other features) and changed its
# autoencoder.
_STATE_VERSION = 3


# --- Compiled pieces: keyed on the (hashable) model and score functions, never on closures --


@functools.partial(jax.jit, static_argnames=("model", "score_fns", "classify_fns"))
def _score_rows(variables, states, x, *, model, score_fns, classify_fns=()):
  """{entry: [B] or {row: [B]}} of every entry in `score_fns` ((name, score), ...) on x, and,
  when `classify_fns` is given, {entry: [B] int} its open-set classes from the same program
  (`_classes`), so the forward passes are shared."""
  scores = {name: score(model, variables, states[name], x) for name, score in score_fns}
  return scores, _classes(variables, states, x, model=model, classify_fns=classify_fns)


@functools.partial(jax.jit, static_argnames="model")
def _predict(variables, x, *, model):
  return jnp.argmax(inference_apply(model)(variables, x), axis=-1)


def _classes(variables, states, x, *, model, classify_fns):
  """{entry: [B] int} the class each entry gives x in open-set recognition (`Detector.classify`;
  None: the argmax of the model's output, computed once for all such entries)."""
  argmax = None
  out = {}
  for name, classify in classify_fns:
    if classify is None:
      if argmax is None:
        argmax = jnp.argmax(inference_apply(model)(variables, x), axis=-1)
      out[name] = argmax
    else:
      out[name] = classify(model, variables, states[name], x)
  return out


_all_metrics_jit = jax.jit(metrics.all_metrics)
# Open-set recognition (VMDLS, Sec. 4): the threshold accepts this fraction of the ID training
# images, as the paper's F1 numbers do.
OPEN_SET_TPR = 0.95


def images_map(fn: Callable[[jax.Array], Any], dataset: ImageDataset, batch_size: int) -> Any:
  """`fn(x)` over a dataset's images normalised with its statistics, in padded batches."""
  return map_padded(lambda images: fn(normalize(images, dataset.mean, dataset.std)),
                    dataset.images, batch_size)


def accuracy(model, variables: Any, dataset: ImageDataset, batch_size: int = 500) -> float:
  """Top-1 accuracy of the network on a labelled dataset."""
  predictions = images_map(lambda x: _predict(variables, x, model=model), dataset, batch_size)
  return float(np.mean(predictions == dataset.labels))


def metric_row(scores_in: np.ndarray, scores_out: np.ndarray) -> dict[str, float]:
  """All metrics of one detector on one (ID, OOD) pair, as Python floats."""
  metrics.check_scores(jnp.asarray(scores_in), "scores_in")
  metrics.check_scores(jnp.asarray(scores_out), "scores_out")
  return {k: float(v) for k, v in _all_metrics_jit(scores_in, scores_out).items()}


def score_dataset(model, variables: Any, entries: Mapping[str, Detector],
                  states: Mapping[str, Any], dataset: ImageDataset,
                  batch_size: int = 500, *, with_classes: bool = False
                  ) -> dict[str, np.ndarray]:
  """Scores every image of `dataset` with every entry, in one compiled program.

  Args:
    model: the Flax Linen classifier.
    variables: its variables.
    entries: name -> `Detector`.
    states: name -> that entry's fitted state (for a per-OOD-set entry, the state of one set).
    dataset: the images, normalised with the statistics it carries.
    batch_size: images per compiled call (the last batch is padded).

  Returns:
    {row: [N] float32 numpy}, higher = more OOD; an entry whose score returns a dict gives one
    row per key, named `row_prefix + key`. With `with_classes`, (rows, {entry: [N] int}) with
    each entry's open-set classes (`Detector.classify`), computed in the same program.
  """
  score_fns = tuple((name, entry.score) for name, entry in entries.items())
  classify_fns = (tuple((name, entry.classify) for name, entry in entries.items())
                  if with_classes else ())
  states = {name: states[name] for name in entries}
  out, classes = images_map(
      lambda x: _score_rows(variables, states, x, model=model, score_fns=score_fns,
                            classify_fns=classify_fns), dataset, batch_size)
  rows = {}
  for name, entry in entries.items():
    if isinstance(out[name], dict):
      rows.update({f"{entry.row_prefix or name + ':'}{k}": v for k, v in out[name].items()})
    else:
      rows[name] = out[name]
  return (rows, classes) if with_classes else rows


def open_set_f1(scores_in: np.ndarray, classes_in: np.ndarray, labels_in: np.ndarray,
                scores_out: np.ndarray, classes_out: np.ndarray, threshold: float,
                num_classes: int) -> float:
  """Macro-F1 over K + 1 classes of ID images (their labels) and OOD images (label K) when an
  image scoring <= threshold is given its class and any other is "unknown"."""
  scores = np.concatenate([scores_in, scores_out])
  classes = np.concatenate([classes_in, classes_out])
  labels = np.concatenate([labels_in, np.full(len(scores_out), num_classes)])
  predictions = metrics.open_set_predictions(scores, classes, threshold, num_classes)
  return float(metrics.open_set_f1(labels, predictions, num_classes))


# --- Fitted states on disk -----------------------------------------------------------------


def weights_fingerprint(variables: Any) -> str:
  """SHA-256 of every leaf of `variables` (bytes and shapes): which weights a state belongs to."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
    leaf = np.asarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}{leaf.dtype}{leaf.shape}".encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def _to_json(tree) -> Any:
  if isinstance(tree, Mapping):
    return {str(k): _to_json(v) for k, v in tree.items()}
  array = np.asarray(tree)
  return {"dtype": str(array.dtype), "shape": list(array.shape), "data": array.ravel().tolist()}


def _from_json(tree) -> Any:
  if set(tree) == {"dtype", "shape", "data"}:
    return np.asarray(tree["data"], tree["dtype"]).reshape(tree["shape"])
  return {k: _from_json(v) for k, v in tree.items()}


def save_state(path: str | pathlib.Path, state: Any, info: Mapping, fitted_on: Mapping) -> None:
  """Writes a fitted state (a pytree of dicts and arrays) and what it was fitted on, atomically."""
  fileio.atomic_write_json(path, {"format": _STATE_FORMAT, "version": _STATE_VERSION,
                                  "fitted_on": fitted_on, "info": info,
                                  "state": _to_json(state)})


def load_state(path: str | pathlib.Path, fitted_on: Mapping) -> tuple[Any, dict] | None:
  """(state, info) from `save_state`'s file if it was fitted on exactly `fitted_on`, else None."""
  path = pathlib.Path(path)
  if not path.is_file():
    return None
  try:
    payload = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    return None  # an unreadable file is refitted and overwritten
  if (payload.get("format") != _STATE_FORMAT or payload.get("version") != _STATE_VERSION
      or payload.get("fitted_on") != json.loads(json.dumps(fitted_on))):
    return None
  return _from_json(payload["state"]), payload["info"]


# --- The protocol -------------------------------------------------------------------------


def _held_out_indices(n_in: int, ood_sizes: Mapping[str, int], holdout: int | None, seed: int,
                      halves: bool) -> dict[str, tuple[np.ndarray, ...]]:
  """{ood_set: (fit_in, eval_in, fit_out, eval_out)} for one kind of split."""
  if halves:
    return {name: paper_halves(n_in, n, seed) for name, n in ood_sizes.items()}
  return {name: split_holdout(n_in, n, holdout, seed) for name, n in ood_sizes.items()}


def check_plan(detectors: Sequence[str], registry: Mapping[str, Detector],
               holdout: int | None) -> dict[str, Detector]:
  """The entries of `detectors` in registry (report) order, checked before any computation.

  Raises:
    ValueError: an unknown name, or a detector fitted on held-out images with no holdout.
  """
  unknown = [name for name in detectors if name not in registry]
  if unknown:
    raise ValueError(f"unknown detectors {unknown}; known: {list(registry)}")
  entries = {name: registry[name] for name in registry if name in detectors}
  for name, entry in entries.items():
    if entry.sees_heldout and holdout is None and not entry.halves_without_holdout:
      raise ValueError(f"{name} is fitted on held-out images: set eval.holdout")
  return entries


def _fit_data(entry: Detector, id_test: ImageDataset, ood_sets: Mapping[str, ImageDataset],
              fit_in, fit_out, id_train, seed: int, batch_size: int,
              workdir: str | None = None) -> FitData:
  """The `FitData` of one entry: the normalisation always, data only where `sees` says so."""
  data = {}
  if HELDOUT_ID in entry.sees:
    data["heldout_id"] = normalize(id_test.images[fit_in], id_test.mean, id_test.std)
  if HELDOUT_OOD in entry.sees:
    data["heldout_ood"] = {n: normalize(ds.images[fit_out[n]], ds.mean, ds.std)
                           for n, ds in ood_sets.items()}
  if ID_TRAIN in entry.sees:
    data["id_train"] = id_train
  return FitData(image_shape=id_test.image_shape, mean=tuple(id_test.mean),
                 std=tuple(id_test.std), seed=seed, batch_size=batch_size, workdir=workdir,
                 **data)


def evaluate_ood(model, variables: Any, id_test: ImageDataset,
                 ood_sets: Mapping[str, ImageDataset], detectors: Sequence[str], *,
                 registry: Mapping[str, Detector] | None = None,
                 options: Mapping[str, Mapping[str, Any]] | None = None,
                 holdout: int | None = None, seed: int = 0, batch_size: int = 500,
                 id_train: ImageDataset | None = None, state_dir: str | pathlib.Path | None = None,
                 progress: bool = False, classifier: bool = True,
                 open_set_train_size: int | None = None) -> tuple[dict, dict]:
  """Fits and scores `detectors` on the ID test set against each OOD set.

  OOD sets are normalised with the in-distribution statistics, as the model saw its training
  data. See the module docstring for the protocol.

  Args:
    model: the Flax Linen classifier (`model.apply(variables, x, train=False) -> [B, K]`).
    variables: its variables.
    id_test: the in-distribution test set (labelled: accuracy is reported too).
    ood_sets: name -> OOD set with the same image shape.
    detectors: registry names, e.g. ("msp", "odin_tuned_on_ood", "1c_sum").
    registry: name -> `Detector`; default `oodjax.detectors.REGISTRY`.
    options: section name -> options (`config.eval`'s sections, e.g. {"odin": {...}}); each
      entry reads its own section over its defaults.
    holdout: images of each set held out for fitting (None: every image is scored).
    seed: seed of the splits.
    batch_size: images per compiled call.
    id_train: the ID training set, for entries that see it.
    state_dir: folder for fitted states (None: nothing saved, everything fitted).
    progress: show a progress bar.
    classifier: the model is a classifier (its argmax is a class): its accuracy is reported.
      False for an encoder (VMDLS): "accuracy" is None.
    open_set_train_size: when given (and `id_train` is), every row fitted without OOD data
      also gets "open_set_f1" per OOD set: its threshold accepts `OPEN_SET_TPR` of the first
      `open_set_train_size` ID training images (0: all), and the macro-F1 over the K known
      classes and "unknown" of the evaluation images is reported (VMDLS, Sec. 4). Rows fitted
      per OOD set have none (their threshold would depend on the OOD set).

  Returns:
    (results, scores). results is JSON-able: {"accuracy", "num_in", "ood_order", "ood_sizes",
    "protocol", "rows" (in report order), "labels", "sees" (row -> what its fit saw),
    "detectors": {row: {ood_set: {metric: value, plus the fit's T and ε}}}, "fit_info":
    {entry: the fit's info, {ood_set: info} for per-set entries}}; scores maps
    ood_set -> row -> (scores_in, scores_out) on the evaluation images, for plots.

  Raises:
    ValueError: an unknown detector, mismatched image shapes, a detector that needs a holdout
      without one, or data a detector sees that was not given.
  """
  registry = REGISTRY if registry is None else registry
  options = options or {}
  entries = check_plan(detectors, registry, holdout)
  for name, ds in ood_sets.items():
    if ds.image_shape != id_test.image_shape:
      raise ValueError(f"OOD set {name} has images of shape {ds.image_shape}, the "
                       f"in-distribution test set {id_test.image_shape}")
  for name, entry in entries.items():
    if ID_TRAIN in entry.sees and id_train is None:
      raise ValueError(f"{name} is fitted on the in-distribution training set: pass id_train")
  if open_set_train_size is not None and (id_train is None or id_train.labels is None
                                          or id_test.labels is None):
    raise ValueError("open-set F1 needs labelled id_train (for the threshold) and id_test")
  ood_sets = {name: ds.with_stats(id_test.mean, id_test.std) for name, ds in ood_sets.items()}
  n_in, ood_sizes = len(id_test), {name: len(ds) for name, ds in ood_sets.items()}

  # (eval_in [per OOD set], eval_out, fit_in, fit_out): every image, or the one held-out split
  # (a holdout, or the paper's halves for entries that allow them) shared by all entries.
  held_out = None  # the one held-out split, computed when some entry needs it
  splits = {}
  for name, entry in entries.items():
    if entry.sees_heldout or holdout is not None:
      if held_out is None:
        parts = _held_out_indices(n_in, ood_sizes, holdout, seed, halves=holdout is None)
        held_out = ({n: p[1] for n, p in parts.items()}, {n: p[3] for n, p in parts.items()},
                    next(iter(parts.values()))[0], {n: p[2] for n, p in parts.items()})
      splits[name] = held_out
    else:
      splits[name] = ({n: np.arange(n_in) for n in ood_sets},
                      {n: np.arange(size) for n, size in ood_sizes.items()}, None, None)
  bar = tqdm.tqdm(total=len(entries) + 2 + 2 * len(ood_sets), disable=not progress, unit="step",
                  dynamic_ncols=True)
  fingerprint = weights_fingerprint(variables) if state_dir is not None else None

  states, infos = {}, {}
  for name, entry in entries.items():
    bar.set_description(f"fitting {name}")
    _, _, fit_in, fit_out = splits[name]
    fit_data = _fit_data(entry, id_test, ood_sets, fit_in, fit_out, id_train, seed, batch_size,
                         workdir=str(pathlib.Path(state_dir) / name) if state_dir else None)
    entry_options = {**entry.defaults, **options.get(entry.options, {})} if entry.options \
        else dict(entry.defaults)
    fitted_on = {
        "detector": name, "sees": sorted(entry.sees), "weights_sha256": fingerprint,
        "options": _jsonable(entry_options), "image_shape": list(id_test.image_shape),
        "mean": list(id_test.mean), "std": list(id_test.std), "batch_size": batch_size,
        "id_test": {"name": id_test.name, "size": n_in} if entry.sees_heldout else None,
        "id_train": ({"name": id_train.name, "size": len(id_train)}
                     if ID_TRAIN in entry.sees else None),
        "split": {"holdout": holdout, "seed": seed} if entry.sees_heldout else None,
        "ood_sets": ({n: ood_sizes[n] for n in ood_sets} if entry.per_ood_set else None)}
    # Only fits that look at data are worth keeping; fixed hyperparameters are refitted for free.
    path = pathlib.Path(state_dir) / f"{name}.json" if state_dir and entry.sees else None
    loaded = load_state(path, fitted_on) if path is not None else None
    if loaded is None:
      loaded = entry.fit(model, variables, fit_data, entry_options)
      if path is not None:
        save_state(path, *loaded, fitted_on)
    states[name], infos[name] = jax.tree.map(jnp.asarray, loaded[0]), loaded[1]
    bar.update(1)

  results = {"accuracy": accuracy(model, variables, id_test, batch_size) if classifier else None,
             "num_in": n_in,
             "ood_order": list(ood_sets), "ood_sizes": ood_sizes,
             "protocol": {"holdout": holdout, "seed": seed},
             "rows": [], "labels": {}, "sees": {}, "detectors": {}, "fit_info": infos}
  scores: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {n: {} for n in ood_sets}
  bar.update(1)

  row_entry = {}  # row -> the entry that gave it

  def add_rows(name: str, ood: str, rows_in: Mapping[str, np.ndarray],
               rows_out: Mapping[str, np.ndarray], info: Mapping[str, Any]) -> None:
    eval_in, eval_out = splits[name][0][ood], splits[name][1][ood]
    entry = entries[name]
    for row in rows_in:
      if not (row == name or (entry.row_prefix and row.startswith(entry.row_prefix))):
        continue
      s_in, s_out = rows_in[row][eval_in], rows_out[row][eval_out]
      if row not in results["detectors"]:
        results["rows"].append(row)
        row_entry[row] = name
        results["labels"][row] = entry.label if row == name else row[len(entry.row_prefix):]
        results["sees"][row] = sorted(entry.sees)
        results["detectors"][row] = {}
      shown = {k: v for k, v in info.items() if k in ("temperature", "epsilon", "tune_fpr95")}
      results["detectors"][row][ood] = {**metric_row(s_in, s_out), **shown}
      scores[ood][row] = (s_in, s_out)

  shared = {n: e for n, e in entries.items() if not e.per_ood_set}
  per_set = {n: e for n, e in entries.items() if e.per_ood_set}
  open_set = open_set_train_size is not None and bool(shared)
  if shared:
    bar.set_description("scoring in-distribution")
    shared_in = score_dataset(model, variables, shared, states, id_test, batch_size,
                              with_classes=open_set)
    if open_set:
      shared_in, classes_in = shared_in
  if open_set:
    bar.set_description("open-set thresholds on the training images")
    train_part = (id_train.take(slice(0, open_set_train_size)) if open_set_train_size
                  else id_train)
    train_scores = score_dataset(model, variables, shared, states, train_part, batch_size)
    thresholds = {row: float(metrics.threshold_at_tpr(v, OPEN_SET_TPR))
                  for row, v in train_scores.items()}
    results["open_set"] = {"tpr": OPEN_SET_TPR, "train_images": len(train_part),
                           "thresholds": thresholds}
  bar.update(1)
  for ood, ds in ood_sets.items():
    if shared:
      bar.set_description(f"scoring {ood}")
      shared_out = score_dataset(model, variables, shared, states, ds, batch_size,
                                 with_classes=open_set)
      if open_set:
        shared_out, classes_out = shared_out
      for name in shared:
        add_rows(name, ood, shared_in, shared_out, infos[name])
      if open_set:
        for row, threshold in thresholds.items():
          name = row_entry[row]
          eval_in, eval_out = splits[name][0][ood], splits[name][1][ood]
          results["detectors"][row][ood]["open_set_f1"] = open_set_f1(
              shared_in[row][eval_in], classes_in[name][eval_in], id_test.labels[eval_in],
              shared_out[row][eval_out], classes_out[name][eval_out], threshold,
              id_test.num_classes)
          # The threshold is set on training images; the share of ID test images it accepts
          # (OPEN_SET_TPR when it transfers) tells how much of the F1 it costs.
          results["detectors"][row][ood]["open_set_id_accepted"] = float(
              np.mean(shared_in[row][eval_in] <= threshold))
    bar.update(1)
    if per_set:
      bar.set_description(f"scoring {ood} (per-set fits)")
      set_states = {name: states[name][ood] for name in per_set}
      rows_in = score_dataset(model, variables, per_set, set_states, id_test, batch_size)
      rows_out = score_dataset(model, variables, per_set, set_states, ds, batch_size)
      for name in per_set:
        add_rows(name, ood, rows_in, rows_out, infos[name][ood])
    bar.update(1)
  bar.close()
  # Rows in registry order (per-set entries were scored after the shared ones).
  order = {name: i for i, name in enumerate(entries)}
  results["rows"].sort(key=lambda row: order[row_entry[row]])
  results["detectors"] = {row: results["detectors"][row] for row in results["rows"]}
  return results, scores


def _jsonable(value):
  """Options as JSON values (tuples become lists), for comparison with a saved record."""
  return json.loads(json.dumps(value, default=lambda v: np.asarray(v).tolist()))


def merge_results(first: dict, second: dict) -> dict:
  """Two `evaluate_ood` results on the same ID test set and OOD sets (of different networks:
  the classifier's rows and a VMDLS encoder's) as one; the first's accuracy is kept."""
  if first["ood_order"] != second["ood_order"] or first["num_in"] != second["num_in"]:
    raise ValueError("results of different ID test or OOD sets cannot be merged")
  merged = dict(first)
  merged["rows"] = first["rows"] + second["rows"]
  for key in ("labels", "sees", "detectors", "fit_info"):
    merged[key] = {**first[key], **second[key]}
  if "open_set" in first or "open_set" in second:
    merged["open_set"] = {**second.get("open_set", {}), **first.get("open_set", {})}
    merged["open_set"]["thresholds"] = {**first.get("open_set", {}).get("thresholds", {}),
                                        **second.get("open_set", {}).get("thresholds", {})}
  if merged["accuracy"] is None:
    merged["accuracy"] = second["accuracy"]
  return merged


def run_evaluation(config, workdir: str | pathlib.Path, model, variables: Any, *,
                   registry: Mapping[str, Detector] | None = None, data_dir: str | None = None,
                   progress: bool = True, config_name: str | None = None,
                   plots: bool = True, networks: Mapping[str, tuple[Any, Any]] | None = None
                   ) -> dict:
  """Evaluates a trained model as `config.eval` says, and writes the report to `workdir`.

  What `oodjax evaluate`, `oodjax run` and the experiments call. Loads the ID test set
  (`config.dataset`) and every `config.eval.ood_sets` entry, fits and scores
  `config.eval.detectors` with `evaluate_ood` (fitted states kept in `workdir/detectors/`),
  and writes `results.json`, `results.md` and `plots/` (`oodjax.report.write_results`).
  Each detector scores the network its entry names (`Detector.network`): the classifier
  (`model`), or another trained network given in `networks` (a VMDLS encoder); the rows of all
  of them make one report, on the same splits.

  Args:
    config: an experiment config (`configs/*.py`). `config.eval.open_set_train_size` (when
      set) adds the open-set F1 of every row fitted without OOD data (`evaluate_ood`).
    workdir: the run's folder.
    model: the Flax Linen classifier (None when only other networks are evaluated).
    variables: its variables ({"params": ..., "batch_stats": ...}).
    registry: name -> `Detector`; default `oodjax.detectors.REGISTRY` (pass an extended copy to
      evaluate detectors of your own).
    data_dir: TFDS data folder for tfds/ sets.
    progress: show progress bars.
    config_name: recorded in the results as "config" (the CLI passes its --config).
    plots: write the PNG plots too.
    networks: {network: (model, variables)} for detectors of other networks, e.g.
      {"vmdls": (encoder, encoder_variables)}.

  Returns:
    The results dict (`evaluate_ood`), with "config", "seconds" and "sees_legend" added.
  """
  from oodjax import data, report  # pylint: disable=g-import-not-at-top
  registry = REGISTRY if registry is None else registry
  eval_config = config.eval
  available = dict(networks or {})
  if model is not None:
    available["classifier"] = (model, variables)
  check_plan(eval_config.detectors, registry, eval_config.holdout)
  groups: dict[str, list[str]] = {}
  for name in eval_config.detectors:
    network = registry[name].network
    if network not in available:
      raise ValueError(f"{name} scores a {network} network, and none was given "
                       f"(available: {sorted(available)})")
    groups.setdefault(network, []).append(name)
  test_ds = data.load_config_dataset(config, "test", data_dir=data_dir)
  if eval_config.get("id_size"):
    test_ds = test_ds.take(slice(0, eval_config.id_size))
  ood_sets = {}
  folder_options = dict(eval_config.get("folder_options") or {})  # e.g. {"skip_bad": True}
  for name in eval_config.ood_sets:
    options = folder_options if name.startswith("folder/") else {}
    ds = data.load(name, "test", seed=eval_config.ood_seed, data_dir=data_dir,
                   size=eval_config.get("ood_size"), **options)
    data.check_compatible(test_ds, ds)
    ood_sets[name] = ds
  open_set_train_size = eval_config.get("open_set_train_size")
  id_train = None
  if open_set_train_size is not None or any(ID_TRAIN in registry[d].sees
                                            for d in eval_config.detectors):
    id_train = data.load_config_dataset(config, "train", data_dir=data_dir)
    if config.get("train_size"):
      id_train = id_train.take(slice(0, config.train_size))
  options = {key: dict(value) for key, value in eval_config.items() if hasattr(value, "items")}
  start = time.time()
  results, scores = None, {}
  # The classifier's rows first, as the registry orders them.
  for network in sorted(groups, key=lambda n: n != "classifier"):
    net_model, net_variables = available[network]
    part, part_scores = evaluate_ood(
        net_model, net_variables, test_ds, ood_sets, tuple(groups[network]), registry=registry,
        options=options, holdout=eval_config.holdout, seed=eval_config.split_seed,
        batch_size=eval_config.batch_size, id_train=id_train,
        state_dir=pathlib.Path(workdir) / "detectors", progress=progress,
        classifier=network == "classifier", open_set_train_size=open_set_train_size)
    results = part if results is None else merge_results(results, part)
    for ood, rows in part_scores.items():
      scores.setdefault(ood, {}).update(rows)
  results["config"] = config_name
  results["seconds"] = round(time.time() - start, 1)
  results["sees_legend"] = dict(SEES)  # so the report can explain "sees" without the registry
  results["networks"] = {row: registry[name].network for name in eval_config.detectors
                         for row in results["rows"]
                         if row == name or (registry[name].row_prefix
                                            and row.startswith(registry[name].row_prefix))}
  report.write_results(results, workdir, title=f"{config.model} on {config.dataset}",
                       scores=scores if plots else None)
  return results
