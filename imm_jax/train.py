"""Train a model: ``python -m imm_jax.train --config configs/digits.py --workdir DIR [--config.a.b=v]``.

Config files define ``get_config(arg)``; ``--config configs/imagenet256.py:XL/2`` passes "XL/2" as the
argument. Re-running with the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from imm_jax.configs_loader import check_config_argv
from imm_jax.io_utils import stop_on_input_errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl, TensorBoard events and samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.WARNING)
  from imm_jax import distributed
  distributed.initialize()
  from imm_jax.trainer import train_and_evaluate

  with stop_on_input_errors():  # bad config, data or workdir: one line, before training
    train_and_evaluate(FLAGS.config, FLAGS.workdir)


def run():
  check_config_argv(sys.argv)
  app.run(main)


if __name__ == "__main__":
  run()
