"""Deployment scenarios for ENVISE: which classes are frequent (inliers) and which rare (outliers).

A scenario is data: a name, the inlier (IL) and outlier (OL) class names, and how often each
class appears in the image stream. `validate` checks one against a dataset's class names before
anything is trained, and `class_probabilities` turns it into the [K] vector the stream samples.

    s = EMBEDDED_SCENARIOS["zoo"]                       # animals frequent, garments rare
    train = fashion_animal_dataset("train")             # the 20-class embedded set
    p = class_probabilities(s, train.class_names)       # [20], sums to 1

Three families of scenarios live here:

  CIFAR100_SCENARIOS   the paper's pairs C1-C6 (Table 1; classes from Table 7), with CIFAR-100
                       fine label names (`CIFAR100_FINE_LABELS`, in label order).
  TINY_IMAGENET_SCENARIOS  the paper's pairs T1-T5 (Table 1; classes from Table 8). The paper gives
                       class NAMES only, no WordNet ids; we keep names, spelled as the first synonym
                       of Tiny-ImageNet's words.txt (`TINY_IMAGENET_NAMES`), so a loader can map
                       them to wnids through that file.
  EMBEDDED_SCENARIOS   scenarios on the 20-class Fashion-MNIST + Animal-MNIST set that ships with
                       the package (`fashion_animal_dataset`), for tests and the README job.

Reading the paper's tables (Sharma et al., "ENVISE", ICLR 2021 submission, Sec. 4, Tables 1, 7, 8):
  * Table 1 counts test images: 100 per CIFAR-100 class (its test set) and 50 per Tiny-ImageNet
    class (its validation set); "# IL train" is 70% of "# IL test". The class counts below are
    those of Tables 7/8. Five rows of Table 1 imply other counts (`TABLE1_COUNT_MISMATCHES`):
    C2 lists 10 flora classes but Table 1 implies 9, C6 lists 5 outdoor scenes but implies 6 (so
    one CIFAR-100 class seems to have moved from C2 to C6; the paper does not say which). T1 lists
    22 animals but implies 25 (the three Tiny-ImageNet classes no table names are tabby, brown
    bear and Arabian camel, all mammals), T4 lists 40 household items but implies 41 and T5 lists
    37 miscellaneous items but implies 36 (one item seems to have moved from T5o to T4i). T4's
    "# IL train" of 1432 is not 70% of its 2050 test images (1435). We keep the tables' classes
    and record Table 1's numbers unchanged in `TABLE1`.
  * Table 8's super-class labels (T1o = birds, T2o = aquatic animals, T3i = edible items,
    T3o = garments) contradict Table 1's pairs (T1 = animals \\ garments, T2 = reptiles \\ edible
    items, T3 = aquatic animals \\ birds). The image counts of Table 1 match Table 1's pairing, so
    we use it.
  * The paper does not give the stream's class probabilities. For C1-C6 and T1-T5 we set the
    inlier probability to Table 1's share of IL test images, IL test / (IL test + OL test), with
    classes uniform inside each set: that is the inference stream of its Sec. 4 (the test images
    of the IL and OL classes) and the P, q of its Eq. 8 ("P and q are calculated from Table 1").
    Note that in it outliers are NOT rare per class (every class has the same number of test
    images). Its adaptive phase trains on IL classes only ("# OL train" = 0): `inliers_only`.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from typing import Sequence

import numpy as np

from oodjax import data
from oodjax.data.core import ImageDataset, channel_stats

# Probabilities must sum to 1 within this tolerance (they are usually written as decimals).
_SUM_TOL = 1e-6


@dataclasses.dataclass(frozen=True)
class Scenario:
  """Which classes a deployed stream shows, and how often.

  Give exactly one of `inlier_probability` (classes uniform within the inlier set and within the
  outlier set) or `priors` (one probability per class of `inliers + outliers`, in that order).
  Classes of the dataset named in neither set never appear.

  Attributes:
    name: e.g. "C1" or "zoo".
    inliers: the frequent (IL) class names.
    outliers: the rare (OL) class names; may be empty when `inlier_probability` is 1.
    inlier_probability: P(an image is an inlier), in [0, 1].
    priors: per-class probabilities over `inliers + outliers`, >= 0, summing to 1.
    description: what the scenario stands for.
  """
  name: str
  inliers: tuple[str, ...]
  outliers: tuple[str, ...]
  inlier_probability: float | None = None
  priors: tuple[float, ...] | None = None
  description: str = ""

  @property
  def classes(self) -> tuple[str, ...]:
    """`inliers + outliers`: the order of `priors` and of `class_priors()`."""
    return tuple(self.inliers) + tuple(self.outliers)

  def class_priors(self) -> tuple[float, ...]:
    """One probability per class of `classes` (call `validate` first for a meaningful result)."""
    if self.priors is not None:
      return tuple(float(p) for p in self.priors)
    p_in = float(self.inlier_probability)
    n_in, n_out = len(self.inliers), len(self.outliers)
    return (tuple(p_in / n_in for _ in self.inliers)
            + tuple((1.0 - p_in) / n_out for _ in self.outliers))


def validate(scenario: Scenario, class_names: Sequence[str]) -> Scenario:
  """Checks `scenario` against a dataset's class names; returns it unchanged for chaining.

  Args:
    scenario: the scenario to check.
    class_names: the K class names of the dataset the stream draws from (label order).

  Returns:
    `scenario`.

  Raises:
    ValueError: naming the first problem: no inlier classes; a class named twice; a class not in
      `class_names` (with the closest known names); a class that is both inlier and outlier;
      neither or both of `inlier_probability` and `priors`; a probability that is negative,
      above 1 or not finite; `priors` of the wrong length or not summing to 1; outlier
      probability left over with no outlier classes.
  """
  where = f"scenario {scenario.name!r}"
  inliers, outliers = tuple(scenario.inliers), tuple(scenario.outliers)
  if isinstance(scenario.inliers, str) or isinstance(scenario.outliers, str):
    raise ValueError(f"{where}: inliers and outliers must be sequences of class names, "
                     "not a single string")
  if not inliers:
    raise ValueError(f"{where}: needs at least one inlier class")
  for kind, names in (("inlier", inliers), ("outlier", outliers)):
    seen = set()
    for name in names:
      if name in seen:
        raise ValueError(f"{where}: {kind} class {name!r} is listed twice")
      seen.add(name)
  known = set(class_names)
  for name in inliers + outliers:
    if name not in known:
      close = difflib.get_close_matches(str(name), [str(c) for c in class_names], n=3)
      hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
      raise ValueError(f"{where}: unknown class {name!r}, not among the dataset's "
                       f"{len(class_names)} classes{hint}")
  both = sorted(set(inliers) & set(outliers))
  if both:
    raise ValueError(f"{where}: classes {both} are both inliers and outliers; the two sets "
                     "must be disjoint")
  if (scenario.inlier_probability is None) == (scenario.priors is None):
    raise ValueError(f"{where}: give exactly one of inlier_probability (uniform within each "
                     "set) or priors (one per class of inliers + outliers)")
  if scenario.priors is None:
    p_in = scenario.inlier_probability
    if not (isinstance(p_in, (int, float, np.floating)) and math.isfinite(p_in)
            and 0.0 <= p_in <= 1.0):
      raise ValueError(f"{where}: inlier_probability must be a number in [0, 1], got {p_in!r}")
    if not outliers and p_in < 1.0 - _SUM_TOL:
      raise ValueError(f"{where}: probabilities do not sum to 1: inlier_probability is {p_in} "
                       f"but there are no outlier classes to take the other {1.0 - p_in:.6g}")
    return scenario
  priors = np.asarray(scenario.priors, np.float64)
  if priors.shape != (len(inliers) + len(outliers),):
    raise ValueError(f"{where}: priors must have one value per class of inliers + outliers "
                     f"({len(inliers)} + {len(outliers)}), got shape {priors.shape}")
  if not np.all(np.isfinite(priors)):
    raise ValueError(f"{where}: priors must be finite, got {tuple(priors)}")
  if np.any(priors < 0):
    bad = [c for c, p in zip(inliers + outliers, priors) if p < 0]
    raise ValueError(f"{where}: priors must be >= 0; negative for {bad}")
  if abs(priors.sum() - 1.0) > _SUM_TOL:
    raise ValueError(f"{where}: probabilities do not sum to 1: the priors sum to "
                     f"{priors.sum():.9g}")
  return scenario


def class_probabilities(scenario: Scenario, class_names: Sequence[str]) -> np.ndarray:
  """The stream's class distribution over a dataset's labels.

  Args:
    scenario: validated here against `class_names`.
    class_names: the K class names of the dataset, in label order.

  Returns:
    [K] float64, summing to 1 (renormalised to remove the <= 1e-6 slack `validate` allows);
    0 for classes the scenario does not name.
  """
  validate(scenario, class_names)
  index = {name: k for k, name in enumerate(class_names)}
  p = np.zeros((len(class_names),), np.float64)
  for name, prior in zip(scenario.classes, scenario.class_priors()):
    p[index[name]] = prior
  return p / p.sum()


def inlier_mask(scenario: Scenario, class_names: Sequence[str]) -> np.ndarray:
  """[K] bool: True at the labels of the scenario's inlier classes."""
  inliers = set(scenario.inliers)
  return np.array([name in inliers for name in class_names], bool)


