"""Checkpoints and run-directory files, written atomically and loaded safely.

Writes go to a temporary file in the same directory, are flushed and fsync'ed, then renamed over the target
(``os.replace`` is atomic on POSIX), so a crash leaves either the old file or the new one, never half of one.
Loads use ``torch.load(weights_only=True)``: only tensors and plain containers are unpickled, no code runs.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from anytrain.config import RUN_HEADER, RunConfig
from anytrain.registry import ConfigError

CHECKPOINT_FORMAT = "anytrain-checkpoint-v1"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (missing, corrupt, foreign, unsafe)."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **payload}, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_error(path: Path, e: BaseException) -> str:
    """One line for a checkpoint ``torch.load(weights_only=True)`` refused or could not read."""
    text = str(e)
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if refused:  # torch's UnpicklingError: several paragraphs that name the refused global once
        return (
            f"refused to load checkpoint {path}: it would call {refused.group(1)}, which is not a tensor or plain "
            "container (weights-only loading; the file is not an anytrain checkpoint or was tampered with)"
        )
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else type(e).__name__
    return f"cannot load checkpoint {path}: {first[:200]}"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt, truncated, or contains objects outside the safe allow-list
        raise CheckpointError(_load_error(path, e)) from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an anytrain checkpoint (format tag missing or unknown)")
    return obj


def state_dict_mismatch(expected: dict[str, Any], got: Any) -> str | None:
    """``None`` if ``got`` has exactly ``expected``'s keys and tensor shapes; otherwise one line saying what
    differs (a few keys of each kind), for a resume against a checkpoint of another architecture."""
    if not isinstance(got, dict):
        return f"the model entry is a {type(got).__name__}, not a state dict"
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    shapes = [
        f"{k} {list(getattr(got[k], 'shape', []))} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in got and getattr(got[k], "shape", None) != v.shape
    ]

    def few(items: list[str]) -> str:
        return ", ".join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")

    parts = []
    if shapes:
        parts.append(f"{len(shapes)} tensors differ in shape (checkpoint vs this config: {few(shapes)})")
    if missing:
        parts.append(f"{len(missing)} missing from the checkpoint ({few(missing)})")
    if extra:
        parts.append(f"{len(extra)} not in this model ({few(extra)})")
    return "; ".join(parts) or None


# ---- run directories ---------------------------------------------------------------------------------------
# What anytrain writes into a run directory (the trainer, dgl-parallel, the plots, atomic writes' temporary
# files); anything else is the user's, and --overwrite refuses to delete it.
RUN_NAMES = re.compile(
    r"config\.yaml|tb|checkpoints|(checkpoint|best|exit_scores|model)\.pt|(history|metrics)\.json"
    r"|(accuracy_vs_flops|training_curves|epoch_series|sparsity_path)\.png|rank\d+\.(pt|json)|buffer_rank\d+\.json"
    r"|\..+\.tmp(\.png)?"
)


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is an anytrain run directory: its config.yaml starts with the line anytrain writes."""
    try:
        with open(Path(path) / "config.yaml", "rb") as f:
            return f.readline().decode(errors="replace").rstrip("\r\n") == RUN_HEADER
    except OSError:
        return False


def is_finished_run(path: str | Path) -> bool:
    """A finished run has metrics.json, which is written last (after the checkpoint, plots and history)."""
    return is_run_dir(path) and (Path(path) / "metrics.json").is_file()


def foreign_entries(path: str | Path) -> list[str]:
    """Names in a run directory that anytrain does not write (a user's notes, data, ...)."""
    return sorted(p.name for p in Path(path).iterdir() if not RUN_NAMES.fullmatch(p.name))


def check_new_run_dir(out: Path, overwrite: bool | None) -> None:
    """Refuse (one-line ``ConfigError``, nothing touched) an ``--out`` that must not be written to.
    ``overwrite``: whether ``--overwrite`` was passed (``None``: the command has no such option)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    if not out.exists() or not any(out.iterdir()):
        return
    if not is_run_dir(out):
        raise ConfigError(
            f"output directory {out} is not empty and is not an anytrain run (no config.yaml written by "
            "anytrain); choose another --out" + ("; --overwrite replaces only anytrain runs" if overwrite else "")
        )
    if not overwrite:
        hint = "" if overwrite is None else "; pass --overwrite to replace it"
        if is_finished_run(out):
            raise ConfigError(f"output directory {out} already holds a finished run{hint}")
        raise ConfigError(f"output directory {out} holds an unfinished run; continue it with --resume {out}{hint}")
    foreign = foreign_entries(out)
    if foreign:
        names = ", ".join(foreign[:3]) + (f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else "")
        raise ConfigError(f"--overwrite: the run in {out} also holds files anytrain did not write ({names}); move them")


def check_resumable(run: Path) -> None:
    """Refuse (one-line ``ConfigError``) a ``--resume DIR`` that is not an unfinished anytrain run."""
    if not run.is_dir():
        raise ConfigError(f"cannot resume {run}: no such directory")
    if not is_run_dir(run):
        raise ConfigError(f"cannot resume {run}: not an anytrain run directory (no config.yaml written by anytrain)")
    if is_finished_run(run):
        raise ConfigError(f"{run} already holds a finished run (metrics.json); nothing to resume")


def resume_config(run: Path, overrides: list[str]) -> RunConfig:
    """The config to continue ``run`` with: its config.yaml plus ``overrides``, which may change only the
    settings in ``RESUME_SETTINGS`` (a one-line ``ConfigError`` names any other)."""
    from anytrain.config import RESUME_SETTINGS, load_config, resume_changes

    check_resumable(run)
    cfg = load_config(run / "config.yaml", overrides)
    changed = resume_changes(load_config(run / "config.yaml").to_dict(), cfg.to_dict())
    if changed:
        raise ConfigError(
            f"--set {changed[0]} on --resume would change the run half-way; a resumed run may change only "
            f"{', '.join(RESUME_SETTINGS)} (start a new run with --out for anything else)"
        )
    return cfg


def staging_dir(out: Path) -> Path:
    """Where a run that replaces ``out`` (``--overwrite``) is built until its first checkpoint: a hidden sibling,
    so the old run stays untouched until the new one has a checkpoint to continue from."""
    return out.parent / f".{out.name}.anytrain-new"


def clear_staging(stage: Path) -> None:
    """Remove a staging directory left by an earlier replacement that never reached its first checkpoint."""
    if stage.is_dir() and (is_run_dir(stage) or not any(stage.iterdir())):
        shutil.rmtree(stage)
    elif stage.exists():
        raise ConfigError(f"{stage} is in the way (anytrain builds a replacement run there); move it")


def swap_in(stage: Path, out: Path) -> None:
    """Replace the run ``out`` by the run in ``stage``: the old run is moved aside, the new one renamed into
    place, then the old one deleted. Renames within one directory are atomic; only between the two renames
    (microseconds) does ``out`` not exist, and the old run is then still whole under ``.NAME.anytrain-old-*``."""
    old = tempfile.mkdtemp(prefix=f".{out.name}.anytrain-old-", dir=out.parent)
    os.rename(out, old)  # POSIX: a directory may replace an empty one
    os.rename(stage, out)
    shutil.rmtree(old)
