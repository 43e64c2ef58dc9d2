#!/usr/bin/env bash
# The GPU path, checked in a few minutes on one GPU (issue 20):
#   1. the kNN graph with faiss-gpu (exact, IVF, then PCA + IVF), timed;
#   2. one pretraining epoch and about 300 Cluster-GCN joint steps under bf16 autocast, with
#      images/s and the GPU's peak memory from the run's metrics.json;
#   3. scripts/bench.py on the GPU: shard reading (the data loader), the graph, the trainer's
#      steps and the final inference, each beside its floor.
#
#   bash scripts/gpu_check.sh [DATA_DIR] [OUT]     # default data/mnist (sddecc prepare mnist ...), bench/gpu-check
#
# On a machine where torch sees no GPU it says so and runs the same three steps as a CPU dry
# run on 600 of scikit-learn's digits with short schedules (tests/test_gpu_check.py runs that, so CI
# keeps this script working). Nothing else depends on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-data/mnist}
OUT=${2:-bench/gpu-check}
mkdir -p "$OUT"

if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python -c "import faiss; print('faiss', faiss.__version__, 'GPUs seen by faiss:', faiss.get_num_gpus())"
    GRAPH_FLAGS=(--use-gpu)
    TRAIN=(train.pretrain_epochs=1 train.pretrain_steps=0 train.head_warmup_epochs=2 train.joint_epochs=18
           train.eval_every=4)
    BENCH_ARGS=(--n 20000 train.mixed_precision=bf16)
else
    echo "no GPU: torch.cuda.is_available() is False; running the CPU dry run on 600 of scikit-learn's digits"
    DATA=$OUT/digits-600
    if [ ! -f "$DATA/dataset.json" ]; then  # a subset: bf16 on a CPU is slow, and a dry run checks the path, not the figures
        python -c "import sys, numpy as np; from sklearn.datasets import load_digits; d = load_digits();
np.savez(sys.argv[1], x=d.images[:600] / 16.0, y=d.target[:600])" "$OUT/digits-600.npz"
        sddecc prepare "$OUT/digits-600.npz" --out "$DATA"
    fi
    GRAPH_FLAGS=(--no-use-gpu --pca-dim 16)  # digits have 64 dimensions: PCA keeps fewer
    TRAIN=(train.pretrain_epochs=1 train.pretrain_steps=0 train.head_warmup_epochs=1 train.joint_epochs=3
           train.eval_every=2 train.partition_size=300 train.self_label_epochs=0 train.kmeans_n_init=1)
    # bench.py's short run, shorter still (it times pretraining past its first epoch, so two), in
    # float32: step 2 has run the bf16 path, which on a CPU without bf16 units is many times slower
    BENCH_ARGS=(--n 200 train.pretrain_epochs=2 train.head_warmup_epochs=2 train.joint_epochs=6 train.eval_every=3
                "train.mixed_precision='no'")  # quoted: YAML reads a bare no as false
fi
[ -f "$DATA/dataset.json" ] || { echo "error: $DATA is not a prepared set: sddecc prepare mnist --out $DATA"; exit 2; }

echo "== 1. the kNN graph over $DATA"
for index in flat ivf pca_ivf; do
    start=$(date +%s.%N)
    sddecc graph "$DATA" --index "$index" --rebuild "${GRAPH_FLAGS[@]}" > "$OUT/graph-$index.log" 2>&1 \
        || { tail -n 20 "$OUT/graph-$index.log"; exit 1; }
    echo "graph ($index): $(python -c "print(f'{$(date +%s.%N) - $start:.1f}')") s"
done
sddecc graph "$DATA" --rebuild "${GRAPH_FLAGS[@]}" > "$OUT/graph.log" 2>&1  # the default index, for step 2

echo "== 2. one pretraining epoch and the Cluster-GCN joint steps under bf16 autocast"
rm -rf "$OUT/run"
python launch/train.py --config configs/default.yaml data_dir="$DATA" output_dir="$OUT/run" \
    train.mixed_precision=bf16 train.joint_sampler=cluster train.center_init=kmeans "${TRAIN[@]}" \
    > "$OUT/train.log" 2>&1 || { tail -n 30 "$OUT/train.log"; exit 1; }
python - "$OUT/run" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
metrics = json.loads((run / "metrics.json").read_text())
pretrain = [line for line in log if line["phase"] == "pretrain"]
images = metrics["n_samples"] * len(pretrain)
seconds = sum(line["seconds"] for line in pretrain)
joint = [line for line in log if line["phase"] == "joint" and "epoch_seconds" in line]
print(f"pretraining: {images / seconds:.0f} images/s ({sum(line['steps'] for line in pretrain)} steps)")
print(f"joint phase: {joint[-1]['epoch_seconds']:.2f} s per epoch over every node "
      f"({metrics['n_samples'] / joint[-1]['epoch_seconds']:.0f} images/s) at its last metrics line" if joint else
      "joint phase: no metrics line before the last epoch")
print(f"run: {metrics['seconds']:.0f} s, ACC {metrics.get('acc', float('nan')):.4f}, host peak "
      f"{metrics['peak_rss_mib']:.0f} MiB, GPU peak {metrics.get('gpu_peak_memory_mib', 'n/a (CPU)')} MiB")
EOF

echo "== 3. scripts/bench.py: each stage beside its floor"
python scripts/bench.py --data "$DATA" --out "$OUT/bench" "${BENCH_ARGS[@]}"
