"""Generates experiments/vmdls/README.md (and figure4.png) from the result files: every number
and every ordering claim in it is computed here.

  python -m experiments.vmdls.make_readme          # rewrite README.md and figure4.png
  python -m experiments.vmdls.make_readme --check  # exit 1 if README.md is out of date

Inputs: `experiments/baseline/results.json` (the main job: Table 3), `ablation.json` (Table 4,
Figure 4) and `ensemble.json` (Table 5) beside this file; `discussion.md` (hand-written, no
numbers) is appended.
"""
from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
BASELINE = HERE.parent / "baseline" / "results.json"

# The paper's numbers (Dinari & Freifeld 2022), for comparison only.
# Table 3: macro-F1, MNIST known; Omniglot, MNIST-noise, Noise unknown.
PAPER_TABLE3 = {"SoftMax": (0.595, 0.801, 0.829), "VMDLS_b": (0.969, 0.961, 0.963),
                "VMDLS": (0.974, 0.984, 0.984)}
# Table 4: macro-F1 of VMDLS_b, MNIST known, Omniglot unknown, d = 2.
PAPER_TABLE4 = {"L_KL + L_t + L_d (M_d = 32)": 0.969, "L_KL + L_t + L_d (M_d = 1)": 0.941,
                "L_KL + L_t": 0.860, "L_t + L_d (M_d = 32)": 0.935, "L_t": 0.858,
                "L_t (M_t = 1)": 0.829}
# Table 5: macro-F1 of VMDLS, CIFAR-10 known, ImageNet-resize unknown.
PAPER_TABLE5 = {"(t1, t2, t3, g, mu)": 0.927, "(t2, t3, g, mu)": 0.925, "(t3, g, mu)": 0.919,
                "(g, mu)": 0.918, "(mu)": 0.906}
# The rows of Table 3's analogue: the main job's rows fitted without OOD data.
TABLE3_ROWS = {"msp": "Softmax threshold (MSP)", "odin_tuned_without_ood":
               "ODIN (tuned without OOD)", "1c_sum": "1C-Sum", "vmdls_b": "VMDLS_b",
               "vmdls": "VMDLS"}
NEAR_OOD = "embedded/animal_mnist"  # the stand-in for Omniglot / ImageNet-resize


def _set(name: str) -> str:
  return name.split("/", 1)[-1]


def _f(x) -> str:
  return "—" if x is None else f"{x:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (
      len(header) - 1)) + "|"]
  return lines + ["| " + " | ".join(r) + " |" for r in rows]


def table3(results: dict) -> tuple[list[str], list[str]]:
  """Open-set F1 (and AUROC) of the main job's OOD-free rows; facts on the orderings."""
  sets = results["ood_order"]
  det = results["detectors"]
  rows = [r for r in TABLE3_ROWS if r in det]
  f1 = {r: [det[r][s].get("open_set_f1") for s in sets] for r in rows}
  lines = ["Macro-F1 over 11 classes (10 known + unknown), threshold accepting "
           f"{results.get('open_set', {}).get('tpr', 0.95):.0%} of "
           f"{results.get('open_set', {}).get('train_images', '?')} ID training images:", ""]
  lines += _table(["row"] + [_set(s) for s in sets] + ["mean"],
                  [[TABLE3_ROWS[r]] + [_f(v) for v in f1[r]] + [_f(np.mean(f1[r]))]
                   for r in rows])
  if all("open_set_id_accepted" in det[r][s] for r in rows for s in sets):
    lines += ["", "Share of the ID test images the threshold accepts (0.95 if a threshold set "
              "on training images transferred exactly; every OOD set, the same images):", ""]
    lines += _table(["row"] + [_set(s) for s in sets],
                    [[TABLE3_ROWS[r]] + [_f(det[r][s]["open_set_id_accepted"]) for s in sets]
                     for r in rows])
  lines += ["", "AUROC of the same rows (binary ID vs OOD):", ""]
  lines += _table(["row"] + [_set(s) for s in sets],
                  [[TABLE3_ROWS[r]] + [_f(det[r][s]["auroc"]) for s in sets] for r in rows])
  facts = []
  if "vmdls" in f1 and "vmdls_b" in f1:
    wins = sum(a > b for a, b in zip(f1["vmdls"], f1["vmdls_b"]))
    facts.append(f"VMDLS has a higher F1 than VMDLS_b on {wins} of {len(sets)} OOD sets "
                 "(the paper: on every set).")
  if "vmdls_b" in f1 and "msp" in f1:
    wins = sum(a > b for a, b in zip(f1["vmdls_b"], f1["msp"]))
    facts.append(f"VMDLS_b has a higher F1 than the softmax threshold on {wins} of {len(sets)} "
                 "OOD sets (the paper: on every set, Table 3).")
  best = max(rows, key=lambda r: np.mean(f1[r]))
  facts.append(f"Highest mean F1: {TABLE3_ROWS[best]} ({np.mean(f1[best]):.3f}).")
  return lines, facts


