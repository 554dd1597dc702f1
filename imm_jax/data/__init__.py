"""Input pipelines: grain over built-in small data (digits, toy 2-D), image folders/arrays and TFDS.

Model space: images are float32 NHWC in [-1, 1] (pixel / 255 * 2 - 1); toy points are float32 (N, 2) with
std ~0.5 per coordinate (see :mod:`imm_jax.data.toy2d`).
"""

from imm_jax.data.pipeline import create_train_iterator, get_info, load_eval_set, load_train_examples, to_uint8
from imm_jax.data.sources import DATASET_NAMES, DataInfo
from imm_jax.data.toy2d import TOY_NAMES, sample_toy2d

__all__ = [
    'DATASET_NAMES',
    'DataInfo',
    'TOY_NAMES',
    'create_train_iterator',
    'get_info',
    'load_eval_set',
    'load_train_examples',
    'sample_toy2d',
    'to_uint8',
]
