"""Server-sent events on the pipeline double: edits stream as ``image_edit.*`` with
every field the SDK's event models require, previews capped at ``partial_images``
per image, and errors after the stream started arrive as an ``error`` event."""

import json

from tests.server.test_units import png_bytes

EDIT_FIELDS = {"type", "b64_json", "created_at", "size", "quality", "background", "output_format"}


def events(response) -> list[tuple[str, dict]]:
    out, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            out.append((name, json.loads(line[len("data: ") :])))
    return out


def test_edit_stream_with_two_images_and_previews(app):
    form = {"prompt": "make it blue", "size": "32x32", "n": "2", "stream": "true",
            "partial_images": "2", "num_inference_steps": "6", "output_format": "webp"}  # fmt: skip
    with app.stream("POST", "/v1/images/edits", data=form, files={"image": png_bytes()}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        got = events(r)
    kinds = [d["type"] for _, d in got]
    assert kinds == ["image_edit.partial_image"] * 4 + ["image_edit.completed"] * 2, kinds
    assert [name for name, _ in got] == kinds  # the SSE event name matches the type
    for _, d in got:
        assert set(d) >= EDIT_FIELDS and d["output_format"] == "webp" and d["size"] == "32x32"
    assert [d["partial_image_index"] for _, d in got[:4]] == [0, 0, 1, 1]
    assert set(got[-1][1]["usage"]) == {
        "total_tokens", "input_tokens", "output_tokens", "input_tokens_details",
    }  # fmt: skip


def test_failure_after_submit_is_an_error_event(app):
    body = {"prompt": "poison", "size": "32x32", "stream": True, "num_inference_steps": 2}
    with app.stream("POST", "/v1/images/generations", json=body) as r:
        assert r.status_code == 200
        got = events(r)
    assert len(got) == 1 and got[0][1]["type"] == "error"
    assert set(got[0][1]["error"]) == {"message", "type", "param", "code"}
