"""The `oodjax` command line.

  oodjax train    --config configs/NAME.py[:ARG] --workdir DIR [--set key=value ...]
  oodjax train    ... --stream   (a tfds/ training set read batch by batch, not into memory)
  oodjax evaluate --config ... --workdir DIR   (scores a trained checkpoint in DIR)
  oodjax run      --config ... --workdir DIR   (train, resuming if interrupted, then evaluate)
  oodjax import-torch CHECKPOINT --config ... --workdir DIR [--layout NAME]
                  (a PyTorch state dict into DIR/imported/, which `evaluate` and `run` then
                  score instead of training a classifier; `oodjax.models.torch_import`)

Several processes (TPU pod slices, multi-GPU hosts, Slurm): `oodjax train` on every process
with OODJAX_DISTRIBUTED=auto, or OODJAX_COORDINATOR_ADDRESS, OODJAX_NUM_PROCESSES and
OODJAX_PROCESS_ID set (`oodjax.train.distributed`); evaluation then runs on one process.

A config with an `envise` section also runs ENVISE after the evaluation (`run` and `evaluate`),
with the classifier as the frozen teacher, in DIR/envise (`oodjax.envise.pipeline`).
  oodjax data list [--data-dir DIR]
  oodjax data prepare NAME [--data-dir DIR] [--manual-dir DIR]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time


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
  from oodjax.train import distributed
  # Before anything touches a device: a multi-process run connects its processes first.
  if distributed.initialize(config) and args.command != "train":
    raise ValueError(f"`oodjax {args.command}` runs on one process; train with several "
                     "(`oodjax train`), then evaluate on one: the checkpoint restores into any "
                     "mesh")
  from oodjax.detectors import REGISTRY
  from oodjax.evaluate import check_plan  # a bad detector list fails now, not after training
  check_plan(config.eval.detectors, REGISTRY, config.eval.holdout)
  wanted = sorted(d for d in config.eval.detectors if REGISTRY[d].network == "vmdls")
  if wanted and "vmdls" not in config:
    raise ValueError(f"{wanted} score a VMDLS encoder: the config needs a `vmdls` section "
                     "(oodjax.vmdls.vmdls_config())")
  if getattr(args, "stream", False):
    train_ds, test_ds = _streamed_sets(config, args.data_dir)
  else:
    train_ds = data.load_config_dataset(config, "train", data_dir=args.data_dir)
    test_ds = data.load_config_dataset(config, "test", data_dir=args.data_dir)
    if config.get("train_size"):
      train_ds = train_ds.take(slice(0, config.train_size))
    data.validate(train_ds, require_labels=True)
  data.validate(test_ds, require_labels=True)
  model = models.get_model(config.model, num_classes=train_ds.num_classes)
  if _runs_envise(config):  # scenarios, students and gates checked before any training
    from oodjax.envise.pipeline import check_envise_config
    check_envise_config(config, train_ds.class_names)
  if "vmdls" in config and not getattr(args, "stream", False):  # errors before any training
    from oodjax.train.sharding import make_mesh
    from oodjax.vmdls.train import check_vmdls_config
    check_vmdls_config(config, train_ds, make_mesh(config.mesh.shape, config.mesh.axes))
  return config, model, train_ds, test_ds


def _streamed_sets(config, data_dir):
  """`oodjax train --stream`: the training split read batch by batch, the test split (for the
  evaluation at checkpoints) in memory with the training statistics."""
  from oodjax.data import streaming, tfds_sources
  if not config.dataset.startswith("tfds/"):
    raise ValueError(f"--stream reads TFDS array_record sets (dataset tfds/NAME), not "
                     f"{config.dataset!r}, which loads into memory anyway")
  spec = config.dataset.removeprefix("tfds/")
  norm = config.get("normalization") or {}
  # Statistics of the whole training split, as the in-memory path takes them.
  train_ds = streaming.stream_tfds(spec, "train", data_dir=data_dir, mean=norm.get("mean"),
                                   std=norm.get("std"))
  if config.get("train_size"):
    train_ds = streaming.stream_tfds(spec, f"train[:{int(config.train_size)}]",
                                     data_dir=data_dir, mean=train_ds.mean, std=train_ds.std)
  test_ds = tfds_sources.load_tfds(spec, "test", data_dir=data_dir,
                                   stats=(train_ds.mean, train_ds.std))
  return train_ds, test_ds


def _variables(state):
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return variables


def _imported(args, model, train_ds):
  """The variables `oodjax import-torch` stored in the workdir (checked), or None."""
  from oodjax.models.torch_import import describe_import, load_imported
  variables = load_imported(args.workdir, model, train_ds.image_shape)
  if variables is not None:
    print(f"classifier: {describe_import(args.workdir)}; not trained here")
  return variables


def _classifier(args, config, model, train_ds, test_ds, restore_only: bool = False):
  """The classifier's variables: imported ones if the workdir has them, else trained (resuming
  or restoring the workdir's run)."""
  from oodjax.train.classifier import train_classifier
  variables = _imported(args, model, train_ds)
  if variables is not None:
    return variables
  state, _ = train_classifier(config, args.workdir, model=model, train_ds=train_ds,
                              eval_ds=None if restore_only else test_ds,
                              progress=not args.no_progress, restore_only=restore_only)
  return _variables(state)


