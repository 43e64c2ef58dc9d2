"""The GCN module (paper section 3.2, Eq. 14 to 17).

Layer l propagates Â [(1 - δ) H^(l) + δ Z^(l)] W^(l) with Â = D^-1/2 (A + I) D^-1/2 sparse, Z^(l)
the matching DDECN representation (a flattened encoder feature map, or the code for the last
layer). The first layer sees the raw pixels; the last ends in a softmax over K clusters.
"""

from __future__ import annotations

import torch
from torch import nn


def propagate(adjacency: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Â h with a sparse Â; gradients flow to h only (the graph is fixed)."""
    return torch.sparse.mm(adjacency, h)


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

    def forward(
        self, x: torch.Tensor, representations: list[torch.Tensor], adjacency: torch.Tensor
    ) -> torch.Tensor:
        """x: (N, D) pixels; representations: Z^(1..L+1), each (N, d_l). Returns Y, (N, K)."""
        h = torch.relu(propagate(adjacency, self.hidden[0](x)))
        for layer, z in zip(self.hidden[1:], representations[:-1]):
            mixed = (1 - self.delta) * h + self.delta * z
            h = torch.relu(propagate(adjacency, layer(mixed)))
        mixed = (1 - self.delta) * h + self.delta * representations[-1]
        return torch.softmax(propagate(adjacency, self.head(mixed)), dim=1)
