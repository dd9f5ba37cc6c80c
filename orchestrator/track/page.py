"""The report page: one self-contained HTML file (images as data URIs, no script, no CDN), readable
offline, in MLflow's artifact view, and while the sweep still runs.

What a text-to-3D researcher compares first is what the models look like, so the page opens on the
top-K trials side by side (turntable per prompt, validation grids over steps, params with those that
differ from the best highlighted, ground-truth or CLIP metrics) with the worst trial beside them, then
a fan-out's grid of every prompt, then the study's plots, then every trial's objective.

The plots are Optuna's own (its matplotlib backend: history, parallel coordinates, parameter
importances, objective against each parameter); only what neither Optuna nor matplotlib draws as a
whole is drawn here: the HTML tables, the cross-sweep box plot (Optuna has no plot of objective
distributions across studies), and error bars.

A sweep with `replicates: R` trains each config with R seeds; a trial's objective is their mean and its
standard error (over the seeds) is stored beside it (`SEM`). Wherever such a trial's objective is shown,
the page shows both, as "15.30 ± 0.54", and its plots of the objective against a trial or a
hyperparameter draw the s.e. as error bars. Trials without replicates look as before.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from collections.abc import Callable
from typing import Any

from orchestrator.track.progress import format_duration, format_params
from orchestrator.track.report_data import HELD_OUT, LIVE_FRESH_S, SEM, TRAIN, Media, SweepReport, TrialView
from orchestrator.track.tracking import import_plotting

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1d1d1f; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.meta { color: #555; } .note { background: #fff6d6; border: 1px solid #e8d27a; padding: 6px 10px; margin: 8px 0; }
table { border-collapse: collapse; margin: 6px 0; } th, td { border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; }
th { background: #f5f5f7; text-align: left; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.side td { text-align: center; } .side th.role { text-align: center; }
.side .worst { background: #fdeeee; } .side .best { background: #eaf6ea; }
td.differs { background: #fff1b8; font-weight: 600; }
img.render { width: 128px; image-rendering: pixelated; display: block; margin: 0 auto; }
img.grid { height: 64px; image-rendering: pixelated; }
.strip { display: flex; flex-wrap: wrap; gap: 4px; max-width: 330px; }
.strip figure, .fan figure { margin: 0; } figcaption { font-size: 11px; color: #555; text-align: center; }
.fan { display: flex; flex-wrap: wrap; gap: 10px; } .fan figure { width: 170px; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; } .plots figure { margin: 0; }
.plots img { max-width: 560px; border: 1px solid #eee; }
.bar { background: #4c8bf5; height: 10px; display: inline-block; vertical-align: middle; }
.caption { font-size: 12px; color: #555; max-width: 170px; margin: 2px auto; }
.held-out { background: #eef3ff; } .held-out-mark, .train-mark { font-size: 11px; font-weight: 600; padding: 0 4px; border-radius: 3px; }
.held-out-mark { background: #3d6fd8; color: #fff; } .train-mark { background: #ddd; color: #333; }
"""


def data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.5g}" if math.isfinite(value) else str(value)
    return "-" if value is None else _esc(value)


def mean_sem(value: Any, sem: Any) -> str:
    """An objective as the page shows it: "15.30 ± 0.54" for a mean over seeds with its standard error
    (the s.e. to two significant figures, the mean to the same decimal place, as a measurement is
    written), or as any other number when there is no s.e. (one seed)."""
    finite = isinstance(value, float) and math.isfinite(value)
    if not finite or not isinstance(sem, int | float) or not math.isfinite(sem) or sem < 0:
        return _num(value)
    if sem == 0:  # seeds that agree exactly: nothing to round to
        return f"{value:.5g} ± 0"
    decimals = max(0, 1 - math.floor(math.log10(sem)))
    return f"{value:.{decimals}f} ± {sem:.{decimals}f}"


def _objective(row: dict[str, Any]) -> str:
    """A row's objective, with its s.e. when the trial has replicates."""
    return mean_sem(row.get("objective"), row.get(SEM))


def _img(media: Media | None, css: str, alt: str) -> str:
    if media is None:
        return '<span class="meta">(none logged)</span>'
    return f'<img class="{css}" src="{data_uri(media.mime, media.data)}" alt="{_esc(alt)}">'


# -------------------------------------------------------------------------------------------------
# Plots: Optuna's matplotlib backend, as PNG data


def figure_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return buffer.getvalue()


