"""Shared fixtures and helpers: small synthetic image folders that a tiny model can learn in
seconds, a tiny trained run to serve, process helpers. Test files import the helpers with
``from conftest import ...`` (pyproject puts tests/ on the path, from any folder below it)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent  # the repository: bench/ beside tests/
COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def make_colour_folder(root: Path, per_class: int = 24, size: int = 40, seed: int = 0,
                       classes: dict | None = None) -> Path:
    """One folder per class; each image is its class colour plus noise and a random bright square,
    so the task is learnable but not constant."""
    rng = np.random.default_rng(seed)
    for name, rgb in (classes or COLOURS).items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.clip(np.array(rgb)[None, None, :] + rng.normal(0, 25, (size, size, 3)), 0, 255)
            x, y = rng.integers(0, size - 10, 2)
            img[y:y + 10, x:x + 10] = rng.integers(150, 256, 3)
            Image.fromarray(img.astype(np.uint8)).save(folder / f"{name}_{i:03d}.png")
    return root


@pytest.fixture
def colour_folder(tmp_path) -> Path:
    return make_colour_folder(tmp_path / "data")


@pytest.fixture(scope="session")
def shared_colour_folder(tmp_path_factory) -> Path:
    return make_colour_folder(tmp_path_factory.mktemp("shared") / "data")


def small_net(classes=3):
    """A seeded small convolutional net with batch norm: trains in a blink on the CPU."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, classes))


def results_table():
    """A hand-made results table: five finished models (two on no Pareto front) and a failed one."""
    import pandas as pd

    rows = [  # model, framework, status, accuracy, train s, latency ms
        ("base", "pytorch", "ok", 0.80, 100.0, 10.0),
        ("fast", "pytorch", "ok", 0.70, 20.0, 2.0),    # cheapest: on both fronts
        ("best", "tensorflow", "ok", 0.95, 300.0, 30.0),  # most accurate: on both fronts
        ("worse", "pytorch", "ok", 0.75, 150.0, 12.0),  # dominated by base on both
        ("mixed", "tensorflow", "ok", 0.78, 400.0, 5.0),  # slow to train, fast to infer
        ("broken", "pytorch", "failed", None, None, None),
    ]
    df = pd.DataFrame(rows, columns=["model", "framework", "status", "accuracy", "train_time_s", "latency_ms_p50"])
    df["accuracy_ci_low"] = df["accuracy"] - 0.02
    df["accuracy_ci_high"] = df["accuracy"] + 0.02
    return df


TINY = dict(epochs=2, lr=0.002, batch_size=16, image_size=32, pretrained=False, progress=False, device="cpu")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs: a zombie not yet reaped has ended (read from /proc where
    there is one)."""
    if not Path("/proc/self/stat").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        return process_state(pid) != "Z"
    except (OSError, IndexError):
        return False


def process_state(pid: int) -> str:
    """Process ``pid``'s state letter from /proc: R, S, T (stopped), Z (ended, not reaped) ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def becomes_stopped(pid: int, stopped: bool) -> bool:
    """Whether process ``pid`` is stopped (``stopped``) or not within 3 s."""
    deadline = time.time() + 3
    while time.time() < deadline:
        if (process_state(pid) == "T") == stopped:
            return True
        time.sleep(0.01)
    return False


def spinning_child(code: str = ""):
    """A Python process that prints "ready" and then wakes every 5 ms until it is ended."""
    child = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n" + code +
                              "print('ready', flush=True)\nwhile True: time.sleep(0.005)"],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    return child


def held_in_thread(section, done) -> threading.Thread:
    """A started thread inside ``section()`` for 0.2 s, then ``done()``; returns once it is inside."""
    inside = threading.Event()

    def hold():
        with section():
            inside.set()
            time.sleep(0.2)
            done()

    t = threading.Thread(target=hold)
    t.start()
    inside.wait()
    return t


