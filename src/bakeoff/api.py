"""The Python API (what the CLI calls): ``run``, ``report``, ``models``, ``demo``.

>>> import bakeoff
>>> df = bakeoff.run("leaves/", models=["pytorch-ic-resnet34", "timm/efficientnet_b0"])  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import numbers
import os
import shlex
import socket
import sys
import time
from pathlib import Path

import pandas as pd

from bakeoff.compare.outputs import Comparison, write_outputs
from bakeoff.data.cache import cache_side
from bakeoff.data.prepare import prepare_data, storage_side, write_class_map
from bakeoff.data.scan import scan_folder
from bakeoff.engines import engine_for
from bakeoff.engines.torch.compile import Compiles
from bakeoff.errors import BakeoffError
from bakeoff.lifetime import hold_folder, remove_stale_temps
from bakeoff.progress import NullProgress, RunProgress
from bakeoff.protocol import Protocol, apply_preset
from bakeoff.provenance import provenance
from bakeoff.runners.local import run_local
from bakeoff.store import Store
from bakeoff.job import TrialJob
from bakeoff.machine import device_name
from bakeoff.zoo.registry import check_weights_reachable, list_specs, resolve, weights_available_offline

__all__ = ["run", "run_comparison", "report", "models"]


def models(pattern: str | None = None, framework: str | None = None, params: bool = True,
           weights_dir=None, count_params: bool = False) -> pd.DataFrame:
    """The zoo as a table: id, framework, source, params, input size, weights offline.

    ``params`` is the zoo's figure (the weights' metadata; counted from the network where a spec
    has none, for up to 200 models). ``count_params=True`` counts every listed model's parameters
    from the network its engine builds, with a 1000-class head: PyTorch ones on the meta device,
    Keras ones built without weights (seconds each, and Keras is imported)."""
    specs = list_specs(pattern, framework)
    count = params and len(specs) <= 200
    rows = []
    for s in specs:
        n = None if count_params else s.params
        if n is None and (count or count_params):
            n = _count_params(s)
        rows.append({"id": s.id, "framework": s.framework, "source": s.source, "params": n,
                     "input_size": s.input_size, "offline_weights": weights_available_offline(s, weights_dir),
                     "weight_source": s.weight_source, "license": s.license})
    return pd.DataFrame(rows, columns=["id", "framework", "source", "params", "input_size", "offline_weights",
                                       "weight_source", "license"])


def _count_params(spec) -> int | None:
    """The network's parameters, counted by its own engine; None where it cannot be built here
    (its library missing)."""
    try:
        return engine_for(spec.framework).load().count_params(spec)
    except Exception:
        return None


def _model_list(models_arg) -> list[str]:
    if models_arg is None:
        return []
    if isinstance(models_arg, str):
        models_arg = models_arg.split(",")
    return [m.strip() for m in models_arg if m and m.strip()]


def run_comparison(data_dir, models=None, *, out="bakeoff-out", baseline: str | None = None,
                   epochs: int | None = None, lr: float | None = None, batch_size: int | None = None,
                   optimizer: str | None = None, train_only_top_layer: bool = Protocol.train_only_top_layer,
                   val_dir=None, val_fraction: float = 0.2, seed: int = Protocol.seed, pretrained=Protocol.pretrained,
                   weights_dir=None, device: str = "auto", preset: str | None = None,
                   precision: str = Protocol.precision, image_size: int | None = Protocol.image_size, cache_dir=None,
                   trials_per_gpu="auto", keras_per_gpu="1", cuda_graphs: bool = Protocol.cuda_graphs,
                   val_every: int = Protocol.val_every,
                   compile: str = Protocol.compile, progress: bool = True,
                   command: str | None = None, executor: str = "local", ray_address: str | None = None,
                   mlflow_uri: str | None = None, endpoint_latency: int = 0, repeats: int = 1) -> Comparison:
    """Fine-tune every model with one protocol, measure, store, and compare (see ``run``).

    ``executor="ray"`` runs each trial as a task on the Ray cluster at ``ray_address``;
    ``mlflow_uri`` (or ``MLFLOW_TRACKING_URI``) logs every trial as an MLflow run.
    ``endpoint_latency=N`` serves each trained model locally and times N one-image HTTP requests.
    ``val_every=N`` scores the validation split after every N-th epoch only (the last always).
    ``compile="auto"``: on a CUDA GPU, graphed training steps switch to compiled kernels once
    they are compiled in the background (``engines.torch.compile``), the default; ``"off"``
    keeps eager kernels throughout. ``keras_per_gpu`` ("1", a number or "auto"): Keras trials
    at once on a GPU, a process each (``process_gate``); ``trials_per_gpu=1`` makes it 1 too.
    ``repeats=N`` trains every model N times, repeat r with seed ``seed + r`` (initialisation,
    batch order, augmentation) on the one split that ``seed`` draws; each repeat is a trial of
    its own (``compare.repeats`` pools them).
    """
    check_repeats(repeats, seed)
    _processes_per_gpu(None, keras_per_gpu)  # a bad value fails now, not once the images are decoded
    repeats = int(repeats)
    if endpoint_latency:
        from bakeoff.serve.endpoint_latency import add_endpoint_latency, check_endpoint_latency

        check_endpoint_latency(endpoint_latency)  # before training, not after hours of it
    if executor not in ("local", "ray"):
        raise BakeoffError(f"--executor must be local or ray, got {executor!r}")
    mlflow_uri = mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if mlflow_uri:
        from bakeoff.tracking import require_mlflow

        require_mlflow()
    # epochs, lr, batch size and optimizer: Protocol's defaults, then the preset's, then the caller's
    settings = dict(epochs=Protocol.epochs, lr=Protocol.lr, batch_size=Protocol.batch_size, optimizer=Protocol.optimizer)
    model_ids = _model_list(models)
    if preset:
        p = apply_preset(preset)
        settings.update(p.protocol)
        model_ids = model_ids or list(p.models)
        baseline = baseline or p.baseline
    for k, v in dict(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer).items():
        if v is not None:
            settings[k] = v
    if not model_ids:
        raise BakeoffError("no models to compare: name them with --models a,b,c or pick a --preset")
    specs = list({s.id: s for s in (resolve(m) for m in model_ids)}.values())
    ids = [s.id for s in specs]
    if baseline is not None:
        baseline = resolve(baseline).id
        if baseline not in ids:
            raise BakeoffError(f"--baseline {baseline} is not among --models ({', '.join(ids)}): add it there")
    protocol = Protocol(**settings, train_only_top_layer=train_only_top_layer, seed=seed, precision=precision,
                        pretrained=pretrained, image_size=image_size, cuda_graphs=cuda_graphs,
                        val_every=val_every, compile=compile)
    if weights_dir is not None and not Path(weights_dir).expanduser().is_dir():
        raise BakeoffError(f"--weights-dir {weights_dir} is not a folder: pass the folder that holds the weight files")
    t_scan = time.perf_counter()
    train_folder = scan_folder(data_dir, what="data folder")  # bad folders are refused before anything slow
    val_folder = scan_folder(val_dir, classes=train_folder.classes, what="validation folder") \
        if val_dir is not None else None
    scanned = (train_folder, val_folder, time.perf_counter() - t_scan)
    if pretrained is True:
        check_weights_reachable(specs, weights_dir)
    from bakeoff.engines.torch.fit import resolve_device

    if executor == "ray":
        from bakeoff.runners.ray_runner import cluster_device, connect

        connect(ray_address)
        dev = cluster_device(device)
    else:
        dev = resolve_device(device)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    # One run writes a folder at a time, for its whole life: a second is refused with one line.
    with hold_folder(out):
        store = Store(out / "bakeoff.db")
        store.mark_interrupted()  # runs left "running" by a killed process: none is live, we hold the folder
        t0 = time.time()

        sides = []
        for s in specs:
            size = image_size or s.input_size
            sides.append((size, cache_side(size, s.crop_pct), s.interpolation))
        display = RunProgress(len(specs) * repeats) if progress else NullProgress()
        gpu = _local_gpu(executor, dev)
        warm = None
        if gpu is not None:  # on a CPU the decoders want every core
            from bakeoff.runners.local import prestart

            warm = prestart(gpu)  # torch and CUDA start while the images decode
        compiles = Compiles()
        with display, _stopped_on_error(warm), contextlib.ExitStack() as ending:
            ending.callback(compiles.stop)  # what they finished stays in the cache for the next run
            cache_root = Path(cache_dir).expanduser() if cache_dir else out / "cache"
            remove_stale_temps(cache_root)  # what a killed run was writing: a half-decoded cache, a marker
            compile_for = {}
            if gpu is not None:  # compiled beside the decoding and the first epochs, at low priority
                compile_for = compiles.start([(s.to_dict(), size) for s, (size, _, _) in zip(specs, sides)],
                                             len(train_folder.classes), protocol.to_dict(), cache_root, gpu,
                                             device_name(dev))
            # Decode once: every image is decoded a single time, at one size that serves all models.
            files = [str(train_folder.root / p) for p in train_folder.paths]
            store_side = storage_side([side for _, side, _ in sides], files)
            interp = sides[0][2]
            data = prepare_data(data_dir, val_dir, val_fraction, seed, cache_root,
                                first_side=(store_side, interp), progress=display.decode(f"{store_side}px"),
                                decode_device=gpu, scanned=scanned)
            write_class_map(data.classes, out)
            summary = data.summary()
            (out / "dataset.json").write_text(json.dumps(summary, indent=2))
            (out / "split.json").write_text(json.dumps({
                "train": [data.files[i] for i in data.train_idx], "val": [data.files[i] for i in data.val_idx]}))
            # Every trial stops all of the run's background compiles while it times alone.
            background = {"host": socket.gethostname(),
                          "pids": [c["pid"] for c in compile_for.values() if c.get("pid") is not None]}
            jobs = [TrialJob(spec=s.to_dict(), protocol=p.to_dict(),
                             cache_path=str(data.caches[(store_side, interp)].path), input_size=size,
                             side=side, cache_root=str(cache_root),
                             labels=data.labels, train_idx=data.train_idx, val_idx=data.val_idx,
                             classes=data.classes, out_dir=str(out / folder), device=str(dev),
                             weights_dir=str(weights_dir) if weights_dir else None,
                             key=trial_key(s.id, p, data.fingerprint, dev.type, seed),
                             compile=compile_for.get(s.id), background=background,
                             repeat=r if repeats > 1 else None, repeat_dir=folder or None)
                    for r, (p, folder) in enumerate(repeat_protocols(protocol, repeats, out))
                    for s, (size, side, _) in zip(specs, sides)]
            command = command or " ".join(shlex.quote(a) for a in sys.argv)
            # A preset's differences from the study it reproduces go with the protocol into the report.
            stored = protocol.to_dict() | ({"repeats": repeats} if repeats > 1 else {}) \
                | (apply_preset(preset).record(preset) if preset else {})
            by_model = {s.id: [j.key for j in jobs if j.spec["id"] == s.id] for s in specs}
            run_id = store.start_run(command, baseline, {m: keys[0] for m, keys in by_model.items()}, stored,
                                     summary, provenance() | {"device": str(dev), "executor": executor},
                                     repeat_keys=by_model if repeats > 1 else None)
            status = "interrupted"
            try:
                if executor == "ray":
                    from bakeoff.runners.ray_runner import run_ray

                    counts = run_ray(jobs, store, run_id, display.on_event, ray_address)
                else:
                    devices, per_device = _gpu_slots(device, dev, trials_per_gpu, data, sides,
                                                     protocol.train_only_top_layer)
                    processes, memory = _processes_per_gpu(devices, 1 if str(trials_per_gpu) == "1" else keras_per_gpu,
                                                           protocol.train_only_top_layer)
                    counts = run_local(jobs, store, run_id, display.on_event, devices, per_device, warm,
                                       processes_per_device=processes, gpu_memory=memory)
                status = "finished"
            finally:
                store.finish_run(run_id, status)
        # OUT/models/ holds the first repeat's models: the ones served, so the ones timed
        problems = add_endpoint_latency(out, store, [j.key for j in jobs if not j.repeat],
                                        endpoint_latency, device, seed) \
            if endpoint_latency else []
        comparison = write_outputs(out, baseline)
        comparison.warning = "; ".join(filter(None, [comparison.warning, *problems])) or None
        if mlflow_uri:  # after write_outputs, so the plots and report files exist to be logged
            from bakeoff.tracking import log_run

            comparison.run["mlflow_experiment"] = log_run(out, mlflow_uri)
        comparison.run["counts"] = counts
        comparison.run["wall_time_s"] = time.time() - t0
        return comparison


def check_repeats(repeats, seed) -> None:
    """``repeats`` must be a whole number from 1, and every repeat's seed a valid seed."""
    if isinstance(repeats, bool) or not isinstance(repeats, numbers.Integral) or repeats < 1:
        raise BakeoffError(f"--repeats must be a whole number from 1, got {repeats!r}")
    if isinstance(seed, int) and 0 <= seed and seed + repeats - 1 >= 2**32:
        raise BakeoffError(f"--seed {seed} with --repeats {repeats} runs past the largest seed, {2**32 - 1}: "
                           f"pick a smaller --seed")


