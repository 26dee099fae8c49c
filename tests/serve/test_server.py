"""The HTTP endpoint: a real server on a loopback port, serving a small model trained here."""

import asyncio
import base64
import json
import sys
import threading

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from bakeoff.errors import BakeoffError  # noqa: E402
from bakeoff.serve.predictor import Preprocess, load_predictor  # noqa: E402
from bakeoff.serve.server import ServerProcess  # noqa: E402
from conftest import SERVED_COLOURS as COLOURS, SERVED_MODEL as MODEL, colour_image, trained_run  # noqa: E402

N_ENDPOINT = 20


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory, endpoint_latency=N_ENDPOINT)


@pytest.fixture(scope="module")
def server(run_dir):
    with ServerProcess(run_dir, MODEL, "cpu", ("--max-body-mb", "0.05")) as srv:
        yield srv


def post(url, body, ctype="application/x-image", accept="application/json;verbose", client=httpx):
    return client.post(url + "/invocations", content=body, headers={"Content-Type": ctype, "Accept": accept},
                       timeout=60)


def test_preprocess_matches_evaluation_batches(tmp_path):
    """One request image becomes the same numbers as the training run's evaluation batches."""
    import torch

    from bakeoff.data.batches import Batcher
    from bakeoff.data.cache import build_cache, cache_side
    from bakeoff.zoo.registry import resolve

    files = []
    for i, (fmt, size) in enumerate([("JPEG", (90, 61)), ("PNG", (33, 70)), ("JPEG", (300, 200))]):
        files.append(tmp_path / f"{i}.{fmt.lower()}")
        files[-1].write_bytes(colour_image((120, 80, 200), size, fmt, seed=i))
    for interpolation in ("bilinear", "bicubic"):
        meta = resolve(MODEL).to_dict() | {"input_size": 32, "interpolation": interpolation}
        pre = Preprocess.from_meta(meta)
        side = cache_side(32, meta["crop_pct"])
        cache = build_cache([str(f) for f in files], tmp_path / "cache", interpolation, side, interpolation)
        batcher = Batcher.create(cache.array(), np.arange(len(files)), 32, meta["mean"], meta["std"],
                                 torch.device("cpu"))
        expected = batcher.eval_batch(np.arange(len(files))).numpy()
        got = np.stack([pre(f.read_bytes()) for f in files])
        assert got.shape == (3, 3, 32, 32)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_ping_and_verbose_predictions_are_right(server, run_dir):
    assert httpx.get(server.url + "/ping").status_code == 200
    predictor = load_predictor(run_dir, MODEL, "cpu")
    for k, (name, rgb) in enumerate(COLOURS.items()):
        body = colour_image(rgb, (64, 48), seed=1000 + k)
        r = post(server.url, body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["labels"] == sorted(COLOURS)
        assert out["predicted_label"] == name
        assert sum(out["probabilities"]) == pytest.approx(1.0, abs=1e-5)
        local = predictor.predict(predictor.preprocess(body)[None])[0]  # the same model in this process
        np.testing.assert_allclose(out["probabilities"], local, atol=1e-5)
        plain = post(server.url, body, accept="application/json").json()
        assert set(plain) == {"probabilities"} and plain["probabilities"] == pytest.approx(out["probabilities"])


def test_small_responses_are_not_held_back_by_nagle(server):
    """Without TCP_NODELAY every answer waits ~40 ms for a delayed ACK: the endpoint latency would be wrong."""
    import time

    with httpx.Client(base_url=server.url) as c:
        c.get("/ping")
        times = []
        for _ in range(15):
            t0 = time.perf_counter()
            assert c.get("/ping").status_code == 200
            times.append((time.perf_counter() - t0) * 1000)
    assert np.median(times) < 25


def test_json_list_of_images_is_answered_in_order(server):
    order = ["green", "red", "blue", "red"]
    images = [base64.b64encode(colour_image(COLOURS[c], fmt="PNG", seed=50 + i)).decode() for i, c in enumerate(order)]
    r = post(server.url, json.dumps(images), ctype="application/json")
    assert r.status_code == 200, r.text
    assert [a["predicted_label"] for a in r.json()] == order
    plain = post(server.url, json.dumps(images[:1]), ctype="application/json", accept="application/json").json()
    assert len(plain) == 1 and set(plain[0]) == {"probabilities"}


def test_bad_requests_get_their_status_and_the_server_stays_up(server):
    good = colour_image(COLOURS["red"])
    cases = [
        (good, "text/plain", "application/json", 415, "Content-Type"),
        (good, "", "application/json", 415, "Content-Type"),
        (b"this is not an image", "application/x-image", "application/json", 400, "cannot decode"),
        (good[: len(good) // 3], "application/x-image", "application/json", 400, "cannot decode"),
        (b"", "application/x-image", "application/json", 400, "empty"),
        (b"\x00" * 60_000, "application/x-image", "application/json", 413, "limit"),
        (b'["not base64!"]', "application/json", "application/json", 400, "base64"),
        (b'{"image": 1}', "application/json", "application/json", 400, "list"),
        (b"[", "application/json", "application/json", 400, "JSON"),
        (json.dumps([base64.b64encode(b"junk").decode()]).encode(), "application/json", "application/json", 400,
         "image 0"),
        (good, "application/x-image", "text/csv", 406, "Accept"),
    ]
    for body, ctype, accept, status, words in cases:
        r = post(server.url, body, ctype, accept)
        assert r.status_code == status, (ctype, accept, r.text)
        assert words in r.json()["error"]
    assert httpx.get(server.url + "/ping").status_code == 200
    assert post(server.url, good).json()["predicted_label"] == "red"


def test_eight_concurrent_clients_fifty_requests_each(server):
    bodies = {name: colour_image(rgb, seed=7) for name, rgb in COLOURS.items()}
    names = list(bodies)
    failures, answers = [], []

    def client(k):
        with httpx.Client(timeout=60) as c:
            for i in range(50):
                name = names[(k + i) % 3]
                try:
                    r = post(server.url, bodies[name], client=c)
                    answers.append(r.status_code == 200 and r.json()["predicted_label"] == name)
                except Exception as exc:  # a refused or dropped connection is a failure too
                    failures.append(repr(exc))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert failures == []
    assert len(answers) == 400 and all(answers)


def test_micro_batcher_groups_concurrent_requests_and_keeps_each_answer():
    from bakeoff.serve.batching import MicroBatcher

    seen = []

    def predict(batch):
        seen.append(len(batch))
        return batch.reshape(len(batch), -1)[:, :2] * 2  # each row's answer depends on its own input only

    async def main():
        b = MicroBatcher(predict, max_batch=8, max_wait_ms=5)
        await b.start()
        xs = [np.full((1, 2, 2), i, np.float32) for i in range(20)]
        out = await asyncio.gather(*(b.submit(x) for x in xs))
        lone = await b.submit(np.full((1, 2, 2), 99, np.float32))
        await b.stop()
        return out, lone

    out, lone = asyncio.run(main())
    assert [float(o[0]) for o in out] == [2.0 * i for i in range(20)]
    assert float(lone[0]) == 198.0
    assert max(seen) == 8 and sum(seen) == 21 and len(seen) < 21


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


def test_start_up_errors_are_one_line(run_dir, tmp_path, monkeypatch, capsys):
    with pytest.raises(BakeoffError, match="no saved model 'timm/nope'.*saved: timm/test_resnet"):
        load_predictor(run_dir, "timm/nope")
    broken = tmp_path / "out" / "models" / "timm__test_resnet"
    broken.mkdir(parents=True)
    for name in ("spec.json", "class_label_to_prediction_index.json"):
        (broken / name).write_bytes((run_dir / "models" / "timm__test_resnet" / name).read_bytes())
    with pytest.raises(BakeoffError, match="lacks weights.pt"):
        load_predictor(tmp_path / "out", MODEL)
    (broken / "weights.pt").write_bytes(b"not a state dict")
    with pytest.raises(BakeoffError, match="cannot load the saved model"):
        load_predictor(tmp_path / "out", MODEL)
    from bakeoff import cli

    monkeypatch.setattr(sys, "argv", ["bakeoff", "serve", str(run_dir), "--model", "timm/nope", "--port", "0"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "no saved model" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_keras_model_is_served_when_the_keras_engine_exists(tmp_path):
    """A saved Keras model (model.keras + the same spec.json / class map) answers like a PyTorch one."""
    engine = pytest.importorskip("bakeoff.engines.keras.trial")
    try:
        keras = engine.import_keras("cpu")
    except Exception as exc:  # the engine is there but no Keras backend is installed
        pytest.skip(f"Keras unavailable: {exc}")
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x)))
    folder = tmp_path / "out" / "models" / "keras__tiny"
    folder.mkdir(parents=True)
    model.save(folder / "model.keras")
    meta = {"id": "keras/tiny", "framework": "tensorflow", "source": "keras", "architecture": "tiny",
            "input_size": 32, "crop_pct": 0.875, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
            "num_classes": 3, "output": "logits"}
    (folder / "spec.json").write_text(json.dumps(meta))
    (folder / "class_label_to_prediction_index.json").write_text(json.dumps({c: i for i, c in enumerate(COLOURS)}))
    predictor = load_predictor(tmp_path / "out", "keras/tiny", "cpu")
    assert predictor.framework == "tensorflow" and predictor.classes == list(COLOURS)
    batch = np.stack([predictor.preprocess(colour_image(rgb)) for rgb in COLOURS.values()])
    probs = predictor.predict(batch)
    logits = np.asarray(model.predict_on_batch(batch.transpose(0, 2, 3, 1)))
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
