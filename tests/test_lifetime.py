"""Nothing lost, nobody in: a run killed outright takes its worker with it, leaves nothing the
next run does not clean, and a second run into a folder in use is refused. Real processes
throughout (Linux: the tests read /proc)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from bakeoff.compare.outputs import write_outputs
from bakeoff.lifetime import hold_folder, temp_path
from conftest import process_alive, wait_for

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")

BAKEOFF = [sys.executable, "-m", "bakeoff.cli"]
MODELS = "timm/test_resnet,timm/test_efficientnet"


def _args(data, out, epochs, models=MODELS) -> list[str]:
    return [*BAKEOFF, "run", str(data), "--models", models, "--out", str(out), "--no-pretrained",
            "--image-size", "32", "--epochs", str(epochs), "--device", "cpu"]


def _children(pid: int) -> dict[int, str]:
    """The live child processes of ``pid``, with their command lines."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.fixture(scope="module")
def killed(tmp_path_factory, shared_colour_folder):
    """A run killed outright (SIGKILL to the main process alone, as the out-of-memory killer
    does) while its worker trains the first of two models; a second run and a report started
    while it was still alive."""
    out = tmp_path_factory.mktemp("robust") / "out"
    run = subprocess.Popen(_args(shared_colour_folder, out, 10_000), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        def worker(training: bool = False):  # the trial process (training: it has mapped the images)
            for pid, cmd in _children(run.pid).items():
                try:
                    maps = Path(f"/proc/{pid}/maps").read_text() if training else ""
                except OSError:
                    continue
                if "multiprocessing.spawn" in cmd and (not training or re.search(r"/s\d+-\w+\.npy$", maps, re.M)):
                    return pid
            assert run.poll() is None, run.communicate()
            return None

        # the run has stored itself as running and started its worker: another run and a report
        # now, while the worker starts up
        pid = wait_for(worker, 120, "the trial worker to start")
        second = subprocess.Popen(_args(shared_colour_folder, out, 1), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        during = subprocess.run([*BAKEOFF, "report", str(out)], capture_output=True, text=True, timeout=120)
        second_out, second_err = second.communicate(timeout=120)
        assert wait_for(lambda: worker(training=True), 120, "the trial worker to start training") == pid
        run.send_signal(signal.SIGKILL)
        killed_at = time.time()
        run.wait(timeout=30)
        wait_for(lambda: not process_alive(pid), 30, f"worker {pid} to end")
        ended_s = time.time() - killed_at
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    return SimpleNamespace(out=out, data=shared_colour_folder, run_pid=run.pid, worker=pid, ended_s=ended_s,
                           second=(second.returncode, second_out, second_err), during=during)


def test_killing_the_main_process_ends_its_worker_within_seconds(killed):
    assert killed.ended_s < 5.0, killed.ended_s
    assert not (killed.out / "models").exists() or not any((killed.out / "models").iterdir())
    with sqlite3.connect(killed.out / "bakeoff.db") as db:
        assert db.execute("SELECT count(*) FROM trials").fetchone() == (0,)
        assert db.execute("SELECT status FROM runs").fetchall() == [("running",)]  # nobody said otherwise


def test_a_second_run_into_a_folder_in_use_is_refused_with_one_line(killed):
    code, stdout, stderr = killed.second
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr + stdout, stderr
    assert "in use by another run" in lines[0] and f"pid {killed.run_pid}" in lines[0]
    with sqlite3.connect(killed.out / "bakeoff.db") as db:  # it started no run of its own
        assert db.execute("SELECT count(*) FROM runs").fetchone() == (1,)


def test_report_names_the_models_without_a_result(killed):
    # while the run trains: the report reads the folder and says who is still being trained
    assert killed.during.returncode == 0, killed.during.stderr
    during = " ".join(killed.during.stdout.split())
    assert "2 of 2 models have no result (timm/test_resnet, timm/test_efficientnet)" in during
    assert "still being trained" in during
    # after the kill: the run reads as interrupted, and the report file says so too
    after = write_outputs(killed.out)
    assert after.run["missing"] == ["timm/test_resnet", "timm/test_efficientnet"]
    assert "(timm/test_resnet, timm/test_efficientnet): the run was interrupted before training them" \
        in after.warning
    report = " ".join((killed.out / "report.md").read_text().split())
    assert "(timm/test_resnet, timm/test_efficientnet): the run was interrupted" in report


def test_the_next_run_marks_the_killed_one_and_cleans_what_it_left(killed, tmp_path):
    # in a copy of the killed run's folder: the other tests read it as the kill left it
    out = shutil.copytree(killed.out, tmp_path / "out")
    cache = next((out / "cache").iterdir())
    meta = next(cache.glob("*.json"))
    # what a run killed while decoding leaves: a cache-sized temporary named for its (dead) writer
    ours = temp_path(cache / "s32-bilinear.npy")
    stale = ours.with_name(ours.name.replace(f"-{os.getpid()}.tmp", f"-{killed.run_pid}.tmp"))
    stale.write_bytes(b"\0" * 1024)
    live = temp_path(cache / "s40-bilinear.npy")  # this process's: a live writer's file stays
    live.write_bytes(b"\0" * 1024)
    meta.write_text(meta.read_text()[:10])  # truncated metadata
    # The same command again. All that is checked happens before its first trial starts (it has
    # stored itself as a run by then), so it is killed there too rather than trained to the end.
    rerun = subprocess.Popen(_args(killed.data, out, 10_000), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        def started():
            assert rerun.poll() is None, rerun.communicate()
            with sqlite3.connect(out / "bakeoff.db") as db:
                return db.execute("SELECT count(*) FROM runs").fetchone()[0] == 2

        wait_for(started, 120, "the second run to start")
    finally:
        rerun.kill()
        _, err = rerun.communicate(timeout=60)
    assert not stale.exists() and live.exists()
    live.unlink()
    assert json.loads(meta.read_text())["n"] > 0  # rebuilt
    warned = [ln for ln in err.splitlines() if "damaged" in ln]
    assert len(warned) == 1 and "decoding the images again" in warned[0] and "Traceback" not in err
    with sqlite3.connect(out / "bakeoff.db") as db:
        runs = db.execute("SELECT status, finished IS NOT NULL FROM runs ORDER BY id").fetchall()
    assert runs == [("interrupted", 1), ("running", 0)]


def test_a_child_ends_when_its_parent_is_killed(tmp_path):
    # the portable watchdog alone (no parent-death signal): a child of a plain process, not of
    # multiprocessing, polls its parent's id
    pid_file = tmp_path / "child.pid"
    child = ("import os, sys, time; from bakeoff.lifetime import watch_parent; "
             "watch_parent(int(sys.argv[1]), poll_s=0.1); open(sys.argv[2], 'w').write(str(os.getpid())); "
             "time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c",
                               "import os, subprocess, sys, time; "
                               f"subprocess.Popen([sys.executable, '-c', {child!r}, str(os.getpid()), {str(pid_file)!r}]);"
                               " time.sleep(60)"])
    try:
        pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), 30, "the child to start"))
        assert process_alive(pid)
        parent.kill()
        parent.wait()
        wait_for(lambda: not process_alive(pid), 5, f"child {pid} to end")
    finally:
        parent.kill()


def test_the_folder_lock_is_free_once_its_holder_is_gone(tmp_path):
    from bakeoff.errors import BakeoffError
    from bakeoff.lifetime import folder_in_use

    assert folder_in_use(tmp_path) is False
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from bakeoff.lifetime import hold_folder\n"
                               "with hold_folder(Path(sys.argv[1])):\n print('held', flush=True); time.sleep(60)",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert folder_in_use(tmp_path) is True
        with pytest.raises(BakeoffError, match=f"in use by another run \\(pid {holder.pid} on "):
            with hold_folder(tmp_path, wait_s=0.1):
                pass
        holder.kill()  # killed outright: the lock goes with the process
        holder.wait()
        assert folder_in_use(tmp_path) is False
        with hold_folder(tmp_path):
            assert folder_in_use(tmp_path) is True
    finally:
        holder.kill()
