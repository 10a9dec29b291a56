r"""The sample-free indicators' setting (Begon & Geurts): ResNet-50, WideResNet-40 and
DenseNet-121 on CIFAR-10 / CIFAR-100, every indicator, 1C-Sum and the supervised bound. A GPU job.

Arguments: `r50_c10`, `r50_c100`, `wrn40_c10`, `wrn40_c100`, `d121_c10`, `d121_c100`, e.g.

  oodjax data prepare cifar10 && oodjax data prepare svhn_cropped && oodjax data prepare mnist
  oodjax run --config configs/sample_free_cifar.py:r50_c10 --workdir runs/sf_r50_c10

The paper's OOD sets are Gaussian noise, SVHN, MNIST, Fashion-MNIST, Tiny ImageNet and LSUN (test
set), resized to 32x32 and cast to RGB; here: generated Gaussian noise at 32x32x3, and the
TinyImageNet / LSUN image folders under data/odin/ (the ODIN authors' resized sets). SVHN
(`tfds/svhn_cropped`) fits as is; MNIST and Fashion-MNIST need resizing to 32x32x3
(`oodjax.data.resize_dataset`), which the config-driven CLI does not do yet, so they are left out
of `eval.ood_sets` (add them from Python).

The paper does not give the WideResNet's width in its text (Appendix B is not in our copy): we
use WRN-40-4. Training: the ODIN recipe for WRNs (SGD, Nesterov 0.9, lr 0.1 dropped x10 at 50%
and 75%, 200 epochs, batch 128, weight decay 5e-4) for all three.

Paper's numbers. Accuracy: 94.2% on CIFAR-10 on average, 74.2-77.9% on CIFAR-100.
Table 4 (ResNet-50, CIFAR-10 ID, AUROC %, mean ± std over 3 runs), columns Gaussian, SVHN,
MNIST, Fashion-MNIST, Tiny ImageNet, LSUN:
  ODIN    91.36±5.42  90.22±4.03  96.88±0.70  95.89±0.75  87.22±2.12  92.38±1.56
  T1000   83.17±9.00  93.14±3.05  94.81±0.78  95.43±0.62  88.70±1.23  92.66±1.04
  MP      89.27±4.90  91.89±1.30  90.76±0.65  91.97±0.47  87.05±0.61  90.08±0.60
  H       89.05±5.03  92.51±1.46  91.40±0.62  92.71±0.58  87.52±0.67  90.62±0.59
  NORM    53.96±33.02 85.46±10.89 92.28±4.92  89.52±4.00  80.19±4.27  82.50±4.93
  NORM+   54.99±28.60 87.17±9.12  94.61±2.09  92.92±1.85  85.00±2.61  88.87±2.82
  ACT     83.34±9.02  93.32±2.95  94.90±0.70  95.47±0.59  88.77±1.18  92.50±1.08
  ACT+    87.68±9.18  94.23±3.50  96.03±1.44  95.93±0.72  88.05±1.53  91.68±1.38
  PROJ    85.53±8.09  94.01±2.42  95.61±0.40  95.47±0.58  88.61±1.26  92.05±1.21
  ANG     91.78±2.79  93.41±0.09  94.15±0.60  94.76±1.02  88.35±0.51  91.98±0.58
  ANG++   99.89±0.12  97.26±0.17  94.25±1.22  93.41±1.70  86.05±0.88  88.43±0.75
  IN-DMS  7.85        60.46       98.59       71.94       52.89       49.26
  IN-DMS-AOS 52.79    30.41       99.68       96.02       52.55       54.91
  IN-DSS  5.13        85.99       36.16       58.53       52.03       42.94
  DMS     100.00±0.00 80.29±8.30  93.97±2.47  69.39±6.49  34.21±5.54  22.67±5.33
  DMS-AOS 99.25±0.48  4.72±2.26   81.12±9.04  59.42±9.53  25.25±2.65  23.78±2.66
  DSS     99.86±0.14  96.51±0.60  70.33±15.30 62.22±3.53  55.01±1.90  47.40±4.40
  DSS-EXT 98.24±0.61  97.70±0.34  66.93±1.88  67.64±1.67  66.84±0.88  62.94±1.38
  supervised 100.00±0.00 99.75±0.05 100.00±0.00 99.70±0.03 90.82±0.45 96.14±0.19
  1C-Sum  97.84±2.70  97.83±0.95  96.47±1.58  95.86±0.63  88.86±0.79  91.61±0.90
Table 5 (average rank, lower is better), CIFAR-10 R50/W/D121 then CIFAR-100 R50/W/D121:
  ODIN 7.3/8.2/10.7 7.2/7.3/6.3; T1000 7.8/7.3/9.3 7.5/8.0/6.7; ACT 7.0/6.3/8.5 7.2/8.0/6.7;
  PROJ 7.2/6.0/7.7 9.3/7.3/8.8; ANG 8.2/9.0/4.5 7.8/8.3/7.0; ANG++ 8.5/13.7/7.3 4.3/10.7/8.8;
  supervised 1.0/1.0/1.0 1.3/1.8/1.7; 1C-Sum 4.8/4.7/4.7 5.3/6.0/4.2.
Hardware and runtime: one modern GPU, hours per model (not measured here).

Trained ResNets of the paper's code (kuangliu/pytorch-cifar's layout: `linear` head,
`shortcut.{0,1}` projections) score without training here:

  oodjax import-torch r50_cifar10.pth --config configs/sample_free_cifar.py:r50_c10 \
      --workdir runs/sf_r50_c10
  oodjax evaluate --config configs/sample_free_cifar.py:r50_c10 --workdir runs/sf_r50_c10

Inputs are normalised as that code does, with CIFAR-10's statistics (0.4914, 0.4822, 0.4465) /
(0.247, 0.243, 0.261) for CIFAR-100 too (`normalization`). Its WideResNet (biased convs, the
stride on the second conv) and DenseNet (new features concatenated first) differ from the zoo's
and do not import.
"""
import pathlib