def importance_evaluator(n_complete: int):
    """Optuna's PED-ANOVA: which params it takes to reach the top trials. It needs only numpy, where
    fANOVA (Optuna's default) fits scikit-learn random forests: importing those alone took seconds per
    report here, and on the handful of trials of a small sweep neither is more than a hint. The top
    quantile is widened so that it holds two trials at least (PED-ANOVA's default, 10 %, would hold
    one trial in a sweep of under 20)."""
    from optuna.importance import PedAnovaImportanceEvaluator

    return PedAnovaImportanceEvaluator(target_quantile=max(0.1, min(0.5, 2 / max(1, n_complete))))


def _replicated(trials) -> bool:
    return any(t.user_attrs.get(SEM) is not None for t in trials)


def history_with_error_bars(study):
    """Optuna's optimisation history, each replicated trial's point given its error bar (± s.e.)."""
    _, ovm = import_plotting()
    ax = ovm.plot_optimization_history(study)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    ax.errorbar(
        [t.number for t in complete],
        [t.value for t in complete],
        yerr=[t.user_attrs.get(SEM) or 0.0 for t in complete],
        fmt="none",
        ecolor="#333",
        capsize=3,
        label="± s.e. over seeds",
    )
    ax.legend(loc="best", fontsize=8)
    return ax


def slice_with_error_bars(study):
    """The objective against each searched parameter, every trial a point with its error bar (± s.e.
    over its seeds): Optuna's slice plot, which has no error bars, redrawn with them."""
    from matplotlib.ticker import NullFormatter
    from optuna.distributions import CategoricalDistribution

    plt, _ = import_plotting()
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    names = sorted({name for t in complete for name in t.params})
    figure, axes = plt.subplots(
        1, len(names), sharey=True, squeeze=False, figsize=(max(4.0, 3.2 * len(names)), 3.6)
    )
    for ax, name in zip(axes[0], names, strict=True):
        trials = [t for t in complete if name in t.params]
        xs = [t.params[name] for t in trials]
        distribution = trials[0].distributions[name]
        if isinstance(distribution, CategoricalDistribution):
            choices = list(distribution.choices)
            xs = [choices.index(x) for x in xs]
            ax.set_xticks(range(len(choices)), [str(c) for c in choices])
            ax.set_xlim(-0.5, len(choices) - 0.5)
        elif getattr(distribution, "log", False):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap on a narrow axis
        ax.errorbar(
            xs,
            [t.value for t in trials],
            yerr=[t.user_attrs.get(SEM) or 0.0 for t in trials],
            fmt="o",
            color="#4c8bf5",
            ecolor="#333",
            capsize=3,
        )
        ax.set_xlabel(name)
    axes[0][0].set_ylabel("objective (mean ± s.e. over seeds)")
    figure.suptitle("Objective against each parameter")
    return axes


def study_plots(study, kind: str) -> tuple[dict[str, bytes], list[str]]:
    """Title -> PNG of each plot the study supports now, and a note for each it cannot draw yet."""
    plt, ovm = import_plotting()
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"] if study else []
    if not complete:
        return {}, ["The plots appear once a trial has finished."]
    searched = kind == "search" and bool(set(complete[0].params))
    replicated = _replicated(complete)
    plots: dict[str, Callable] = {"Optimisation history": ovm.plot_optimization_history}
    if replicated:
        plots = {"Optimisation history (± s.e. over seeds)": history_with_error_bars}
    notes = []
    if searched and len(complete) > 1:
        plots["Parallel coordinates"] = ovm.plot_parallel_coordinate
        plots["Parameter importances (PED-ANOVA)"] = lambda s: ovm.plot_param_importances(
            s, evaluator=importance_evaluator(len(complete))
        )
        if replicated:
            plots["Objective against each parameter (± s.e. over seeds)"] = slice_with_error_bars
        else:
            plots["Objective against each parameter"] = ovm.plot_slice
    elif searched:
        notes.append("Parallel coordinates, importances and slices need two finished trials.")
    drawn = {}
    for title, plot in plots.items():
        try:
            axes = plot(study)
        except (ValueError, RuntimeError, TypeError, ZeroDivisionError) as exc:
            notes.append(f"{title}: not drawn ({exc}).")
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        drawn[title] = figure_png(figure)
        plt.close(figure)
    return drawn, notes


