"""The sentiment and headline tasks: labels, prompts, disjoint seeded splits, answer-only supervision."""
from __future__ import annotations

import json

import pytest

from layercard.data import tasks
from layercard.data.examples import DataConfig, load_examples, read_records, tokenize_record
from layercard.errors import LayercardError
from layercard.data.fetch import model_path
from layercard.data.tokenizer import ByteTokenizer


@pytest.mark.parametrize("valence, label", [(2.3, 1), (0.5, 1), (-0.5, 0), (-3.9, 0), (0.49, None), (-0.49, None),
                                            (0.0, None)])
def test_label_from_valence_sign_with_dead_zone(valence, label):
    record = tasks.sentiment_record("7", valence, "fine")
    if label is None:
        assert record is None
    else:
        assert record["label"] == label and record["answer"] == tasks.SENTIMENT_ANSWERS[label]


def test_read_sentiment_latin1_and_prompt_format(tmp_path):
    path = tmp_path / "movieReviewSnippets_GroundTruth.txt"
    path.write_bytes("1\t1.8\tUn  film \xe9tonnant\r\n2\t-0.3\tso-so\r\n3\t-2.2\tDull.".encode("latin-1"))
    records = tasks.read_sentiment(path)
    assert [r["id"] for r in records] == ["1", "3"]
    assert records[0]["prompt"] == "Review: Un film étonnant\nSentiment:"
    assert (records[0]["answer"], records[1]["answer"]) == (" positive", " negative")
    assert (records[0]["label"], records[1]["label"]) == (1, 0)


def test_read_sentiment_bad_line_names_it(tmp_path):
    path = tmp_path / "x_GroundTruth.txt"
    path.write_text("1\t1.0\tok\n2\tnot-a-number\tbad\n")
    with pytest.raises(LayercardError, match=r"x_GroundTruth.txt:2: expected"):
        tasks.read_sentiment(path)


def test_read_headlines(tmp_path):
    body = " ".join(f"w{i}" for i in range(100))
    path = tmp_path / "NewsArticles.csv"
    path.write_text('article_id,publish_date,article_source_link,title,subtitle,text\n'
                    f'1,d,l,"Big, news",,"{body}"\n'
                    '2,d,l,,,"no title"\n'
                    f'3,d,l,"big,  NEWS",,"other text"\n'  # same title as 1 (case, spaces): dropped
                    '4,d,l,"Small\nnews",,"short ""quoted"" text"\n')
    records = tasks.read_headlines(path)
    assert [r["id"] for r in records] == ["1", "4"]
    assert records[0]["prompt"] == f"Article: {' '.join(body.split()[:tasks.ARTICLE_WORDS])}\nHeadline:"
    assert records[0]["answer"] == " Big, news"
    assert records[1] == {"prompt": 'Article: short "quoted" text\nHeadline:', "answer": " Small news", "id": "4"}


def _records(n: int) -> list[dict]:
    return [r for i in range(n) if (r := tasks.sentiment_record(str(i), (-1) ** i * (1 + i % 3), f"review {i}"))]


def _prompts(rows):
    return {r["prompt"].casefold() for r in rows}


def test_splits_are_disjoint_seeded_and_stable():
    records = _records(200)
    dupes = [dict(r, prompt=r["prompt"].upper().replace(" ", "  "), id="dup") for r in records[:30]]
    splits = tasks.split_records(records + dupes, {"eval": 40, "calibration": 20, "train": None}, seed=3)
    assert [len(splits[s]) for s in tasks.SPLITS] == [20, 140, 40]  # 30 duplicates removed
    assert not _prompts(splits["eval"]) & (_prompts(splits["train"]) | _prompts(splits["calibration"]))
    assert not _prompts(splits["train"]) & _prompts(splits["calibration"])
    assert all(r["id"] != "dup" for rows in splits.values() for r in rows)
    again = tasks.split_records(list(reversed(records)), {"eval": 40, "calibration": 20, "train": None}, seed=3)
    assert {s: _prompts(v) for s, v in again.items()} == {s: _prompts(v) for s, v in splits.items()}
    smaller = tasks.split_records(records, {"eval": 40, "calibration": 20, "train": 10}, seed=3)
    assert _prompts(smaller["eval"]) == _prompts(splits["eval"])  # train size never moves eval
    assert _prompts(tasks.split_records(records, {"eval": 40}, seed=4)["eval"]) != _prompts(splits["eval"])


