"""Reading numpy arrays out of pickle files without running arbitrary code.

`pickle.load` calls whatever callable the file names (`os.system` included), so a pickle from a
package index is code, not data. Some datasets are only published as pickled numpy arrays
(Animal-MNIST ships gzipped pickles). The unpickler here resolves only the few globals that
numpy array reconstruction uses and refuses everything else.
"""
from __future__ import annotations

import io
import pickle
from typing import BinaryIO

import numpy as np


def _allowed_globals() -> dict[tuple[str, str], object]:
  # numpy 1.x pickles name `numpy.core.multiarray`; numpy 2.x writes `numpy._core.multiarray`.
  # Both map to the same function; we return it directly rather than importing `numpy.core`,
  # which numpy 2 deprecates.
  import _codecs
  reconstruct = np._core.multiarray._reconstruct
  return {
      # Protocols 0-2 have no bytes opcode and store an array's buffer as
      # _codecs.encode(latin-1 str): a pure text-to-bytes conversion.
      ("_codecs", "encode"): _codecs.encode,
      ("numpy.core.multiarray", "_reconstruct"): reconstruct,
      ("numpy._core.multiarray", "_reconstruct"): reconstruct,
      # Protocol 5 rebuilds arrays with _frombuffer(buffer, dtype, shape, order).
      ("numpy.core.numeric", "_frombuffer"): np._core.numeric._frombuffer,
      ("numpy._core.numeric", "_frombuffer"): np._core.numeric._frombuffer,
      ("numpy", "ndarray"): np.ndarray,
      ("numpy", "dtype"): np.dtype,
  }


class NumpyOnlyUnpickler(pickle.Unpickler):
  """An unpickler that can rebuild numpy arrays (and plain containers) and nothing else.

  Raises:
    pickle.UnpicklingError: when the stream names any other global (a function, a class).
  """

  def find_class(self, module: str, name: str):
    try:
      return _allowed_globals()[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f"refusing to load global {module}.{name}: only numpy arrays are accepted") from None


def load_numpy_pickle(file: BinaryIO | bytes) -> np.ndarray:
  """Unpickles a numpy array with `NumpyOnlyUnpickler`.

  Args:
    file: an open binary file (e.g. from `gzip.open`) or the pickle's bytes.

  Returns:
    The array.

  Raises:
    pickle.UnpicklingError: if the pickle names a global other than numpy's array rebuilders,
      or does not hold an ndarray.
  """
  if isinstance(file, (bytes, bytearray)):
    file = io.BytesIO(file)
  obj = NumpyOnlyUnpickler(file).load()
  if not isinstance(obj, np.ndarray):
    raise pickle.UnpicklingError(f"expected a numpy array, got {type(obj).__name__}")
  # object arrays would need further globals to hold anything interesting, but refuse them
  # anyway: they cannot be images or labels.
  if obj.dtype == object:
    raise pickle.UnpicklingError("refusing an object array")
  return obj
