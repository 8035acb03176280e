"""Shared pytest setup."""

import atexit
import gc
import os
import shutil
import tempfile

# The suite compiles hundreds of small programs, most run a few times: XLA's optimization passes
# cost more time than they save here (a sample of test_speculative: 77 -> 60 s). Set before jax
# is imported, so that subprocesses (workers, binaries, notebooks) inherit it; a test that needs
# them sets JAX_DISABLE_MOST_OPTIMIZATIONS=0.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# Compilation dominates the suite (test_speculative: 494 s from a cold start, 164 s with every
# program already compiled), and many programs are compiled more than once: again in each module
# (see _free_compiled_programs), in each pytest-xdist worker, in the binaries and workers run as
# subprocesses, and by the kernel tests' XLA references. One persistent compilation cache for the
# whole run, which the workers and subprocesses inherit through the environment, compiles each
# once (full suite on a 2-core CPU: 1377 -> 1154 s). The first process to get here (pytest's, or
# xdist's controller) makes the directory and deletes it when it exits, so nothing outlives the
# run; set JAX_COMPILATION_CACHE_DIR to keep one between runs (set it to "" for no cache). The
# cache's keys hold the program, the compile options (XLA_FLAGS included) and the jax and XLA
# versions, so a hit is the executable that compiling would give.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="gemma_mtp_test_compilations_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # default: only >= 1 s
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")  # -1: any size

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_disable_most_optimizations",
                  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] not in ("0", "false", "False"))
# the same settings again, in case a plugin imported jax before this file set the environment
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"] or None)
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                  int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


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