def inliers_only(scenario: Scenario) -> Scenario:
  """The same scenario with every outlier probability set to 0 (the paper's adaptive phase
  trains on IL images only: Table 1's "# OL train" is 0). Inlier priors keep their ratios."""
  if scenario.priors is None:
    return dataclasses.replace(scenario, inlier_probability=1.0)
  p_in = np.asarray(scenario.priors[:len(scenario.inliers)], np.float64)
  if p_in.sum() <= 0:
    raise ValueError(f"scenario {scenario.name!r}: the inliers have total probability 0")
  priors = tuple((p_in / p_in.sum()).tolist()) + (0.0,) * len(scenario.outliers)
  return dataclasses.replace(scenario, priors=priors)


# ---------------------------------------------------------------------------------------------
# CIFAR-100 (Table 7)

# The 100 fine labels in label order (alphabetical, as in the dataset's meta file).
CIFAR100_FINE_LABELS = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
)


@dataclasses.dataclass(frozen=True)
class Table1Row:
  """One row of the paper's Table 1, as printed.

  Attributes:
    pair: the row's "IL \\ OL super-classes" label.
    il_train, ol_train, il_test, ol_test, total_classes: its columns.
    images_per_class: test images per class: 100 (CIFAR-100 test set), 50 (Tiny-ImageNet
      validation set); not printed in the paper, implied by its text.
  """
  pair: str
  il_train: int
  ol_train: int
  il_test: int
  ol_test: int
  total_classes: int
  images_per_class: int

  @property
  def implied_class_counts(self) -> tuple[int, int]:
    """(#IL classes, #OL classes) implied by the test image counts."""
    return self.il_test // self.images_per_class, self.ol_test // self.images_per_class

  @property
  def inlier_probability(self) -> float:
    """IL test / (IL test + OL test): the share of inlier images in the inference stream."""
    return self.il_test / (self.il_test + self.ol_test)