import ml_collections

from oodjax.config import load_config
from oodjax.train.schedules import paper_train_overrides

VARIANTS = {
    "r50_c10": ("resnet50", "tfds/cifar10"), "r50_c100": ("resnet50", "tfds/cifar100"),
    "wrn40_c10": ("wrn40_4", "tfds/cifar10"), "wrn40_c100": ("wrn40_4", "tfds/cifar100"),
    "d121_c10": ("densenet121", "tfds/cifar10"), "d121_c100": ("densenet121", "tfds/cifar100"),
}


# The input normalisation of the paper's code (jm-begon/ood_samplefree, CIFAR-10's statistics
# for CIFAR-10 and CIFAR-100 alike), on the [0, 1] pixel scale.
SAMPLE_FREE_NORMALIZATION = {"mean": (0.4914, 0.4822, 0.4465), "std": (0.247, 0.243, 0.261)}


def get_config(arg=None):
  if arg not in VARIANTS:
    raise ValueError(f"configs/sample_free_cifar.py needs an argument, one of {sorted(VARIANTS)}")
  model, dataset = VARIANTS[arg]
  config = load_config(str(pathlib.Path(__file__).with_name("fmnist_small_cnn.py")))
  with config.unlocked():
    del config["envise"]  # the main job's ENVISE stage (Fashion-MNIST scenarios) is not part of it
    config.normalization = ml_collections.ConfigDict(SAMPLE_FREE_NORMALIZATION)
  config.model = model
  config.dataset = dataset
  config.train.update(paper_train_overrides("wrn_28_10"))
  config.train.log_every_steps = 100
  config.checkpoint.every_steps = 2000
  config.checkpoint.keep = 3
  config.eval.batch_size = 250
  config.eval.ood_size = 10_000
  config.eval.holdout = None
  config.eval.detectors = ("msp", "odin_fixed", "indicators", "1c_sum", "supervised")
  config.eval.ood_sets = ("embedded/gaussian_noise:32x32x3", "tfds/svhn_cropped",
                          "folder/data/odin/Imagenet_resize", "folder/data/odin/LSUN_resize")
  return config
