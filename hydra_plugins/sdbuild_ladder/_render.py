"""The ladder's outputs: ladder.json (data), ladder.md and ladder.html (the seed's table, then
every row tried), and the winner as a preset YAML."""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from sdbuild.results import busy_summary, noise_reasons, threads_advice
from sdbuild.stats import describe

from ._ladder import Bounds, Measured, NoiseRule, Step, Trial, parallel_gain


@dataclass
class Ladder:
    axes: Dict[str, List[str]]
    order: List[str]
    start: Dict[str, str]
    fixed: List[str]
    bounds: Bounds
    baseline: Optional[Measured]
    steps: List[Step]
    second_pass: List[Trial]
    winner: Measured
    preset: Optional[Path]
    grid_size: int
    launched: int  # jobs this run launched
    reused: int  # rows this run found in the sweep folder (earlier runs)
    launched_all_runs: int
    recipes: int  # distinct recipes the ladder looked at
    wall_s: float
    runs: int = 1
    interleaved: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)

    def speedup(self, m: Measured) -> Optional[float]:
        if self.baseline is None or not self.baseline.ok or not m.ok:
            return None
        return self.baseline.median / m.median


# ---------------------------------------------------------------------------------------------
# ladder.json


def _num(x: Optional[float]) -> Any:
    if x is None:
        return None
    return "inf" if math.isinf(x) else x


def measured_json(m: Measured, ladder: Ladder) -> Dict[str, Any]:
    row = m.row or {}
    return {
        "choices": m.choices, "overrides": m.overrides, "spec_key": m.spec_key, "job": m.job,
        "folder": str(m.folder) if m.folder else None, "reused": m.reused, "status": m.status,
        "error": row.get("error"), "latency_s": row.get("latency_s"), "peak_memory_mb": m.peak_memory_mb,
        "speedup": ladder.speedup(m), "psnr_db": _num(m.psnr_db), "ssim": m.ssim, "max_abs_diff": m.max_abs_diff,
        "adherence": m.adherence, "adherence_drop": m.adherence_drop,
        "fidelity_error": m.fidelity_error, "measurement": row.get("measurement"), "paired": row.get("paired"),
        "busy": m.busy, "noise": noise_reasons(row) if row else [],
    }


def trial_json(t: Trial, ladder: Ladder, step: Optional[Sequence[Trial]] = None) -> Dict[str, Any]:
    out = {**measured_json(t.m, ladder), "verdict": t.verdict.value, "reason": t.reason}
    if t.m.world_size > 1:  # its speed-up on the step's degree-1 recipe and the efficiency
        out["parallel"] = parallel_gain(t.m, [o.m for o in (step or [])])
    return out


def to_json(ladder: Ladder) -> Dict[str, Any]:
    b = ladder.bounds
    return {
        "axes": ladder.axes, "order": ladder.order, "start": ladder.start, "fixed_overrides": ladder.fixed,
        "bounds": {"psnr_db": b.psnr_db, "ssim": b.ssim, "adherence_drop": b.adherence_drop,
                   "memory_mb": b.memory_mb, "noise": b.noise.value, "min_gain": b.min_gain},
        "baseline": measured_json(ladder.baseline, ladder) if ladder.baseline else None,
        "steps": [{"axis": s.axis, "incumbent": s.incumbent.choices[s.axis], "kept": s.kept.choices[s.axis],
                   "changed": s.changed, "note": s.note,
                   "trials": [trial_json(t, ladder, s.trials) for t in s.trials]} for s in ladder.steps],
        "second_pass": [{**trial_json(t, ladder, ladder.second_pass), "dropped": _dropped_axes(t.m, ladder)}
                        for t in ladder.second_pass],
        "second_pass_note": ladder.extra.get("second_pass_note"),
        "winner": measured_json(ladder.winner, ladder),
        "preset": str(ladder.preset) if ladder.preset else None,
        "jobs": {"launched": ladder.launched, "reused": ladder.reused, "launched_all_runs": ladder.launched_all_runs,
                 "recipes": ladder.recipes, "grid_size": ladder.grid_size, "runs": ladder.runs},
        "wall_s": ladder.wall_s,
        "machine": _machine(ladder),
        "interleaved": ladder.interleaved, "load": load_summary(ladder), "caution": caution(ladder),
    }


def _dropped_axes(m: Measured, ladder: Ladder) -> Dict[str, str]:
    """{axis: option the ladder's winner had} for the levers this second-pass recipe drops."""
    base = _pre_second_pass_winner(ladder)
    return {k: base.choices[k] for k in ladder.order if m.choices[k] != base.choices[k]} if base else {}