def _reports_vmdls(config) -> bool:
  """Whether the report has VMDLS rows (`run`/`evaluate` train or restore the encoder only
  then; `train` trains it whenever the config has a `vmdls` section)."""
  from oodjax.detectors import REGISTRY
  return any(REGISTRY[d].network == "vmdls" for d in config.eval.detectors)


def _train_vmdls(args, config, train_ds, test_ds, restore_only: bool = False):
  """The VMDLS encoder of a config with a `vmdls` section, in WORKDIR/vmdls."""
  from oodjax import models
  from oodjax.vmdls.train import train_vmdls
  backbone = models.get_model(config.vmdls.get("backbone") or config.model,
                              num_classes=train_ds.num_classes)
  if config.vmdls.get("train_size"):
    train_ds = train_ds.take(slice(0, config.vmdls.train_size))
  encoder, state, _ = train_vmdls(config, os.path.join(args.workdir, "vmdls"),
                                  backbone=backbone, train_ds=train_ds, eval_ds=test_ds,
                                  progress=not args.no_progress, restore_only=restore_only)
  return encoder, state


def _evaluate(args, config, model, variables, vmdls=None) -> None:
  from oodjax.evaluate import run_evaluation

  networks = {}
  if vmdls is not None:
    encoder, vmdls_state = vmdls
    networks["vmdls"] = (encoder, _variables(vmdls_state))
  run_evaluation(config, args.workdir, model, variables, data_dir=args.data_dir,
                 progress=not args.no_progress, config_name=args.config, networks=networks)
  print((pathlib.Path(args.workdir) / "results.md").read_text())
  print(f"wrote results.json, results.md, plots/ and detectors/ to {args.workdir}")


def _runs_envise(config) -> bool:
  return "envise" in config and bool(config.envise.enabled)


def _run_envise(args, config, model, variables) -> None:
  """ENVISE with the classifier as its frozen teacher, in WORKDIR/envise (resumable)."""
  from oodjax.envise.pipeline import run_envise
  workdir = pathlib.Path(args.workdir) / "envise"
  run_envise(config, workdir, teacher=model, teacher_variables=variables,
             data_dir=args.data_dir, progress=not args.no_progress)
  print((workdir / "results.md").read_text())
  print(f"wrote ENVISE's results.json, results.md, figure3.png and gradcam_overlay.png to "
        f"{workdir}")


def _cmd_train(args):
  from oodjax.models.torch_import import imported_path
  config, model, train_ds, test_ds = _load_experiment(args)
  if imported_path(args.workdir).exists():
    raise ValueError(f"{args.workdir} holds imported weights ({imported_path(args.workdir)}): "
                     "`oodjax evaluate` scores them; train in another workdir")
  _classifier(args, config, model, train_ds, test_ds)
  if "vmdls" in config and args.stream:
    print("VMDLS encoder not trained: its class-balanced batches need the training set in "
          "memory (train without --stream for it)")
  elif "vmdls" in config:
    _train_vmdls(args, config, train_ds, test_ds)


