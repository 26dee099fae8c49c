"""The `serve` and `export` commands (registered on the CLI app in ``bakeoff.cli``)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from bakeoff.options import device_name

__all__ = ["serve_cmd", "export_cmd"]


def serve_cmd(
    out_dir: Path = typer.Argument(..., help="The --out folder of a run (models are in OUT_DIR/models/)."),
    model: str = typer.Option(..., "--model", "-m", help="Model id to serve (see results.csv)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; 0.0.0.0 exposes it to the network."),
    port: int = typer.Option(8080, min=0, max=65535, help="Port (0 picks a free one)."),
    device: str = typer.Option("auto", callback=device_name, help="auto, cpu, cuda or cuda:N."),
    max_body_mb: float = typer.Option(10.0, help="Larger request bodies get 413."),
    max_pixels: int = typer.Option(10_000_000, help="Pixels one image may take to decode and resize, read from its "
                                   "header before decoding (a JPEG counts after its decoder's shrink); more get 413."),
    max_images: int = typer.Option(32, help="Images one JSON request may hold; more get 413."),
    max_connections: int | None = typer.Option(
        None, help="Open connections at most (default 1000, or half the open-file limit); at the cap the one "
                   "longest without its headers is closed."),
    header_timeout: float = typer.Option(10.0, help="Seconds a connection has to send a request's headers."),
    body_timeout: float = typer.Option(10.0, help="Seconds a request's body may take, and 1 s more for every 64 KB; "
                                       "a slower body gets 408."),
    max_batch: int = typer.Option(32, help="Most requests grouped into one forward pass (1: no batching)."),
    batch_wait_ms: float = typer.Option(2.0, help="Under load, how long to wait for more requests to group."),
    workers: int = typer.Option(1, help="Server processes sharing the port, each with its own copy of the model, "
                                "micro-batching and limits (Linux): more requests/s where one core is the limit."),
) -> None:
    """Serve a fine-tuned model over HTTP with the SageMaker inference contract (GET /ping, POST /invocations)."""
    from bakeoff.serve.limits import ServeLimits
    from bakeoff.serve.server import PARENT_ENV, serve

    parent = os.environ.pop(PARENT_ENV, None)
    if parent and parent.isdigit():  # started by a run (endpoint latency): it ends with that run
        from bakeoff.lifetime import die_with_parent

        die_with_parent(int(parent))
    limits = ServeLimits(int(max_body_mb * 2**20), max_pixels, max_images, max_connections, header_timeout,
                         body_timeout)
    serve(out_dir, model, host, port, device, limits, max_batch, batch_wait_ms, workers)


def export_cmd(
    out_dir: Path = typer.Argument(..., help="The --out folder of a run."),
    model: str = typer.Option(..., "--model", "-m", help="Model id to export."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx or torchscript."),
) -> None:
    """Export a fine-tuned model to ONNX or TorchScript, checked against the original on validation images."""
    from rich.console import Console

    from bakeoff.serve.export import export_model

    r = export_model(out_dir, model, fmt)
    console = Console()
    console.print(f"wrote {r.path} ({r.exporter}); agrees with the original on {r.n_images} validation images: "
                  f"max abs difference of probabilities {r.max_abs_diff:.1e} (tolerance {r.tolerance:.0e})",
                  highlight=False)
    if r.latency_ms_p50 is not None:
        console.print(f"ONNX Runtime, CPU, batch 1: {r.latency_ms_p50:.2f} ms median, {r.latency_ms_p95:.2f} ms p95 "
                      f"({r.latency_runs} runs)" + ("; stored in bakeoff.db (see `bakeoff report`)" if r.stored else ""),
                      highlight=False)
