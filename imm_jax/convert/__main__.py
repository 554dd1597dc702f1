"""``python -m imm_jax.convert``: see imm_jax/convert/cli.py."""

import sys

from imm_jax.convert.cli import main

if __name__ == "__main__":
  sys.exit(main())
