"""The ``anytrain`` command: train, eval, plot, list, export, predict."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anytrain.registry import ConfigError

if TYPE_CHECKING:
    from anytrain.config import RunConfig

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


def _fail(msg: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"anytrain: error: {msg}", file=sys.stderr)
    return code


def run_table(metrics: dict[str, Any]) -> str:
    """The per-exit table ``train`` and ``eval`` print for a run's ``metrics.json`` (also quoted in the README by
    ``benchmarks/report.py``, which checks the README against a fresh run)."""
    lines = [
        f"{metrics.get('model', '?')} · rule {metrics['rule']} · optimizer {metrics['optimizer']} · "
        f"{metrics['dataset']} · {metrics['epochs']} epochs",
        f"{'exit':>4}  {'accuracy':>8}  {'MACs/sample':>12}  {'val acc':>8}",
    ]
    for e in metrics["exits"]:
        val = f"{e['val']:>8.4f}" if e.get("val") is not None else f"{'-':>8}"
        lines.append(f"{e['index']:>4}  {e['accuracy']:>8.4f}  {e['flops']:>12,d}  {val}")
    lines.append("(accuracy: test split, final model; val acc: validation split carved from the training set)")
    if "auc" in metrics:
        lines.append(f"area under accuracy-vs-FLOPs: {metrics['auc']:.4f}")
    sel = metrics.get("selected")
    if sel:
        accs = " ".join(f"{e['test']:.4f}" for e in sel["exits"])
        lines.append(f"selected on validation (best.pt, epoch {sel['epoch']}): test accuracy per exit {accs}")
    if metrics.get("budgeted"):
        lines.append("budgeted (thresholds fitted on validation):  budget  test accuracy  test mean MACs")
        for p in metrics["budgeted"]:
            t = p["test"]
            lines.append(f"{p['budget']:>51,.0f}  {t['accuracy']:>13.4f}  {t['mean_flops']:>14,.0f}")
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from anytrain.config import load_config
    from anytrain.train.checkpoint import check_new_run_dir, resume_config

    if args.resume:
        if args.config or args.out or args.overwrite:
            extra = "CONFIG" if args.config else "--out" if args.out else "--overwrite"
            return _fail(f"--resume DIR continues the run with DIR's own config.yaml; drop {extra}")
        out = Path(args.resume)
        cfg = resume_config(out, args.set)
    else:
        if args.out is None:
            return _fail("train needs --out DIR (or --resume DIR)")
        cfg = load_config(args.config, args.set)
        out = Path(args.out)
        check_new_run_dir(out, args.overwrite)
    from anytrain.train import distributed as dp

    # Launched by torchrun (WORLD_SIZE > 1): join the process group; every rank runs this same function.
    ctx = dp.init_from_env(cfg.train.device)
    try:
        code = _train_run(cfg, out, args, ctx)
        if code == 0:
            dp.barrier()  # leave together: rank 0 (which hosts the rendezvous store) finishes its writes first
        return code
    finally:
        dp.shutdown()


def _train_run(cfg: RunConfig, out: Path, args: argparse.Namespace, ctx: Any) -> int:
    import torch

    from anytrain.train import distributed as dp
    from anytrain.train.trainer import Trainer, TrainingFault, build_components

    device = None
    if ctx.enabled and _wants_cuda(cfg):
        device = torch.device("cuda", ctx.local_rank)
    err: str | None = None
    trainer = None
    try:
        comps = build_components(cfg, device)  # all input errors surface here, before the run directory is touched
        trainer = Trainer(cfg, out, resume=bool(args.resume), replace=args.overwrite, components=comps)
    except ConfigError as e:
        err = str(e)
    except (MemoryError, RuntimeError) as e:  # e.g. a data set or model too large for this machine
        if not isinstance(e, MemoryError) and "alloc" not in str(e):
            raise
        err = f"out of memory while building the run: {_first_line(e)}"
    if not dp.all_agree(err is None) or trainer is None:  # every rank stops if any rank failed (none left waiting)
        return _fail(err or "another rank failed to start (see its message)")
    if ctx.is_main and args.resume and trainer.start_epoch == 0:
        print(f"{out} has no checkpoint yet: training it from the beginning")
    try:
        metrics = trainer.fit()
    except TrainingFault as e:
        return _fail(str(e), EXIT_DIVERGED)
    except KeyboardInterrupt:
        return _fail(f"interrupted ({trainer.progress_note()}); {trainer.checkpoint_note()}", 130)
    if ctx.is_main:
        print(run_table(metrics))
        print(f"run directory: {out}" + (f" ({ctx.world_size} data-parallel ranks)" if ctx.enabled else ""))
    return 0


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__


def _wants_cuda(cfg: RunConfig) -> bool:
    import torch

    dev = cfg.train.device
    return dev.startswith("cuda") or (dev == "auto" and torch.cuda.is_available())


def _read_metrics(run: str) -> dict[str, Any]:
    """A finished run's metrics.json, checked enough for the table (a one-line ``ConfigError`` otherwise)."""
    p = Path(run) / "metrics.json"
    if not p.is_file():
        raise ConfigError(f"{run} holds no metrics.json (is it a finished run directory?)")
    try:
        metrics = json.loads(p.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p} is not valid JSON: {_first_line(e)}") from None
    exits = metrics.get("exits") if isinstance(metrics, dict) else None
    if not (
        isinstance(exits, list)
        and exits
        and all(
            isinstance(e, dict)
            and isinstance(e.get("index"), int)
            and isinstance(e.get("flops"), int)
            and isinstance(e.get("accuracy"), (int, float))
            for e in exits
        )
        and all(k in metrics for k in ("rule", "optimizer", "dataset", "epochs"))
    ):
        raise ConfigError(f"{p} is malformed: expected rule, optimizer, dataset, epochs and a list of exits")
    return metrics