def wait_for(predicate, timeout: float, what: str):
    """``predicate()``'s first true value within ``timeout`` seconds, else an assertion error."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


TF_MOBILENET = "tensorflow-ic-imagenet-mobilenet-v2-050-224-classification-4"

# three repeats of one model on four images: accuracies 0.75, 0.5 and 1.0
CORRECT = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=float)


@pytest.fixture(scope="module")
def keras():
    """Keras on the CPU, for the Keras engine's tests (their files skip where it is missing)."""
    from bakeoff.engines.keras.trial import import_keras

    return import_keras("cpu")


def run_main(capsys, args) -> tuple[int, str, str]:
    """The CLI run in this process: (exit code, stdout, stderr)."""
    from bakeoff.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(args)
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def keras_numpy(x) -> np.ndarray:
    import keras

    return keras.ops.convert_to_numpy(x)


def stand_in_worker(jobs, queue, capacity=1, prewarm=False):
    """Stands in for the trial worker. Alone, every trial succeeds; beside others a trial does
    what its spec's "beside" says: succeed (the default), fail to capture its step ("alone"),
    fail ("error") or end the whole process ("crash"); on a device named in its spec's "on"
    ({device: what}) it does that wherever it runs, "kill" (SIGKILL) included: a Keras trial
    given its GPU's lock files is killed while alone on the GPU, and one that holds marks
    itself off the lock, as a real one compiling would; a trial given the run's background
    compiles is killed alone with them stopped. A trial with a
    "hold" (seconds) lasts that long, in a thread of its own beside others as a real trial
    runs, and notes its device and wall-clock start and end. Here, not in a test file: a
    spawned process imports it by its module's name, which tests/ on the path resolves."""
    out_dir, threads, gates = None, [], []
    while (job := jobs.get()) is not None:
        if isinstance(job, tuple):  # ("capacity", n), or ("last", True): noted in a file of the run
            if job[0] == "capacity":
                capacity = job[1]
            elif out_dir is not None:
                with open(Path(out_dir) / "messages.txt", "a") as f:
                    f.write(f"{job[0]}\n")
            continue
        out_dir = job.out_dir
        with open(Path(out_dir) / "messages.txt", "a") as f:
            f.write(f"{job.spec['id']}\n")
        beside = job.spec.get("beside", "ok") if capacity > 1 or job.gpu_gate else "ok"
        does = job.spec.get("on", {}).get(job.device, beside)
        if does == "alone":
            queue.put(("alone", job.key, "own stream, thread-local: RuntimeError: capture failed"))
        elif does == "error":
            queue.put(("error", job.key, {"error": f"out of memory: CUDA out of memory on {job.device}",
                                          "traceback": ""}))
        elif does == "crash":
            queue.close()
            queue.join_thread()  # what was sent before the crash arrives
            os._exit(3)
        elif does == "kill" and job.gpu_gate:  # killed while alone on the GPU, its neighbours stopped
            from bakeoff.process_gate import ProcessGate

            time.sleep(1.0)  # the neighbours have marked themselves off the lock
            with ProcessGate(job.gpu_gate).exclusive():
                time.sleep(0.3)
                os.kill(os.getpid(), signal.SIGKILL)
        elif does == "kill" and job.background:  # killed alone on the GPU, the run's compiles stopped
            from bakeoff.gpu_share import LoneGate

            gate = LoneGate()
            with gate.keeping_out(job.background["pids"]), gate.exclusive():
                os.kill(os.getpid(), signal.SIGKILL)
        elif does == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif job.spec.get("hold") and capacity == 1:  # one at a time, as the worker runs a lone trial
            if job.gpu_gate:  # beside others, off the lock: stopped while one of them is alone
                from bakeoff.process_gate import ProcessGate

                gates.append(ProcessGate(job.gpu_gate))
            _held_trial(job, queue, capacity, prewarm)
        elif job.spec.get("hold"):
            threads.append(threading.Thread(target=_held_trial, args=(job, queue, capacity, prewarm), daemon=True))
            threads[-1].start()
        else:
            queue.put(("result", job.key, _stand_in_result(job, capacity, prewarm)))
    for thread in threads:
        thread.join()


