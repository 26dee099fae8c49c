"""bakeoff against the textbook PyTorch loop, side by side, on the same data, models and protocol.

Claim checked (issue "decode once, train many"): on one NVIDIA H200, the study's 7 PyTorch models
plus inception-v3, 5 epochs, batch 16, lr 0.001, Adam, on a PlantVillage-sized set (55k 256x256
JPEGs), bakeoff is >= 6x faster end to end than the textbook loop at equal accuracy, and within
1.5x of the compute floor. Steady-state images/s of each loop are measured here on a bounded
number of steps per model (after warm-up, device-synchronised); the 5-epoch totals are
projections from those rates plus the measured data preparation, labelled as such. Accuracy is
compared on real full epochs of one model.

    PYTHONPATH=src python3 bench/speed.py --data fashion55k --out speed.json
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import textbook  # noqa: E402

from bakeoff.data.batches import Batcher  # noqa: E402
from bakeoff.data.cache import cache_side  # noqa: E402
from bakeoff.data.prepare import prepare_data  # noqa: E402
from bakeoff.engines.torch.build import build_model  # noqa: E402
from bakeoff.engines.torch.fit import autocast_for, fit  # noqa: E402
from bakeoff.engines.torch.step import tuned  # noqa: E402
from bakeoff.measure import classification_metrics  # noqa: E402
from bakeoff.protocol import Protocol  # noqa: E402
from bakeoff.zoo import resolve  # noqa: E402

from harness import machine, parser, write_json  # noqa: E402  (bench/, beside this script)

ARCHS = ["alexnet", "resnet34", "resnet152", "mobilenet_v2", "densenet121", "densenet201", "googlenet",
         "inception_v3"]


def _side(arch) -> int:
    spec = resolve(f"torchvision/{arch}")
    return cache_side(spec.input_size, spec.crop_pct)


def bakeoff_rate(arch, images, labels, train_idx, val_idx, steps, cuda_graphs, device) -> dict:
    """images/s of bakeoff's own training loop (fit) over ``steps`` batches of 16."""
    spec = resolve(f"torchvision/{arch}")
    proto = Protocol(epochs=1, pretrained=False, cuda_graphs=cuda_graphs)
    model, _ = build_model(spec, int(labels.max()) + 1, False)
    model = model.to(device).to(memory_format=torch.channels_last)
    sub = train_idx[: steps * proto.batch_size]
    batcher = Batcher.create(images, np.concatenate([sub, val_idx[:256]]), spec.input_size, spec.mean, spec.std,
                             device, channels_last=True, side=_side(arch))
    out = fit(model, batcher, sub, labels, val_idx[:256], proto, device)
    return {"images_per_s": len(sub) / out.train_time_s, "capture_s": out.capture_time_s,
            "mode": out.step_mode, "capture_error": out.capture_error}