def _pre_second_pass_winner(ladder: Ladder) -> Optional[Measured]:
    return ladder.steps[-1].kept if ladder.steps else ladder.baseline


def _all_measured(ladder: Ladder) -> List[Measured]:
    seen: Dict[int, Measured] = {}
    for m in ([ladder.baseline] if ladder.baseline else []) + [t.m for s in ladder.steps for t in s.trials] + \
            [s.incumbent for s in ladder.steps] + [t.m for t in ladder.second_pass] + [ladder.winner]:
        seen.setdefault(id(m), m)
    return list(seen.values())


def _decisive(ladder: Ladder) -> List[Measured]:
    """The rows the ladder's choices rested on: each step's current recipe and kept option, the winner."""
    out = [s.incumbent for s in ladder.steps] + [s.kept for s in ladder.steps] + [ladder.winner]
    return [m for m in out if m is not None and m.row]


def load_summary(ladder: Ladder) -> Optional[str]:
    """How many of the ladder's rows were measured on a busy machine or are noisy, and on a busy CPU
    what to try about threads (None: every row quiet)."""
    rows = [m.row for m in _all_measured(ladder) if m.row]
    said = [text for text in (busy_summary(rows), threads_advice(rows)) if text]
    return "; ".join(said) or None


def caution(ladder: Ladder) -> Optional[str]:
    """The verdict's warning when the ladder decided on busy or noisy rows measured one after another."""
    decisive = _decisive(ladder)
    if ladder.interleaved or not decisive:
        return None
    busy = [m for m in decisive if m.busy]
    noisy = [m for m in decisive if m.row and noise_reasons(m.row)]
    if not busy and not noisy:
        return None
    what = "busy" if busy else "noisy"
    return (f"this ladder decided on {what}, non-interleaved rows ({len(busy)} busy, {len(noisy)} noisy of the "
            f"{len(decisive)} it rested on): rows measured one after another are not comparable when the "
            f"machine's load drifts between them, so its winner may be an artefact of the load. Rerun with "
            f"hydra.sweeper.interleave=true (paired calls, 95% intervals) before betting on it.")


def _flags(m: Measured) -> str:
    if not m.row or not m.ok:
        return "—"
    reasons = noise_reasons(m.row)
    busy = ["busy"] if m.busy else []
    other = [r for r in reasons if not r.startswith("machine busy")]
    return ", ".join(busy + (["noisy: " + "; ".join(other)] if other else [])) or "quiet"


def _machine(ladder: Ladder) -> str:
    env = ((ladder.baseline.row if ladder.baseline else None) or {}).get("env") or {}
    return env.get("device_name") or env.get("cpu") or "unknown machine"


# ---------------------------------------------------------------------------------------------
# ladder.md / ladder.html (one table model, two renderings)


def _s(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.4f} s"


def _db(x: Optional[float]) -> str:
    return "—" if x is None else ("inf" if math.isinf(x) else f"{x:.1f}")


def _ssim(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.4f}"


def _mb(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.0f}"


def _x(x: Optional[float]) -> str:
    return "—" if x is None else f"x{x:.2f}"


def _range(m: Measured) -> str:
    if not m.ok:
        return "—"
    return f"{m.median:.4f} ({m.latency('min'):.4f}–{m.latency('max'):.4f})"


def _status(m: Measured) -> str:
    return m.status + (" (reused)" if m.reused else "")


def ladder_table(ladder: Ladder) -> tuple[List[str], List[List[str]]]:
    """The seed's form: baseline, then each kept lever, with cumulative speed-up and fidelity."""
    head = ["step", "recipe", "median", "speed-up", "paired speed-up on the step's current recipe (95% interval)",
            "PSNR vs baseline (dB)", "SSIM", "peak memory (MB)", "load", "job"]
    rows = []
    if ladder.baseline is None:
        return head, rows
    b = ladder.baseline
    rows.append(["baseline", b.label(ladder.order), _s(b.median), _x(ladder.speedup(b)), "—", "(baseline)",
                 "(baseline)", _mb(b.peak_memory_mb), _flags(b), str(b.job)])
    for s in ladder.steps:
        if s.changed:
            k = s.kept
            rows.append([f"+ {s.axis}={k.choices[s.axis]}", k.label(ladder.order), _s(k.median),
                         _x(ladder.speedup(k)), describe(k.paired_on(s.incumbent)), _db(k.psnr_db), _ssim(k.ssim),
                         _mb(k.peak_memory_mb), _flags(k), str(k.job)])
    if ladder.second_pass and ladder.winner is not _pre_second_pass_winner(ladder):
        w = ladder.winner
        dropped = ", ".join(f"{k}={v}" for k, v in _dropped_axes(w, ladder).items())
        reference = next((t.m for t in ladder.second_pass if t.verdict.value == "current"), None)
        paired = describe(w.paired_on(reference)) if reference else "—"
        rows.append([f"− {dropped} (second pass)", w.label(ladder.order), _s(w.median), _x(ladder.speedup(w)),
                     paired, _db(w.psnr_db), _ssim(w.ssim), _mb(w.peak_memory_mb), _flags(w), str(w.job)])
    return head, rows