def _cmd_run(args):
  config, model, train_ds, test_ds = _load_experiment(args)
  start = time.time()
  variables = _classifier(args, config, model, train_ds, test_ds)
  trained = time.time()
  stages = [f"training the classifier {trained - start:.0f} s"]
  vmdls = None
  if _reports_vmdls(config):
    vmdls = _train_vmdls(args, config, train_ds, test_ds)
    stages.append(f"training the VMDLS encoder {time.time() - trained:.0f} s")
    trained = time.time()
  _evaluate(args, config, model, variables, vmdls)
  evaluated = time.time()
  stages.append(f"evaluation {evaluated - trained:.0f} s (fits, incl. VMDLS's autoencoder, "
                "and scores)")
  if _runs_envise(config):
    _run_envise(args, config, model, variables)
    stages.append(f"ENVISE {time.time() - evaluated:.0f} s (online runs with the classifier as "
                  "teacher, gates, plots)")
  print("time per stage (0 s when resumed from a finished run): " + ", ".join(stages))


def _cmd_evaluate(args):
  config, model, train_ds, test_ds = _load_experiment(args)
  variables = _classifier(args, config, model, train_ds, test_ds, restore_only=True)
  vmdls = _train_vmdls(args, config, train_ds, test_ds, restore_only=True) \
      if _reports_vmdls(config) else None
  _evaluate(args, config, model, variables, vmdls)
  if _runs_envise(config):
    _run_envise(args, config, model, variables)


def _cmd_import_torch(args):
  """Converts a PyTorch state dict for the config's model and stores it in WORKDIR/imported."""
  import jax

  from oodjax import models
  from oodjax.config import load_config
  from oodjax.models import torch_import
  config = load_config(args.config, args.overrides)
  state_dict = torch_import.load_torch_state_dict(args.checkpoint)
  layout = args.layout or torch_import.detect_layout(state_dict)
  num_classes = torch_import.num_classes_of(state_dict, layout)
  model = models.get_model(config.model, num_classes=num_classes)
  variables = torch_import.import_state_dict(state_dict, model, layout=layout)
  path = torch_import.save_imported(args.workdir, variables, {
      "source": os.path.abspath(args.checkpoint),
      "sha256": torch_import.file_sha256(args.checkpoint), "layout": layout,
      "model": config.model, "num_classes": num_classes, "config": args.config,
      "overrides": list(args.overrides), "tensors": len(state_dict)})
  size = sum(int(x.size) for x in jax.tree.leaves(variables["params"]))
  print(f"imported {len(state_dict)} tensors ({layout} layout) into {config.model} with "
        f"K = {num_classes} ({size:,} parameters): {path}")
  norm = config.get("normalization")
  if norm is None or norm.get("mean") is None:
    print("note: this config normalises inputs with its training set's own per-channel "
          "statistics; if the checkpoint was trained with other ones, set them with "
          "--set normalization.mean=... (a config with a `normalization` section, as "
          "configs/odin_cifar.py has)")
  print(f"next: oodjax evaluate --config {args.config} --workdir {args.workdir}")


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
    if name == "train":
      p.add_argument("--stream", action="store_true",
                     help="read a tfds/ training set batch by batch instead of loading it into "
                     "memory (oodjax.data.streaming; for sets larger than memory)")
  p = sub.add_parser("import-torch", help="import a PyTorch checkpoint (state dict) into a "
                     "workdir for `evaluate` (needs torch: pip install 'oodjax[torch]')")
  p.add_argument("checkpoint", help="a .pth/.pt file holding a state dict (read with "
                 "torch.load(weights_only=True): a whole pickled model is refused)")
  p.add_argument("--config", required=True, help="the config whose model the weights fill "
                 "and which `oodjax evaluate` then runs: configs/NAME.py[:ARG]")
  p.add_argument("--workdir", required=True, help="where the weights go (WORKDIR/imported/)")
  p.add_argument("--layout", default=None, help="the checkpoint's layout (default: detected "
                 "from its keys): resnet_torchvision, resnet_kuangliu, densenet_odin, wrn_odin")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config entry")
  p.set_defaults(fn=_cmd_import_torch)
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
  """Runs a command; a user error (a ValueError, a missing file, a missing optional
  dependency) is one line, exit status 2.

  Anything else is a bug and keeps its traceback. OODJAX_DEBUG=1 shows the traceback of user
  errors too.
  """
  args = build_parser().parse_args(argv)
  try:
    args.fn(args)
  except (ValueError, FileNotFoundError, ImportError) as e:
    if os.environ.get("OODJAX_DEBUG"):
      raise
    print(f"oodjax: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
