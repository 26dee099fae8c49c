"""Where building the decoded-image cache spends its time: reading, checking, decoding, writing.

Question: on the H200 the batched GPU path (`bakeoff.data.gpu_decode`) built the 55k cache in
about 60 s, slower than PIL in 16 processes. This script times each stage of that path on its
own, then both whole paths, on the same files:

1. read every file's bytes (cold page cache where the machine lets us drop it), N threads;
2. the header check that routes a file to the batched decoder (`batchable`);
3. `decode_jpeg` in batches on the device, resize to the cache side, copy to the host;
4. write those rows into a fresh memory-mapped ``.npy``, one thread and several;
5. `build_cache` end to end: batched decoder on the device, and PIL in processes.

Each figure is one timed pass after the files are read once (stages 2-4 run on bytes in
memory); stages 1 and 5 drop the page cache first when allowed (root), else say "warm".

    PYTHONPATH=src python3 bench/decode.py --data fashion55k --device cuda:0 --scratch /tmp/decode-bench
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from bakeoff.data.cache import build_cache
from bakeoff.data.gpu_decode import batchable
from bakeoff.data.images import square_resize_tensor
from bakeoff.data.scan import scan_folder

from harness import parser  # bench/, beside this script


def _drop_page_cache() -> str:
    try:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "cold"
    except OSError:
        return "warm"


def _timed(label: str, fn, n: int, unit: str = "files") -> float:
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    s = time.perf_counter() - t0
    print(f"  {label:58s} {s:7.2f} s  {n / s:10,.0f} {unit}/s", flush=True)
    return s


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--data", required=True, help="an image folder (one sub-folder per class)")
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--scratch", default=None, help="folder for the test caches (default: a temporary one)")
    args = ap.parse_args()
    folder = scan_folder(args.data)
    files = [str(folder.root / p) for p in folder.paths]
    n, side, device = len(files), args.side, torch.device(args.device)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="bakeoff-decode-"))
    scratch.mkdir(parents=True, exist_ok=True)
    print(f"{n} files, side {side}, device {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), {os.cpu_count()} cores")

    from torchvision.io import ImageReadMode, decode_jpeg

    print("1. read bytes")
    blobs: list[bytes] = []
    for threads in (8, 32):
        state = _drop_page_cache()
        with ThreadPoolExecutor(threads) as pool:
            _timed(f"{threads} threads ({state} page cache)",
                   lambda: blobs.__setitem__(slice(None), list(pool.map(lambda p: Path(p).read_bytes(), files))), n)
    print("2. header check (batchable)")
    with ThreadPoolExecutor(8) as pool:
        _timed("8 threads", lambda: list(pool.map(batchable, blobs)), n)
    _timed("1 thread", lambda: [batchable(b) for b in blobs], n)
    print(f"3. decode_jpeg on {device}, batches of {args.batch}")
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    decode_jpeg(tensors[:args.batch], mode=ImageReadMode.RGB, device=device)  # warm-up: nvJPEG handles
    rows = np.empty((n, side, side, 3), dtype=np.uint8)

    def decode(resize: bool, to_host: bool) -> None:
        for lo in range(0, n, args.batch):
            out = decode_jpeg(tensors[lo:lo + args.batch], mode=ImageReadMode.RGB, device=device)
            if resize:
                out = square_resize_tensor(torch.stack(out), side, "bilinear")
            if to_host:
                rows[lo:lo + len(out)] = out.cpu().numpy()

    _timed("decode only", lambda: decode(False, False), n, "img")
    _timed("decode + stack + resize", lambda: decode(True, False), n, "img")
    _timed("decode + resize + copy to host", lambda: decode(True, True), n, "img")
    print(f"4. write {rows.nbytes / 2**30:.1f} GiB into a fresh memory-mapped .npy")
    for threads in (1, 8):
        path = scratch / f"write{threads}.npy"
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=rows.shape)
        chunk = args.batch

        def write(out=out) -> None:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda lo: out.__setitem__(slice(lo, lo + chunk), rows[lo:lo + chunk]),
                              range(0, n, chunk)))
            out.flush()

        _timed(f"{threads} thread(s), batch rows, flush", write, n, "img")
        del out
        path.unlink()
    rows = tensors = blobs = None  # free their memory before the end-to-end builds
    print("5. build_cache end to end")
    for label, dev in ((f"batched decoder on {device}", str(device)), ("PIL in processes", None)):
        target = scratch / "cache"
        shutil.rmtree(target, ignore_errors=True)
        state = _drop_page_cache()
        t0 = time.perf_counter()
        build_cache(files, target, "bench", side, "bilinear", decode_device=dev)
        s = time.perf_counter() - t0
        print(f"  {label + f' ({state} page cache)':58s} {s:7.2f} s  {n / s:10,.0f} img/s", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