def comparison_plots(reports: list[SweepReport]) -> dict[str, bytes]:
    plt, ovm = import_plotting()
    drawn = {}
    # Optuna draws one study's values; their distributions side by side is a plain matplotlib box plot.
    values = [[r["objective"] for r in rep.rows if _finished(r)] for rep in reports]
    if any(values):
        figure, ax = plt.subplots(figsize=(1.6 + 1.4 * len(reports), 3.6))
        ax.boxplot([v or [math.nan] for v in values], showmeans=True)
        ax.set_xticks(range(1, len(reports) + 1), [rep.name for rep in reports])
        for i, v in enumerate(values, start=1):
            ax.plot([i] * len(v), v, "o", alpha=0.5, color="#4c8bf5")
        objective = reports[0].objective
        ax.set_ylabel(
            f"{objective['metric']} ({'higher' if objective['mode'] == 'max' else 'lower'} is better)"
        )
        ax.set_title("Objective of every finished trial, per sweep")
        drawn["Objective per sweep"] = figure_png(figure)
        plt.close(figure)
    studies = [rep.study for rep in reports if rep.study is not None]
    if len(studies) > 1 and all(any(t.state.name == "COMPLETE" for t in s.trials) for s in studies):
        axes = ovm.plot_optimization_history(studies)
        drawn["Optimisation histories"] = figure_png(axes.figure)
        plt.close(axes.figure)
    return drawn


def _finished(row: dict[str, Any]) -> bool:
    value = row.get("objective")
    return row.get("state") == "FINISHED" and isinstance(value, float) and math.isfinite(value)


# -------------------------------------------------------------------------------------------------
# Sections (HTML by hand: a table of images is what no plotting library draws)


def side_by_side(views: list[TrialView], objective: dict[str, str], sweep_column: bool = False) -> str:
    """Trials as columns; rows: turntable per prompt, validation grids per prompt, params, metrics."""
    if not views:
        return '<p class="meta">No finished trial to show yet.</p>'
    best = views[0]
    head = ["<tr><th></th>"]
    for v in views:
        css = "worst" if v.role == "worst" else "best" if v.role == "best" else ""
        where = f"{_esc(v.row.get('sweep'))} · " if sweep_column else ""
        head.append(
            f'<th class="role {css}">{_esc(v.role)}<br>{where}trial {_esc(v.row["trial"])}<br>'
            f"{_esc(objective['metric'])} = {_objective(v.row)}</th>"
        )
    rows = ["".join(head) + "</tr>"]
    n_prompts = max(len(v.turntables) for v in views)
    for i in range(n_prompts):
        prompt = _label(best, i)
        cells = []
        for v in views:
            media = v.turntables[i] if i < len(v.turntables) else None
            differs = _label(v, i) != prompt
            caption = f'<div class="caption">{_esc(_label(v, i))}</div>' if differs else ""
            alt = f"turntable: {_label(v, i)}"
            cells.append(f"<td{_group_class(v, i)}>{_img(media, 'render', alt)}{caption}</td>")
        rows.append(
            f"<tr><th{_group_class(best, i)}>turntable<br>{_prompt_html(best, i)}</th>{''.join(cells)}</tr>"
        )
    for i in range(n_prompts):
        cells = []
        for v in views:
            grids = v.validation[i] if i < len(v.validation) else []
            alt = f"validation: {_label(v, i)}"
            strip = "".join(
                f"<figure>{_img(m, 'grid', f'{alt}, {m.caption}')}<figcaption>{_esc(m.caption)}</figcaption></figure>"
                for m in grids
            )
            cells.append(f'<td{_group_class(v, i)}><div class="strip">{strip or "(none logged)"}</div></td>')
        rows.append(
            f"<tr><th{_group_class(best, i)}>validation over steps<br>{_prompt_html(best, i)}</th>{''.join(cells)}</tr>"
        )
    keys = list(dict.fromkeys(k for v in views for k in v.row.get("params", {})))
    for key in keys:
        reference = best.row["params"].get(key)
        cells = []
        for v in views:
            value = v.row["params"].get(key)
            differs = v is not best and value != reference
            cells.append(f'<td class="num{" differs" if differs else ""}">{_num(value)}</td>')
        rows.append(f"<tr><th>{_esc(key)}</th>{''.join(cells)}</tr>")
    metrics = list(dict.fromkeys(k for v in views for k in v.metrics))
    for key in metrics:
        cells = "".join(f'<td class="num">{_num(v.metrics.get(key))}</td>' for v in views)
        rows.append(f"<tr><th>{_esc(key)}</th>{cells}</tr>")
    seeds = (
        " A value shown as mean ± s.e. is the mean over the trial's seeds and its standard error."
        if any(v.row.get(SEM) is not None for v in views)
        else ""
    )
    legend = (
        '<p class="meta">Highlighted params differ from the best trial\'s. '
        f"{_esc(objective['metric'])}: {'higher' if objective['mode'] == 'max' else 'lower'} is better "
        f"({_how_scored(views, objective)}).{seeds}</p>"
    )
    return f'<table class="side">{"".join(rows)}</table>{legend}'


