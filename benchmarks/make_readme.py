"""Regenerates the numbers in benchmarks/README.md from benchmarks/results/*.json.

  python -m benchmarks.make_readme
"""
from __future__ import annotations

import json
import pathlib
import re

HERE = pathlib.Path(__file__).resolve().parent


def _odin(r: dict) -> str:
  return "\n".join([
      f"{r['grid'][0]} x {r['grid'][1]} grid, {r['images']} images, {r['cpu_threads']} CPU "
      f"threads ({r['backend']}):", "",
      "| | seconds | ratio |", "|---|---|---|",
      f"| (1) oodjax `odin_grid` | {r['oodjax_s']:.2f} | |",
      f"| (2) released procedure, PyTorch twin | {r['released_torch_s']:.2f} | "
      f"(2)/(1) = **{r['speedup_over_released']:.2f}x** (goal ≥ 3.5x) |",
      f"| (3) compute floor T·(fwd+bwd) + T·E·fwd | {r['floor_s']:.2f} | "
      f"(1)/(3) = **{r['ratio_to_floor']:.2f}x** (goal ≤ 1.2x) |", "",
      f"Largest score difference between (1) and (2): {r['max_abs_score_diff']:.1e}."])


def _whitebox(r: dict) -> str:
  return "\n".join([
      f"`{r['model']}`, {r['images']} images, batches of {r['batch_size']}, median of "
      f"{r['repeats']} repeats ({r['backend']}), {len(r['indicators'])} indicators:", "",
      "| | seconds | images/s |", "|---|---|---|",
      f"| plain jitted forward | {r['forward_s']:.3f} | {r['images'] / r['forward_s']:.0f} |",
      f"| forward + all indicators | {r['indicators_s']:.3f} | "
      f"{r['images'] / r['indicators_s']:.0f} |", "",
      f"Ratio: **{r['ratio']:.2f}x** (goal ≤ 1.3x)."])


RENDER = {"odin_grid": _odin, "whitebox": _whitebox}


def main() -> None:
  readme = HERE / "README.md"
  text = readme.read_text()
  for name, render in RENDER.items():
    path = HERE / "results" / f"{name}.json"
    if path.is_file():
      body = render(json.loads(path.read_text()))
      text = re.sub(rf"(<!-- bench:{name} -->\n).*?(<!-- /bench:{name} -->)",
                    lambda m: m.group(1) + body + "\n" + m.group(2), text, flags=re.DOTALL)
  readme.write_text(text)
  print(f"rewrote {readme}")


if __name__ == "__main__":
  main()
