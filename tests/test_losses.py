"""Loss terms against closed forms, brute force and Monte Carlo references."""

import math

import numpy as np
import pytest
import torch

from sddecc_dist.model import losses


def test_gaussian_prior_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mean, logvar = torch.randn(7, 5), torch.randn(7, 5)
    p = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    q = torch.distributions.Normal(torch.zeros(5), torch.ones(5))
    expected = torch.distributions.kl_divergence(p, q).sum(1).mean()
    assert torch.allclose(losses.gaussian_prior_kl(mean, logvar), expected, atol=1e-6)
    # zero exactly at the prior
    assert losses.gaussian_prior_kl(torch.zeros(3, 4), torch.zeros(3, 4)).item() == 0.0


def test_reconstruction_loss_is_half_squared_error_per_sample():
    x = torch.zeros(2, 1, 2, 2)
    x_hat = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 0.0]]]])
    # per-sample ½||x - x̂||²: 0.5 and 1.5, mean 1.0 (Eq. 13)
    assert losses.reconstruction_loss(x, x_hat).item() == pytest.approx(1.0)


def test_jsd_loss_sign_and_value():
    # Perfect discriminator (large positive on positives, large negative on negatives): loss -> 0.
    big = torch.full((10,), 30.0)
    assert losses.jsd_mi_loss(big, -big).item() < 1e-10
    # Uninformative discriminator T = 0: loss is 2 log 2 = log 4 (JSD = 0).
    zero = torch.zeros(10)
    assert losses.jsd_mi_loss(zero, zero).item() == pytest.approx(math.log(4.0))
    # A discriminator that scores positives higher has lower loss than the reverse.
    t = torch.linspace(-2, 2, 10)
    assert losses.jsd_mi_loss(t + 1, t - 1) < losses.jsd_mi_loss(t - 1, t + 1)


