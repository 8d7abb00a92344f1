"""Property-based tests (issue 16): hostile input gets only documented results.

- the image loader: random bytes, truncations and bit flips of real JPEG/PNG/WebP/GIF/TIFF files give a
  picture or ImageLoadError, nothing else;
- CaptionOptions.validate: any field values give OptionsError or success;
- the REST upload parser: random form fields, option JSON, file parts and raw bodies give 2xx or 4xx,
  never 500.

50 examples per test by default (the file runs in well under a minute); IMCAP_FUZZ_EXAMPLES=2000 for more.
"""

from __future__ import annotations

import io
import json
import os
import string
import tempfile
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image, features

from imcap.generation import CaptionOptions, OptionsError
from imcap.images import ImageLoadError, decode_image, load_image

FUZZ = settings(
    max_examples=int(os.environ.get("IMCAP_FUZZ_EXAMPLES", "50")),
    deadline=None,  # a decode or a model call on a busy CI machine may take a while; that is not a bug
    database=None,  # nothing written into the checkout; a failure prints its example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_PIXELS = 4_000_000  # a flipped header bit may announce a huge picture: refused, not decoded for minutes


def picture(mode: str, size=(24, 16)) -> Image.Image:
    rng = np.random.default_rng(len(mode))
    array = rng.integers(0, 256, (size[1], size[0], 4), np.uint8)
    array[: size[1] // 2] = 40  # a flat area, so that compression has something to do
    return Image.fromarray(array, "RGBA").convert(mode)


def encoded(image: Image.Image, kind: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


SAMPLES = {
    "jpeg": encoded(picture("RGB"), "JPEG", quality=80),
    "jpeg-progressive": encoded(picture("L"), "JPEG", progressive=True),
    "png": encoded(picture("RGBA"), "PNG"),
    "png-palette": encoded(picture("P"), "PNG"),
    "gif": encoded(picture("P"), "GIF"),
    "gif-animated": encoded(
        picture("P"), "GIF", save_all=True, append_images=[picture("P").rotate(90)], duration=50
    ),
    "tiff": encoded(picture("RGB"), "TIFF"),
    "tiff-lzw": encoded(picture("RGBA"), "TIFF", compression="tiff_lzw"),
}
if features.check("webp"):
    SAMPLES["webp"] = encoded(picture("RGB"), "WEBP", quality=70)
    SAMPLES["webp-lossless"] = encoded(picture("RGBA"), "WEBP", lossless=True)


def check_decodes_or_refuses(data: bytes) -> None:
    try:
        image = decode_image(data, "fuzz", MAX_PIXELS)
    except ImageLoadError as error:
        assert "fuzz" in str(error) and "\n" not in str(error)
        return
    assert image.mode == "RGB" and image.width > 0 and image.height > 0
    assert image.width * image.height <= MAX_PIXELS


def test_every_sample_decodes_whole():
    for name, data in SAMPLES.items():
        assert decode_image(data, name).size == (24, 16), name


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data):
    check_decodes_or_refuses(data)


@FUZZ
@given(st.sampled_from(sorted(SAMPLES)), st.data())
def test_truncated_files(name, data):
    sample = SAMPLES[name]
    cut = data.draw(st.integers(0, len(sample) - 1), label="cut")
    check_decodes_or_refuses(sample[:cut])


@FUZZ
@given(st.sampled_from(sorted(SAMPLES)), st.data())
def test_bit_flips(name, data):
    sample = bytearray(SAMPLES[name])
    # mostly near the start, where the headers are; some anywhere
    where = st.one_of(st.integers(0, min(len(sample), 256) - 1), st.integers(0, len(sample) - 1))
    for position in data.draw(st.lists(where, min_size=1, max_size=8), label="positions"):
        sample[position] ^= 1 << data.draw(st.integers(0, 7))
    check_decodes_or_refuses(bytes(sample))


@FUZZ
@given(st.sampled_from(sorted(SAMPLES)), st.data())
def test_damaged_files_on_disk(name, data):
    """load_image too, on files: a damaged copy (cut and flipped) of a real file."""
    sample = bytearray(SAMPLES[name][: data.draw(st.integers(1, len(SAMPLES[name])), label="length")])
    for position in data.draw(st.lists(st.integers(0, len(sample) - 1), max_size=4), label="flips"):
        sample[position] ^= 0xFF
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"photo.{name.split('-')[0]}"
        path.write_bytes(bytes(sample))
        try:
            image = load_image(path, MAX_PIXELS)
        except ImageLoadError as error:
            assert str(path) in str(error) and "\n" not in str(error)
        else:
            assert image.mode == "RGB"


# CaptionOptions: values of every type for every field, right type or not
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0, 2),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=2),
)
OPTION_NAMES = [field.name for field in fields(CaptionOptions)]


@FUZZ
@given(st.dictionaries(st.sampled_from(OPTION_NAMES), ANY_VALUE, max_size=len(OPTION_NAMES)))
def test_caption_options_validate_or_say_why(values):
    try:
        options = CaptionOptions(**values).validate()
    except OptionsError as error:
        assert str(error) and "\n" not in str(error)
        return
    assert options.num_beams >= 1 and options.max_new_tokens >= 1
    assert options.num_return_sequences <= options.num_beams or options.do_sample


