"""Config loading: locked dicts, overrides, and errors for misspelled keys."""
import pathlib

import pytest

from oodjax.config import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAIN = str(ROOT / "configs" / "fmnist_small_cnn.py")


def test_loads_and_applies_overrides():
  config = load_config(MAIN, ["train.num_epochs=2", "train.lr_drop_at=[0.3, 0.6]",
                              "model=small_cnn_tiny"])
  assert config.train.num_epochs == 2
  assert config.train.lr_drop_at == (0.3, 0.6)
  assert config.model == "small_cnn_tiny"


def test_argument_selects_variant():
  assert load_config(MAIN + ":smoke").train_size == 2048
  assert load_config(MAIN).train_size is None
  with pytest.raises(ValueError, match="unknown config argument"):
    load_config(MAIN + ":nonsense")


@pytest.mark.parametrize("override", ["trian.num_epochs=2", "train.num_epoch=2", "sed=1"])
def test_misspelled_key_is_an_error(override):
  with pytest.raises(ValueError, match="no key"):
    load_config(MAIN, [override])


def test_locked_config_rejects_new_keys():
  config = load_config(MAIN)
  with pytest.raises(AttributeError):
    config.new_key = 1


def test_wrong_type_is_an_error():
  with pytest.raises(ValueError, match="num_epochs"):
    load_config(MAIN, ["train.num_epochs=many"])


def test_malformed_override_and_missing_file(tmp_path):
  with pytest.raises(ValueError, match="key.sub=value"):
    load_config(MAIN, ["train.num_epochs"])
  with pytest.raises(FileNotFoundError):
    load_config(str(tmp_path / "nope.py"))
  (tmp_path / "bad.py").write_text("x = 1\n")
  with pytest.raises(ValueError, match="get_config"):
    load_config(str(tmp_path / "bad.py"))
