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


def compare_baseline() -> str:
  """The largest difference between this evaluation and the pre-registry one on equal weights."""
  old_path = HERE / "baseline" / "pre_registry_same_weights.json"
  new_path = HERE / "baseline" / "results.json"
  if not old_path.is_file() or not new_path.is_file():
    return "_Not run yet._\n"
  old, new = json.loads(old_path.read_text()), json.loads(new_path.read_text())
  worst, count = 0.0, 0
  for name, per_set in old["detectors"].items():
    for ood, row in per_set.items():
      for key, value in row.items():
        worst = max(worst, abs(value - new["detectors"][_RENAMED.get(name, name)][ood][key]))
        count += 1
  return (f"Same weights, evaluated before (commit 425f21e, `baseline/pre_registry_same_weights"
          f".json`) and after the detector registry (`baseline/results.json`): {count} numbers "
          f"(every row, OOD set and metric, and ODIN's chosen T and ε), largest difference "
          f"{worst:.1e}; test accuracy {old['accuracy']:.4f} and {new['accuracy']:.4f}.\n")


def main(argv) -> int:
  readme = HERE / "README.md"
  text = readme.read_text()
  new = PATTERN.sub(lambda m: m.group(1) + render(m.group("name")) + m.group(4), text)
  new = COMPARE.sub(lambda m: m.group(1) + compare_baseline() + m.group(3), new)
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