def _order(values: dict[str, float]) -> list[str]:
  return sorted(values, key=lambda k: -values[k])


def table4(ablation: dict) -> tuple[list[str], list[str]]:
  sets = ablation["ood_sets"]
  lines = _table(
      ["loss (d = 2)", f"F1 {_set(NEAR_OOD)}", "F1 mean over sets", f"AUROC {_set(NEAR_OOD)}",
       "ID test accepted", "separation", "isotropy", "size spread",
       "paper F1 (MNIST vs Omniglot)"],
      [[name, _f(v["detectors"][NEAR_OOD].get("open_set_f1")),
        _f(np.mean([v["detectors"][s]["open_set_f1"] for s in sets])),
        _f(v["detectors"][NEAR_OOD]["auroc"]),
        _f(v["detectors"][NEAR_OOD].get("open_set_id_accepted")),
        f"{v['clusters']['separation']:.2f}",
        f"{v['clusters']['isotropy']:.2f}", f"{v['clusters']['size_spread']:.2f}",
        _f(PAPER_TABLE4.get(name))]
       for name, v in ablation["variants"].items()])
  ours = {n: v["detectors"][NEAR_OOD]["open_set_f1"] for n, v in ablation["variants"].items()}
  paper_order, our_order = _order(PAPER_TABLE4), _order(ours)
  full = [n for n in ours if n.startswith("L_KL + L_t + L_d")]
  others = [n for n in ours if n not in full]
  facts = [
      "Paper's order by F1: " + " > ".join(paper_order) + ".",
      f"Ours on {_set(NEAR_OOD)}: " + " > ".join(our_order) + ".",
      f"Both proposed losses (L_KL + L_t + L_d) above every other loss: "
      f"{'yes' if min(ours[n] for n in full) > max(ours[n] for n in others) else 'no'} "
      f"(the paper: yes).",
      f"M_d = 32 above M_d = 1 with the full loss: "
      f"{'yes' if ours[full[0]] > ours[full[1]] else 'no'} (the paper: yes).",
  ]
  sep = {n: v["clusters"]["separation"] for n, v in ablation["variants"].items()}
  facts.append("Largest separation of the class clusters of μ (Figure 4): " +
               f"{_order(sep)[0]} (the paper's Figure 4: the full loss with M_d = 32).")
  return lines, facts


