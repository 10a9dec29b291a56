"""The `oodjax` command line.

  oodjax train    --config configs/NAME.py[:ARG] --workdir DIR [--set key=value ...]
  oodjax evaluate --config ... --workdir DIR   (scores a trained checkpoint in DIR)
  oodjax run      --config ... --workdir DIR   (train, resuming if interrupted, then evaluate)
  oodjax data list [--data-dir DIR]
  oodjax data prepare NAME [--data-dir DIR] [--manual-dir DIR]
"""
from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time

import numpy as np


def _add_experiment_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", required=True,
                      help="config file, optionally with an argument: configs/NAME.py[:ARG]")
  parser.add_argument("--workdir", required=True,
                      help="folder for checkpoints, metrics.jsonl and results")
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE", help="override a config entry, e.g. train.num_epochs=2")
  parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
  parser.add_argument("--data-dir", default=None,
                      help="TFDS data folder for tfds/ datasets (default: TFDS's)")


def _load_experiment(args):
  """Config, model and datasets of an experiment, all validated before any computation."""
  from oodjax import data, models
  from oodjax.config import load_config

  config = load_config(args.config, args.overrides)
  train_ds = data.load(config.dataset, "train", seed=config.seed, data_dir=args.data_dir)
  test_ds = data.load(config.dataset, "test", seed=config.seed, data_dir=args.data_dir)
  if config.get("train_size"):
    train_ds = train_ds.take(slice(0, config.train_size))
  data.validate(train_ds, require_labels=True)
  data.validate(test_ds, require_labels=True)
  model = models.get_model(config.model, num_classes=train_ds.num_classes)
  return config, model, train_ds, test_ds


def _train(args, config, model, train_ds, test_ds):
  from oodjax.train.classifier import train_classifier
  return train_classifier(config, args.workdir, model=model, train_ds=train_ds,
                          eval_ds=test_ds, progress=not args.no_progress)


def _evaluate(args, config, model, state, test_ds) -> dict:
  from oodjax import data, detectors, evaluate

  ood_sets = {}
  for name in config.eval.ood_sets:
    ds = data.load(name, "test", seed=config.eval.ood_seed, data_dir=args.data_dir,
                   size=config.eval.get("ood_size"))
    data.check_compatible(test_ds, ds)
    ood_sets[name] = ds
  odin_names = (evaluate.ODIN, evaluate.ODIN_NO_OOD)
  sample_free_names = ("indicators", "1c_sum", "supervised", "odin_sf")
  known = sorted(detectors.DETECTORS) + list(odin_names) + list(sample_free_names)
  unknown = [d for d in config.eval.detectors if d not in known]
  if unknown:
    raise ValueError(f"unknown detectors {unknown}; known: {known}")
  simple = {name: detectors.DETECTORS[name] for name in config.eval.detectors
            if name in detectors.DETECTORS}
  odin = None
  if any(name in odin_names for name in config.eval.detectors):
    odin = dict(config.eval.odin)
    odin["tuned_on_ood"] = evaluate.ODIN in config.eval.detectors
    odin["tuned_without_ood"] = evaluate.ODIN_NO_OOD in config.eval.detectors
  apply_fn = functools.partial(model.apply, train=False)
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  sample_free = None
  chosen_sf = [name for name in config.eval.detectors if name in sample_free_names]
  if chosen_sf:
    sample_free = {"indicators": "indicators" in chosen_sf, "one_c_sum": "1c_sum" in chosen_sf,
                   "supervised": "supervised" in chosen_sf, "odin": "odin_sf" in chosen_sf}
    if sample_free["one_c_sum"]:
      sample_free["noise_stats"] = _noise_stats(args, config, model, variables, test_ds)
  start = time.time()
  results, scores = evaluate.evaluate_ood(
      apply_fn, variables, test_ds, ood_sets, simple, config.eval.batch_size, odin=odin,
      holdout=config.eval.holdout, seed=config.eval.split_seed, progress=not args.no_progress,
      model=model, sample_free=sample_free)
  results["config"] = args.config
  results["seconds"] = round(time.time() - start, 1)
  report = evaluate.write_results(results, args.workdir,
                                  title=f"{config.model} on {config.dataset}", scores=scores)
  print(report)
  print(f"wrote results.json, results.md and plots/ to {args.workdir}")
  return results


