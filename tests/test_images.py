"""Image input: a generated corpus of malformed and unusual files, and the in-memory input types."""

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from imcap.images import ImageLoadError, as_image, decode_image, from_array, load_image, to_rgb

from .corpus import CASES, Case, build_corpus, encode, photo, with_exif_orientation


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    build_corpus(folder)
    return folder


def test_the_corpus_is_big_and_mixed():
    assert len(CASES) >= 50
    assert len({case.name for case in CASES}) == len(CASES)
    readable = [case for case in CASES if case.error is None]
    assert 20 <= len(readable) <= len(CASES) - 20


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_each_file_gives_its_documented_result(corpus, case: Case):
    path = corpus / case.name
    if case.error is None:
        image = load_image(path)
        assert image.mode == "RGB" and image.width > 0 and image.height > 0
        if case.check:
            case.check(image)
    else:
        with pytest.raises(ImageLoadError) as caught:
            load_image(path)
        message = str(caught.value)
        assert case.error in caught.value.reason
        assert message.startswith(f"{path}: ") and "\n" not in message
        assert caught.value.path == str(path)


def test_the_pixel_limit_is_configurable(tmp_path):
    path = tmp_path / "photo.png"
    photo((300, 200)).save(path)  # 60,000 pixels
    with pytest.raises(ImageLoadError, match="too large: 300x200"):
        load_image(path, max_pixels=50_000)
    assert load_image(path, max_pixels=60_000).size == (300, 200)
    assert load_image(path, max_pixels=None).size == (300, 200)
    with pytest.raises(ImageLoadError, match="too large"):
        as_image(Image.new("L", (300, 200)), max_pixels=50_000)


def test_bytes_decode_like_files(tmp_path):
    data = with_exif_orientation(photo(), "JPEG", 6)
    (tmp_path / "rotated.jpg").write_bytes(data)
    from_file, from_bytes = load_image(tmp_path / "rotated.jpg"), as_image(data)
    assert from_bytes.size == from_file.size == (32, 48)
    assert np.array_equal(np.asarray(from_bytes), np.asarray(from_file))
    assert as_image(bytearray(data)).size == (32, 48)
    for bad, reason in ((b"", "empty file"), (b"GIF89a\x00", "not a readable image")):
        with pytest.raises(ImageLoadError, match=reason) as caught:
            decode_image(bad, name="upload.gif")
        assert str(caught.value).startswith("upload.gif: ")


def test_pil_images_are_made_upright_once():
    rotated = Image.open(io.BytesIO(with_exif_orientation(photo(), "JPEG", 6)))
    upright = as_image(rotated)
    assert upright.size == (32, 48) and upright.mode == "RGB"
    assert to_rgb(upright).size == (32, 48)  # the orientation tag is gone: no second rotation


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.full((4, 6, 3), 200, np.uint8), (200, 200, 200)),
        (np.full((4, 6), 90, np.uint8), (90, 90, 90)),
        (np.full((4, 6, 1), 90, np.uint8), (90, 90, 90)),
        (np.zeros((4, 6, 4), np.uint8), (255, 255, 255)),  # fully transparent: white
        (np.full((4, 6), 65535, np.uint16), (255, 255, 255)),
        (np.full((4, 6, 3), 0.5, np.float32), (128, 128, 128)),
        (np.full((4, 6, 3), 7.0), (255, 255, 255)),  # floats are 0..1; beyond is clipped
        (np.ones((4, 6), bool), (255, 255, 255)),
    ],
    ids=["rgb", "grey", "grey-1-channel", "rgba", "uint16", "float32", "float-clipped", "bool"],
)
def test_numpy_arrays(array, expected):
    image = as_image(array)
    assert image.mode == "RGB" and image.size == (6, 4)
    assert image.getpixel((0, 0)) == expected


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((3, 8, 8), np.uint8),
        np.zeros((8,), np.uint8),
        np.zeros((0, 4, 3), np.uint8),
        np.zeros((4, 4), np.int64),
    ],
    ids=["channels-first", "1d", "empty", "int64"],
)
def test_unusable_arrays_raise_one_clear_error(array):
    with pytest.raises(ImageLoadError) as caught:
        from_array(array)
    assert str(caught.value).startswith("<array ") and "\n" not in str(caught.value)


def test_unsupported_input_types_say_what_to_pass():
    with pytest.raises(TypeError, match="pass a path, bytes, array or PIL image"):
        as_image(42)


def test_sixteen_bit_is_scaled_not_clipped():
    ramp = Image.fromarray(np.array([[0, 256, 32896, 65535]], np.uint16))
    assert [to_rgb(ramp).getpixel((x, 0))[0] for x in range(4)] == [0, 1, 128, 255]


def test_cmyk_colours_are_sane():
    for ink, rgb in (
        ((255, 0, 0, 0), (0, 255, 255)),
        ((0, 255, 0, 0), (255, 0, 255)),
        ((0, 0, 0, 255), (0, 0, 0)),
    ):
        cmyk = Image.new("CMYK", (8, 8), ink)
        decoded = as_image(encode(cmyk, "JPEG", quality=95))
        assert all(abs(a - b) <= 16 for a, b in zip(decoded.getpixel((4, 4)), rgb, strict=True)), (ink, rgb)


def test_the_error_survives_pickling():  # e.g. raised in a DataLoader worker process
    error = pickle.loads(pickle.dumps(ImageLoadError("a.jpg", "empty file (0 bytes)")))
    assert (str(error), error.path, error.reason) == (
        "a.jpg: empty file (0 bytes)",
        "a.jpg",
        "empty file (0 bytes)",
    )
