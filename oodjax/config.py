"""Loading experiment configs: `configs/NAME.py[:ARG]` files returning locked ConfigDicts.

A config file defines `get_config(arg: str | None = None) -> ml_collections.ConfigDict`, as in
big_vision. The returned dict is locked before overrides are applied, so `--set trian.x=1`
(a misspelled key) is an error instead of a silently ignored setting.
"""
from __future__ import annotations

import ast
import importlib.util
import pathlib
from typing import Sequence

import ml_collections


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` and applies `key.sub=value` overrides.

  Args:
    spec: a config file path, optionally followed by `:arg` which is passed to `get_config`
      (e.g. `configs/fmnist_small_cnn.py:smoke`).
    overrides: strings `dotted.key=value`; the value is read as a Python literal when it
      parses as one (`3`, `0.1`, `(0.5, 0.75)`, `True`), else taken as a string.

  Returns:
    The locked config.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the file has no `get_config`, an override is malformed or of the wrong type.
    ValueError: an override names a key the config does not have (a user error, reported as
      one line by the CLI, like every ValueError).
  """
  path_str, _, arg = spec.partition(":")
  path = pathlib.Path(path_str)
  if not path.is_file():
    raise FileNotFoundError(f"config file {path_str!r} not found")
  module_spec = importlib.util.spec_from_file_location(f"_oodjax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path_str} defines no get_config(arg=None)")
  config = module.get_config(arg or None)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f"{path_str}:get_config returned {type(config).__name__}, not a ConfigDict")
  config.lock()
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep or not key:
      raise ValueError(f"override {item!r} is not of the form key.sub=value")
    _set(config, key.strip(), _parse(raw.strip()))
  return config


def _parse(raw: str):
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw


def _set(config: ml_collections.ConfigDict, dotted: str, value) -> None:
  *parents, leaf = dotted.split(".")
  node = config
  for i, name in enumerate(parents):
    if name not in node:
      raise ValueError(f"config has no key {'.'.join(parents[:i + 1])!r} "
                     f"(known: {', '.join(sorted(node.keys()))})")
    node = node[name]
  if leaf not in node:
    raise ValueError(f"config has no key {dotted!r} (known at that level: "
                   f"{', '.join(sorted(node.keys()))})")
  if isinstance(node[leaf], tuple) and isinstance(value, list):
    value = tuple(value)
  try:
    node[leaf] = value
  except TypeError as e:  # a value of the wrong type is the user's error, not a bug
    raise ValueError(f"override {dotted}={value!r}: {e}") from e
