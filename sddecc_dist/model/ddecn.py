"""DDECN: the convolutional autoencoder with a Gaussian code and two MI discriminators.

Paper section 3.1. The model knows nothing about ranks, shards or graphs: it maps a batch of
images to codes, feature maps and reconstructions, and scores (feature, code) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import kornia
import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class EncoderOutput:
    features: list[torch.Tensor]  # each encoder layer's activation map, (B, C_l, H_l, W_l)
    mean: torch.Tensor  # (B, d)
    logvar: torch.Tensor  # (B, d)
    logits: torch.Tensor | None = None  # (B, K): the self-labelling classifier's, when the model has one

    def map(self, fn) -> EncoderOutput:
        """The same output with `fn` applied to every tensor (e.g. picking rows)."""
        return EncoderOutput([fn(f) for f in self.features], fn(self.mean), fn(self.logvar),
                             None if self.logits is None else fn(self.logits))


class ImageView(nn.Module):
    """What the networks see of an image batch (model.input_view). `raw`: the pixels. `sobel`:
    one channel, the magnitude of the Sobel gradient over every channel, divided by its largest
    value in the image. A digit drawn in any colour on any background has the same sobel view
    (the gradient scales with the ink-paper difference, and the division removes the scale), so
    clusters cannot form around colours; DeepCluster and IIC feed their networks Sobel filters
    for the same reason."""

    def __init__(self, view: str):
        super().__init__()
        if view not in ("raw", "sobel"):
            raise ValueError(f"unknown input view {view!r}: raw or sobel")
        self.view = view

    def output_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        return tuple(image_shape) if self.view == "raw" else (1, *image_shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.view == "raw":
            return x
        gradient = kornia.filters.spatial_gradient(x, mode="sobel")  # (B, C, 2, H, W)
        magnitude = gradient.pow(2).sum((1, 2)).add(1e-12).sqrt().unsqueeze(1)  # (B, 1, H, W)
        return magnitude / magnitude.flatten(1).amax(1).clamp_min(1e-6).view(-1, 1, 1, 1)


class ConvEncoder(nn.Module):
    """Strided 3x3 (per Table 2) conv layers, then two linear heads for mean and log-variance."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        channels: list[int],
        kernel_sizes: list[int],
        strides: list[int],
        latent_dim: int,
    ):
        super().__init__()
        in_channels = image_shape[0]
        layers = []
        for out_channels, kernel, stride in zip(channels, kernel_sizes, strides):
            layers.append(nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2))
            in_channels = out_channels
        self.convs = nn.ModuleList(layers)
        # Shapes of every layer's output, needed by the decoder, the GCN and the discriminators.
        with torch.no_grad():
            x = torch.zeros(1, *image_shape)
            self.feature_shapes: list[tuple[int, int, int]] = []
            for conv in self.convs:
                x = conv(x)
                self.feature_shapes.append(tuple(x.shape[1:]))
        flat = x.numel()
        self.mean_head = nn.Linear(flat, latent_dim)
        self.logvar_head = nn.Linear(flat, latent_dim)

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        features = []
        for conv in self.convs:
            x = torch.relu(conv(x))
            features.append(x)
        flat = x.flatten(1)
        return EncoderOutput(features, self.mean_head(flat), self.logvar_head(flat))