def _numbers(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def _step_points(v: object) -> bool:
    """``step_loss``: a list of ``[step, lr, [loss per exit]]``."""
    return isinstance(v, list) and all(
        isinstance(p, list) and len(p) == 3 and _numbers(p[:2]) and _numbers(p[2]) for p in v
    )


def _read_history(p: Path) -> None:
    """Check that history.json is a list of per-epoch records (epoch, train_loss and, if any, val_acc per exit
    and step_loss)."""
    try:
        h = json.loads(p.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p} is not valid JSON: {_first_line(e)}") from None
    ok = isinstance(h, list) and all(
        isinstance(r, dict)
        and isinstance(r.get("epoch"), int)
        and _numbers(r.get("train_loss"))
        and ("val_acc" not in r or _numbers(r["val_acc"]))
        and ("step_loss" not in r or (_step_points(r["step_loss"]) and isinstance(r.get("step"), int)))
        for r in h
    )
    if not ok:
        raise ConfigError(f"{p} is malformed: expected a list of records with epoch, train_loss, val_acc and step_loss")


def cmd_eval(args: argparse.Namespace) -> int:
    metrics = _read_metrics(args.run)
    try:
        print(run_table(metrics))
    except (KeyError, TypeError, ValueError) as e:
        return _fail(f"{Path(args.run) / 'metrics.json'} is malformed: {type(e).__name__}: {_first_line(e)}")
    if args.deadline is not None:
        from anytrain.eval.anytime import deadline_exit

        if not math.isfinite(args.deadline):
            return _fail(f"--deadline must be a finite number of MACs, got {args.deadline}")
        flops = [e["flops"] for e in metrics["exits"]]
        try:
            k = deadline_exit(flops, args.deadline)
        except ValueError as e:
            return _fail(str(e))
        ex = metrics["exits"][k]
        budget = f"{args.deadline:,.0f}"
        print(f"deadline {budget} MACs/sample: exit {k} ({ex['flops']:,d} MACs), accuracy {ex['accuracy']:.4f}")
    if args.budget is not None:
        return _budgeted(Path(args.run), args.budget)
    return 0


def _budgeted(run: Path, budget: float) -> int:
    """Fit early-exit thresholds on the run's validation scores for an average budget; report them on test."""
    from anytrain.eval.anytime import evaluate_thresholds, fit_budget
    from anytrain.train.checkpoint import CheckpointError, load_checkpoint

    if not math.isfinite(budget) or budget <= 0:
        return _fail(f"--budget must be a finite, positive number of MACs, got {budget}")
    try:
        s = load_checkpoint(run / "exit_scores.pt")
    except CheckpointError as e:
        return _fail(f"{e} (budgeted evaluation needs the exit_scores.pt a finished run writes)")
    if "val_conf" not in s:
        return _fail(f"{run} has no validation split (data.val_size: 0): thresholds cannot be fitted")
    costs = s["costs"].tolist()
    try:
        fit = fit_budget(s["val_conf"], s["val_correct"], costs, budget)
    except ValueError as e:
        return _fail(str(e))
    t = evaluate_thresholds(s["test_conf"], s["test_correct"], fit.thresholds, costs)
    taus = ", ".join("never" if x > 1 else f"{x:.4f}" for x in fit.thresholds)
    print(f"budget {budget:,.0f} MACs/sample on average: thresholds [{taus}] fitted on validation")
    print(f"  validation: accuracy {fit.val.accuracy:.4f}, mean {fit.val.mean_flops:,.0f} MACs")
    print(f"  test:       accuracy {t.accuracy:.4f}, mean {t.mean_flops:,.0f} MACs, exits {t.exit_histogram}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from anytrain.eval.plots import plot_run

    run = Path(args.run)
    if not run.is_dir():
        return _fail(f"{run} is not a directory")
    # Check both files before drawing anything, so a malformed one leaves the directory as it was.
    if (run / "metrics.json").is_file():
        _read_metrics(args.run)
    if (run / "history.json").is_file():
        _read_history(run / "history.json")
    try:
        paths = plot_run(run)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        if isinstance(e, ConfigError):
            raise
        why = f"{type(e).__name__}: {_first_line(e)}"
        return _fail(f"cannot plot {args.run}: metrics.json or history.json is malformed ({why})")
    for path in paths:
        print(path)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from anytrain.data import DATASETS
    from anytrain.nets import MODELS, _load_builders
    from anytrain.optim import OPTIMIZERS
    from anytrain.rules import RULES
    from anytrain.train.schedule import SCHEDULES

    _load_builders()
    sections = {
        "models": MODELS,
        "rules": RULES,
        "optimizers": OPTIMIZERS,
        "datasets": DATASETS,
        "schedules": SCHEDULES,
    }
    for title, reg in sections.items():
        if args.what and args.what != title:
            continue
        print(f"{title}:")
        for name, help_ in reg.describe():
            print(f"  {name:<22} {help_}")
    return 0


def _policy_options(args: argparse.Namespace) -> dict[str, Any]:
    taus = None
    if args.thresholds is not None:
        try:
            taus = [float(t) for t in args.thresholds.split(",") if t.strip()]
        except ValueError:
            raise ConfigError(f"--thresholds must be comma-separated numbers, got {args.thresholds!r}") from None
    return dict(budget=args.budget, deadline=args.deadline, patience=args.patience, policy=args.policy, thresholds=taus)


def cmd_export(args: argparse.Namespace) -> int:
    from anytrain.train.deploy import export_run

    try:
        out = export_run(args.run, args.out, format=args.format, prune=not args.no_prune, **_policy_options(args))
    except ValueError as e:
        return _fail(_first_line(e))
    print(f"exported {args.run} ({args.format}) to {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from anytrain.train.deploy import predictor_for, read_inputs, write_predictions

    out = Path(args.out)
    if out.exists():
        return _fail(f"--out {out} already exists; choose a new file name")
    try:
        pred, info = predictor_for(args.source, **_policy_options(args))
        shape = tuple(int(s) for s in info["input_shape"])
        x, names = read_inputs(args.input, shape, info.get("preprocess"), normalized=args.normalized)
        p = pred.predict(x, batch_size=args.batch_size)
    except ValueError as e:
        return _fail(_first_line(e))
    write_predictions(out, names, p, info.get("classes"))
    hist = _histogram(p.exits.tolist(), pred.parts.num_exits)
    print(f"{len(names)} samples, mean {float(p.macs.double().mean()):,.0f} MACs per sample, exits {hist} -> {out}")
    return 0


def _histogram(values: list[int], n: int) -> list[int]:
    return [values.count(k) for k in range(n)]


def _add_policy_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("early-exit policy (one of them; default: the full network)")
    g.add_argument("--budget", type=float, help="average MACs per sample: thresholds fitted on the validation split")
    g.add_argument("--deadline", type=float, help="MACs per sample: every sample answers at the deepest exit within")
    g.add_argument("--patience", type=int, help="stop once this many consecutive exits agree (PABEE)")
    g.add_argument("--policy", choices=["max-prob", "entropy"], help="confidence for --thresholds (max-prob)")
    g.add_argument("--thresholds", help="comma-separated confidence thresholds, one per exit but the last")


def build_parser() -> argparse.ArgumentParser:
    from anytrain import __version__

    p = argparse.ArgumentParser(
        prog="anytrain", description="Train anytime / greedy / sparse / curvature-corrected networks."
    )
    p.add_argument("--version", action="version", version=f"anytrain {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from a YAML config (default: MNIST-1D anytime CNN)")
    t.add_argument("config", nargs="?", help="YAML config file (defaults are used for what it leaves out)")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optimizer.lr=0.05 (repeatable)",
    )
    t.add_argument("--out", help="run directory to create")
    t.add_argument(
        "--resume", metavar="DIR", help="continue the unfinished run in DIR (from its last checkpoint, if any)"
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the anytrain run in --out (only a run; swapped in once the new run has its first checkpoint)",
    )
    t.set_defaults(fn=cmd_train)
    e = sub.add_parser("eval", help="print the per-exit table of a finished run")
    e.add_argument("run")
    e.add_argument(
        "--budget",
        type=float,
        help="budgeted classification: confidence thresholds fitted on validation for this average MACs/sample; "
        "prints test accuracy and realised mean MACs",
    )
    e.add_argument("--deadline", type=float, help="anytime deadline: the deepest exit within this many MACs per sample")
    e.set_defaults(fn=cmd_eval)
    pl = sub.add_parser("plot", help="write a run's figures (PNG) into its directory")
    pl.add_argument("run")
    pl.set_defaults(fn=cmd_plot)
    ex = sub.add_parser("export", help="write each stage and exit head as its own program, with a manifest")
    ex.add_argument("run", help="a run directory")
    ex.add_argument("--format", choices=["pt2", "onnx"], default="pt2", help="torch.export (pt2) or ONNX")
    ex.add_argument("--out", required=True, help="export folder to create")
    ex.add_argument("--no-prune", action="store_true", help="an SLBI run: export W without pruning to W*")
    _add_policy_options(ex)
    ex.set_defaults(fn=cmd_export)
    pr = sub.add_parser("predict", help="early-exit predictions for a .npy array or an image folder, as CSV")
    pr.add_argument("source", help="a run directory or an export folder")
    pr.add_argument("--input", required=True, help=".npy array (N, *input_shape) or a folder of images")
    pr.add_argument("--out", required=True, help="CSV file to write (sample, label, [class,] exit, macs)")
    pr.add_argument("--normalized", action="store_true", help="the inputs are already normalised like the data set")
    pr.add_argument("--batch-size", type=int, default=1024, help="samples per batch (default 1024)")
    _add_policy_options(pr)
    pr.set_defaults(fn=cmd_predict)
    ls = sub.add_parser("list", help="list models, rules, optimizers, data sets, schedules")
    ls.add_argument("what", nargs="?", choices=["models", "rules", "optimizers", "datasets", "schedules"])
    ls.set_defaults(fn=cmd_list)
    # Parsed by anytrain.train.parallel itself (main() forwards the arguments); listed here for --help.
    sub.add_parser(
        "dgl-parallel",
        help="decoupled greedy learning, one module per process (see `anytrain dgl-parallel --help`)",
        add_help=False,
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "dgl-parallel":
        from anytrain.train.parallel import main as dgl_parallel_main

        return dgl_parallel_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args))
    except ConfigError as e:
        return _fail(str(e))
    except OSError as e:  # the file system refused a read or write before anything was changed
        where = f" {e.filename}" if e.filename else ""
        return _fail(f"cannot access{where}: {e.strerror or _first_line(e)}")
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
