r"""VMDLS (Dinari & Freifeld 2022) at full size on CIFAR-10 / CIFAR-100: the settings of the
paper's Tables 1, 2 and 5, one backbone per argument. A GPU job, never run here.

Arguments: `densenet_c10`, `densenet_c100`, `resnet18_c10`, `resnet34_c10`, `wrn28_c10`,
`vgg16_c10`, e.g.

  oodjax data prepare cifar10                      # once, with the `prepare` extra
  oodjax run --config configs/vmdls_cifar.py:densenet_c10 --workdir runs/vmdls_densenet_c10

`run` trains the softmax classifier (`config.train`, for the MSP and ODIN rows), then the VMDLS
encoder on the same backbone architecture, from scratch (`config.vmdls`, in WORKDIR/vmdls), then
scores both. OOD sets: the ODIN authors' 10,000-image 32x32 sets, unpacked as image folders under
`data/odin/` as for configs/odin_cifar.py (TinyImageNet crop "Imagenet" and resize
"Imagenet_resize", LSUN crop "LSUN" and resize "LSUN_resize"; the VMDLS authors' README puts the
same four folders under data/openset/). Every row fitted without OOD data also gets the open-set
macro-F1 of the paper's Table 2 (C + 1 classes, threshold accepting 95% of the ID training set:
`eval.open_set_train_size = 0`, all of it).

Where the numbers come from. The paper leaves d, B_C, B_N and the training schedules to its
supplement, which we do not have; the authors' released code (github.com/BGU-CS-VIL/vmdls) gives
them as command lines in its README.md (commit ea819d9, "Training"; defaults in models/vae.py,
main.py). Per variant (d; B_C x B_N; M_d; VMDLS optimizer, lr, epochs, lr x0.1 every N epochs):

  densenet_c10   32; 10 x 8; 32; SGD 0.1, 500 ep, every 100   README "CIFAR-10 ... DenseNet"
  resnet18_c10   32; 10 x 8; 32; SGD 0.01, 500 ep, every 100  README "CIFAR-10 ... ResNet18"
  vgg16_c10      32;  8 x 8; 32; Adam 1e-3, 500 ep, every 100 README "CIFAR-10 ... VGG"
  wrn28_c10      32; 10 x 20; 32: README "fine-tune widereset"; SGD 0.1, 500 ep, every 100: ours
  densenet_c100  64; 20 x 20; 64: README "CIFAR-100 finetune"; SGD 0.1, 500 ep, every 100: ours
  resnet34_c10   ours throughout: ResNet-18's command (the released code has no ResNet-34
                 encoder: models/vae.py falls back to ResNet-18 for an unknown --enc_type)

SGD is the code's: momentum 0.9, Nesterov, weight decay 1e-4 (models/vae.py,
configure_optimizers); its Adam has no weight decay; its StepLR(step_size, gamma=0.1) is our
"step" schedule with drops at step_size / max_epochs, 2 step_size / max_epochs, ...
Augmentation: the code's "cifar" transforms, 4-pixel-padded random crop and horizontal flip
(`augment=True`). M_d = the code's --margin_max_distance, which equals d in every training
command, so it is also the paper's usual M_d = d. M_t = 0.1 and s^2 = 0.1 are the paper's
(Sec. 3.1).

The authors fine-tuned the CIFAR-100 DenseNet and the CIFAR-10 WRN from softmax-pretrained
weights (paper Sec. 4; README: lr 1e-3, 200 epochs with lr x0.1 every 64 for CIFAR-100, 500 every
100 for the WRN, after 20 epochs training only μ and σ at lr 1e-2). oodjax trains the VMDLS
encoder from scratch only, so for those two we use the authors' from-scratch DenseNet CIFAR-10
recipe (SGD 0.1, 500 epochs, x0.1 every 100) with the code's d, B_C, B_N and M_d: our choice.
The code's --sample_count is B_N as the released sampler uses it throughout training; its README
says the supplement's tables list five times that value for runs from scratch (e.g. 40 for
ResNet-18), a growth the released code does not contain.

Departures from the authors' code kept at the paper's defaults (each a `config.vmdls` option):
  - reducer "all" (Eq. 7's mean over all triplets); the code (pytorch-metric-learning's triplet
    loss) averages over the triplets with a positive loss: `vmdls.reducer = "nonzero"`.
  - normalize False (Eq. 2's plain distances); the code's distance L2-normalises the embeddings
    first: `vmdls.normalize = True`.
  - margin_warmup None (M_d fixed, Eq. 6); the code starts M_d at 0.15 and adds --margin_jump = 1
    per epoch from epoch --margins_epoch (10 for ResNet-18 and VGG, 30 for DenseNet CIFAR-10,
    40 for the fine-tunes) up to M_d: `vmdls.margin_warmup = (0.15, 1.0)` is that ramp from
    epoch 0 (this option has no delay).
  - the loss weights 1, 1, 1 of Eq. 7; the code weighs the KL term by --kl_coeff = 0.1
    (`vmdls.kl_weight = 0.1`), and its class Gaussians have standard deviation 0.1, i.e.
    s^2 = 0.01 (`vmdls.s2 = 0.01`), where the paper says s^2 = 0.1.
  - the KL term from epoch 1 (`kl_start_epoch`, the earliest possible: epoch 0 has no class
    means); the README commands pass --generation_epoch 0 and call 1 "the preferred value".
Other departures, not options here: `vgg16` is VGG-16 with BatchNorm and a linear head, not the
modified VGG of Yoshihashi et al. (7 convs, two 1024-unit layers) the paper and code use (the zoo
has no such model); the code's WRN-28-10 has dropout 0.1, the zoo's none; the code's
autoencoder for Sec. 3.3 is pl_bolts's ResNet-18 AE (ResNet-50 for CIFAR-100), ours the registry's
small convolutional one, trained for `eval.vmdls_eval.autoencoder.num_epochs` = 100 epochs (our
choice; the authors' CIFAR-10 checkpoint is from epoch 96). The code's feature ensemble for
DenseNet takes the transitions' outputs (108 and 150 channels) and the post-BN-ReLU last stage
as t1..t3; ours takes the three dense stages' outputs (216, 300, 342 channels), as Fig. 2 draws
it for ResNets. The classifier (`config.train`) is ODIN's recipe: DenseNet-BC's for DenseNet,
WRN's (SGD 0.1, 200 epochs, batch 128, wd 5e-4) for the others, our choice for ResNet and VGG.

Paper's numbers. Table 1 (DenseNet-BC-100; macro-average over ImageNet-crop, ImageNet-resize,
LSUN-crop, LSUN-resize), AUROC / TNR@TPR95:
               CIFAR-10       CIFAR-100
  VMDLS_b      0.977 / 0.866  0.975 / 0.878
  VMDLS        0.990 / 0.982  0.995 / 0.980
Table 2 (CIFAR-10 known; macro-F1 over 11 classes), ImageNet-c, ImageNet-r, LSUN-c, LSUN-r:
  VMDLS_b  VGG       0.850 0.845 0.849 0.844
  VMDLS_b  ResNet18  0.889 0.875 0.888 0.882
  VMDLS_b  DenseNet  0.913 0.908 0.914 0.911
  VMDLS_b  WRResNet  0.934 0.901 0.935 0.910
  VMDLS    VGG       0.907 0.861 0.900 0.886
  VMDLS    ResNet18  0.926 0.906 0.904 0.924
  VMDLS    ResNet34  0.930 0.911 0.928 0.907
  VMDLS    DenseNet  0.939 0.927 0.941 0.934
  VMDLS    WRResNet  0.945 0.930 0.942 0.936
  (no VMDLS_b row for ResNet34 in the paper; its ODIN row, DenseNet, tuned on OOD: 0.910 0.904
  0.898 0.911.)
Table 5 (VMDLS F1, CIFAR-10 vs ImageNet-resize, backbone not stated), features used:
  (t1, t2, t3, g, μ) 0.927; (t2, t3, g, μ) 0.925; (t3, g, μ) 0.919; (g, μ) 0.918; μ 0.906.
Hardware and runtime: one modern GPU, many hours per variant (500 VMDLS epochs after the
classifier; the paper reports VMDLS training about 4x slower than a softmax classifier on the
same backbone). Not measured here.
"""
import pathlib

