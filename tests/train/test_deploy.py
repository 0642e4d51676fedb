"""`anytrain export` and `anytrain predict`: from a run to exported parts to a predictions file, and one-line
errors (exit 2, nothing written) for bad input."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from anytrain.cli import main
from anytrain.eval import exit_costs
from anytrain.inference import AnytimePredictor, Budget
from anytrain.train.deploy import load_run

QUIET = ["--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "train.plots=false"]


def _train(out, *sets: str) -> None:  # type: ignore[no-untyped-def]
    args = ["train", "--set", "data.name=digits", "--set", "model.name=cnn2d-exits", "--set", "model.width=8"]
    args += ["--set", "train.epochs=1", "--set", "data.batch_size=64", *QUIET]
    for s in sets:
        args += ["--set", s]
    assert main([*args, "--out", str(out)]) == 0


@pytest.fixture(scope="module")
def run(tmp_path_factory):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("deploy") / "run"
    _train(out)
    return out


def _rows(path) -> list[dict[str, str]]:  # type: ignore[no-untyped-def]
    with open(path) as f:
        return list(csv.DictReader(f))


def _budget(run) -> float:  # type: ignore[no-untyped-def]
    m = json.loads((run / "metrics.json").read_text())
    costs = m["early_exit_flops"]
    return (costs[0] + costs[-1]) / 2


def test_export_then_predict_equals_the_eager_predictor(run, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    b = _budget(run)
    exp = tmp_path / "exp"
    assert main(["export", str(run), "--format", "pt2", "--out", str(exp), "--budget", str(b)]) == 0
    m = json.loads((exp / "manifest.json").read_text())
    assert m["policy"]["name"] == "budget" and m["input_shape"] == [1, 8, 8] and m["num_classes"] == 10
    raw = np.random.default_rng(0).uniform(0, 16, size=(40, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", raw)
    assert main(["predict", str(exp), "--input", str(tmp_path / "x.npy"), "--out", str(tmp_path / "a.csv")]) == 0
    assert (
        main(
            [
                "predict",
                str(run),
                "--input",
                str(tmp_path / "x.npy"),
                "--budget",
                str(b),
                "--out",
                str(tmp_path / "b.csv"),
            ]
        )
        == 0
    )
    a, c = _rows(tmp_path / "a.csv"), _rows(tmp_path / "b.csv")
    assert a == c and len(a) == 40
    # independently: normalise with the run's statistics, fit the budget on its validation scores, run eagerly
    r = load_run(run)
    mean, std = m["preprocess"]["mean"][0], m["preprocess"]["std"][0]
    x = (torch.from_numpy(raw) - mean) / std
    pol = Budget.fit(r.val[0], r.val[1], exit_costs(*r.net.flops_breakdown((1, 8, 8))), b)
    assert m["policy"]["thresholds"] == pol.thresholds
    p = AnytimePredictor(r.net, pol).predict(x)
    assert [int(row["label"]) for row in a] == p.labels.tolist()
    assert [int(row["exit"]) for row in a] == p.exits.tolist()
    assert [int(row["macs"]) for row in a] == p.macs.tolist()


def test_predict_reads_an_image_folder(run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    pix = rng.integers(0, 256, size=(3, 8, 8), dtype=np.uint8)
    for i in range(3):
        Image.fromarray(pix[i], mode="L").save(folder / f"{i}.png")
    np.save(tmp_path / "pix.npy", pix[:, None])  # the same pixels as a uint8 array
    out_a, out_b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert main(["predict", str(run), "--input", str(folder), "--out", str(out_a)]) == 0
    assert main(["predict", str(run), "--input", str(tmp_path / "pix.npy"), "--out", str(out_b)]) == 0
    a, b = _rows(out_a), _rows(out_b)
    assert [r["sample"] for r in a] == ["0.png", "1.png", "2.png"]
    last = str(len(json.loads((run / "metrics.json").read_text())["exits"]) - 1)
    assert [r["label"] for r in a] == [r["label"] for r in b] and {r["exit"] for r in a} == {last}  # full network


def _fails(args: list[str], capsys, match: str) -> None:  # type: ignore[no-untyped-def]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_bad_input_is_one_line_exit_2_and_nothing_written(run, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    exp = tmp_path / "exp"
    assert main(["export", str(run), "--out", str(exp)]) == 0
    capsys.readouterr()
    np.save(tmp_path / "shape.npy", np.zeros((4, 1, 8, 9), np.float32))
    np.save(tmp_path / "ints.npy", np.zeros((4, 1, 8, 8), np.int64))
    np.save(tmp_path / "ok.npy", np.zeros((4, 1, 8, 8), np.float32))
    out = tmp_path / "p.csv"
    cases = [
        (["--input", str(tmp_path / "shape.npy")], "has shape (4, 1, 8, 9), expected (N, 1, 8, 8)"),
        (["--input", str(tmp_path / "ints.npy")], "holds int64 values, expected float"),
        (["--input", str(tmp_path / "ok.npy"), "--thresholds", "0.5"], "got 1 thresholds, expected 2"),
        (["--input", str(tmp_path / "ok.npy"), "--thresholds", "0.5,1.5"], "threshold 1 is 1.5, expected"),
        (["--input", str(tmp_path / "ok.npy"), "--patience", "9"], "expected at most 2"),
        (["--input", str(tmp_path / "ok.npy"), "--budget", "1", "--patience", "1"], "give one of"),
    ]
    for extra, match in cases:
        _fails(["predict", str(exp), *extra, "--out", str(out)], capsys, match)
    edited = tmp_path / "edited"
    shutil.copytree(exp, edited)
    m = json.loads((edited / "manifest.json").read_text())
    m["num_classes"] = 9
    (edited / "manifest.json").write_text(json.dumps(m))
    _fails(["predict", str(edited), "--input", str(tmp_path / "ok.npy"), "--out", str(out)], capsys, "was edited")
    (exp / "stage_2.pt2").unlink()
    _fails(
        ["predict", str(exp), "--input", str(tmp_path / "ok.npy"), "--out", str(out)], capsys, "stage_2.pt2 is missing"
    )
    assert not out.exists()
    _fails(["export", str(run), "--out", str(edited)], capsys, "not an empty directory")
    _fails(["export", str(tmp_path), "--out", str(tmp_path / "x")], capsys, "not an anytrain run directory")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_slbi_run_is_pruned_then_exported_and_keeps_every_exit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    run = tmp_path / "slbi"
    _train(run, "optimizer.name=slbi", "optimizer.mu=0.5", "train.epochs=3", "model.width=16")
    r = load_run(run)
    dense = load_run(run, prune=False)
    assert r.source["pruned"] and sum(p.numel() for p in r.net.parameters()) < sum(
        p.numel() for p in dense.net.parameters()
    )
    exp = tmp_path / "exp"
    assert main(["export", str(run), "--format", "pt2", "--out", str(exp), "--patience", "1"]) == 0
    m = json.loads((exp / "manifest.json").read_text())
    assert m["source"]["pruned"] and m["num_classes"] == 10
    x = torch.randn(30, 1, 8, 8)
    a = AnytimePredictor.load(exp).predict(x)
    b = AnytimePredictor(r.net, "patience", patience=1).predict(x)
    assert torch.equal(a.exits, b.exits) and torch.equal(a.labels, b.labels) and a.logits.shape == (30, 10)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=0)
