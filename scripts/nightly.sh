#!/usr/bin/env bash
# The suites too long for the README's test command (CI runs that one), run here nightly:
# the Slurm batch scripts under a real one-node Slurm (tests/test_slurm_real.py, `slurm` marker)
# and five more seeded kill -9 chains per stage (tests/test_kill.py; CI runs seed 0).
#   bash scripts/nightly.sh            # from the repository root, with the project installed
# Needs root: installs Debian's slurm-wlm and munge when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge
fi
python -m pytest -q -m slurm tests/test_slurm_real.py
SDDECC_KILL_SEEDS="1 2 3 4 5" python -m pytest -q -s tests/test_kill.py