# REST: form fields and files as a client (or an attacker) could send them
@pytest.fixture(scope="module")
def client(tiny_model_dir):
    from fastapi.testclient import TestClient

    from imcap.captioner import Captioner
    from imcap.serving.app import create_app
    from imcap.serving.settings import ServeSettings

    captioners = {"tiny": Captioner.from_pretrained(tiny_model_dir)}
    settings_ = ServeSettings(ui=False, api_key=None, max_upload_mb=0.05, max_images_per_request=3)
    with TestClient(create_app(captioners, settings_)) as client:
        yield client


FIELD_NAMES = st.sampled_from(
    [*OPTION_NAMES, "images", "options", "model", "num_tags", "return_attention", "bogus", "num beams", ""]
)
FIELD_TEXT = st.one_of(
    st.text(max_size=12),
    st.integers(-(10**20), 10**20).map(str),
    st.integers(-2, 12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "null", "none", "true", "off", "1e309", "0x10", " 3 ", "nan", "tiny", "1_0", "٣"]),
)
JSON_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(), st.text(max_size=6)),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)
OPTIONS_JSON = st.one_of(
    st.dictionaries(
        st.sampled_from([*OPTION_NAMES, "num_tags", "return_attention", "x"]), JSON_VALUE, max_size=4
    ).map(json.dumps),
    JSON_VALUE.map(json.dumps),
    st.text(max_size=20),
)
GOOD_PNG = encoded(picture("RGB", (32, 24)), "PNG")
FILE_DATA = st.one_of(
    st.just(GOOD_PNG),
    st.binary(max_size=512),
    st.integers(0, len(GOOD_PNG)).map(lambda cut: GOOD_PNG[:cut]),
    st.sampled_from(sorted(SAMPLES)).map(SAMPLES.get),
    st.just(b"\0" * (60 * 1024)),  # over this server's 0.05 MB per file
)
FILENAMES = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=["Cs", "Cc"]), max_size=20),
    st.sampled_from(["../../etc/passwd", "/etc/shadow", "C:\\boot.ini", "a\\b.png", "", ".", "photo.png"]),
)


@FUZZ
@given(
    fields_=st.dictionaries(FIELD_NAMES, st.lists(FIELD_TEXT, min_size=1, max_size=2), max_size=4),
    options=st.one_of(st.none(), OPTIONS_JSON),
    uploads=st.lists(
        st.tuples(st.sampled_from(["images", "images", "options", "other"]), FILENAMES, FILE_DATA), max_size=4
    ),
)
def test_rest_form_fields_and_files_get_2xx_or_4xx(client, fields_, options, uploads):
    data = {name: values for name, values in fields_.items() if name not in ("images", "options")}
    if options is not None:
        data["options"] = options
    files = [(name, (filename, content, "image/png")) for name, filename, content in uploads]
    response = client.post("/v1/captions", data=data, files=files or None)
    assert response.status_code < 500, (response.status_code, response.text)
    event(f"status {response.status_code}")
    if response.status_code >= 400:
        assert response.json()  # a JSON error body, saying why


SMALL_TEXT = st.one_of(
    st.integers(-1, 9).map(str),
    st.sampled_from(["0.5", "1.0", "2", "true", "false", "", "null", "tiny", "some prompt"]),
)


@FUZZ
@given(
    fields_=st.dictionaries(
        st.sampled_from([*OPTION_NAMES, "num_tags", "return_attention"]), SMALL_TEXT, max_size=4
    ),
    images=st.lists(st.one_of(st.just(GOOD_PNG), FILE_DATA), min_size=1, max_size=3),
)
def test_rest_near_valid_requests_get_captions_or_4xx(client, fields_, images):
    """Mostly proper requests with odd settings, so that many reach decoding and the model."""
    files = [("images", (f"photo_{i}.png", content, "image/png")) for i, content in enumerate(images)]
    response = client.post("/v1/captions", data={"max_new_tokens": "4", **fields_}, files=files)
    assert response.status_code < 500, (response.status_code, response.text)
    event(f"status {response.status_code}")
    if response.status_code == 200:
        answers = response.json()["images"]
        assert [a["filename"] for a in answers] == [f"photo_{i}.png" for i in range(len(images))]


CONTENT_TYPES = st.one_of(
    st.sampled_from(
        [
            "multipart/form-data; boundary=xyz",
            "multipart/form-data",
            "multipart/form-data; boundary=",
            "application/json",
            "application/x-www-form-urlencoded",
            "text/plain",
            "",
        ]
    ),
    st.text(alphabet=string.ascii_letters + string.digits + "/;=- ", max_size=40),
)


def multipart(boundary: str, parts: list[tuple[str, str | None, bytes]]) -> bytes:
    body = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename is not None else ""
        )
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


@FUZZ
@given(
    content_type=CONTENT_TYPES,
    body=st.one_of(
        st.binary(max_size=1024),
        st.builds(
            multipart,
            st.just("xyz"),
            st.lists(
                st.tuples(
                    FIELD_NAMES,
                    st.one_of(st.none(), st.text(alphabet=string.printable, max_size=10)),
                    st.one_of(FILE_DATA, FIELD_TEXT.map(str.encode)),
                ),
                max_size=4,
            ),
        ),
    ),
    cut=st.one_of(st.none(), st.integers(0, 2000)),
)
def test_rest_raw_bodies_get_2xx_or_4xx(client, content_type, body, cut):
    response = client.post("/v1/captions", content=body[:cut], headers={"content-type": content_type})
    assert response.status_code < 500, (response.status_code, response.text)
    event(f"status {response.status_code}")