TABLE1 = {
    "C1": Table1Row("aquatic animals \\ food container", 840, 0, 1200, 500, 17, 100),
    "C2": Table1Row("flora \\ electrical items", 630, 0, 900, 500, 14, 100),
    "C3": Table1Row("fruits \\ furniture", 350, 0, 500, 500, 10, 100),
    "C4": Table1Row("insects \\ manmade things", 560, 0, 800, 500, 13, 100),
    "C5": Table1Row("animals \\ people", 1750, 0, 2500, 500, 30, 100),
    "C6": Table1Row("outdoor places \\ vehicles", 420, 0, 600, 1000, 16, 100),
    "T1": Table1Row("animals \\ garments", 875, 0, 1250, 900, 43, 50),
    "T2": Table1Row("reptiles \\ edible items", 630, 0, 900, 800, 34, 50),
    "T3": Table1Row("aquatic animals \\ birds", 420, 0, 600, 250, 17, 50),
    "T4": Table1Row("household items \\ nature", 1432, 0, 2050, 700, 55, 50),
    "T5": Table1Row("vehicles \\ miscellaneous", 525, 0, 750, 1800, 51, 50),
}

# Where Table 7/8 list other class counts than Table 1 implies:
# name -> ((#IL, #OL) listed in Table 7/8, (#IL, #OL) implied by Table 1).
TABLE1_COUNT_MISMATCHES = {
    "C2": ((10, 5), (9, 5)),
    "C6": ((5, 10), (6, 10)),
    "T1": ((22, 18), (25, 18)),
    "T4": ((40, 14), (41, 14)),
    "T5": ((15, 37), (15, 36)),
}

