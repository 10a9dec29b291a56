"""Generates experiments/sample_free/README.md from results.json: every number is computed here.

  python -m experiments.sample_free.make_readme          # rewrite README.md
  python -m experiments.sample_free.make_readme --check  # exit 1 if README.md is out of date

The README holds (a) a Table 4 analogue per architecture (AUROC mean +- std over seeds),
(b) a Table 5 analogue (average ranks), (c) facts for the comparison with the paper, computed
from the same numbers, followed by the hand-written, number-free discussion in discussion.md.
"""
from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
from scipy import stats

HERE = pathlib.Path(__file__).resolve().parent

# The rows of the paper's Tables 4 and 5, in its order, and ANG+, which the paper lists in its
# Table 2 and its code defines (issue 8): these are ranked, 21 rows where the paper ranks 20.
PAPER_ROWS = ("ODIN", "T1000", "MP", "H", "NORM", "NORM+", "ACT", "ACT+", "PROJ", "ANG",
              "ANG+", "ANG++", "IN-DMS", "IN-DMS-AOS", "IN-DSS", "DMS", "DMS-AOS", "DSS",
              "DSS-EXT", "supervised", "1C-Sum")
# Indicators the library computes that the paper's tables do not list: shown in Table 4, not
# ranked.
EXTRA_ROWS = ("IN-DSS-EXT",)
# Results before issue 8 fixed the whole-network BatchNorm set and ANG+ (same trained weights):
# the README shows which rows changed and by how much.
BEFORE_ISSUE_8 = HERE / "results_before_issue8.json"
REDEFINED_BY_ISSUE_8 = ("ANG+", "DMS", "DMS-AOS", "DSS", "DSS-EXT", "1C-Sum", "supervised")
SUMMARY_ROWS = ("supervised", "1C-Sum")
SINGLE_ROWS = tuple(r for r in PAPER_ROWS if r not in SUMMARY_ROWS)  # the 18 single indicators
BATCHNORM_ROWS = ("IN-DMS", "IN-DMS-AOS", "IN-DSS", "DMS", "DMS-AOS", "DSS", "DSS-EXT")
ARCH_TITLES = {"small_cnn": "Small CNN", "resnet": "Tiny ResNet", "densenet": "Tiny DenseNet"}
PAIRS = (("ODIN", "T1000"), ("H", "MP"), ("ANG", "ANG++"), ("NORM+", "NORM"),
         ("1C-Sum", "ODIN"), ("1C-Sum", "ANG++"))


def result_key(label: str) -> str:
  """The row name in `oodjax.evaluate` results for a paper row label."""
  return {"ODIN": "odin_fixed", "1C-Sum": "1c_sum", "supervised": "supervised"}.get(
      label, "ind:" + label)


def set_label(name: str) -> str:
  return name.split("/", 1)[-1]


def auroc(arch: dict, label: str, ood_sets) -> np.ndarray | None:
  """[S, O] AUROCs (seeds x OOD sets) of one row, or None if the network lacks it."""
  row = arch["auroc"].get(result_key(label))
  if row is None:
    return None
  return np.array([row[name] for name in ood_sets], np.float64).T