import ml_collections

from oodjax.config import load_config
from oodjax.train.schedules import paper_train_overrides
from oodjax.vmdls.train import vmdls_config

OOD_FOLDERS = ("Imagenet", "Imagenet_resize", "LSUN", "LSUN_resize")


def _authors_training(optimizer: str, learning_rate: float, num_epochs: int,
                      drop_every: int) -> dict:
  """`config.vmdls.train` for the code's optimizer and StepLR(drop_every, gamma=0.1)."""
  drops = tuple(round(e / num_epochs, 6) for e in range(drop_every, num_epochs, drop_every))
  return {"optimizer": optimizer, "learning_rate": learning_rate, "num_epochs": num_epochs,
          "momentum": 0.9, "nesterov": True,
          "weight_decay": 1e-4 if optimizer == "sgd" else 0.0, "schedule": "step",
          "lr_drop_at": drops, "lr_drop_factor": 0.1, "augment": True}


# arg: (zoo model, dataset, classifier recipe, d, B_C, B_N, VMDLS training); see the docstring.
VARIANTS = {
    "densenet_c10": ("densenet_bc100", "tfds/cifar10", "densenet_bc_100", 32, 10, 8,
                     _authors_training("sgd", 0.1, 500, 100)),
    "densenet_c100": ("densenet_bc100", "tfds/cifar100", "densenet_bc_100", 64, 20, 20,
                      _authors_training("sgd", 0.1, 500, 100)),
    "resnet18_c10": ("resnet18", "tfds/cifar10", "wrn_28_10", 32, 10, 8,
                     _authors_training("sgd", 0.01, 500, 100)),
    "resnet34_c10": ("resnet34", "tfds/cifar10", "wrn_28_10", 32, 10, 8,
                     _authors_training("sgd", 0.01, 500, 100)),
    "wrn28_c10": ("wrn28_10", "tfds/cifar10", "wrn_28_10", 32, 10, 20,
                  _authors_training("sgd", 0.1, 500, 100)),
    "vgg16_c10": ("vgg16", "tfds/cifar10", "wrn_28_10", 32, 8, 8,
                  _authors_training("adam", 1e-3, 500, 100)),
}


