"""A served model against hostile clients: a real server process on loopback with small limits,
real files (small on disk, large in pixels), raw sockets for the slow clients."""

import base64
import importlib.util
import json
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from bakeoff.serve.server import ServerProcess  # noqa: E402
from conftest import REPO, process_alive, wait_for  # noqa: E402

spec = importlib.util.spec_from_file_location("fuzz_serve", REPO / "bench" / "fuzz_serve.py")
fuzz = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fuzz)

MAX_IMAGES, MAX_PIXELS, MAX_CONNECTIONS, HEADER_TIMEOUT_S, BODY_TIMEOUT_S = 4, 1_000_000, 64, 1.0, 1.0
LINUX = Path("/proc/self/status").is_file()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return fuzz.tiny_saved_model(tmp_path_factory.mktemp("limits") / "run")


@pytest.fixture(scope="module")
def server(run_dir):
    args = ("--max-images", str(MAX_IMAGES), "--max-pixels", str(MAX_PIXELS), "--max-connections", str(MAX_CONNECTIONS),
            "--header-timeout", str(HEADER_TIMEOUT_S), "--body-timeout", str(BODY_TIMEOUT_S), "--max-body-mb", "1")
    with ServerProcess(run_dir, fuzz.MODEL, "cpu", args) as srv:
        yield srv


def post(url, body, ctype="application/x-image"):
    return httpx.post(url + "/invocations", content=body, headers={"Content-Type": ctype,
                                                                   "Accept": "application/json"}, timeout=60)


def small_png():
    return fuzz.encoded("RGB", (40, 30), "PNG", seed=1)


@pytest.mark.skipif(not LINUX, reason="reads the server's peak memory from /proc")
def test_images_huge_in_pixels_are_refused_from_their_header_and_memory_stays_flat(server):
    assert post(server.url, small_png()).status_code == 200
    idle = fuzz.memory_mb(server.proc.pid)["rss_mb"]
    fuzz.reset_peak(server.proc.pid)
    # 13,000 x 13,000 1-bit (20 KB on disk, 507 MB as RGB), and a 1 x 120,000 strip (its resized copy is the cost)
    bodies = [fuzz.flat_png(13000, 13000, 1, 0), fuzz.flat_png(1, 120_000, 8, 0)]
    answers = []
    threads = [threading.Thread(target=lambda b=b: answers.append(post(server.url, b))) for b in bodies * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status_code for r in answers) == [413] * 6
    assert any("13000x13000" in r.json()["error"] and "--max-pixels" in r.json()["error"] for r in answers)
    assert fuzz.memory_mb(server.proc.pid)["peak_mb"] - idle < 100
    assert post(server.url, small_png()).status_code == 200


def test_nested_json_and_too_many_images_are_client_errors(server):
    r = post(server.url, b"[" * 100_000 + b"]" * 100_000, "application/json")
    assert r.status_code == 400 and "flat JSON list" in r.json()["error"]
    image = base64.b64encode(small_png()).decode()
    r = post(server.url, json.dumps([image] * (MAX_IMAGES + 1)), "application/json")
    assert r.status_code == 413 and f"over the limit of {MAX_IMAGES} (--max-images)" in r.json()["error"]
    r = post(server.url, json.dumps([image] * MAX_IMAGES), "application/json")
    assert r.status_code == 200 and len(r.json()) == MAX_IMAGES


def test_slow_clients_neither_starve_ping_nor_fill_the_log(server):
    log_before = len(server.stderr_text())
    port = int(server.url.rsplit(":", 1)[1])
    idle = []
    for _ in range(3 * MAX_CONNECTIONS):  # past the cap: the longest-waiting are closed to let new ones in
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
        idle.append(s)
    for _ in range(50):  # not HTTP at all: each is answered 400 and logged, the log once a minute
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"\x00GARBAGE\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 400")
    t0 = time.perf_counter()
    assert httpx.get(server.url + "/ping", timeout=5).status_code == 200
    assert time.perf_counter() - t0 < 2
    time.sleep(HEADER_TIMEOUT_S + 0.5)
    closed = 0
    for s in idle:
        s.settimeout(1)
        try:
            closed += s.recv(100) == b""
        except ConnectionResetError:
            closed += 1
        s.close()
    assert closed == len(idle)
    assert httpx.get(server.url + "/ping", timeout=5).status_code == 200
    assert len(server.stderr_text()) - log_before < 2000