def _noise_stats(args, config, model, variables, test_ds) -> dict:
  """1C-Sum's noise statistics: fitted once per trained model, kept in workdir/noise_stats.json.

  The file is refitted when its settings (N, seed, image shape, normalisation) differ from the
  config's, or when the checkpoint it was fitted on is newer than it.
  """
  from oodjax.detectors import onecsum
  path = pathlib.Path(args.workdir) / "noise_stats.json"
  n, seed = int(config.eval.sample_free.noise_n), int(config.eval.sample_free.noise_seed)
  want = {"n": n, "seed": seed, "image_shape": list(test_ds.image_shape),
          "input_mean": list(test_ds.mean), "input_std": list(test_ds.std)}
  checkpoints = pathlib.Path(args.workdir) / "checkpoints"
  newest = max((p.stat().st_mtime for p in checkpoints.iterdir()), default=0.0) \
      if checkpoints.is_dir() else 0.0
  if path.is_file() and path.stat().st_mtime >= newest:
    stats = onecsum.load_noise_stats(path)
    if all(_close(stats.get(k), v) for k, v in want.items()):
      return stats
  print(f"fitting 1C-Sum noise statistics on {n} uniform-noise images (seed {seed})")
  stats = onecsum.fit_noise_stats(model, variables, test_ds.image_shape, test_ds.mean,
                                  test_ds.std, n=n, seed=seed,
                                  batch_size=config.eval.batch_size)
  onecsum.save_noise_stats(path, stats)
  return stats


def _close(a, b) -> bool:
  try:
    return bool(np.allclose(np.asarray(a, float), np.asarray(b, float)))
  except (TypeError, ValueError):
    return False


def _cmd_train(args):
  config, model, train_ds, test_ds = _load_experiment(args)
  _train(args, config, model, train_ds, test_ds)


def _cmd_run(args):
  config, model, train_ds, test_ds = _load_experiment(args)
  state, _ = _train(args, config, model, train_ds, test_ds)
  _evaluate(args, config, model, state, test_ds)


def _cmd_evaluate(args):
  from oodjax.train.classifier import train_classifier
  config, model, train_ds, test_ds = _load_experiment(args)
  state, _ = train_classifier(config, args.workdir, model=model, train_ds=train_ds,
                              restore_only=True)
  _evaluate(args, config, model, state, test_ds)


def _cmd_data_list(args):
  from oodjax.data import prepare
  print(prepare.describe(data_dir=args.data_dir))


def _cmd_data_prepare(args):
  from oodjax.data import prepare
  prepare.prepare(args.name, data_dir=args.data_dir, manual_dir=args.manual_dir)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="oodjax", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  for name, fn, help_ in (("train", _cmd_train, "train a classifier (resumes automatically)"),
                          ("evaluate", _cmd_evaluate, "score a trained model against OOD sets"),
                          ("run", _cmd_run, "train, then evaluate: the main job")):
    p = sub.add_parser(name, help=help_)
    _add_experiment_args(p)
    p.set_defaults(fn=fn)
  data_parser = sub.add_parser("data", help="list or prepare datasets")
  data_sub = data_parser.add_subparsers(dest="data_command", required=True)
  p = data_sub.add_parser("list", help="embedded and prepared datasets")
  p.add_argument("--data-dir", default=None, help="TFDS data folder (default: TFDS's)")
  p.set_defaults(fn=_cmd_data_list)
  p = data_sub.add_parser("prepare", help="prepare a TFDS dataset as array_record "
                          "(needs the `prepare` extra: pip install 'oodjax[prepare]')")
  p.add_argument("name", help="TFDS name, e.g. cifar10")
  p.add_argument("--data-dir", default=None, help="TFDS data folder (default: TFDS's)")
  p.add_argument("--manual-dir", default=None,
                 help="folder holding the original archives, so nothing is downloaded")
  p.set_defaults(fn=_cmd_data_prepare)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    args.fn(args)
  except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
    print(f"oodjax: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
