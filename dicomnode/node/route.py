"""Route: declarative rules (DICOM keyword conditions, calling AE) -> pipelines and destinations.

No expressions are evaluated: each condition is one of equals / one_of / regex / min..max.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from dicomnode.settings import MatchCondition, Rule

__all__ = ["RuleEvaluation", "evaluate_rules", "header_values"]


@dataclass(frozen=True, kw_only=True)
class RuleEvaluation:
    """The outcome of one rule on one series, with the reason for a miss."""

    rule: str
    matched: bool
    reason: str
    # a study rule (``requires``): the role this series fills when matched
    role: str | None = None


def _as_text(value: Any) -> str:
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _check(keyword: str, cond: MatchCondition, value: Any) -> str | None:
    """``None`` if the condition holds, else why not."""
    if value is None or value == "":
        return f"{keyword} is absent"
    text = _as_text(value)
    if cond.equals is not None:
        if isinstance(cond.equals, float | int) and not isinstance(cond.equals, bool):
            try:
                return None if float(text) == float(cond.equals) else f"{keyword}={text!r}"
            except ValueError:
                return f"{keyword}={text!r} is not a number"
        return None if text == str(cond.equals) else f"{keyword}={text!r} != {cond.equals!r}"
    if cond.one_of is not None:
        options = {str(o) for o in cond.one_of}
        return None if text in options else f"{keyword}={text!r} not in {sorted(options)}"
    if cond.regex is not None:
        return None if re.search(cond.regex, text) else f"{keyword}={text!r} !~ {cond.regex!r}"
    try:
        number = float(text)
    except ValueError:
        return f"{keyword}={text!r} is not a number"
    if cond.min is not None and number < cond.min:
        return f"{keyword}={number} < {cond.min}"
    if cond.max is not None and number > cond.max:
        return f"{keyword}={number} > {cond.max}"
    return None


def header_values(ds: Dataset, rules: list[Rule]) -> dict[str, Any]:
    """The values of every keyword any rule looks at (absent keywords map to ``None``)."""
    keywords = {k for rule in rules for k in rule.match}
    keywords |= {k for rule in rules for conds in rule.requires.values() for k in conds}
    return {k: ds.get(k) for k in keywords}


def _first_miss(conditions: Mapping[str, Any], values: Mapping[str, Any]) -> str | None:
    for keyword, cond in conditions.items():
        reason = _check(keyword, cond, values.get(keyword))
        if reason:
            return reason
    return None


def evaluate_rules(
    rules: list[Rule], *, values: Mapping[str, Any], calling_ae: str | None
) -> list[RuleEvaluation]:
    """Evaluate every rule against a series' header values and its calling AE.

    Parameters
    ----------
    rules
        Rules from the settings, in order.
    values
        DICOM keyword -> value from the series (see :func:`header_values`).
    calling_ae
        AE title that sent the series.

    Returns
    -------
    list[RuleEvaluation]
        One entry per rule, in order. For a study rule, ``matched`` says the series fills
        one of its roles (``role``, the first that fits), the reason why not otherwise.
    """
    out = []
    for rule in rules:
        role = None
        reason: str | None = None
        if rule.calling_ae and (calling_ae or "") not in rule.calling_ae:
            reason = f"calling AE {calling_ae!r} not in {rule.calling_ae}"
        elif rule.requires:
            misses = {}
            for name, conditions in rule.requires.items():
                miss = _first_miss(conditions, values)
                if miss is None:
                    role = name
                    break
                misses[name] = miss
            if role is None:
                reason = "fills no role: " + "; ".join(f"{r}: {m}" for r, m in misses.items())
        else:
            reason = _first_miss(rule.match, values)
        out.append(RuleEvaluation(
            rule=rule.name, matched=reason is None, role=role,
            reason=reason or (f"fills role {role}" if role else "all conditions hold")))
    return out
