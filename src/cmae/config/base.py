"""The config machinery: OmegaConf structured configs layered as dataclass defaults -> YAML
file (with ``extends: <preset>``) -> ``key.sub=value`` overrides, with one-line errors that name
the key. OmegaConf does the type checks and conversions (as in dinov2); this module adds the
preset lookup, ``extends`` and error messages in the project's words."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cmae.errors import ConfigError

PRESET_DIR = Path(__file__).parents[1] / "configs"  # cmae/configs: presets found by name

T = TypeVar("T")


class Choice(str, Enum):
    """The allowed values of a config field. OmegaConf refuses any other (by member name, so
    each name is its value); a member is its string to ``==``, ``hash``, ``str``, f-strings and
    JSON, and ``to_dict`` writes it as a plain string (checkpoints, config.yaml). Pickle would
    keep the class, which ``torch.load(weights_only=True)`` refuses: store ``str(member)``."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Colors(Choice):
    """The built-in generated data's colours (cmae.data.datasets.SyntheticShapes)."""

    grey = "grey"  # random grey levels
    color = "color"  # random RGB


# ---------------------------------------------------------------------------------------------
# declared checks: a field's bounds or check function in its metadata, read by check_fields

_BOUND = re.compile(r"^(>=?|<=?) *(-?[\d.]+)$|^([\[(]) *(-?[\d.]+), *(-?[\d.]+) *([\])])$")


@dataclasses.dataclass(frozen=True)
class Bounds:
    """Where a number may lie: ``"> 0"``, ``">= 1"`` or an interval such as ``"[0, 1)"``."""

    text: str
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = True
    hi_open: bool = True

    @classmethod
    def parse(cls, text: str) -> Bounds:
        m = _BOUND.match(text)
        if m is None:
            raise ValueError(f"bounds {text!r}: expected '> a', '>= a' or an interval '[a, b)'")
        op, bound, left, lo, hi, right = m.groups()
        if op is not None:
            side = {"lo": float(bound)} if op[0] == ">" else {"hi": float(bound)}
            closed = op.endswith("=")
            opened = {"lo_open": not closed} if op[0] == ">" else {"hi_open": not closed}
            return cls(text, **side, **opened)
        return cls(text, float(lo), float(hi), left == "(", right == ")")

    def __contains__(self, x: float) -> bool:
        above = x > self.lo if self.lo_open else x >= self.lo
        below = x < self.hi if self.hi_open else x <= self.hi
        return above and below

    def describe(self) -> str:
        return self.text if self.text[0] in "<>" else f"in {self.text}"


def bounded(default: Any, bounds: str, ordered: bool = False) -> Any:
    """A dataclass field whose value (each value of a list; None passes) must lie in ``bounds``;
    ``ordered``: a (lo, hi) pair with lo <= hi."""
    meta = {"bounds": Bounds.parse(bounds), "ordered": ordered}
    return dataclasses.field(default=default, metadata=meta)


def checked(default: Any, check: Callable[[Any], None]) -> Any:
    """A dataclass field whose value ``check`` accepts; it raises ValueError saying why not."""
    return dataclasses.field(default=default, metadata={"check": check})


def check_fields(cfg: Any, prefix: str = "") -> None:
    """ConfigError naming the first field of dataclass ``cfg`` (and of its sections, in order)
    whose value is out of its declared bounds or refused by its check."""
    for f in dataclasses.fields(cfg):
        key, value = f"{prefix}{f.name}", getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{key}.")
        elif value is not None and "bounds" in f.metadata:
            _check_bounds(key, value, f.metadata["bounds"], f.metadata["ordered"])
        elif value is not None and "check" in f.metadata:
            try:
                f.metadata["check"](value)
            except ValueError as e:
                raise ConfigError(f"{key}: {e}") from None


def _check_bounds(key: str, value: Any, bounds: Bounds, ordered: bool) -> None:
    if isinstance(value, tuple):
        if not value:
            raise ConfigError(f"{key}: must not be empty")
        if any(v not in bounds for v in value):
            raise ConfigError(f"{key}: each must be {bounds.describe()}, got {list(value)}")
        if ordered and value[0] > value[1]:
            raise ConfigError(f"{key}: needs lo <= hi, got {list(value)}")
    elif value not in bounds:
        raise ConfigError(f"{key}: must be {bounds.describe()}, got {value}")


def device_name(name: str) -> None:
    """A device setting: auto, cpu, cuda or cuda:N."""
    index = name.removeprefix("cuda:")
    if name not in ("auto", "cpu", "cuda") and not (index != name and index.isdigit()):
        raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {name!r}")


def resume_setting(value: str) -> None:
    """A resume setting: auto, never or a checkpoint path."""
    if not value:
        raise ValueError("expected auto, never or a checkpoint path, got ''")


