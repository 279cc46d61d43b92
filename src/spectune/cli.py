"""The ``spectune`` command line: one sub-command per pipeline stage."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Spectral-guided fine-tuning toolkit.")


class _Consoles:
    """Made on use, so the streams are the ones in force when a command runs (tests swap them)."""

    @property
    def err(self) -> Console:
        return Console(stderr=True)

    @property
    def out(self) -> Console:
        # tables are the command's output; a pipe gets a readable width rather than rich's 80 columns
        c = Console()
        return c if c.is_terminal else Console(width=160)


_c = _Consoles()


@app.callback()
def _main() -> None:
    """spectune: analyze weight spectra, plan per-layer decisions, train, compare."""
    import logging

    # bitsandbytes (imported by peft when installed) warns at import that an optional CPU kernel package is
    # missing; a newcomer's terminal should show spectune's lines, and real bitsandbytes errors still show
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _fmt(v: object) -> str:
    """A table cell: numbers in 4 significant digits, text printed literally (a name may hold '[/x]')."""
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4g}"
    return escape(str(v))


def _error(err: object) -> None:
    """An error line; the message is printed literally (paths and names may look like rich markup)."""
    _c.err.print(f"[red]error:[/] {escape(str(err))}")


def _table(title: str, df, columns: list[str]) -> Table:  # type: ignore[no-untyped-def]
    t = Table(title=escape(title), show_lines=False)
    for c in columns:
        left = c in ("module_type", "name", "status", "task", "method", "vs", "verdict", "id", "claim")
        t.add_column(c, justify="left" if left else "right", no_wrap=c in ("method", "vs", "verdict", "difference [95% CI]", "95% CI"))
    for rec in df[columns].to_dict(orient="records"):
        t.add_row(*(_fmt(rec[c]) for c in columns))
    return t


@app.command()
def analyze(
    model: Annotated[str, typer.Argument(help="alias (minilm, smollm2-135m, gemma3-270m), HF folder, .safetensors or .gguf file")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")] = Path("out/analysis"),
    include: Annotated[Optional[list[str]], typer.Option("--include", help="regex; analyze only matching names")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="regex; skip matching names")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    dtype: Annotated[str, typer.Option(help="spectrum precision: float64 | float32")] = "float64",
    method: Annotated[str, typer.Option(help="gram (eigvalsh of W^T W) | svd (svdvals)")] = "gram",
    randomize: Annotated[bool, typer.Option(help="also compute rand_distance")] = False,
    tw_margin: Annotated[bool, typer.Option(help="Tracy-Widom margin above the MP edge (off: the plain edge, which "
                                            "invents spikes in pure noise)")] = True,
    ce_mode: Annotated[str, typer.Option(help="histogram | elementwise")] = "histogram",
    alpha_estimator: Annotated[str, typer.Option(help="alpha fits on the matrix's spectrum (hill) or on pooled "
                                                      "fixed-aspect-ratio windows (farms)")] = "hill",
    uncertainty: Annotated[str, typer.Option(help="95% interval of every alpha: asymptotic | bootstrap[:B] "
                                                  "(B >= 20 resamples, default 200)")] = "asymptotic",
    esd: Annotated[str, typer.Option(help="ESD plots: summary | all | none")] = "summary",
    report: Annotated[bool, typer.Option(help="write plots and report.html")] = True,
    trust_remote_code: Annotated[bool, typer.Option(help="allow model code from the folder")] = False,
) -> None:
    """Compute per-matrix spectral metrics and write tables, plots and an HTML report.

    Under ``torchrun --nproc_per_node N -m spectune.cli analyze ...`` the matrices are
    split across the N processes and rank 0 writes the one table."""
    from pydantic import ValidationError

    from spectune.analyze import AnalysisConfig, SourceError
    from spectune.analyze import analyze as run_analysis
    from spectune.analyze.distributed import launched_ranks

    try:
        cfg = AnalysisConfig(
            include=include or [],
            exclude=exclude or [],
            device=device,
            dtype=dtype,
            method=method,
            randomize=randomize,
            tw_margin=tw_margin,
            ce_mode=ce_mode,
            alpha_estimator=alpha_estimator,
            uncertainty=uncertainty,
            trust_remote_code=trust_remote_code,
        )
    except ValidationError as err:
        first = err.errors()[0]
        raise typer.BadParameter(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    try:
        with launched_ranks() as ranks:
            result = run_analysis(model, cfg, ranks=ranks)
    except (SourceError, ValueError, RuntimeError) as err:
        _error(err)
        raise typer.Exit(2) from None
    if ranks is not None and ranks.rank != 0:
        return  # every rank holds the table; one writes it
    result.save(out)
    written = ["metrics.parquet", "metrics.csv", "summary.json", "spectra.npz"]
    if report:
        from spectune.analyze.report import write_report

        path = write_report(result, out, esd=esd)
        written.append(str(path.relative_to(out)))
    summary = result.summary()["model"]
    by_type = result.by_module_type()
    cols = [c for c in ["module_type", "count", "stable_rank", "alpha_hill", "alpha", "num_spikes", "snr", "cs_metric"] if c in by_type]
    _c.out.print(_table(f"mean metrics by module type (status ok; alpha estimator {result.alpha_estimator})", by_type, cols))
    for col, c in summary.get("alpha_flags", {}).items():
        named = ", ".join(f"{k} {v}" for k, v in c.items() if k not in ("of", "any"))
        _c.out.print(f"{col} flags ({result.alpha_uncertainty} intervals): {c['any']} of {c['of']} fits flagged: {named}",
                     markup=False)
    bad = result.metrics[result.metrics["status"] != "ok"]
    if len(bad):
        _c.out.print(_table("matrices without full metrics", bad, ["name", "status", "note"]))
    counts = ", ".join(f"{k}={v}" for k, v in summary["status_counts"].items())
    _c.out.print(
        f"{summary['n_matrices']} matrices ({counts}), {summary['n_parameters']:,} parameters, "
        f"{result.timings.get('total_s', 0):.1f} s -> {out}/ ({', '.join(written)})", markup=False
    )


def _parse_sets(pairs: list[str]) -> dict[str, object]:
    """--set key=value pairs; values are read as YAML scalars/lists (1, 0.5, true, [svd, cs])."""
    import yaml

    out: dict[str, object] = {}
    for item in pairs:
        if "=" not in item:
            raise typer.BadParameter(f"--set expects key=value, got '{item}'")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _plan_estimator(value: str | None) -> str | None:
    """--alpha-estimator of ``spectune plan``, checked before any analysis runs."""
    from spectune.analyze.powerlaw import ESTIMATORS

    if value is not None and value not in ESTIMATORS:
        raise typer.BadParameter(f"alpha_estimator: '{value}' is not an alpha estimator; choose one of {', '.join(ESTIMATORS)}")
    return value


@app.command()
def plan(
    model: Annotated[Optional[str], typer.Argument(help="model as in analyze (omit with --from-analysis)")] = None,
    policy: Annotated[str, typer.Option("--policy", "-p", help="uniform | phased | alpha-balance | adaptive-rank | select | "
                                        "random-select | stable-rank | alpha-decay | by-type")] = "uniform",
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="policy parameter key=value (repeatable)")] = None,
    from_analysis: Annotated[Optional[Path], typer.Option(help="reuse a saved analysis folder")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="plan file to write")] = Path("plan.yaml"),
    fmt: Annotated[str, typer.Option("--format", help="spectune | peft | axolotl")] = "spectune",
    base_lr: Annotated[Optional[float], typer.Option(help="base learning rate for axolotl lr_groups")] = None,
    alpha_estimator: Annotated[Optional[str], typer.Option(help="hill | farms: the alpha the analysis fits (default: hill "
                                                                "for MODEL, the saved one for --from-analysis)")] = None,
) -> None:
    """Turn an analysis into per-layer decisions and write them as a plan file."""
    from spectune.analyze import AnalysisResult, SourceError
    from spectune.analyze import analyze as run_analysis
    from spectune.plan import PlanError, axolotl_fragment, peft_kwargs, plan_table
    from spectune.plan import plan as make_plan

    if (model is None) == (from_analysis is None):
        raise typer.BadParameter("give either MODEL or --from-analysis DIR")
    if out.suffix.lower() in (".html", ".htm"):
        raise typer.BadParameter(f"--out {out}: the plan's HTML report is written beside the plan as "
                                 f"{out.with_suffix('.html').name}; give the plan file another suffix (.yaml, .json)")
    estimator = _plan_estimator(alpha_estimator)
    try:
        if from_analysis:
            result = AnalysisResult.load(from_analysis)
            if estimator is not None and result.alpha_estimator != estimator:
                raise PlanError(f"--alpha-estimator {estimator}: the analysis in {from_analysis} fitted alpha with "
                                f"{result.alpha_estimator}; run `spectune analyze --alpha-estimator {estimator}` "
                                "or plan from the model")
        else:
            result = run_analysis(model, alpha_estimator=estimator or "hill")
        p = make_plan(result, policy, _parse_sets(set_ or []))
        if fmt == "spectune":
            p.save(out)
        elif fmt == "peft":
            from spectune import _io

            _io.write_json(out, peft_kwargs(p))
        elif fmt == "axolotl":
            from spectune import _io

            _io.write_text(out, axolotl_fragment(p, base_lr))
        else:
            raise typer.BadParameter(f"--format must be spectune, peft or axolotl, not '{fmt}'")
    except (PlanError, SourceError, FileNotFoundError) as err:
        _error(err)
        raise typer.Exit(2) from None
    from spectune.plan.report import write_plan_report

    html_path = write_plan_report(p, result, out.with_suffix(".html"))
    table = plan_table(p, result)
    cols = [c for c in ["name", "module_type", "lr_scale", "wd_scale", "trainable", "lora_rank"] if c in table]
    if "wd_scale" in cols and set(p.wd_scale.values()) <= {1.0}:
        cols.remove("wd_scale")  # a plan that leaves every decay at the base value shows no decay column
    if "alpha_used" in table:  # an alpha-driven plan: the alpha it read, its 95% interval, flags and the value used
        metric = table.attrs["alpha_metric"]
        table["alpha [95% CI]"] = [f"{a:.3g} [{lo:.3g}, {hi:.3g}]" if a == a else "-"
                                   for a, lo, hi in zip(table[metric], table[f"{metric}_lo"], table[f"{metric}_hi"])]
        cols += ["alpha [95% CI]", f"{metric}_flags", "alpha_used"]
    _c.out.print(_table(f"plan: policy {policy} on {p.model} (alpha estimator {p.alpha_estimator})", table, cols))
    for note in p.notes:
        _c.out.print(f"- {note}", markup=False)
    if p.excluded:
        _c.out.print(f"- base rate kept for {len(p.excluded)} matrices without the metric: {', '.join(p.excluded[:5])}",
                     markup=False)
    _c.out.print(f"plan written to {out} ({fmt}); table and plots: {html_path}", markup=False)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def train(
    config: Annotated[Path, typer.Argument(help="training config YAML (see examples/)")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key.path=value overrides")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the run folder's last usable checkpoint")] = False,
    allow_config_change: Annotated[bool, typer.Option(
        "--allow-config-change", help="with --resume: continue under a config that differs from the stored one "
        "(the change is recorded in summary.json)")] = False,
) -> None:
    """Fine-tune a model as configured, with a spectral plan applied and re-planned between epochs."""
    from spectune.plan import PlanError
    from spectune.train import TrainConfigError, load_config
    from spectune.train.checkpoints import CheckpointError
    from spectune.train.run import TrainingDiverged, run

    try:
        cfg = load_config(config, overrides or [])
        result = run(cfg, resume=resume, allow_config_change=allow_config_change)
    except (TrainConfigError, PlanError, FileNotFoundError, FileExistsError, ValueError, TrainingDiverged,
            CheckpointError) as err:
        _error(err)
        raise typer.Exit(2) from None
    import os

    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every rank returns; one prints
        return
    t = Table(title=escape(f"run {result.run_dir}"))
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in result.metrics.items():
        if any(k.startswith(p) for p in ("test_", "validation_", "train_", "training_loss", "gap_")) and not k.endswith(("runtime", "per_second")):
            t.add_row(escape(k), _fmt(v))
    _c.out.print(t)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="a finished training run folder (output.dir)")],
    merged: Annotated[Path, typer.Option("--merged", help="write the merged model here: a standard Hugging Face "
                                         "folder with the tokenizer")],
) -> None:
    """Merge a run's adapters into its base (QLoRA: into the dequantized base) and save a plain model folder."""
    from spectune.train import TrainConfigError
    from spectune.train.merge import MergeError, export_merged

    try:
        out = export_merged(run_dir, merged)
    except (MergeError, TrainConfigError, FileNotFoundError) as err:
        _error(err)
        raise typer.Exit(2) from None
    _c.out.print(f"merged model written to {escape(str(out))}")


