"""`imcap serve`'s REST API in-process with TestClient, on the tiny "seeing" model (the batcher:
test_serve_queue.py; the page: test_serve_ui.py)."""

from __future__ import annotations

import io
import json
import tempfile

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from imcap.captioner import Captioner
from imcap.cli import app as cli_app
from imcap.generation import CaptionOptions, OptionsError
from imcap.images import decode_image
from imcap.serving.app import create_app
from imcap.serving.settings import ServeSettings

from .conftest import EXAMPLES
from .serving_helpers import FORM, OPTIONS, TAGS, Tagging, as_json, client_for, files, png


@pytest.fixture(scope="module")
def captioner(seeing_model_dir) -> Captioner:
    return Captioner.from_pretrained(seeing_model_dir)


@pytest.fixture(scope="module")
def client(captioner) -> TestClient:
    with client_for({"seeing": captioner}) as client:  # `with`: the app's lifespan closes the batcher
        yield client


# --- success -----------------------------------------------------------------------------------------


def test_one_image_gets_the_same_caption_as_the_python_api(client, captioner):
    data = (EXAMPLES / "flickr8k-val-dogs.jpg").read_bytes()
    response = client.post("/v1/captions", files=files(data, names=["dogs.jpg"]), data=FORM)
    assert response.status_code == 200, response.text
    body = response.json()
    expected = captioner(decode_image(data), OPTIONS)[0]
    assert body["model"] == "seeing"
    assert body["settings"] == captioner.resolved(OPTIONS).to_dict()
    [image] = body["images"]
    assert (image["filename"], image["width"], image["height"]) == ("dogs.jpg", 224, 224)
    assert image["caption"] == expected.caption
    assert [c["text"] for c in image["candidates"]] == [c.text for c in expected.candidates]
    best = expected.candidates[0]
    assert image["candidates"][0]["score"] == pytest.approx(best.score, abs=1e-4)
    assert image["candidates"][0]["logprob"] == pytest.approx(best.logprob, abs=1e-4)
    assert (image["score"], image["logprob"]) == (
        image["candidates"][0]["score"],
        image["candidates"][0]["logprob"],
    )
    # the same names as the CLI's rows: caption, score, logprob, candidates[].text/score/logprob
    assert set(image["candidates"][0]) == {"text", "score", "logprob"}
    assert image["tags"] == as_json(expected.tags[:5])  # none: the tiny model has no concept head
    assert image["timing"]["batch_images"] == 1 and image["timing"]["model_ms"] > 0
    assert body["timing"]["total_ms"] >= image["timing"]["model_ms"]


def test_several_images_come_back_in_upload_order(client, captioner):
    datas = [png(seed) for seed in range(4)]
    response = client.post("/v1/captions", files=files(*datas), data=FORM)
    assert response.status_code == 200, response.text
    images = response.json()["images"]
    assert [i["filename"] for i in images] == [f"photo_{i}.png" for i in range(4)]
    expected = captioner([decode_image(d) for d in datas], OPTIONS)
    assert [i["caption"] for i in images] == [r.caption for r in expected]
    assert len({i["caption"] for i in images}) > 1  # the seeing model tells these pictures apart
    assert all(i["timing"]["batch_images"] == 4 for i in images)  # one shared model call