class ConvDecoder(nn.Module):
    """Mirror of the encoder (Decoder-1 = Encoder-4 ... in Table 2); `output`: "sigmoid" (in [0, 1])
    or "linear"."""

    def __init__(self, image_shape, feature_shapes, kernel_sizes, strides, latent_dim, output: str = "sigmoid"):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.output = output
        self.top_shape = feature_shapes[-1]
        self.fc = nn.Linear(latent_dim, int(torch.tensor(self.top_shape).prod()))
        # Output shapes in decoding order: the encoder's feature shapes reversed, then the image.
        targets = list(reversed(feature_shapes[:-1])) + [self.image_shape]
        sources = list(reversed(feature_shapes))
        self.output_sizes = [t[1:] for t in targets]
        self.deconvs = nn.ModuleList(
            nn.ConvTranspose2d(src[0], tgt[0], kernel, stride, padding=kernel // 2)
            for src, tgt, kernel, stride in zip(
                sources, targets, reversed(kernel_sizes), reversed(strides)
            )
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc(z)).view(-1, *self.top_shape)
        for i, (deconv, size) in enumerate(zip(self.deconvs, self.output_sizes)):
            # output_size resolves the stride ambiguity (e.g. 7 -> 4 -> 7 on MNIST).
            x = deconv(x, output_size=size)
            if i < len(self.deconvs) - 1:
                x = torch.relu(x)
        return torch.sigmoid(x) if self.output == "sigmoid" else x


class GlobalDiscriminator(nn.Module):
    """T1(x, z): an MLP on [flattened top feature map of x, z] (3 hidden layers, Su's DIM)."""

    def __init__(self, feature_dim: int, latent_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(feature_dim + latent_dim, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([features.flatten(1), z], dim=1)).squeeze(1)

    def positive_and_negative(self, features: torch.Tensor, z: torch.Tensor,
                              partner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """forward(features, z) and forward(features, z[partner]) (the negatives: codes shuffled).

        The first layer is linear in [features, z], so its feature part, the widest product of
        the discriminator, is the same for both and computed once; the other layers run on the
        two halves as one batch."""
        first = self.net[0]
        w_features, w_code = first.weight.split([first.in_features - z.shape[1], z.shape[1]], dim=1)
        from_features = F.linear(features.flatten(1), w_features, first.bias)
        from_code = F.linear(z, w_code)
        h = torch.cat([from_features + from_code, from_features + from_code[partner]])
        return self.net[1:](h).squeeze(1).chunk(2)


class LocalDiscriminator(nn.Module):
    """T2(C_ij, z): three 1x1 convs over the middle feature map concatenated with tiled z."""

    def __init__(self, feature_channels: int, latent_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(feature_channels + latent_dim, hidden, 1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
            nn.Conv2d(hidden, 1, 1),
        )

    def forward(self, feature_map: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Returns one score per location, (B, M, M)."""
        tiled = z[:, :, None, None].expand(-1, -1, *feature_map.shape[2:])
        # A 1x1 conv is a linear map of each location's channels: applied as one matrix product
        # over all B·M·M locations (channels last) it takes half the time of the convolutions
        # on CPU (their backward dominated the pretraining step), with the same weights.
        return self._layers(torch.cat([feature_map, tiled], dim=1).permute(0, 2, 3, 1), self.net)

    def positive_and_negative(self, feature_map: torch.Tensor, z: torch.Tensor,
                              partner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """forward(feature_map, z) and forward(feature_map[partner], z) (the negatives: each
        code beside another image's map).

        The first 1x1 conv is linear in [C_ij, z]: its map part (every location) and its code
        part are each computed once, the negatives' map part is the positives' reordered, and
        the other two layers run on both halves as one batch."""
        first = self.net[0]
        weight = first.weight.flatten(1)
        w_map, w_code = weight.split([weight.shape[1] - z.shape[1], z.shape[1]], dim=1)
        from_map = F.linear(feature_map.permute(0, 2, 3, 1), w_map, first.bias)  # (B, M, M, hidden)
        from_code = F.linear(z, w_code)[:, None, None, :]
        h = torch.cat([from_map + from_code, from_map[partner] + from_code])
        return self._layers(h, self.net[1:]).chunk(2)

    @staticmethod
    def _layers(h: torch.Tensor, layers: nn.Sequential) -> torch.Tensor:
        for layer in layers:
            h = F.linear(h, layer.weight.flatten(1), layer.bias) if isinstance(layer, nn.Conv2d) else layer(h)
        return h.squeeze(-1)


def reparameterize(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """z = mean + sigma * eps, so gradients reach mean and log-variance."""
    return mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