def figure4(ablation: dict, path: pathlib.Path) -> None:
  """μ of the training images, one panel per loss, one colour per class."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  labels = np.asarray(ablation["figure_labels"])
  names = list(ablation["variants"])
  fig, axes = plt.subplots(2, (len(names) + 1) // 2, figsize=(4 * ((len(names) + 1) // 2), 8))
  for ax, name in zip(axes.ravel(), names):
    mu = np.asarray(ablation["variants"][name]["mu"])
    ax.scatter(mu[:, 0], mu[:, 1], c=labels, cmap="tab10", s=2, alpha=0.6, linewidths=0)
    ax.set_title(name, fontsize=9)
    ax.set_aspect("equal", adjustable="datalim")
  fig.suptitle("μ(x) of Fashion-MNIST training images, d = 2 (colour = class)")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def table5(ensemble: dict) -> tuple[list[str], list[str]]:
  sets = ensemble["ood_sets"]
  subsets = ensemble["subsets"]
  header = ["row"] + [f"{name} [{v['dim']}]" for name, v in subsets.items()]
  rows = []
  for row in ("VMDLS", "VMDLS_b"):
    rows.append([f"{row}: F1 {_set(NEAR_OOD)}"] + [
        _f(v["rows"][row][NEAR_OOD]["open_set_f1"]) for v in subsets.values()])
    rows.append([f"{row}: F1 mean over sets"] + [
        _f(np.mean([v["rows"][row][s]["open_set_f1"] for s in sets])) for v in subsets.values()])
    rows.append([f"{row}: AUROC {_set(NEAR_OOD)}"] + [
        _f(v["rows"][row][NEAR_OOD]["auroc"]) for v in subsets.values()])
  for row in ("VMDLS", "VMDLS_b"):
    rows.append([f"{row}: ID test images accepted"] + [
        f"{v['id_test_accepted'][row]:.3f}" for v in subsets.values()])
  lines = _table(header, rows) + ["", "Paper, Table 5 (VMDLS F1, CIFAR-10 vs ImageNet-resize, "
                                  "ResNet members t1..t3): " + "; ".join(
                                      f"{k} {v:.3f}" for k, v in PAPER_TABLE5.items()) + "."]
  facts = []
  for row in ("VMDLS", "VMDLS_b"):
    mean_f1 = {n: np.mean([v["rows"][row][s]["open_set_f1"] for s in sets])
               for n, v in subsets.items()}
    names = list(mean_f1)
    steps = sum(mean_f1[a] >= mean_f1[b] for a, b in zip(names, names[1:]))
    facts.append(f"{row}: the whole ensemble has the best mean F1: "
                 f"{'yes' if _order(mean_f1)[0] == names[0] else 'no, ' + _order(mean_f1)[0]}; "
                 f"dropping a member lowers it in {steps} of {len(names) - 1} steps "
                 "(the paper, for VMDLS: every step).")
  facts.append(f"Closed-set accuracy of c_max on the ID test set (whole ensemble): "
               f"{ensemble['accuracy_c_max']:.4f}.")
  return lines, facts


def render(baseline: dict | None, ablation: dict | None, ensemble: dict | None,
           discussion: str | None) -> str:
  parts = ["# VMDLS on embedded Fashion-MNIST (Tables 3-5, Figure 4)", "",
           "Generated by `python -m experiments.vmdls.make_readme` from "
           "`experiments/baseline/results.json`, `ablation.json` and `ensemble.json`; do not "
           "edit by hand. How they were made: `experiments/vmdls/run.py`'s docstring.", "",
           "Known: embedded Fashion-MNIST (10 classes). Unknown: the embedded OOD sets; "
           f"`{_set(NEAR_OOD)}` (animal silhouettes) is the near one, our stand-in for the "
           "paper's Omniglot (Tables 3, 4) and ImageNet-resize (Table 5). No OOD image is seen "
           "before the test.", ""]
  parts += ["## Table 3 analogue: open-set F1 of the rows fitted without OOD data", ""]
  if baseline is None:
    parts += ["_Not run yet._", ""]
  else:
    lines, facts = table3(baseline)
    parts += [f"The main job's report (`experiments/baseline/results.json`, small CNN, "
              f"classifier test accuracy {baseline['accuracy']:.4f}; the VMDLS encoder is its "
              "own network, d = 16). Each row is scored on the test images left after the "
              "main job's 1,000-image holdout.", ""] + lines + [""]
    parts += ["Paper, Table 3 (MNIST known; Omniglot, MNIST-noise, Noise): " + "; ".join(
        f"{k} {', '.join(f'{x:.3f}' for x in v)}" for k, v in PAPER_TABLE3.items()) + ".", ""]
    parts += [f"- {fact}" for fact in facts] + [""]
  parts += ["## Table 4 and Figure 4 analogues: the losses, d = 2", ""]
  if ablation is None:
    parts += ["_Not run yet._", ""]
  else:
    proto = ablation["protocol"]
    lines, facts = table4(ablation)
    parts += [f"Six variants trained as one vmapped program "
              f"({ablation['steps']} steps, {ablation['train_seconds']:.0f} s on 2 CPU cores): "
              f"{proto['ablation_train_size']} training images, {proto['ablation_epochs']} "
              "epochs, B_C = 10 x B_N = 16, Adam 1e-3; each scored by VMDLS_b (the whole "
              "ensemble). Separation: smallest distance between class means of μ over the "
              "mean within-class RMS radius; isotropy: mean over classes of the smallest over "
              "the largest covariance eigenvalue of μ (1 = round); size spread: largest over "
              f"smallest class radius (1 = equal sizes); from {len(ablation['figure_labels'])} "
              "training images.", ""] + lines + [""]
    parts += [f"- {fact}" for fact in facts] + ["", "![Figure 4 analogue](figure4.png)", ""]
  parts += ["## Table 5 analogue: the feature ensemble", ""]
  if ensemble is None:
    parts += ["_Not run yet._", ""]
  else:
    lines, facts = table5(ensemble)
    parts += ["The main job's encoder (d = 16) and autoencoder; the class Gaussians refitted on "
              "each subset of Eq. 8's members (dimension in brackets), whole test sets. "
              f"Member widths: {dict(zip(ensemble['members'], ensemble['member_dims']))}.", ""]
    parts += lines + [""] + [f"- {fact}" for fact in facts] + [""]
  if discussion:
    parts += [discussion.strip(), ""]
  return "\n".join(parts)


def _load(path: pathlib.Path) -> dict | None:
  return json.loads(path.read_text()) if path.is_file() else None


def write(folder: pathlib.Path, readme: pathlib.Path, baseline_path: pathlib.Path = BASELINE
          ) -> str:
  """Renders the README of the results in `folder` (and its figure4.png)."""
  ablation = _load(folder / "ablation.json")
  if ablation is not None:
    figure4(ablation, folder / "figure4.png")
  discussion = _load_text(HERE / "discussion.md") if folder == HERE else None
  text = render(_load(baseline_path), ablation, _load(folder / "ensemble.json"), discussion)
  readme.write_text(text)
  return text


def _load_text(path: pathlib.Path) -> str | None:
  return path.read_text() if path.is_file() else None


def main(argv) -> int:
  readme = HERE / "README.md"
  if "--check" in argv:
    text = render(_load(BASELINE), _load(HERE / "ablation.json"), _load(HERE / "ensemble.json"),
                  _load_text(HERE / "discussion.md"))
    if not readme.is_file() or readme.read_text() != text:
      print("experiments/vmdls/README.md is out of date: run "
            "python -m experiments.vmdls.make_readme")
      return 1
    return 0
  write(HERE, readme)
  print(f"wrote {readme}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