def test_options_as_json_part_equal_form_fields_and_give_scored_candidates(client, captioner):
    settings = {"max_new_tokens": 6, "num_beams": 3, "num_return_sequences": 3}
    as_json = client.post("/v1/captions", files=files(png(7)), data={"options": json.dumps(settings)})
    as_fields = client.post(
        "/v1/captions", files=files(png(7)), data={k: str(v) for k, v in settings.items()}
    )
    assert as_json.status_code == as_fields.status_code == 200, as_json.text
    [from_json], [from_fields] = as_json.json()["images"], as_fields.json()["images"]
    assert from_json["candidates"] == from_fields["candidates"]
    scores = [c["score"] for c in from_json["candidates"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    expected = captioner.resolved(CaptionOptions(**settings)).to_dict()
    assert as_json.json()["settings"] == as_fields.json()["settings"] == expected


def test_each_image_lists_num_tags_tags_five_by_default(captioner):
    with client_for({"tagging": Tagging(captioner)}) as client:
        default = client.post("/v1/captions", files=files(png(1), png(2)), data=FORM)
        two = client.post("/v1/captions", files=files(png(1)), data={**FORM, "num_tags": "2"})
        none = client.post("/v1/captions", files=files(png(1)), data={"options": '{"num_tags": 0}'})
    assert default.status_code == two.status_code == none.status_code == 200, default.text
    assert [image["tags"] for image in default.json()["images"]] == [as_json(TAGS[:5])] * 2
    assert two.json()["images"][0]["tags"] == as_json(TAGS[:2])
    assert none.json()["images"][0]["tags"] == []
    assert "num_tags" not in two.json()["settings"]  # settings are the CaptionOptions used


def test_guide_is_an_option_like_the_others(client):
    as_field = client.post("/v1/captions", files=files(png(1)), data={**FORM, "guide": "false"})
    in_json = client.post("/v1/captions", files=files(png(1)), data={"options": '{"guide": false}'})
    assert as_field.status_code == in_json.status_code == 200, as_field.text
    assert as_field.json()["settings"]["guide"] is in_json.json()["settings"]["guide"] is False


def test_the_shipped_model_tags_a_cat():
    """End to end with the shipped model's concept head: labels with probabilities, most probable first."""
    with client_for({"default": Captioner.from_pretrained()}) as client:
        data = (EXAMPLES / "chelsea.jpg").read_bytes()
        response = client.post(
            "/v1/captions", files=files(data, names=["chelsea.jpg"]), data={"num_tags": "3"}
        )
    assert response.status_code == 200, response.text
    tags = response.json()["images"][0]["tags"]
    assert len(tags) == 3 and all(tag["label"] and 0 < tag["score"] <= 1 for tag in tags)
    assert [tag["score"] for tag in tags] == sorted((tag["score"] for tag in tags), reverse=True)
    assert any(word in tag["label"].lower() for tag in tags for word in ("cat", "tabby"))


def test_seeded_sampling_is_reproducible_across_requests(client):
    form = {**FORM, "num_beams": "1", "do_sample": "true", "seed": "3", "temperature": "1.5"}
    first = client.post("/v1/captions", files=files(png(1), png(2)), data=form).json()["images"]
    second = client.post("/v1/captions", files=files(png(2)), data=form).json()["images"]
    assert first[1]["caption"] == second[0]["caption"]  # same image and seed, another batch


def test_models_health_and_offline_docs(client, captioner):
    assert client.get("/health").json() == {"status": "ok", "models": ["seeing"], "queued_images": 0}
    assert client.get("/v1/models").json() == {
        "models": [{"id": "seeing", "default": True, "max_caption_tokens": captioner.max_caption_tokens}]
    }
    page = client.get("/docs").text
    assert "/docs-static/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
    assert client.get("/docs-static/swagger-ui-bundle.js").status_code == 200
    assert "cdn" not in client.get("/redoc").text.lower()
    schema = client.get("/openapi.json").json()["paths"]["/v1/captions"]["post"]["requestBody"]
    fields = schema["content"]["multipart/form-data"]["schema"]["properties"]
    assert fields["images"]["items"]["format"] == "binary" and fields["num_beams"]["default"] == 3
    assert fields["num_tags"] == {**fields["num_tags"], "default": 5, "minimum": 0, "maximum": 20}


def test_two_models_are_picked_by_id(captioner, tiny_model_dir):
    tiny = Captioner.from_pretrained(tiny_model_dir)
    with client_for({"seeing": captioner, "tiny": tiny}) as client:
        ids = [m["id"] for m in client.get("/v1/models").json()["models"]]
        response = client.post("/v1/captions", files=files(png(1)), data={**FORM, "model": "tiny"})
    assert ids == ["seeing", "tiny"]
    assert response.json()["model"] == "tiny"
    assert response.json()["images"][0]["caption"] == tiny(decode_image(png(1)), OPTIONS)[0].caption


# --- validation: 400 / 422 with one clear line ----------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"num_beams": "0"},
        {"temperature": "0.5"},
        {"num_beams": "2", "num_return_sequences": "3"},
        {"do_sample": "true", "top_p": "1.5"},
        {"min_new_tokens": "9", "max_new_tokens": "4"},
        {"num_beams": "1", "length_penalty": "2.0"},
        {"seed": "-1"},
    ],
)
def test_bad_settings_get_422_with_the_clis_message(client, fields):
    """The same CaptionOptions.validate as `imcap caption`, so the same one-line message."""
    typed = {
        k: (v == "true") if k == "do_sample" else float(v) if "." in v else int(v) for k, v in fields.items()
    }
    with pytest.raises(OptionsError) as expected:
        CaptionOptions(**typed).validate()
    response = client.post("/v1/captions", files=files(png(0)), data=fields)
    assert response.status_code == 422
    assert response.json() == {"detail": str(expected.value)}


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        ({"num_beams": "abc"}, 422, "num_beams must be a whole number, got 'abc'"),
        ({"top_p": "high"}, 422, "top_p must be a finite number, got 'high'"),
        ({"do_sample": "maybe"}, 422, "do_sample must be true or false, got 'maybe'"),
        ({"max_new_tokens": "500"}, 422, "max_new_tokens (500) exceeds what this model can generate"),
        ({"beams": "5"}, 422, "unknown field 'beams' (did you mean 'num_beams'?)"),
        ({"num_beams": "9"}, 422, "num_beams must be <= 8 on this server, got 9"),
        ({"model": "nope"}, 422, "unknown model 'nope'; loaded: seeing"),
        ({"options": "{not json"}, 400, "options is not valid JSON"),
        ({"options": "[1, 2]"}, 422, "options must be a JSON object"),
        ({"options": '{"num_beams": "3"}'}, 422, "num_beams must be a whole number, got '3'"),
        ({"options": '{"beam": 3}'}, 422, "in options: unknown field 'beam'"),
        ({"options": '{"num_beams": 3}', "num_beams": "3"}, 422, "num_beams given twice"),
        ({"num_beams": ["2", "3"]}, 422, "num_beams given 2 times"),
        ({"num_tags": "21"}, 422, "num_tags must be in 0..20, got 21"),
        ({"num_tags": "-1"}, 422, "num_tags must be in 0..20, got -1"),
        ({"num_tags": "some"}, 422, "num_tags must be a whole number, got 'some'"),
        ({"options": '{"num_tags": true}'}, 422, "num_tags must be a whole number, got True"),
        ({"options": '{"num_tags": 3}', "num_tags": "3"}, 422, "num_tags given twice"),
        ({"tags": "3"}, 422, "unknown field 'tags' (did you mean 'num_tags'?)"),
    ],
)
def test_each_bad_field_gets_its_own_message(client, data, status, message):
    response = client.post("/v1/captions", files=files(png(0)), data=data)
    assert response.status_code == status
    assert message in response.json()["detail"]


def test_requests_without_proper_images_get_400_or_422(client):
    cases = [
        (client.post("/v1/captions", data={"num_beams": "2"}), 400, "send multipart/form-data"),
        (client.post("/v1/captions", json={"images": []}), 400, "send multipart/form-data"),
        (client.post("/v1/captions", files={"model": (None, "seeing")}), 422, "no images"),
        (client.post("/v1/captions", files={"images": (None, "text")}), 422, "images[0] is a text field"),
        (client.post("/v1/captions", files={"photo": ("a.png", png(0))}), 422, "unknown field 'photo'"),
        (
            client.post(
                "/v1/captions",
                content=b"garbage, not multipart",
                headers={"content-type": "multipart/form-data; boundary=xx"},
            ),
            400,
            "malformed multipart body",
        ),
    ]
    for response, status, message in cases:
        assert response.status_code == status, response.text
        assert message in response.json()["detail"]


def test_corrupt_truncated_and_empty_files_get_422_naming_the_file_and_the_server_goes_on(client):
    jpeg = (EXAMPLES / "flickr8k-val-dogs.jpg").read_bytes()
    for name, data, reason in [
        ("noise.jpg", b"\x00\x01 not an image", "not a readable image"),
        ("cut.jpg", jpeg[: len(jpeg) // 3], "truncated or corrupt"),
        ("empty.png", b"", "empty file"),
        ("notes.txt", b"just text", "not a readable image"),
    ]:
        response = client.post("/v1/captions", files=files(png(0), data, names=["ok.png", name]), data=FORM)
        assert response.status_code == 422, (name, response.text)
        assert f"images[1] '{name}'" in response.json()["detail"] and reason in response.json()["detail"]
    assert client.post("/v1/captions", files=files(png(0)), data=FORM).status_code == 200


# --- API key ------------------------------------------------------------------------------------------------


def test_api_key_is_required_as_a_bearer_token(captioner, monkeypatch):
    monkeypatch.setenv("IMCAP_API_KEY", "s3cret")
    settings = ServeSettings(ui=False)
    assert settings.api_key == "s3cret" and "s3cret" not in repr(settings)
    with TestClient(create_app({"seeing": captioner}, settings)) as client:
        missing = client.post("/v1/captions", files=files(png(0)), data=FORM)
        wrong = client.get("/v1/models", headers={"Authorization": "Bearer guess"})
        right = client.post(
            "/v1/captions", files=files(png(0)), data=FORM, headers={"Authorization": "Bearer s3cret"}
        )
        health = client.get("/health")
    assert missing.status_code == wrong.status_code == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert "IMCAP_API_KEY" in missing.json()["detail"]
    assert right.status_code == 200 and health.status_code == 200


# --- limits ---------------------------------------------------------------------------------------------


def test_upload_limits_answer_413_or_422(captioner):
    small, noisy = png(0), io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(noisy, "PNG")
    assert len(small) < 1000 < 1e4 < len(noisy.getvalue())
    limits = {"max_upload_mb": 0.001, "max_images_per_request": 2}  # 1048 bytes per file
    with client_for({"seeing": captioner}, **limits) as client:
        fine = client.post("/v1/captions", files=files(small), data=FORM)
        too_big = client.post("/v1/captions", files=files(small, noisy.getvalue()), data=FORM)
        too_many = client.post("/v1/captions", files=files(small, small, small), data=FORM)
        multipart = {"content-type": "multipart/form-data; boundary=x"}
        declared = client.post(
            "/v1/captions", content=b"x", headers={**multipart, "content-length": "10000000"}
        )
        streamed = client.post(  # chunked: no Content-Length to check up front, cut off while reading
            "/v1/captions", content=iter([b"x" * 1024] * 2048), headers=multipart
        )
    assert fine.status_code == 200
    assert too_big.status_code == 413
    assert too_big.json()["detail"] == "images[1] 'photo_1.png' is over the limit of 0.001 MB per file"
    assert too_many.status_code == 413
    assert too_many.json()["detail"] == "too many images: 3, at most 2 per request"
    assert declared.status_code == streamed.status_code == 413
    assert "request body over the limit" in declared.json()["detail"] == streamed.json()["detail"]
    with client_for({"seeing": captioner}, max_pixels=10_000) as client:
        huge = client.post("/v1/captions", files=files(png(0, size=(400, 300))), data=FORM)
    assert huge.status_code == 422
    assert "too large: 400x300 = 0.1 megapixels, over the limit of 0.01" in huge.json()["detail"]


def test_uploads_leave_no_files_behind(client, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where Starlette spools uploads over 1 MB
    noise = np.random.default_rng(0).integers(0, 256, (800, 800, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    assert len(buffer.getvalue()) > 1024 * 1024
    response = client.post("/v1/captions", files=files(buffer.getvalue()), data=FORM)
    assert response.status_code == 200, response.text
    assert list(tmp_path.iterdir()) == []


# --- the command ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "70000"], "port must be in 0..65535"),
        (["--max-batch", "0"], "max_batch must be >= 1"),
        (["--model", "no/such/folder/here"], "model folder not found"),
    ],
)
def test_serve_command_fails_at_once_on_bad_settings(args, message):
    result = CliRunner().invoke(cli_app, ["serve", *args])
    assert result.exit_code == 2 and message in result.output