def _stand_in_result(job, capacity, prewarm) -> dict:
    return {"model": job.spec["id"], "status": "ok", "accuracy": 0.5, "concurrent_trials_seen": capacity,
            "shared_gpu_error": job.shared_gpu_error, "pid": os.getpid(), "prewarm": prewarm,
            "device": job.device, "gpu_gate": job.gpu_gate}


def _held_trial(job, queue, capacity, prewarm) -> None:
    start = time.time()
    time.sleep(job.spec["hold"])
    queue.put(("result", job.key, _stand_in_result(job, capacity, prewarm) | {"start": start, "end": time.time()}))


def fake_run(tmp_path, beside: dict | None = None, n=3, hold: float = 0.0, on: dict | None = None,
             keras: tuple = ()):
    """``n`` jobs for ``stand_in_worker`` (m0, m1, ...; ``beside``: model -> what it does
    beside others; ``on``: model -> {device: what it does there}; ``hold``: seconds each
    trial lasts; ``keras``: the models that are Keras trials, a process each), a store and a
    started run."""
    from bakeoff.store import Store
    from bakeoff.job import TrialJob

    tmp_path.mkdir(parents=True, exist_ok=True)
    jobs = [TrialJob(spec={"id": f"m{i}", "framework": "tensorflow" if f"m{i}" in keras else "pytorch", "beside": (beside or {}).get(f"m{i}", "ok"),
                           "on": (on or {}).get(f"m{i}", {}), "hold": hold},
                     protocol={}, cache_path="", input_size=8, labels=np.zeros(4, dtype=np.int64),
                     train_idx=np.arange(2), val_idx=np.arange(2, 4), classes=["a"], out_dir=str(tmp_path),
                     device="cpu", key=f"k{i}") for i in range(n)]
    store = Store(tmp_path / "bakeoff.db")
    return jobs, store, store.start_run("test", None, {j.spec["id"]: j.key for j in jobs}, {}, {}, {})


SERVED_MODEL = "timm/test_resnet"
SERVED_COLOURS = {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


def colour_image(rgb, size=(52, 41), fmt="JPEG", seed=0) -> bytes:
    """A noisy solid-colour image: the class is its colour, so a tiny model learns it in 2 epochs."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb)[None, None] + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def trained_run(tmp_path_factory, endpoint_latency: int = 0) -> Path:
    """The tiny run shared by this session's serve and export tests (3 colour classes, timm/test_resnet
    at 32 px): trained by the first caller, resumed (not trained again) by the next."""
    from bakeoff.api import run_comparison

    base = tmp_path_factory.getbasetemp() / "tiny-colour-run"
    data, out = base / "colours", base / "run"
    if not data.exists():
        for c, (name, rgb) in enumerate(SERVED_COLOURS.items()):
            (data / name).mkdir(parents=True)
            for i in range(16):
                fmt = "PNG" if i % 2 else "JPEG"
                size = (36 + (i * 7) % 25, 36 + (i * 11) % 23)
                (data / name / f"{i}.{fmt.lower()}").write_bytes(colour_image(rgb, size, fmt, seed=100 * c + i))
    run_comparison(data, [SERVED_MODEL], out=out, epochs=2, lr=0.01, batch_size=8, pretrained=False, image_size=32,
                   device="cpu", progress=False, command="test", endpoint_latency=endpoint_latency)
    return out


def classify_concurrently(url: str, clients: int, per_client: int) -> tuple[list[bool], list[str]]:
    """``clients`` threads, each on its own kept-alive connection, POST ``per_client`` colour images
    to ``url``'s /invocations: whether each answer named the right colour, and the failures."""
    import httpx

    bodies = {name: colour_image(rgb, seed=7) for name, rgb in SERVED_COLOURS.items()}
    names, answers, failures = list(bodies), [], []

    def client(k):
        with httpx.Client(timeout=60) as c:
            for i in range(per_client):
                name = names[(k + i) % len(names)]
                try:
                    r = c.post(url + "/invocations", content=bodies[name],
                               headers={"Content-Type": "application/x-image", "Accept": "application/json;verbose"})
                    answers.append(r.status_code == 200 and r.json()["predicted_label"] == name)
                except Exception as exc:  # a refused or dropped connection is a failure too
                    failures.append(repr(exc))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return answers, failures
