"""Corpus ingestion: every input format, normalisation, de-duplication and bad inputs."""

from __future__ import annotations

import csv
import json
import unicodedata

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from m3distill.data.corpus import load_corpus, normalize_text
from m3distill.errors import M3DistillError

CAFE_DECOMPOSED = "Cafe\u0301 menu"  # "é" as e + combining acute accent
CAFE_COMPOSED = unicodedata.normalize("NFC", CAFE_DECOMPOSED)


def test_normalize_text_is_nfc_keeps_paragraphs_and_collapses_other_whitespace():
    raw = f"  {CAFE_DECOMPOSED}\tis\u00a0open.\r\nStill the   same paragraph.\n \n\n\nSecond\x00 paragraph.  \n"
    assert normalize_text(raw) == f"{CAFE_COMPOSED} is open. Still the same paragraph.\n\nSecond paragraph."
    assert normalize_text(" \n\t \n") == ""


def test_folder_is_read_recursively_with_relative_ids_and_hidden_files_skipped(tmp_path):
    (tmp_path / "en" / "deep").mkdir(parents=True)
    (tmp_path / "en" / "a.txt").write_text("Alpha text.", encoding="utf-8")
    (tmp_path / "en" / "deep" / "b.md").write_text("# Beta\n\nBody   text.", encoding="utf-8")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / ".hidden.txt").write_text("secret", encoding="utf-8")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "c.txt").write_text("git internals", encoding="utf-8")

    corpus = load_corpus(tmp_path)

    assert [(d.doc_id, d.text) for d in corpus.documents] == [
        ("en/a.txt", "Alpha text."),
        ("en/deep/b.md", "# Beta\n\nBody text."),
    ]
    assert corpus.report.files == 2
    assert corpus.report.ignored_files == 1


def test_empty_and_duplicate_documents_are_dropped_and_counted(tmp_path):
    (tmp_path / "1.txt").write_text(f"{CAFE_COMPOSED} here.", encoding="utf-8")
    (tmp_path / "2.txt").write_text(f"  {CAFE_DECOMPOSED}   here.\n", encoding="utf-8")  # same after NFC + spaces
    (tmp_path / "3.txt").write_text("", encoding="utf-8")
    (tmp_path / "4.txt").write_text(" \n\n \t", encoding="utf-8")
    (tmp_path / "5.txt").write_text("Something else.", encoding="utf-8")

    corpus = load_corpus(tmp_path)

    assert [d.doc_id for d in corpus.documents] == ["1.txt", "5.txt"]
    report = corpus.report.to_dict()
    assert (report["read"], report["empty"], report["duplicates"], report["kept"]) == (5, 2, 1, 2)


def test_jsonl_with_text_and_id_columns(tmp_path):
    rows = [{"body": "First row.", "url": "u1"}, {"body": None, "url": "u2"}, {"body": "Third  row.", "url": "u3"}]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n", encoding="utf-8")

    with_ids = load_corpus(path, text_column="body", id_column="url")
    by_row = load_corpus(path, text_column="body")

    assert [(d.doc_id, d.text) for d in with_ids.documents] == [("u1", "First row."), ("u3", "Third row.")]
    assert [d.doc_id for d in by_row.documents] == ["0", "2"]
    assert with_ids.report.empty == 1


def test_csv_keeps_quoted_commas_and_newlines(tmp_path):
    path = tmp_path / "docs.csv"
    texts = ['He said "hi", then left.', "Line one\n\nLine two, with a comma"]
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        writer.writerows([["a", texts[0]], ["b", texts[1]]])

    corpus = load_corpus(path, id_column="id")

    assert [(d.doc_id, d.text) for d in corpus.documents] == [("a", texts[0]), ("b", texts[1])]


def test_parquet_with_id_column(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"doc": ["x-1", "x-2"], "text": ["Parquet one.", "Parquet two."]}), path)

    corpus = load_corpus(path, id_column="doc")

    assert [(d.doc_id, d.text) for d in corpus.documents] == [("x-1", "Parquet one."), ("x-2", "Parquet two.")]