def repeat_protocols(protocol: Protocol, repeats: int, out: Path) -> list[tuple[Protocol, str]]:
    """Each repeat's protocol (seed + r) and the folder under OUT its trials save their models in:
    the first repeat keeps OUT (the models `bakeoff serve` finds), each other one has
    OUT/repeats/seed-S."""
    out_list = []
    for r in range(repeats):
        folder = "" if r == 0 else f"repeats/seed-{protocol.seed + r}"
        if folder:
            (out / folder).mkdir(parents=True, exist_ok=True)
        out_list.append((dataclasses.replace(protocol, seed=protocol.seed + r), folder))
    return out_list


def trial_key(model: str, protocol: Protocol, fingerprint: str, device_type: str, split_seed: int) -> str:
    """What identifies a trial: a repeat's key adds the split's seed, which its protocol's seed no
    longer gives (a single run splits with its protocol's seed: its keys stay as they were)."""
    split = "" if protocol.seed == split_seed else f"|split seed {split_seed}"
    return hashlib.sha256(f"{model}|{protocol.key()}|{fingerprint}|{device_type}{split}".encode()).hexdigest()[:20]


def _local_gpu(executor: str, dev) -> str | None:
    """The GPU a local run trains on first, which also decodes the JPEGs into the cache (nvJPEG
    decodes many times faster than PIL on the CPU cores: docs/speed.md)."""
    if executor == "ray" or dev.type != "cuda":
        return None
    return str(dev) if dev.index is not None else "cuda:0"


