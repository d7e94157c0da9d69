"""From measurements to advice: what is wrong with each mode, how to fix it, what to use.

- :func:`flag` names each mode's problems: fp16 overflow, updates lost to rounding,
  layers whose error alone costs much of the model output's SQNR, non-finite
  losses, and a loss gap above the threshold.
- :func:`fix_for` turns fixable problems into a variant of the mode, by the options
  the mode takes (read from its factory's signature, never from its name):
  ``master_weights=True`` for lost updates, ``ignore_modules`` for sensitive or
  overflowing layers. The doctor measures the variant like any mode.
- :func:`recommend` picks the cheapest mode (bytes per parameter, then step time)
  whose loss stays within the threshold and that nothing blocks, using a mode's
  measured fix in its place, and says why for every choice.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

from .._modestring import parse_mode_string
from .._registry import registry
from .result import Candidate, Flag, ModeResult, Recommendation

__all__ = ["fix_for", "flag", "options_taken", "recommend"]

#: options of a precision mode the doctor knows how to use for a fix
FIX_OPTIONS = ("master_weights", "ignore_modules")


def options_taken(mode: str) -> tuple[str, ...]:
    """Which of :data:`FIX_OPTIONS` the precision mode of ``mode`` takes (from the
    registered factory's keyword parameters; a factory taking ``**kwargs`` says
    nothing, so none)."""
    try:
        name = parse_mode_string(mode)[0].name
        factory = registry().entry(name).spec.factory
        params = inspect.signature(factory).parameters
    except Exception:
        return ()
    return tuple(o for o in FIX_OPTIONS if o in params
                 and params[o].kind in (inspect.Parameter.KEYWORD_ONLY,
                                        inspect.Parameter.POSITIONAL_OR_KEYWORD))


def _pct(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:+.2f}%"


def flag(result: ModeResult, *, loss_threshold: float, sqnr_threshold: float,
         lost_threshold: float) -> list[Flag]:
    """The problems of one measured mode (see the module docstring)."""
    flags: list[Flag] = []
    if result.status == "ok" and (result.final_loss is None
                                  or not math.isfinite(result.final_loss)):
        flags.append(Flag("non-finite", [], "the loss is not finite after the short run"))
    overflow = [lr.name for lr in result.layers if lr.overflow]
    if overflow:
        flags.append(Flag("fp16-overflow", overflow,
                          f"activations exceed fp16's range (65504) in {', '.join(overflow)}"))
    lost = [lr for lr in result.layers if lr.lost is not None and lr.lost > lost_threshold]
    if lost:
        shown = ", ".join(f"{lr.name} {100 * (lr.lost or 0.0):.0f}%" for lr in lost[:6])
        more = f" and {len(lost) - 6} more" if len(lost) > 6 else ""
        flags.append(Flag("lost-updates", [lr.name for lr in lost],
                          f"most updates round away (smaller than half a unit in the last "
                          f"place of the weight) in {len(lost)} layer(s): {shown}{more}"))
    sensitive = [lr for lr in result.ranked()
                 if lr.impact_db is not None and lr.impact_db < sqnr_threshold]
    if sensitive:
        shown = ", ".join(f"{lr.name} {lr.impact_db:.1f} dB" for lr in sensitive[:6])
        flags.append(Flag("sensitive", [lr.name for lr in sensitive],
                          f"alone, {len(sensitive)} layer(s) bring the model output's SQNR "
                          f"below {sqnr_threshold:g} dB: {shown}", blocking=False))
    if result.skipped_steps:
        flags.append(Flag("skipped-steps", [],
                          f"{result.skipped_steps} of the short run's steps were skipped for "
                          "inf/NaN gradients", blocking=False))
    if result.gap_pct is not None and math.isfinite(result.gap_pct) \
            and result.gap_pct > loss_threshold:
        flags.append(Flag("loss-gap", [],
                          f"the loss ends {_pct(result.gap_pct)} from fp32's, over the "
                          f"{loss_threshold:g}% threshold"))
    return flags


def fix_for(result: ModeResult) -> Candidate | None:
    """A variant of ``result``'s mode that fixes what its options can fix, or None."""
    if result.candidate.fix_of is not None or result.status != "ok":
        return None
    causes = {f.cause: f for f in result.flags}
    options: dict[str, object] = {}
    current = dict(result.candidate.options)
    if "lost-updates" in causes and "master_weights" in result.takes \
            and not current.get("master_weights"):
        options["master_weights"] = True
    keep = set()
    for cause in ("sensitive", "fp16-overflow"):
        if cause in causes:
            keep.update(causes[cause].layers)
    if keep and "ignore_modules" in result.takes:
        existing = current.get("ignore_modules") or ()
        existing = [existing] if isinstance(existing, str) else list(existing)
        options["ignore_modules"] = sorted(set(existing) | keep)
    if not options:
        return None
    return result.candidate.with_options(result.label, **options)


