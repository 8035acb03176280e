"""Shared pytest setup."""

import gc

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drops every compiled program after each test module.

  The jit caches keep each test's executables (and their LLVM code) for the life of the process;
  across the whole suite that reached several GB and XLA's CPU compiler crashed mid-suite on a
  24 GB machine. Modules do not share compiled programs, so nothing is recompiled because of this.
  """
  yield
  jax.clear_caches()
  gc.collect()