@contextlib.contextmanager
def _stopped_on_error(warm):
    """Stop a prestarted worker if the run fails, before or while the runner has it."""
    try:
        yield
    except BaseException:
        if warm is not None:
            warm.stop(wait=0.0)
        raise


def _gpu_slots(device: str, dev, trials_per_gpu, data, sides, top_only: bool = False) -> tuple[list[str] | None, int]:
    """Which GPUs trials run on and how many share each: every GPU of the machine unless one
    was named; ``trials_per_gpu`` "auto" packs full fine-tunes as many as the smallest GPU's
    memory allows (their batch-16 kernels overlap: docs/results.md) and runs top-only trials
    one at a time (their feature pass fills the GPU on its own)."""
    if dev.type != "cuda":
        return None, 1
    import torch

    gpus = [str(dev)] if ":" in device else [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if str(trials_per_gpu) != "auto":
        try:
            n = int(trials_per_gpu)
        except ValueError:
            raise BakeoffError(f"--trials-per-gpu must be a number or auto, got {trials_per_gpu!r}") from None
        if n < 1:
            raise BakeoffError(f"--trials-per-gpu must be at least 1, got {n}")
        return gpus, n
    if top_only:
        return gpus, 1
    free = min(torch.cuda.mem_get_info(i)[0] for i in range(len(gpus)))
    # The trials of one GPU share one copy of the images (uint8; at most two sizes at once: the
    # stored one and a model's own); each trial adds weights, gradients, optimizer state and
    # activations, budgeted at 8 GB, which covers the study's models at batch 16.
    side = max(side for _, side, _ in sides)
    images = 2 * len(data.files) * side * side * 3
    return gpus, max(1, min(8, int((free * 0.9 - images) // (8 * 2**30))))


# Four Keras trials at once on one GPU read like for like against one at a time; eight at once
# (the study's Keras models) read slow steps with a wide spread (docs/results.md)
KERAS_AUTO_MOST = 4


def _processes_per_gpu(gpus: list[str] | None, keras_per_gpu, top_only: bool = False) -> tuple[int, int | None]:
    """How many trials that run in a process each (Keras) may share a GPU at once, and the GPU
    memory they may fill (bytes): each holds its own copy of the images, so the runner starts
    as many as that memory holds (``runners.local._gpu_bytes``), at most ``keras_per_gpu``
    (``KERAS_AUTO_MOST`` for auto); top-only trials one at a time."""
    most = KERAS_AUTO_MOST if str(keras_per_gpu) == "auto" else keras_per_gpu
    if isinstance(most, bool) or not str(most).isdigit() or int(most) < 1:
        raise BakeoffError(f"--keras-per-gpu must be a whole number from 1 or auto, got {keras_per_gpu!r}")
    if not gpus or top_only or int(most) == 1 or not all(g.startswith("cuda") for g in gpus):
        return 1, None
    import torch

    free = min(torch.cuda.mem_get_info(torch.device(g))[0] for g in gpus)
    return int(most), int(free * 0.9)


def run(data_dir, models=None, **kwargs) -> pd.DataFrame:
    """Fine-tune ``models`` on the image folder ``data_dir`` with one protocol and compare them.

    Writes ``out`` (default ``bakeoff-out``): bakeoff.db, results.csv, relative.csv, plots/,
    models/ (with ``repeats=N``: results_by_repeat.csv and stability.json too). Re-running
    resumes: finished trials are not trained again. Returns one row per
    model with absolute and relative figures.

    >>> df = bakeoff.run("flowers/", ["timm/tf_efficientnet_lite0", "pytorch-ic-resnet34"],
    ...                  epochs=3, out="runs/flowers")  # doctest: +SKIP
    """
    return run_comparison(data_dir, models, **kwargs).frame()


def report(out, baseline: str | None = None) -> pd.DataFrame:
    """Rebuild results.csv, relative.csv and the plots from ``out/bakeoff.db``, without training."""
    if baseline is not None:
        baseline = resolve(baseline).id
    return write_outputs(out, baseline).frame()
