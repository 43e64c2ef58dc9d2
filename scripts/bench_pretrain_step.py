"""Time one pretraining step of the recipe's model, with and without this project's three CPU
speed-ups of it (issue 23's small-set time; docs/method.md, "Step budget").

    python scripts/bench_pretrain_step.py [--shape 1 28 28] [--clusters 40] [--batch 32 256]

For each batch size it times, on random images, forward + backward + optimiser step of
`SDDECC.pretrain_loss` (reconstruction and both MI terms) with the recipe's model settings
(configs/default.yaml, or --config), in five variants:
  convs, foreach Adam   the local discriminator run as its three 1x1 convolutions, Adam's
                        per-tensor (foreach) update, each discriminator run on the positive
                        pairs and again on the negatives: the code before the speed-ups
  convs, fused Adam
  matmul, foreach Adam
  matmul, fused Adam    LocalDiscriminator.forward as it is (one matrix product over all
                        locations) and the fused Adam the trainer builds, the negatives
                        still scored by a second forward (the processor's figure that the
                        docs quote beside their timings, comparable across commits)
  matmul, fused Adam, paired
                        the trainer's step: `positive_and_negative`, whose first layer's
                        part shared by the positive and the negative pairs is computed once
Every variant starts from the same weights and images. Milliseconds per step, the median of
--repeats timed runs of --steps steps each, on an idle machine. It prints the thread count and
the BLAS environment variables, which change the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from sddecc_dist.config import load_config
from sddecc_dist.model.ddecn import GlobalDiscriminator, LocalDiscriminator
from sddecc_dist.model.sddecc import SDDECC


def _as_convolutions(self: LocalDiscriminator, feature_map: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The local discriminator as it ran before: its Sequential of 1x1 convolutions."""
    tiled = z[:, :, None, None].expand(-1, -1, *feature_map.shape[2:])
    return self.net(torch.cat([feature_map, tiled], dim=1)).squeeze(1)


def _global_separately(self: GlobalDiscriminator, features: torch.Tensor, z: torch.Tensor, partner: torch.Tensor):
    """The positive and the negative pairs each through the whole discriminator, as before."""
    return self(features, z), self(features, z[partner])


def _local_separately(self: LocalDiscriminator, feature_map: torch.Tensor, z: torch.Tensor, partner: torch.Tensor):
    return self(feature_map, z), self(feature_map[partner], z)


def time_steps(model: SDDECC, optimizer: torch.optim.Optimizer, x: torch.Tensor, loss_config, steps: int,
               repeats: int) -> float:
    def step() -> None:
        terms = model("pretrain", x, loss_config=loss_config)
        terms.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(5):  # warm-up: allocator, oneDNN primitive caches
        step()
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(steps):
            step()
        runs.append((time.perf_counter() - started) / steps * 1000)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--shape", type=int, nargs=3, default=[1, 28, 28], metavar=("C", "H", "W"))
    parser.add_argument("--clusters", type=int, default=40)
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = load_config(args.config, [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          + ", ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                                                       "OMP_NUM_THREADS")))
    fast_forward = LocalDiscriminator.forward
    paired = GlobalDiscriminator.positive_and_negative, LocalDiscriminator.positive_and_negative
    variants = [(local, fused, False) for local in ("convs", "matmul") for fused in (False, True)]
    variants.append(("matmul", True, True))
    print("| batch | local discriminator | Adam | negatives | ms per step |\n| --- | --- | --- | --- | --- |")
    try:
        for batch in args.batch:
            x = torch.rand(batch, *args.shape, generator=torch.Generator().manual_seed(0))
            for local, fused, pairs in variants:
                LocalDiscriminator.forward = _as_convolutions if local == "convs" else fast_forward
                GlobalDiscriminator.positive_and_negative, LocalDiscriminator.positive_and_negative = \
                    paired if pairs else (_global_separately, _local_separately)
                torch.manual_seed(0)
                model = SDDECC(tuple(args.shape), args.clusters, config.model)
                optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused,
                                             foreach=None if fused else True)
                ms = time_steps(model, optimizer, x, config.loss, args.steps, args.repeats)
                print(f"| {batch} | {local} | {'fused' if fused else 'foreach'} | "
                      f"{'paired' if pairs else 'separate'} | {ms:.1f} |", flush=True)
    finally:
        LocalDiscriminator.forward = fast_forward
        GlobalDiscriminator.positive_and_negative, LocalDiscriminator.positive_and_negative = paired


if __name__ == "__main__":
    main()
