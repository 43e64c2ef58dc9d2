"""The loss terms of Eq. 12, 13 and 18, each a plain function of tensors (closed forms tested),
and which config weight multiplies each.

A term of the joint phase's clustering objective is a function of a `ClusterBatch`, registered
with `@cluster_term(name, weight=...)` below, where `weight` names its LossConfig field. The
model computes every registered term whose weight is > 0 and adds it, weighted, to the loss;
so adding a term is this file (the function) plus config.py (its weight, default 0).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sddecc_dist.config import LossConfig


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


def view_contrast(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE (SimCLR's NT-Xent, one direction each way): row i of `a` and of `b` are two views
    of one image; the other rows of the batch are its negatives."""
    logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / temperature
    targets = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def shuffle_partners(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Negatives for the MI estimators: for each sample of a batch of n, the index of another
    sample of the batch to pair it with.

    A random cyclic shift by 1..n-1 of a random permutation, so no sample keeps its own
    partner (a plain permutation would leave fixed points labelled as negatives)."""
    if n < 2:
        raise ValueError("MI negatives need a batch of at least 2 samples")
    order = torch.randperm(n, generator=generator, device="cpu")
    shift = int(torch.randint(1, n, (1,), generator=generator))
    partner = torch.empty_like(order)
    partner[order] = order.roll(shift)
    return partner


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
    if running_marginal is not None and batch_share < 1.0:  # a batch of all the data needs no estimate
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


def self_training_kl(y: torch.Tensor, frequency: torch.Tensor | None = None) -> torch.Tensor:
    """DEC's self-training term (Xie et al. 2016): KL(P || Y), averaged over samples, towards
    the sharpened target P_ij = (Y_ij² / f_j) / Σ_j' (Y_ij'² / f_j'), f_j = Σ_i Y_ij the soft
    cluster frequency. P is a fixed target (no gradient): confident assignments pull the rest,
    and dividing by f keeps large clusters from absorbing the others. `frequency`: the data's
    cluster marginal when `y` is a minibatch (any scale; a graph partition's own frequencies
    would push its samples out of the clusters it holds)."""
    with torch.no_grad():
        frequency = y.sum(0) if frequency is None else frequency.detach()
        weight = y.pow(2) / frequency.clamp_min(1e-12)
        target = weight / weight.sum(1, keepdim=True)
    return (target * (torch.log(target.clamp_min(1e-12)) - torch.log(y.clamp_min(1e-12)))).sum(1).mean()


# ---- which weight multiplies which term ------------------------------------------------------

@dataclass
class ClusterBatch:
    """What a term of the clustering objective sees in one joint step. The scored rows are
    picked when a term first asks for them, so that the autograd graph (and with it the
    order in which gradients are summed) does not depend on which terms are on."""

    y: torch.Tensor  # (B, K): Y of every node of the batch
    adjacency: torch.Tensor | None  # the batch's normalised adjacency (None without the GCN)
    scored: torch.Tensor | None  # rows of the batch whose loss this rank takes; None: all
    codes: torch.Tensor  # (B, d): code means of every node (graph-smoothed when configured)
    codes_logvar: torch.Tensor  # (B, d)
    centers: torch.Tensor  # (K, d): μ_y
    prior: torch.Tensor | None  # q(y); None: the paper's uniform
    running_marginal: torch.Tensor | None  # estimate of the data's cluster marginal (minibatches)
    batch_share: float  # the batch's share of the data
    start_labels: torch.Tensor | None = None  # the start's cluster of each scored row
    fixed_y: bool = False  # Eq. 18 takes Y as a fixed target (loss.eq18_fixed_y)

    def _pick(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.scored is None else rows[self.scored]

    @functools.cached_property
    def mean(self) -> torch.Tensor:
        """(S, d): the scored rows' code means."""
        return self._pick(self.codes)

    @functools.cached_property
    def logvar(self) -> torch.Tensor:
        return self._pick(self.codes_logvar)

    @functools.cached_property
    def y_scored(self) -> torch.Tensor:
        """(S, K): Y of the scored rows (one index op, shared by every term that uses it)."""
        return self._pick(self.y)


ClusterTerm = Callable[[ClusterBatch], torch.Tensor]
# name -> (the LossConfig attribute holding its weight, the term), in the order they are added
CLUSTER_TERMS: dict[str, tuple[str, ClusterTerm]] = {}

# The minibatch terms of DDECN (Eq. 12, 13) and the warm-up's cross-entropy: name -> weight attribute
# (None: weight 1).
DDECN_TERMS: dict[str, str | None] = {
    "recon": "recon_weight",
    "global_mi": "mi_weight",
    "local_mi": "mi_weight",
    "prior_kl": "kl_weight",
    "view_nce": "view_weight",
    "start_ce": None,  # the only term of a head warm-up towards the initial partition
    "self_label_ce": None,  # the self-labelling stage's classifier against the start's clusters
}


def cluster_term(name: str, weight: str) -> Callable[[ClusterTerm], ClusterTerm]:
    """Register a term of the joint phase's clustering objective under `name`, multiplied by
    LossConfig's `weight` attribute and computed only when that weight is > 0."""
    if not hasattr(LossConfig(), weight):
        raise AttributeError(f"LossConfig has no weight {weight!r} for the loss term {name!r}")

    def register(term: ClusterTerm) -> ClusterTerm:
        CLUSTER_TERMS[name] = (weight, term)
        return term

    return register


def term_weight(name: str, loss_config: LossConfig) -> float:
    """The weight of the term `name` under `loss_config`."""
    attribute = CLUSTER_TERMS[name][0] if name in CLUSTER_TERMS else DDECN_TERMS[name]
    return 1.0 if attribute is None else getattr(loss_config, attribute)


def cluster_terms(batch: ClusterBatch, loss_config: LossConfig) -> dict[str, torch.Tensor]:
    """Every registered clustering term whose weight is > 0 (unweighted), in registration order."""
    return {name: term(batch) for name, (weight, term) in CLUSTER_TERMS.items()
            if getattr(loss_config, weight) > 0}


def weighted_total(terms: dict[str, torch.Tensor], loss_config: LossConfig) -> torch.Tensor:
    """Σ weight · term over `terms`, summed in their order."""
    return sum(term_weight(name, loss_config) * value for name, value in terms.items())


@cluster_term("neighbour", weight="neighbour_weight")
def _neighbour(batch: ClusterBatch) -> torch.Tensor:
    return neighbour_consistency(batch.y, batch.adjacency, batch.scored)


@cluster_term("cluster_kl", weight="cluster_kl_weight")
def _cluster_kl(batch: ClusterBatch) -> torch.Tensor:
    y = batch.y_scored.detach() if batch.fixed_y else batch.y_scored
    return clustering_kl(batch.mean, batch.logvar, y, batch.centers, batch.prior)


@cluster_term("balance", weight="balance_weight")
def _balance(batch: ClusterBatch) -> torch.Tensor:
    return marginal_balance_kl(batch.y_scored, batch.running_marginal, batch.batch_share, prior=batch.prior)


@cluster_term("start", weight="start_weight")
def _start(batch: ClusterBatch) -> torch.Tensor:
    if batch.start_labels is None:
        raise ValueError("loss.start_weight > 0 needs the start's labels of the scored rows")
    return -torch.log(batch.y_scored.gather(1, batch.start_labels[:, None]).clamp_min(1e-12)).mean()


@cluster_term("self_training", weight="self_training_weight")
def _self_training(batch: ClusterBatch) -> torch.Tensor:
    frequency = None
    if batch.running_marginal is not None and batch.batch_share < 1.0:
        share = batch.batch_share
        frequency = (1 - share) * batch.running_marginal + share * batch.y_scored.mean(0)
    return self_training_kl(batch.y_scored, frequency)
