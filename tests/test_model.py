"""DDECN and GCN structure against the paper's equations, computed densely by hand."""

import math

import numpy as np
import pytest
import torch

from sddecc_dist.config import LossConfig, ModelConfig, load_config
from sddecc_dist.graph import normalized_adjacency
from sddecc_dist.model import losses
from sddecc_dist.model.ddecn import EncoderOutput
from sddecc_dist.model.sddecc import SDDECC


@pytest.mark.parametrize(
    "config_path, image_shape, feature_shapes",
    [
        ("configs/paper/usps.yaml", (1, 16, 16), [(16, 8, 8), (32, 4, 4)]),
        ("configs/paper/mnist.yaml", (1, 28, 28), [(16, 14, 14), (16, 7, 7), (32, 4, 4), (32, 2, 2)]),
        ("configs/digits.yaml", (1, 8, 8), [(16, 4, 4), (32, 2, 2)]),
    ],
)
def test_table2_encoder_decoder_shapes(config_path, image_shape, feature_shapes):
    config = load_config(config_path)
    model = SDDECC(image_shape, 10, config.model)
    assert model.encoder.feature_shapes == feature_shapes
    assert [c.kernel_size for c in model.encoder.convs] == [(3, 3)] * len(feature_shapes)
    x = torch.rand(5, *image_shape)
    encoded = model.encode(x)
    assert encoded.mean.shape == (5, config.model.latent_dim)
    x_hat = model.decoder(encoded.mean)
    assert x_hat.shape == x.shape
    if config.model.decoder_output == "sigmoid":
        assert x_hat.min() >= 0 and x_hat.max() <= 1
    else:  # linear: the values the sigmoid output would squash
        model.decoder.output = "sigmoid"
        assert torch.allclose(model.decoder(encoded.mean), torch.sigmoid(x_hat))


def test_local_discriminator_scores_each_location_with_tiled_code():
    torch.manual_seed(0)
    model = SDDECC((1, 16, 16), 4, ModelConfig(latent_dim=6, local_disc_hidden=8))
    feature_map, z = torch.randn(3, 16, 8, 8), torch.randn(3, 6)
    scores = model.local_disc(feature_map, z)
    assert scores.shape == (3, 8, 8)
    # the same three 1x1 convs applied to one location's [C_ij, z] vector by hand
    convs = [m for m in model.local_disc.net if isinstance(m, torch.nn.Conv2d)]
    v = torch.cat([feature_map[1, :, 2, 5], z[1]])
    for i, conv in enumerate(convs):
        v = conv.weight[:, :, 0, 0] @ v + conv.bias
        v = torch.relu(v) if i < 2 else v
    assert torch.allclose(scores[1, 2, 5], v[0], atol=1e-5)
    # every location: the module's matrix products equal its layers run as convolutions
    tiled = z[:, :, None, None].expand(-1, -1, 8, 8)
    torch.testing.assert_close(scores, model.local_disc.net(torch.cat([feature_map, tiled], 1)).squeeze(1))


def test_discriminators_score_negatives_as_their_forward_does():
    """positive_and_negative computes the first layer's shared part once: the scores and the
    gradients must be those of forward on the positive pairs and on the shuffled pairs."""
    torch.manual_seed(0)
    model = SDDECC((1, 16, 16), 4, ModelConfig(latent_dim=6, local_disc_hidden=8, global_disc_hidden=16))
    top, middle, z = torch.randn(5, 32, 4, 4), torch.randn(5, 16, 8, 8), torch.randn(5, 6)
    partner = losses.shuffle_partners(5, torch.Generator().manual_seed(3))
    cases = [(model.global_disc, top, lambda f, c: (f, c[partner])),  # T1: codes shuffled
             (model.local_disc, middle, lambda f, c: (f[partner], c))]  # T2: maps shuffled
    for disc, features, negatives in cases:
        features, code = features.clone().requires_grad_(), z.clone().requires_grad_()
        positive, negative = disc.positive_and_negative(features, code, partner)
        paired = torch.autograd.grad(positive.sum() + 2 * negative.sum(), [features, code, *disc.parameters()])
        want_positive, want_negative = disc(features, code), disc(*negatives(features, code))
        separate = torch.autograd.grad(want_positive.sum() + 2 * want_negative.sum(),
                                       [features, code, *disc.parameters()])
        torch.testing.assert_close(positive, want_positive)
        torch.testing.assert_close(negative, want_negative)
        for got, want in zip(paired, separate):
            torch.testing.assert_close(got, want)


