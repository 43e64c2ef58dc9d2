"""The loss terms of Eq. 12, 13 and 18, each a plain function of tensors (closed forms tested)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Eq. 13: 1/2 ||x - x_hat||^2 summed over pixels, averaged over samples."""
    return 0.5 * (x - x_hat).pow(2).flatten(1).sum(1).mean()


def gaussian_prior_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)), summed over code dimensions, averaged over samples."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(1).mean()


def jsd_mi_loss(positive_scores: torch.Tensor, negative_scores: torch.Tensor) -> torch.Tensor:
    """Negative Jensen-Shannon MI estimate of Eq. 9/10 (natural log), to be minimised.

    -E_pos[log σ(T)] - E_neg[log(1 - σ(T))] = E_pos[softplus(-T)] + E_neg[softplus(T)].
    Its minimum over T is log 4 - 2 JSD(pos || neg), reached at T = log(p_pos / p_neg).
    """
    return F.softplus(-positive_scores).mean() + F.softplus(negative_scores).mean()


def shuffle_in_batch(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Negatives for the MI estimators: pair each sample with another sample of the batch.

    A random cyclic shift by 1..B-1 of a random permutation, so no sample keeps its own
    partner (a plain permutation would leave fixed points labelled as negatives)."""
    n = x.shape[0]
    if n < 2:
        raise ValueError("MI negatives need a batch of at least 2 samples")
    order = torch.randperm(n, generator=generator, device="cpu")
    shift = int(torch.randint(1, n, (1,), generator=generator))
    partner = torch.empty_like(order)
    partner[order] = order.roll(shift)
    return x[partner.to(x.device)]


def clustering_kl(
    mean: torch.Tensor, logvar: torch.Tensor, y: torch.Tensor, centers: torch.Tensor,
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 18: KL(p(y|x) p(z|x) || q(z|y) q(y)), q(z|y) = N(μ_y, I), q(y) = `prior` (the
    paper's uniform when None); closed form.

    p(z|x) = N(mean, diag(exp(logvar))) and p(y|x) = Y from the GCN, so per sample
      Σ_y Y_y KL(N(mean, σ²) || N(μ_y, I)) + KL(Y || q(y))
    = Σ_y Y_y · ½(||mean - μ_y||² + Σ_d σ²_d - d - Σ_d log σ²_d) + Σ_y Y_y log(Y_y / q(y)).
    The expectation over z is taken exactly, not by sampling. Averaged over samples.
    """
    log_prior = _log_prior(prior, centers.shape[0], y)
    # Explicit squared distances: cdist's gradient is NaN where a code sits on a centre.
    sq_dist = (mean[:, None, :] - centers[None, :, :]).pow(2).sum(2)  # (N, K)
    gaussian_part = 0.5 * (logvar.exp() - 1.0 - logvar).sum(1, keepdim=True)  # (N, 1)
    per_cluster_kl = 0.5 * sq_dist + gaussian_part
    categorical_kl = (y * (torch.log(y.clamp_min(1e-12)) - log_prior)).sum(1)
    return ((y * per_cluster_kl).sum(1) + categorical_kl).mean()


def _log_prior(prior: torch.Tensor | None, n_clusters: int, like: torch.Tensor) -> torch.Tensor:
    """log q(y), (K,): uniform when `prior` is None."""
    if prior is None:
        return torch.full((n_clusters,), -math.log(n_clusters), dtype=like.dtype, device=like.device)
    return torch.log(prior.to(like.dtype).clamp_min(1e-12))


def marginal_balance_kl(
    y: torch.Tensor, running_marginal: torch.Tensor | None = None, batch_share: float = 1.0,
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(marginal || q(y)), q(y) = `prior` (uniform when None): zero when clusters are used
    as q(y) says, log K for a uniform q(y) when one cluster takes all.

    Eq. 18's per-sample KL(Y_i || uniform) softens each row but does not stop a cluster from
    emptying; this term states the paper's purpose for a uniform q(y) ("so that the classes
    are balanced") at the level of the cluster marginal.

    Full batch: the marginal is mean_i Y_i over every node. Minibatch: a Cluster-GCN step
    covers a few graph partitions, which hold few clusters, and must not be asked to be
    balanced by itself; the marginal is then (1 - s) · running + s · mean_batch Y, with
    `running_marginal` a detached estimate over the data and s = `batch_share` (the batch's
    share of the data), so the batch moves the data's marginal by its own weight."""
    marginal = y.mean(0)
    if running_marginal is not None:
        marginal = (1 - batch_share) * running_marginal.detach() + batch_share * marginal
    return (marginal * (torch.log(marginal.clamp_min(1e-12)) - _log_prior(prior, y.shape[1], y))).sum()


def neighbour_consistency(y: torch.Tensor, adjacency: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the graph's edges (i, j), i != j, of -log(Y_i . Y_j): zero when every pair of
    neighbours puts all its mass on one shared cluster. `rows`: only edges leaving these nodes."""
    crow, dst = adjacency.crow_indices(), adjacency.col_indices()  # the graph's CSR layout
    src = torch.repeat_interleave(torch.arange(len(crow) - 1, device=crow.device), crow.diff())
    keep = src != dst
    if rows is not None:
        member = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
        member[rows] = True
        keep &= member[src]
    src, dst = src[keep], dst[keep]
    return -torch.log((y[src] * y[dst]).sum(1).clamp_min(1e-12)).mean()