def _comparison_table(title: str, rows, width: int) -> tuple[Table, list[str]]:  # type: ignore[no-untyped-def]
    """The results table fitted to ``width``: low-value columns dropped first, task and mean never cut."""
    from spectune.compare.console import NEVER_CUT, fit_columns

    cells = rows.map(_fmt)
    columns = fit_columns(cells, width)
    t = Table(title=escape(title))
    for c in columns:
        whole = c in NEVER_CUT
        t.add_column(c, justify="left" if c in ("task", "method", "vs", "verdict", "front") else "right",
                     no_wrap=whole, overflow="fold", min_width=max([len(c)] + [len(v) for v in cells[c]]) if whole else None)
    for rec in cells[columns].to_dict(orient="records"):
        t.add_row(*(rec[c] for c in columns))
    return t, [c for c in rows.columns if c not in columns]


def _print_comparison(result) -> None:  # type: ignore[no-untyped-def]
    import pandas as pd

    from spectune.compare.console import console_rows

    rows = pd.DataFrame(console_rows(result.tables["summary"], result.tables["paired"], result.tables.get("front")))
    if rows.empty:
        _c.out.print("no finished cell")
        return
    out = _c.out
    table, left_out = _comparison_table("results (test split; 95% intervals over seeds; paired differences to the "
                                        "baseline; peak memory; front: on the quality-memory front)", rows, out.width)
    out.print(table)
    if left_out:
        out.print(f"(left out for the width: {', '.join(left_out)}; every column is in summary.csv and the report)",
                  markup=False)
    for line in result.advice:
        out.print(f"recommended: {line}", markup=False, highlight=False)
    for line in result.exported:
        out.print(f"exported: {line}", markup=False, highlight=False)
    failed = result.results[result.results["status"] != "ok"] if "status" in result.results else []
    if len(failed):
        out.print(f"[red]{len(failed)} cell(s) failed[/]: see failed.json in their folders")
    out.print(f"report: {result.report}", markup=False)