def test_gcn_matches_dense_equations_15_to_17():
    """Y = softmax(Â (mix(H_L, z) W + b)) with H_{l+1} = relu(Â ((1-δ)H_l + δZ_l) W_l), Â dense."""
    torch.manual_seed(0)
    n, k = 12, 3
    neighbors = np.array([[(i + 1) % n, (i + 2) % n, (i + 5) % n] for i in range(n)])
    adjacency = normalized_adjacency(neighbors, n)
    dense = adjacency.to_dense()
    config = ModelConfig(channels=[4, 8], latent_dim=3, delta=0.3)
    model = SDDECC((1, 8, 8), k, config)
    x = torch.rand(n, 1, 8, 8)
    encoded = model.encode(x)
    y = model.cluster_probabilities(x, encoded, adjacency)
    z_layers = [f.flatten(1) for f in encoded.features] + [encoded.mean]
    weights = [layer.weight.T for layer in model.gcn.hidden]
    h = torch.relu(dense @ x.flatten(1) @ weights[0])
    for w, z in zip(weights[1:], z_layers[:-1]):
        h = torch.relu(dense @ ((0.7 * h + 0.3 * z) @ w))
    head = model.gcn.head
    expected = torch.softmax(dense @ ((0.7 * h + 0.3 * z_layers[-1]) @ head.weight.T + head.bias), 1)
    assert y.shape == (n, k)
    assert torch.allclose(y, expected, atol=1e-5)
    assert torch.allclose(y.sum(1), torch.ones(n))


def test_loss_switches_select_terms():
    torch.manual_seed(0)
    model = SDDECC((1, 8, 8), 3, ModelConfig(channels=[4, 8], latent_dim=3))
    x = torch.rand(16, 1, 8, 8)
    full = model("pretrain", x, loss_config=LossConfig())
    assert set(full.parts) == {"recon", "global_mi", "local_mi", "prior_kl"}
    no_mi = model("pretrain", x, loss_config=LossConfig(mi_weight=0.0, prior_kl=False))
    assert set(no_mi.parts) == {"recon"}
    local_only = model("pretrain", x, loss_config=LossConfig(global_mi=False))
    assert set(local_only.parts) == {"recon", "local_mi", "prior_kl"}
    with pytest.raises(ValueError, match="unknown phase"):
        model("finetune", x)


def test_code_is_sampled_only_when_the_prior_kl_fixes_its_variance():
    """With the prior KL the decoder sees z ~ N(mean, exp(logvar)); without it, the mean alone
    (a plain autoencoder: a free log-variance would drift and drown the code in noise)."""
    torch.manual_seed(0)
    model = SDDECC((1, 8, 8), 3, ModelConfig(channels=[4, 8], latent_dim=3))
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        model.encoder.logvar_head.bias.fill_(30.0)  # std e^15: a sampled code is pure noise
        mean = model.encode(x).mean
        plain = LossConfig(mi_weight=0.0, prior_kl=False)
        recon = model("pretrain", x, loss_config=plain).parts["recon"]
        decoded_mean = 0.5 * (model.decoder(mean) - x).pow(2).sum() / len(x)
        assert recon == pytest.approx(decoded_mean.item(), rel=1e-5)
        assert recon == model("pretrain", x, loss_config=plain).parts["recon"]
        variational = LossConfig(mi_weight=0.0)
        assert model("pretrain", x, loss_config=variational).parts["recon"] > recon


def _small_graph_model(n: int):
    """A seeded 3-regular circulant graph on n nodes (normalised), a small SDDECC and n images."""
    torch.manual_seed(0)
    neighbors = np.array([[(i + 1) % n, (i + 3) % n, (i + 7) % n] for i in range(n)])
    adjacency = normalized_adjacency(neighbors, n)
    model = SDDECC((1, 8, 8), 3, ModelConfig(channels=[4, 8], latent_dim=3))
    return adjacency, model, torch.rand(n, 1, 8, 8)


