"""The command line: thin, parses and prints; the work is in ``bakeoff.api``."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bakeoff.compare.recommend import LATENCIES, fmt_p_value
from bakeoff.compare.tables import CHANCE_STATUS, display_status, figure_kind, weights_kind
from bakeoff.engines import ENGINES
from bakeoff.errors import BakeoffError
from bakeoff.options import device_name
from bakeoff.protocol import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, OPTIMIZERS, Protocol
from bakeoff.serve.commands import export_cmd, serve_cmd

app = typer.Typer(
    help="Which pretrained model should I fine-tune on my images? Fine-tune many with one protocol, "
         "measure accuracy, training time and inference time, compare them to a baseline.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
# Piped output (logs, CI) gets a wide table instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 160)


def _fmt(v, spec: str) -> str:
    try:
        if v is None or v != v:
            return "-"
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def print_comparison(comparison) -> None:
    df = comparison.frame()
    kind = comparison.inference
    latency = LATENCIES[kind][0]  # the latency the relative figures use
    table = Table(title=f"bakeoff: relative to {comparison.baseline or '-'}", show_lines=False)
    # Two-line headers and cells keep the twelve columns within a terminal; a model id is what the
    # reader looks up, so the other columns wrap first and nothing is cut to an ellipsis.
    # Each time column's header says how its figure was taken (one kind, or "mixed: ...").
    for col in ("model", "status", "weights", "accuracy\n(95% CI)",
                f"train s\n({figure_kind(df, 'train_time_kind')})",
                "latency\nms p50" + (f" ({figure_kind(df, 'latency_kind')})" if kind == "in-process" else f" ({kind})"),
                "img/s", "rel acc",
                "p vs\nbase", "rel\ntrain", "rel\ninfer", "pareto"):
        table.add_column(col, justify="left" if col in ("model", "status", "weights") else "right",
                         no_wrap=col == "model", overflow="fold")
    colour = {"ok": "green", CHANCE_STATUS: "yellow"}
    for (_, r), shown in zip(df.iterrows(), display_status(df)):
        acc = "-" if r["status"] != "ok" else \
            f"{r['accuracy']:.3f}\n({r['accuracy_ci_low']:.3f}-{r['accuracy_ci_high']:.3f})"
        status = f"[{colour.get(shown, 'red')}]{escape(shown)}[/]"
        table.add_row(r["model"], status, weights_kind(r.get("weights")) or "-", acc, _fmt(r["train_time_s"], ".1f"),
                      _fmt(r.get(latency), ".2f"), _fmt(r["throughput_img_s"], ",.0f"),
                      _fmt(r.get("relative_accuracy"), ".3f"),
                      fmt_p_value(r.get("p_vs_baseline"), missing="-"),
                      _fmt(r.get("relative_training_time"), ".2f"), _fmt(r.get("relative_inference_time"), ".2f"),
                      "*" if r.get("pareto") is True else "")
    console.print(table)
    for _, r in df[df["status"] != "ok"].iterrows():
        console.print(f"[red]{escape(r['model'])} failed:[/] {escape(str(r['error']))}")
    if getattr(comparison, "stability", None):
        console.print(f"rank stability: {escape(comparison.stability['verdict'])}")
    for note in (comparison.warning or "").splitlines():
        console.print(f"[yellow]warning:[/] {escape(note)}")
    dataset = comparison.run.get("dataset", {})
    skipped = dataset.get("n_skipped", 0)
    if skipped:
        console.print(f"[yellow]{skipped} files skipped[/] (unreadable, not images, links to nothing or "
                      f"listed twice; each with its reason in dataset.json)")
    for warning in dataset.get("warnings", []):
        console.print(f"[yellow]warning:[/] {escape(warning)}")


def _written(out: Path) -> str:
    """The outputs that exist, the page to open first."""
    names = ["report.html", "report.md", "results.csv", "results_by_repeat.csv", "stability.json", "relative.csv",
             "plots/", "models/", "bakeoff.db"]
    return ", ".join(n for n in names if (Path(out) / n.rstrip("/")).exists())


def writable_folder(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    """An output folder that is, or can be made, a folder this user can write in: checked before
    any work, so a long run never fails at its end on writing its results."""
    if value is None:
        return value
    path = value.expanduser()

    def bad(why: str):
        return typer.BadParameter(f"{value} {why}", ctx=ctx, param=param)

    try:
        if path.exists() and not path.is_dir():
            raise bad("is a file: pass a folder (it is made if missing)")
        missing = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
        existing = path.parents[len(missing) - 1] if missing else path
        if not existing.is_dir():
            raise bad(f"is under a file ({existing}): pass a folder")
        try:
            path.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=path).close()
        finally:  # made only to try: the run makes it again when it starts
            for p in missing:
                with contextlib.suppress(OSError):
                    p.rmdir()
    except OSError as exc:
        raise bad(f"cannot be written ({exc.strerror or exc}): pass a folder you can write in") from None
    return value


def trials_per_gpu_value(ctx: typer.Context, param: typer.CallbackParam, value: str) -> str:
    """Checked here too: the run checks it only once the images are decoded, and only on a GPU."""
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise typer.BadParameter(f"{value!r}: pass a whole number from 1, or auto", ctx=ctx, param=param)
    return value


MODEL_FORMATS = ("table", "csv", "json")


def model_format(ctx: typer.Context, param: typer.CallbackParam, value: str) -> str:
    if value not in MODEL_FORMATS:
        raise typer.BadParameter(f"{value!r}: pass {', '.join(MODEL_FORMATS)}", ctx=ctx, param=param)
    return value


def print_models(df) -> None:
    """The zoo as a table whose ids are never cut: the id column is as wide as the longest id
    and the table is drawn wider than the terminal rather than shorten one (ids are copied
    into --models and searched for with grep)."""
    table = Table(title=f"{len(df)} models")
    widths = {"id": max([len(i) for i in df["id"]] + [2]), "framework": 10, "params": 6, "input": 5,
              "offline weights": 7, "weights from": 24}
    for col, width in widths.items():
        table.add_column(col, min_width=width, no_wrap=col == "id", overflow="fold")
    for _, r in df.iterrows():
        params = "-" if r["params"] is None or r["params"] != r["params"] else f"{r['params'] / 1e6:.1f}M"
        table.add_row(escape(r["id"]), r["framework"], params, str(r["input_size"]),
                      "[green]yes[/]" if r["offline_weights"] else "no", escape(str(r["weight_source"])))
    needed = sum(widths.values()) + 3 * len(widths) + 1  # one space each side of a cell, one rule between
    out = console if console.width >= needed else Console(width=needed)
    out.print(table, crop=False)


@app.command("models")
def models_cmd(
    pattern: Optional[str] = typer.Argument(None, help="Substring or glob of the model id, e.g. resnet or 'timm/*lite*'."),
    framework: Optional[str] = typer.Option(None, "--framework", help=' or '.join(ENGINES) + "."),
    weights_dir: Optional[Path] = typer.Option(None, "--weights-dir", help="Also count weights found in this folder."),
    fmt: str = typer.Option("table", "--format", "-f", callback=model_format,
                            help="table (to read; ids are never shortened), csv or json (for scripts: every "
                                 "column, full ids and weight sources)."),
    count_params: bool = typer.Option(False, "--count-params",
                                      help="Count each model's parameters from the network bakeoff builds (with a "
                                           "1000-class head) instead of the zoo's figure; seconds a Keras model."),
) -> None:
    """List the model zoo: id, framework, parameters, input size, weights available offline."""
    from bakeoff.api import models

    df = models(pattern, framework, weights_dir=weights_dir, count_params=count_params)
    if fmt == "csv":
        df.to_csv(sys.stdout, index=False)
    elif fmt == "json":
        # through pandas for NaN -> null, then json for text as it is (pandas writes / as \/)
        print(json.dumps(json.loads(df.to_json(orient="records")), indent=1))
    else:
        print_models(df)


@app.command("run")
def run_cmd(
    data_dir: Path = typer.Argument(..., help="Folder with one sub-folder of images per class."),
    models: Optional[str] = typer.Option(None, "--models", "-m", help="Comma-separated model ids (see `bakeoff models`)."),
    baseline: Optional[str] = typer.Option(None, help="Model the others are compared to (default: the first listed)."),
    out: Path = typer.Option(Path("bakeoff-out"), "--out", "-o", callback=writable_folder,
                             help="Output folder (made if missing; must be writable); re-running resumes in it."),
    epochs: Optional[int] = typer.Option(None, help=f"Epochs  \\[default: {Protocol.epochs}]"),
    lr: Optional[float] = typer.Option(None, help=f"Learning rate, a finite number above 0  \\[default: {Protocol.lr}]"),
    batch_size: Optional[int] = typer.Option(None, help=f"Batch size  \\[default: {Protocol.batch_size}]"),
    optimizer: Optional[str] = typer.Option(None, help=f"{', '.join(OPTIMIZERS[:-1])} or {OPTIMIZERS[-1]}  "
                                            f"\\[default: {Protocol.optimizer}]"),
    train_only_top_layer: bool = typer.Option(Protocol.train_only_top_layer, "--train-only-top-layer",
                                              help="Freeze all but the classifier."),
    val_dir: Optional[Path] = typer.Option(None, help="Separate validation folder (same class folders)."),
    val_fraction: float = typer.Option(0.2, help="Held-out fraction per class when there is no --val-dir."),
    val_every: int = typer.Option(Protocol.val_every, help="Score the validation split after every N-th epoch (the last one always): "
                                  "1 draws full learning curves; 5 with 5 epochs skips four evaluation passes."),
    seed: int = typer.Option(Protocol.seed, help="Seed of the split, the initialisation and the batch order."),
    repeats: int = typer.Option(1, help="Train every model N times, with seeds SEED, SEED+1, ... on the same split; "
                                "results pool the repeats (results_by_repeat.csv keeps each)."),
    pretrained: bool = typer.Option(Protocol.pretrained, "--pretrained/--no-pretrained", help="Start from ImageNet weights."),
    weights_dir: Optional[Path] = typer.Option(None, help="Folder of local weight files (no network needed)."),
    device: str = typer.Option("auto", callback=device_name, help="auto, cpu, cuda or cuda:N."),
    preset: Optional[str] = typer.Option(None, help="Named protocol and models, e.g. jumpstart-blog."),
    precision: str = typer.Option(Protocol.precision, help="auto (bf16 + channels-last on CUDA), fp32 or bf16."),
    image_size: Optional[int] = typer.Option(None, help=f"Override every model's input size (quick runs), "
                                             f"{MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels."),
    cache_dir: Optional[Path] = typer.Option(None, callback=writable_folder,
                                             help="Where decoded images are kept (default: OUT/cache); "
                                                  "runs on the same data share it."),
    trials_per_gpu: str = typer.Option("auto", callback=trials_per_gpu_value,
                                       help="Trials sharing each GPU at once, one CUDA stream each: "
                                       "a number, or auto (as many full fine-tunes as memory allows; "
                                       "top-only trials one at a time). 1 measures every training "
                                       "time alone instead of projecting it."),
    keras_per_gpu: str = typer.Option("1", callback=trials_per_gpu_value,
                                      help="Keras trials (a process each) sharing each GPU at once, after "
                                      "the PyTorch ones: a number, or auto (as many as memory allows, up "
                                      "to 4). 1 runs them one after another. Four at once matched one "
                                      "at a time on a GPU; eight at once read slow (docs/keras.md)."),
    cuda_graphs: bool = typer.Option(Protocol.cuda_graphs, "--cuda-graphs/--no-cuda-graphs",
                                     help="Replay the training step as a CUDA graph on GPUs."),
    compile: str = typer.Option(Protocol.compile, "--compile", help="auto (on CUDA GPUs, compile each model's training "
                                "step in the background and switch to the compiled kernels once ready; kept "
                                "for later runs) or off (eager kernels throughout)."),
    endpoint_latency: int = typer.Option(0, help="Serve each model locally and time N one-image HTTP requests."),
    executor: str = typer.Option("local", help="local (child processes on this machine) or ray (tasks on a Ray cluster)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster to join, e.g. HOST:6379 (default: RAY_ADDRESS, "
                                              "the cluster started on this machine, else a private one)."),
    mlflow_uri: Optional[str] = typer.Option(None, help="Log every trial as an MLflow run here, e.g. sqlite:///mlflow.db "
                                             "or http://HOST:5000 (default: MLFLOW_TRACKING_URI)."),
) -> None:
    """Fine-tune the models on DATA_DIR with one protocol, measure and compare them."""
    from bakeoff.api import run_comparison

    if preset:  # before anything slow: what this run does not reproduce of the study
        from bakeoff.protocol import apply_preset

        console.print(apply_preset(preset).notice(preset), highlight=False, soft_wrap=True)
    comparison = run_comparison(
        data_dir, models, out=out, baseline=baseline, epochs=epochs, lr=lr, batch_size=batch_size,
        optimizer=optimizer, train_only_top_layer=train_only_top_layer, val_dir=val_dir, val_fraction=val_fraction,
        seed=seed, pretrained=pretrained, weights_dir=weights_dir, device=device, preset=preset,
        precision=precision, image_size=image_size, trials_per_gpu=trials_per_gpu, keras_per_gpu=keras_per_gpu,
        cuda_graphs=cuda_graphs, cache_dir=cache_dir,
        val_every=val_every, compile=compile, progress=sys.stderr.isatty(), executor=executor,
        ray_address=ray_address, mlflow_uri=mlflow_uri, endpoint_latency=endpoint_latency, repeats=repeats)
    print_comparison(comparison)
    if comparison.run.get("mlflow_experiment"):
        console.print(f"MLflow experiment: {comparison.run['mlflow_experiment']}")
    counts = comparison.run.get("counts", {})
    console.print(f"trained {counts.get('trained', 0)}, already done {counts.get('resumed', 0)}, "
                  f"failed {counts.get('failed', 0)}; results in {out}/ ({_written(out)})")


@app.command("report")
def report_cmd(
    out_dir: Path = typer.Argument(..., help="The --out folder of a run."),
    baseline: Optional[str] = typer.Option(None, help="Compare against this model instead."),
    inference: str = typer.Option("in-process", help="Latency compared: in-process, endpoint or onnx-cpu."),
) -> None:
    """Rebuild results.csv, relative.csv and the plots from OUT_DIR/bakeoff.db, without training."""
    from bakeoff.compare.outputs import write_outputs
    from bakeoff.zoo.registry import resolve

    comparison = write_outputs(out_dir, resolve(baseline).id if baseline else None, inference=inference)
    print_comparison(comparison)
    console.print(f"written in {out_dir}/: {_written(out_dir)}")


@app.command("demo")
def demo_cmd(out: Path = typer.Option(Path("bakeoff-demo"), "--out", "-o", callback=writable_folder,
                                      help="Output folder (made if missing).")) -> None:
    """Run a small real comparison offline (handwritten digits, 3 models, a few minutes on CPU)."""
    from bakeoff.api import run_comparison
    from bakeoff.demo import DEMO_MODELS, DEMO_SETTINGS, make_digits_folder

    data = make_digits_folder(out / "digits")
    console.print(f"demo data: {data} (10 classes of handwritten digits); models: {', '.join(DEMO_MODELS)}")
    comparison = run_comparison(data, DEMO_MODELS, out=out, **DEMO_SETTINGS, progress=sys.stderr.isatty())
    print_comparison(comparison)
    console.print(f"results in {out}/ ({_written(out)})")


@app.command("timeline")
def timeline_cmd(
    out_dir: Path = typer.Argument(..., help="The --out folder of a finished run."),
    start: Optional[str] = typer.Option(None, help="When the command started: seconds since the epoch, or a file "
                                        "holding them (`date +%s.%N > start`). Default: the run's own start, "
                                        "after the scan."),
    end: Optional[str] = typer.Option(None, help="When the command ended, likewise. Default: the last output file."),
    util: Optional[Path] = typer.Option(None, help="GPU utilisation samples taken beside the run: the CSV that "
                                        "nvidia-smi writes when asked for timestamp and utilization.gpu (in that "
                                        "order) with --format=csv -l 2. Spans under 50% are listed."),
    project: Optional[int] = typer.Option(None, min=1, help="Also project the whole run to this many epochs."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write every figure to this JSON file."),
) -> None:
    """Where a finished run's time went: per trial its start, end, capture, epoch walls, evaluations and
    switch to compiled kernels; the scan and decode; the gain of trials sharing the GPU."""
    from bakeoff.compare.timeline import low_spans, project as projected, render, seconds, timeline

    if util is not None and not util.is_file():
        raise BakeoffError(f"--util {util}: no such file")
    report = timeline(out_dir, seconds(start) if start else None, seconds(end) if end else None)
    samples = low_spans(util, report["start"]) if util is not None else None
    print(render(report, project, samples))
    if json_out is not None:
        if project:
            report["projected_s"] = projected(report, project)
        if samples is not None:
            report["util_samples"], report["util_under_50"] = samples
        json_out.write_text(json.dumps(report, indent=2))


app.command("serve")(serve_cmd)
app.command("export")(export_cmd)


try:  # recent typer carries its own copy of click's exceptions; earlier ones raise click's
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as click_exceptions
ClickException = click_exceptions.ClickException
NoArgsIsHelpError = getattr(click_exceptions, "NoArgsIsHelpError", ())  # click 8.2+; () matches nothing


def fail(message: str) -> None:
    """The one way an error reaches the user: one line on stderr, exit code 2, no traceback."""
    text = " ".join(str(message).split())  # any newline in a message would make it two lines
    Console(stderr=True).print(f"[red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)
    sys.exit(2)


class WarningLine(logging.Handler):
    """The data layer's warnings (e.g. a class with one image) as one line each on stderr, when
    they happen: a long run should not keep them until its end."""

    def emit(self, record: logging.LogRecord) -> None:
        Console(stderr=True).print(f"[yellow]warning:[/] {escape(record.getMessage())}", highlight=False,
                                   soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    warnings = WarningLine(logging.WARNING)
    logging.getLogger("bakeoff").addHandler(warnings)
    try:
        # standalone_mode=False: our handlers below see usage errors and Ctrl-C instead of click's
        # own (several lines of usage, exit code 1 or "Aborted!").
        code = app(args=argv, prog_name="bakeoff", standalone_mode=False)
        if code == 130:  # the command line layer turns Ctrl-C into exit code 130
            raise KeyboardInterrupt
        sys.exit(code if isinstance(code, int) else 0)
    except NoArgsIsHelpError as exc:  # a bare `bakeoff`: the help, as asked
        print(exc.format_message())
        sys.exit(0)
    except ClickException as exc:  # a bad flag, value, command or path
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        fail(exc.format_message() + hint)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        Console(stderr=True).print("interrupted: finished trials are kept in the output folder's bakeoff.db; "
                                   "run the same command again to resume", highlight=False, soft_wrap=True)
        sys.exit(130)
    except BakeoffError as exc:
        fail(str(exc))
    finally:
        logging.getLogger("bakeoff").removeHandler(warnings)


if __name__ == "__main__":
    main()
