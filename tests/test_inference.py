"""Layer-wise, chunked full-graph inference equals the GCN's whole-graph forward pass, and so
does its spooled form (rows on disk, streamed chunk by chunk); the chunked mean codes (all, or
a sorted subset) equal the encoder's."""

from unittest import mock

import numpy as np
import pytest
import torch

from sddecc_dist.config import load_config
from sddecc_dist.data import load_all, read_manifest
from sddecc_dist.graph import to_scipy_csr
from sddecc_dist.model.sddecc import SDDECC
from sddecc_dist.pipeline import ensure_graph, prepare_dataset
from sddecc_dist.train import inference
from sddecc_dist.train.distributed import make_accelerator
from sddecc_dist.train.inference import NodeShare, mean_codes, node_share, predict_layerwise, predict_layerwise_spooled


# sobel: the GCN's first layer reads the view, not the pixels; pooled: every layer's Z is kept
# from the first layer's pass instead of encoding each chunk again for each layer
@pytest.mark.parametrize("view, features", [("raw", "flatten"), ("sobel", "flatten"), ("raw", "pooled")])
def test_layerwise_chunked_inference_equals_the_full_forward(tmp_path, view, features):
    prepare_dataset("digits", tmp_path, samples_per_shard=500)
    config = load_config("configs/digits.yaml", [f"data_dir={tmp_path}", "train.inference_batch_size=128",
                                                 f"model.input_view={view}", f"model.gcn_features={features}"])
    manifest = read_manifest(tmp_path)
    images, labels = load_all(tmp_path, manifest)
    adjacency = ensure_graph(tmp_path, 3, images)
    torch.manual_seed(0)
    model = SDDECC((1, 8, 8), 10, config.model).eval()
    with torch.no_grad():
        expected = model.cluster_probabilities(images, model.encode(images), adjacency)
    accelerator = make_accelerator(config)
    for in_memory in (True, False):  # chunks sliced from memory, or streamed from the shards
        share = node_share(tmp_path, manifest, 0, 1, 128, *((images, labels) if in_memory else ()))
        assert torch.equal(share.ids, torch.arange(len(images)))
        assert torch.equal(torch.cat([c[0] for c in share.chunks()]), share.ids)  # chunks arrive in share order
        passes = []
        counted = NodeShare(share.ids, lambda: (passes.append(1), share.chunks())[1])
        rows_in_memory = []
        y = predict_layerwise(model, counted, to_scipy_csr(adjacency), len(images), accelerator, rows_in_memory)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
        assert torch.equal(y.argmax(1), expected.argmax(1))
        # the images are read (and encoded) once with pooled features, once per GCN layer without
        assert len(passes) == (1 if features == "pooled" else model.gcn.n_layers)
        # through files, in chunks of 37 nodes that each read their neighbours' rows: the same sums
        # (each layer's rows of every node copied out to a .npy, in node blocks of 50)
        files = lambda layer: tmp_path / f"rows-{layer}.npy"  # noqa: E731
        with mock.patch.object(inference, "_COPY_ROWS", 50):
            spooled = predict_layerwise_spooled(model, share, to_scipy_csr(adjacency), len(images), accelerator,
                                                tmp_path / "spool", chunk_size=37, layer_input_files=files)
        assert torch.equal(spooled, y)
        assert len(rows_in_memory) == model.gcn.n_layers and not files(model.gcn.n_layers).exists()
        assert all(torch.equal(torch.from_numpy(np.load(files(layer))), rows)
                   for layer, rows in enumerate(rows_in_memory))
        assert not (tmp_path / "spool").exists()  # its files are removed
        # the mean codes: of every node, and of a sorted subset (only those encoded)
        with torch.no_grad():
            codes = model.encode(images).mean
        torch.testing.assert_close(mean_codes(model, share, len(images), accelerator), codes, rtol=1e-5, atol=1e-6)
        subset = torch.arange(3, len(images), 7).numpy()
        torch.testing.assert_close(mean_codes(model, share, len(images), accelerator, ids=subset), codes[subset],
                                   rtol=1e-5, atol=1e-6)