def test_joint_loss_weights_terms_as_equation_19():
    n = 20
    adjacency, model, x = _small_graph_model(n)
    cfg = LossConfig(recon_weight=2.0, mi_weight=0.05, kl_weight=1.5)
    torch.manual_seed(1)
    terms, y = model("joint", x, adjacency=adjacency, aux_index=torch.arange(8), loss_config=cfg)
    assert set(terms.parts) == {"recon", "global_mi", "local_mi", "cluster_kl"}
    p = terms.parts
    expected = 2.0 * p["recon"] + 0.05 * (p["global_mi"] + p["local_mi"]) + 1.5 * p["cluster_kl"]
    assert terms.total.item() == pytest.approx(expected, rel=1e-5)
    assert y.shape == (n, 3) and not y.requires_grad
    assert math.isfinite(terms.total.item())


def test_a_clustering_term_is_added_by_its_config_weight_alone():
    """loss.self_training_weight (default 0, off) switches DEC's self-training term on: the model
    finds it in the registry, nothing else names it."""
    n = 20
    adjacency, model, x = _small_graph_model(n)
    off, _ = model("joint", x, adjacency=adjacency, aux_index=torch.arange(8), loss_config=LossConfig())
    assert "self_training" not in off.parts
    cfg = LossConfig(self_training_weight=0.7)
    index = torch.tensor([0, 2, 3, 7, 11, 19])
    torch.manual_seed(1)
    terms, y = model("joint", x, adjacency=adjacency, aux_index=torch.arange(8), loss_config=cfg, loss_index=index)
    assert terms.parts["self_training"] == pytest.approx(losses.self_training_kl(y[index]).item(), rel=1e-5)
    p = terms.parts
    expected = (p["recon"] + 0.01 * (p["global_mi"] + p["local_mi"]) + p["cluster_kl"]
                + 0.7 * p["self_training"])
    assert terms.total.item() == pytest.approx(expected, rel=1e-5)


def test_smooth_is_repeated_propagation_and_mean_codes_are_chunk_independent():
    from sddecc_dist.model.gcn import smooth

    n = 15
    neighbors = np.array([[(i + 1) % n, (i + 4) % n] for i in range(n)])
    adjacency = normalized_adjacency(neighbors, n)
    h = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
    dense = adjacency.to_dense()
    assert torch.allclose(smooth(adjacency, h, 3), dense @ dense @ dense @ h, atol=1e-6)
    assert torch.equal(smooth(adjacency, h, 0), h)
    model = SDDECC((1, 8, 8), 3, ModelConfig(channels=[4, 8], latent_dim=3))
    x = torch.rand(10, 1, 8, 8)
    assert torch.allclose(model.mean_codes(x, "cpu", batch_size=3), model.encode(x).mean.detach(), atol=1e-6)
    assert model.training  # mode restored


def test_structural_terms_smooth_the_codes_of_equation_18_and_score_neighbours():
    """loss.cluster_code_smoothing = t: Eq. 18 on Â^t mean; loss.neighbour_weight adds the
    neighbour term. Both against the loss functions applied to dense references."""
    n = 20
    adjacency, model, x = _small_graph_model(n)
    cfg = LossConfig(mi_weight=0.0, cluster_code_smoothing=2, neighbour_weight=0.5)
    terms, y = model("head", x, adjacency=adjacency, loss_config=cfg)
    assert set(terms.parts) == {"cluster_kl", "neighbour"}
    with torch.no_grad():
        encoded = model.encode(x)
        dense = adjacency.to_dense()
        smoothed = dense @ dense @ encoded.mean
        expected_kl = losses.clustering_kl(smoothed, encoded.logvar, y, model.centers)
        unsmoothed_kl = losses.clustering_kl(encoded.mean, encoded.logvar, y, model.centers)
    assert terms.parts["cluster_kl"] == pytest.approx(expected_kl.item(), rel=1e-5)
    assert abs(expected_kl.item() - unsmoothed_kl.item()) > 1e-4  # the smoothing changed it
    assert terms.parts["neighbour"] == pytest.approx(losses.neighbour_consistency(y, adjacency).item(), rel=1e-5)
    assert terms.total.item() == pytest.approx(terms.parts["cluster_kl"] + 0.5 * terms.parts["neighbour"], rel=1e-5)
    # loss_index: the smoothing still sees every node; the terms cover the indexed rows only
    index = torch.tensor([1, 5, 6, 11])
    part, _ = model("head", x, adjacency=adjacency, loss_config=cfg, loss_index=index)
    expected_part = losses.clustering_kl(smoothed[index], encoded.logvar[index], y[index], model.centers)
    assert part.parts["cluster_kl"] == pytest.approx(expected_part.item(), rel=1e-5)
    assert part.parts["neighbour"] == pytest.approx(losses.neighbour_consistency(y, adjacency, index).item(), rel=1e-5)