# Table 7, with the dataset's label spellings. The paper writes plurals ("bottles", "orchids"),
# runs names together ("ray shark", "sunflower tulips") and misspells a few ("skyscrapper",
# "squirel", "racoon", "lawn-mover", "women"); "caps" among the food containers is CIFAR-100's
# "can" (the food-container super-class is bottle, bowl, can, cup, plate).
_CIFAR100_TABLE7 = {
    "C1": ("water animals", (
        "beaver", "dolphin", "otter", "seal", "whale", "aquarium_fish", "flatfish", "ray",
        "shark", "trout", "crab", "lobster"),
           "food containers", ("bottle", "bowl", "can", "cup", "plate")),
    "C2": ("flora", (
        "orchid", "poppy", "rose", "sunflower", "tulip", "maple_tree", "oak_tree", "palm_tree",
        "pine_tree", "willow_tree"),
           "household electric devices", ("clock", "keyboard", "lamp", "telephone",
                                          "television")),
    "C3": ("fruit and vegetables", ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
           "household furniture", ("bed", "chair", "couch", "table", "wardrobe")),
    "C4": ("insects", (
        "bee", "beetle", "butterfly", "caterpillar", "cockroach", "snail", "spider", "worm"),
           "manmade things", ("bridge", "castle", "house", "road", "skyscraper")),
    "C5": ("animals", (
        "camel", "cattle", "chimpanzee", "elephant", "kangaroo", "fox", "porcupine", "possum",
        "raccoon", "skunk", "hamster", "mouse", "rabbit", "shrew", "squirrel", "crocodile",
        "dinosaur", "lizard", "turtle", "snake", "bear", "leopard", "tiger", "lion", "wolf"),
           "people", ("baby", "boy", "girl", "man", "woman")),
    "C6": ("outdoor scene", ("cloud", "forest", "mountain", "plain", "sea"),
           "vehicles", (
               "bicycle", "bus", "motorcycle", "pickup_truck", "train", "lawn_mower", "rocket",
               "streetcar", "tank", "tractor")),
}

# ---------------------------------------------------------------------------------------------
# Tiny-ImageNet (Table 8)