def test_folder_of_tables_prefixes_row_ids_with_the_file(tmp_path):
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "a.jsonl").write_text('{"text": "From jsonl."}\n', encoding="utf-8")
    (tmp_path / "b.txt").write_text("From txt.", encoding="utf-8")

    corpus = load_corpus(tmp_path)

    assert [d.doc_id for d in corpus.documents] == ["b.txt", "part/a.jsonl#0"]


def test_saved_hugging_face_dataset_and_dataset_dict(tmp_path):
    import datasets

    single = datasets.Dataset.from_dict({"text": ["HF one.", "HF two."], "key": ["k1", "k2"]})
    single.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": single, "validation": datasets.Dataset.from_dict({"text": ["Val."], "key": ["v"]})}
                         ).save_to_disk(str(tmp_path / "dict"))

    assert [(d.doc_id, d.text) for d in load_corpus(tmp_path / "single", id_column="key").documents] == [
        ("k1", "HF one."), ("k2", "HF two.")
    ]
    assert [d.text for d in load_corpus(tmp_path / "dict", hf_split="validation").documents] == ["Val."]
    with pytest.raises(M3DistillError, match="no split 'test'"):
        load_corpus(tmp_path / "dict", hf_split="test")


def test_undecodable_file_is_an_error_naming_it_unless_skipped(tmp_path):
    (tmp_path / "good.txt").write_text("Good text.", encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes("Latin-1 caf\xe9".encode("latin-1"))

    with pytest.raises(M3DistillError, match=r"bad\.txt: not valid UTF-8") as error:
        load_corpus(tmp_path)
    assert "--skip-bad-files" in str(error.value)

    corpus = load_corpus(tmp_path, skip_bad_files=True)
    assert [d.doc_id for d in corpus.documents] == ["good.txt"]
    assert len(corpus.report.bad_files) == 1 and corpus.report.bad_files[0].startswith("bad.txt:")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_missing_column_is_an_error_naming_file_and_column(tmp_path, suffix):
    path = tmp_path / f"docs{suffix}"
    if suffix == ".jsonl":
        path.write_text('{"body": "x"}\n', encoding="utf-8")
    elif suffix == ".csv":
        path.write_text("body\nx\n", encoding="utf-8")
    else:
        pq.write_table(pa.table({"body": ["x"]}), path)

    with pytest.raises(M3DistillError, match=rf"docs\{suffix}.*no column 'text' \(columns: body\)"):
        load_corpus(path)
    with pytest.raises(M3DistillError, match="no column 'url'"):
        load_corpus(path, text_column="body", id_column="url")


def test_repeated_ids_max_documents_and_missing_sources(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n', encoding="utf-8")
    with pytest.raises(M3DistillError, match="appears twice"):
        load_corpus(path, id_column="id")

    capped = load_corpus(path, max_documents=1)
    assert [d.text for d in capped.documents] == ["a"] and capped.report.over_limit == 1

    with pytest.raises(M3DistillError, match="corpus not found"):
        load_corpus(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("   ", encoding="utf-8")
    with pytest.raises(M3DistillError, match="no documents left"):
        load_corpus(empty)


def test_hub_id_without_network_is_a_clear_error():
    # conftest switches the hub off, as on a machine without network access
    with pytest.raises(M3DistillError, match="could not load Hugging Face dataset 'someone/no-such-dataset'"):
        load_corpus("someone/no-such-dataset")


def test_fingerprint_follows_contents_not_location(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "doc.txt").write_text("Same text.", encoding="utf-8")
    assert load_corpus(tmp_path / "a").fingerprint == load_corpus(tmp_path / "b").fingerprint
    (tmp_path / "b" / "doc.txt").write_text("Other text.", encoding="utf-8")
    assert load_corpus(tmp_path / "a").fingerprint != load_corpus(tmp_path / "b").fingerprint
