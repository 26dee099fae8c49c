"""The HTTP endpoint: a real server on a loopback port, serving a small model trained here."""

import base64
import json
import sys

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from bakeoff.errors import BakeoffError  # noqa: E402
from bakeoff.serve.predictor import load_predictor  # noqa: E402
from bakeoff.serve.server import ServerProcess  # noqa: E402
from conftest import SERVED_COLOURS as COLOURS, SERVED_MODEL as MODEL, classify_concurrently, colour_image, trained_run  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def server(run_dir):
    with ServerProcess(run_dir, MODEL, "cpu", ("--max-body-mb", "0.05")) as srv:
        yield srv


def post(url, body, ctype="application/x-image", accept="application/json;verbose", client=httpx):
    return client.post(url + "/invocations", content=body, headers={"Content-Type": ctype, "Accept": accept},
                       timeout=60)


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
    answers, failures = classify_concurrently(server.url, 8, 50)
    assert failures == []
    assert len(answers) == 400 and all(answers)


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
