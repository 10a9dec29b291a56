r"""ODIN's Table 2 setting: DenseNet-BC-100 and WRN-28-10 on CIFAR-10 / CIFAR-100 against the
paper's OOD sets. A GPU job: full-size CIFAR training is ~15 s per step on 2 CPU cores.

Arguments: `densenet_c10`, `densenet_c100`, `wrn_c10`, `wrn_c100`, e.g.

  oodjax data prepare cifar10                      # once, with the `prepare` extra
  oodjax run --config configs/odin_cifar.py:densenet_c10 --workdir runs/odin_densenet_c10

OOD sets: the ODIN authors' released 32x32 sets (TinyImageNet crop "Imagenet" and resize
"Imagenet_resize", LSUN crop "LSUN" and resize "LSUN_resize", "iSUN"), unpacked as image folders
under `data/odin/` (change with `--set eval.ood_sets=...`), plus 10,000 uniform U(0, 1) and
Gaussian N(0.5, 1)-clipped noise images generated at 32x32x3 (paper Sec. 4.2).

Training (paper Sec. 4.1): SGD, Nesterov momentum 0.9, lr 0.1 dropped x10 at 50% and 75%;
DenseNet-BC (L = 100, k = 12) 300 epochs at batch 64, WRN-28-10 200 epochs at batch 128, crop +
flip augmentation; weight decay 1e-4 (DenseNet) and 5e-4 (WRN) from the original papers.
Hardware and runtime: one modern GPU, several hours per model (not measured here).

Paper's numbers (Table 1 test error; Table 2 Baseline / ODIN, FPR@95TPR, detection error,
AUROC, AUPR-in, AUPR-out, in %):
  Test error: DenseNet-BC 4.81 (C-10), 22.37 (C-100); WRN-28-10 3.71 (C-10), 19.86 (C-100).
  DenseNet-BC CIFAR-10:
    TinyImageNet (crop)   34.7/4.3  19.9/4.7  95.3/99.1  96.4/99.1  93.8/99.1
    TinyImageNet (resize) 40.8/7.5  22.9/6.3  94.1/98.5  95.1/98.6  92.4/98.5
    LSUN (crop)           39.3/8.7  22.2/6.9  94.8/98.2  96.0/98.5  93.1/97.8
    LSUN (resize)         33.6/3.8  19.3/4.4  95.4/99.2  96.4/99.3  94.0/99.2
    iSUN                  37.2/6.3  21.1/5.7  94.8/98.8  95.9/98.9  93.1/98.8
    Uniform               23.5/0.0  14.3/2.5  96.5/99.9  97.8/100.0 93.0/99.9
    Gaussian              12.3/0.0   8.7/2.5  97.5/100.0 98.3/100.0 95.9/100.0
  DenseNet-BC CIFAR-100:
    TinyImageNet (crop)   67.8/17.3 36.4/11.2 83.0/97.1  85.3/97.4  80.8/96.8
    TinyImageNet (resize) 82.2/44.3 43.6/24.6 70.4/90.7  71.4/91.4  68.6/90.1
    LSUN (crop)           69.4/17.6 37.2/11.3 83.7/96.8  86.2/97.1  80.9/96.5
    LSUN (resize)         83.3/44.0 44.1/24.5 70.6/91.5  72.5/92.4  68.0/90.6
    iSUN                  84.8/49.5 44.7/27.2 69.9/90.1  71.9/91.1  67.0/88.9
    Uniform               88.3/0.5  46.6/2.8  83.2/99.5  88.1/99.6  73.1/99.0
    Gaussian              95.4/0.2  50.2/2.6  81.8/99.6  87.6/99.7  70.1/99.1
  WRN-28-10 CIFAR-10:
    TinyImageNet (crop)   38.9/23.4 21.9/14.2 92.9/94.2  92.5/92.8  91.9/94.7
    TinyImageNet (resize) 45.6/25.5 25.3/15.2 91.0/92.1  89.7/89.0  89.9/93.6
    LSUN (crop)           35.0/21.8 20.0/13.4 94.5/95.9  95.1/95.8  93.1/95.5
    LSUN (resize)         35.0/17.6 20.0/11.3 93.9/95.4  93.8/93.8  92.8/96.1
    iSUN                  40.6/21.3 22.8/13.2 92.5/93.7  91.7/91.2  91.5/94.9
    Uniform                1.6/0.0   3.3/2.5  99.2/100.0 99.3/100.0 98.9/100.0
    Gaussian               0.3/0.0   2.6/2.5  99.5/100.0 99.6/100.0 99.3/100.0
  WRN-28-10 CIFAR-100:
    TinyImageNet (crop)   66.6/43.9 35.8/24.4 82.0/90.8  83.3/91.4  80.2/90.0
    TinyImageNet (resize) 79.2/55.9 42.1/30.4 72.2/84.0  70.4/82.8  70.8/84.4
    LSUN (crop)           74.0/39.6 39.5/22.3 80.3/92.0  83.4/92.4  77.0/91.6
    LSUN (resize)         82.2/56.5 43.6/30.8 73.9/86.0  75.7/86.2  70.1/84.9
    iSUN                  82.7/57.3 43.9/31.1 72.8/85.6  74.2/85.9  69.2/84.8
    Uniform               98.2/0.1  51.6/2.5  84.1/99.1  89.9/99.4  71.0/97.5
    Gaussian              99.2/1.0  52.1/3.0  84.3/98.5  90.2/99.1  70.9/95.9
The released models (the ODIN authors' densenet10/100 and wideresnet10/100 .pth files, whole
pickled models) score without training: make a state dict of each once (the two lines
`oodjax import-torch` prints for such a file), then

  oodjax import-torch densenet10_state_dict.pth --config configs/odin_cifar.py:densenet_c10 \
      --workdir runs/odin_densenet_c10
  oodjax evaluate --config configs/odin_cifar.py:densenet_c10 --workdir runs/odin_densenet_c10

(wideresnet10 -> wrn_c10, densenet100 -> densenet_c100, wideresnet100 -> wrn_c100). Inputs are
normalised as the authors' code does, with CIFAR-10's statistics (125.3, 123.0, 113.9) / 255
and (63.0, 62.1, 66.7) / 255 for CIFAR-100 too (`normalization` below); a model trained here
uses the same.

Note the paper's detection error is ½(1 − 0.95) + ½ FPR at 95% TPR (its floor of 2.5 shows
it); oodjax's `detection_error` is the minimum over thresholds (see experiments/README.md).
"""
import pathlib