# The 200 Tiny-ImageNet classes, each by the first synonym of its words.txt entry (any order).
TINY_IMAGENET_NAMES = (
    "goldfish", "European fire salamander", "bullfrog", "tailed frog", "American alligator",
    "boa constrictor", "trilobite", "scorpion", "black widow", "tarantula", "centipede", "koala",
    "jellyfish", "brain coral", "snail", "sea slug", "American lobster", "spiny lobster",
    "black stork", "king penguin", "albatross", "dugong", "Yorkshire terrier",
    "golden retriever", "Labrador retriever", "German shepherd", "standard poodle", "tabby",
    "Persian cat", "Egyptian cat", "cougar", "lion", "brown bear", "ladybug", "fly", "bee",
    "grasshopper", "walking stick", "cockroach", "mantis", "dragonfly", "monarch",
    "sulphur butterfly", "sea cucumber", "guinea pig", "hog", "ox", "bison", "bighorn",
    "gazelle", "Arabian camel", "orangutan", "chimpanzee", "baboon", "African elephant",
    "lesser panda", "abacus", "academic gown", "altar", "apron", "backpack", "bannister",
    "barbershop", "barn", "barrel", "basketball", "bathtub", "beach wagon", "beacon", "beaker",
    "beer bottle", "bikini", "binoculars", "birdhouse", "bow tie", "brass", "broom", "bucket",
    "bullet train", "butcher shop", "candle", "cannon", "cardigan", "cash machine", "CD player",
    "chain", "chest", "Christmas stocking", "cliff dwelling", "computer keyboard",
    "confectionery", "convertible", "crane", "dam", "desk", "dining table", "drumstick",
    "dumbbell", "flagpole", "fountain", "freight car", "frying pan", "fur coat", "gasmask",
    "go-kart", "gondola", "hourglass", "iPod", "jinrikisha", "kimono", "lampshade", "lawn mower",
    "lifeboat", "limousine", "magnetic compass", "maypole", "military uniform", "miniskirt",
    "moving van", "nail", "neck brace", "obelisk", "oboe", "organ", "parking meter",
    "pay-phone", "picket fence", "pill bottle", "plunger", "pole", "police van", "poncho",
    "pop bottle", "potter's wheel", "projectile", "punching bag", "reel", "refrigerator",
    "remote control", "rocking chair", "rugby ball", "sandal", "school bus", "scoreboard",
    "sewing machine", "snorkel", "sock", "sombrero", "space heater", "spider web", "sports car",
    "steel arch bridge", "stopwatch", "sunglasses", "suspension bridge", "swimming trunks",
    "syringe", "teapot", "teddy", "thatch", "torch", "tractor", "triumphal arch", "trolleybus",
    "turnstile", "umbrella", "vestment", "viaduct", "volleyball", "water jug", "water tower",
    "wok", "wooden spoon", "comic book", "plate", "guacamole", "ice cream", "ice lolly",
    "pretzel", "mashed potato", "cauliflower", "bell pepper", "mushroom", "orange", "lemon",
    "banana", "pomegranate", "meat loaf", "pizza", "potpie", "espresso", "alp", "cliff",
    "coral reef", "lakeside", "seashore", "acorn", "goose", "Chihuahua", "slug",
)

