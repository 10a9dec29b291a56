r"""ODIN on the embedded data: the small-CNN Fashion-MNIST teacher of the main job, baseline vs
ODIN tuned with the paper's full grid and protocol, against every embedded OOD set.

Command (reuses the main job's trained model when given the same workdir; trains it otherwise):

  .venv/bin/oodjax run --config configs/odin_fmnist.py --workdir runs/fmnist_small_cnn

or `bash experiments/odin/run.sh`, which also copies the results into experiments/odin/ and
regenerates the tables of experiments/README.md.

Protocol (ODIN, Sec. 4.4): for each OOD set, 1,000 images of it and 1,000 ID test images are held
out; T from {1, 2, 5, 10, 20, 50, 100, 200, 500, 1000} and ε from 21 evenly spaced values in
[0, 0.004] are chosen to minimise FPR at 95% TPR on the held-out part; every detector is then
reported on the remaining images. "ODIN (tuned without OOD)" fixes T = 1000 and picks ε from
held-out ID images alone.

Hardware and runtime: 2 CPU cores; training about 3-5 minutes (skipped when the workdir holds a
finished run), the 10 x 21 grids about 10 minutes.

Expected numbers: see experiments/README.md (generated from experiments/odin/results.json).
"""
import pathlib

from oodjax.config import load_config


def get_config(arg=None):
  base = pathlib.Path(__file__).with_name("fmnist_small_cnn.py")
  config = load_config(str(base) + (f":{arg}" if arg else ""))
  with config.unlocked():
    del config["envise"]  # ODIN's experiment: the main job's ENVISE stage is not part of it
  config.eval.detectors = ("msp", "t1000", "odin_tuned_on_ood", "odin_tuned_without_ood")
  if arg == "smoke":  # keep the smoke variant's two-point grid
    return config
  config.eval.odin.temperatures = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
  config.eval.odin.epsilons = tuple(round(0.0002 * i, 4) for i in range(21))
  return config
