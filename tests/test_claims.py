"""benchmarks/claims.py: the paired comparison, the convergence test, the learning-rate choice and the job
order, and the verdicts on synthetic records (no training here; the suite itself is a benchmark)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmark_modules import load

claims = load("claims")
T90_DF2 = 1.885618  # Student's t, 0.90 quantile, 2 degrees of freedom (printed tables)


def seeds(*v: float) -> dict[int, float]:
    return dict(enumerate(v))


def test_paired_interval_is_the_one_sided_t_bound() -> None:
    a, b = seeds(0.91, 0.92, 0.93), seeds(0.90, 0.90, 0.90)
    res = claims.paired(a, b, "better")
    d = [0.01, 0.02, 0.03]
    half = T90_DF2 * 0.01 / math.sqrt(3)
    assert res["diff"]["mean"] == pytest.approx(0.02)
    assert res["diff"]["std"] == pytest.approx(0.01)
    assert res["diff"]["lo90"] == pytest.approx(sum(d) / 3 - half, abs=1e-6)
    assert res["outcome"] == "holds"
    assert res["a"]["mean"] == pytest.approx(0.92) and res["b"]["std"] == 0.0


@pytest.mark.parametrize(
    ("diffs", "kind", "outcome"),
    [
        ([0.01, 0.02, 0.03], "better", "holds"),
        ([-0.01, -0.02, 0.0], "better", "does not hold"),  # mean ≤ 0 and the upper bound below the margin
        ([-0.04, 0.05, 0.01], "better", "inconclusive"),
        ([-0.005, 0.0, 0.005], "matches", "holds"),  # within 1 point
        ([-0.03, -0.02, -0.025], "matches", "does not hold"),
        ([-0.05, 0.05, 0.0], "matches", "inconclusive"),
    ],
)
def test_paired_outcomes(diffs: list[float], kind: str, outcome: str) -> None:
    b = seeds(0.8, 0.85, 0.9)
    a = {s: b[s] + d for s, d in enumerate(diffs)}
    assert claims.paired(a, b, kind)["outcome"] == outcome


def test_paired_uses_only_common_seeds_and_needs_two() -> None:
    res = claims.paired({0: 0.9, 1: 0.9}, {1: 0.8, 2: 0.8}, "better")
    assert res["seeds"] == [1] and res["outcome"] == "inconclusive"
    assert claims.paired({}, {}, "matches")["a"] is None


def test_converged_looks_at_the_last_fifth_of_the_epochs_and_the_trained_exits() -> None:
    hist = [[0.5, 0.6]] * 7 + [[0.80, 0.70], [0.801, 0.75], [0.802, 0.80]]  # 10 epochs: window = last 2
    assert claims.converged(hist, [0])  # exit 0 moves 0.1 points over epochs 9-10
    assert not claims.converged(hist, [0, 1])  # exit 1 moves 5 points
    assert claims.converged([[0.5], [0.5], [0.5], [0.9], [0.9004]], [0])  # 5 epochs: window of 2, 0.04 points
    assert not claims.converged([[0.5], [0.5], [0.5], [0.897], [0.9]], [0])  # exactly 0.3 points is not less
    twenty = [[0.9]] * 15 + [[0.90], [0.901], [0.898], [0.902], [0.9]]  # window = last 4 epochs: 0.4 points
    assert not claims.converged(twenty, [0]) and claims.converged(twenty[:-3] + [[0.9]] * 3, [0])


def record(study: str, arm: str, net: str, seed: int, lr: float, acc: list[float], **kw) -> dict:
    key = f"{study}/{arm}-{net}/lr{lr:g}/seed{seed}"
    r = {"record": "run", "study": study, "arm": arm, "net": net, "seed": seed, "lr": lr, "run_dir": key}
    val = [[a - 0.01 * (5 - e) for a in acc] for e in range(6)]
    return {**r, "test_acc": acc, "val_history": val, "val_score": sum(val[-1]) / len(acc), "converged": True, **kw}


def write(tmp_path: Path, records: list[dict]) -> Path:
    p = tmp_path / "results.json"
    p.write_text(json.dumps(records))
    return p


def test_learning_rate_is_chosen_on_seed_0_validation_then_seeds_1_2_follow(tmp_path: Path) -> None:
    suite = claims.Suite(tmp_path, tmp_path / "none.json", ["curvature", "slbi"])
    keys = {j.key for j in suite.jobs()}
    sgd = suite.arms["curvature/sgd-cnn2d-exits"]
    assert {suite.run_key(sgd, 0, lr) for lr in claims.GRIDS["sgd"]} <= keys
    assert not any(j.seed > 0 for j in suite.jobs())  # nothing beyond the grids before a choice
    assert not any(j.study == "slbi" for j in suite.jobs())  # SLBI waits for the dense arm's learning rate
    scores = {0.05: 0.88, 0.1: 0.91, 0.2: 0.90}
    recs = [record("curvature", "sgd", "cnn2d-exits", 0, lr, [0.9] * 4, val_score=v) for lr, v in scores.items()]
    suite = claims.Suite(tmp_path, write(tmp_path, recs), ["curvature", "slbi"])
    assert suite.chosen_lr(sgd) == 0.1
    jobs = {j.key: j for j in suite.jobs()}
    assert {suite.run_key(sgd, s, 0.1) for s in (1, 2)} <= set(jobs)
    tickets = [j for j in jobs.values() if j.arm.startswith("ticket-")]
    assert len(tickets) == 9 and all(j.deps == [f"slbi/stop-cnn2d-exits/seed{j.seed}"] for j in tickets)
    stop = jobs["slbi/stop-cnn2d-exits/seed1"]
    assert stop.deps == [suite.run_key(sgd, 1, 0.1), "slbi/slbi-path-cnn2d-exits/lr0.1/seed1"]
    path = jobs["slbi/slbi-path-cnn2d-exits/lr0.1/seed1"]
    assert path.cfg["optimizer"]["name"] == "slbi" and path.cfg["train"]["keep_every_steps"] == claims.PATH_EVERY


def test_ties_in_the_grid_go_to_the_smaller_learning_rate(tmp_path: Path) -> None:
    recs = [record("dgl", "dgl", "cnn2d-exits", 0, lr, [0.9] * 4, val_score=0.9) for lr in claims.GRIDS["sgd"]]
    suite = claims.Suite(tmp_path, write(tmp_path, recs), ["dgl"])
    assert suite.chosen_lr(suite.arms["dgl/dgl-cnn2d-exits"]) == min(claims.GRIDS["sgd"])


def _arm_runs(study: str, arm: str, net: str, accs: list[list[float]], lr: float = 0.1) -> list[dict]:
    return [record(study, arm, net, s, lr, a) for s, a in enumerate(accs)]


def test_osgd_verdict_pools_the_nets_and_follows_its_numbers() -> None:
    runs = []
    for net in claims.NETS:
        base = [[0.80, 0.85, 0.88, 0.90], [0.81, 0.85, 0.87, 0.90], [0.80, 0.86, 0.88, 0.91]]
        runs += _arm_runs("osgd", "joint", net, base)
        runs += _arm_runs("osgd", "osgd", net, [[a + 0.01 + 0.001 * s for a in acc] for s, acc in enumerate(base)])
    v = claims.verdict("osgd", runs)
    assert v["outcome"] == "holds"
    pooled = v["compared"]["osgd vs joint, all nets pooled, mean exit"]
    assert len(pooled["seeds"]) == 9 and pooled["diff"]["mean"] == pytest.approx(0.011)
    worse = [dict(r, test_acc=[a - 0.03 for a in r["test_acc"]]) if r["arm"] == "osgd" else r for r in runs]
    assert claims.verdict("osgd", worse)["outcome"] == "does not hold"
    assert claims.verdict("osgd", runs[:-3])["outcome"] == "inconclusive"  # a net short of its seeds


def test_dgl_and_slbi_verdicts() -> None:
    bp = _arm_runs(
        "dgl", "backprop", "cnn2d-exits", [[0.1, 0.1, 0.1, 0.90], [0.1, 0.1, 0.1, 0.91], [0.1, 0.1, 0.1, 0.905]]
    )
    near = _arm_runs(
        "dgl", "dgl", "cnn2d-exits", [[0.8, 0.85, 0.88, 0.899], [0.8, 0.85, 0.88, 0.908], [0.8, 0.85, 0.88, 0.906]]
    )
    assert claims.verdict("dgl", bp + near)["outcome"] == "holds"
    far = [dict(r, test_acc=r["test_acc"][:-1] + [r["test_acc"][-1] - 0.03]) for r in near]
    assert claims.verdict("dgl", bp + far)["outcome"] == "does not hold"
    dense = _arm_runs("curvature", "sgd", "cnn2d-exits", [[0.9] * 4, [0.91] * 4, [0.9] * 4])
    tick = {
        k: _arm_runs("slbi", f"ticket-{k}", "cnn2d-exits", [[x] * 4 for x in v])
        for k, v in {"slbi": (0.9, 0.905, 0.9), "magnitude": (0.88, 0.885, 0.87), "random": (0.85, 0.86, 0.855)}.items()
    }
    v = claims.verdict("slbi", dense + sum(tick.values(), []))
    assert v["outcome"] == "holds", v["compared"]
    tick["magnitude"] = _arm_runs("slbi", "ticket-magnitude", "cnn2d-exits", [[x] * 4 for x in (0.91, 0.915, 0.905)])
    assert claims.verdict("slbi", dense + sum(tick.values(), []))["outcome"] == "does not hold"
