"""Shared pytest setup."""

import gc

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drops every compiled program after each test module.

  The jit caches keep every test's executables for the life of the process. Late in the full
  suite XLA's CPU compiler crashed twice at the same test (which passes on its own), while the
  machine was also running another test suite; freeing the programs module by module bounds what
  one process holds. Programs shared between modules are compiled again, which costs little.
  """
  yield
  jax.clear_caches()
  gc.collect()