def test_head_warm_up_towards_the_start_is_cross_entropy_and_trains_only_the_head():
    n = 20
    adjacency, model, x = _small_graph_model(n)
    cfg = LossConfig(mi_weight=0.0, neighbour_weight=1.0, balance_weight=5.0)
    index = torch.tensor([0, 3, 4, 9, 17])
    start = torch.tensor([2, 0, 0, 1, 2])  # the start's cluster of each node of `index`
    terms, y = model("head", x, adjacency=adjacency, loss_config=cfg, loss_index=index, start_labels=start)
    assert set(terms.parts) == {"start_ce"}  # no Eq. 18, balance or neighbour term
    expected = -np.mean([math.log(y[i, c].item()) for i, c in zip(index.tolist(), start.tolist())])
    assert terms.total.item() == pytest.approx(expected, rel=1e-5)
    terms.total.backward()
    assert all(p.grad is None for p in model.encoder.parameters()) and model.centers.grad is None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameter_groups()["head"])


def test_auto_strides_keep_a_top_map_of_at_least_four():
    from sddecc_dist.model.sddecc import auto_strides

    assert auto_strides((1, 28, 28), 3) == [2, 2, 2]  # 14, 7, 4
    assert auto_strides((1, 16, 16), 3) == [2, 2, 1]  # 8, 4, 4
    assert auto_strides((1, 8, 8), 3) == [2, 1, 1]  # 4, 4, 4
    assert auto_strides((3, 64, 64), 4) == [2, 2, 2, 2]  # 32, 16, 8, 4
    model = SDDECC((1, 16, 16), 10, ModelConfig(channels=[8, 8, 16], kernel_sizes=[3, 3, 3], strides="auto"))
    assert model.encoder.feature_shapes == [(8, 8, 8), (8, 4, 4), (16, 4, 4)]
    x = torch.rand(3, 1, 16, 16)
    assert model.decoder(model.encode(x).mean).shape == x.shape


@pytest.mark.parametrize("n_clusters, latent_dim", [(2, 10), (10, 10), (20, 20), (40, 40)])
def test_auto_latent_dim_is_ten_or_one_per_cluster(n_clusters, latent_dim):
    """model.latent_dim=auto: the paper's 10 up to 10 clusters, K above; the code, the decoder's
    input and the centres μ_y all take that width (predict and the page read it from the model)."""
    model = SDDECC((1, 8, 8), n_clusters, ModelConfig(channels=[4, 8], latent_dim="auto"))
    assert model.latent_dim == latent_dim
    encoded = model.encode(torch.rand(3, 1, 8, 8))
    assert encoded.mean.shape == encoded.logvar.shape == (3, latent_dim)
    assert model.decoder(encoded.mean).shape == (3, 1, 8, 8)
    assert model.centers.shape == (n_clusters, latent_dim)
    assert SDDECC((1, 8, 8), n_clusters, ModelConfig(channels=[4, 8], latent_dim=7)).latent_dim == 7


def test_pooled_gcn_features_average_each_feature_map():
    """model.gcn_features=pooled: Eq. 15's Z is each map averaged over its locations, so the GCN
    layers are as wide as the encoder's channels."""
    n = 12
    neighbors = np.array([[(i + 1) % n, (i + 2) % n] for i in range(n)])
    adjacency = normalized_adjacency(neighbors, n)
    model = SDDECC((1, 8, 8), 3, ModelConfig(channels=[4, 8], latent_dim=3, gcn_features="pooled"))
    assert [layer.out_features for layer in model.gcn.hidden] == [4, 8, 3]
    x = torch.rand(n, 1, 8, 8)
    encoded = model.encode(x)
    z = model.gcn_representations(encoded)
    assert torch.allclose(z[0], encoded.features[0].mean((2, 3))) and z[-1] is encoded.mean
    assert model.cluster_probabilities(x, encoded, adjacency).shape == (n, 3)


