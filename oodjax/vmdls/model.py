"""The VMDLS encoder: any zoo backbone g followed by the stochastic generator f of Eq. 1.

    model = VMDLSEncoder(backbone=get_model("small_cnn", num_classes=10), latent_dim=2)
    variables = model.init(key, x)
    mu = model.apply(variables, x)                                   # [B, d], inference
    mu, sigma, g = model.apply(variables, x, train=True, method="encode",
                               mutable=["batch_stats"])[0]           # training

The backbone is not edited. Its penultimate vector g(x) [B, k] is the input of its last
`nn.Dense` (the zoo's convention: the classifier head is that Dense and the model returns its
output), read with `nn.intercept_methods` while the backbone runs; the backbone's own head is
then unused: its parameters stay in the tree and receive no gradient (they cost one [k, K]
matmul per batch). μ and log σ come from two Dense layers on g(x), σ = exp(log σ) > 0.

Because μ is the output of the encoder's last Dense, `oodjax.models.forward_with_insides` reads
this model like any classifier: its "head" features are g(x), its "logits" are μ(g(x)), and its
"blocks" are the backbone's blocks, which is all the feature ensemble of Eq. 8 needs.

References:
  Dinari & Freifeld 2022, VMDLS, Sec. 3, Eq. 1.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def _penultimate(backbone: nn.Module, x: jax.Array, train: bool) -> jax.Array:
  """g(x): the input of the backbone's last nn.Dense, which must produce its output."""
  last_dense: list[tuple[jax.Array, jax.Array]] = []

  def grab(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
      last_dense[:] = [(args[0], out)]
    return out

  with nn.intercept_methods(grab):
    out = backbone(x, train=train)
  if not last_dense or last_dense[0][1] is not out:
    raise ValueError(f"the output of {type(backbone).__name__} is not the output of an "
                     "nn.Dense, so it has no penultimate vector g(x) for the generator")
  return last_dense[0][0]


class VMDLSEncoder(nn.Module):
  """x -> f(g(x)) = μ(g(x)) + σ(g(x)) ⊙ ε (Eq. 1); inference returns μ.

  Attributes:
    backbone: a Linen classifier whose output is an nn.Dense output (every zoo model).
    latent_dim: d, the dimension of the latent space.
  """
  backbone: nn.Module
  latent_dim: int

  def setup(self):
    self.mu = nn.Dense(self.latent_dim, name="mu")
    self.log_sigma = nn.Dense(self.latent_dim, name="log_sigma")

  def encode(self, x: jax.Array, train: bool = False
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (μ [B, d], σ [B, d] > 0, g(x) [B, k])."""
    g = _penultimate(self.backbone, x, train)
    return self.mu(g), jnp.exp(self.log_sigma(g)), g

  def sample(self, x: jax.Array, key: jax.Array, train: bool = False) -> jax.Array:
    """f(g(x)) with ε ~ N(0, I) drawn from `key`: [B, d] (Eq. 1)."""
    mu, sigma, _ = self.encode(x, train)
    return mu + sigma * jax.random.normal(key, mu.shape, mu.dtype)

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """μ(g(x)) [B, d]: the deterministic embedding used at inference."""
    g = _penultimate(self.backbone, x, train)
    # log σ is created here too, so `init` through __call__ builds every parameter.
    if self.is_initializing():
      self.log_sigma(g)
    return self.mu(g)
