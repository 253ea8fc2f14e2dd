"""Fine-tuning data readers: every public layout from local files, images embedded / as paths / beside, and bad
records reported with their index (skipped and counted, or fatal)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmkit.data.readers import DataError, detect_format, read_dataset, read_file

DATA = Path(__file__).parent / "data" / "train"


def test_llava_json_skips_bad_records_and_reports_them_by_index():
    data = read_dataset(DATA / "llava.json", log=lambda _: None)
    assert len(data) == 6 and data.skipped == 2
    (report,) = data.reports
    assert report.format == "llava" and report.records == 8 and report.examples == 6
    assert [i for i, _ in report.skipped] == [6, 7]
    assert "2 <image> placeholders but 1 images" in report.skipped[0][1]
    assert "missing.png" in report.skipped[1][1]
    assert "2 bad records skipped: #6:" in report.summary()
    first = data[0]
    assert first.kind == "chat" and first.index == 0
    assert first.turns == [("user", "<image>\nWhat color is the shape?"), ("assistant", "Red")]
    assert Path(first.images[0]) == DATA / "images" / "red_circle.png"  # a bare name, found in images/ beside
    text_only = data[5]
    assert text_only.images == [] and text_only.turns == [("user", "Say hi."), ("assistant", "Hi!")]


def test_bad_record_is_fatal_with_on_error_raise():
    with pytest.raises(DataError, match=r"llava.json: record 6: 2 <image> placeholders"):
        read_dataset(DATA / "llava.json", on_error="raise")


@pytest.mark.parametrize("name", ["cauldron.parquet", "cauldron_ds"])
def test_cauldron_parquet_and_datasets_folder_with_embedded_images(name):
    data = read_dataset(DATA / name)
    assert len(data) == 8 and data.skipped == 0 and data.reports[0].format == "cauldron"
    ex = data[0]
    assert ex.turns == [("user", "<image>Which color is it?"), ("assistant", "red"),
                        ("user", "Which shape?"), ("assistant", "circle")]
    assert isinstance(ex.images[0], bytes) and ex.images[0][:4] == b"\x89PNG"


def test_interleaved_documents_and_caption_pairs():
    docs = read_dataset(DATA / "interleaved.jsonl")
    assert len(docs) == 6 and docs[0].kind == "interleaved"
    assert docs[0].pieces == ["A page about shapes.", None, "Here is a red circle.", None, "And a blue square."]
    assert [Path(p).name for p in docs[0].images] == ["red_circle.png", "blue_square.png"]
    caps = read_dataset([DATA / "captions.jsonl", DATA / "captions_folder"])
    assert len(caps) == 12 and [r.format for r in caps.reports] == ["captions", "captions"]
    assert caps[0].caption == "A red circle on white." and caps[8].caption == "A blue circle."
    assert Path(caps[8].images[0]).parent.name == "captions_folder"  # the image beside its .txt


def test_malformed_records_each_say_why(tmp_path):
    rows = [
        {"image": "images/red_circle.png", "conversations": [{"from": "human", "value": "Q"}]},
        {"conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]},
        {"image": "http://example.com/a.png", "conversations": [
            {"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}]},
        {"texts": ["a", None], "images": [None, None]},
        {"image": "images/red_circle.png", "conversations": [
            {"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A dot."}]},
        {"something": 1},
    ]
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "red_circle.png").write_bytes((DATA / "images" / "red_circle.png").read_bytes())
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, report = read_file(path, format="llava")
    reasons = dict(report.skipped)
    assert sorted(reasons) == [0, 1, 2, 3, 5] and len(examples) == 1 and report.examples == 1
    assert "ends with a user turn" in reasons[0]
    assert "turn 0 is 'assistant'" in reasons[1]
    assert "is a URL" in reasons[2]
    assert "no 'conversations'" in reasons[3]
    # no placeholder: the image goes before the first user text, as LLaVA's preprocessing puts it
    assert examples[0].turns[0] == ("user", "<image>\nWhat is it?") and examples[0].index == 4


def test_format_detection():
    assert detect_format({"conversations": []}) == "llava"
    assert detect_format({"texts": [{"user": "q", "assistant": "a"}], "images": []}) == "cauldron"
    assert detect_format({"texts": ["a", None], "images": [None, "x.png"]}) == "interleaved"
    assert detect_format({"image": "x.png", "caption": "c"}) == "captions"
    assert detect_format({"question": "q"}) is None
