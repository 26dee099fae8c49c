"""`bakeoff serve --workers N`: several processes on one port, supervised."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
if not sys.platform.startswith("linux"):
    pytest.skip("--workers needs Linux", allow_module_level=True)

from bakeoff.serve.server import ServerProcess  # noqa: E402
from conftest import SERVED_MODEL as MODEL, classify_concurrently, process_alive, trained_run, wait_for  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory)


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def answering_pids(url: str, connections: int = 40) -> set[int]:
    """The pid behind each of ``connections`` fresh connections' /ping."""
    return {httpx.get(url + "/ping", timeout=30).json()["pid"] for _ in range(connections)}


def test_two_workers_share_the_port_answer_right_and_end_with_the_server(run_dir):
    with ServerProcess(run_dir, MODEL, "cpu", ("--workers", "2")) as srv:
        pids = answering_pids(srv.url)
        # The kernel spreads connections over both workers (2**-39 that 40 all land on one),
        # and both are the server's own children.
        assert len(pids) == 2 and {parent_of(p) for p in pids} == {srv.proc.pid}
        answers, failures = classify_concurrently(srv.url, 6, 12)
        assert failures == [] and len(answers) == 72 and all(answers)
        r = httpx.post(srv.url + "/invocations", content=b"not an image", headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 400 and "cannot decode the image" in r.json()["error"]

        # A worker that dies is replaced; the other answers meanwhile. (A connection the kernel
        # gave the dying worker before its socket closed is reset: a crash loses what it held.)
        killed = min(pids)
        os.kill(killed, 9)
        # Reaped, not just a zombie: a killed process's leader turns zombie before its other
        # threads have ended and closed its socket.
        wait_for(lambda: not Path(f"/proc/{killed}").exists(), 30, "the killed worker to be reaped")
        deadline, now = time.monotonic() + 120, pids
        while time.monotonic() < deadline:
            now = answering_pids(srv.url, 10)
            if len(now) == 2 and killed not in now:
                break
            time.sleep(0.5)
        assert killed not in now and len(now) == 2
        assert "server worker" in srv.stderr_text() and "starting another" in srv.stderr_text()
        workers = now
    assert not any(process_alive(p) for p in workers)


def test_bad_worker_settings_and_start_up_errors_are_one_line(run_dir):
    for extra, wanted in ((["--model", MODEL, "--workers", "0"], "--workers must be at least 1"),
                          (["--model", "timm/nope", "--workers", "2"], "no saved model 'timm/nope'")):
        r = subprocess.run([sys.executable, "-m", "bakeoff.cli", "serve", str(run_dir), "--port", "0",
                            "--device", "cpu", *extra], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stderr
        assert wanted in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
