"""How far compiled kernels' outputs are from eager ones, and both from fp32, per model.

Question: on one random batch, resnet152's compiled logits differed from its eager ones by 17%
of their scale under bf16 (bench/compiled.py), far more than the other models'. Is that the
compiled kernels computing something else, or bf16 rounding that a deep network at random
initialisation amplifies whichever kernels run it? Each model (random init, bakeoff's head for
10 classes, training mode: batch statistics, as the training step sees them) runs one batch
four ways from the same weights: eager fp32 (the reference), eager under bf16 autocast,
compiled (``torch.compile``, default mode) under bf16, compiled in fp32. Printed: each one's
relative error against the reference, ``|out - ref| / |ref|`` (L2 norms over the batch's logits).
Dropout is off (eval mode for dropout modules only), so the four see the same network.

    PYTHONPATH=src python3 bench/numerics.py --models resnet152,resnet34 --device cpu --size 64 --batch 4
"""

from __future__ import annotations

import time

from harness import parser, write_json  # bench/, beside this script


def one(arch: str, device: str, size: int, batch: int) -> dict:
    import torch

    from bakeoff.engines.torch.build import build_model
    from bakeoff.zoo import resolve

    dev = torch.device(device)
    # fp32 means fp32: on a GPU, convolutions and matmuls would otherwise take TF32 by default.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model, _ = build_model(resolve(f"torchvision/{arch}"), 10, False)
    model = model.to(dev).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    x = torch.randn(batch, 3, size, size, device=dev)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def out(fwd, bf16: bool):
        model.load_state_dict(state)  # the batch-norm statistics each pass updates, put back
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            return fwd(x).float()

    ref = out(model, False)
    row = {"model": arch, "device": str(dev), "size": size, "batch": batch, "torch": torch.__version__,
           "logit_scale": float(ref.abs().max())}
    compiled = torch.compile(model, dynamic=False)
    t0 = time.perf_counter()
    for name, fwd, bf16 in (("eager_bf16", model, True), ("compiled_bf16", compiled, True),
                            ("compiled_fp32", compiled, False)):
        row[name] = float((out(fwd, bf16) - ref).norm() / ref.norm())
    row["compile_s"] = time.perf_counter() - t0
    return row


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--models", default="resnet152,resnet34")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = [one(arch, a.device, a.size, a.batch) for arch in a.models.split(",")]
    print("| model | logit scale | eager bf16 | compiled bf16 | compiled fp32 |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['logit_scale']:.3f} | {r['eager_bf16']:.4f} | {r['compiled_bf16']:.4f} | "
              f"{r['compiled_fp32']:.5f} |")
    if a.json:
        write_json(a.json, rows)


if __name__ == "__main__":
    main()