def test_pretraining_reconstructs_the_given_target():
    model = SDDECC((1, 8, 8), 3, ModelConfig(channels=[4, 8], latent_dim=3))
    cfg = LossConfig(mi_weight=0.0, prior_kl=False)
    x, target = torch.rand(5, 1, 8, 8), torch.zeros(5, 1, 8, 8)
    terms = model("pretrain", x, loss_config=cfg, target=target)
    x_hat = model.decoder(model.encode(x).mean)
    assert terms.parts["recon"] == pytest.approx(0.5 * x_hat.pow(2).flatten(1).sum(1).mean().item(), rel=1e-5)


def test_view_contrast_pairs_each_augmented_code_with_its_clean_images_code():
    torch.manual_seed(0)
    model = SDDECC((1, 8, 8), 3, ModelConfig(channels=[4, 8], latent_dim=3))
    cfg = LossConfig(mi_weight=0.0, prior_kl=False, view_weight=2.0, view_temperature=0.5)
    x, clean = torch.rand(6, 1, 8, 8), torch.rand(6, 1, 8, 8)
    terms = model("pretrain", x, loss_config=cfg, target=clean)
    with torch.no_grad():
        expected = losses.view_contrast(model.encode(x).mean, model.encode(clean).mean, 0.5)
    assert set(terms.parts) == {"recon", "view_nce"}
    assert terms.parts["view_nce"] == pytest.approx(expected.item(), rel=1e-5)
    assert terms.total.item() == pytest.approx(terms.parts["recon"] + 2.0 * expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="pass the clean images as `target`"):
        model("pretrain", x, loss_config=cfg)


def test_linear_decoder_output_keeps_its_gradient_where_the_sigmoid_saturates():
    """model.decoder_output: the same weights give sigmoid(a) and a. In MNIST-5000's seed-1
    stall the sigmoid's outputs all sat at 0 (the reconstruction stuck at 1/2 sum x^2 = 43.96
    for 40 epochs, the code grown to |z| ~ 70): the reconstruction sent nothing back. The linear
    output's gradient is x_hat - x, whatever the pre-activation."""
    torch.manual_seed(0)
    sigmoid = SDDECC((1, 8, 8), 3, ModelConfig(channels=[4, 8], latent_dim=3))
    with torch.no_grad():
        sigmoid.decoder.deconvs[-1].bias.fill_(-30.0)  # every output pixel saturated at 0
    linear = SDDECC((1, 8, 8), 3, ModelConfig(channels=[4, 8], latent_dim=3, decoder_output="linear"))
    linear.load_state_dict(sigmoid.state_dict())
    z, x = torch.randn(4, 3), torch.rand(4, 1, 8, 8)
    assert torch.allclose(sigmoid.decoder(z), torch.sigmoid(linear.decoder(z)))
    gradient = {}
    for name, model in (("sigmoid", sigmoid), ("linear", linear)):
        x_hat = model.decoder(z)
        (0.5 * (x - x_hat).pow(2).flatten(1).sum(1).mean()).backward()
        gradient[name] = model.decoder.fc.weight.grad.abs().sum().item()
    assert gradient["linear"] > 0 and gradient["sigmoid"] < 1e-9 * gradient["linear"]
    # the linear output's gradient with respect to x_hat is exactly (x_hat - x) / B
    x_hat = linear.decoder(z).detach().requires_grad_(True)
    (0.5 * (x - x_hat).pow(2).flatten(1).sum(1).mean()).backward()
    assert torch.allclose(x_hat.grad, (x_hat - x) / len(x))