def test_split_sizes_validated():
    with pytest.raises(LayercardError, match="need more than the 10 distinct records"):
        tasks.split_records(_records(10), {"eval": 8, "calibration": 5, "train": None})
    with pytest.raises(LayercardError, match="unknown split 'test'"):
        tasks.split_records(_records(10), {"test": 1})


def test_prepare_task_writes_jsonl_that_data_config_reads(tmp_path):
    paths = tasks.prepare_task("sentiment", out_dir=tmp_path, sizes={"eval": 10, "calibration": 5, "train": 20},
                               records=_records(60))
    assert set(paths) == set(tasks.SPLITS)
    rows = read_records(DataConfig(path=str(paths["train"]), prompt_column="prompt", answer_column="answer"))
    assert len(rows) == 20 and {"prompt", "answer", "label"} <= rows[0].keys()
    meta = json.loads((tmp_path / "sentiment" / "meta.json").read_text())
    assert meta["counts"] == {"calibration": 5, "train": 20, "eval": 10} and meta["source_records"] == 60


def test_prepare_unknown_task_and_missing_cache(tmp_path):
    with pytest.raises(LayercardError, match="unknown task 'qa'"):
        tasks.prepare_task("qa", cache_dir=tmp_path)
    with pytest.raises(LayercardError, match="not fetched.*layercard fetch"):
        tasks.prepare_task("headline", cache_dir=tmp_path)


def test_only_answer_tokens_are_supervised(tmp_path):
    paths = tasks.prepare_task("sentiment", out_dir=tmp_path, sizes={"eval": 2, "calibration": 2, "train": 4},
                               records=_records(20))
    cfg = DataConfig(path=str(paths["train"]), prompt_column="prompt", answer_column="answer", max_seq_len=64)
    tok = ByteTokenizer(vocab_size=300)
    record = read_records(cfg)[0]
    ex = tokenize_record(record, tok, cfg)
    n_prompt, answer = len(tok.encode(record["prompt"])), tok.encode(record["answer"])
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == answer == ex["input_ids"][n_prompt:]
    for ex in load_examples(cfg, tok):
        supervised = [t for t in ex["labels"] if t != -100]
        assert len(supervised) == len(" positive") or len(supervised) == len(" negative")


@pytest.mark.skipif(not (model_path() / "tokenizer.json").is_file(), reason="SmolLM2 not fetched (layercard fetch)")
def test_smollm2_answers_are_single_distinct_tokens():
    from layercard.train.label_loss import answer_token_ids
    from layercard.data.tokenizer import HFTokenizer

    tok = HFTokenizer.from_dir(model_path())
    assert all(len(tok.encode(a)) == 1 for a in tasks.SENTIMENT_ANSWERS)
    assert len(set(answer_token_ids(tok, tasks.SENTIMENT_ANSWERS))) == 2


def test_read_outlets_maps_domains_to_answers_and_keeps_titles_only(tmp_path):
    path = tmp_path / "NewsArticles.csv"
    path.write_text('article_id,publish_date,article_source_link,title,subtitle,text\n'
                    '1,d,http://www.bbc.co.uk/news/x,"Big  news",,"LONDON (BBC) - text"\n'
                    '2,d,https://tass.com/world/1,"Pobeda flies",,"MOSCOW, /TASS/. text"\n'
                    '3,d,http://example.org/a,"Unknown outlet",,"text"\n'        # not one of the nine: dropped
                    '4,d,http://edition.cnn.com/a,"Other host",,"text"\n'       # cnn.com only as the whole host
                    '5,d,http://cnn.com/a,"big NEWS",,"text"\n'                 # same title as 1: dropped
                    '6,d,http://cnn.com/b,,,"no title"\n')
    records = tasks.read_outlets(path)
    assert [r["id"] for r in records] == ["1", "2"]
    assert records[0] == {"prompt": "Title: Big news\nSource:", "answer": " BBC",
                          "label": tasks.OUTLET_ANSWERS.index(" BBC"), "id": "1"}
    assert records[1]["answer"] == " TASS" and "MOSCOW" not in records[1]["prompt"]
    assert len(tasks.OUTLET_ANSWERS) == 9 and set(tasks.OUTLETS.values()) == set(tasks.OUTLET_ANSWERS)


@pytest.mark.skipif(not (model_path() / "tokenizer.json").is_file(), reason="SmolLM2 not fetched (layercard fetch)")
def test_smollm2_outlet_answers_have_distinct_first_tokens():
    from layercard.train.label_loss import answer_token_ids
    from layercard.data.tokenizer import HFTokenizer

    tok = HFTokenizer.from_dir(model_path())
    assert len(set(answer_token_ids(tok, tasks.OUTLET_ANSWERS))) == 9