def _usable(result: ModeResult, loss_threshold: float) -> bool:
    return (result.status == "ok" and not result.blocked and result.gap_pct is not None
            and math.isfinite(result.gap_pct) and result.gap_pct <= loss_threshold)


def _cost(result: ModeResult) -> tuple[float, float]:
    bpp = result.bytes_per_param if result.bytes_per_param is not None else math.inf
    return round(bpp, 2), result.step_ms if result.step_ms is not None else math.inf


def _problems(result: ModeResult) -> str:
    blocking = [f.message for f in result.flags if f.blocking]
    if result.status != "ok":
        return "; ".join([*blocking, f"could not run: {result.error}"])
    return "; ".join(blocking) if blocking else "ok"


def recommend(results: Sequence[ModeResult], *, loss_threshold: float,
              sqnr_threshold: float) -> Recommendation:
    """The cheapest usable mode, the layers to keep for it, and the reasons."""
    fixes = {r.candidate.fix_of: r for r in results if r.candidate.fix_of is not None}
    verdicts: dict[str, str] = {}
    finals: list[tuple[ModeResult, ModeResult]] = []  # (what the user asked about, what to use)
    for r in results:
        if r.candidate.fix_of is not None:
            continue
        fix = fixes.get(r.label)
        if fix is not None and _usable(fix, loss_threshold) and (
                not _usable(r, loss_threshold) or (fix.gap_pct or 0.0) <= (r.gap_pct or 0.0)):
            finals.append((r, fix))
            causes = ", ".join(f.cause for f in r.flags if f.blocking)
            what = "" if _usable(r, loss_threshold) else f"; {causes}"
            verdicts[r.label] = (f"use {fix.label}: loss gap {_pct(fix.gap_pct)} "
                                 f"(as is: {_pct(r.gap_pct)}{what})")
        elif _usable(r, loss_threshold):
            finals.append((r, r))
            verdicts[r.label] = f"ok: loss gap {_pct(r.gap_pct)}"
            if fix is not None:
                verdicts[r.label] += f" ({fix.label}: {_problems(fix) if fix.status != 'ok' or fix.blocked else _pct(fix.gap_pct)})"
        else:
            verdicts[r.label] = "not recommended: " + _problems(r)
            if fix is not None:
                verdicts[r.label] += f"; {fix.label} does not fix it: {_problems(fix)}"
    if not finals:
        return Recommendation(None, ["no examined mode stays within "
                                     f"{loss_threshold:g}% of fp32's loss; keep 32-true"],
                              verdicts=verdicts)
    asked, chosen = min(finals, key=lambda pair: _cost(pair[1]))
    baseline = next((r for r in results if r.candidate.mode == "32-true"
                     and not r.candidate.options), None)
    reasons = [
        f"{chosen.label}: the cheapest mode whose loss stays within {loss_threshold:g}% of "
        f"fp32's after the short run (gap {_pct(chosen.gap_pct)}), at "
        f"{chosen.bytes_per_param:.2f} bytes per parameter (weights, gradients, optimizer "
        f"state){_speed(chosen, baseline)}",
    ]
    cheaper = [r for r in results if r.candidate.fix_of is None and r is not asked
               and r.status == "ok" and _cost(r) < _cost(chosen)
               and not _usable(r, loss_threshold)]
    for r in sorted(cheaper, key=_cost):
        text = f"not {r.label} ({_cost(r)[0]:.2f} B/param): {_problems(r)}"
        fix = fixes.get(r.label)
        if fix is not None and fix.status == "ok" and fix.bytes_per_param is not None:
            text += f"; its fix {fix.label} needs {fix.bytes_per_param:.2f} B/param"
        reasons.append(text)
    if chosen is not asked:
        for f in asked.flags:
            if f.cause == "lost-updates":
                reasons.append(f"master_weights=True: in {asked.label} {f.message}; fp32 master "
                               f"weights keep them (lost share {_share(chosen.lost)} with "
                               f"masters, {_share(asked.lost)} without)")
    ignore = tuple(dict(chosen.candidate.options).get("ignore_modules") or ())
    for name in ignore:
        layer = asked.layer(name)
        if layer is None:
            continue
        why = ("its activations exceed fp16's range" if layer.overflow else
               f"alone it brings the model output's SQNR to {layer.impact_db:.1f} dB "
               f"(< {sqnr_threshold:g} dB) and changes the loss by {_pct(layer.impact_pct)}")
        reasons.append(f"ignore_modules keeps {name} in full precision: {why}")
    if ignore and chosen is not asked:
        reasons.append(f"with them kept the loss gap is {_pct(chosen.gap_pct)} instead of "
                       f"{_pct(asked.gap_pct)}")
    return Recommendation(chosen.candidate, reasons, ignore, verdicts)


def _share(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _speed(r: ModeResult, baseline: ModeResult | None) -> str:
    if r.step_ms is None:
        return ""
    base = "" if baseline is None or baseline is r or baseline.step_ms is None \
        else f" (32-true: {baseline.step_ms:.1f} ms)"
    return f", {r.step_ms:.1f} ms per step here{base}"
