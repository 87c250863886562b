"""Named conditions of a model (``ConditionSpec``) and how its UNet takes them (``Conditioning``).

Declared in ``model.json`` as a ``conditioning`` block (or derived from a MONAI bundle's metadata)::

    "conditioning": {"concat": true, "context": true, "class_labels": false, "null": null,
                     "conditions": [{"name": "age", "low": 0, "high": 1, "default": 0.5, "description": "...",
                                     "unit": "years", "unit_low": 20, "unit_high": 90}]}

``concat``: the values broadcast over the sample and concatenated as extra input channels; ``context``: the
values as cross-attention context ``(B, 1, N)``; ``class_labels``: the first value as an integer class label;
``null``: the values meaning "no condition" for classifier-free guidance (models trained with condition
dropout), or null when the model was not. ``unit`` / ``unit_low`` / ``unit_high`` (optional): the physical
values ``low`` and ``high`` stand for, shown beside the sliders.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from napari_meddiff.errors import MeddiffError

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
ACRONYMS = {"csf", "gm", "wm", "ct", "mri", "t1", "t2", "flair", "suv", "hu"}


def snake_case(text: str) -> str:
    """``"Ventricular volume"`` -> ``"ventricular_volume"``."""
    return re.sub(r"[^a-z0-9]+", "_", str(text).strip().lower()).strip("_")


@dataclasses.dataclass(frozen=True)
class ConditionSpec:
    """One named scalar condition: its range, default and meaning."""

    name: str
    low: float
    high: float
    default: float
    description: str = ""
    unit: str = ""  # a physical unit the [low, high] scale maps onto linearly (e.g. "ml"), where declared
    unit_low: float | None = None  # the unit's value at ``low``
    unit_high: float | None = None  # ... and at ``high``

    @property
    def label(self) -> str:
        """``"csf_volume"`` -> ``"CSF volume"``: for forms and plots."""
        words = [w.upper() if w in ACRONYMS else w for w in self.name.split("_")]
        return " ".join(words)[:1].upper() + " ".join(words)[1:]

    def in_units(self, value: float) -> float | None:
        """The physical value a condition value stands for (None where the model declares no unit scale)."""
        if self.unit_low is None or self.unit_high is None or self.high == self.low:
            return None
        return self.unit_low + (float(value) - self.low) / (self.high - self.low) * (self.unit_high - self.unit_low)

    def check(self, value: float) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            raise MeddiffError(f"condition {self.name} must be a number, got {value!r}")
        if not self.low <= float(value) <= self.high:
            raise MeddiffError(f"condition {self.name}={value:g} is outside its range [{self.low:g}, {self.high:g}]")
        return float(value)


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """How the UNet receives the condition values."""

    concat: bool = False
    context: bool = False
    class_labels: bool = False
    null: tuple[float, ...] | None = None

    @property
    def used(self) -> bool:
        return self.concat or self.context or self.class_labels


def _number(block: Mapping, key: str, where: str) -> float:
    value = block.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise MeddiffError(f"{where}: conditioning {key!r} of {block.get('name')!r} must be a number, not {value!r}")
    return float(value)


def parse_conditions(block: Any, where: str) -> tuple[Conditioning, list[ConditionSpec]]:
    """Validate a ``conditioning`` block (``where`` names the file in errors)."""
    if block is None:
        return Conditioning(), []
    if not isinstance(block, dict):
        raise MeddiffError(f"{where}: 'conditioning' must be an object, not {type(block).__name__}")
    flags = {}
    for key in ("concat", "context", "class_labels"):
        value = block.get(key, False)
        if not isinstance(value, bool):
            raise MeddiffError(f"{where}: conditioning {key!r} must be true or false, not {value!r}")
        flags[key] = value
    items = block.get("conditions", [])
    if not isinstance(items, list) or not all(isinstance(c, dict) for c in items):
        raise MeddiffError(f"{where}: conditioning 'conditions' must be a list of objects")
    specs: list[ConditionSpec] = []
    for item in items:
        name = item.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise MeddiffError(f"{where}: condition names must be snake_case strings, not {name!r}")
        low, high = _number(item, "low", where), _number(item, "high", where)
        default = _number(item, "default", where) if "default" in item else (low + high) / 2
        if not low <= default <= high:
            raise MeddiffError(f"{where}: condition {name}: default {default:g} is outside [{low:g}, {high:g}]")
        units = {}
        if "unit_low" in item or "unit_high" in item:
            units = {
                "unit": str(item.get("unit", "")),
                "unit_low": _number(item, "unit_low", where),
                "unit_high": _number(item, "unit_high", where),
            }
        specs.append(ConditionSpec(name, low, high, default, str(item.get("description", "")), **units))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise MeddiffError(f"{where}: condition names repeat: {names}")
    null = block.get("null")
    if null is not None:
        if (
            not isinstance(null, list)
            or len(null) != len(specs)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in null)
        ):
            raise MeddiffError(f"{where}: conditioning 'null' must be a list of {len(specs)} numbers or null")
        null = tuple(float(v) for v in null)
    conditioning = Conditioning(null=null, **flags)
    if conditioning.used and not specs:
        raise MeddiffError(f"{where}: conditioning is used by the network but no conditions are declared")
    if specs and not conditioning.used:
        raise MeddiffError(f"{where}: conditions are declared but none of concat/context/class_labels is true")
    return conditioning, specs


def condition_values(
    specs: Sequence[ConditionSpec], values: Mapping[str, float] | None, model_name: str = "the model"
) -> dict[str, float]:
    """All of a model's conditions, in declaration order: given ``values`` (checked) over the defaults."""
    values = dict(values or {})
    if values and not specs:
        raise MeddiffError(f"{model_name} takes no conditions (got {', '.join(values)})")
    known = {s.name: s for s in specs}
    unknown = [n for n in values if n not in known]
    if unknown:
        raise MeddiffError(f"unknown condition {unknown[0]!r} for {model_name} (its conditions: {', '.join(known)})")
    return {s.name: s.check(values[s.name]) if s.name in values else s.default for s in specs}


def parse_condition_text(text: str) -> tuple[str, float, float | None]:
    """``"age=0.7"`` -> ``("age", 0.7, None)``; ``"age=0.2:0.8"`` (a sweep) -> ``("age", 0.2, 0.8)``."""
    match = re.fullmatch(r"\s*([A-Za-z][\w]*)\s*=\s*([^:]+?)\s*(?::\s*(.+?)\s*)?", str(text))
    if not match:
        raise MeddiffError(f"a condition is NAME=VALUE or NAME=FROM:TO (a sweep), not {text!r}")
    name, first, last = match.group(1), match.group(2), match.group(3)
    try:
        start = float(first)
        stop = float(last) if last is not None else None
    except ValueError:
        raise MeddiffError(f"condition {name}: {text.split('=', 1)[1]!r} is not a number") from None
    if not math.isfinite(start) or (stop is not None and not math.isfinite(stop)):
        raise MeddiffError(f"condition {name}: values must be finite numbers")
    return name, start, stop
