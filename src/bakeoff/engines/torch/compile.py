"""Compiled training steps without waiting for the compiler.

Compiled kernels (``torch.compile``: normalisation, activations and their gradients fused into
generated kernels; convolutions stay with cuDNN) cut the GPU work of a graphed training step
(bench/compiled.py; figures in docs/results.md), but compiling on a cold cache takes minutes per
model, more than a 5-epoch run saves if the trials wait for it. So nobody waits:

- When a run starts, one background process per model (``start``), at low CPU priority,
  compiles that model's training step into a compile cache kept beside the decoded images, and
  leaves a marker saying whether it worked (``<key>.json``).
- Trials train meanwhile with eager kernels in their CUDA graph. Every few dozen steps and at
  each epoch's end a trial looks for its marker (``Marker.ready``); once it is there, the trial
  compiles its step again from the cache (seconds: the kernels are loaded, not generated),
  captures it in a new graph and trains on with it. Where it switched is stored with the trial.
- A later run on the same GPU and library versions finds the markers and compiles before its
  first epoch.

Compilation is an optimisation only: a model that does not compile trains eagerly as before,
its reason stored. It is the default (``--compile auto``); ``--compile off`` keeps eager kernels.
Compiled and eager runs at the same seeds ended at the same accuracy within the spread between
seeds (docs/results.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bakeoff.engines import engine_for
from bakeoff.gpu_share import send_signal
from bakeoff.lifetime import die_with_parent, temp_path

__all__ = ["compile_model", "compile_key", "Marker", "Compiles", "cache_env", "use_cache", "marker_for"]

# Where, under the data cache folder, the compiled kernels and the markers live.
FOLDER = "compiled"


def compile_model(model):
    """The model as trials train it compiled: default mode, static shapes (the epoch's last,
    smaller batch runs with the eager model rather than compiling a second time)."""
    import torch

    return torch.compile(model, dynamic=False)


def compile_key(spec_id: str, classes: int, input_size: int, protocol: dict, device_name: str) -> str:
    """What a compiled step depends on: model, head, input and batch shape, precision, GPU and
    library versions. Runs that agree on all of it share one marker."""
    import torch

    import bakeoff

    blob = json.dumps([spec_id, classes, input_size, protocol["batch_size"], protocol["precision"], device_name,
                       torch.__version__, bakeoff.__version__])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cache_env(folder: str | os.PathLike) -> dict[str, str]:
    """The variables that point the compiler's caches (generated kernels, their tuned configs)
    into ``folder``."""
    folder = os.path.abspath(folder)
    return {"TORCHINDUCTOR_CACHE_DIR": folder, "TRITON_CACHE_DIR": os.path.join(folder, "triton")}


def use_cache(folder: str | os.PathLike) -> None:
    """This process compiles into (and loads from) ``folder`` from now on."""
    os.environ.update(cache_env(folder))


@dataclass(frozen=True)
class Marker:
    """A background compile's outcome, as its trial reads it: ``<folder>/<key>.json``."""

    folder: str
    key: str

    @property
    def path(self) -> Path:
        return Path(self.folder) / f"{self.key}.json"

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):  # not written yet (or being written: the rename is atomic)
            return None

    def ready(self) -> bool:
        return (self.read() or {}).get("status") == "ready"

    def error(self) -> str | None:
        found = self.read() or {}
        return found.get("error") if found.get("status") == "failed" else None

    def write(self, status: str, **fields) -> None:
        tmp = temp_path(self.path)
        tmp.write_text(json.dumps({"status": status, **fields}))
        os.replace(tmp, self.path)


def marker_for(found: dict | None, device) -> Marker | None:
    """The marker a trial on ``device`` (a ``torch.device``) waits for, from its job's
    ``compile``; None where there is none or it was compiled for another GPU: a cache
    entry made for one device may not be found for another, and a trial that compiled cold in
    its own process (minutes per model) would hold its neighbours' solo windows
    back all that time."""
    import torch

    if not found or device.type != "cuda":
        return None
    made_on = torch.device(found["device"])

    def index(d):
        return d.index if d.index is not None else torch.cuda.current_device()

    return Marker(found["folder"], found["key"]) if index(made_on) == index(device) else None


