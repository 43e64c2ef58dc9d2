"""The GCN module (paper section 3.2, Eq. 14 to 17).

Layer l propagates Â [(1 - δ) H^(l) + δ Z^(l)] W^(l) with Â = D^-1/2 (A + I) D^-1/2 sparse, Z^(l)
the matching DDECN representation (a flattened encoder feature map, or the code for the last
layer). The first layer sees the raw pixels; the last ends in a softmax over K clusters.
"""

from __future__ import annotations

import torch
from torch import nn


def propagate(adjacency: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Â h with a sparse Â; gradients flow to h only (the graph is fixed). Runs in the graph's
    float32 outside autocast: sparse kernels do not take bf16/fp16 operands."""
    with torch.autocast(h.device.type, enabled=False):
        return torch.sparse.mm(adjacency, h.to(adjacency.dtype))


def smooth(adjacency: torch.Tensor, h: torch.Tensor, steps: int) -> torch.Tensor:
    """Â^steps h: features averaged over `steps`-hop graph neighbourhoods."""
    for _ in range(steps):
        h = propagate(adjacency, h)
    return h


class GCN(nn.Module):
    def __init__(self, input_dim: int, representation_dims: list[int], n_clusters: int, delta: float):
        """`representation_dims`: widths of Z^(1..L+1), i.e. each flattened encoder feature map
        followed by the code dimension. Layer widths follow them, as in SDCN."""
        super().__init__()
        self.delta = delta
        dims = [input_dim] + list(representation_dims)
        self.hidden = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(dims[-1], n_clusters)

    @property
    def n_layers(self) -> int:
        return len(self.hidden) + 1

    def layer_input(
        self, layer: int, x: torch.Tensor, h: torch.Tensor | None, z: torch.Tensor | None
    ) -> torch.Tensor:
        """Row-wise part of layer `layer` (0-based), before Â: X W for the first layer,
        [(1 - δ) H + δ Z] W after it (Eq. 15), Z being the matching DDECN representation.
        Row-wise, so it can run on any chunk of nodes (layer-wise inference)."""
        if layer == 0:
            return self.hidden[0](x)
        mixed = (1 - self.delta) * h + self.delta * z
        return (self.hidden[layer] if layer < len(self.hidden) else self.head)(mixed)

    def forward(
        self, x: torch.Tensor, representations: list[torch.Tensor], adjacency: torch.Tensor
    ) -> torch.Tensor:
        """x: (N, D) pixels; representations: Z^(1..L+1), each (N, d_l). Returns Y, (N, K)."""
        h = None
        for layer in range(self.n_layers):
            z = representations[layer - 1] if layer else None
            h = propagate(adjacency, self.layer_input(layer, x, h, z))
            if layer < self.n_layers - 1:
                h = torch.relu(h)
        return torch.softmax(h, dim=1)