def _has_ranks(ladder: Ladder) -> bool:
    return any(t.m.world_size > 1 for s in ladder.steps for t in s.trials)


def _gain_text(m: Measured, step: Sequence[Measured]) -> str:
    """A parallel recipe's ranks, speed-up on the step's degree-1 recipe and efficiency; '1' for one process."""
    g = parallel_gain(m, step)
    if g is None:
        return "1"
    if "speedup" not in g:
        return f"{g['world_size']} ({g['note']})"
    return f"{g['world_size']}: x{g['speedup']:.2f} on job {g['reference_job']}, efficiency {g['efficiency']:.2f}"


def trials_table(ladder: Ladder) -> tuple[List[str], List[List[str]]]:
    ranks = _has_ranks(ladder)  # the column only where a step tried a parallel recipe
    head = ["step", "option", "job", "status", "median (min–max) s", "paired speed-up (95% interval)", "PSNR (dB)",
            "SSIM", "peak MB", "load", "verdict", "why"]
    if ranks:
        head.insert(6, "ranks: speed-up on the step's degree-1 recipe, efficiency (speed-up / ranks)")
    rows = []
    for i, s in enumerate(ladder.steps, 1):
        for t in s.trials:
            row = [f"{i}: {s.axis}", f"{s.axis}={t.m.choices[s.axis]}", str(t.m.job), _status(t.m), _range(t.m),
                   describe(t.m.paired_on(s.incumbent)), _db(t.m.psnr_db), _ssim(t.m.ssim),
                   _mb(t.m.peak_memory_mb), _flags(t.m), t.verdict.value, t.reason]
            if ranks:
                row.insert(6, _gain_text(t.m, [o.m for o in s.trials]))
            rows.append(row)
    return head, rows


def step_notes(ladder: Ladder) -> List[str]:
    """How the steps that were not measured as the settings say were measured, and why."""
    notes = [f"Step {i} ({s.axis}): {s.note}." for i, s in enumerate(ladder.steps, 1) if s.note]
    if ladder.extra.get("second_pass_note"):
        notes.append(f"Second pass: {ladder.extra['second_pass_note']}.")
    return notes


def second_pass_table(ladder: Ladder) -> tuple[List[str], List[List[str]]]:
    head = ["lever dropped", "recipe", "job", "status", "median (min–max) s", "winner's gain from the lever",
            "load", "verdict", "why"]
    base = _pre_second_pass_winner(ladder)
    reference = next((t.m for t in ladder.second_pass if t.verdict.value == "current"), None)
    rows = []
    for t in ladder.second_pass:
        dropped = ", ".join(f"{k}={v}" for k, v in _dropped_axes(t.m, ladder).items()) or \
            "none (the winner, measured again as the drops' reference)"
        paired = t.m.paired_on(reference) if reference is not None else None
        if paired is not None:  # the winner's paired gain from the lever is the inverse of the drop's speed-up
            gain = f"x{1 / paired.median:.2f}" + (f" ({1 / paired.high:.2f}–{1 / paired.low:.2f}, {paired.n} pairs)"
                                                    if paired.bounded else f" (no 95% interval at {paired.n} calls)")
        else:
            gain = _x(t.m.median / base.median) if t.m.ok and base and base.ok else "—"
        rows.append([dropped, t.m.label(ladder.order), str(t.m.job), _status(t.m), _range(t.m), gain, _flags(t.m),
                     t.verdict.value, t.reason])
    return head, rows


