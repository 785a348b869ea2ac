"""Property tests (hypothesis), run with `make fuzz` (or `pytest -m fuzz`); excluded from `make test`.

* any uint8 image array of any shape encodes, or raises the typed `ImageError` (never another exception);
* ids round-trip through the LM's text form (`image_span` / `parse_image_span`), and broken spans are `IdsError`s;
* a captions.jsonl of arbitrary bytes opens, or raises `DataError`;
* any bytes uploaded as an image decode, or raise `ImageError`.

The number of examples per test comes from the hypothesis profile: ``HYPOTHESIS_PROFILE=fuzz`` (the `make fuzz`
target: more examples, a time bound per example) or the default ``ci`` profile (few examples).
"""

import json
import os

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from seedtok.data.sources import CaptionFolder, DataError  # noqa: E402
from seedtok.errors import IdsError, ImageError  # noqa: E402
from seedtok.models.lm import IMG_BEGIN, IMG_END, image_span, parse_image_span  # noqa: E402

settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("fuzz", max_examples=int(os.environ.get("FUZZ_EXAMPLES", "500")), deadline=10_000,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

pytestmark = [pytest.mark.fuzz, pytest.mark.usefixtures("one_thread")]


shapes = st.one_of(
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=64),
    st.tuples(st.integers(0, 64), st.integers(0, 64), st.integers(0, 6)),
    hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
)


@given(hnp.arrays(np.uint8, shapes))
def test_any_uint8_array_encodes_or_raises_image_error(micro, array):
    try:
        ids = micro.encode(array)
    except ImageError:
        return
    assert ids.shape == (1, 32) and int(ids.min()) >= 0 and int(ids.max()) < micro.codebook_size


@given(st.lists(st.integers(0, 10**7), max_size=64))
def test_ids_round_trip_through_the_lm_text_form(ids):
    text = image_span(ids)
    assert text.startswith(IMG_BEGIN) and text.endswith(IMG_END)
    assert parse_image_span(text) == ids


@given(st.lists(st.integers(0, 99999), min_size=1, max_size=8), st.text(min_size=1, max_size=5),
       st.integers(0, 10**6))
def test_broken_spans_are_ids_errors(ids, junk, where):
    text = image_span(ids)
    cut = where % (len(text) + 1)
    broken = text[:cut] + junk + text[cut:]
    try:
        parsed = parse_image_span(broken)
    except IdsError:
        return
    assert image_span(parsed) == broken  # accepted only when the junk left a well-formed span


@given(st.binary(max_size=400))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_caption_files_with_arbitrary_bytes_parse_or_fail_cleanly(tmp_path, data):
    root = tmp_path / "ds"
    root.mkdir(exist_ok=True)
    (root / "captions.jsonl").write_bytes(data)
    try:
        folder = CaptionFolder(root)
    except DataError:
        return
    for i in range(len(folder)):  # every accepted image path stays inside the dataset folder
        assert folder.image_path(i).resolve().is_relative_to(root.resolve())


jsonish = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                       lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                       max_leaves=8)


@given(st.lists(st.one_of(jsonish, st.fixed_dictionaries({"image": st.text(max_size=20), "caption": jsonish})),
                max_size=5))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_caption_files_with_arbitrary_json_lines_parse_or_fail_cleanly(tmp_path, records):
    root = tmp_path / "ds2"
    root.mkdir(exist_ok=True)
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    try:
        folder = CaptionFolder(root)
    except DataError:
        return
    for i in range(len(folder)):
        try:
            folder[i]
        except ImageError:  # the named image does not exist (or is not an image): typed, lazily
            pass


@given(st.binary(max_size=2000))
def test_any_uploaded_bytes_decode_or_raise_image_error(data):
    from seedtok.web.engine import image_from_bytes

    try:
        image = image_from_bytes(data)
    except ImageError:
        return
    assert image.mode == "RGB"


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's warnings about the damaged files
@given(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]), st.integers(1, 2000), st.binary(max_size=64))
def test_mutated_real_images_decode_or_raise_image_error(fmt, position, patch):
    """A valid file with bytes overwritten or cut: decodes or is an ImageError (no hang, no other exception)."""
    import io

    from PIL import Image

    from seedtok.data.sources import decode_image_bytes

    buf = io.BytesIO()
    Image.fromarray(np.arange(24 * 20 * 3, dtype=np.uint8).reshape(24, 20, 3)).save(buf, format=fmt)
    data = bytearray(buf.getvalue())
    position %= len(data)
    mutated = bytes(data[:position] + patch + data[position + len(patch):])
    for candidate in (mutated, bytes(data[:position])):
        try:
            assert decode_image_bytes(candidate).mode == "RGB"
        except ImageError:
            pass
