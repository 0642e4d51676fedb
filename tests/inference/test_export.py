"""Export round trip: the exported stages and heads give the eager predictor's labels and exits exactly and its
logits within 1e-4 (pt2 through torch.export, onnx through onnxruntime); a damaged export is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from inference_helpers import NETS, reference, safe_thresholds, shape_of

from anytrain.eval import exit_costs
from anytrain.inference import AnytimePredictor, Budget, MaxProb, Patience, export_parts, read_manifest
from anytrain.nets import build_model


def _round_trip(name: str, fmt: str, tmp_path, ns=(1, 300)) -> None:  # type: ignore[no-untyped-def]
    net = NETS[name]().eval()
    shape = shape_of(name)
    probe = reference(net, torch.randn(300, *shape))
    pol = MaxProb(safe_thresholds(probe.softmax(-1).max(-1).values, 0.5))
    out = export_parts(net, tmp_path / "exp", input_shape=shape, format=fmt, policy=pol)
    m = read_manifest(out)
    assert m["policy"] == pol.to_dict() and m["num_exits"] == net.num_exits and m["input_shape"] == list(shape)
    stage, head = net.flops_breakdown(shape)
    assert m["macs"] == {"stages": stage, "heads": head}
    loaded = AnytimePredictor.load(out)
    eager = AnytimePredictor(net, pol, input_shape=shape)
    for n in ns:
        x = torch.randn(n, *shape)
        a, b = eager.predict(x), loaded.predict(x)
        assert torch.equal(a.exits, b.exits) and torch.equal(a.labels, b.labels) and torch.equal(a.macs, b.macs)
        torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=0)
    if n > 1:
        assert len(set(a.exits.tolist())) > 1  # the policy does send samples to different exits
    # another policy on the same parts
    p = AnytimePredictor.load(out, policy="patience", patience=1).predict(x)
    q = AnytimePredictor(net, Patience(1)).predict(x)
    assert torch.equal(p.exits, q.exits) and torch.equal(p.labels, q.labels)


@pytest.mark.parametrize("name", ["nested-width-depth", "own"])
def test_pt2_round_trip(name: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _round_trip(name, "pt2", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["branched", "nested-width", "nested-depth", "msdnet"])
def test_pt2_round_trip_every_net_kind(name: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _round_trip(name, "pt2", tmp_path)


def test_onnx_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for mod in ("onnx", "onnxscript", "onnxruntime"):  # the optional extra anytrain[onnx]
        pytest.importorskip(mod)
    _round_trip("own", "onnx", tmp_path)  # a dict state of two tensors per stage


@pytest.mark.slow
@pytest.mark.parametrize("name", ["branched", "nested-width-depth", "msdnet"])
def test_onnx_round_trip_every_net_kind(name: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    for mod in ("onnx", "onnxscript", "onnxruntime"):  # the optional extra anytrain[onnx]
        pytest.importorskip(mod)
    _round_trip(name, "onnx", tmp_path)


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    net = build_model("cnn1d-exits", in_shape=(1, 40), num_classes=5, width=4).eval()
    conf, correct = torch.rand(net.num_exits, 200), torch.rand(net.num_exits, 200) > 0.3
    out = tmp_path_factory.mktemp("exp") / "small"
    export_parts(net, out, input_shape=(1, 40), val_scores=(conf, correct))
    return net, out, (conf, correct)


def _copy(src, dst):  # type: ignore[no-untyped-def]
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_default_policy_is_the_full_network_and_budget_refits_on_stored_scores(small_export) -> None:  # type: ignore[no-untyped-def]
    net, out, (conf, correct) = small_export
    x = torch.randn(20, 1, 40)
    full = AnytimePredictor.load(out).predict(x)
    assert full.exits.tolist() == [net.num_exits - 1] * 20
    torch.testing.assert_close(full.logits, net(x)[-1], atol=1e-4, rtol=0)
    costs = exit_costs(*net.flops_breakdown((1, 40)))
    b = (costs[0] + costs[-1]) / 2
    pol = AnytimePredictor.load(out, budget=b).policy
    assert isinstance(pol, Budget) and pol.thresholds == Budget.fit(conf, correct, costs, b).thresholds


def test_edited_manifest_missing_or_changed_part_are_refused_in_one_line(small_export, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, out, _ = small_export
    edited = _copy(out, tmp_path / "edited")
    m = json.loads((edited / "manifest.json").read_text())
    m["policy"] = {"name": "max-prob", "thresholds": [0.5, 0.5, 0.5]}
    (edited / "manifest.json").write_text(json.dumps(m))
    missing = _copy(out, tmp_path / "missing")
    (missing / "head_1.pt2").unlink()
    changed = _copy(out, tmp_path / "changed")
    (changed / "stage_0.pt2").write_bytes((changed / "stage_0.pt2").read_bytes() + b"x")
    for d, match in [
        (edited, r"manifest.json was edited: its checksum is '[0-9a-f]+', expected [0-9a-f]{64}"),
        (missing, r"part head_1.pt2 is missing"),
        (changed, r"stage_0.pt2 was changed: SHA-256 [0-9a-f]{64}, expected [0-9a-f]{64}"),
        (tmp_path / "nothing", r"manifest.json is missing"),
    ]:
        with pytest.raises(ValueError, match=match) as e:
            AnytimePredictor.load(d)
        assert "\n" not in str(e.value)


def test_bad_inputs_and_thresholds_on_an_export_are_one_line_errors(small_export) -> None:  # type: ignore[no-untyped-def]
    _, out, _ = small_export
    pred = AnytimePredictor.load(out)
    for x, match in [
        (torch.randn(2, 1, 39), r"expected \(N, 1, 40\)"),
        (torch.randn(2, 1, 40).double(), r"expected torch.float32"),
    ]:
        with pytest.raises(ValueError, match=match):
            pred.predict(x)
    with pytest.raises(ValueError, match=r"got 2 thresholds, expected 3"):
        AnytimePredictor.load(out, policy="max-prob", thresholds=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"threshold 0 is -0.1, expected a number in \[0, 1\]"):
        AnytimePredictor.load(out, policy="entropy", thresholds=[-0.1, 0.5, 0.5])


def test_export_refuses_a_non_empty_folder_and_leaves_nothing_behind(tmp_path) -> None:  # type: ignore[no-untyped-def]
    net = build_model("cnn1d-exits", in_shape=(1, 40), num_classes=5, width=4)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty directory"):
        export_parts(net, tmp_path / "busy", input_shape=(1, 40))
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export_parts(net, tmp_path / "new", input_shape=(1, 40), format="tflite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
