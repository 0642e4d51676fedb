"""benchmarks/report.py: the README check against a run, the marker replacement, the claims tables from a
results list written here (complete and partial), the figures. No training."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from benchmark_modules import load

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


rep = load("report")
claims = load("claims")

ACC = [0.9340, 0.9770, 0.9830, 0.9830]
FLOPS = [10640, 30880, 109760, 421120]


def make_run(path: Path, acc: list[float] = ACC) -> Path:
    """A finished run directory as the trainer leaves it (only what the report reads)."""
    path.mkdir(parents=True)
    metrics = {
        "rule": "osgd",
        "optimizer": "sgd",
        "dataset": "mnist1d",
        "model": "nested-width",
        "epochs": 2,
        "split_sizes": {"train": 3600, "val": 400, "test": 1000},
        "exits": [
            {"index": k, "accuracy": a, "flops": f, "val": 0.95, "test": a} for k, (a, f) in enumerate(zip(acc, FLOPS))
        ],
        "auc": 0.95,
        "budgeted": [
            {"budget": 10640.0, "val": {"accuracy": 0.95}, "test": {"accuracy": 0.9661, "mean_flops": 14339.0}},
            {"budget": 69360.0, "val": {"accuracy": 0.97}, "test": {"accuracy": 0.9812, "mean_flops": 19562.0}},
            {"budget": 128080.0, "val": {"accuracy": 0.97}, "test": {"accuracy": 0.9790, "mean_flops": 25000.0}},
        ],
    }
    (path / "metrics.json").write_text(json.dumps(metrics))
    (path / "history.json").write_text(
        json.dumps([{"seconds": 60.0, "cpu_seconds": 50.2}, {"seconds": 67.0, "cpu_seconds": 50.0}])
    )
    return path


def readme_quoting(table_rows: list[str]) -> str:
    """A README whose quick-start block quotes a per-exit table typed here (not by the report)."""
    start, end = rep.markers("quickstart")
    t0, t1 = rep.markers("quickstart-time")
    c0, c1 = rep.markers("claims-summary")
    return (
        "# x\n\n## Quick start\n\nTrain it (" + t0 + "old time" + t1 + ").\n\n```bash\nanytrain train\n```\n\n"
        f"{start}\nWhat it printed:\n\n```\nnested-width · rule osgd\n"
        "exit  accuracy   MACs/sample   val acc\n" + "\n".join(table_rows) + "\narea under accuracy-vs-FLOPs: 0.9547\n"
        f"```\n{end}\n\n## Results at convergence\n\n{c0}\n{c1}\n"
    )


ROWS = [
    "   0    0.9340        10,640    0.9575",
    "   1    0.9770        30,880    0.9800",
    "   2    0.9830       109,760    0.9800",
    "   3    0.9830       421,120    0.9800",
]


# ---- the CI check --------------------------------------------------------------------------------------
def test_check_passes_when_every_exit_is_within_the_tolerance(tmp_path: Path, capsys) -> None:
    run = make_run(tmp_path / "run", [0.9380, 0.9730, 0.9830, 0.9880])  # +0.4, -0.4, 0, +0.5 points
    readme = tmp_path / "README.md"
    readme.write_text(readme_quoting(ROWS))
    assert rep.main(["--check-default-run", str(run), "--readme", str(readme), "--tolerance", "0.005"]) == 0
    out = capsys.readouterr().out
    assert "0.9340 0.9770 0.9830 0.9830" in out and "0.9380 0.9730 0.9830 0.9880" in out


def test_check_fails_with_one_line_naming_the_exit_beyond_the_tolerance(tmp_path: Path, capsys) -> None:
    run = make_run(tmp_path / "run", [0.9340, 0.9710, 0.9830, 0.9830])  # exit 1: −0.6 points
    readme = tmp_path / "README.md"
    readme.write_text(readme_quoting(ROWS))
    assert rep.main(["--check-default-run", str(run), "--readme", str(readme)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exit 1 by -0.0060" in err[0] and "exit 0" not in err[0]


def test_check_fails_when_the_exit_counts_differ_and_refuses_a_readme_without_markers(tmp_path: Path, capsys) -> None:
    run = make_run(tmp_path / "run")
    readme = tmp_path / "README.md"
    readme.write_text(readme_quoting(ROWS[:3]))
    assert rep.main(["--check-default-run", str(run), "--readme", str(readme)]) == 1
    assert "quotes 3 exits" in capsys.readouterr().err
    readme.write_text("# no markers\n")
    assert rep.main(["--check-default-run", str(run), "--readme", str(readme)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs exactly one" in err[0]
    assert rep.main(["--check-default-run", str(tmp_path / "nothing"), "--readme", str(readme)]) == 2
    assert "not a finished run" in capsys.readouterr().err


def test_quickstart_block_quotes_the_cli_table_and_reads_back(tmp_path: Path) -> None:
    from anytrain.cli import run_table

    run = make_run(tmp_path / "run")
    qs = rep.quickstart(run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"```\n{run_table(metrics)}\n```" in qs["quickstart"]  # the CLI's own table, verbatim
    assert rep.table_accuracies(qs["quickstart"]) == ACC
    assert "```bash" not in qs["quickstart"]  # .ci/run reads the quick start's bash blocks: none added
    assert "about 2 minutes" in qs["quickstart-time"] and "127 s of training (100 CPU seconds)" in qs["quickstart-time"]
    assert "93.4 % at 2.5 %" in qs["quickstart"]  # 10,640 / 421,120 MACs
    assert "98.1 % at 19.6k MACs" in qs["quickstart"]  # the budget best on validation, smaller of the tie


# ---- markers -------------------------------------------------------------------------------------------
def test_replacement_keeps_everything_outside_the_markers_and_is_idempotent(tmp_path: Path) -> None:
    start, end = rep.markers("claims-summary")
    before = "# T\r\n\ttabs, trailing spaces   \n« ünïcode » — <!-- other comment -->\n"
    after = "\n\nmore text  \n<!-- end: other -->\nno final newline"
    text = before + start + "\nold body\n" + end + after
    new = rep.replace_generated(text, "claims-summary", "\nnew body\n")
    assert new == before + start + "\nnew body\n" + end + after
    assert rep.replace_generated(new, "claims-summary", "\nnew body\n") == new

    path = tmp_path / "README.md"
    path.write_bytes(text.encode())
    rep._update(path, {"claims-summary": "\nnew body\n"})
    data = path.read_bytes()
    assert data.startswith(before.encode()) and data.endswith((end + after).encode())
    rep._update(path, {"claims-summary": "\nnew body\n"})
    assert path.read_bytes() == data
    with pytest.raises(rep.ReportError, match="exactly one"):
        rep.replace_generated(text + start, "claims-summary", "x")
    with pytest.raises(rep.ReportError, match="comes before"):
        rep.replace_generated(f"{end}\n{start}", "claims-summary", "x")


# ---- the claims ----------------------------------------------------------------------------------------
def run_record(study: str, arm: str, net: str, seed: int, lr: float, acc: list[float], **kw) -> dict:
    epochs = 4
    return {
        "record": "run",
        "study": study,
        "arm": arm,
        "net": net,
        "seed": seed,
        "epochs": epochs,
        "steps": 40,
        "lr": lr,
        "test_acc": acc,
        "val_history": [[0.5 + 0.1 * e] * len(acc) for e in range(epochs)],
        "val_score": kw.pop("val_score", 0.8),
        "trained_exits": list(range(len(acc))),
        "converged": kw.pop("converged", True),
        "macs": [1000 * (k + 1) for k in range(len(acc))],
        "auc": 0.9,
        "seconds": 10.0,
        "cpu_seconds": kw.pop("cpu", [2.0] * epochs),
        "run_dir": kw.pop("run_dir", f"{study}/{arm}-{net}/lr{lr:g}/seed{seed}"),
    }


def dgl_results() -> list[dict]:
    """The DGL study complete: lr 0.1 chosen on seed 0 (best val_score), seeds 1 and 2 at it; one run unconverged."""
    recs = []
    last = {"dgl": [0.975, 0.970, 0.980], "backprop": [0.980, 0.980, 0.980], "sgl": [0.960, 0.965, 0.970]}
    for arm in ("dgl", "backprop", "sgl"):
        for lr in claims.GRIDS["sgd"]:
            acc = [0.5, 0.6, 0.7, last[arm][0]]
            recs.append(run_record("dgl", arm, "cnn2d-exits", 0, lr, acc, val_score=0.9 if lr == 0.1 else 0.7))
        for seed in (1, 2):
            acc = [0.5 + 0.01 * seed, 0.6, 0.7, last[arm][seed]]
            recs.append(run_record("dgl", arm, "cnn2d-exits", seed, 0.1, acc, converged=seed != 2 or arm != "sgl"))
    recs.append(
        {
            "record": "verdict",
            "study": "dgl",
            "claim": "DGL matches backprop",
            "compared": {
                "dgl vs backprop, last exit": {
                    "seeds": [0, 1, 2],
                    "a": {"mean": 0.975, "std": 0.005, "n": 3},
                    "b": {"mean": 0.98, "std": 0.0, "n": 3},
                    "diff": {"mean": -0.005, "std": 0.005, "lo90": -0.0091, "hi90": -0.0009},
                    "test": "matches",
                    "outcome": "does not hold",
                },
                "dgl vs sgl, last exit": {"seeds": [], "a": None, "b": None, "outcome": "inconclusive", "why": "x"},
            },
            "test": "paired",
            "outcome": "does not hold",
            "unconverged_runs": ["dgl/sgl-cnn2d-exits/lr0.1/seed2"],
        }
    )
    return recs


def test_the_readme_row_shows_what_the_results_say() -> None:
    md = rep.readme_results(dgl_results(), "results.json", {"dgl": "figs/dgl.png"}, "R.md#x", "2026-01-01", "box")
    row = next(line for line in md.splitlines() if line.startswith("| Belilovsky"))
    assert "DGL matches backprop" in row
    assert "97.50 ± 0.50 vs 98.00 ± 0.00 % (n = 3)" in row and "-0.50 points" in row and "(bounds -0.91, -0.09)" in row
    assert "dgl vs sgl" not in row  # the README shows the comparison the outcome rests on; RESULTS.md all
    assert "**does not hold**" in row and "incomplete" not in row
    assert "1 of 15" in row  # unconverged runs of the study's 15
    assert "[figure](figs/dgl.png)" in row
    for study in ("Wan et al.", "Fu et al.", "Huh"):
        assert "pending: not started" in next(line for line in md.splitlines() if line.startswith(f"| {study}"))


def test_the_results_section_shows_per_arm_statistics_from_the_records() -> None:
    recs = dgl_results()
    md = rep.results_section(recs, "results.json", {}, "2026-01-01", "box")
    dgl_row = next(line for line in md.splitlines() if line.startswith("| dgl |"))
    exit0 = [r["test_acc"][0] for r in recs if r.get("arm") == "dgl" and r.get("lr") == 0.1]
    last = [r["test_acc"][-1] for r in recs if r.get("arm") == "dgl" and r.get("lr") == 0.1]
    e0 = f"{100 * statistics.fmean(exit0):.1f} ± {100 * statistics.stdev(exit0):.1f}"
    e3 = f"{100 * statistics.fmean(last):.1f} ± {100 * statistics.stdev(last):.1f}"
    assert e0 == "51.0 ± 1.0" and f"| {e0} / " in dgl_row and dgl_row.count(" / ") == 3 and e3 in dgl_row
    assert "| 0.1 (0.05, 0.1, 0.2) | 3 |" in dgl_row and "| 3 of 3 |" in dgl_row
    sgl_row = next(line for line in md.splitlines() if line.startswith("| sgl |"))
    assert "| 2 of 3 |" in sgl_row  # seed 2 did not converge
    assert "dgl vs sgl, last exit: x → inconclusive" in md
    assert "`dgl/sgl-cnn2d-exits/lr0.1/seed2`" in md
    assert "Complete: 3 seeds per arm." in md


def test_partial_results_render_and_say_what_is_missing(tmp_path: Path) -> None:
    recs = [  # osgd: one grid run of one arm; curvature: sgd chosen with 2 seeds; slbi, dgl: nothing
        run_record("osgd", "osgd", "nested-width", 0, 0.1, [0.8, 0.85, 0.9, 0.91]),
        *[run_record("curvature", "sgd", "cnn2d-exits", 0, lr, [0.8, 0.9], val_score=lr) for lr in (0.05, 0.1, 0.2)],
        run_record("curvature", "sgd", "cnn2d-exits", 1, 0.2, [0.82, 0.88], cpu=[2.0, None, 2.0, 2.0]),
    ]
    missing = {s: rep.missing_lines(recs, s) for s in rep.STUDIES}
    assert missing["dgl"] == ["dgl: not started"] and missing["slbi"] == ["slbi: not started"]
    assert "osgd: osgd on nested-width: learning rate not chosen yet (1 of 3 grid runs)" in missing["osgd"]
    assert "curvature: sgd on cnn2d-exits: 2 of 3 seeds" in missing["curvature"]
    assert any("adam on cnn2d-exits: learning rate not chosen yet (0 of 3" in m for m in missing["curvature"])

    readme = rep.readme_results(recs, "r.json", {}, "R.md", "2026-01-01", "box")
    assert readme.count("pending: not started") == 2 and readme.count("pending: no verdict yet") == 2
    section = rep.results_section(recs, "r.json", {}, "2026-01-01", "box")
    assert "| sgd | cnn2d-exits | 0.2 (0.05, 0.1, 0.2) | 2 — 2 of 3 seeds |" in section
    assert "within 8 CPU seconds" in section  # seed 1's CPU seconds are incomplete: only seed 0 is timed
    figs = rep.draw_figures(recs, tmp_path, "test")
    assert sorted(p.name for p in figs.values()) == sorted(rep.FIGURES.values())
    assert all(p.stat().st_size > 1000 for p in figs.values())
    assert rep.readme_results(None, "r.json", {}, "R.md", "d", "m").count("pending") == 1


def test_the_slbi_table_and_figure_show_the_stopping_point_within_an_epoch(tmp_path: Path) -> None:
    path = [
        {"file": f"step_{s:07d}.pt", "step": s, "epoch": s / 10, "removed": r, "wstar_val_acc": v, "support": 1 - r}
        for s, r, v in ((5, 0.9, 0.1), (10, 0.62, 0.41), (15, 0.3, 0.7), (20, 0.0, 0.8))
    ]
    stop = {
        "record": "run",
        "study": "slbi",
        "arm": "stop",
        "net": "cnn2d-exits",
        "seed": 0,
        "lr": 0.2,
        "run_dir": "slbi/stop-cnn2d-exits/seed0",
        **{"path": path, "stop": path[1], "conv_filters_removed": 0.6, "channels_removed": 0.62},
        **{"params": [100, 40], "macs": [2000, 900], "latency_s_bs256": [0.02, 0.015]},
    }
    recs = [stop, run_record("slbi", "ticket-slbi", "cnn2d-exits", 0, 0.2, [0.8, 0.9])]
    recs += [run_record("curvature", "sgd", "cnn2d-exits", 0, lr, [0.8, 0.92]) for lr in (0.05, 0.1, 0.2)]
    section = rep.results_section(recs, "r.json", {}, "2026-01-01", "box")
    row = next(line for line in section.splitlines() if line.startswith("| 0 | 1.00 (10) |"))
    assert "| 41.0 | 60.0 % | 100 → 40 | 2,000 → 900 | 20.0 → 15.0 | 90.0 / – / – | 92.0 |" in row
    figs = rep.draw_figures(recs, tmp_path, "test")
    assert figs["slbi"].stat().st_size > 1000


def test_headline_comparisons_are_ones_the_verdicts_compute() -> None:
    for study in rep.STUDIES:
        names = set(claims.verdict(study, [])["compared"])
        assert set(rep.HEADLINE[study]) <= names, study


def test_whole_report_writes_only_where_told(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    results.write_text(json.dumps(dgl_results()))
    run = make_run(tmp_path / "run")
    (run / "accuracy_vs_flops.png").write_bytes(b"\x89PNG fake")
    readme = tmp_path / "README.md"
    readme.write_text(readme_quoting(ROWS))
    out, figs = tmp_path / "out", tmp_path / "figs"
    argv = ["--claims", str(results), "--default-run", str(run), "--out", str(out), "--readme", str(readme)]
    assert rep.main(argv) == 2  # a README's links need the figures' place
    assert not out.exists()
    assert rep.main([*argv, "--figures", str(figs)]) == 0
    text = readme.read_text()
    assert "127 s of training" in text and "old time" not in text
    assert "| Belilovsky" in rep.generated(text, "claims-summary") and "(figs/claims_dgl.png)" in text
    assert text.startswith("# x\n\n## Quick start\n\nTrain it (") and "```bash\nanytrain train\n```" in text
    assert (figs / rep.DEFAULT_FIGURE).read_bytes() == b"\x89PNG fake"
    assert sorted(p.name for p in out.iterdir()) == ["quickstart.md", "readme_results.md", "results_section.md"]
    assert rep.main(["--check-default-run", str(run), "--readme", str(readme), "--tolerance", "0"]) == 0


def test_the_committed_readme_has_the_generated_blocks_and_ci_checks_them() -> None:
    root = BENCH.parent
    text = (root / "README.md").read_text()
    assert len(rep.table_accuracies(rep.generated(text, "quickstart"))) == 4  # the default net's 4 exits
    for name in ("quickstart-time", "claims-summary"):
        rep.generated(text, name)  # present, once each
    rep.generated((root / "benchmarks" / "RESULTS.md").read_text(), "claims")
    assert (
        "benchmarks/report.py --check-default-run runs/default --readme README.md" in (root / ".ci" / "run").read_text()
    )


def test_the_arm_table_shows_the_largest_move_over_the_last_fifth_of_the_epochs() -> None:
    # 10 epochs: the last 20 % is epochs 8 and 9; exit 1 of seed 2 moves 0.7 points there, nothing else moves more
    # (the 5-point move of seed 1 at epoch 7 lies before the tail and must not count)
    recs = dgl_results()
    runs = [r for r in recs if r.get("arm") == "dgl" and r.get("lr") == 0.1]
    for r in runs:
        r["epochs"] = 10
        r["val_history"] = [[0.8, 0.8, 0.8, 0.8] for _ in range(10)]
    runs[1]["val_history"][7][0] = 0.85
    runs[2]["val_history"][8][1] = 0.807
    runs[0]["val_history"][9][3] = 0.802
    md = rep.results_section(recs, "results.json", {}, "2026-01-01", "box")
    head = next(line for line in md.splitlines() if line.startswith("| arm | net |"))
    col = [c.strip() for c in head.split("|")].index("largest move, last 20 %, points")
    dgl_row = next(line for line in md.splitlines() if line.startswith("| dgl |"))
    assert [c.strip() for c in dgl_row.split("|")][col] == "0.70"
