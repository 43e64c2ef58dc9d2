"""The results report: loading run folders, grouping over seeds, the Markdown table and its
errors. Every run folder here is fake, built in tmp_path with known numbers (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from sddecc_dist.paper.published import PAPER, PAPER_ROW
from sddecc_dist.paper.report import (
    ReportError,
    group_runs,
    load_run,
    markdown_report,
    report,
)

SELECTION = "final epoch (no label-based selection)"


def make_run(folder: Path, *, dataset: str = "usps", method: str = "ConvAE+MI+GCN", seed: int = 0,
             acc: float | None = 0.7, nmi: float | None = 0.6, ari: float | None = 0.5,
             seconds: float = 100.0, n_samples: int = 9298, mi_weight: float | None = 0.01,
             kl_weight: float | None = 1.0, jsonl: list[dict] | None = None,
             config: bool = True, drop: tuple[str, ...] = (), loss_extra: dict | None = None,
             train: dict | None = None) -> Path:
    """A finished run folder as the trainer writes it; acc=None makes an unlabelled run."""
    folder.mkdir(parents=True)
    metrics = {"dataset": dataset, "method": method, "seed": seed, "n_samples": n_samples,
               "n_clusters": 10, "epoch": 200, "selection": SELECTION, "seconds": seconds,
               "peak_memory_mib": 1000.0, "assignments": "assignments.txt"}
    if acc is not None:
        metrics.update(acc=acc, nmi=nmi, ari=ari)
    for key in drop:
        del metrics[key]
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if config:
        loss = {"recon_weight": 100.0}
        if mi_weight is not None:
            loss["mi_weight"] = mi_weight
        if kl_weight is not None:
            loss["kl_weight"] = kl_weight
        loss.update(loss_extra or {})
        config_dict = {"name": folder.name, "seed": seed, "loss": loss}
        if train is not None:
            config_dict["train"] = train
        (folder / "config.yaml").write_text(yaml.safe_dump(config_dict))
    if jsonl is not None:
        (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in jsonl))
    return folder


def table_rows(text: str) -> list[list[str]]:
    """The data rows of the report's table, as lists of cells."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    # lines[0] is the header, lines[1] the --- rule.
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


def test_paper_constants_map_our_methods_to_the_paper_rows():
    # SDDECC (Table 3) is the full model, the last row of Table 4.
    assert PAPER["SDDECC"] == PAPER["ConvAE+MI+GCN"]
    assert PAPER["SDDECC"]["usps"] == (0.7986, 0.8142)
    assert PAPER["AE+K-means"]["mnist"] == (0.8076, 0.7303)
    assert PAPER["ConvAE+GCN"]["fashion-mnist"] == (0.5843, 0.6167)
    assert PAPER_ROW["ConvAE+K-means"] == "AE+K-means" and PAPER_ROW["K-means"] == "K-means"
    assert "ConvAE+MI+K-means" not in PAPER_ROW  # no paper row
    for row in PAPER.values():
        assert set(row) == {"usps", "mnist", "fashion-mnist"}


def test_load_run_reads_scores_lambdas_and_the_label_selected_epoch(tmp_path):
    jsonl = [
        {"phase": "pretrain", "epoch": 1, "recon": 3.0},
        {"phase": "kmeans", "epoch": 30, "acc": 0.99, "nmi": 0.99, "ari": 0.99},  # not joint
        {"phase": "joint", "epoch": 10, "acc": 0.70, "nmi": 0.61, "ari": 0.5},
        {"phase": "joint", "epoch": 20, "acc": 0.75, "nmi": 0.64, "ari": 0.5},
        {"phase": "joint", "epoch": 30, "acc": 0.75, "nmi": 0.66, "ari": 0.5},  # tie: earliest wins
        {"phase": "joint", "epoch": 40, "acc": 0.72, "nmi": 0.70, "ari": 0.5},
    ]
    run = load_run(make_run(tmp_path / "r", seed=3, acc=0.72, nmi=0.70, ari=0.6, mi_weight=0.05,
                            kl_weight=2.0, jsonl=jsonl))
    assert (run.dataset, run.method, run.seed, run.epoch) == ("usps", "ConvAE+MI+GCN", 3, 200)
    assert run.selection == SELECTION
    assert (run.acc, run.nmi, run.ari, run.lambda1, run.lambda2) == (0.72, 0.70, 0.6, 0.05, 2.0)
    assert (run.best_label_epoch, run.best_label_acc, run.best_label_nmi) == (20, 0.75, 0.64)


