"""Run configuration: one typed, frozen ``kw_only`` dataclass per section, read from YAML and ``--set``.

``RunConfig`` holds ``seed`` and the sections ``data``, ``model``, ``rule``, ``optimizer``, ``schedule``, ``train``;
each section checks itself in ``__post_init__`` (a one-line ``ConfigError`` naming the key). ``model``, ``rule``,
``optimizer`` and ``schedule`` are *named* sections: ``name`` (a registered builder), typed fields for the
keywords worth checking early (``None``: the builder's default) and ``options``, its other keywords. Their YAML
form is flat (``optimizer: {name: sgd, lr: 0.1, nesterov: true}``), as in every run's ``config.yaml``. Layers
(defaults, file, ``--set``) and the choice of a name are described in docs/config.md.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from anytrain.registry import ConfigError

SEED_LIMIT = 2**32  # seeds feed numpy/torch generators (and derived per-rank streams): keep them 32-bit
PRECISIONS = ("fp32", "bf16", "fp16")  # train.precision: float32, or autocast to bfloat16 / float16 (loss scaling)
_INT64 = 2**63
_INF = math.inf


def _checked(
    kind: type, lo: float = -_INF, hi: float = _INF, lo_in: bool = True, hi_in: bool = False, **kw: Any
) -> Any:
    """A dataclass field whose value ``__post_init__`` checks: ``kind`` (int, float: any number, bool, str) and,
    for numbers, the range from ``lo`` to ``hi`` (ends included as ``lo_in``/``hi_in`` say). ``None`` passes
    where it is the default: unset in a named section (the builder's default), a value in ``data``."""
    return field(metadata={"check": (kind, lo, hi, lo_in, hi_in)}, **kw)


S = TypeVar("S", bound="Section")


def _range_text(lo: float, hi: float, lo_in: bool, hi_in: bool) -> str:
    if hi == _INF:
        return f"{'>=' if lo_in else '>'} {lo}"
    return f"in {'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"


def _check_value(key: str, v: Any, kind: type, lo: float, hi: float, lo_in: bool, hi_in: bool) -> None:
    if kind is bool or kind is str:
        if not isinstance(v, kind):
            what = "true or false" if kind is bool else "a string"
            raise ConfigError(f"{key} must be {what}, got {v!r}")
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    if kind is int and not isinstance(v, int):
        raise ConfigError(f"{key} must be an integer, got {v!r}")
    if v < lo or (v == lo and not lo_in) or v > hi or (v == hi and not hi_in):
        raise ConfigError(f"{key} must be {_range_text(lo, hi, lo_in, hi_in)}, got {v!r}")


@dataclass(kw_only=True, frozen=True)
class Section:
    """A config section; subclasses list its keys as fields. ``key`` is the section's name in the config."""

    key: ClassVar[str]
    named: ClassVar[bool] = False  # flat YAML: keys that are not fields go to ``options`` (the builder's keywords)

    def __post_init__(self) -> None:
        for f in fields(self):
            v, check = getattr(self, f.name), f.metadata.get("check")
            if check and not (v is None and f.default is None):
                _check_value(f"{self.key}.{f.name}", v, *check)
        if not isinstance(getattr(self, "options", {}), dict):
            raise ConfigError(f"{self.key}.options must be a mapping of keyword arguments")

    @classmethod
    def from_dict(cls: type[S], d: Any) -> S:
        """The section from its YAML form; an unknown key is refused, or in a named section is an option."""
        if not isinstance(d, dict):
            raise ConfigError(f"config section {cls.key!r} must be a mapping")
        known = {f.name: f for f in fields(cls) if not (cls.named and f.name == "options")}
        unknown = [k for k in d if k not in known]
        if unknown and not cls.named:
            raise ConfigError(f"unknown config key '{cls.key}.{unknown[0]}'; known here: {', '.join(sorted(known))}")
        d = copy.deepcopy(d)
        kw = {k: v for k, v in d.items() if k in known}
        if cls.named:  # here ``null`` is no value: a typed field that is unset means the builder's default
            for k, v in [("name", d.get("name")), *kw.items()]:
                if v is None and "check" in known[k].metadata:
                    _check_value(f"{cls.key}.{k}", v, *known[k].metadata["check"])
            kw["options"] = {k: d[k] for k in unknown}
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """The section as written in YAML (a named section flat, without its unset fields)."""
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        if self.named:
            out = {k: v for k, v in out.items() if v is not None and k != "options"} | out["options"]
        return out


@dataclass(kw_only=True, frozen=True)
class NamedSection(Section):
    """A section that names a registered builder; ``kwargs()`` are the keywords it is called with."""

    named: ClassVar[bool] = True
    name: str = _checked(str)
    options: dict[str, Any] = field(default_factory=dict)

    def kwargs(self) -> dict[str, Any]:
        """The builder's keyword arguments: the typed fields that are set, then ``options``."""
        return {k: v for k, v in self.to_dict().items() if k != "name"}


@dataclass(kw_only=True, frozen=True)
class DataConfig(Section):
    """``data``: which data set, its splits and batches. ``options``: the data set's own keywords."""

    key = "data"
    name: str = _checked(str, default="mnist1d")
    data_dir: str | None = _checked(str, default=None)
    num_samples: int | None = _checked(int, 0, lo_in=False, default=None)
    batch_size: int = _checked(int, 0, lo_in=False, default=128)
    eval_batch_size: int = _checked(int, 0, lo_in=False, default=1000)
    augment: bool = _checked(bool, default=True)
    # validation carved from the training set: auto (min(10 %, 5000)), a count or a fraction (checked on load)
    val_size: int | float | str | None = "auto"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True, frozen=True)
