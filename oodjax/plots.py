"""PNG figures for evaluation reports: ROC curves, score histograms, FPR@95 heat maps.

matplotlib is imported lazily with the Agg backend, so importing oodjax never needs a display.
"""
from __future__ import annotations

import pathlib
from typing import Mapping, Sequence

import numpy as np


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def roc_points(scores_in: np.ndarray, scores_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(FPR, TPR) at every distinct threshold, ID positive, accepted as ID when score <= t.

  Returns:
    fpr, tpr: [P] each, from (0, 0) to (1, 1).
  """
  thresholds = np.unique(np.concatenate([scores_in, scores_out]))  # ascending
  tpr = np.searchsorted(np.sort(scores_in), thresholds, side="right") / len(scores_in)
  fpr = np.searchsorted(np.sort(scores_out), thresholds, side="right") / len(scores_out)
  return np.r_[0.0, fpr], np.r_[0.0, tpr]


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | pathlib.Path,
             title: str) -> None:
  """One ROC curve per detector: curves maps a label to (scores_in, scores_out)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(4.5, 4.2))
  for label, (s_in, s_out) in curves.items():
    fpr, tpr = roc_points(s_in, s_out)
    ax.plot(fpr, tpr, label=label, lw=1.5)
  ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
  ax.axhline(0.95, color="0.8", lw=0.8)
  ax.set(xlabel="FPR (OOD accepted)", ylabel="TPR (ID accepted)", title=title, xlim=(0, 1),
         ylim=(0, 1.01))
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_histograms(scores: Mapping[str, tuple[np.ndarray, np.ndarray]],
                    path: str | pathlib.Path, title: str) -> None:
  """ID vs OOD score histograms, one panel per detector."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(scores), figsize=(3.6 * len(scores), 3.0), squeeze=False)
  for ax, (label, (s_in, s_out)) in zip(axes[0], scores.items()):
    both = np.concatenate([s_in, s_out])
    lo, hi = float(both.min()), float(both.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
    ax.hist(s_in, bins, alpha=0.6, density=True, label="in-distribution")
    ax.hist(s_out, bins, alpha=0.6, density=True, label="OOD")
    ax.set(title=label, xlabel="score (higher = more OOD)")
  axes[0][0].legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_grid_heatmap(grid: np.ndarray, temperatures: Sequence[float], epsilons: Sequence[float],
                      path: str | pathlib.Path, title: str,
                      chosen: tuple[int, int] | None = None) -> None:
  """Heat map of a [T, E] table (FPR@95 over ODIN's grid), the chosen cell marked."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(max(5.0, 0.32 * len(epsilons) + 2), 0.35 * len(temperatures)
                                  + 1.6))
  image = ax.imshow(100 * np.asarray(grid), aspect="auto", cmap="viridis_r", origin="lower")
  ax.set_xticks(range(len(epsilons)), [f"{e:g}" for e in epsilons], rotation=90, fontsize=7)
  ax.set_yticks(range(len(temperatures)), [f"{t:g}" for t in temperatures], fontsize=7)
  ax.set(xlabel="ε", ylabel="T", title=title)
  if chosen is not None:
    ax.plot(chosen[1], chosen[0], marker="s", mfc="none", mec="red", ms=9, mew=1.5)
  fig.colorbar(image, ax=ax, label="FPR at 95% TPR (%)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