def test_the_start_term_is_the_cross_entropy_to_the_start():
    n = 20
    adjacency, model, x = _small_graph_model(n)
    cfg = LossConfig(mi_weight=0.0, start_weight=2.0)
    index = torch.tensor([1, 4, 6, 9, 15])
    start = torch.tensor([0, 2, 2, 1, 0])
    terms, y = model("joint", x, adjacency=adjacency, aux_index=torch.arange(5), loss_config=cfg, loss_index=index,
                     start_labels=start)
    expected = -np.mean([math.log(y[i, c].item()) for i, c in zip(index.tolist(), start.tolist())])
    assert terms.parts["start"] == pytest.approx(expected, rel=1e-5)
    p = terms.parts
    assert terms.total.item() == pytest.approx(p["recon"] + p["cluster_kl"] + 2.0 * p["start"], rel=1e-5)
    with pytest.raises(ValueError, match="start's labels"):
        model("joint", x, adjacency=adjacency, aux_index=torch.arange(5), loss_config=cfg)


@pytest.mark.parametrize("gcn_features, self_label_head", [("pooled", False), ("flatten", False), ("pooled", True)])
def test_encoder_gradient_from_a_node_subset_is_the_full_gradient_through_those_nodes_scaled(gcn_features,
                                                                                              self_label_head):
    """train.joint_encoder_nodes: the loss's value is the full pass's; the encoder's gradient is
    N/|S| times the gradient through the nodes S alone (the others held fixed), an unbiased
    estimate of the full gradient; every node in S gives the full gradient exactly."""
    n = 20
    neighbors = np.array([[(i + 1) % n, (i + 3) % n, (i + 7) % n] for i in range(n)])
    adjacency = normalized_adjacency(neighbors, n)
    torch.manual_seed(0)
    model = SDDECC((1, 8, 8), 3, ModelConfig(channels=[4, 8], latent_dim=3, gcn_features=gcn_features,
                                             self_label_head=self_label_head))
    model.centers.data.normal_()
    if self_label_head:  # logits that depend on the encoder (the head starts at zero)
        model.self_label_classifier.weight.data.normal_()
    x = torch.rand(n, 1, 8, 8)
    subset = torch.tensor([13, 2, 7, 19, 5, 0])

    def grads(loss_config, hold_fixed_outside=None, **kwargs):
        """(total, encoder gradient, centres' gradient) of one joint loss."""
        model.zero_grad()
        hook = None
        if hold_fixed_outside is not None:  # the reference: rows outside S carry no gradient
            keep = torch.zeros(n, dtype=torch.bool)
            keep[hold_fixed_outside] = True

            def detach_others(module, inputs, out):
                fix = lambda t: torch.where(keep.view(-1, *[1] * (t.dim() - 1)), t, t.detach())  # noqa: E731
                return type(out)([fix(f) for f in out.features], fix(out.mean), fix(out.logvar))
            hook = model.encoder.register_forward_hook(detach_others)
        terms, _ = model("joint", x, adjacency=adjacency, loss_config=loss_config, **kwargs)
        terms.total.backward()
        if hook is not None:
            hook.remove()
        encoder = torch.cat([p.grad.flatten() for p in model.encoder.parameters()])
        return terms.total.item(), encoder, model.centers.grad.clone()

    # cluster terms only: the subset's gradient is N/|S| times the held-fixed reference
    cfg = LossConfig(recon_weight=0.0, mi_weight=0.0, prior_kl=False, kl_weight=1.0)
    total, encoder, centres = grads(cfg, aux_index=torch.arange(3), encoder_index=subset)
    ref_total, ref_encoder, ref_centres = grads(cfg, hold_fixed_outside=subset, aux_index=subset[:3])
    assert total == pytest.approx(ref_total, rel=1e-5)
    assert ref_encoder.abs().max() > 0
    torch.testing.assert_close(encoder, ref_encoder * n / len(subset), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(centres, ref_centres, rtol=1e-4, atol=1e-6)

    # every node in S (any order), with reconstruction: exactly the full pass
    cfg = LossConfig(mi_weight=0.0, prior_kl=False, kl_weight=1.0)
    every = torch.randperm(n)
    total, encoder, centres = grads(cfg, aux_index=torch.arange(4), encoder_index=every)
    ref_total, ref_encoder, ref_centres = grads(cfg, aux_index=every[:4])
    assert total == pytest.approx(ref_total, rel=1e-5)
    torch.testing.assert_close(encoder, ref_encoder, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(centres, ref_centres, rtol=1e-4, atol=1e-6)

    # train.joint_encoding_refresh: the other nodes' codes read from an earlier no-grad pass.
    # Made with the same weights, it gives the same loss and gradients;
    cfg = LossConfig(mi_weight=0.0, prior_kl=False, kl_weight=1.0)
    background = model.graph_encoding(x)
    fresh = grads(cfg, aux_index=torch.arange(3), encoder_index=subset)
    reused = grads(cfg, aux_index=torch.arange(3), encoder_index=subset, background=background)
    assert reused[0] == pytest.approx(fresh[0], rel=1e-6)
    for got, expected in zip(reused[1:], fresh[1:]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    # older, its values are those of the nodes outside S, and S's are fresh.
    stale = EncoderOutput([f + 1.0 for f in background.features], background.mean + 1.0, background.logvar - 1.0,
                          None if background.logits is None else background.logits + 1.0)
    encoded, _ = model.spliced_encoding(x, subset, stale)
    outside = torch.tensor([i for i in range(n) if i not in subset.tolist()])
    with torch.no_grad():
        now = model.graph_encoding(x)
    outputs = lambda e: [*e.features, e.mean, e.logvar] + ([e.logits] if self_label_head else [])  # noqa: E731
    assert (encoded.logits is None) == (not self_label_head)
    for got, old, new in zip(outputs(encoded), outputs(stale), outputs(now)):
        torch.testing.assert_close(got[outside].detach(), old[outside])
        torch.testing.assert_close(got[subset].detach(), new[subset], rtol=1e-5, atol=1e-6)


def test_self_label_head_starts_at_zero_without_changing_the_other_initial_weights():
    """model.self_label_head: a zero classifier made without drawing random numbers, so the
    autoencoder starts as without it; its logits join the code as the GCN's last Z."""
    torch.manual_seed(3)
    plain = SDDECC((1, 8, 8), 3, ModelConfig(channels=[4, 8], latent_dim=3, gcn_features="pooled"))
    torch.manual_seed(3)
    model = SDDECC((1, 8, 8), 3, ModelConfig(channels=[4, 8], latent_dim=3, gcn_features="pooled",
                                             self_label_head=True))
    for name, value in plain.state_dict().items():
        if not name.startswith("gcn."):  # the GCN's last layer is wider: code and logits
            assert torch.equal(value, model.state_dict()[name]), name
    assert [layer.out_features for layer in model.gcn.hidden] == [4, 8, 3 + 3]
    x = torch.rand(5, 1, 8, 8)
    encoded = model.encode(x)
    assert torch.equal(encoded.logits, torch.zeros(5, 3))
    torch.testing.assert_close(model.gcn_representations(encoded)[-1], torch.cat([encoded.mean, encoded.logits], 1))
    # the logits are the classifier of the flattened top map
    model.self_label_classifier.weight.data.normal_()
    encoded = model.encode(x)
    torch.testing.assert_close(encoded.logits, encoded.features[-1].flatten(1) @ model.self_label_classifier.weight.T)
    # a model file written without the head loads with a zero one
    model.load_trained(plain.state_dict() | {k: v for k, v in model.state_dict().items() if k.startswith("gcn.")})
    assert not model.self_label_classifier.weight.any() and not model.self_label_classifier.bias.any()
    with pytest.raises(RuntimeError, match="encoder"):  # anything else missing is still an error
        model.load_trained({k: v for k, v in plain.state_dict().items() if not k.startswith("encoder.")})


def test_self_label_loss_is_the_pretraining_objective_plus_the_classifiers_cross_entropy():
    torch.manual_seed(0)
    model = SDDECC((1, 8, 8), 3, ModelConfig(channels=[4, 8], latent_dim=3, self_label_head=True))
    model.self_label_classifier.weight.data.normal_()
    cfg = LossConfig(mi_weight=0.5, prior_kl=True, kl_weight=2.0)
    x, target, labels = torch.rand(6, 1, 8, 8), torch.rand(6, 1, 8, 8), torch.tensor([0, 2, 1, 1, 0, 2])
    torch.manual_seed(1)
    terms = model("self_label", x, labels=labels, loss_config=cfg, target=target)
    torch.manual_seed(1)  # the same reparameterisation and MI negatives
    pretrain = model("pretrain", x, loss_config=cfg, target=target)
    logits = model.encode(x).logits
    ce = -torch.log_softmax(logits, 1)[torch.arange(6), labels].mean().item()
    assert set(terms.parts) == set(pretrain.parts) | {"self_label_ce"}
    assert terms.parts["self_label_ce"] == pytest.approx(ce, rel=1e-5)
    assert terms.total.item() == pytest.approx(pretrain.total.item() + ce, rel=1e-5)
    terms.total.backward()  # the classifier and the encoder learn from it
    assert model.self_label_classifier.weight.grad.abs().sum() > 0


def test_graph_encoding_keeps_what_the_gcn_reads_in_chunks():
    torch.manual_seed(0)
    model = SDDECC((1, 8, 8), 3, ModelConfig(channels=[4, 8], latent_dim=3, gcn_features="pooled"))
    x = torch.rand(10, 1, 8, 8)
    whole, chunked = model.encode(x), model.graph_encoding(x, chunk_size=3)
    assert [tuple(f.shape) for f in chunked.features] == [(10, 4, 1, 1), (10, 8, 1, 1)]
    for a, b in zip(model.gcn_representations(whole), model.gcn_representations(chunked)):
        torch.testing.assert_close(a, b)
    assert not chunked.mean.requires_grad


def test_sobel_view_is_the_gradient_magnitude_over_channels_scaled_to_one():
    """model.input_view=sobel against scipy's Sobel filters (replicated border): sqrt of the
    sum over channels of both directions' squares, divided by the image's largest value."""
    from scipy import ndimage

    from sddecc_dist.model.ddecn import ImageView

    x = torch.rand(2, 3, 9, 7)
    view = ImageView("sobel")(x)
    assert view.shape == (2, 1, 9, 7)
    for b in range(2):
        squares = sum(ndimage.sobel(x[b, c].double().numpy(), axis=axis, mode="nearest") ** 2
                      for c in range(3) for axis in (0, 1))
        expected = np.sqrt(squares) / np.sqrt(squares).max()
        np.testing.assert_allclose(view[b, 0].numpy(), expected, atol=1e-5)
    assert ImageView("raw")(x) is x


def test_sobel_view_of_a_digit_does_not_depend_on_its_colours():
    """Coloured MNIST's images are x * ink + (1 - x) * paper per channel: every colour pair gives
    the grey digit's own view, so the networks cannot cluster the colours."""
    from sddecc_dist.model.ddecn import ImageView

    torch.manual_seed(0)
    grey = (torch.rand(4, 1, 12, 12) > 0.6).float()
    view = ImageView("sobel")
    for _ in range(3):
        ink, paper = torch.rand(4, 3, 1, 1), torch.rand(4, 3, 1, 1)
        assert torch.allclose(view(grey * ink + (1 - grey) * paper), view(grey), atol=1e-4)


def test_auto_input_view_is_sobel_for_rgb_only():
    """model.input_view=auto: a 3-channel image set is seen through the sobel view (one
    channel for the encoder, the decoder and the GCN's input), a grey one as it is."""
    config = ModelConfig(channels=[4, 8], latent_dim=3, input_view="auto")
    rgb, grey = SDDECC((3, 8, 8), 3, config), SDDECC((1, 8, 8), 3, config)
    assert (rgb.input_view.view, grey.input_view.view) == ("sobel", "raw")
    assert rgb.encoder.convs[0].in_channels == 1 and rgb.gcn.hidden[0].in_features == 64
    x = torch.rand(5, 3, 8, 8)
    encoded = rgb.encode(x)
    assert torch.allclose(encoded.mean, rgb.encoder(rgb.input_view(x)).mean)
    terms = rgb("pretrain", x, loss_config=LossConfig(mi_weight=0.0, prior_kl=False))
    x_hat = rgb.decoder(encoded.mean)
    assert x_hat.shape == (5, 1, 8, 8)
    expected = 0.5 * (rgb.input_view(x) - x_hat).pow(2).flatten(1).sum(1).mean().item()
    assert terms.parts["recon"] == pytest.approx(expected, rel=1e-5)
