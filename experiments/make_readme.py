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


def main(argv) -> int:
  readme = HERE / "README.md"
  text = readme.read_text()
  new = PATTERN.sub(lambda m: m.group(1) + render(m.group("name")) + m.group(4), text)
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