def mean_std(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and sample std (ddof=1; 0 for a single seed) over seeds, axis 0."""
  std = values.std(axis=0, ddof=1) if values.shape[0] > 1 else np.zeros(values.shape[1:])
  return values.mean(axis=0), std


def ranks(arch: dict, ood_sets) -> dict[str, np.ndarray]:
  """Rank of each paper row in every (seed, OOD set) cell: {label: [S, O]}, 1 = best AUROC.

  Rows are ranked by AUROC within each cell, higher AUROC first; ties share their average
  rank (scipy.stats.rankdata "average"). A row the network lacks is left out of the ranking.
  """
  labels = [label for label in PAPER_ROWS if auroc(arch, label, ood_sets) is not None]
  table = np.stack([auroc(arch, label, ood_sets) for label in labels])  # [R, S, O]
  rank = stats.rankdata(-table, method="average", axis=0)
  return dict(zip(labels, rank))


def mean_table(results: dict) -> dict[str, dict[str, np.ndarray]]:
  """{arch: {label: [O] mean AUROC over seeds}} for every available row."""
  sets = results["ood_sets"]
  out = {}
  for arch_name, arch in results["architectures"].items():
    out[arch_name] = {}
    for label in PAPER_ROWS + EXTRA_ROWS:
      values = auroc(arch, label, sets)
      if values is not None:
        out[arch_name][label] = values.mean(axis=0)
  return out


def pct(x: float) -> str:
  return f"{100 * x:.2f}"


def table4(arch: dict, ood_sets) -> str:
  """Markdown AUROC table (percent, mean +- std over seeds); the best sample-free row of each
  column (supervised excluded) in bold."""
  lines = ["| | " + " | ".join(set_label(s) for s in ood_sets) + " |",
           "|---|" + "---:|" * len(ood_sets)]
  labels = [label for label in PAPER_ROWS + EXTRA_ROWS if auroc(arch, label, ood_sets) is not None]
  means = {label: mean_std(auroc(arch, label, ood_sets)) for label in labels}
  free = [label for label in labels if label != "supervised"]
  best = np.max(np.stack([means[label][0] for label in free]), axis=0)
  for label in labels:
    mean, std = means[label]
    cells = []
    for j in range(len(ood_sets)):
      cell = f"{pct(mean[j])} ± {pct(std[j])}"
      if label != "supervised" and mean[j] == best[j]:
        cell = f"**{cell}**"
      cells.append(cell)
    name = f"{label} (not ranked)" if label in EXTRA_ROWS else label
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  missing = [label for label in PAPER_ROWS + EXTRA_ROWS if label not in labels]
  if missing:
    lines.append("")
    lines.append(f"Not defined for this network: {', '.join(missing)}.")
  return "\n".join(lines)


def table5(results: dict) -> str:
  """Average rank of each paper row per architecture, and the rank of that average."""
  sets = results["ood_sets"]
  archs = results["architectures"]
  avg = {name: {label: r.mean() for label, r in ranks(arch, sets).items()}
         for name, arch in archs.items()}
  lines = ["| | " + " | ".join(ARCH_TITLES.get(a, a) for a in archs) + " |",
           "|---|" + "---:|" * len(archs)]
  for label in PAPER_ROWS:
    cells = []
    for a in archs:
      if label not in avg[a]:
        cells.append("–")
        continue
      order = sorted(avg[a].values())
      place = order.index(avg[a][label]) + 1
      cells.append(f"{avg[a][label]:.2f} ({place})")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def worst_case_table(results: dict) -> str:
  """Lowest mean AUROC over the OOD sets, per architecture, for every paper row."""
  means = mean_table(results)
  archs = list(results["architectures"])
  lines = ["| | " + " | ".join(ARCH_TITLES.get(a, a) for a in archs) + " |",
           "|---|" + "---:|" * len(archs)]
  sets = [set_label(s) for s in results["ood_sets"]]
  for label in PAPER_ROWS:
    cells = []
    for a in archs:
      if label not in means[a]:
        cells.append("–")
        continue
      j = int(np.argmin(means[a][label]))
      cells.append(f"{pct(means[a][label][j])} ({sets[j]})")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def facts(results: dict) -> list[str]:
  """Bullet points for the comparison with the paper, every number computed from results."""
  sets = results["ood_sets"]
  labels = [set_label(s) for s in sets]
  means = mean_table(results)
  out = []
  for a, arch in results["architectures"].items():
    title = ARCH_TITLES.get(a, a)
    acc = np.array(arch["accuracy"])
    avg = {label: r.mean() for label, r in ranks(arch, sets).items()}
    order = sorted(avg, key=avg.get)
    singles = [label for label in order if label in SINGLE_ROWS]
    free = [label for label in order if label != "supervised"]
    out.append(f"**{title}** ({arch['num_params']:,} parameters; test accuracy "
               f"{pct(acc.mean())} ± {pct(acc.std(ddof=1) if len(acc) > 1 else 0.0)}%): "
               f"by average rank, the top five are "
               + ", ".join(f"{label} ({avg[label]:.2f})" for label in order[:5])
               + f"; 1C-Sum is {order.index('1C-Sum') + 1} of {len(order)} overall and "
               f"{free.index('1C-Sum') + 1} of {len(free)} among sample-free rows; the best "
               f"single indicator is {singles[0]} ({avg[singles[0]]:.2f}).")
    single_means = np.stack([means[a][label] for label in SINGLE_ROWS if label in means[a]])
    best_single = single_means.max(axis=0)
    single_names = [label for label in SINGLE_ROWS if label in means[a]]
    gap = means[a]["1C-Sum"] - best_single
    j = int(np.argmin(gap))
    wins = int(np.sum(gap >= 0))
    out.append(f"{title}: 1C-Sum's mean AUROC is at least the best single indicator's on "
               f"{wins} of {len(sets)} OOD sets; its largest shortfall is "
               f"{pct(-gap[j])} points on {labels[j]} "
               f"({pct(means[a]['1C-Sum'][j])} vs "
               f"{single_names[int(np.argmax(single_means[:, j]))]} {pct(best_single[j])}).")
    noise = arch.get("noise_stats")
    if noise:
      # 1C-Sum divides by these: an indicator that hardly varies on noise gets a huge weight.
      smallest = min(noise[0], key=lambda k: np.median([s[k]["std"] for s in noise]))
      spread = ", ".join(f"{s[smallest]['std']:.2g}" for s in noise)
      out.append(f"{title}: the 1C-Sum indicator with the smallest noise std (median over "
                 f"seeds) is {smallest}: std {spread} per seed around mean "
                 f"{np.median([s[smallest]['mean'] for s in noise]):.4g}.")
    sup_first = int(np.sum(ranks(arch, sets)["supervised"] == 1))
    cells = ranks(arch, sets)["supervised"].size
    out.append(f"{title}: the supervised bound ranks first in {sup_first} of {cells} "
               f"(seed, OOD set) cells.")
  for first, second in PAIRS:
    diffs = np.concatenate([means[a][first] - means[a][second] for a in means
                            if first in means[a] and second in means[a]])
    out.append(f"{first} vs {second}: {first} has the higher mean AUROC in "
               f"{int(np.sum(diffs > 0))} of {diffs.size} (architecture, OOD set) cells; "
               f"mean difference {100 * diffs.mean():+.2f} points "
               f"(range {100 * diffs.min():+.2f} to {100 * diffs.max():+.2f}).")
  for a in means:
    bn = np.stack([means[a][label] for label in BATCHNORM_ROWS if label in means[a]])
    best_bn = bn.max(axis=0)
    out.append(f"{ARCH_TITLES.get(a, a)}: best batchnorm-based indicator (DMS…DSS-EXT, IN-*) "
               "per OOD set: " + ", ".join(f"{labels[j]} {pct(best_bn[j])}"
                                           for j in range(len(sets))) + ".")
  return out


def changes_table(results: dict, before: dict) -> str:
  """Mean AUROC after minus before, per architecture, row and OOD set, for rows that moved."""
  sets = results["ood_sets"]
  lines = ["| architecture | row | " + " | ".join(set_label(s) for s in sets) + " |",
           "|---|---|" + "---:|" * len(sets)]
  for a, arch in results["architectures"].items():
    old_arch = before["architectures"].get(a)
    if old_arch is None:
      continue
    for label in PAPER_ROWS + EXTRA_ROWS:
      new, old = auroc(arch, label, sets), auroc(old_arch, label, sets)
      if new is None or old is None:
        continue
      diff = new.mean(axis=0) - old.mean(axis=0)
      if np.max(np.abs(diff)) > 5e-5:
        lines.append(f"| {ARCH_TITLES.get(a, a)} | {label} | "
                     + " | ".join(f"{100 * d:+.2f}" for d in diff) + " |")
  moved = {line.split(" | ")[1] for line in lines[2:]}
  unchanged = [label for label in PAPER_ROWS + EXTRA_ROWS if label not in moved]
  lines += ["", f"Unchanged (within 0.005 points): {', '.join(unchanged)}."]
  rounding = [label for label in PAPER_ROWS + EXTRA_ROWS
              if label in moved and label not in REDEFINED_BY_ISSUE_8]
  if rounding:
    lines += ["", f"{', '.join(rounding)} were not redefined: their moves are float32 rounding "
              "(the indicator pass now runs in chunks of 64 images, so the convolutions see "
              "other batch shapes), a few images of ~10,000 changing side."]
  return "\n".join(lines)


def render(results: dict, discussion: str | None, before: dict | None = None) -> str:
  """The whole README as a string."""
  proto = results["protocol"]
  archs = results["architectures"]
  seeds = results["seeds"]
  any_arch = next(iter(archs.values()))
  sizes = ", ".join(f"{set_label(k)} {v}" for k, v in any_arch["ood_sizes"].items())
  spec = "; ".join(f"{ARCH_TITLES.get(a, a)} = `get_model({arch['model_spec']['model']!r}, 10"
                   + "".join(f", {k}={v!r}" for k, v in arch["model_spec"]["kwargs"].items())
                   + f")` ({arch['num_params']:,} parameters)" for a, arch in archs.items())
  parts = [
      "# Sample-free white-box indicators on embedded Fashion-MNIST (paper Tables 4 and 5)",
      "",
      "<!-- Generated by experiments/sample_free/make_readme.py from results.json; "
      "do not edit by hand. -->",
      "",
      "Reproduces the protocol of Begon & Geurts (CVPR-W 2021), Section 3-4, at toy scale: "
      "`python -m experiments.sample_free.run` (`--quick` for a smoke run).",
      "",
      f"* ID: `{proto['dataset']}` (train on {proto['train_size'] or 'all'} training images "
      f"for {proto['num_epochs']} epochs, Adam 1e-3 cosine, batch {proto['batch_size']}; "
      f"scored on {any_arch['num_in']} test images). Seeds {seeds}: the seed sets the "
      "initialisation and data order; the OOD sets are the same for every seed "
      f"(generated sets drawn with seed {proto['ood_seed']}).",
      f"* Networks: {spec}.",
      f"* OOD sets, full, no holdout: {sizes} images.",
      f"* 1C-Sum: each of {', '.join(any_arch['noise_indicators'])} standardised by its "
      f"mean/std on N = {proto['noise_n']:,} uniform-noise images (seed {proto['noise_seed']}), "
      "then summed (Eq. 31). ODIN: T = 1000, ε = 8e-4 fixed, as the paper. Supervised: "
      "logistic regression on all indicators, trained on a random half of the ID and OOD "
      "evaluation images and scored on the other half (the paper: a linear SVM).",
      "* AUROC in percent, OOD as positive (score higher = more OOD); mean ± sample std "
      "(ddof = 1) over seeds. IN- indicators do not depend on the network, hence std 0.",
      "",
      "## Table 4 analogue: AUROC per architecture",
      "",
      "Bold: the best sample-free row of each column (supervised excluded).",
  ]
  for a, arch in archs.items():
    parts += ["", f"### {ARCH_TITLES.get(a, a)}", "", table4(arch, results["ood_sets"])]
  parts += [
      "", "## Table 5 analogue: average rank", "",
      "In every (seed, OOD set) cell the paper's 20 rows (18 indicators, supervised, 1C-Sum) "
      "and ANG+ are ranked by AUROC, 1 = highest, ties sharing their average rank; a row's average rank "
      f"is the mean over the {len(seeds)} × {len(results['ood_sets'])} cells (the paper averages "
      "over OOD sets only; it does not say whether it ranks per run or on the run average). "
      "Lower is better; the place of the row within its column is in parentheses.",
      "", table5(results), "",
      "### Worst case: lowest mean AUROC over the OOD sets", "",
      "The paper argues from ranks that 1C-Sum is stable and ANG++ more robust than ODIN; "
      "the worst set shows it directly.", "", worst_case_table(results), "",
      "## Comparison with the paper", "",
      "Facts computed from results.json:", "",
  ]
  parts += [f"* {fact}" for fact in facts(results)]
  if before is not None:
    parts += ["", "## What issue 8 changed", "",
              "Issue 8 made DMS, DMS-AOS, DSS and DSS-EXT sum over every layer, the input "
              "pseudo-BatchNorm included (Section 2.2, in the sum and in the channel count), "
              "took ANG+ from the authors' code (1 - w_k+ . u / (|w_k| |u|), the numerator "
              "over the positive weights only) and added ANG+ to 1C-Sum. The supervised bound "
              "changes with its features. Same trained weights before and after; mean AUROC "
              "over seeds, after minus before, in points, for every row that moved by more "
              "than 0.005 points somewhere (`results_before_issue8.json` holds the old "
              "numbers):", "", changes_table(results, before)]
  if discussion:
    parts += ["", discussion.strip()]
  return "\n".join(parts) + "\n"


def write(results_path: pathlib.Path, readme_path: pathlib.Path) -> str:
  """Renders README from results; discussion.md beside the README is appended if present."""
  results = json.loads(pathlib.Path(results_path).read_text())
  discussion_path = pathlib.Path(readme_path).parent / "discussion.md"
  discussion = discussion_path.read_text() if discussion_path.is_file() else None
  # The before/after table compares the committed results only, not a --quick run's.
  committed = pathlib.Path(results_path).resolve() == (HERE / "results.json").resolve()
  before = (json.loads(BEFORE_ISSUE_8.read_text())
            if committed and BEFORE_ISSUE_8.is_file() else None)
  text = render(results, discussion, before)
  pathlib.Path(readme_path).write_text(text)
  return text


def main(argv) -> int:
  results = json.loads((HERE / "results.json").read_text())
  discussion_path = HERE / "discussion.md"
  discussion = discussion_path.read_text() if discussion_path.is_file() else None
  before = json.loads(BEFORE_ISSUE_8.read_text()) if BEFORE_ISSUE_8.is_file() else None
  text = render(results, discussion, before)
  readme = HERE / "README.md"
  if "--check" in argv:
    if not readme.is_file() or readme.read_text() != text:
      print("experiments/sample_free/README.md is out of date: run "
            "python -m experiments.sample_free.make_readme")
      return 1
    return 0
  readme.write_text(text)
  print(f"wrote {readme}")
  for fact in facts(results):
    print("-", fact)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