class Compiles:
    """The background compiles of one run: started with ``start``, ended with ``stop`` (a run
    that ends first has no more use for them; what they finished stays in the cache)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, models: list[tuple[dict, int]], classes: int, protocol: dict, cache_root: str | os.PathLike,
              device: str, device_name: str) -> dict[str, dict]:
        """One background compile per model, given as (spec, input size), that trains in full
        on a CUDA GPU with graphs, bf16 and ``compile="auto"``, unless an earlier run left its
        marker. Returns, per model id, what its trial needs (``TrialJob.compile``): the
        cache folder and the marker's key."""
        if (protocol.get("train_only_top_layer") or not protocol.get("cuda_graphs")
                or protocol.get("compile", "off") != "auto" or protocol.get("precision") == "fp32"):
            return {}
        folder = Path(cache_root) / FOLDER
        found: dict[str, dict] = {}
        for spec, size in models:
            if not engine_for(spec["framework"]).compiles or spec["id"] in found:
                continue
            folder.mkdir(parents=True, exist_ok=True)
            marker = Marker(str(folder), compile_key(spec["id"], classes, size, protocol, device_name))
            found[spec["id"]] = {"folder": str(folder), "key": marker.key, "device": device}
            if marker.read() is not None:
                continue  # compiled (or failed) in an earlier run
            args = {"spec": spec, "classes": classes, "input_size": size, "protocol": protocol, "device": device,
                    "folder": str(folder), "key": marker.key, "parent": os.getpid()}
            with open(folder / f"{marker.key}.log", "w") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "bakeoff.engines.torch.compile", json.dumps(args)],
                    env=os.environ | cache_env(folder), stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True))  # its own group: see keeping_out
            # For the trial's solo sections (``GpuShare.keeping_out``): the process is not
            # reaped before ``stop``, so its id stays its own until the trials have ended.
            found[spec["id"]]["pid"] = self.procs[-1].pid
        return found

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                if hasattr(signal, "SIGCONT"):  # stopped by a solo section whose trial died meanwhile
                    send_signal([proc.pid], "SIGCONT")
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()


def _compile_once(args: dict) -> str | None:
    """Build the job's model as its trial does (random weights: values do not enter the
    compiled code), compile its training step through the trial's own code path, once;
    returns why that failed, else None."""
    import torch

    from bakeoff.engines.torch.build import create_model, upsample_to_minimum
    from bakeoff.engines.torch.step import make_optimizer, Step
    from bakeoff.protocol import Protocol
    from bakeoff.zoo.spec import ModelSpec

    spec, protocol = ModelSpec.from_dict(args["spec"]), Protocol(**args["protocol"])
    device = torch.device(args["device"])
    torch.cuda.set_device(device)
    model = create_model(spec, args["classes"]).to(device).to(memory_format=torch.channels_last).train()
    size = args["input_size"]
    upsample_to_minimum(model, spec, size)
    opt = make_optimizer(protocol, [p for p in model.parameters() if p.requires_grad], capturable=True)
    step = Step(model, opt, protocol, device, (protocol.batch_size, 3, size, size), True, capture=False)
    return step.adopt(compile_model(model))


def main(argv: list[str] | None = None) -> int:
    args = json.loads((argv or sys.argv[1:])[0])
    if "parent" in args:  # a run killed outright takes its compiles with it (``stop`` is for the rest)
        die_with_parent(args["parent"])
    if hasattr(os, "nice"):
        os.nice(10)  # a background compile yields the CPU to the trials' loops and the image decoders
    marker = Marker(args["folder"], args["key"])
    t0 = time.perf_counter()
    try:
        why = _compile_once(args)
    except Exception as exc:  # before the step could compile (no GPU, the model's build): in the step's own words
        from bakeoff.engines.torch.step import failure_reason

        why = failure_reason(exc)
    if why:  # the trial trains eagerly and stores why
        marker.write("failed", error=why, seconds=time.perf_counter() - t0)
        return 1
    marker.write("ready", seconds=time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
