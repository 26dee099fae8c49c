"""Endpoint latency: a run's models served locally and timed over HTTP, stored beside the
in-process latency; a measurement that fails is recorded and the run kept."""

import pandas as pd
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from bakeoff.errors import BakeoffError  # noqa: E402
from conftest import trained_run  # noqa: E402

N_ENDPOINT = 20


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory, endpoint_latency=N_ENDPOINT)


def test_endpoint_latency_is_stored_beside_in_process_latency(run_dir):
    from bakeoff.compare.outputs import write_outputs

    row = pd.read_csv(run_dir / "results.csv").iloc[0]
    assert row["status"] == "ok"
    assert 0 < row["endpoint_latency_ms_p50"] <= row["endpoint_latency_ms_p95"] < 60_000
    assert row["latency_ms_p50"] > 0
    from bakeoff.store import Store

    result = Store(run_dir / "bakeoff.db").trials()[0]["result"]
    assert result["endpoint_latency_n"] == N_ENDPOINT and result["endpoint_latency_error"] is None
    assert result["endpoint_latency_device"] == "cpu"
    rel = write_outputs(run_dir, inference="endpoint").relative
    assert rel["relative_inference_time"].tolist() == [1.0]
    with pytest.raises(BakeoffError, match="onnx-cpu latency.*bakeoff export"):
        write_outputs(run_dir, inference="onnx-cpu")
    with pytest.raises(BakeoffError, match="--inference must be one of"):
        write_outputs(run_dir, inference="gpu")


def test_a_failed_endpoint_measurement_is_recorded_and_the_run_kept(run_dir, tmp_path):
    import shutil

    from bakeoff.serve.endpoint_latency import add_endpoint_latency
    from bakeoff.store import Store

    shutil.copy(run_dir / "bakeoff.db", tmp_path / "bakeoff.db")  # a run folder whose models/ is gone
    store = Store(tmp_path / "bakeoff.db")
    problems = add_endpoint_latency(tmp_path, store, [t["key"] for t in store.trials()], N_ENDPOINT + 1)
    assert len(problems) == 1 and "models does not exist" in problems[0]
    trial = store.trials()[0]
    assert trial["status"] == "ok" and "models does not exist" in trial["result"]["endpoint_latency_error"]
    assert trial["result"]["accuracy"] is not None
