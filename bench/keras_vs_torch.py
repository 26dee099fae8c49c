"""Keras (on JAX) against PyTorch, same architecture, same device: training images/s and batch-1 latency.

Claim measured: for MobileNetV2, ResNet50, ResNet152 (both libraries have the same v1 network), ResNet152V2
(the study's TF model) against torchvision's resnet152, and InceptionV3, how fast each framework
trains (batch 16, Adam, one compiled/eager step per batch, after warm-up, device-synchronised)
and predicts one image (median and p95 of >= 50 synchronised runs after warm-up), on synthetic
uint8 images normalised on the fly. Each (architecture, framework) runs in its own process.

Runs without TensorFlow (Keras on JAX) and without a package index:

    PYTHONPATH=src python3 bench/keras_vs_torch.py --out bench/keras_vs_torch.json
    PYTHONPATH=src python3 bench/keras_vs_torch.py --models mobilenet_v2 --steps 20 --device cpu   # smoke run
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import sys
import time

import numpy as np

from harness import machine, parser, write_json  # bench/, beside this script

# name: (Keras application, its kwargs, torchvision model, input size)
PAIRS = {
    "mobilenet_v2": ("MobileNetV2", {}, "mobilenet_v2", 224),
    "resnet50": ("ResNet50", {}, "resnet50", 224),
    "resnet152": ("ResNet152", {}, "resnet152", 224),
    "resnet152v2_vs_resnet152": ("ResNet152V2", {}, "resnet152", 224),
    "inception_v3": ("InceptionV3", {}, "inception_v3", 299),
}


def _summary(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50_ms": float(np.median(a)), "p95_ms": float(np.percentile(a, 95)), "n": len(a)}


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def keras_worker(name: str, args: dict, queue) -> None:
    try:
        os.environ.setdefault("KERAS_BACKEND", "jax")
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        if args["device"] == "cpu":
            os.environ["JAX_PLATFORMS"] = "cpu"
        import jax
        import jax.numpy as jnp
        import keras

        app, kwargs, _, size = PAIRS[name]
        size = args["size"] or size
        if args["bf16"]:
            keras.config.set_dtype_policy("mixed_bfloat16")
        base = getattr(keras.applications, app)(include_top=False, weights=None, input_shape=(size, size, 3),
                                                 pooling="avg", **kwargs)
        inputs = keras.Input((size, size, 3))
        model = keras.Model(inputs, keras.layers.Dense(1000, dtype="float32")(base(inputs)))
        opt = keras.optimizers.Adam(1e-3, epsilon=1e-8)
        opt.build(model.trainable_variables)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        def loss_and_updates(tv, ntv, x, y):
            logits, ntv = model.stateless_call(tv, ntv, x, training=True)
            return loss_fn(y, logits), ntv

        grad_fn = jax.value_and_grad(loss_and_updates, has_aux=True)

        @jax.jit
        def train_step(state, x_u8, y):
            tv, ntv, ov = state
            x = (x_u8.astype(jnp.float32) / 127.5) - 1.0
            (loss, ntv), grads = grad_fn(tv, ntv, x, y)
            tv, ov = opt.stateless_apply(ov, grads, tv)
            return loss, (tv, ntv, ov)

        predict = jax.jit(lambda tv, ntv, x_u8: model.stateless_call(
            tv, ntv, (x_u8.astype(jnp.float32) / 127.5) - 1.0, training=False)[0])
        state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
                 [v.value for v in opt.variables])
        dev = jax.devices()[0]
        data = jax.device_put(_images(args["batch"] * 4, size), dev)
        labels = jax.device_put(np.arange(args["batch"] * 4) % 1000, dev)

        t0 = time.perf_counter()
        loss, state = train_step(state, data[:args["batch"]], labels[:args["batch"]])
        jax.block_until_ready(state)
        compile_s = time.perf_counter() - t0
        for i in range(args["warmup"]):
            loss, state = train_step(state, data[:args["batch"]], labels[:args["batch"]])
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for i in range(args["steps"]):
            j = (i % 4) * args["batch"]
            loss, state = train_step(state, data[j:j + args["batch"]], labels[j:j + args["batch"]])
        jax.block_until_ready(state)
        train_s = time.perf_counter() - t0

        one = data[:1]
        tv, ntv = state[0], state[1]
        for _ in range(args["warmup"]):
            jax.block_until_ready(predict(tv, ntv, one))
        lat = []
        for _ in range(args["latency_runs"]):
            t0 = time.perf_counter()
            jax.block_until_ready(predict(tv, ntv, one))
            lat.append((time.perf_counter() - t0) * 1000)
        queue.put({"framework": f"keras {keras.__version__} / jax {jax.__version__}", "device": dev.device_kind,
                   "train_images_per_s": args["steps"] * args["batch"] / train_s, "compile_s": compile_s,
                   "latency": _summary(lat), "params": int(model.count_params()), "final_loss": float(loss),
                   "precision": "bf16-mixed" if args["bf16"] else "fp32"})
    except Exception as exc:  # a failing model is an error row, never a crashed sweep
        queue.put({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]})


def torch_worker(name: str, args: dict, queue) -> None:
    try:
        import torch
        import torchvision

        _, _, tv_name, size = PAIRS[name]
        size = args["size"] or size
        device = torch.device("cuda" if args["device"] != "cpu" and torch.cuda.is_available() else "cpu")
        kwargs = {"aux_logits": False, "init_weights": False} if tv_name == "inception_v3" else {}
        model = torchvision.models.get_model(tv_name, weights=None, num_classes=1000, **kwargs).to(device)
        cl = args["bf16"] and device.type == "cuda"
        if cl:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss_fn = torch.nn.CrossEntropyLoss()
        data = torch.from_numpy(_images(args["batch"] * 4, size)).to(device).permute(0, 3, 1, 2)
        labels = (torch.arange(args["batch"] * 4) % 1000).to(device)
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args["bf16"] else \
            (lambda: torch.autocast(device.type, enabled=False))

        def prep(x):
            x = x.float() / 127.5 - 1.0
            return x.contiguous(memory_format=torch.channels_last) if cl else x

        def step(i):
            j = (i % 4) * args["batch"]
            with autocast():
                loss = loss_fn(model(prep(data[j:j + args["batch"]])).float(), labels[j:j + args["batch"]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss

        model.train()
        t0 = time.perf_counter()
        step(0)
        sync()
        first_s = time.perf_counter() - t0
        for i in range(args["warmup"]):
            step(i)
        sync()
        t0 = time.perf_counter()
        for i in range(args["steps"]):
            loss = step(i)
        sync()
        train_s = time.perf_counter() - t0

        model.eval()
        one = data[:1]
        lat = []
        with torch.no_grad():
            for _ in range(args["warmup"]):
                with autocast():
                    model(prep(one))
            sync()
            for _ in range(args["latency_runs"]):
                t0 = time.perf_counter()
                with autocast():
                    model(prep(one))
                sync()
                lat.append((time.perf_counter() - t0) * 1000)
        name_dev = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        queue.put({"framework": f"torch {torch.__version__} (eager)", "device": name_dev,
                   "train_images_per_s": args["steps"] * args["batch"] / train_s, "compile_s": first_s,
                   "latency": _summary(lat), "params": int(sum(p.numel() for p in model.parameters())),
                   "final_loss": float(loss.detach()), "precision": "bf16-autocast" if args["bf16"] else "fp32"})
    except Exception as exc:
        queue.put({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]})


def run_isolated(fn, name: str, args: dict, timeout: float = 900) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=(name, args, q))
    p.start()
    try:
        return q.get(timeout=timeout)
    except Exception:
        return {"error": f"no result (process exit code {p.exitcode})"}
    finally:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--models", default=",".join(PAIRS), help=f"comma-separated, from {', '.join(PAIRS)}")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--latency-runs", type=int, default=100)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                    help="bf16: what bakeoff uses on a GPU (bf16 mixed precision in both frameworks)")
    ap.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    ap.add_argument("--size", type=int, default=0, help="override the input size (smoke runs)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    if a.latency_runs < 50:
        sys.exit("--latency-runs must be at least 50")
    args = {"batch": a.batch, "steps": a.steps, "warmup": a.warmup, "latency_runs": a.latency_runs,
            "bf16": a.precision == "bf16", "device": a.device, "size": a.size}
    rows = []
    header = f"{'model':<26}{'framework':<34}{'train img/s':>12}{'lat p50 ms':>12}{'lat p95 ms':>12}{'compile s':>11}"
    print(header)
    for name in [m.strip() for m in a.models.split(",") if m.strip()]:
        if name not in PAIRS:
            sys.exit(f"unknown model {name!r}; known: {', '.join(PAIRS)}")
        for fw, fn in (("keras", keras_worker), ("torch", torch_worker)):
            r = {"model": name, "side": fw, "keras_app": PAIRS[name][0], "torchvision": PAIRS[name][2]}
            r |= run_isolated(fn, name, args)
            rows.append(r)
            if "error" in r:
                print(f"{name:<26}{fw:<34}error: {r['error']}")
            else:
                print(f"{name:<26}{r['framework'][:33]:<34}{r['train_images_per_s']:>12.1f}"
                      f"{r['latency']['p50_ms']:>12.2f}{r['latency']['p95_ms']:>12.2f}{r['compile_s']:>11.1f}",
                      flush=True)
    if a.out:
        meta = {"args": args, "time": time.strftime("%Y-%m-%d %H:%M:%S")} | machine()
        write_json(a.out, {"meta": meta, "rows": rows})
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