def _amortized(view: TrialView) -> bool:
    return view.row.get("trainer") == "amortized"


def _how_scored(views: list[TrialView], objective: dict[str, str]) -> str:
    per_prompt = f"{_esc(objective['aggregate'])} over each trial's prompts"
    amortized = "an amortized trial's generator, on its evaluation prompts"
    kinds = {_amortized(v) for v in views}
    return " or ".join(text for flag, text in ((False, per_prompt), (True, amortized)) if flag in kinds)


def _aggregated(rep: SweepReport) -> str:
    """How a trial's objective is one number: over its prompts, or (amortized) its generator's own;
    then, with replicates, the mean over its seeds with its standard error."""
    prompts = "" if rep.trainer == "amortized" else f", {_esc(rep.objective['aggregate'])} over the prompts"
    seeds = f", mean ± s.e. over {rep.replicates} seeds" if rep.replicates > 1 else ""
    return prompts + seeds


def _label(view: TrialView, i: int) -> str:
    """Row i's prompt, with "held-out: " before a prompt the trial's generator never trained on."""
    prompt = view.prompt(i)
    return f"held-out: {prompt}" if view.group(i) == HELD_OUT else prompt


def _prompt_html(view: TrialView, i: int) -> str:
    if view.group(i) == HELD_OUT:
        return f'<span class="held-out-mark">held-out</span> {_esc(view.prompt(i))}'
    if view.group(i) == TRAIN:
        return f'<span class="train-mark">trained on</span> {_esc(view.prompt(i))}'
    return _esc(view.prompt(i))


def _group_class(view: TrialView, i: int) -> str:
    return ' class="held-out"' if view.group(i) == HELD_OUT else ""


def fanout_grid(views: list[TrialView], objective: dict[str, str]) -> str:
    figures = []
    for v in views:
        media = v.turntables[0] if v.turntables else None
        figures.append(
            f"<figure>{_img(media, 'render', v.role)}<figcaption>{_esc(v.role)}<br>"
            f"{_esc(objective['metric'])} = {_objective(v.row)}</figcaption></figure>"
        )
    return f'<div class="fan">{"".join(figures)}</div>'


def trials_table(rep: SweepReport) -> str:
    """Every trial's objective (a bar: longer is better), state, params and prompts, best first."""
    values = [r["objective"] for r in rep.rows if _finished(r)]
    low, high = (min(values), max(values)) if values else (0.0, 0.0)
    heading = "objective (mean ± s.e.)" if any(r.get(SEM) is not None for r in rep.rows) else "objective"
    rows = [f"<tr><th>trial</th><th>state</th><th>{heading}</th><th></th><th>params</th><th>run</th></tr>"]
    for r in rep.rows:
        value = r.get("objective")
        bar = ""
        if _finished(r):
            share = 1.0 if high == low else (value - low) / (high - low)
            share = share if rep.objective["mode"] == "max" else 1.0 - share
            bar = f'<span class="bar" style="width:{int(8 + 150 * share)}px"></span>'
        rows.append(
            f"<tr><td class='num'>{_num(r['trial'])}</td><td>{_esc(r['state'])}</td>"
            f"<td class='num'>{_objective(r)}</td><td>{bar}</td>"
            f"<td>{_esc(format_params(r.get('params') or {}, limit=8))}</td>"
            f"<td class='meta'>{_esc(r['run_id'])}</td></tr>"
        )
    return f"<table>{''.join(rows)}</table>"


def _plots_html(plots: dict[str, bytes]) -> str:
    figures = [
        f'<figure><img src="{data_uri("image/png", png)}" alt="{_esc(title)}">'
        f"<figcaption>{_esc(title)}</figcaption></figure>"
        for title, png in plots.items()
    ]
    return f'<div class="plots">{"".join(figures)}</div>'


