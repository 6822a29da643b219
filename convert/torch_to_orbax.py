"""Convert upstream LoSATok PyTorch checkpoints into a losatok-jax checkpoint directory.

    python convert/torch_to_orbax.py --config_path config/16k_16k_25Hz_losatok.yml \
        --model_path losatok_kl1e-2.pth --output_dir ckpts/losatok_kl1e-2

The script for a checkout; an installed package runs the same tool as `python -m
losatok_jax.convert` (or `losatok-convert`). Options: `--help`.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's package
    from losatok_jax.convert import main

    sys.exit(main())