def test_jsd_optimum_on_a_known_pair_of_distributions():
    """Minimising over free scores T(v) on discrete p, q reaches T* = log(p/q) and the value
    log 4 - 2 JSD(p || q) (natural log), the estimator's closed-form optimum."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    scores = torch.zeros(4, requires_grad=True)
    optimizer = torch.optim.LBFGS([scores], lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def loss_fn():
        # expectations written as weighted sums: the estimator's E_p and E_q
        return (p * torch.nn.functional.softplus(-scores)).sum() + (
            q * torch.nn.functional.softplus(scores)
        ).sum()

    def closure():
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    optimizer.step(closure)
    m = 0.5 * (p + q)
    jsd = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
    assert torch.allclose(scores.detach(), (p / q).log(), atol=1e-3)
    assert loss_fn().item() == pytest.approx(math.log(4.0) - 2 * jsd.item(), abs=1e-5)
    # and jsd_mi_loss on samples drawn in those proportions gives the same value
    counts_p, counts_q = (p * 1000).long(), (q * 1000).long()
    pos = torch.repeat_interleave(scores.detach(), counts_p)
    neg = torch.repeat_interleave(scores.detach(), counts_q)
    assert losses.jsd_mi_loss(pos, neg).item() == pytest.approx(loss_fn().item(), abs=1e-4)


def test_view_contrast_against_its_definition_by_loops():
    """InfoNCE of two views: for each row i, -log of the softmax over j of cos(a_i, b_j) / τ at
    j = i, averaged both ways (a against b's rows and b against a's)."""
    torch.manual_seed(0)
    a, b, tau = torch.randn(6, 4), torch.randn(6, 4), 0.5
    cos = lambda u, v: float(u @ v / (u.norm() * v.norm()))
    expected = 0.0
    for first, second in ((a, b), (b, a)):
        for i in range(len(a)):
            scores = [math.exp(cos(first[i], second[j]) / tau) for j in range(len(a))]
            expected += -math.log(scores[i] / sum(scores)) / (2 * len(a))
    assert losses.view_contrast(a, b, tau).item() == pytest.approx(expected, rel=1e-5)
    # Views that match (up to scale) and differ from the other rows: near 0 at a low temperature.
    eye = torch.eye(5)
    assert losses.view_contrast(eye, 3 * eye, 0.01).item() < 1e-6
    # Every row the same: no image can be told apart, log B.
    same = torch.ones(5, 3)
    assert losses.view_contrast(same, same, 0.5).item() == pytest.approx(math.log(5))


def test_shuffle_partners_is_a_permutation_without_fixed_points():
    x = torch.arange(50).float()[:, None]
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        shuffled = x[losses.shuffle_partners(len(x), g)][:, 0]
        assert sorted(shuffled.tolist()) == x[:, 0].tolist()
        assert not torch.any(shuffled == x[:, 0])
    with pytest.raises(ValueError, match="at least 2"):
        losses.shuffle_partners(1)
    # the same draws give the same pairs
    assert torch.equal(losses.shuffle_partners(50, torch.Generator().manual_seed(7)),
                       losses.shuffle_partners(50, torch.Generator().manual_seed(7)))


def _clustering_kl_monte_carlo(mean, logvar, y, centers, n_draws, prior=None):
    """E_{y~Y, z~N(mean, σ²)}[log p(z|x) + log Y_y - log N(z; μ_y, I) - log q(y)], q(y) = 1/K
    unless `prior` is given."""
    k = centers.shape[0]
    log_prior = torch.log(prior) if prior is not None else torch.full((k,), -math.log(k), dtype=mean.dtype)
    std = torch.exp(0.5 * logvar)
    z = mean[None] + std[None] * torch.randn(n_draws, *mean.shape, dtype=mean.dtype)
    log_p = torch.distributions.Normal(mean, std).log_prob(z).sum(-1)  # (S, N)
    log_q = torch.stack(
        [torch.distributions.Normal(centers[j], 1.0).log_prob(z).sum(-1) for j in range(k)], -1
    )  # (S, N, K)
    per_cluster = log_p[..., None] - log_q + torch.log(y)[None] - log_prior
    return (y[None] * per_cluster).sum(-1).mean()


@pytest.mark.parametrize("prior", [None, [0.4, 0.3, 0.2, 0.1]])
def test_clustering_kl_equals_its_monte_carlo_expansion(prior):
    torch.manual_seed(0)
    n, d, k = 6, 3, 4
    mean = torch.randn(n, d, dtype=torch.float64)
    logvar = 0.5 * torch.randn(n, d, dtype=torch.float64)
    y = torch.softmax(torch.randn(n, k, dtype=torch.float64), 1)
    centers = torch.randn(k, d, dtype=torch.float64)
    prior = None if prior is None else torch.tensor(prior, dtype=torch.float64)
    closed = losses.clustering_kl(mean, logvar, y, centers, prior)
    monte_carlo = _clustering_kl_monte_carlo(mean, logvar, y, centers, 400_000, prior)
    assert closed.item() == pytest.approx(monte_carlo.item(), abs=5e-3)


def test_clustering_kl_closed_form_terms():
    # Y uniform, code exactly N(μ_0, I)-shaped: KL reduces to the mean ½||mean - μ_y||² over y.
    k, d = 3, 2
    centers = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    mean, logvar = torch.zeros(1, d), torch.zeros(1, d)
    y = torch.full((1, k), 1.0 / k)
    expected = np.mean([0.0, 0.5 * 9, 0.5 * 16])
    assert losses.clustering_kl(mean, logvar, y, centers).item() == pytest.approx(expected)
    # The optimal Y for fixed codes is the Gaussian-mixture posterior softmax(-½||mean-μ_y||²),
    # with value -log Σ_y (1/K) exp(-½||mean - μ_y||²) (+ the Gaussian part, zero here).
    posterior = torch.softmax(-0.5 * torch.tensor([[0.0, 9.0, 16.0]]), 1)
    optimum = -torch.logsumexp(-0.5 * torch.tensor([0.0, 9.0, 16.0]) - math.log(k), 0)
    assert losses.clustering_kl(mean, logvar, posterior, centers).item() == pytest.approx(optimum.item(), abs=1e-6)
    assert losses.clustering_kl(mean, logvar, y, centers) > losses.clustering_kl(mean, logvar, posterior, centers)


def test_clustering_kl_optimum_with_a_cluster_prior():
    # With q(y) = π the optimal Y is the mixture posterior softmax(-½||mean-μ_y||² + log π_y),
    # with value -log Σ_y π_y exp(-½||mean - μ_y||²): a larger π_y pulls the optimum towards y.
    centers = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    mean, logvar = torch.zeros(1, 2), torch.zeros(1, 2)
    prior = torch.tensor([0.1, 0.7, 0.2])
    logits = -0.5 * torch.tensor([0.0, 9.0, 16.0]) + prior.log()
    posterior = torch.softmax(logits, 0)[None]
    optimum = -torch.logsumexp(logits, 0)
    assert losses.clustering_kl(mean, logvar, posterior, centers, prior).item() == pytest.approx(optimum.item(), abs=1e-6)
    uniform_posterior = torch.softmax(-0.5 * torch.tensor([[0.0, 9.0, 16.0]]), 1)
    assert losses.clustering_kl(mean, logvar, uniform_posterior, centers, prior) > optimum
    # the uniform prior passed explicitly is the paper's Eq. 18
    y = torch.softmax(torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), 1)
    means = torch.randn(4, 2, generator=torch.Generator().manual_seed(2))
    assert losses.clustering_kl(means, logvar.expand(4, 2), y, centers, torch.full((3,), 1 / 3)).item() == \
        pytest.approx(losses.clustering_kl(means, logvar.expand(4, 2), y, centers).item(), rel=1e-6)


def test_clustering_kl_gradient_is_finite_when_a_code_sits_on_a_centre():
    centers = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    mean = torch.tensor([[1.0, 2.0]], requires_grad=True)
    y = torch.tensor([[0.9, 0.1]])
    losses.clustering_kl(mean, torch.zeros(1, 2), y, centers).backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(centers.grad).all()


def test_marginal_balance_kl_closed_form():
    k = 5
    # every sample certain of a different cluster in turn: usage uniform, KL 0
    assert losses.marginal_balance_kl(torch.eye(k)).item() == pytest.approx(0.0, abs=1e-7)
    # every sample in cluster 0: KL(one-hot || uniform) = log K
    y = torch.zeros(7, k)
    y[:, 0] = 1.0
    assert losses.marginal_balance_kl(y).item() == pytest.approx(math.log(k))
    # against the textbook formula on random rows
    y = torch.softmax(torch.randn(11, k, generator=torch.Generator().manual_seed(0)), 1)
    marginal = y.mean(0)
    expected = (marginal * (marginal * k).log()).sum()
    assert losses.marginal_balance_kl(y).item() == pytest.approx(expected.item(), rel=1e-6)


def test_marginal_balance_kl_against_a_cluster_prior():
    prior = torch.tensor([0.5, 0.3, 0.2])
    # usage exactly as q(y) says: KL 0 (one-hot rows in those proportions)
    y = torch.eye(3)[torch.tensor([0] * 5 + [1] * 3 + [2] * 2)]
    assert losses.marginal_balance_kl(y, prior=prior).item() == pytest.approx(0.0, abs=1e-7)
    # uniform usage against that prior: Σ (1/3) log((1/3) / π)
    expected = sum((1 / 3) * math.log((1 / 3) / p) for p in prior.tolist())
    assert losses.marginal_balance_kl(torch.eye(3), prior=prior).item() == pytest.approx(expected, rel=1e-6)


def test_marginal_balance_kl_with_a_running_marginal():
    # A batch that holds one cluster only (one graph partition) is not penalised as if the
    # data were unbalanced: with share s its marginal moves the running estimate by s.
    k, s = 4, 0.25
    running = torch.full((k,), 1.0 / k)
    y = torch.zeros(8, k)
    y[:, 0] = 1.0
    mixed = (1 - s) * running + s * y.mean(0)
    expected = (mixed * torch.log(mixed * k)).sum()
    value = losses.marginal_balance_kl(y, running, s)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    assert value.item() < 0.1 * losses.marginal_balance_kl(y).item()  # log K without the estimate
    # the gradient reaches the batch only, scaled by its share
    y = y.clone().requires_grad_(True)
    losses.marginal_balance_kl(y, running.requires_grad_(True), s).backward()
    assert running.grad is None and y.grad.abs().sum() > 0


def test_neighbour_consistency_against_a_loop_over_edges():
    from sddecc_dist.graph import normalized_adjacency

    n, k = 9, 4
    neighbors = np.array([[(i + 1) % n, (i + 2) % n] for i in range(n)])
    adjacency = normalized_adjacency(neighbors, n)  # CSR, symmetrised, with self-loops
    y = torch.softmax(torch.randn(n, k, generator=torch.Generator().manual_seed(0)), 1)
    dense = adjacency.to_dense()
    edges = [(i, j) for i in range(n) for j in range(n) if i != j and dense[i, j] > 0]
    expected = np.mean([-math.log(float(y[i] @ y[j])) for i, j in edges])
    assert losses.neighbour_consistency(y, adjacency).item() == pytest.approx(expected, rel=1e-6)
    rows = torch.tensor([0, 4, 5])
    expected_rows = np.mean([-math.log(float(y[i] @ y[j])) for i, j in edges if i in (0, 4, 5)])
    assert losses.neighbour_consistency(y, adjacency, rows).item() == pytest.approx(expected_rows, rel=1e-6)
    # zero when neighbours are certain of one shared cluster; large when they disagree
    same = torch.zeros(n, k)
    same[:, 2] = 1.0
    assert losses.neighbour_consistency(same, adjacency).item() == pytest.approx(0.0, abs=1e-7)
    alternating = torch.eye(k)[torch.arange(n) % 2]
    assert losses.neighbour_consistency(alternating, adjacency).item() > 5.0


def test_self_training_kl_against_its_definition_by_loops():
    """DEC's target P_ij ∝ Y_ij² / f_j, f_j = Σ_i Y_ij, and KL(P || Y) averaged over rows,
    computed with plain Python loops."""
    y = torch.softmax(torch.randn(6, 3, generator=torch.Generator().manual_seed(2)), dim=1)
    rows = y.tolist()
    f = [sum(r[j] for r in rows) for j in range(3)]
    kl = 0.0
    for r in rows:
        weight = [r[j] ** 2 / f[j] for j in range(3)]
        p = [w / sum(weight) for w in weight]
        kl += sum(p[j] * math.log(p[j] / r[j]) for j in range(3))
    assert losses.self_training_kl(y).item() == pytest.approx(kl / len(rows), rel=1e-5)
    # the target is fixed: a one-hot Y is its own target (zero), and P gets no gradient
    assert losses.self_training_kl(torch.eye(3)).item() == pytest.approx(0.0, abs=1e-6)
    y = y.clone().requires_grad_(True)
    losses.self_training_kl(y).backward()
    expected_grad = torch.zeros_like(y)  # d/dY of -Σ P log Y / N with P fixed
    with torch.no_grad():
        weight = y.pow(2) / y.sum(0)
        target = weight / weight.sum(1, keepdim=True)
        expected_grad = -target / y / len(y)
    torch.testing.assert_close(y.grad, expected_grad, rtol=1e-5, atol=1e-7)


def test_every_clustering_term_has_a_config_weight_and_every_weight_a_term():
    """A term is a function plus a LossConfig weight: the registry and the config agree."""
    import dataclasses

    from sddecc_dist.config import LossConfig

    config = LossConfig()
    for name, (weight, term) in losses.CLUSTER_TERMS.items():
        assert isinstance(getattr(config, weight), float), (name, weight)
        assert callable(term)
    used = {weight for weight, _ in losses.CLUSTER_TERMS.values()} | set(losses.DDECN_TERMS.values())
    weights = {f.name for f in dataclasses.fields(LossConfig) if f.name.endswith("_weight")}
    # kl_weight (λ2) weighs the prior KL and, unless eq18_weight is set, Eq. 18 (cluster_kl_weight)
    assert weights <= used | {"kl_weight", "eq18_weight"}, weights - used
    assert LossConfig(kl_weight=2.0).cluster_kl_weight == 2.0
    assert LossConfig(kl_weight=2.0, eq18_weight=0.5).cluster_kl_weight == 0.5
    assert LossConfig(kl_weight=2.0, eq18_weight=0.5, cluster_kl=False).cluster_kl_weight == 0.0
    assert list(losses.CLUSTER_TERMS)[:3] == ["neighbour", "cluster_kl", "balance"]  # the order they are summed in


def test_eq18_with_fixed_y_moves_codes_and_centres_but_not_y():
    """loss.eq18_fixed_y: the same value, no gradient into Y, and the codes' and centres'
    gradients those of Eq. 18 with Y a constant: Σ_y Y_y (mean - μ_y) per sample, over N."""
    from sddecc_dist.config import LossConfig

    g = torch.Generator().manual_seed(0)
    n, k, d = 6, 3, 4
    logits = torch.randn(n, k, generator=g, requires_grad=True)
    mean = torch.randn(n, d, generator=g, requires_grad=True)
    centers = torch.randn(k, d, generator=g, requires_grad=True)
    logvar = torch.zeros(n, d)

    def terms(fixed: bool) -> torch.Tensor:
        batch = losses.ClusterBatch(y=torch.softmax(logits, 1), adjacency=None, scored=None, codes=mean,
                                    codes_logvar=logvar, centers=centers, prior=None, running_marginal=None,
                                    batch_share=1.0, fixed_y=fixed)
        return losses.cluster_terms(batch, LossConfig(eq18_weight=1.0))["cluster_kl"]

    free, fixed = terms(False), terms(True)
    assert torch.allclose(free, fixed)
    fixed_grads = torch.autograd.grad(fixed, [mean, centers, logits], allow_unused=True)
    assert fixed_grads[2] is None  # nothing reaches the GCN's output
    y = torch.softmax(logits, 1).detach()
    expected_mean = (y[:, :, None] * (mean.detach()[:, None, :] - centers.detach()[None])).sum(1) / n
    expected_centres = -(y[:, :, None] * (mean.detach()[:, None, :] - centers.detach()[None])).sum(0) / n
    torch.testing.assert_close(fixed_grads[0], expected_mean)
    torch.testing.assert_close(fixed_grads[1], expected_centres)
    assert torch.autograd.grad(free, logits)[0].abs().sum() > 0  # the paper's Eq. 18 does move Y