def _rules(ladder: Ladder) -> List[str]:
    b = ladder.bounds
    noise = {NoiseRule.spread: "spread: a lever is kept only when its slowest timed run beats the current recipe's "
                               "fastest",
             NoiseRule.median: "median: a lower median is enough",
             NoiseRule.paired: "paired: a lever is kept only when the 95% interval of its paired speed-up on the "
                               "current recipe (calls alternated in one process) lies above 1"}[b.noise]
    lines = [
        f"PSNR >= {b.psnr_db:g} dB against the baseline image" if b.psnr_db is not None else "no PSNR bound",
        f"SSIM >= {b.ssim:g}" if b.ssim is not None else "SSIM reported, not enforced",
        *([f"prompt adherence at most {b.adherence_drop:g} below the baseline's"]
          if b.adherence_drop is not None else []),
        f"peak memory <= {b.memory_mb:g} MB" if b.memory_mb is not None else "no memory budget",
        f"noise rule {noise}" + (f", and at least {b.min_gain:.0%} faster" if b.min_gain else ""),
    ]
    return lines


def _jobs_line(ladder: Ladder) -> str:
    runs = f" ({ladder.launched_all_runs} over {ladder.runs} runs of this folder)" if ladder.runs > 1 else ""
    return (f"{ladder.recipes} recipes looked at, {ladder.launched} jobs launched by this run{runs}, "
            f"{ladder.reused} rows reused from the folder; the full grid has {ladder.grid_size} combinations. "
            f"Wall time {ladder.wall_s:.1f} s.")


def preset_notes(ladder: Ladder) -> str:
    """What the winner preset's comment says about how its speed-ups were measured and the load."""
    if ladder.interleaved:
        gains = [f"{s.axis}={s.kept.choices[s.axis]} {describe(s.kept.paired_on(s.incumbent))}"
                 for s in ladder.steps if s.changed]
        text = ("Measured interleaved; paired speed-ups per kept lever (95% interval): " + "; ".join(gains) + "."
                if gains else "Measured interleaved; no lever beat its current recipe beyond noise.")
    else:
        text = "Measured sequentially (one job after another; speed-ups compare rows taken at different times)."
    if (load := load_summary(ladder)):
        text += f" Machine load: {load}."
    if (warn := caution(ladder)):
        text += f" Caution: {warn}"
    return text


def _measurement_line(ladder: Ladder) -> str:
    if ladder.interleaved:
        return ("interleaved: each step's options were built in one process with the current recipe and their "
                "timed calls alternated (A B C, B C A, ...); speed-ups are medians of paired ratios with exact 95% "
                "intervals")
    return ("sequential: each recipe in its own job, one after another; speed-ups compare medians of rows taken "
            "at different times (hydra.sweeper.interleave=true pairs the calls)")


def _md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    esc = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(map(esc, r)) + " |" for r in rows]


def render_markdown(ladder: Ladder) -> str:
    w = ladder.winner
    walk = " → ".join(f"{k} {{{', '.join(ladder.axes[k])}}}" for k in ladder.order)
    out = ["# Ladder: the fastest recipe, one lever at a time", "",
           f"**Machine:** {_machine(ladder)}  ",
           f"**Axes, in walk order:** {walk}  ",
           f"**Fixed overrides:** {' '.join(ladder.fixed) or '(none)'}  ",
           "**Rules:** " + "; ".join(_rules(ladder)) + "  ",
           f"**Jobs:** {_jobs_line(ladder)}  ",
           f"**Measurement:** {_measurement_line(ladder)}  ",
           f"**Machine load:** {load_summary(ladder) or 'quiet: no row was busy or noisy'}", ""]
    if (warn := caution(ladder)):
        out += [f"**Caution:** {warn}", ""]
    out += _md_table(*ladder_table(ladder)) + [""]
    if w.ok:
        out.append(f"**Winner:** `{w.label(ladder.order)}`: {_s(w.median)}, {_x(ladder.speedup(w))} on the baseline, "
                   f"PSNR {_db(w.psnr_db)} dB, SSIM {_ssim(w.ssim)}.")
    if ladder.preset:
        out += ["", f"Preset: `{ladder.preset}`. Use it: `{preset_command(ladder.preset)}` "
                    f"(or copy it into conf/preset/ and use `+preset={ladder.preset.stem}`)."]
    out += ["", "## Every row tried", ""] + _md_table(*trials_table(ladder))
    if (notes := step_notes(ladder)):
        out += [""] + [f"{n}  " for n in notes]
    if ladder.second_pass:
        out += ["", "## Second pass: each kept lever dropped once from the winner", ""]
        out += _md_table(*second_pass_table(ladder))
    return "\n".join(out) + "\n"