# Table 8, paired as in Table 1 (see the module docstring). Spellings follow words.txt
# ("go-kart", "pay-phone"); the paper's run-together names are split ("lesser panda golden
# retriever", "projectile cannon") or joined ("pill, bottle" is the class "pill bottle").
_TINY_IMAGENET_TABLE8 = {
    "T1": ("animals", (
        "Labrador retriever", "hog", "Chihuahua", "orangutan", "chimpanzee", "koala",
        "lesser panda", "golden retriever", "lion", "baboon", "African elephant",
        "Yorkshire terrier", "bison", "standard poodle", "cougar", "gazelle", "ox",
        "Egyptian cat", "Persian cat", "German shepherd", "guinea pig", "bighorn"),
           "garments", (
               "swimming trunks", "apron", "poncho", "academic gown", "military uniform",
               "neck brace", "vestment", "kimono", "sombrero", "fur coat", "cardigan", "bikini",
               "miniskirt", "bow tie", "sunglasses", "sandal", "sock", "Christmas stocking")),
    "T2": ("reptiles / insects", (
        "European fire salamander", "bee", "scorpion", "fly", "black widow", "ladybug", "slug",
        "cockroach", "grasshopper", "centipede", "mantis", "sulphur butterfly", "dragonfly",
        "snail", "boa constrictor", "spider web", "trilobite", "tarantula"),
           "edible items", (
               "orange", "pizza", "mushroom", "banana", "ice cream", "pomegranate", "pretzel",
               "mashed potato", "potpie", "cauliflower", "meat loaf", "bell pepper",
               "guacamole", "lemon", "ice lolly", "confectionery")),
    "T3": ("aquatic animals", (
        "brain coral", "American lobster", "American alligator", "tailed frog",
        "spiny lobster", "sea slug", "dugong", "coral reef", "bullfrog", "sea cucumber",
        "jellyfish", "goldfish"),
           "birds", ("black stork", "goose", "king penguin", "albatross", "crane")),
    "T4": ("household items", (
        "picket fence", "candle", "chain", "rocking chair", "torch", "iPod", "frying pan",
        "dumbbell", "water jug", "teddy", "plate", "walking stick", "computer keyboard",
        "bucket", "comic book", "sewing machine", "remote control", "teapot", "barn",
        "volleyball", "lawn mower", "hourglass", "desk", "lampshade", "bathtub", "wok",
        "CD player", "rugby ball", "stopwatch", "magnetic compass", "space heater", "plunger",
        "backpack", "wooden spoon", "broom", "dining table", "basketball", "punching bag",
        "refrigerator", "umbrella"),
           "places / manmade things", (
               "seashore", "water tower", "triumphal arch", "cliff dwelling",
               "suspension bridge", "dam", "steel arch bridge", "cliff", "monarch", "obelisk",
               "lakeside", "fountain", "altar", "alp")),
    "T5": ("vehicles", (
        "school bus", "lifeboat", "jinrikisha", "beach wagon", "tractor", "moving van",
        "trolleybus", "police van", "go-kart", "freight car", "bullet train", "sports car",
        "gondola", "limousine", "convertible"),
           "miscellaneous", (
               "beaker", "parking meter", "drumstick", "reel", "potter's wheel", "beacon",
               "acorn", "gasmask", "projectile", "cannon", "cash machine", "maypole",
               "pay-phone", "flagpole", "bannister", "thatch", "pill bottle", "pop bottle",
               "barbershop", "birdhouse", "binoculars", "organ", "abacus", "nail", "turnstile",
               "beer bottle", "oboe", "viaduct", "scoreboard", "barrel", "pole", "syringe",
               "chest", "butcher shop", "espresso", "snorkel", "brass")),
}


def _paper_scenarios(table: dict) -> dict[str, Scenario]:
  out = {}
  for name, (il_title, il, ol_title, ol) in table.items():
    row = TABLE1[name]
    out[name] = Scenario(
        name, il, ol, inlier_probability=row.inlier_probability,
        description=f"{il_title} \\ {ol_title} (Table 1: {row.pair})")
  return out


CIFAR100_SCENARIOS = _paper_scenarios(_CIFAR100_TABLE7)
TINY_IMAGENET_SCENARIOS = _paper_scenarios(_TINY_IMAGENET_TABLE8)

# ---------------------------------------------------------------------------------------------
# Embedded: a 20-class teacher over Fashion-MNIST (labels 0-9) + Animal-MNIST (labels 10-19)

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
ANIMAL_MNIST_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse",
                        "sheep", "zebra")
FASHION_ANIMAL_CLASSES = FASHION_MNIST_CLASSES + ANIMAL_MNIST_CLASSES

# Our choice (the paper has no such scenarios): 9 in 10 images come from the frequent set.
EMBEDDED_INLIER_PROBABILITY = 0.9

