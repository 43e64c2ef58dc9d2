"""SDDECC = DDECN (autoencoder + MI discriminators) + GCN + learnable centres μ_y.

The module computes loss terms from tensors it is given (images, an adjacency, a batch); it
has no notion of processes, devices or data files. The trainer decides what to feed it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from sddecc_dist.config import LossConfig, ModelConfig, resolve_input_view
from sddecc_dist.model import losses
from sddecc_dist.model.ddecn import (
    ConvDecoder,
    ConvEncoder,
    EncoderOutput,
    GlobalDiscriminator,
    ImageView,
    LocalDiscriminator,
    reparameterize,
)
from sddecc_dist.model.gcn import GCN, smooth


@dataclass
class LossTerms:
    total: torch.Tensor
    parts: dict[str, float]  # detached values for logging


class SDDECC(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], n_clusters: int, config: ModelConfig):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.n_clusters = n_clusters
        d = self.latent_dim = auto_latent_dim(n_clusters) if config.latent_dim == "auto" else config.latent_dim
        # The encoder, the decoder's target and the GCN's first layer see the view, not the image.
        self.input_view = ImageView(resolve_input_view(config.input_view, self.image_shape[0]))
        seen_shape = self.input_view.output_shape(self.image_shape)
        strides = auto_strides(seen_shape, len(config.channels)) if config.strides == "auto" else config.strides
        self.encoder = ConvEncoder(seen_shape, config.channels, config.kernel_sizes, strides, d)
        shapes = self.encoder.feature_shapes
        self.decoder = ConvDecoder(seen_shape, shapes, config.kernel_sizes, strides, d, config.decoder_output)
        n_layers = len(shapes)
        self.local_layer = (config.local_layer or math.ceil(n_layers / 2)) - 1  # 0-based
        self.global_disc = GlobalDiscriminator(math.prod(shapes[-1]), d, config.global_disc_hidden)
        self.local_disc = LocalDiscriminator(shapes[self.local_layer][0], d, config.local_disc_hidden)
        self.use_gcn = config.use_gcn
        self.pooled_gcn_features = config.gcn_features == "pooled"
        # The self-labelling stage's classifier: K logits from the flattened top map (the pooled
        # map or the 10-d code separate MNIST's classes less well: docs/method.md). Created
        # without drawing from the generator and zeroed, so that the autoencoder and discriminators
        # start from the same random weights as without it (the GCN, made after them, draws for a
        # wider last layer); zero logits carry nothing until the stage trains it.
        self.self_label_classifier = None
        if config.self_label_head:
            self.self_label_classifier = nn.utils.skip_init(nn.Linear, math.prod(shapes[-1]), n_clusters)
            nn.init.zeros_(self.self_label_classifier.weight)
            nn.init.zeros_(self.self_label_classifier.bias)
        if config.use_gcn:
            # the last layer's Z: the code, then the self-labelling classifier's logits
            code_width = d + (n_clusters if config.self_label_head else 0)
            dims = [s[0] if self.pooled_gcn_features else math.prod(s) for s in shapes] + [code_width]
            self.gcn = GCN(math.prod(seen_shape), dims, n_clusters, config.delta)
        else:
            # Ablations without structure: p(y|z) from a linear softmax head on the code.
            self.cluster_head = nn.Linear(d, n_clusters)
        # q(z|y) = N(μ_y, I); set from the initial partition of the pretrained codes (k-means or
        # Ward) before the joint phase.
        self.centers = nn.Parameter(torch.zeros(n_clusters, d))
        # q(y): the paper's uniform prior, or (loss.cluster_prior=init) the trainer sets it to
        # the initial partition's cluster proportions. A buffer: saved with the model, not learnt.
        self.register_buffer("cluster_prior", torch.full((n_clusters,), 1.0 / n_clusters))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The parameters by what trains them at which rate: `ddecn` (autoencoder, discriminators
        and centres μ_y) and `head` (p(y|x): the GCN, or the linear head of the ablations
        without it), each in `parameters()` order."""
        head = "gcn." if self.use_gcn else "cluster_head."
        groups: dict[str, list[nn.Parameter]] = {"ddecn": [], "head": []}
        for name, parameter in self.named_parameters():
            groups["head" if name.startswith(head) else "ddecn"].append(parameter)
        return groups

    # ---- pieces -------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> EncoderOutput:
        encoded = self.encoder(self.input_view(x))
        if self.self_label_classifier is not None:
            encoded.logits = self.self_label_classifier(encoded.features[-1].flatten(1))
        return encoded

    def load_trained(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a trained model's weights, also one written before the model had a q(y) buffer
        (its q(y) was the uniform one) or a self-labelling classifier (zero logits: none)."""
        optional = {"cluster_prior": torch.full((self.n_clusters,), 1.0 / self.n_clusters)}
        if self.self_label_classifier is not None:
            optional.update({f"self_label_classifier.{k}": torch.zeros_like(v)
                             for k, v in self.self_label_classifier.state_dict().items()})
        self.load_state_dict({**optional, **state_dict})

    @torch.no_grad()
    def graph_encoding(self, x: torch.Tensor, chunk_size: int = 4096) -> EncoderOutput:
        """The encoder's output for every image of `x`, without gradients, in chunks, keeping only
        what the GCN and the clustering terms read: each feature map averaged over its locations
        (as a 1x1 map) with model.gcn_features=pooled, whole otherwise; the code mean and
        log-variance. A whole 28x28 map set is about 46 KB a sample; pooled, 0.9 KB."""
        # Each chunk is cut down to what the GCN reads before the next is encoded: holding every
        # chunk's whole maps until the end would be the 46 KB a sample this is meant to avoid.
        parts = []
        for i in range(0, max(len(x), 1), chunk_size):  # an empty x: one empty chunk
            part = self.encode(x[i : i + chunk_size])
            parts.append(EncoderOutput([self._gcn_view(f) for f in part.features], part.mean, part.logvar,
                                       part.logits))
        features = [torch.cat([part.features[layer] for part in parts]) for layer in range(len(parts[0].features))]
        logits = torch.cat([part.logits for part in parts]) if parts[0].logits is not None else None
        return EncoderOutput(features, torch.cat([part.mean for part in parts]),
                             torch.cat([part.logvar for part in parts]), logits)

    def _gcn_view(self, feature_map: torch.Tensor) -> torch.Tensor:
        """What the GCN reads of one feature map, still a map: its mean over the locations with
        pooled GCN features (the same values gcn_representations takes), else the map."""
        return feature_map.mean((2, 3), keepdim=True) if self.pooled_gcn_features else feature_map

    def spliced_encoding(self, x: torch.Tensor, encoder_index: torch.Tensor,
                         background: EncoderOutput | None = None) -> tuple[EncoderOutput, EncoderOutput]:
        """(the whole batch's encoding for the GCN and the clustering terms, the encoding of the
        nodes `encoder_index` with every feature map). Only the nodes `encoder_index` go through
        the encoder with gradients; the others come from a no-grad pass. Their rows carry the
        gradient scaled by N / |encoder_index|, so that the encoder's gradient is an unbiased
        estimate of the gradient through every node; the values are those of a full pass.
        `background`: a `graph_encoding` of all of `x` made earlier, read for the other nodes
        instead of encoding them now (its rows for `encoder_index` are replaced)."""
        part = self.encode(x[encoder_index])
        scale = len(x) / len(encoder_index)
        if background is None:  # encode the other nodes only (each node once); S's rows are set below
            others = torch.ones(len(x), dtype=torch.bool, device=x.device)
            others[encoder_index] = False
            others = others.nonzero().squeeze(1)
            rest = self.graph_encoding(x[others])
            spread = lambda rows: rows.new_empty((len(x), *rows.shape[1:])).index_put_((others,), rows)  # noqa: E731
            background = rest.map(spread)

        def spliced(rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            # value: `values`; gradient: scale times it (the detached term cancels in the value)
            scaled = values * scale - values.detach() * (scale - 1.0)
            return rows.index_put((encoder_index,), scaled)

        features = [spliced(b, self._gcn_view(f)) for b, f in zip(background.features, part.features)]
        logits = None if part.logits is None else spliced(background.logits, part.logits)
        return EncoderOutput(features, spliced(background.mean, part.mean),
                             spliced(background.logvar, part.logvar), logits), part

    @torch.no_grad()
    def mean_codes(self, images: torch.Tensor, device, batch_size: int = 4096) -> torch.Tensor:
        """Mean codes of every image, in chunks, on the CPU (no sampling: the code clustered)."""
        was_training = self.training
        self.eval()
        means = [self.encode(images[i : i + batch_size].to(device)).mean.cpu()
                 for i in range(0, len(images), batch_size)]
        self.train(was_training)
        return torch.cat(means)

    def cluster_probabilities(
        self, x: torch.Tensor, encoded: EncoderOutput, adjacency: torch.Tensor | None
    ) -> torch.Tensor:
        """Y = p(y|x), (N, K). With the GCN this needs every node of `adjacency` in `x`."""
        if not self.use_gcn:
            return torch.softmax(self.cluster_head(encoded.mean), dim=1)
        if adjacency is None:
            raise ValueError("the GCN needs the normalised adjacency of the samples it is given")
        return self.gcn(self.gcn_input(x), self.gcn_representations(encoded), adjacency)

    def gcn_input(self, x: torch.Tensor) -> torch.Tensor:
        """H^(0) of the GCN (Eq. 14): the images as the networks see them (model.input_view), flat."""
        return self.input_view(x).flatten(1)

    def gcn_representations(self, encoded: EncoderOutput) -> list[torch.Tensor]:
        """Z^(1..L+1) for the GCN: each encoder feature map (flattened, or averaged over its
        locations with model.gcn_features=pooled), then the code mean (beside the self-labelling
        classifier's logits when the model has one)."""
        last = encoded.mean if encoded.logits is None else torch.cat([encoded.mean, encoded.logits], 1)
        if self.pooled_gcn_features:
            return [f.mean((2, 3)) for f in encoded.features] + [last]
        return [f.flatten(1) for f in encoded.features] + [last]

    def ddecn_losses(
        self, x: torch.Tensor, encoded: EncoderOutput, loss_config: LossConfig, target: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Reconstruction (of `target`, by default `x` itself) and the two JSD MI terms of
        Eq. 12 on a minibatch (unweighted)."""
        # Without the prior KL nothing fixes the log-variance's scale: sampling through a free
        # log-variance lets it drift up until the decoder sees only noise and saturates (MNIST's
        # AE+K-means: mean log-variance 41.7 after 2 epochs, reconstruction frozen). Such a model
        # is a plain autoencoder, as the paper's ConvAE and AE baselines are: decode the mean.
        z = reparameterize(encoded.mean, encoded.logvar) if loss_config.uses_prior_kl else encoded.mean
        target = self.input_view(x if target is None else target)
        terms = {"recon": losses.reconstruction_loss(target, self.decoder(z))}
        if loss_config.mi_weight > 0 and loss_config.global_mi:
            partner = losses.shuffle_partners(len(z)).to(z.device)  # (x_i, z_partner(i)): the negatives
            positive, negative = self.global_disc.positive_and_negative(encoded.features[-1], z, partner)
            terms["global_mi"] = losses.jsd_mi_loss(positive, negative)
        if loss_config.mi_weight > 0 and loss_config.local_mi:
            partner = losses.shuffle_partners(len(z)).to(z.device)  # (C_partner(i), z_i)
            positive, negative = self.local_disc.positive_and_negative(encoded.features[self.local_layer], z, partner)
            # mean over the M x M locations = the 1/(M x M) Σ_ij of Eq. 12
            terms["local_mi"] = losses.jsd_mi_loss(positive, negative)
        return terms

    # ---- the two phases' objectives -----------------------------------------------------
    def forward(self, phase: str, x: torch.Tensor, **kwargs):
        """Dispatch to a phase's objective, so a distributed wrapper sees a forward call."""
        if phase == "pretrain":
            return self.pretrain_loss(x, **kwargs)
        if phase == "joint":
            return self.joint_loss(x, **kwargs)
        if phase == "head":
            return self.head_loss(x, **kwargs)
        if phase == "self_label":
            return self.self_label_loss(x, **kwargs)
        raise ValueError(f"unknown phase {phase!r}: expected 'pretrain', 'self_label', 'head' or 'joint'")

    def pretrain_loss(self, x: torch.Tensor, loss_config: LossConfig, target: torch.Tensor | None = None) -> LossTerms:
        """Eq. 12 + Eq. 13: reconstruction, λ1 · (global + local MI), λ2 · prior KL. `target`:
        what the decoder reconstructs, when not `x` itself (an augmented `x` with a clean target)."""
        encoded = self.encode(x)
        return self._weighted(self._pretrain_terms(x, encoded, loss_config, target), loss_config)

    def _pretrain_terms(self, x: torch.Tensor, encoded: EncoderOutput, loss_config: LossConfig,
                        target: torch.Tensor | None) -> dict[str, torch.Tensor]:
        terms = self.ddecn_losses(x, encoded, loss_config, target)
        if loss_config.view_weight > 0:
            if target is None:
                raise ValueError("loss.view_weight > 0 contrasts a clean image with its augmented view: "
                                 "pass the clean images as `target`")
            # The clean image's code against its view's, the batch's other images the negatives:
            # the code must keep what tells an image from others across warps, which the
            # reconstruction (pixels) and the JSD terms (one shuffled negative, scored beside the
            # feature map the code is computed from) do not ask of it. docs/method.md.
            # The encoder alone: the self-labelling classifier's logits of the clean image are not used.
            clean_mean = self.encoder(self.input_view(target)).mean
            terms["view_nce"] = losses.view_contrast(encoded.mean, clean_mean, loss_config.view_temperature)
        if loss_config.uses_prior_kl:
            terms["prior_kl"] = losses.gaussian_prior_kl(encoded.mean, encoded.logvar)
        return terms

    def self_label_loss(self, x: torch.Tensor, labels: torch.Tensor, loss_config: LossConfig,
                        target: torch.Tensor | None = None) -> LossTerms:
        """The self-labelling stage: the pretraining objective (the autoencoder keeps its codes
        meaningful) plus the cross-entropy of the classifier's logits on `x` (augmented) against
        `labels`, the start's cluster of each image."""
        encoded = self.encode(x)
        terms = self._pretrain_terms(x, encoded, loss_config, target)
        terms["self_label_ce"] = nn.functional.cross_entropy(encoded.logits, labels)
        return self._weighted(terms, loss_config)

    def joint_loss(
        self,
        x: torch.Tensor,
        adjacency: torch.Tensor | None,
        aux_index: torch.Tensor,
        loss_config: LossConfig,
        loss_index: torch.Tensor | None = None,
        running_marginal: tuple[torch.Tensor, float] | None = None,
        start_labels: torch.Tensor | None = None,
        encoder_index: torch.Tensor | None = None,
        background: EncoderOutput | None = None,
    ) -> tuple[LossTerms, torch.Tensor]:
        """Eq. 19 on a graph batch: the clustering KL over the nodes `loss_index` of `x` (all
        when None), reconstruction and MI on the nodes `aux_index` (a random subset: an
        unbiased estimate that keeps the decoder and discriminators off the full batch).
        Every node of `x` goes through the encoder and GCN. `start_labels`: the start's cluster
        of each scored node, for the start term. `encoder_index`: only these nodes take the
        encoder's gradient (`spliced_encoding`), and `aux_index` then counts positions in
        `encoder_index`; `background`: the other nodes' codes from an earlier no-grad pass
        (`spliced_encoding`). Returns the terms and Y (detached)."""
        if encoder_index is None:
            encoded = self.encode(x)
            aux_x, aux_encoded = x[aux_index], _rows(encoded, aux_index)
        else:
            encoded, part = self.spliced_encoding(x, encoder_index, background)
            aux_x, aux_encoded = x[encoder_index[aux_index]], _rows(part, aux_index)
        y = self.cluster_probabilities(x, encoded, adjacency)
        terms = self.ddecn_losses(aux_x, aux_encoded, loss_config)
        terms.update(self._cluster_terms(encoded, y, self.centers, self._prior(loss_config), loss_config,
                                         loss_index, running_marginal, adjacency, start_labels))
        return self._weighted(terms, loss_config), y.detach()

    def head_loss(
        self,
        x: torch.Tensor,
        adjacency: torch.Tensor | None,
        loss_config: LossConfig,
        loss_index: torch.Tensor | None = None,
        running_marginal: tuple[torch.Tensor, float] | None = None,
        start_labels: torch.Tensor | None = None,
        encoded: EncoderOutput | None = None,
    ) -> tuple[LossTerms, torch.Tensor]:
        """The DDECN frozen, only the GCN (or head) learns, before Y is allowed to move the
        codes: towards the mixture posterior of the pretrained codes (Eq. 18), or, given
        `start_labels` (the initial partition's cluster of each node `loss_index`), towards that
        partition itself (cross-entropy). `encoded`: the frozen encoder's output for `x`, when
        the caller kept it from an earlier step (the same batch, the same weights)."""
        if encoded is None:
            with torch.no_grad():
                encoded = self.encode(x)
        y = self.cluster_probabilities(x, encoded, adjacency)
        if start_labels is not None:
            rows = y if loss_index is None else y[loss_index]
            terms = {"start_ce": -torch.log(rows.gather(1, start_labels[:, None]).clamp_min(1e-12)).mean()}
        else:
            # This warm-up teaches Y Eq. 18's posterior: Y is what it trains, never a fixed target.
            warm_up_config = dataclasses.replace(loss_config, eq18_fixed_y=False)
            terms = self._cluster_terms(encoded, y, self.centers.detach(), self._prior(loss_config), warm_up_config,
                                        loss_index, running_marginal, adjacency)
        return self._weighted(terms, loss_config), y.detach()

    def _prior(self, loss_config: LossConfig) -> torch.Tensor | None:
        """q(y) for the loss functions: None is the paper's uniform 1/K, computed exactly there
        (the float32 buffer's log differs in the last bits, and runs would drift from before)."""
        return self.cluster_prior if loss_config.cluster_prior == "init" else None

    @staticmethod
    def _cluster_terms(
        encoded: EncoderOutput,
        y: torch.Tensor,
        centers: torch.Tensor,
        prior: torch.Tensor | None,
        loss_config: LossConfig,
        loss_index: torch.Tensor | None,
        running_marginal: tuple[torch.Tensor, float] | None,
        adjacency: torch.Tensor | None = None,
        start_labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The clustering terms (losses.CLUSTER_TERMS: Eq. 18 and the additions whose weight is
        on) over the nodes `loss_index`. `running_marginal`: (estimate of the data's cluster
        marginal, this batch's share of the data) for minibatches (see losses.marginal_balance_kl).
        `adjacency`: the batch's graph, for Eq. 18 on smoothed codes and the graph terms."""
        codes = encoded.mean
        if loss_config.cluster_code_smoothing and adjacency is not None:
            # Smoothed over every node of the batch before the loss rows are picked.
            codes = smooth(adjacency, codes, loss_config.cluster_code_smoothing)
        marginal, share = running_marginal or (None, 1.0)
        batch = losses.ClusterBatch(y=y, adjacency=adjacency, scored=loss_index, codes=codes,
                                    codes_logvar=encoded.logvar, centers=centers, prior=prior,
                                    running_marginal=marginal, batch_share=share, start_labels=start_labels,
                                    fixed_y=loss_config.eq18_fixed_y)
        return losses.cluster_terms(batch, loss_config)

    @staticmethod
    def _weighted(terms: dict[str, torch.Tensor], loss_config: LossConfig) -> LossTerms:
        total = losses.weighted_total(terms, loss_config)
        return LossTerms(total, {name: float(value.detach()) for name, value in terms.items()})


def auto_latent_dim(n_clusters: int, smallest: int = 10) -> int:
    """The code's dimension for K clusters: the paper's 10 up to 10 clusters, K above. Ten
    numbers are a cramped code for 20 or 40 clusters (the UMAP start then separates them in a
    10-d embedding of 10-d codes); N2D embeds into K dimensions for the same reason."""
    return max(smallest, n_clusters)


def auto_strides(image_shape: tuple[int, int, int], n_layers: int, min_top: int = 4) -> list[int]:
    """Stride 2 while the feature map stays at least `min_top` wide, then 1: the top map keeps
    spatial detail whatever the image size (28 -> 14, 7, 4; 16 -> 8, 4, 4; 8 -> 4, 4, 4)."""
    size, strides = min(image_shape[1:]), []
    for _ in range(n_layers):
        halved = (size + 1) // 2
        strides.append(2 if halved >= min_top else 1)
        size = halved if halved >= min_top else size
    return strides


def _rows(encoded: EncoderOutput, index: torch.Tensor) -> EncoderOutput:
    """The encoder output of the nodes `index` only."""
    return encoded.map(lambda rows: rows[index])