def test_load_run_without_labels_config_or_log(tmp_path):
    # A K-means baseline folder may have no config.yaml; an unlabelled run has no scores.
    run = load_run(make_run(tmp_path / "r", method="K-means", acc=None, config=False,
                            jsonl=[{"phase": "joint", "epoch": 1, "recon": 2.0}]))
    assert run.acc is None and run.nmi is None and run.ari is None
    assert run.lambda1 is None and run.lambda2 is None
    assert run.best_label_epoch is None and run.best_label_acc is None


def test_load_run_errors_name_the_folder(tmp_path):
    with pytest.raises(ReportError, match=r"nowhere.*does not exist"):
        load_run(tmp_path / "nowhere")

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(ReportError, match=r"unfinished.*run not finished \(no metrics\.json\)"):
        load_run(unfinished)

    broken = make_run(tmp_path / "broken")
    (broken / "metrics.json").write_text('{"acc": 0.7,')
    with pytest.raises(ReportError, match=r"broken.*not valid JSON"):
        load_run(broken)

    with pytest.raises(ReportError, match=r"old.*lacks key\(s\) method, seed"):
        load_run(make_run(tmp_path / "old", drop=("method", "seed")))

    with pytest.raises(ReportError, match=r"halfscored.*lacks key\(s\) ari"):
        load_run(make_run(tmp_path / "halfscored", drop=("ari",)))


def test_group_mean_and_sample_std_match_numpy(tmp_path):
    accs, nmis, aris, secs = [0.70, 0.74, 0.79], [0.60, 0.66, 0.65], [0.5, 0.55, 0.52], [90.0, 100.0, 120.0]
    runs = [load_run(make_run(tmp_path / f"s{seed}", seed=seed, acc=accs[seed], nmi=nmis[seed],
                              ari=aris[seed], seconds=secs[seed])) for seed in range(3)]
    (group,) = group_runs(runs)
    assert group.seeds == [0, 1, 2] and group.acc.n == 3
    for stat, values in ((group.acc, accs), (group.nmi, nmis), (group.ari, aris), (group.seconds, secs)):
        assert stat.mean == pytest.approx(np.mean(values))
        assert stat.std == pytest.approx(np.std(values, ddof=1))


def test_groups_split_on_lambdas_method_dataset_and_n(tmp_path):
    runs = [
        load_run(make_run(tmp_path / "a", seed=0)),
        load_run(make_run(tmp_path / "b", seed=0, mi_weight=0.1)),       # other λ1
        load_run(make_run(tmp_path / "c", seed=0, kl_weight=2.0)),       # other λ2
        load_run(make_run(tmp_path / "d", seed=0, method="ConvAE")),
        load_run(make_run(tmp_path / "e", seed=0, dataset="mnist", n_samples=70000)),
        load_run(make_run(tmp_path / "f", seed=0, dataset="mnist", n_samples=10000)),  # a subset
    ]
    groups = group_runs(runs)
    assert len(groups) == 6 and all(len(group.runs) == 1 for group in groups)
    # One run: std 0, not NaN.
    assert all(group.acc.std == 0.0 for group in groups)


def test_duplicate_seed_in_a_group_names_both_folders(tmp_path):
    runs = [load_run(make_run(tmp_path / "first", seed=1)), load_run(make_run(tmp_path / "copy", seed=1))]
    with pytest.raises(ReportError, match=r"first.*copy.*seed 1"):
        group_runs(runs)