class ModelConfig(NamedSection):
    """``model``: a registered network builder (``anytrain list models``) and its keywords."""

    key = "model"
    width: int | None = _checked(int, 0, lo_in=False, default=None)
    exits: int | None = _checked(int, 0, lo_in=False, default=None)
    weights: str | None = _checked(str, default=None)  # a state dict to start from (.pt or .safetensors)

    def kwargs(self) -> dict[str, Any]:
        """The builder's keywords (``weights`` is loaded by the trainer, not passed to the builder)."""
        return {k: v for k, v in super().kwargs().items() if k != "weights"}


@dataclass(kw_only=True, frozen=True)
class RuleConfig(NamedSection):
    """``rule``: a registered gradient rule (``osgd``, ``torchjd:UPGrad``, ...) and its keywords."""

    key = "rule"


@dataclass(kw_only=True, frozen=True)
class OptimizerConfig(NamedSection):
    """``optimizer``: a registered optimizer or any ``torch.optim`` class name, and its keywords."""

    key = "optimizer"
    lr: float | None = _checked(float, 0, lo_in=False, default=None)
    momentum: float | None = _checked(float, 0, 1, default=None)
    weight_decay: float | None = _checked(float, 0, default=None)


@dataclass(kw_only=True, frozen=True)
class ScheduleConfig(NamedSection):
    """``schedule``: the learning-rate schedule (``none``, ``step``, ``cosine``), stepped every training step."""

    key = "schedule"
    warmup_epochs: float | None = _checked(float, 0, default=None)
    final_factor: float | None = _checked(float, 0, 1, hi_in=True, default=None)
    gamma: float | None = _checked(float, 0, lo_in=False, default=None)
    milestones: list[float] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        ms = self.milestones
        if ms is not None and (
            not isinstance(ms, list) or not all(isinstance(m, (int, float)) and not isinstance(m, bool) for m in ms)
        ):
            raise ConfigError(f"schedule.milestones must be a list of epochs (numbers), got {ms!r}")
        if ms and min(ms) < 0:
            raise ConfigError(f"schedule.milestones must be >= 0, got {ms!r}")