def floor_rate(arch, images, idx, device, batch=128, steps=30) -> float:
    """Compute only: batch 128, bf16, channels-last, images already on the GPU, no augmentation,
    cuDNN autotuned during the warm-up (until 2026-12 the floor was timed without autotuning,
    while bakeoff's own steps were tuned: the floor's rates were low)."""
    spec = resolve(f"torchvision/{arch}")
    model, _ = build_model(spec, 10, False)
    model = model.to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batcher = Batcher.create(images, idx[: batch * 4], spec.input_size, spec.mean, spec.std, device, True,
                             side=_side(arch))
    xs = [batcher.eval_batch(idx[i * batch:(i + 1) * batch]) for i in range(4)]
    y = torch.randint(0, 10, (batch,), device=device)
    proto = Protocol()

    def step(i):
        with autocast_for(proto, device):
            loss = torch.nn.functional.cross_entropy(model(xs[i % 4]).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with tuned(device, "floor", autotune=True):  # cuDNN's fastest kernels, timed, not its heuristics
        for i in range(5):
            step(i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def _pack_worker(arch, cache_path, labels, train_idx, val_idx, steps, graphs, barrier, q):
    torch.cuda.set_device(0)
    images = np.load(cache_path, mmap_mode="r")
    barrier.wait()
    r = bakeoff_rate(arch, images, labels, train_idx, val_idx, steps, graphs, torch.device("cuda"))
    q.put(r["images_per_s"])


def packed_rate(arch, cache_path, labels, train_idx, val_idx, steps, graphs, n) -> float:
    """Sum of images/s of ``n`` trials of the same model training at once on one GPU."""
    ctx = mp.get_context("spawn")
    barrier, q = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_pack_worker, args=(arch, cache_path, labels, train_idx, val_idx, steps, graphs,
                                                     barrier, q)) for _ in range(n)]
    for p in procs:
        p.start()
    rates = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return float(sum(rates))


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="speed.json")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--models", default=",".join(ARCHS))
    ap.add_argument("--textbook-steps", type=int, default=150)
    ap.add_argument("--bakeoff-steps", type=int, default=300)
    ap.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1))
    ap.add_argument("--accuracy-model", default="resnet34")
    ap.add_argument("--accuracy-epochs", type=int, default=1)
    ap.add_argument("--eager-models", default="resnet34,mobilenet_v2,alexnet",
                    help="models also timed with the eager step, to show what the graph buys")
    ap.add_argument("--pack", type=int, default=4, help="trials per GPU for the packing comparison (0: skip)")
    ap.add_argument("--epochs", type=int, default=5, help="epochs of the projected totals")
    a = ap.parse_args()
    device = torch.device("cuda")
    archs = a.models.split(",")
    report = {"machine": machine(device), "models": {}}

    t0 = time.perf_counter()
    sides = {arch: _side(arch) for arch in archs}
    from bakeoff.data.prepare import storage_side
    from bakeoff.data.scan import scan_folder

    folder = scan_folder(a.data)
    store = storage_side(list(sides.values()), [str(folder.root / p) for p in folder.paths])
    data = prepare_data(a.data, cache_dir=a.cache or Path(a.out).parent / "cache", first_side=(store, "bilinear"))
    report["prepare_s"] = time.perf_counter() - t0
    report["cache_side"] = store
    n_train, n_val = len(data.train_idx), len(data.val_idx)
    report.update(n_train=n_train, n_val=n_val, n_images=len(data.files))
    print(f"data prepared (decode once at {store}px): {report['prepare_s']:.1f}s, "
          f"{n_train} train / {n_val} val", flush=True)
    train_files = {data.files[i] for i in data.train_idx}

    for arch in archs:
        images = data.caches[(store, "bilinear")].array()
        r = {}
        tl, _ = textbook.loaders(a.data, train_files, resolve(f"torchvision/{arch}").input_size, 16, a.workers)
        m = textbook.build(arch, len(data.classes), device)
        r["textbook"] = textbook.train(m, tl, device, max_steps=a.textbook_steps, warmup_steps=20)["images_per_s"]
        del m, tl
        for graphs in (True, False) if arch in a.eager_models.split(",") else (True,):
            key = "bakeoff_graph" if graphs else "bakeoff_eager"
            b = bakeoff_rate(arch, images, data.labels, data.train_idx, data.val_idx, a.bakeoff_steps, graphs, device)
            r[key] = b["images_per_s"]
            if graphs:
                r["graph_mode"], r["capture_s"], r["capture_error"] = b["mode"], b["capture_s"], b["capture_error"]
        r["floor"] = floor_rate(arch, images, data.train_idx, device)
        torch.cuda.empty_cache()
        best = max(r["bakeoff_graph"], r.get("bakeoff_eager", 0.0))
        r["textbook_total_s"] = a.epochs * n_train / r["textbook"]
        r["bakeoff_total_s"] = a.epochs * n_train / best
        r["floor_total_s"] = a.epochs * n_train / r["floor"]
        report["models"][arch] = r
        print(f"{arch:14s} textbook {r['textbook']:8.0f}  graph {r['bakeoff_graph']:8.0f} ({r['graph_mode']})  "
              f"eager {r.get('bakeoff_eager', float('nan')):8.0f}  floor {r['floor']:8.0f} img/s", flush=True)
        write_json(a.out, report)

    if a.pack:
        report["packing"] = {}
        for arch in [x for x in ("resnet34", "mobilenet_v2") if x in archs]:
            cache_path = str(data.caches[(store, "bilinear")].path)
            pk = {f"eager_x{a.pack}": packed_rate(arch, cache_path, data.labels, data.train_idx, data.val_idx,
                                                  a.bakeoff_steps, False, a.pack),
                  f"graph_x{a.pack}": packed_rate(arch, cache_path, data.labels, data.train_idx, data.val_idx,
                                                  a.bakeoff_steps, True, a.pack)}
            report["packing"][arch] = pk
            print(f"packing {arch}: {pk}", flush=True)
            write_json(a.out, report)

    if a.accuracy_model:
        arch = a.accuracy_model
        acc = {}
        tl, vl = textbook.loaders(a.data, train_files, 224, 16, a.workers)
        m = textbook.build(arch, len(data.classes), device)
        t = time.perf_counter()
        tr = textbook.train(m, tl, device, epochs=a.accuracy_epochs)
        acc["textbook_train_s"] = time.perf_counter() - t
        acc["textbook_accuracy"] = textbook.evaluate(m, vl, device)
        del m, tl, vl
        spec = resolve(f"torchvision/{arch}")
        proto = Protocol(epochs=a.accuracy_epochs, pretrained=False)
        model, _ = build_model(spec, len(data.classes), False)
        model = model.to(device).to(memory_format=torch.channels_last)
        images = data.caches[(store, "bilinear")].array()
        batcher = Batcher.create(images, np.concatenate([data.train_idx, data.val_idx]), spec.input_size, spec.mean,
                                 spec.std, device, True, side=_side(arch))
        out = fit(model, batcher, data.train_idx, data.labels, data.val_idx, proto, device)
        metrics = classification_metrics(data.labels[data.val_idx], out.final_val_probs, data.classes)
        acc.update(bakeoff_train_s=out.train_time_s, bakeoff_accuracy=metrics["accuracy"],
                   bakeoff_ci=[metrics["accuracy_ci_low"], metrics["accuracy_ci_high"]], epochs=a.accuracy_epochs,
                   textbook_images_per_s=tr["images_per_s"])
        from bakeoff.measure import wilson_interval

        acc["textbook_ci"] = list(wilson_interval(round(acc["textbook_accuracy"] * n_val), n_val))
        report["accuracy"] = acc
        print(f"accuracy {arch} {a.accuracy_epochs} epoch(s): textbook {acc['textbook_accuracy']:.4f} "
              f"{acc['textbook_ci']} in {acc['textbook_train_s']:.0f}s; bakeoff {acc['bakeoff_accuracy']:.4f} "
              f"{acc['bakeoff_ci']} in {acc['bakeoff_train_s']:.0f}s", flush=True)

    tb = sum(r["textbook_total_s"] for r in report["models"].values())
    bo = sum(r["bakeoff_total_s"] for r in report["models"].values()) + report["prepare_s"]
    fl = sum(r["floor_total_s"] for r in report["models"].values())
    report["projected"] = {"textbook_s": tb, "bakeoff_s": bo, "floor_s": fl, "speedup": tb / bo,
                           "vs_floor": bo / fl}
    print(f"\nprojected {a.epochs} epochs on {n_train} images: textbook {tb:.0f}s, bakeoff {bo:.0f}s "
          f"(incl. {report['prepare_s']:.0f}s data preparation), floor {fl:.0f}s; speed-up {tb / bo:.1f}x, "
          f"{bo / fl:.2f}x the floor")
    write_json(a.out, report)


if __name__ == "__main__":
    main()
