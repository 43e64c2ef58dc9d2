"""The final inference of a finished run, alone, in one of its two forms: what it costs in time
and peak memory, and whether it gives the run's own assignments.

    python scripts/inference_memory.py RUN --mode spooled --out spooled.txt   # rows through files
    python scripts/inference_memory.py RUN --mode memory --out memory.txt     # (N, width) rows in memory

Run each mode in its own process: the peak resident memory printed is the process's. It
rebuilds what the trainer's final inference had: the model of RUN/checkpoints/final.pt, the
data folder's kNN graph over the run's view, cut along the joint phase's start when
train.joint_graph=within_start, and the images streamed from the shards (none held in memory).
It prints seconds, peak RSS and the agreement with RUN/assignments.txt, and writes the
assignments to --out.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sddecc_dist.run_folder import RunFolder  # noqa: E402
from sddecc_dist.train.distributed import make_accelerator  # noqa: E402
from sddecc_dist.train.inference import final_assignments, node_share  # noqa: E402
from sddecc_dist.train.samplers import finished_run_adjacency  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--mode", choices=["spooled", "memory"], required=True)
    parser.add_argument("--out", required=True, help="text file for the assignments, one per line")
    parser.add_argument("--chunk-size", type=int, help="nodes per chunk (default: the run's train.inference_batch_size)")
    args = parser.parse_args()

    run = RunFolder(args.run)
    trained = run.load_model("final")
    config, manifest, model = trained.config, trained.manifest, trained.model
    chunk = args.chunk_size or config.train.inference_batch_size
    n = manifest["count"]
    start = time.perf_counter()
    adjacency = finished_run_adjacency(run, config, manifest)  # the joint phase's graph, as the trainer had it
    accelerator = make_accelerator(config)
    share = node_share(config.data_dir, manifest, accelerator.process_index, accelerator.num_processes, chunk)
    graph_seconds = time.perf_counter() - start
    assignments, _ = final_assignments(model, share, adjacency, n, accelerator,
                                          spool=run.inference_spool if args.mode == "spooled" else None,
                                          chunk_size=chunk)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if accelerator.is_main_process:  # every rank has every assignment; the main process writes them
        np.savetxt(args.out, assignments, fmt="%d")
        agreement = float((assignments == run.read_assignments()).mean())
        print(f"{args.mode}: {n} nodes, chunks of {chunk}: {seconds:.1f} s ({graph_seconds:.1f} s of it the graph), "
              f"peak RSS {peak:.0f} MiB, {agreement:.4%} equal to {run.assignments_path}")
    else:
        print(f"rank {accelerator.process_index}: peak RSS {peak:.0f} MiB")
    # Every rank leaves the process group together: a rank that exits with gloo's threads still
    # up can abort in C++ ("terminate called without an active exception", seen in CI).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