def test_markdown_rows_deltas_and_order(tmp_path):
    specs = [  # deliberately out of table order
        ("digits", "ConvAE+MI+GCN"), ("fashion-mnist", "ConvAE"), ("mnist", "ConvAE+MI+GCN"),
        ("usps", "ConvAE+MI+GCN"), ("usps", "ConvAE+GCN"), ("usps", "ConvAE+MI"), ("usps", "ConvAE"),
        ("usps", "ConvAE+MI+K-means"), ("usps", "ConvAE+K-means"), ("usps", "K-means"), ("cifar", "ConvAE"),
    ]
    n_of = {"usps": 9298, "mnist": 70000, "fashion-mnist": 70000, "digits": 1797, "cifar": 60000}
    runs = []
    for i, (dataset, method) in enumerate(specs):
        for seed in (0, 1):
            runs.append(load_run(make_run(tmp_path / f"{i}-s{seed}", dataset=dataset, method=method,
                                          seed=seed, acc=0.6 + 0.01 * i + 0.02 * seed,
                                          nmi=0.5 + 0.01 * i - 0.01 * seed, n_samples=n_of[dataset])))
    text = markdown_report(group_runs(runs), title="Test")
    rows = table_rows(text)
    order = [(row[0].split(" ")[0], row[1].split(" ")[0]) for row in rows]
    assert order == [
        ("usps", "K-means"), ("usps", "ConvAE+K-means"), ("usps", "ConvAE+MI+K-means"), ("usps", "ConvAE"),
        ("usps", "ConvAE+MI"), ("usps", "ConvAE+GCN"), ("usps", "ConvAE+MI+GCN"), ("mnist", "ConvAE+MI+GCN"),
        ("fashion-mnist", "ConvAE"), ("cifar", "ConvAE"), ("digits", "ConvAE+MI+GCN"),
    ]
    assert text.startswith("# Test\n")

    by_key = {(run.dataset, run.method): [] for run in runs}
    for run in runs:
        by_key[(run.dataset, run.method)].append(run)
    for row, (dataset, method) in zip(rows, order):
        members = by_key[(dataset, method)]
        acc_mean = np.mean([run.acc for run in members])
        nmi_mean = np.mean([run.nmi for run in members])
        acc_std = np.std([run.acc for run in members], ddof=1)
        assert row[5] == "2: 0, 1"
        assert row[6] == f"{acc_mean:.4f} ± {acc_std:.4f}"
        paper_row = PAPER_ROW.get(method)
        paper = PAPER[paper_row].get(dataset) if paper_row else None
        if paper is None:  # digits, cifar, ConvAE+MI+K-means: no paper figure
            assert row[7] == row[8] == row[10] == row[11] == "—"
        else:
            assert float(row[7]) == paper.acc and float(row[10]) == paper.nmi
            assert row[8] == f"{acc_mean - paper.acc:+.4f}"
            assert row[11] == f"{nmi_mean - paper.nmi:+.4f}"
        assert row[13] == SELECTION

    # The paper's row name is shown where it differs from ours.
    methods = [row[1] for row in rows]
    assert "ConvAE+MI+GCN (SDDECC)" in methods and "ConvAE+K-means (AE+K-means)" in methods
    assert "ConvAE" in methods
    # Every run folder is listed under the table.
    assert all(str(run.path) in text for run in runs)
    assert "final epoch, with no label-based model selection" in text and "not a result" in text


def test_label_selected_column_is_the_mean_over_seeds(tmp_path):
    runs = []
    best = [(30, 0.80, 0.71), (50, 0.76, 0.69)]
    for seed, (epoch, acc, nmi) in enumerate(best):
        jsonl = [{"phase": "joint", "epoch": 10, "acc": 0.5, "nmi": 0.4, "ari": 0.3},
                 {"phase": "joint", "epoch": epoch, "acc": acc, "nmi": nmi, "ari": 0.6},
                 {"phase": "joint", "epoch": 100, "acc": 0.7, "nmi": 0.7, "ari": 0.6}]
        runs.append(load_run(make_run(tmp_path / f"s{seed}", seed=seed, acc=0.7, nmi=0.7, jsonl=jsonl)))
    (row,) = table_rows(markdown_report(group_runs(runs)))
    acc = np.mean([b[1] for b in best])
    nmi = np.mean([b[2] for b in best])
    assert row[14] == f"{acc:.4f} / {nmi:.4f} (epochs 30, 50)"


def test_unlabelled_runs_show_dashes(tmp_path):
    runs = [load_run(make_run(tmp_path / f"s{seed}", seed=seed, acc=None)) for seed in (0, 1)]
    (row,) = table_rows(markdown_report(group_runs(runs)))
    assert row[6] == row[8] == row[9] == row[11] == row[12] == row[14] == "—"
    assert row[7] == f"{PAPER['SDDECC']['usps'].acc:.4f}"  # the paper's figure still shows


