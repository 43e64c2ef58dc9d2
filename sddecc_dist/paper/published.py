"""The paper's published numbers (Fu et al. 2021, Tables 3 and 4) and how our method names map
to its rows. ACC and NMI; the paper gives no ARI."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["DATASET_ORDER", "METHOD_ORDER", "PAPER", "PAPER_N", "PAPER_ROW", "PaperScore", "TARGETS", "paper_score"]

# The tables and figures that `sddecc reproduce` makes.
TARGETS = ("table3", "table4", "fig6", "fig7")


class PaperScore(NamedTuple):
    acc: float
    nmi: float


# The paper's numbers (Fu et al. 2021), ACC and NMI; it gives no ARI. Keys: paper row name,
# then dataset (our manifest names). Table 3 compares methods, Table 4 ablates SDDECC; its last
# row (ConvAE+MI+GCN) is SDDECC itself and repeats Table 3's figures.
PAPER: dict[str, dict[str, PaperScore]] = {
    # Table 3
    "K-means": {"usps": PaperScore(.6682, .6270), "mnist": PaperScore(.5322, .5004),
                "fashion-mnist": PaperScore(.4742, .5120)},
    "AE+K-means": {"usps": PaperScore(.6931, .6620), "mnist": PaperScore(.8076, .7303),
                   "fashion-mnist": PaperScore(.5853, .6142)},
    "DEC": {"usps": PaperScore(.7408, .7529), "mnist": PaperScore(.8655, .8372),
            "fashion-mnist": PaperScore(.5180, .5462)},
    "IDEC": {"usps": PaperScore(.7605, .7846), "mnist": PaperScore(.8806, .8672),
             "fashion-mnist": PaperScore(.5291, .5570)},
    "Deepcluster": {"usps": PaperScore(.5623, .5403), "mnist": PaperScore(.7971, .6615),
                    "fashion-mnist": PaperScore(.5422, .5100)},
    "SDCN": {"usps": PaperScore(.7789, .7926), "mnist": PaperScore(.8530, .8427),
             "fashion-mnist": PaperScore(.5780, .6047)},
    "SDDECC": {"usps": PaperScore(.7986, .8142), "mnist": PaperScore(.9022, .8958),
               "fashion-mnist": PaperScore(.6171, .6306)},
    # Table 4
    "ConvAE": {"usps": PaperScore(.6981, .6519), "mnist": PaperScore(.7762, .7450),
               "fashion-mnist": PaperScore(.5462, .5563)},
    "ConvAE+MI": {"usps": PaperScore(.7853, .7442), "mnist": PaperScore(.8350, .8023),
                  "fashion-mnist": PaperScore(.5922, .6091)},
    "ConvAE+GCN": {"usps": PaperScore(.7822, .7875), "mnist": PaperScore(.8574, .8449),
                   "fashion-mnist": PaperScore(.5843, .6167)},
}
PAPER["ConvAE+MI+GCN"] = PAPER["SDDECC"]  # Table 4's last row is SDDECC: one copy of its figures

# Our method name -> the paper's row. ConvAE+MI+K-means has no paper row.
PAPER_ROW: dict[str, str] = {
    "K-means": "K-means",
    "ConvAE+K-means": "AE+K-means",
    "ConvAE": "ConvAE",
    "ConvAE+MI": "ConvAE+MI",
    "ConvAE+GCN": "ConvAE+GCN",
    "ConvAE+MI+GCN": "SDDECC",
}

# How many images the paper clusters (train and test together). A run on fewer samples (a
# manifest may still be named "mnist") is flagged in the table: its Δ is not like for like.
PAPER_N: dict[str, int] = {"usps": 9298, "mnist": 70000, "fashion-mnist": 70000}

DATASET_ORDER = ["usps", "mnist", "fashion-mnist"]
METHOD_ORDER = ["K-means", "ConvAE+K-means", "ConvAE+MI+K-means", "ConvAE", "ConvAE+MI",
                "ConvAE+GCN", "ConvAE+MI+GCN"]


def paper_score(dataset: str, method: str) -> PaperScore | None:
    """The paper's (ACC, NMI) for our method on a dataset, or None where it has no figure."""
    row = PAPER_ROW.get(method)
    return None if row is None else PAPER[row].get(dataset)