@dataclass(kw_only=True, frozen=True)
class TrainConfig(Section):
    """``train``: the loop's length, device and reporting."""

    key = "train"
    epochs: int = _checked(int, 0, lo_in=False, default=30)
    device: str = _checked(str, default="auto")
    log_every: int = _checked(int, 0, lo_in=False, default=20)
    checkpoint_every: int = _checked(int, 0, lo_in=False, default=1)
    keep_every: int = _checked(int, 0, default=0)  # > 0: also keep every N-th epoch's checkpoint in checkpoints/
    keep_every_steps: int = _checked(int, 0, default=0)  # > 0: also keep a snapshot every N steps in checkpoints/
    threads: int = _checked(int, 0, default=0)  # 0: torch's default
    progress: bool = _checked(bool, default=True)
    tensorboard: bool = _checked(bool, default=True)
    plots: bool = _checked(bool, default=True)
    label_smoothing: float = _checked(float, 0, 1, default=0.0)
    freeze: str = _checked(str, default="none")  # none | trunk | a glob over parameter names
    # speed (anytrain.train.precision): autocast dtype, torch.compile, channels-last memory, micro-batches per step
    precision: str = _checked(str, default="fp32")
    compile: bool = _checked(bool, default=False)
    channels_last: bool = _checked(bool, default=False)
    accumulate: int = _checked(int, 1, default=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


_SECTIONS: dict[str, type[Section]] = {
    s.key: s for s in (DataConfig, ModelConfig, RuleConfig, OptimizerConfig, ScheduleConfig, TrainConfig)
}


@dataclass(kw_only=True, frozen=True)
class RunConfig:
    """A whole run's config; the defaults are the default run (MNIST-1D, a width-nested anytime CNN, OSGD)."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="nested-width"))
    rule: RuleConfig = field(default_factory=lambda: RuleConfig(name="osgd"))
    optimizer: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(name="sgd", lr=0.4, momentum=0.9, weight_decay=5.0e-4)
    )
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="cosine"))
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _check_value("seed", self.seed, int, 0, SEED_LIMIT, True, False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """A complete config (every section present, e.g. a merged one) from its YAML form; checks everything."""
        _check_tree(d, "", set())
        unknown = sorted(set(d) - {"seed", *_SECTIONS})
        if unknown:
            known = ", ".join(sorted({"seed", *_SECTIONS}))
            raise ConfigError(f"unknown config key {unknown[0]!r}; known here: {known}")
        sections: dict[str, Any] = {k: s.from_dict(d.get(k, {})) for k, s in _SECTIONS.items()}
        return cls(seed=d.get("seed", 0), **sections)

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (what ``config.yaml`` holds)."""
        return {"seed": self.seed, **{k: getattr(self, k).to_dict() for k in _SECTIONS}}


# ---- reading: YAML files and --set overrides -------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` / ``5E+4`` as floats.

    PyYAML follows YAML 1.1, where an exponent needs a dot (``1.0e-3``), so a plain ``lr: 1e-3`` would
    otherwise arrive as the *string* ``"1e-3"``. Only the float resolver is widened; nothing unsafe is added.
    """


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 style floats (``1e-3`` is a number)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader derives from SafeLoader


def parse_value(text: str) -> Any:
    """Parse the value of ``--set key=value`` as YAML (numbers, bools, lists, null), safely."""
    try:
        return safe_load(text)
    except yaml.YAMLError:
        return text


def _config_path(path: str | Path) -> Path:
    """The config file ``path`` names: the file itself, or else one of the configs shipped in the package
    (so ``configs/default.yaml`` works from an installed wheel too)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config {p} is a directory, not a YAML file")
    if not p.exists() and (len(p.parts) == 1 or p.parts[-2:-1] == ("configs",)):
        shipped = Path(__file__).parent / "configs" / p.name
        if shipped.is_file():
            return shipped
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    return p


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping (safe loader); every problem is a one-line ``ConfigError``."""
    p = _config_path(path)
    try:
        text = p.read_bytes().decode()
        data = safe_load(text)
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {p} is not a text file (not UTF-8): is it really a YAML config?") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "parse error"
        raise ConfigError(f"config {p} is not valid YAML: {first}") from None
    except RecursionError:
        raise ConfigError(f"config {p} is nested too deeply") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {p} must be a mapping at the top level, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` over ``base``, mapping by mapping."""
    out = dict(base)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _shorthand(d: dict[str, Any]) -> dict[str, Any]:
    """``section: NAME`` means ``section: {name: NAME}`` for the sections that have a name."""
    return {k: v if k not in _SECTIONS or k == "train" or isinstance(v, dict) else {"name": v} for k, v in d.items()}


def _layer(base: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """One layer of settings (a config file, or all ``--set`` overrides together) over ``base``.

    ``section: NAME`` is short for ``section: {name: NAME}`` (Hydra's ``rule=osgd``). A layer that changes a
    section's ``name`` starts that section afresh from the layer: the options of the previous model, rule,
    optimizer or schedule (``data.options`` of the previous data set) are meant for it only and are dropped;
    the layer's own keys are kept whatever their order, and the generic ``data`` keys stay.
    """
    out = dict(base)
    for k, v in _shorthand(layer).items():
        old = out.get(k)
        if isinstance(v, dict) and isinstance(old, dict) and "name" in v and v["name"] != old.get("name"):
            out[k] = old = {**old, "options": {}} if k == "data" else {}
        out[k] = _merge(old, v) if isinstance(v, dict) and isinstance(old, dict) else v
    return out


def _overrides(items: list[str]) -> dict[str, Any]:
    """``--set key.sub=value`` items as one nested mapping (later items win)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set expects a dotted key such as optimizer.lr, got {key!r}")
        value = parse_value(raw)
        for part in reversed(parts):
            value = {part: value}
        out = _merge(out, _shorthand(value))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The defaults, then the YAML file at ``path``, then the ``--set`` overrides; checked."""
    try:
        cfg = RunConfig().to_dict()
        if path is not None:
            cfg = _layer(cfg, read_config_file(path))
        return RunConfig.from_dict(_layer(cfg, _overrides(overrides or [])))
    except RecursionError:  # a YAML alias that refers to itself
        raise ConfigError("the config refers to itself (a recursive YAML alias) or is nested too deeply") from None


# Settings that may change on ``--resume`` because they do not change what is computed (where it runs, how it is
# reported, how often it is saved). Any other change would silently alter a run half-way, so it is refused.
RESUME_SETTINGS = (
    "train.device",
    "train.threads",
    "train.progress",
    "train.tensorboard",
    "train.plots",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_every",
    "train.keep_every_steps",
    "train.compile",  # speed only: the same arithmetic up to float rounding
    "train.channels_last",
    "data.eval_batch_size",
)


def resume_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs in YAML form (a key present in only one of them
    counts) and which may not change on resume."""
    out: list[str] = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += resume_changes(a, b, f"{prefix}{k}.")
        elif (k not in old or k not in new or a != b or type(a) is not type(b)) and prefix + k not in RESUME_SETTINGS:
            if k not in old and _is_default(f"{prefix}{k}", b):
                continue  # a key added after the run was written, at its default: the run is unchanged
            out.append(f"{prefix}{k}")
    return out


def _is_default(dotted: str, value: Any) -> bool:
    node: Any = RunConfig().to_dict()
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return bool(node == value and type(node) is type(value))


_PLAIN = (str, int, float, bool, type(None))


def _check_tree(obj: Any, where: str, seen: set[int]) -> None:
    """Keys are strings, values plain YAML scalars, lists or mappings; floats finite; integers 64-bit.
    A container shared through YAML aliases is checked once (so an alias bomb costs nothing)."""
    if isinstance(obj, (dict, list)):
        if id(obj) in seen:
            return
        seen.add(id(obj))
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ConfigError(f"config keys must be strings, got {k!r} in {where or 'the top level'}")
            _check_tree(v, f"{where}.{k}" if where else k, seen)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_tree(v, f"{where}[{i}]", seen)
    elif not isinstance(obj, _PLAIN):
        raise ConfigError(f"{where} must be a number, string, boolean, list or mapping, got {type(obj).__name__}")
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise ConfigError(f"{where} must be finite, got {obj!r}")
    elif isinstance(obj, int) and not isinstance(obj, bool) and not -_INT64 <= obj < _INT64:
        raise ConfigError(f"{where} is out of range ({obj}); integers must fit in 64 bits")


# The first line of every config.yaml anytrain writes into a run directory: how a run directory is recognized
# (``--resume``, ``--overwrite``), so that a user's own folder with a config.yaml in it is never taken for one.
RUN_HEADER = "# anytrain run: the fully resolved config of this run directory"


def dump_config(cfg: RunConfig) -> str:
    return f"{RUN_HEADER}\n{yaml.safe_dump(cfg.to_dict(), sort_keys=False)}"
