"""Watch the decoder during pretraining: how large the code is and how much of each decoder
layer is active, every --every training steps, beside the run's own log.

    python scripts/decoder_activity.py --every 10 --steps 120 -- --config configs/default.yaml \\
        data_dir=DATA output_dir=RUN seed=1 model.decoder_output=sigmoid

Everything after `--` goes to launch/train.py as it is. This is how the sigmoid output's stall
was found (docs/method.md, "Linear decoder output"): the code's mean |z| grew to about 70 and
every output pixel sat at 0, while the ReLUs stayed about half active. Stop it with Ctrl-C (or
`timeout`) once the steps of interest are printed.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

import torch

from sddecc_dist.model import ddecn


def watch(every: int, steps: int) -> None:
    """Every `every` training-mode decoder calls up to `steps`, print the code's mean |z|, the
    share of positive pre-activations of the first layer and of each hidden transposed conv,
    and the share of output pixels the sigmoid would put below 1e-3. Read with forward hooks,
    attached to each decoder as it is built, so the decoder's own forward runs unchanged."""
    original_init = ddecn.ConvDecoder.__init__
    calls = 0

    def init(self, *args, **kwargs) -> None:
        original_init(self, *args, **kwargs)
        seen: list[float] = []

        def record(module, inputs, output) -> None:
            if self.training:
                seen.append((output > 0).float().mean().item() if module is not self.deconvs[-1]
                            else (torch.sigmoid(output) < 1e-3).float().mean().item())

        def report(module, inputs, output) -> None:
            nonlocal calls
            if not self.training:
                return
            calls += 1
            if calls % every == 0 and calls <= steps:
                *active, black = seen
                print(f"step {calls}: mean |z| {inputs[0].abs().mean():.2f}, active "
                      f"{' '.join(f'{a:.3f}' for a in active)}, sigmoid(output) < 1e-3 on {black:.3f}",
                      flush=True)
            seen.clear()

        self.fc.register_forward_hook(record)
        for deconv in self.deconvs:
            deconv.register_forward_hook(record)
        self.register_forward_hook(report)

    ddecn.ConvDecoder.__init__ = init


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("train_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    watch(args.every, args.steps)
    sys.argv = ["train.py", *train_args]
    runpy.run_path(str(Path(__file__).resolve().parent.parent / "launch" / "train.py"), run_name="__main__")


if __name__ == "__main__":
    main()