def _run_comparison(cfg, command: str, search_only: bool = False, worker: bool = False,  # type: ignore[no-untyped-def]
                    workers: int = 1, report_only: bool = False, budgets_mb: list[float] | None = None,
                    export_dir: Path | None = None) -> None:
    from spectune.compare.grid import StaleCell
    from spectune.compare.run import compare as run_compare, search_only as run_search_only, work
    from spectune.compare.search import SearchError

    def line(text: str) -> None:
        _c.out.print(text, highlight=False, markup=False)

    try:
        if worker:
            work(cfg)
            return
        if search_only:
            found = run_search_only(cfg, on_line=line)
            _c.out.print(f"search worker done: {len(found.trials)} trials recorded under {cfg.output_dir}/search/", markup=False)
            return
        def cell_line(cell, row) -> None:  # type: ignore[no-untyped-def]
            # without a terminal (a log file, CI) the bar is off: one line per finished cell instead
            score = next((f"{k} {row[k]:.4f}" for k in ("test_accuracy", "test_perplexity") if row.get(k) is not None), "")
            line(f"cell {cell.label}: {row.get('status')} {score} ({row.get('wall_time_s') or 0:.0f} s)")

        terminal = _c.out.is_terminal
        result = run_compare(cfg, progress=terminal, command=command, on_line=line, on_cell=None if terminal else cell_line,
                             workers=workers, report_only=report_only, budgets_mb=budgets_mb, export_dir=export_dir)
    except (StaleCell, SearchError) as err:
        _error(err)
        raise typer.Exit(2) from None
    _print_comparison(result)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def compare(
    config: Annotated[Path, typer.Argument(help="comparison YAML: base, tasks, methods, seeds (see examples/)")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key.path=value overrides")] = None,
    search_only: Annotated[bool, typer.Option(
        "--search-only", help="be one more search worker on the shared storage (search.storage) and exit when the "
        "budget is spent; the process without this flag runs the final cells")] = False,
    workers: Annotated[int, typer.Option("--workers", min=1, help="processes in all, one torch thread each; they "
                                         "share the search trials and the cells through the output folder")] = 1,
    worker: Annotated[bool, typer.Option("--worker", hidden=True, help="a helper started by --workers")] = False,
    report_only: Annotated[bool, typer.Option("--report-only", help="train nothing: write the tables and report of "
                                              "the cells and trials finished so far")] = False,
    budget: Annotated[Optional[list[str]], typer.Option(
        "--budget", help="a peak-memory budget (4GB, 512MB; repeatable): one recommendation per task and budget, the "
        "least-memory method nothing within it beats significantly (default: along the quality-memory front)")] = None,
    export_best: Annotated[Optional[Path], typer.Option(
        "--export-best", help="write each task's recommended method (within the first --budget) to DIR/<task>/: its "
        "full training config with the searched values (for spectune train) and, for adapters, adapter_config.json")] = None,
) -> None:
    """Run a grid of methods x tasks x seeds (resuming finished cells) and report paired statistics.

    With a ``search:`` section every method is first tuned on validation with the same budget."""
    from spectune.compare import load_compare_config
    from spectune.train import TrainConfigError

    from spectune.compare.pareto import parse_budget

    try:
        cfg = load_compare_config(config, overrides or [])
        budgets_mb = [parse_budget(b) for b in budget or []]
    except (TrainConfigError, ValueError) as err:
        _error(err)
        raise typer.Exit(2) from None
    _run_comparison(cfg, " ".join(["spectune compare", str(config), *(overrides or [])]), search_only, worker, workers,
                    report_only, budgets_mb or None, export_best)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")] = Path("out/demo"),
    seeds: Annotated[int, typer.Option(min=1, help="number of seeds (3 keeps it under 6 minutes on 2 cores)")] = 3,
    workers: Annotated[int, typer.Option(min=0, help="processes, one torch thread each (0: 2 where there are 2 cores)")] = 0,
) -> None:
    """The main job: MiniLM on TREC in the low-data regime, spectral rates vs a tuned uniform baseline, over seeds."""
    import os

    from spectune.compare.demo import demo_config

    cfg = demo_config(str(out), seeds)
    workers = workers or min(2, os.cpu_count() or 1)
    _c.out.print(f"[bold]{escape(cfg.name)}[/]: {len(cfg.methods)} methods x {len(cfg.seeds)} seeds, "
                 f"{workers} worker process(es) -> {escape(str(out))}/")
    _run_comparison(cfg, f"spectune demo --out {out} --seeds {seeds}", workers=workers)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def study(
    name: Annotated[str, typer.Argument(help="trajectories | controlled | layerwise | landscape | all")],
    config: Annotated[Path, typer.Argument(help="study YAML (see examples/study/)")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key.path=value overrides")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="root folder (default: the config's output_dir)")] = None,
) -> None:
    """Seed 001's studies: spectra through fine-tuning, controlled eigenvalue ratios, layer-wise movement,
    loss-landscape smoothness, and a claims table (supported / not supported / inconclusive)."""
    from spectune.study import STUDIES, run_study
    from spectune.train import TrainConfigError

    if name not in STUDIES:
        raise typer.BadParameter(f"unknown study {name!r}; choose one of: {', '.join(STUDIES)}")
    try:
        report = run_study(name, config, out_dir=out, overrides=overrides or [], progress=True)
    except (TrainConfigError, FileNotFoundError, ValueError) as err:
        _error(err)
        raise typer.Exit(2) from None
    claims = report.parent / "claims.csv"
    if claims.exists():
        import pandas as pd

        df = pd.read_csv(claims)
        cols = [c for c in ("id", "claim", "verdict", "estimate", "lo", "hi", "n") if c in df]
        _c.out.print(_table("claims (seed 001)", df, cols))
    _c.out.print(f"report: {report}", markup=False)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
