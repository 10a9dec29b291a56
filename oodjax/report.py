"""Reports of evaluation results: Markdown tables, PNG plots, JSON. Imports no JAX.

Everything is rendered from the JSON-able results of `oodjax.evaluate.evaluate_ood` (rows,
labels, what each row's fit saw), so a results file from an earlier run renders without the
model, the registry or JAX:

    markdown_report(json.load(open("results.json")))
"""
from __future__ import annotations

import pathlib
from typing import Mapping

import numpy as np

from oodjax import fileio

METRIC_COLUMNS = (("fpr95", "FPR@95TPR ↓"), ("detection_error", "Det. err ↓"),
                  ("auroc", "AUROC ↑"), ("aupr_in", "AUPR-in ↑"), ("aupr_out", "AUPR-out ↑"))
# Rows whose fit saw OOD images of the test distribution are marked in the tables.
OOD_MARK = "†"


def _fmt_hyper(row: Mapping[str, float], key: str) -> str:
  return f"{row[key]:g}" if key in row else "–"


def row_label(results: Mapping, row: str) -> str:
  """The row's label, marked when its fit saw held-out OOD images."""
  label = results.get("labels", {}).get(row, row)
  return label + (f" {OOD_MARK}" if "heldout_ood" in results.get("sees", {}).get(row, ()) else "")


def markdown_report(results: Mapping, title: str = "OOD detection", level: int = 2) -> str:
  """Renders `evaluate_ood` results as Markdown: one table per OOD set, a row per detector."""
  hashes = "#" * level
  holdout = results.get("protocol", {}).get("holdout")
  split = (f" Each set's {holdout} held-out images (used only by the rows fitted on held-out "
           "data) are excluded from every row." if holdout else "")
  rows = results.get("rows", list(results["detectors"]))
  marked = [r for r in rows if "heldout_ood" in results.get("sees", {}).get(r, ())]
  note = (f" {OOD_MARK}: fitted on held-out images of the OOD set it is tested on (it has seen "
          "the test distribution)." if marked else "")
  accuracy = (f"In-distribution test accuracy: {100 * results['accuracy']:.2f}% on "
              f"{results['num_in']} images." if results.get("accuracy") is not None
              else f"{results['num_in']} in-distribution test images.")
  others = sorted({n for n in results.get("networks", {}).values() if n != "classifier"})
  networks = (f" Rows of another network ({', '.join(others)}) score that network, trained "
              "separately on the same data; the others score the classifier." if others else "")
  open_set = results.get("open_set")
  f1_note = (f" Open-set F1: macro-F1 over the known classes and \"unknown\", with the threshold "
             f"that accepts {100 * open_set['tpr']:.0f}% of {open_set['train_images']} ID "
             "training images (– where the fit saw OOD data)." if open_set else "")
  columns = METRIC_COLUMNS + ((("open_set_f1", "Open-set F1 ↑"),) if open_set else ())
  lines = [f"{hashes} {title}", "",
           f"{accuracy} Metrics in %; in-distribution is the positive class; "
           f"scores are higher for more OOD inputs.{split}{note}{networks}{f1_note}", ""]
  ood_names = results.get("ood_order", list(results["ood_sizes"]))
  header = "| detector | " + " | ".join(label for _, label in columns) + " | T | ε |"
  for ood in ood_names:
    lines += [f"{hashes}# {ood} ({results['ood_sizes'][ood]} images)", "", header,
              "|---" * (len(columns) + 3) + "|"]
    for name in rows:
      row = results["detectors"][name][ood]
      # A float32 zero can come out as -1e-9: print it as 0.00, not -0.00.
      cells = " | ".join(f"{100 * row[key]:.2f}".replace("-0.00", "0.00") if key in row else "–"
                         for key, _ in columns)
      lines.append(f"| {row_label(results, name)} | {cells} | "
                   f"{_fmt_hyper(row, 'temperature')} | {_fmt_hyper(row, 'epsilon')} |")
    lines.append("")
  return "\n".join(lines)


def _slug(name: str) -> str:
  return name.replace("/", "_").replace(":", "_")


def tuning_grids(results: Mapping) -> dict[str, Mapping]:
  """{ood_set: grid} of the fits that tuned a (T, ε) grid on that set's held-out images."""
  grids = {}
  for info in results.get("fit_info", {}).values():
    for ood in results.get("ood_order", ()):
      if isinstance(info.get(ood), Mapping) and "grid" in info[ood]:
        grids[ood] = info[ood]["grid"]
  return grids


def write_results(results: Mapping, workdir: str | pathlib.Path, title: str = "OOD detection",
                  scores: Mapping[str, Mapping[str, tuple]] | None = None) -> str:
  """Writes results.json, results.md and (given scores) PNG plots to `workdir` atomically.

  Plots: `plots/roc_<set>.png` (ROC of every row), `plots/hist_<set>.png` (ID vs OOD score
  histograms), `plots/odin_fpr95_<set>.png` (FPR@95 over a tuned ODIN grid, the choice marked).
  Returns the Markdown.
  """
  from oodjax import plots  # pylint: disable=g-import-not-at-top  (matplotlib, only here)
  workdir = pathlib.Path(workdir)
  text = markdown_report(results, title)
  if scores:
    plot_dir = workdir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    for ood, per_row in scores.items():
      curves = {row_label(results, row): s for row, s in per_row.items()}
      with fileio.atomic_path(plot_dir / f"roc_{_slug(ood)}.png") as tmp:
        plots.plot_roc(curves, tmp, f"ROC: {ood}")
      with fileio.atomic_path(plot_dir / f"hist_{_slug(ood)}.png") as tmp:
        plots.plot_histograms(curves, tmp, f"Scores: {ood}")
    for ood, grid in tuning_grids(results).items():
      with fileio.atomic_path(plot_dir / f"odin_fpr95_{_slug(ood)}.png") as tmp:
        plots.plot_grid_heatmap(np.asarray(grid["fpr95"]), grid["temperatures"],
                                grid["epsilons"], tmp, f"ODIN held-out FPR@95: {ood}",
                                chosen=tuple(grid["chosen"]))
  fileio.atomic_write_json(workdir / "results.json", results)
  fileio.atomic_write_text(workdir / "results.md", text)
  return text
