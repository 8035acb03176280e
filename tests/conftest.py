"""Shared pytest setup."""

import gc
import os

# The suite compiles hundreds of small programs, most run a few times: XLA's optimization passes
# cost more time than they save here (a sample of test_speculative: 77 -> 60 s). Set before jax
# is imported, so that subprocesses (workers, binaries, notebooks) inherit it; a test that needs
# them sets JAX_DISABLE_MOST_OPTIMIZATIONS=0.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_disable_most_optimizations",
                  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] not in ("0", "false", "False"))


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
