"""`sddecc predict` and assignments.csv on a short digits run: the run's own images give back
its assignments, a new image gets what the GCN over the training graph with that image added
gives (closed-form check with the model's own full-graph forward), keys and formats."""

import csv
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import faiss
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from PIL import Image

from sddecc_dist.config import load_config
from sddecc_dist.data import DataError, load_all
from sddecc_dist.data.partitioned import write_partitioned_shards
from sddecc_dist.graph import load_search_index, save_search_index, to_scipy_csr
from sddecc_dist.pipeline import ensure_graph, graph_features
from sddecc_dist.run_folder import RunFolder, RunFolderError, load_model
from sddecc_dist.train.loop import train
from sddecc_dist.train.predict import load_predict_state, predict, predict_images

from conftest import short_digits_run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = short_digits_run(tmp_path_factory.mktemp("predict"), pretrain=3, warmup=3, joint=8)
    return folder / "data", RunFolder(folder / "run")


def _table(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_run_writes_assignments_csv_with_keys_and_confidence(run):
    _, folder = run
    rows = _table(folder.path / "assignments.csv")
    assignments = folder.read_assignments()
    assert [row["key"] for row in rows] == [f"{i:09d}" for i in range(len(assignments))]
    assert [int(row["cluster"]) for row in rows] == assignments.tolist()
    confidence = np.array([float(row["confidence"]) for row in rows])
    assert (confidence >= 1.0 / 10 - 1e-6).all() and (confidence <= 1.0).all()


def test_predicting_the_training_images_gives_back_the_run_assignments(run, tmp_path):
    """A training image gets its own node's result; as a new node (--as-new) it gets its
    assignment back for nearly all (the approximation: docs/predict.md)."""
    data, folder = run
    result = predict(folder.path, data, tmp_path / "again.csv", with_codes=True)
    rows = _table(tmp_path / "again.csv")
    assert [int(row["cluster"]) for row in rows] == folder.read_assignments().tolist()
    assert [row["confidence"] for row in rows] == [row["confidence"] for row in _table(folder.path / "assignments.csv")]
    assert len(rows[0]) == 3 + 10 and "code_9" in rows[0]  # --codes: the 10-d code
    predict(folder.path, data, tmp_path / "as-new.csv", as_new=True)
    agreement = float((np.array([int(row["cluster"]) for row in _table(tmp_path / "as-new.csv")])
                       == folder.read_assignments()).mean())
    print(f"training images as new nodes: {agreement:.4f} agree; {result['images_per_second']:.0f} images/s")
    assert agreement >= 0.97
    # the same images stored in another order (partitioned shards), read in blocks of 100: the
    # same table, row i for sample i
    n = len(rows)
    parts = np.random.default_rng(0).permutation(np.arange(n) % 6)
    write_partitioned_shards(data, parts, tmp_path / "reordered", 2)
    with mock.patch("sddecc_dist.train.predict._BLOCK", 100), \
            mock.patch("sddecc_dist.train.predict.predict_images", wraps=predict_images) as blocks:
        predict(folder.path, tmp_path / "reordered", tmp_path / "reordered.csv", with_codes=True)
    assert blocks.call_count == -(-n // 100)
    assert _table(tmp_path / "reordered.csv") == rows


def test_a_new_image_gets_what_the_gcn_gives_it_as_one_more_node(run):
    """Reference: the model's own GCN forward over the training graph with the new images added
    as nodes (rows: themselves 1/d_x and their k nearest training images 1/sqrt(d_x d_j); the
    training rows unchanged). Its last rows equal predict's, to float precision."""
    data, folder = run
    trained = load_model(folder.model_file("final"))
    state, index = load_predict_state(folder)
    images, _ = load_all(data)
    new = (images[:5] + 0.05 * torch.rand(images[:5].shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    clusters, confidence, _ = predict_images(trained, new, state, index)

    k, n = state["k"], len(images)
    _, found = index.search(graph_features(new, state["view"]), k)
    a_hat = to_scipy_csr(ensure_graph(data, folder.read_config().graph.k))  # digits.yaml: the kNN graph, not cut
    d = state["degrees"].numpy()
    rows, cols, vals = [], [], []
    for i in range(len(new)):
        rows += [n + i] * (k + 1)
        cols += [n + i] + found[i].tolist()
        vals += [1.0 / (k + 1)] + (1.0 / np.sqrt((k + 1) * d[found[i]])).tolist()
    extra = sp.csr_matrix((vals, (rows, cols)), shape=(n + len(new), n + len(new)))
    full = sp.vstack([sp.hstack([a_hat, sp.csr_matrix((n, len(new)))]), extra[n:]]).tocsr().astype(np.float32)
    full_t = torch.sparse_csr_tensor(torch.from_numpy(full.indptr).long(), torch.from_numpy(full.indices).long(),
                                     torch.from_numpy(full.data), size=full.shape)
    x = torch.cat([images, new])
    with torch.no_grad():
        core = trained.model.eval()
        y = core.cluster_probabilities(x, core.encode(x), full_t)[n:]
    np.testing.assert_allclose(confidence, y.max(1).values.numpy(), rtol=1e-4, atol=1e-5)
    assert clusters.tolist() == y.argmax(1).tolist()


def test_image_folder_keys_shapes_and_the_command_line(run, tmp_path):
    data, folder = run
    images, _ = load_all(data)
    pictures = tmp_path / "pictures"
    (pictures / "a").mkdir(parents=True)
    for i in range(4):
        Image.fromarray((images[i, 0].numpy() * 255).astype(np.uint8)).save(pictures / "a" / f"{i}.png")
    out = tmp_path / "pictures.csv"
    done = subprocess.run([sys.executable, "-m", "sddecc_dist.cli", "predict", str(folder.path), str(pictures),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [row["key"] for row in _table(out)] == [f"a/{i}.png" for i in range(4)]
    assert "4 images into" in done.stderr
    # the table scores like the run folder it came from
    predict(folder.path, data, tmp_path / "all.csv")
    scored = [subprocess.run([sys.executable, "-m", "sddecc_dist.cli", "evaluate", str(source), "--data-dir", str(data)],
                             cwd=ROOT, capture_output=True, text=True, timeout=300) for source in (tmp_path / "all.csv", folder.path)]
    assert scored[0].returncode == 0 and scored[0].stdout == scored[1].stdout and scored[0].stdout.startswith("acc ")
    with pytest.raises(DataError, match=r"images of shape \(1, 16, 16\).*trained on \(1, 8, 8\).*--size"):
        predict(folder.path, pictures, tmp_path / "x.csv", size=16)


def test_a_run_folder_of_the_first_predict_format_is_still_read(run, tmp_path):
    """Run folders written before the rows moved to predict/layer-inputs-L.npy (format 1: the
    rows inside graph_rows.pt, a plain index without the id map) predict the same table."""
    data, folder = run
    old = RunFolder(tmp_path / "old")
    shutil.copytree(folder.path, old.path)
    state, _ = load_predict_state(folder)
    for layer in range(state["n_layers"]):
        old.predict_layer_inputs_path(layer).unlink()
    state = {**state, "format_version": 1, "layer_inputs": [torch.from_numpy(np.array(r)) for r in state["layer_inputs"]]}
    del state["n_layers"]
    torch.save(state, old.predict_state_path)
    index = load_search_index(folder.predict_index_path)
    save_search_index(old.predict_index_path, faiss.downcast_index(index.index))  # the index inside the id map
    predict(folder.path, data, tmp_path / "now.csv", as_new=True)
    predict(old.path, data, tmp_path / "old.csv", as_new=True)
    assert _table(tmp_path / "old.csv") == _table(tmp_path / "now.csv")
    state["format_version"] = 3
    torch.save(state, old.predict_state_path)
    with pytest.raises(RunFolderError, match="format 3, expected 1 or 2"):
        predict(old.path, data, tmp_path / "x.csv")


def test_parquet_output_holds_the_same_table(run, tmp_path):
    import pyarrow.parquet as pq
    data, folder = run
    predict(folder.path, data, tmp_path / "p.csv")
    predict(folder.path, data, tmp_path / "p.parquet")
    table = pq.read_table(tmp_path / "p.parquet").to_pydict()
    rows = _table(tmp_path / "p.csv")
    assert table["key"] == [row["key"] for row in rows]
    assert table["cluster"] == [int(row["cluster"]) for row in rows]
    np.testing.assert_allclose(table["confidence"], [float(row["confidence"]) for row in rows], atol=1e-6)


def test_a_run_on_an_image_folder_keys_its_assignments_by_file_path(tmp_path):
    """Images prepared from a folder keep their file paths (data/keys.txt), and the run's
    assignments.csv and a prediction of the prepared folder name each row by its file."""
    from sklearn.datasets import load_digits

    pictures = tmp_path / "pictures"
    digits = load_digits()
    paths = []
    for i in range(120):
        path = pictures / f"class-{digits.target[i]}" / f"scan {i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(path)
        paths.append(path.relative_to(pictures).as_posix())
    train(load_config(ROOT / "configs/digits.yaml", [
        f"data.source={pictures}", f"data_dir={tmp_path / 'data'}", f"output_dir={tmp_path / 'run'}",
        "train.pretrain_epochs=1", "train.head_warmup_epochs=1", "train.joint_epochs=2", "train.kmeans_n_init=1"]))
    rows = _table(tmp_path / "run" / "assignments.csv")
    assert [row["key"] for row in rows] == sorted(paths)  # sample i is the i-th file in sorted order
    predict(tmp_path / "run", tmp_path / "data", tmp_path / "again.csv")
    assert [row["key"] for row in _table(tmp_path / "again.csv")] == sorted(paths)
