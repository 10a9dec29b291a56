"""What machine a benchmark ran on; standard library only, so any benchmark (including one on a
bare accelerator image) can record it."""
from __future__ import annotations


def cpu_name() -> str:
  """The CPU's model name (ratios move between machines; the README says which one ran)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown CPU"
