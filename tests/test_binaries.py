"""The experiment binaries refuse flags they cannot honour with a clear message, rather than
ignoring them: a --drafter or --tokenizer given without --target used to run the demo pair, and
benchmark.py wrote an empty record for parts it does not know."""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, flags, message", [
    ("generate.py", ["--tokenizer=tok.model"], "--tokenizer goes with --target"),
    ("generate.py", ["--target=pair/target"], "--target needs --drafter and --tokenizer"),
    ("generate.py", ["--drafter=no/such/drafter"], "'no/such/drafter' does not exist"),
    ("evaluate.py", ["--tokenizer=tok.model"], "--tokenizer goes with --target"),
    ("round_probe.py", ["--drafter=pair/drafter"], "--drafter and --tokenizer go with --target"),
    ("benchmark.py", ["--parts=copy,decoding"], "--parts: unknown ['decoding']"),
    ("benchmark.py", ["--models=gemma4_e9b"], "--models: unknown ['gemma4_e9b']"),
])
def test_bad_flags_fail_with_a_clear_message(script, flags, message):
  run = subprocess.run([sys.executable, str(REPO / "experiments" / script), *flags], cwd=REPO,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                       timeout=600, check=False)
  assert run.returncode != 0, run.stdout[-2000:]
  assert message in run.stderr, run.stderr[-2000:]