def preset_path(name_or_path: str, directory: Path = PRESET_DIR, kind: str = "") -> Path:
    """A preset name (``tiny``) -> its file in ``directory`` (cmae/configs; ``kind`` names the
    preset family in errors, e.g. "segment "); a ``.yaml`` path -> itself."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    candidate = directory / f"{name_or_path}.yaml"
    if not candidate.is_file():
        names = ", ".join(sorted(x.stem for x in directory.glob("*.yaml")))
        raise ConfigError(
            f"unknown {kind}preset '{name_or_path}' (presets: {names}; or pass a .yaml path)"
        )
    return candidate


def load_layered(cls: type[T], path: Path | None, overrides: list[str] | None) -> T:
    """The defaults of dataclass ``cls``, then the YAML file ``path`` (if any), then the dotted
    ``overrides``, type-checked (every config command loads this way)."""
    layers = []
    if path is not None:
        layers.append((str(path), load_yaml(path)))
    if overrides:
        layers.append(("", parse_overrides(overrides)))
    return compose(cls, layers)


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML file as a nested dict, its ``extends: <preset or file>`` merged underneath."""
    try:
        # OmegaConf's YAML reader: 1e6 is a number, as in YAML 1.2 (PyYAML reads a string)
        data = OmegaConf.to_container(OmegaConf.load(path))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from e
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections (model/data/train)")
    extends = data.pop("extends", None)
    if extends is None:
        return data
    base = OmegaConf.create(load_yaml(preset_path(extends)))
    return OmegaConf.to_container(OmegaConf.merge(base, data))


def _yaml_problem(e: yaml.YAMLError) -> str:
    """'line L, column C: what' (PyYAML's own text spans lines and names '<unicode string>')."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None or problem is None:
        return str(e).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["model.mask_ratio=0.5", "train.epochs=3"]`` -> nested dict; values parsed as YAML."""
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(items)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"overrides {' '.join(items)}: {e}") from e


def compose(schema: type[T] | T, layers: Sequence[tuple[str, Any]], prefix: str = "") -> T:
    """``schema`` (a dataclass or an instance: the defaults) with each ``(source, values)``
    layer merged on top in order, as a dataclass instance. Errors name the key (after
    ``prefix``) and the layer's source (a file path; "" for command-line overrides)."""
    cfg = OmegaConf.structured(schema)
    cls = schema if isinstance(schema, type) else type(schema)
    for source, values in layers:
        try:
            _apply(cfg, cls, values, prefix)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}" if source else str(e)) from None
    return OmegaConf.to_object(cfg)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of builtins (tuples become lists, choices strings), safe for YAML and
    weights_only."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


def _apply(cfg: DictConfig, cls: type, values: Any, prefix: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    for key, value in _leaves(values):
        _check_known(cfg, key, prefix)
        tp = _annotation(cls, key)
        # OmegaConf reads 1 as true; a number where a flag belongs is more likely a mistake
        if tp is bool and not isinstance(value, bool):
            raise ConfigError(f"{prefix}{key}: expected true/false, got {value!r}")
        if _nonfinite(value):  # train.lr=.inf made every weight NaN in the first step
            raise ConfigError(f"{prefix}{key}: must be a finite number, got {value!r}")
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException:
            raise ConfigError(f"{prefix}{key}: expected {_expected(tp)}, got {value!r}") from None


def _nonfinite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    return isinstance(value, (list, tuple)) and any(map(_nonfinite, value))


def _leaves(d: dict[str, Any], parent: str = "") -> list[tuple[str, Any]]:
    """Nested dict -> (dotted key, value) pairs; lists and scalars are leaves."""
    out = []
    for k, v in d.items():
        key = f"{parent}{k}"
        out += _leaves(v, f"{key}.") if isinstance(v, dict) and v else [(key, v)]
    return out


def _check_known(cfg: DictConfig, key: str, prefix: str) -> None:
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            return  # a value where a section was given: the type check names it
        if part not in node:
            known = ", ".join(node.keys())
            full = prefix + ".".join(parts[: i + 1])
            raise ConfigError(f"unknown config key '{full}' (known keys here: {known})")
        node = node[part]


def _annotation(cls: type, key: str) -> Any:
    """The type annotation of dotted ``key`` in dataclass ``cls`` (Any below a leaf)."""
    tp: Any = cls
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp):
            return Any
        tp = typing.get_type_hints(tp)[part]
    return tp


def _expected(tp: Any) -> str:
    """How an error message names what a field of type ``tp`` takes."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return "a non-empty list"
        return f"a list of {len(args)} values"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if isinstance(tp, type) and issubclass(tp, Choice):
        *rest, last = [c.value for c in tp]
        return f"{', '.join(rest)} or {last}"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, str(tp))


class SyntheticSplits:
    """For data configs with ``synthetic_{train,val,size,seed,colors}`` fields: the built-in
    generated data's sizes, seed and colour scheme in the form the dataset builders take."""

    def synthetic(self) -> dict[str, int | str]:
        return {
            "train": self.synthetic_train,
            "val": self.synthetic_val,
            "size": self.synthetic_size,
            "seed": self.synthetic_seed,
            "colors": str(self.synthetic_colors),
        }