def _live_html(rep: SweepReport) -> str:
    live = rep.live
    if not live or live.get("finished") or live.get("age_s", math.inf) > LIVE_FRESH_S:
        return ""
    trials = "; ".join(
        f"trial {t['trial']} step {t['step']}/{t['total'] or '?'} ETA {format_duration(t['eta_s'])}"
        for t in live.get("trials", [])
    )
    return (
        f'<p class="note">Running: {live["running"]} trial(s), done {live["done"]}/{live["total"]}, '
        f"sweep ETA {format_duration(live.get('eta_s'))}. {_esc(trials)}</p>"
    )


def sweep_section(rep: SweepReport, top: int) -> str:
    s = rep.summary
    counts = {}
    for r in rep.rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    states = ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items())) or "no trial yet"
    parts = [
        f"<h2>Sweep {_esc(rep.name)}</h2>",
        f'<p class="meta">{_esc(rep.kind)} · {_esc(rep.trainer)} · objective {_esc(rep.objective["metric"])} '
        f"({_esc(rep.objective['mode'])}{_aggregated(rep)}) · "
        f"{len(rep.rows)} trials: {_esc(states)} · best {mean_sem(s.get('best'), s.get('best_sem'))}, "
        f"median {_num(s.get('median'))}"
        f" · parent run {_esc(rep.parent_run_id)}</p>",
        _live_html(rep),
        *(f'<p class="note">{_esc(n)}</p>' for n in rep.notes),
        f"<h3>Top {top} side by side{', and the worst' if any(v.role == 'worst' for v in rep.shown) else ''}</h3>",
        side_by_side(rep.shown, rep.objective),
    ]
    if rep.kind == "fanout":
        parts += [
            f"<h3>Every prompt ({len(rep.fanout)} finished)</h3>",
            fanout_grid(rep.fanout, rep.objective),
        ]
    plots, notes = study_plots(rep.study, rep.kind)
    parts += ["<h3>The study</h3>", *(f'<p class="meta">{_esc(n)}</p>' for n in notes), _plots_html(plots)]
    parts += ["<h3>Every trial</h3>", trials_table(rep)]
    return "\n".join(parts)


def comparison_section(reports: list[SweepReport], comparison: dict[str, Any], joint: list[TrialView]) -> str:
    objective = comparison["objective"]
    head = "".join(
        f"<th>{c}</th>" for c in ["sweep", "trials", "finished", "best", "q1", "median", "q3", "worst"]
    )
    rows = [f"<tr>{head}</tr>"]
    for s in comparison["sweeps"]:
        cells = [f"<td>{_esc(s['sweep'])}</td>", f"<td class='num'>{s['trials']}</td>"]
        cells += [f"<td class='num'>{s['finished']}</td>"]
        cells += [f"<td class='num'>{mean_sem(s['best'], s.get('best_sem'))}</td>"]
        cells += [f"<td class='num'>{_num(s[k])}</td>" for k in ["q1", "median", "q3", "worst"]]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    trainers = sorted({rep.trainer for rep in reports})
    mixed = (
        '<p class="note">These sweeps mix per-prompt and amortized trials: a per-prompt trial\'s rows are '
        "its panel's prompts, an amortized trial's are its generator's evaluation prompts (held-out ones "
        "marked); a cell whose prompt is not the row's names its own.</p>"
        if len(trainers) > 1
        else ""
    )
    return "\n".join(
        [
            f"<h2>{len(reports)} sweeps compared on {_esc(objective['metric'])} ({_esc(objective['mode'])})</h2>",
            mixed,
            f"<table>{''.join(rows)}</table>",
            _plots_html(comparison_plots(reports)),
            f"<h3>Joint top {len(joint)} across the sweeps</h3>",
            side_by_side(joint, objective, sweep_column=True),
        ]
    )


def render(
    reports: list[SweepReport],
    *,
    top: int = 3,
    comparison: dict[str, Any] | None = None,
    joint: list[TrialView] | None = None,
) -> str:
    names = ", ".join(rep.name for rep in reports)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    body = [f"<h1>dreamsweep report: {_esc(names)}</h1>", f'<p class="meta">generated {_esc(stamp)}</p>']
    if comparison is not None:
        body.append(comparison_section(reports, comparison, joint or []))
    body += [sweep_section(rep, top) for rep in reports]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>dreamsweep report: {_esc(names)}</title><style>{CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )
