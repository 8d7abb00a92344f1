"""`imcap serve` against a hostile client: the API key compared in constant time, upload filenames never
used as paths, a per-client rate limit (429 + Retry-After), CORS off unless asked, a /health that tells
nothing /v1/models does not."""

from __future__ import annotations

import hmac

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import imcap
from imcap.captioner import Captioner
from imcap.cli import app as cli_app
from imcap.images import decode_image
from imcap.serving import app as app_module
from imcap.serving.app import create_app
from imcap.serving.limits import RateLimit
from imcap.serving.settings import ServeSettings, parse_rate

from .conftest import EXAMPLES
from .serving_helpers import FORM, OPTIONS, files, png


@pytest.fixture(scope="module")
def captioner(seeing_model_dir) -> Captioner:
    return Captioner.from_pretrained(seeing_model_dir)


def client_for(captioners, **settings) -> TestClient:
    return TestClient(create_app(captioners, ServeSettings(ui=False, **{"api_key": None, **settings})))


def test_the_api_key_is_compared_in_constant_time(captioner, monkeypatch):
    compared, compare_digest = [], hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", spy)
    with client_for({"seeing": captioner}, api_key="s3cret") as client:
        wrong = client.get("/v1/models", headers={"Authorization": "Bearer s3crex"})
        right = client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
    assert (wrong.status_code, right.status_code) == (401, 200)
    assert compared == [(b"s3crex", b"s3cret"), (b"s3cret", b"s3cret")]


def test_upload_filenames_are_labels_never_paths(captioner, tmp_path):
    """A filename naming a real photo on the server is not read; one naming a new path creates nothing."""
    chelsea = str((EXAMPLES / "chelsea.jpg").resolve())
    names = [chelsea, "../" * 12 + str(tmp_path / "planted.png"), str(tmp_path / "x" / "y.png")]
    sent = [png(1), png(2), png(3)]
    with client_for({"seeing": captioner}) as client:
        response = client.post("/v1/captions", files=files(*sent, names=names), data=FORM)
    assert response.status_code == 200, response.text
    images = response.json()["images"]
    assert [image["filename"] for image in images] == names  # echoed back as given, nothing more
    expected = captioner([decode_image(data) for data in sent], OPTIONS)
    assert [image["caption"] for image in images] == [r.caption for r in expected]  # the bytes sent
    assert [(image["width"], image["height"]) for image in images] == [(64, 48)] * 3  # not chelsea's
    assert list(tmp_path.iterdir()) == []


def test_rate_limit_answers_429_with_retry_after_per_client(captioner):
    with client_for({"seeing": captioner}, rate_limit=2.0) as client:
        answers = [client.get("/v1/models").status_code for _ in range(3)]
        refused = client.get("/v1/models")
        health = client.get("/health")  # outside the API: not limited
    assert answers == [200, 200, 429]  # a burst of 2, then the bucket is empty
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert "too many requests: at most 2 per second" in refused.json()["detail"]
    assert health.status_code == 200


def test_rate_limit_buckets_are_per_client_and_refill():
    limit = RateLimit(app=None, per_second=0.5)  # one request every 2 s, bursts of 1
    assert limit.take("10.0.0.1", now=100.0) == 0
    assert limit.take("10.0.0.1", now=100.5) == pytest.approx(1.5)  # seconds until the next token
    assert limit.take("10.0.0.2", now=100.5) == 0  # another client has its own bucket
    assert limit.take("10.0.0.1", now=102.0) == 0


def test_rate_limit_memory_stays_bounded():
    limit = RateLimit(app=None, per_second=10)
    for i in range(5000):
        limit.take(f"client-{i}", now=i * 1.0)  # each client's bucket is full again a second later
    assert len(limit._buckets) < 1100


@pytest.mark.parametrize(
    ("text", "rate"), [("5/s", 5.0), ("0.5/s", 0.5), ("120/min", 2.0), ("3", 3.0), (" 10 / s ", 10.0)]
)
def test_rate_limit_option_parses(text, rate):
    assert parse_rate(text) == pytest.approx(rate)


@pytest.mark.parametrize("text", ["fast", "5/h", "0/s", "-1/s", "inf/s", "nan/s"])
def test_bad_rate_limit_is_one_line(text):
    with pytest.raises(ValueError, match="--rate-limit must"):
        parse_rate(text)
    result = CliRunner().invoke(cli_app, ["serve", "--rate-limit", text])
    assert result.exit_code == 2 and "--rate-limit must" in result.output


def test_cors_is_off_unless_an_origin_is_given(captioner):
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    with client_for({"seeing": captioner}) as client:
        simple = client.get("/v1/models", headers={"Origin": "https://evil.example"})
        options = client.options("/v1/captions", headers=preflight)
    assert "access-control-allow-origin" not in simple.headers
    assert "access-control-allow-origin" not in options.headers
    with client_for({"seeing": captioner}, cors_origins=("https://app.example",)) as client:
        allowed = client.get("/v1/models", headers={"Origin": "https://app.example"})
        other = client.get("/v1/models", headers={"Origin": "https://evil.example"})
        options = client.options("/v1/captions", headers={**preflight, "Origin": "https://app.example"})
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in other.headers
    assert options.status_code == 200
    assert options.headers["access-control-allow-origin"] == "https://app.example"


def test_health_reveals_no_paths_or_versions(captioner, seeing_model_dir):
    model_id = str(seeing_model_dir)  # a --model path is the model's id
    with client_for({model_id: captioner}) as client:  # no key: /v1/models shows the id to anyone
        open_health, models = client.get("/health").json(), client.get("/v1/models").json()
    with client_for({model_id: captioner}, api_key="s3cret") as client:
        guarded_health = client.get("/health")
    assert set(open_health) == {"status", "models", "queued_images"}
    assert open_health["models"] == [m["id"] for m in models["models"]]
    assert guarded_health.status_code == 200
    assert guarded_health.json() == {"status": "ok", "queued_images": 0}  # the id is behind the key
    for body in (open_health, guarded_health.json()):
        assert imcap.__version__ not in str(body) and "version" not in str(body).lower()
