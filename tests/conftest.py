"""Test-wide JAX settings.

Rank promotion raises, so an accidental broadcast ([B] against [B, 1]) is a test failure rather
than a silently wrong number. Dtype promotion stays "standard": optax's own schedules mix Python
floats with int32 step counts, which "strict" rejects.
"""
import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