import ml_collections

from oodjax.config import load_config
from oodjax.train.schedules import paper_train_overrides

ODIN_FOLDERS = ("Imagenet", "Imagenet_resize", "LSUN", "LSUN_resize", "iSUN")
VARIANTS = {
    "densenet_c10": ("densenet_bc100", "tfds/cifar10", "densenet_bc_100"),
    "densenet_c100": ("densenet_bc100", "tfds/cifar100", "densenet_bc_100"),
    "wrn_c10": ("wrn28_10", "tfds/cifar10", "wrn_28_10"),
    "wrn_c100": ("wrn28_10", "tfds/cifar100", "wrn_28_10"),
}


# The ODIN authors' input normalisation (code/cal.py), on the [0, 1] pixel scale.
ODIN_NORMALIZATION = {"mean": (125.3 / 255, 123.0 / 255, 113.9 / 255),
                      "std": (63.0 / 255, 62.1 / 255, 66.7 / 255)}


def get_config(arg=None):
  if arg not in VARIANTS:
    raise ValueError(f"configs/odin_cifar.py needs an argument, one of {sorted(VARIANTS)}")
  model, dataset, recipe = VARIANTS[arg]
  config = load_config(str(pathlib.Path(__file__).with_name("odin_fmnist.py")))
  config.model = model
  config.dataset = dataset
  with config.unlocked():
    config.normalization = ml_collections.ConfigDict(ODIN_NORMALIZATION)
  config.train.update(paper_train_overrides(recipe))
  config.train.log_every_steps = 100
  config.checkpoint.every_steps = 2000
  config.checkpoint.keep = 3
  config.eval.batch_size = 250
  config.eval.ood_size = 10_000
  config.eval.ood_sets = (tuple(f"folder/data/odin/{name}" for name in ODIN_FOLDERS)
                          + ("embedded/uniform_noise:32x32x3", "embedded/gaussian_noise:32x32x3"))
  return config