def test_subset_of_a_paper_dataset_is_flagged(tmp_path):
    runs = [load_run(make_run(tmp_path / "r", dataset="mnist", n_samples=10000))]
    text = markdown_report(group_runs(runs))
    assert table_rows(text)[0][0] == "mnist (N=10000) *"
    assert "not a like-for-like comparison" in text


def test_report_expands_directories_and_writes_the_file(tmp_path):
    runs_dir = tmp_path / "runs"
    make_run(runs_dir / "usps-s0", seed=0, acc=0.70)
    make_run(runs_dir / "usps-s1", seed=1, acc=0.80)
    (runs_dir / "notes").mkdir()  # not a run folder: skipped
    single = make_run(tmp_path / "elsewhere" / "usps-s2", seed=2, acc=0.75)
    out = tmp_path / "out" / "report.md"
    # runs_dir/usps-s0 is named twice (alone and through runs_dir): counted once.
    text = report([runs_dir, single, runs_dir / "usps-s0"], out=out)
    assert out.read_text() == text
    (row,) = table_rows(text)
    assert row[5] == "3: 0, 1, 2"
    assert row[6].startswith(f"{np.mean([0.70, 0.80, 0.75]):.4f} ± ")
    for name in ("usps-s0", "usps-s1", "usps-s2"):
        assert name in text


def test_report_errors_on_unfinished_runs_unless_allowed(tmp_path):
    runs_dir = tmp_path / "runs"
    make_run(runs_dir / "done", seed=0)
    (runs_dir / "running").mkdir()
    (runs_dir / "running" / "config.yaml").write_text("seed: 1\n")
    with pytest.raises(ReportError, match=r"not finished.*running"):
        report([runs_dir], out=None)
    text = report([runs_dir], out=None, allow_unfinished=True)
    assert len(table_rows(text)) == 1
    unfinished_part = text.split("Not finished")[1]
    assert str(runs_dir / "running") in unfinished_part


def test_report_rejects_paths_without_runs(tmp_path):
    with pytest.raises(ReportError, match="missing"):
        report([tmp_path / "missing"], out=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="empty.*not a run folder"):
        report([tmp_path / "empty"], out=None)


def test_additions_to_the_paper_method_split_groups_and_are_named(tmp_path):
    """A run whose config adds terms the paper does not have is another method: its own row,
    with the terms named; the paper's literal loss shows —."""
    paper = [load_run(make_run(tmp_path / f"paper-s{seed}", seed=seed)) for seed in (0, 1)]
    ours = [load_run(make_run(tmp_path / f"ours-s{seed}", seed=seed, loss_extra={
        "balance_weight": 5.0, "cluster_code_smoothing": 64, "neighbour_weight": 1.0, "global_mi": True}))
        for seed in (0, 1)]
    assert paper[0].additions == "—"
    assert ours[0].additions == "balance 5, neighbour 1, Eq. 18 on Â^64 codes"
    groups = group_runs(paper + ours)
    assert [len(g.runs) for g in groups] == [2, 2]
    rows = table_rows(markdown_report(groups))
    assert [row[4] for row in rows] == ["—", "balance 5, neighbour 1, Eq. 18 on Â^64 codes"]
    # without a joint phase (k-means on the codes) the joint-phase terms do not apply
    kmeans = load_run(make_run(tmp_path / "kmeans", method="ConvAE+K-means",
                               loss_extra={"balance_weight": 5.0, "cluster_kl": False}))
    assert kmeans.additions == "—"
    # a Ward start is the result without a joint phase too; q(y) only matters with one
    ward = load_run(make_run(tmp_path / "ward", loss_extra={"cluster_prior": "init"},
                             train={"center_init": "ward", "head_warmup_target": "start"}))
    assert ward.additions == "q(y) from the start, head warm-up on the start, ward start"
    ward_kmeans = load_run(make_run(tmp_path / "ward-kmeans", method="ConvAE+K-means",
                                    loss_extra={"cluster_prior": "init", "cluster_kl": False},
                                    train={"center_init": "ward", "head_warmup_target": "start"}))
    assert ward_kmeans.additions == "ward start"
    with pytest.raises(ReportError, match=r"config.yaml: 'loss.neighbour_weight' must be of type float, got 'high'"):
        load_run(make_run(tmp_path / "bad", loss_extra={"neighbour_weight": "high"}))
