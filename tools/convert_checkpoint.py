"""Convert checkpoints between Hugging Face and the learner's megatron dist format.

    .venv/bin/python tools/convert_checkpoint.py hf-to-megatron --hf DIR --out RUN/checkpoints [--tp 2 ...]
    .venv/bin/python tools/convert_checkpoint.py megatron-to-hf --ckpt RUN/checkpoints --out DIR

The logic lives in megatron_opd/convert/; details in docs/checkpoints.md.
"""

import sys

from megatron_opd.convert.cli import main

if __name__ == "__main__":  # dist_checkpointing spawns helpers: keep the guard
    sys.exit(main())
