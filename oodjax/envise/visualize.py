"""Grad-CAM overlays of the ENVISE teacher and student (the issue's attention-map figure).

    maps = gradcam_overlay_png(teacher, teacher_vars, student, student_vars,
                               batch_at(stream, 0)["image"][:4], "gradcam.png",
                               class_names=stream.class_names)

One row per image, four columns: the image; the teacher's Grad-CAM map for its own prediction
(the anchor A_t of Eq. 5); the student's map for the teacher's label (the hard positive A_sp);
the student's map for its hard negative (A_sn: its most probable class other than the teacher's
label, `losses.hard_negative_classes(..., "incorrect")`, as `envise_loss` uses by default).
Maps are the raw Grad-CAM ReLU(sum_k alpha_k A^k) (`gradcam.logits_and_cam`, both networks in
inference mode), upsampled bilinearly to the image size (`gradcam.resize_maps`).

Display choices (ours): each map is scaled by its own maximum to [0, 1] (the usual Grad-CAM
picture; the loss's l2 normalisation is for distances, not display) and drawn with the "jet"
colour map at alpha 0.5 over the image; an all-zero map stays blank. Images arrive normalised
(as the stream gives them), so each is min-max scaled to [0, 1] for display. Each cell is
`cell_inches` square at `dpi`, and the figure is saved without a tight bounding box, so the PNG
is exactly (rows * cell_inches * dpi) x (4 * cell_inches * dpi) pixels.

References:
  Selvaraju et al. 2017, Grad-CAM (overlay pictures).
  Sharma et al. 2021 (ICLR submission), ENVISE, Sec. 3 and Eq. 5 (anchor, positive, negative).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oodjax.envise import gradcam
from oodjax.envise import losses as losses_lib
from oodjax.models.insides import inference_apply

COLUMNS = ("image", "teacher", "student (teacher's label)", "student (hard negative)")
MAX_IMAGES = 16


def _display_image(image: np.ndarray) -> np.ndarray:
  """[H, W, C] normalised -> [H, W] (C = 1) or [H, W, 3] in [0, 1], min-max scaled."""
  lo, hi = float(image.min()), float(image.max())
  scaled = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
  return scaled[..., 0] if scaled.shape[-1] == 1 else scaled


def _display_map(m: np.ndarray) -> np.ndarray:
  peak = float(m.max())
  return m / peak if peak > 0 else m


def gradcam_maps(teacher, teacher_variables: Mapping[str, Any], student,
                 student_variables: Mapping[str, Any], images: jax.Array
                 ) -> dict[str, np.ndarray]:
  """The three maps of the overlay figure, upsampled to the image size (not normalised).

  Args:
    teacher, student: Linen classifiers with a feature map (or `inference_apply(module)`).
    teacher_variables, student_variables: their variables.
    images: [N, H, W, C] normalised images.

  Returns:
    {"teacher_labels" [N], "negative_classes" [N] int32, "teacher_probs" [N],
     "student_probs_label" [N], "student_probs_negative" [N] (softmax probabilities),
     "teacher", "positive", "negative": [N, H, W] float32 raw Grad-CAM maps}.
  """
  x = jnp.asarray(images, jnp.float32)
  teacher = inference_apply(gradcam.as_module(teacher))  # hashable: a static jit argument
  student = inference_apply(gradcam.as_module(student))
  t_shape, s_shape = (jax.eval_shape(m, v, x).shape for m, v in
                      ((teacher, teacher_variables), (student, student_variables)))
  if t_shape != s_shape:
    raise ValueError(f"teacher and student logits differ in shape: {t_shape} vs {s_shape}")
  out = _maps(teacher, teacher_variables, student, student_variables, x)
  return {k: np.asarray(v) for k, v in out.items()}


# Jitted: op by op, the second Grad-CAM backward pass of even tiny networks takes seconds.
@functools.partial(jax.jit, static_argnums=(0, 2))
def _maps(teacher, teacher_variables, student, student_variables, x):
  t_logits, t_cam = gradcam.logits_and_cam(teacher, teacher_variables, x)
  s_logits, s_cam = gradcam.logits_and_cam(student, student_variables, x)
  labels = losses_lib.pseudo_labels(t_logits)  # [N]
  negatives = losses_lib.hard_negative_classes(s_logits, labels, "incorrect")  # [N]
  size = x.shape[1:3]
  anchor = gradcam.resize_maps(t_cam(labels), size)  # [N, H, W]
  student_maps = gradcam.resize_maps(s_cam(jnp.stack([labels, negatives], axis=1)), size)
  t_probs = jax.nn.softmax(t_logits, axis=-1)  # [N, K]
  s_probs = jax.nn.softmax(s_logits, axis=-1)  # [N, K]

  def pick(p, c):  # [N, K], [N] -> [N]
    return jnp.take_along_axis(p, c[:, None], axis=-1)[:, 0]

  out = {"teacher_labels": labels, "negative_classes": negatives,
         "teacher_probs": pick(t_probs, labels), "student_probs_label": pick(s_probs, labels),
         "student_probs_negative": pick(s_probs, negatives), "teacher": anchor,
         "positive": student_maps[:, 0], "negative": student_maps[:, 1]}
  return out


def gradcam_overlay_png(teacher, teacher_vars: Mapping[str, Any], student,
                        student_vars: Mapping[str, Any], images: jax.Array,
                        out_png: str | os.PathLike, *, class_names: Sequence[str] | None = None,
                        cell_inches: float = 1.8, dpi: int = 100) -> dict[str, np.ndarray]:
  """Writes the overlay grid (N rows x 4 columns, see the module docstring) to `out_png`.

  Args:
    teacher: the teacher module; teacher_vars its variables.
    student: the (deployed) student module; student_vars its variables.
    images: [N, H, W, C] normalised images, 1 <= N <= MAX_IMAGES (e.g. a stream batch).
    out_png: the PNG written.
    class_names: optional K names for the titles (default: class ids).
    cell_inches: side of one cell in inches.
    dpi: resolution; the PNG is (N * cell_inches * dpi) x (4 * cell_inches * dpi) pixels.

  Returns:
    The maps and classes drawn (`gradcam_maps`).

  Raises:
    ValueError: for images not [N, H, W, C] with 1 <= N <= MAX_IMAGES, C in {1, 3}, or
      class_names of the wrong length.
  """
  shape = np.shape(images)
  if len(shape) != 4 or not 1 <= shape[0] <= MAX_IMAGES or shape[-1] not in (1, 3):
    raise ValueError(f"images must be [N, H, W, C] with 1 <= N <= {MAX_IMAGES} and C in "
                     f"{{1, 3}}, got shape {shape}")
  maps = gradcam_maps(teacher, teacher_vars, student, student_vars, images)
  if class_names is not None and len(class_names) <= int(max(maps["teacher_labels"].max(),
                                                             maps["negative_classes"].max())):
    raise ValueError(f"class_names has {len(class_names)} names, fewer than the networks' "
                     "classes")
  name = (lambda k: str(class_names[k])) if class_names is not None else str

  from oodjax.plots import _pyplot  # matplotlib with the Agg backend, loaded lazily
  plt = _pyplot()
  rows = shape[0]
  fig, axes = plt.subplots(rows, len(COLUMNS), squeeze=False,
                           figsize=(len(COLUMNS) * cell_inches, rows * cell_inches))
  imgs = np.asarray(images, np.float32)
  for i in range(rows):
    base = _display_image(imgs[i])
    label, neg = int(maps["teacher_labels"][i]), int(maps["negative_classes"][i])
    titles = (f"image {i}",
              f"TN: {name(label)} ({maps['teacher_probs'][i]:.2f})",
              f"S: {name(label)} ({maps['student_probs_label'][i]:.2f})",
              f"S neg: {name(neg)} ({maps['student_probs_negative'][i]:.2f})")
    overlays = (None, maps["teacher"][i], maps["positive"][i], maps["negative"][i])
    for j, (ax, title, overlay) in enumerate(zip(axes[i], titles, overlays)):
      ax.imshow(base, cmap="gray" if base.ndim == 2 else None, vmin=0, vmax=1)
      if overlay is not None:
        ax.imshow(_display_map(overlay), cmap="jet", alpha=0.5, vmin=0, vmax=1)
      ax.set_title(title if i else f"{COLUMNS[j]}\n{title}", fontsize=6)
      ax.set_xticks([])
      ax.set_yticks([])
  fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.9, wspace=0.05, hspace=0.35)
  fig.savefig(out_png, dpi=dpi)
  plt.close(fig)
  return maps