def test_stalled_bodies_are_cut_off_instead_of_holding_the_endpoint(server):
    port = int(server.url.rsplit(":", 1)[1])
    stalled = []
    for _ in range(5):  # declared bodies of the largest size: more than the body budget holds at once
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-image\r\n"
                  b"Content-Length: 1048576\r\n\r\n" + b"x" * 10)
        stalled.append(s)
    time.sleep(0.2)
    t0 = time.perf_counter()
    assert post(server.url, small_png()).status_code == 200
    assert time.perf_counter() - t0 < BODY_TIMEOUT_S + 1.5
    for s in stalled:
        s.settimeout(5)
        assert s.recv(100).startswith(b"HTTP/1.1 408")
        s.close()


def test_a_small_fuzz_gets_no_server_error(server):
    kinds = fuzz.request_kinds(MAX_PIXELS, MAX_IMAGES, 2**20, seed=3)
    out = fuzz.fire(server.url, kinds, 300, 8, seed=3)
    assert out["answered"] == 300 and out["transport_errors"] == 0, out["transport_errors_first"]
    assert out["server_errors"] == 0 and out["unexpected"] == 0, out["unexpected_first"]
    assert all(out["by_kind"][k] for k in kinds)  # every kind was sent
    assert server.proc.poll() is None


@pytest.mark.skipif(not LINUX, reason="reads the server's limits from /proc")
def test_the_server_may_open_as_many_files_as_allowed_and_caps_connections_under_it(server):
    from bakeoff.errors import BakeoffError
    from bakeoff.serve.limits import connection_limit

    line = next(ln for ln in Path(f"/proc/{server.proc.pid}/limits").read_text().splitlines()
                if ln.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    assert soft == hard
    assert connection_limit(None, 1024) == 448 and connection_limit(None, 1 << 20) == 1000
    with pytest.raises(BakeoffError, match="--max-connections 5000 is over .* at most 448"):
        connection_limit(5000, 1024)


def test_a_bad_limit_is_one_line(run_dir, monkeypatch, capsys):
    from bakeoff import cli

    monkeypatch.setattr(sys, "argv", ["bakeoff", "serve", str(run_dir), "--model", fuzz.MODEL, "--max-pixels", "0"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--max-pixels must be positive, got 0" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["serve", "export"])
def test_a_path_as_model_is_refused_in_one_line(command, run_dir, tmp_path, monkeypatch, capsys):
    from bakeoff import cli

    elsewhere = fuzz.tiny_saved_model(tmp_path / "other") / "models" / "timm__test_resnet"  # a real model folder
    for model in (str(elsewhere), "../../..", "models/../../other"):
        monkeypatch.setattr(sys, "argv", ["bakeoff", command, str(run_dir), "--model", model])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        err = capsys.readouterr().err
        assert exit_info.value.code == 2
        assert "not a path" in err and "saved: timm/test_resnet" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in elsewhere.iterdir()) == ["class_label_to_prediction_index.json", "protocol.json",
                                                           "spec.json", "weights.pt"]


def test_budget_holds_its_capacity_and_serves_in_arrival_order():
    import asyncio

    from bakeoff.serve.limits import Budget

    async def main():
        budget, held, order, most = Budget(10), [0], [], [0]

        async def job(name, n, seconds):
            async with budget.take(n):
                held[0] += n
                most[0] = max(most[0], held[0])
                order.append(name)
                await asyncio.sleep(seconds)
                held[0] -= n

        small = [asyncio.create_task(job(f"s{i}", 3, 0.02)) for i in range(3)]
        await asyncio.sleep(0.001)
        big = asyncio.create_task(job("big", 10, 0.01))  # waits for all ten units
        await asyncio.sleep(0.001)
        late = asyncio.create_task(job("late", 1, 0))  # fits now, but queues behind the big one
        doomed = asyncio.create_task(job("doomed", 10, 0))
        await asyncio.sleep(0.001)
        doomed.cancel()  # a cancelled waiter gives up its place and holds nothing
        await asyncio.gather(*small, big, late, doomed, return_exceptions=True)
        return order, most[0], budget.free

    order, most, free = asyncio.run(main())
    assert order == ["s0", "s1", "s2", "big", "late"]
    assert most == 10 and free == 10


@pytest.mark.skipif(not LINUX, reason="reads the server's state from /proc")
def test_a_server_a_run_started_ends_with_that_run(run_dir):
    """The endpoint-latency server of a run that is killed (as the out-of-memory killer would) does
    not serve on for nobody."""
    import os
    import subprocess

    script = ("import sys, time\nfrom bakeoff.serve.server import ServerProcess\n"
              f"with ServerProcess({str(run_dir)!r}, {fuzz.MODEL!r}, 'cpu') as srv:\n"
              "    print(srv.proc.pid, flush=True)\n    time.sleep(600)\n")
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        served = int(run.stdout.readline())
        os.kill(served, 0)  # serving
        run.kill()
        run.wait()
        wait_for(lambda: not process_alive(served), 10, "the server to end with its run")
    finally:
        run.kill()