def _html_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def render_html(ladder: Ladder) -> str:
    parts = ["<!doctype html><meta charset='utf-8'><title>sdbuild ladder</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}img{image-rendering:pixelated}</style>",
             "<h1>Ladder: the fastest recipe, one lever at a time</h1>",
             f"<p><b>Machine:</b> {html.escape(_machine(ladder))}"
             f"<br><b>Rules:</b> {html.escape('; '.join(_rules(ladder)))}"
             f"<br><b>Jobs:</b> {html.escape(_jobs_line(ladder))}"
             f"<br><b>Measurement:</b> {html.escape(_measurement_line(ladder))}"
             f"<br><b>Machine load:</b> {html.escape(load_summary(ladder) or 'quiet: no row was busy or noisy')}</p>"]
    if (warn := caution(ladder)):
        parts.append(f"<p style='color:#a40'><b>Caution:</b> {html.escape(warn)}</p>")
    parts.append(_html_table(*ladder_table(ladder)))
    images = [(label, m) for label, m in _kept_images(ladder) if m.image and m.folder]
    if images:  # image paths relative to the sweep folder, where ladder.html lives
        parts.append("<p>" + "".join(
            f"<figure style='display:inline-block'><img src='{html.escape(str(m.image.relative_to(m.folder.parent)))}' "
            f"width='128'><figcaption>{html.escape(label)}</figcaption></figure>" for label, m in images) + "</p>")
    if ladder.preset:
        parts.append(f"<p>Preset: <code>{html.escape(str(ladder.preset))}</code>: "
                     f"<code>{html.escape(preset_command(ladder.preset))}</code></p>")
    parts += ["<h2>Every row tried</h2>", _html_table(*trials_table(ladder))]
    parts += [f"<p>{html.escape(n)}</p>" for n in step_notes(ladder)]
    if ladder.second_pass:
        parts += ["<h2>Second pass</h2>", _html_table(*second_pass_table(ladder))]
    return "\n".join(parts) + "\n"


def _kept_images(ladder: Ladder) -> List[tuple[str, Measured]]:
    if ladder.baseline is None:
        return []
    out = [("baseline", ladder.baseline)]
    out += [(f"+ {s.axis}={s.kept.choices[s.axis]}", s.kept) for s in ladder.steps if s.changed]
    return out


def write_outputs(ladder: Ladder, sweep_dir: Path) -> Dict[str, Path]:
    from sdbuild.results import write_atomic

    paths = {"json": sweep_dir / "ladder.json", "md": sweep_dir / "ladder.md", "html": sweep_dir / "ladder.html"}
    write_atomic(paths["json"], json.dumps(to_json(ladder), indent=2, default=str))
    write_atomic(paths["md"], render_markdown(ladder))
    write_atomic(paths["html"], render_html(ladder))
    return paths


# ---------------------------------------------------------------------------------------------
# The winner as a preset


def spec_diff(wanted: Dict[str, Any], plain: Dict[str, Any]) -> Dict[str, Any]:
    """The leaves of spec dict `wanted` that differ from `plain` (nested like the spec), leaving out
    the keys that are not part of a recipe's identity (resume, cache_dir, isolate, preset...)."""
    from sdbuild.spec import _NOT_IDENTITY  # how a run is stored or measured, not what it builds

    out: Dict[str, Any] = {}
    for key, value in wanted.items():
        if key in _NOT_IDENTITY:
            continue
        other = plain.get(key)
        if isinstance(value, dict) and isinstance(other, dict):
            if (sub := spec_diff(value, other)):
                out[key] = sub
        elif value != other:
            out[key] = value
    return out


def preset_command(path: Path) -> str:
    """How to use a preset written outside conf/: add its parent's parent to Hydra's search path."""
    if path.parent.name == "preset":
        return f"python -m sdbuild hydra.searchpath=[file://{path.parent.parent.resolve()}] +preset={path.stem}"
    return f"cp {path} conf/preset/ && python -m sdbuild +preset={path.stem}"


def preset_yaml(name: str, choices: Dict[str, str], fields: Dict[str, Any], comment: str, path: Path) -> str:
    from omegaconf import OmegaConf

    lines = ["# @package _global_"]
    lines += [f"# {line}" for line in _wrap(comment)]
    lines += [f"#   {preset_command(path)}", "defaults:"]
    lines += [f"  - override /{group}: {option}" for group, option in choices.items()]
    body = OmegaConf.to_yaml(OmegaConf.create({**fields, "preset": name}))
    return "\n".join(lines) + "\n\n" + body


def _wrap(text: str, width: int = 98) -> List[str]:
    import textwrap

    return textwrap.wrap(text, width)
