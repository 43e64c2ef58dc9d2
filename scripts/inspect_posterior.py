"""What a trained model's clustering rests on: code scale, centre spacing, how sharp Y is, and
how far Y (the GCN's or the linear head's) departs from the mixture posterior of each sample's
own code, p(y|z) ∝ q(y) exp(-½‖z - μ_y‖²), that Eq. 18 trains it towards (q(y) uniform, or
the start's cluster sizes with loss.cluster_prior=init).

    python scripts/inspect_posterior.py runs/reproduce/usps/convae_mi_gcn-s0/checkpoints/final.pt

Prints one line per figure; scores need a labelled dataset.
"""

import argparse

import torch

from sddecc_dist.data import load_all
from sddecc_dist.eval.metrics import clustering_scores
from sddecc_dist.model.gcn import smooth
from sddecc_dist.pipeline import ensure_graph, graph_view
from sddecc_dist.run_folder import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a run's checkpoints/final.pt")
    args = parser.parse_args()

    trained = load_model(args.checkpoint)
    config, manifest, model = trained.config, trained.manifest, trained.model
    model.eval()
    images, labels = load_all(config.data_dir, manifest)
    adjacency = ensure_graph(config.data_dir, config.graph.k, images, view=graph_view(config, manifest)) if config.model.use_gcn else None
    with torch.no_grad():
        encoded = model.encode(images)
        y = model.cluster_probabilities(images, encoded, adjacency)
        codes, centres = encoded.mean, model.centers
        log_prior = model.cluster_prior.log()
        posterior = torch.softmax(-0.5 * torch.cdist(codes, centres) ** 2 + log_prior, dim=1)
        t = config.loss.cluster_code_smoothing if adjacency is not None else 0
        # With loss.cluster_code_smoothing = t, Eq. 18 sees Â^t z: the posterior Y is trained towards.
        smoothed_posterior = torch.softmax(-0.5 * torch.cdist(smooth(adjacency, codes, t), centres) ** 2 + log_prior,
                                           dim=1) if t else None
    spacing = torch.pdist(centres)
    print(f"code std per dimension (mean over dims): {codes.std(0).mean():.3f}; "
          f"posterior sigma (mean): {encoded.logvar.mul(0.5).exp().mean():.3f}")
    print(f"centre distances: mean {spacing.mean():.2f}, min {spacing.min():.2f}")
    print(f"mean max probability: Y {y.max(1).values.mean():.4f}, code posterior {posterior.max(1).values.mean():.4f}")
    print(f"argmax Y = argmax code posterior for {(y.argmax(1) == posterior.argmax(1)).float().mean():.4f} of samples")
    print(f"cluster marginal of Y: {[round(v, 3) for v in y.mean(0).tolist()]}; "
          f"clusters used by argmax Y: {len(y.argmax(1).unique())}")
    if labels is not None and (labels >= 0).all():
        rows = [("Y", y), ("code posterior", posterior)]
        if smoothed_posterior is not None:
            rows.append((f"posterior of the codes smoothed {t}x", smoothed_posterior))
        for name, p in rows:
            scores = clustering_scores(labels.numpy(), p.argmax(1).numpy())
            print(f"{name}: " + " ".join(f"{k} {v:.4f}" for k, v in scores.items()))


if __name__ == "__main__":
    main()