def get_config(arg=None):
  if arg not in VARIANTS:
    raise ValueError(f"configs/vmdls_cifar.py needs an argument, one of {sorted(VARIANTS)}")
  model, dataset, recipe, latent_dim, classes_per_batch, per_class, vmdls_train = VARIANTS[arg]
  config = load_config(str(pathlib.Path(__file__).with_name("fmnist_small_cnn.py")))
  with config.unlocked():
    del config["envise"]  # the main job's ENVISE stage (Fashion-MNIST scenarios) is not part of it
  config.model = model
  config.dataset = dataset
  config.train.update(paper_train_overrides(recipe))
  config.train.log_every_steps = 100
  config.checkpoint.every_steps = 2000
  config.checkpoint.keep = 3

  config.vmdls = vmdls_config(latent_dim=latent_dim)
  config.vmdls.classes_per_batch = classes_per_batch
  config.vmdls.per_class = per_class
  config.vmdls.distancing_margin = float(latent_dim)  # the code's --margin_max_distance
  config.vmdls.train = ml_collections.ConfigDict(vmdls_train)
  config.vmdls.train_size = ml_collections.FieldReference(None, field_type=int)  # all images

  config.eval.batch_size = 250
  config.eval.ood_size = 10_000
  config.eval.detectors = ("msp", "odin_tuned_without_ood", "vmdls_b", "vmdls")
  config.eval.ood_sets = tuple(f"folder/data/odin/{name}" for name in OOD_FOLDERS)
  # The paper's F1 threshold accepts 95% of the (whole) ID training set.
  config.eval.open_set_train_size = 0
  # ODIN without OOD (ODIN* of Table 1, after Hsu et al. 2020): T = 1000, ε picked from held-out
  # ID images over ODIN's 21-point grid.
  config.eval.odin.epsilons = tuple(round(0.0002 * i, 4) for i in range(21))
  config.eval.vmdls_eval.autoencoder.num_epochs = 100
  config.eval.vmdls_eval.autoencoder.batch_size = 256
  return config
