"""Regenerates the tables in experiments/README.md from the results files beside it.

Each table sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->` and is rendered from
`experiments/NAME/results.json`; nothing in a table is typed by hand.

  python -m experiments.make_readme          # rewrite the tables
  python -m experiments.make_readme --check  # exit 1 if README.md is out of date
"""
from __future__ import annotations

import json
import pathlib
import re
import sys

from oodjax import report

HERE = pathlib.Path(__file__).resolve().parent
PATTERN = re.compile(r"(<!-- table:(?P<name>[\w/-]+) -->\n)(.*?)(<!-- /table:(?P=name) -->)",
                     re.DOTALL)


def render(name: str) -> str:
  path = HERE / name / "results.json"
  if not path.is_file():
    return f"_Not run yet: no `experiments/{name}/results.json`._\n"
  results = json.loads(path.read_text())
  body = report.markdown_report(results, title=f"`{name}`: {results.get('config', '')}",
                                  level=3)
  return body.split("\n", 2)[2]  # drop the title line: README sections carry their own


# Row names before the detector registry (commit 425f21e) -> now.
_RENAMED = {"odin": "odin_tuned_on_ood", "odin_no_ood": "odin_tuned_without_ood",
            "odin_sf": "odin_fixed"}
COMPARE = re.compile(r"(<!-- compare:baseline -->\n)(.*?)(<!-- /compare:baseline -->)", re.DOTALL)
COMPARE_8 = re.compile(r"(<!-- compare:issue8 -->\n)(.*?)(<!-- /compare:issue8 -->)", re.DOTALL)
# Rows whose definition issue 8 changed: the whole-network BatchNorm set now includes the input
# pseudo-layer, ANG+ follows the authors' code, 1C-Sum counts ANG+; the supervised bound is
# fitted on those indicators.
CHANGED_BY_ISSUE_8 = ("ind:DMS", "ind:DMS-AOS", "ind:DSS", "ind:DSS-EXT", "ind:ANG+", "1c_sum",
                      "supervised")


def compare_baseline() -> str:
  """The largest difference between this evaluation and the pre-registry one on equal weights."""
  old_path = HERE / "baseline" / "pre_registry_same_weights.json"
  new_path = HERE / "baseline" / "after_issue8_same_weights.json"
  if not old_path.is_file() or not new_path.is_file():
    return "_Not run yet._\n"
  old, new = json.loads(old_path.read_text()), json.loads(new_path.read_text())
  worst, count = 0.0, 0
  for name, per_set in old["detectors"].items():
    if name in CHANGED_BY_ISSUE_8:
      continue
    for ood, row in per_set.items():
      for key, value in row.items():
        worst = max(worst, abs(value - new["detectors"][_RENAMED.get(name, name)][ood][key]))
        count += 1
  return (f"Same weights, evaluated before (commit 425f21e, `baseline/pre_registry_same_weights"
          f".json`) and after the detector registry (`baseline/after_issue8_same_weights.json`, the main job's results until issue 9 retrained it): {count} numbers "
          f"(every row but 1C-Sum, which issue 8 redefined, every OOD set and metric, and "
          f"ODIN's chosen T and ε), largest difference {worst:.1e}; test accuracy "
          f"{old['accuracy']:.4f} and {new['accuracy']:.4f}.\n")


def compare_issue8() -> str:
  """Per row, the largest change issue 8 made to the main job's numbers on equal weights."""
  old_path = HERE / "baseline" / "before_issue8_same_weights.json"
  new_path = HERE / "baseline" / "after_issue8_same_weights.json"
  if not old_path.is_file() or not new_path.is_file():
    return "_Not run yet._\n"
  old, new = json.loads(old_path.read_text()), json.loads(new_path.read_text())
  labels = new.get("labels", {})
  lines = ["| row | largest change (points) | where | AUROC before → after, per OOD set |",
           "|---|---:|---|---|"]
  worst_unchanged = 0.0
  for name, per_set in new["detectors"].items():
    if name not in old["detectors"]:
      continue
    diffs = [(abs(row[key] - old["detectors"][name][ood][key]), ood, key)
             for ood, row in per_set.items() for key in row
             if isinstance(row[key], float) and key in old["detectors"][name][ood]]
    worst = max(diffs) if diffs else (0.0, "", "")
    if name not in CHANGED_BY_ISSUE_8:
      worst_unchanged = max(worst_unchanged, worst[0])
      continue
    aurocs = ", ".join(
        f"{ood.split('/')[-1]} {100 * old['detectors'][name][ood]['auroc']:.2f} → "
        f"{100 * row['auroc']:.2f}" for ood, row in per_set.items())
    lines.append(f"| {labels.get(name, name)} | {100 * worst[0]:.2f} | "
                 f"{worst[1].split('/')[-1]} {worst[2]} | {aurocs} |")
  return ("\n".join(lines) + f"\n\nEvery other row: largest difference {worst_unchanged:.1e} "
          "(float32 rounding).\n")


ENVISE_BASELINE = re.compile(r"(<!-- envise:baseline -->\n)(.*?)(<!-- /envise:baseline -->)",
                             re.DOTALL)


def envise_baseline() -> str:
  """The main job's ENVISE stage, from `baseline/envise.json` (its `results.json`)."""
  path = HERE / "baseline" / "envise.json"
  if not path.is_file():
    return "_Not run yet: no `experiments/baseline/envise.json`._\n"
  from oodjax.envise.pipeline import results_markdown  # pylint: disable=g-import-not-at-top
  body = results_markdown(json.loads(path.read_text()))
  return body.split("\n", 2)[2].replace("\n## ", "\n#### ")  # README sections own the titles


def main(argv) -> int:
  readme = HERE / "README.md"
  text = readme.read_text()
  new = PATTERN.sub(lambda m: m.group(1) + render(m.group("name")) + m.group(4), text)
  new = COMPARE.sub(lambda m: m.group(1) + compare_baseline() + m.group(3), new)
  new = COMPARE_8.sub(lambda m: m.group(1) + compare_issue8() + m.group(3), new)
  new = ENVISE_BASELINE.sub(lambda m: m.group(1) + envise_baseline() + m.group(3), new)
  if "--check" in argv:
    if new != text:
      print("experiments/README.md is out of date: run python -m experiments.make_readme")
      return 1
    return 0
  readme.write_text(new)
  print(f"rewrote {len(PATTERN.findall(text))} table(s) in {readme}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
