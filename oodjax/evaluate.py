"""Scoring datasets with detectors and turning scores into OOD results tables."""
from __future__ import annotations

import functools
import pathlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from oodjax import io
from oodjax import metrics
from oodjax.data.core import ImageDataset, normalize

METRIC_COLUMNS = (("fpr95", "FPR@95TPR ↓"), ("detection_error", "Det. err ↓"),
                  ("auroc", "AUROC ↑"), ("aupr_in", "AUPR-in ↑"), ("aupr_out", "AUPR-out ↑"))


def map_batches(fn: Callable[[jax.Array], Any], dataset: ImageDataset, batch_size: int,
                progress: Callable[[int], None] | None = None) -> Any:
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
    if progress is not None:
      progress(valid)
  return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


def score_dataset(detector: Callable, apply_fn: Callable, variables: Any,
                  dataset: ImageDataset, batch_size: int = 500, **hyper) -> np.ndarray:
  """Scores every image of `dataset` with `detector(apply_fn, variables, x, **hyper)`.

  Returns:
    [N] float32 scores, higher = more out-of-distribution.
  """
  fn = jax.jit(functools.partial(detector, apply_fn, **hyper))
  return map_batches(lambda x: fn(variables, x), dataset, batch_size)


def accuracy(apply_fn: Callable, variables: Any, dataset: ImageDataset,
             batch_size: int = 500) -> float:
  """Top-1 accuracy of the network on a labelled dataset."""
  fn = jax.jit(lambda v, x: jnp.argmax(apply_fn(v, x), axis=-1))
  predictions = map_batches(lambda x: fn(variables, x), dataset, batch_size)
  return float(np.mean(predictions == dataset.labels))


def ood_table(scores_in: np.ndarray, scores_out: Mapping[str, np.ndarray]
              ) -> dict[str, dict[str, float]]:
  """Metrics of one detector's ID scores against each OOD set's scores."""
  metrics.check_scores(jnp.asarray(scores_in), "scores_in")
  table = {}
  for name, s in scores_out.items():
    metrics.check_scores(jnp.asarray(s), f"scores of {name}")
    # One compiled program per shape, instead of one per operation as an eager call compiles.
    table[name] = {k: float(v) for k, v in _all_metrics_jit(scores_in, s).items()}
  return table


_all_metrics_jit = jax.jit(metrics.all_metrics)


def evaluate_ood(apply_fn: Callable, variables: Any, id_test: ImageDataset,
                 ood_sets: Mapping[str, ImageDataset], detectors: Mapping[str, Callable],
                 batch_size: int = 500) -> dict:
  """Scores the ID test set and each OOD set with each detector.

  OOD sets are normalised with the in-distribution statistics, as the model saw its training
  data. Returns a JSON-able dict:
  {"accuracy": float, "num_in": int, "ood_sizes": {name: n},
   "detectors": {detector: {ood_set: {metric: value}}}}.
  """
  for name, ds in ood_sets.items():
    if ds.image_shape != id_test.image_shape:
      raise ValueError(f"OOD set {name} has images of shape {ds.image_shape}, the "
                       f"in-distribution test set {id_test.image_shape}")
  ood_sets = {name: ds.with_stats(id_test.mean, id_test.std) for name, ds in ood_sets.items()}
  results = {"accuracy": accuracy(apply_fn, variables, id_test, batch_size),
             "num_in": len(id_test),
             "ood_sizes": {name: len(ds) for name, ds in ood_sets.items()},
             "detectors": {}}
  for det_name, detector in detectors.items():
    scores_in = score_dataset(detector, apply_fn, variables, id_test, batch_size)
    scores_out = {name: score_dataset(detector, apply_fn, variables, ds, batch_size)
                  for name, ds in ood_sets.items()}
    results["detectors"][det_name] = ood_table(scores_in, scores_out)
  return results


def markdown_report(results: dict, title: str = "OOD detection") -> str:
  """Renders `evaluate_ood` results as Markdown: one table, a row per (OOD set, detector)."""
  header = "| OOD set | detector | " + " | ".join(label for _, label in METRIC_COLUMNS) + " |"
  lines = [f"## {title}", "",
           f"In-distribution test accuracy: {100 * results['accuracy']:.2f}% "
           f"on {results['num_in']} images. Metrics in %, ID = positive class.", "",
           header, "|" + "---|" * (len(METRIC_COLUMNS) + 2)]
  ood_names = next(iter(results["detectors"].values())).keys() if results["detectors"] else ()
  for ood in ood_names:
    for det_name, table in results["detectors"].items():
      cells = " | ".join(f"{100 * table[ood][key]:.2f}" for key, _ in METRIC_COLUMNS)
      lines.append(f"| {ood} | {det_name} | {cells} |")
  return "\n".join(lines) + "\n"


def write_results(results: dict, workdir: str | pathlib.Path, title: str = "OOD detection"
                  ) -> str:
  """Writes results.json and results.md to `workdir` atomically; returns the Markdown."""
  workdir = pathlib.Path(workdir)
  report = markdown_report(results, title)
  io.atomic_write_json(workdir / "results.json", results)
  io.atomic_write_text(workdir / "results.md", report)
  return report
