r"""ENVISE on the embedded 20-class set (Fashion-MNIST + Animal-MNIST): experiments/envise.

  .venv/bin/oodjax run --config configs/envise_embedded.py --workdir runs/envise_embedded

trains the TEACHER (the zoo's wide small CNN, ~16.5 M MACs per image, on all 20 classes of
`embedded/fashion_animal`), reports
its own max softmax against two noise sets (a check of the teacher), and then runs ENVISE
(`oodjax.envise.pipeline`): a small binary VGG student adapts online to four scenarios played
one after the other,

  zoo       animals frequent (P = 0.9), garments rare
  shop      garments frequent, animals rare
  tops      tops (T-shirt, pullover, coat, shirt) frequent, footwear rare
  wildlife  wild animals (bear, elephant, giraffe, zebra) frequent, farm animals rare

with five students (BSN with L_d + L_at, BSN with L_d only, RvSN with L_d + L_at, and
Figure 3's directly binarised RvSN and never-adapted BSN), and evaluates the four gates of the
registry per scenario on test images. `:quick` is a two-scenario, short version (tests).

Which values are the paper's (ENVISE, Sec. 4): batch 10, Adam, lambda1 = 1, lambda2 = 0.2,
delta = 1.5, rotation in [-15, 15] degrees with a random centre crop, adaptive phases on inlier
images only. Ours: the teacher and its 3 epochs; the student (`binary_vgg_small`, whose real twin costs
about 4.7 M MACs and the binary student about 0.2 M FLOPs: the teacher costs 3.5x the RvSN
and ~80x the BSN, where the paper's DenseNet-201 costs 29x its RvSN and 1500x its BSN); Adam's
learning rate 1e-3 (1e-4, the paper's, barely moves a student from scratch in a few hundred
steps of 10 images); 600 steps (6,000 images) per scenario with the adaptive phase capped at
300 steps and a convergence window of 30 steps; the quantile routing threshold keeping 95% of
the last window's images; the stream draws from the training split and the gates are evaluated
on the test split.

Hardware and runtime: 2 CPU cores (AMD EPYC), about 15 minutes (teacher ~2.5 min, each
adapted student ~2 min); `python -m experiments.envise.run` runs it with the margin ablation
and the feature-space separation.
"""
import pathlib

from oodjax.config import load_config
from oodjax.envise.pipeline import envise_config


def get_config(arg=None):
  if arg not in (None, "quick"):
    raise ValueError(f"unknown config argument {arg!r}; known: quick")
  config = load_config(str(pathlib.Path(__file__).with_name("fmnist_small_cnn.py")))
  with config.unlocked():
    del config["vmdls"]
    del config["envise"]
  config.dataset = "embedded/fashion_animal"
  config.model = "small_cnn_wide"
  config.train.num_epochs = 3
  config.train.log_every_steps = 100
  config.eval.detectors = ("msp",)  # the teacher's own check; ENVISE's gates are the students'
  config.eval.ood_sets = ("embedded/uniform_noise", "embedded/gaussian_noise")
  config.eval.holdout = None
  config.eval.open_set_train_size = None
  envise = envise_config(
      scenarios=("zoo", "shop", "tops", "wildlife"), student="binary_vgg_small",
      online=dict(optimizer=dict(learning_rate=1e-3),
                  adaptive=dict(window=30, max_steps=300, target_agreement=0.95),
                  checkpoint=dict(every_steps=200)),
      stream=dict(images_per_scenario=6000, batch_size=10, seed=0, augment=True))
  if arg == "quick":
    # The small teacher, one epoch over every class (a slice of the first images would hold
    # garments only: the set lists Fashion-MNIST first).
    config.model = "small_cnn"
    config.train.num_epochs = 1
    config.eval.ood_size = 500
    envise.scenarios = ("zoo", "shop")
    envise.stream.images_per_scenario = 400
    envise.online.adaptive.update(window=10, max_steps=20)
    envise.eval.holdout = 50
    envise.eval.odin.epsilons = (0.0, 0.002)
  with config.unlocked():
    config.envise = envise
  config.lock()
  return config