EMBEDDED_SCENARIOS = {
    "zoo": Scenario("zoo", ANIMAL_MNIST_CLASSES, FASHION_MNIST_CLASSES,
                    inlier_probability=EMBEDDED_INLIER_PROBABILITY,
                    description="a camera in a zoo: animals frequent, garments rare"),
    "shop": Scenario("shop", FASHION_MNIST_CLASSES, ANIMAL_MNIST_CLASSES,
                     inlier_probability=EMBEDDED_INLIER_PROBABILITY,
                     description="a camera in a clothes shop: garments frequent, animals rare"),
    # Finer splits inside one dataset: harder, the outliers look like the inliers' neighbours.
    # Classes in neither set (trousers, dresses, bags; the farm animals' neighbours) never appear.
    "tops": Scenario("tops", ("T-shirt/top", "Pullover", "Coat", "Shirt"),
                     ("Sandal", "Sneaker", "Ankle boot"),
                     inlier_probability=EMBEDDED_INLIER_PROBABILITY,
                     description="a shirt stall: tops frequent, footwear rare"),
    "footwear": Scenario("footwear", ("Sandal", "Sneaker", "Ankle boot", "Bag"),
                         ("T-shirt/top", "Trouser", "Dress"),
                         inlier_probability=EMBEDDED_INLIER_PROBABILITY,
                         description="a shoe shop: footwear and bags frequent, garments rare"),
    "wildlife": Scenario("wildlife", ("bear", "elephant", "giraffe", "zebra"),
                         ("cow", "horse", "sheep"),
                         inlier_probability=EMBEDDED_INLIER_PROBABILITY,
                         description="a game reserve: wild animals frequent, farm animals rare"),
}

# Animal-MNIST ships as one 10,000-image set (1,000 per class). We split it per class in file
# order: the first 700 images of each class train, the last 300 test (Fashion-MNIST's embedded
# test split also has 300 per class). A fixed split needs no seed and cannot drift.
ANIMAL_TRAIN_PER_CLASS = 700


@functools.lru_cache(maxsize=None)
def fashion_animal_dataset(split: str = "train") -> ImageDataset:
  """The 20-class embedded set: Fashion-MNIST labels 0-9, Animal-MNIST labels 10-19.

  Train: 20,000 Fashion-MNIST + 7,000 Animal-MNIST images; test: 3,000 + 3,000 (300 per
  class), in that order (a slice of the first N images holds garments only). Both splits carry the mean/std of the combined train split. Cached per process; its
  arrays are read-only.

  Args:
    split: "train" or "test".

  Returns:
    ImageDataset "embedded/fashion_animal" with [N, 28, 28, 1] uint8 images, labels in
    [0, 20) and class names `FASHION_ANIMAL_CLASSES`.
  """
  if split not in ("train", "test"):
    raise ValueError(f"the fashion+animal set has splits 'train' and 'test', not {split!r}")
  parts = [_fashion_animal_split(s) for s in ("train", "test")]
  mean, std = channel_stats(parts[0][0])
  images, labels = parts[0] if split == "train" else parts[1]
  images.flags.writeable = False
  labels.flags.writeable = False
  return data.validate(ImageDataset(images, labels, mean, std, FASHION_ANIMAL_CLASSES,
                                    "embedded/fashion_animal"))


def _fashion_animal_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  fashion = data.load("embedded/fashion_mnist", split)
  animal = data.load("embedded/animal_mnist")
  if (fashion.class_names != FASHION_MNIST_CLASSES
      or animal.class_names != ANIMAL_MNIST_CLASSES):
    raise ValueError("the embedded Fashion-MNIST / Animal-MNIST class names changed: "
                     f"{fashion.class_names}, {animal.class_names}")
  picks = []
  for k in range(len(ANIMAL_MNIST_CLASSES)):
    where = np.flatnonzero(animal.labels == k)  # file order
    picks.append(where[:ANIMAL_TRAIN_PER_CLASS] if split == "train"
                 else where[ANIMAL_TRAIN_PER_CLASS:])
  pick = np.concatenate(picks)
  images = np.concatenate([fashion.images, animal.images[pick]])  # [N, 28, 28, 1]
  labels = np.concatenate([fashion.labels.astype(np.int32),
                           animal.labels[pick].astype(np.int32) + len(FASHION_MNIST_CLASSES)])
  return images, labels
