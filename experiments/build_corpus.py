"""Builds a source-code corpus: train.txt / eval.txt / manifest.json in --out_dir.

  python -m experiments.build_corpus --out_dir=data/stdlib
  python -m experiments.build_corpus --out_dir=data/code --include_packages \
      --roots=path/to/code --extensions=.py,.pyi
"""

from absl import app
from absl import flags

from gemma_mtp import data

_OUT_DIR = flags.DEFINE_string("out_dir", None, "Directory for train.txt, eval.txt, manifest.json.",
                               required=True)
_ROOTS = flags.DEFINE_list("roots", None, "Directories to scan (default: this Python's stdlib).")
_EVAL_FRACTION = flags.DEFINE_float("eval_fraction", 0.02, "Share of files in the eval split.")
_EXCLUDE_TESTS = flags.DEFINE_bool("exclude_tests", True,
                                   f"Skip directories named {', '.join(data.TEST_DIRS)}.")
_INCLUDE_PACKAGES = flags.DEFINE_bool("include_packages", False,
                                      "Descend into site-packages / dist-packages below a root.")
_EXTENSIONS = flags.DEFINE_list("extensions", [".py"], "File name endings to keep.")
_MAX_FILE_BYTES = flags.DEFINE_integer("max_file_bytes", 1_000_000, "Skip larger files.")


def main(argv):
  del argv
  data.write_corpus(
      data.build_corpus(_ROOTS.value, eval_fraction=_EVAL_FRACTION.value,
                        exclude_tests=_EXCLUDE_TESTS.value,
                        include_packages=_INCLUDE_PACKAGES.value, extensions=_EXTENSIONS.value,
                        max_file_bytes=_MAX_FILE_BYTES.value),
      _OUT_DIR.value)


if __name__ == "__main__":
  app.run(main)
