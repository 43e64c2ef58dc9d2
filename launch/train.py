"""Thin entry point: `accelerate launch launch/train.py --config CONFIG [key=value ...]`
(plain `python launch/train.py ...` works too). All logic lives in sddecc_dist."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from sddecc_dist.cli import add_train_arguments, run_reporting_errors, run_train  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Train SDDECC (see configs/ and README.md)")
    add_train_arguments(parser)
    sys.exit(run_reporting_errors(run_train, parser.parse_args()))
