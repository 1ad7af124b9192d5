"""The JRT recall tasks (tasks/recall, PROTOCOL.md): the document set, the window, the prompts, the
metric, data loading and metadata, and the tasks as lm-eval loads and scores them. Offline: local
fixtures, the byte tokenizer or a word stand-in. Every expected prompt below is worked out by hand
from the protocol's rules; the comments show the steps."""

from __future__ import annotations

import json
import logging
import re

import pytest

from mom_bench.tasks.recall import FIXTURE_DIR, TASK_DIR, data, hooks, prompts, window

TASKS = ["jrt_fda", "jrt_swde", "jrt_squad", "jrt_fda_twice", "jrt_swde_twice", "jrt_squad_twice"]


class WordTokenizer:
    """One token per word with its trailing whitespace, so decode(encode(x)) == x and counts are easy."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.words: list[str] = []

    def encode(self, text):
        ids = []
        for piece in re.findall(r"\s+|\S+\s*", text):
            if piece not in self.vocab:
                self.vocab[piece] = len(self.words)
                self.words.append(piece)
            ids.append(self.vocab[piece])
        return ids

    def decode(self, ids):
        return "".join(self.words[i] for i in ids)


class ShoutingTokenizer(WordTokenizer):
    """Decodes in upper case: shows whether a text went through decode."""

    def decode(self, ids):
        return super().decode(ids).upper()


def build(task, row, budget=8, twice=False, tok=None):
    """The prompt of one row, through the same path as load_docs."""
    anchors = [row[field] for field in hooks.ANCHOR_FIELDS[task]]
    return hooks.build_doc(row, "d", task, twice, tok or WordTokenizer(), budget, anchors)["prompt"]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def fixture_rows(task):
    with open(FIXTURE_DIR / f"{task}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------- the window (budget 8 unless said)


def test_a_document_that_fits_is_still_cut():
    # 10 tokens: "A " "b " "c " "d " "e " "f " "Code: " "XY1 " "g.\n" "code:"; budget 10 so it fits.
    # Anchor: "Code" (the key, case-insensitive) at token 6; start = 6 - 10 // 2 = 1, so "A " goes.
    text = "A b c d e f Code: XY1 g.\ncode:"
    assert window.cut(text, ["code", "XY1"], WordTokenizer(), budget=10) == ("b c d e f Code: XY1 g.\ncode:", True)
    # FDA prompt: "code:" removed, "\n" stripped, "." stripped and added back, " Code:" appended.
    row = {"key": "code", "value": "XY1", "text": text}
    assert build("fda", row, budget=10) == "b c d e f Code: XY1 g. Code:"


def test_the_window_is_shorter_near_the_end_not_shifted():
    # 14 tokens: w0..w10, "Code: " (11), "XY1\n" (12), "code:" (13). Anchor 11: start 7, end min(14, 15).
    row = {"key": "code", "value": "XY1", "text": "w0 w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 Code: XY1\ncode:"}
    assert window.cut(row["text"], ["code", "XY1"], WordTokenizer(), 8) == ("w7 w8 w9 w10 Code: XY1\ncode:", True)
    assert build("fda", row) == "w7 w8 w9 w10 Code: XY1. Code:"  # 7 tokens of text, not 8


def test_the_window_near_the_start_and_the_space_before_the_closing_period():
    # Anchor "Code" at token 1: start 0, tokens 0..7; the window ends "w7 " with its space.
    row = {"key": "code", "value": "XY1", "text": "w0 Code: XY1 w3 w4 w5 w6 w7 w8 w9 w10 w11\ncode:"}
    assert build("fda", row) == "w0 Code: XY1 w3 w4 w5 w6 w7 . Code:"  # FDA strips no spaces
    assert build("swde", {**row, "text": row["text"] + "\nSummary of information above... code: XY1"}) == (
        "w0 Code: XY1 w3 w4 w5 w6 w7. Code:")  # SWDE strips whitespace first


def test_an_absent_anchor_keeps_the_last_half_window():
    # The offset -1 cuts the last character off the prefix: "... w10 w1" is still 12 tokens, so the
    # anchor is token 12 and the window [8, 12) holds the last 8 // 2 tokens.
    row = {"key": "lot number", "value": "L-77", "text": "w0 w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11"}
    assert build("fda", row) == "w8 w9 w10 w11. Lot number:"
    # A one-character last word: the prefix loses a whole token, the anchor is token 10, window [6, 11).
    assert window.cut("s0 s1 s2 s3 s4 s5 s6 s7 s8 s9 x", ["absent"], WordTokenizer(), 8) == ("s6 s7 s8 s9 x", True)


def test_the_anchor_is_the_raw_value_and_the_window_is_always_decoded():
    # " NBW " (with its spaces) first matches after "Code:"; the prefix "NBWX w1 .. w9 Code:" is 11
    # tokens, so the window is [7, 13). The stripped "NBW" would have matched "NBWX" at token 0.
    text = "NBWX w1 w2 w3 w4 w5 w6 w7 w8 w9 Code: NBW end"
    assert window.cut(text, [" NBW "], WordTokenizer(), 8) == ("w7 w8 w9 Code: NBW end", True)
    # The text is stripped before it is tokenized, and decoded even when nothing is dropped.
    assert window.cut("  \n ab cd \n", ["ab"], ShoutingTokenizer(), 8) == ("AB CD", False)


def test_the_window_needs_a_positive_budget():
    with pytest.raises(ValueError, match="context_length - answer_length"):
        window.cut("a b", ["a"], WordTokenizer(), budget=0)


# ---------------------------------------------------------------- FDA / SWDE prompts


@pytest.mark.parametrize(("task", "twice", "expected"), [
    # "..Device: Glucoscan. \n" after the query goes. FDA: strip "\n" then "." (both ends) -> ends ". ",
    # so "." is added after the space.
    ("fda", False, "Device: Glucoscan. . Product code:"),
    ("fda", True, "Information about Product code. Device: Glucoscan. .\nDevice: Glucoscan. . Product code:"),
    # SWDE: strip whitespace, then "." -> "Device: Glucoscan", "." added.
    ("swde", False, "Device: Glucoscan. Product code:"),
    # SWDE twice: strip "\n", ".", whitespace -> "Device: Glucoscan." already ends with ".".
    ("swde", True, "Information about Product code. Device: Glucoscan.\nDevice: Glucoscan. Product code:"),
])
def test_closing_the_body_in_each_variant(task, twice, expected):
    window_text = {"fda": "..Device: Glucoscan. \nproduct code:",
                   "swde": "..Device: Glucoscan. \nSummary of information above... product code: NBW\nproduct code:"}
    assert prompts.key_value_prompt(window_text[task], "product code", task, twice) == expected


@pytest.mark.parametrize(("task", "twice", "expected"), [
    ("fda", False, "Rating: PG.. . Rating:"),  # "Rating: PG.. " keeps its dots: the space ends it
    ("swde", False, "Rating: PG. Rating:"),  # whitespace first, then the dots
    ("swde", True, "Information about Rating. Rating: PG..\nRating: PG.. Rating:"),  # dots before whitespace
])
def test_the_variants_strip_in_different_orders(task, twice, expected):
    assert prompts.key_value_prompt("Rating: PG.. \n", "rating", task, twice) == expected


def test_the_query_is_removed_exactly_and_repeatedly():
    assert prompts.drop_query("Text.\nCODE:code:", "code") == "Text.\n"  # case-insensitive, in a loop
    assert prompts.drop_query("Text.\ncode :", "code") == "Text.\ncode :"  # "code :" is not "code:"
    assert prompts.drop_query("A.\n510(K) Number:", "510(k) number") == "A.\n"  # regex characters literal
    assert prompts.drop_query("510(k) number: K1", "510(k) number") == "510(k) number: K1"  # suffix only
    # "Text.\ncode :" under FDA: nothing removed, no "." to strip, "." added after the ":".
    assert prompts.key_value_prompt("Text.\ncode :", "code", "fda", False) == "Text.\ncode :. Code:"


def test_the_key_is_kept_as_given():
    # The key "code " (trailing space) makes the query "code :"; the intro strips the ":" only.
    assert prompts.key_value_prompt("Text.\ncode :", "code ", "fda", True) == (
        "Information about Code . Text.\nText. Code :")
    assert prompts.key_value_prompt("x", "MPAA rating", "fda", False) == "x. MPAA rating:"  # first letter only
    assert prompts.key_value_prompt("x", "mpaa_rating", "fda", False) == "x. Mpaa_rating:"
    assert prompts.key_value_prompt("x", "éditeur", "swde", False) == "x. Éditeur:"


def test_swde_summary_variants():
    # The usual shape: page, summary block, then the query; all of the block and the query go.
    text = "Film.\nDirected by Ilsa Marrow.\n\nSummary of information above...\ntitle: Film\ndirector:"
    assert prompts.key_value_prompt(text, "director", "swde", False) == "Film.\nDirected by Ilsa Marrow. Director:"
    # A query before the summary survives it: the text before the phrase ends "director:\n", which
    # does not end with "director:", so it stays, and "." is added after it.
    text = "Page text.\ndirector:\nSummary of information above... director: X"
    assert prompts.key_value_prompt(text, "director", "swde", False) == "Page text.\ndirector:. Director:"
    # The window counts the summary's tokens and can end inside the phrase: then nothing is split off.
    # Tokens: "w0 " "Director: " "Ilsa " "w3 " "w4 " "w5 " "Summary " "of " ...; anchor 1, window [0, 8).
    row = {"key": "director", "value": "Ilsa",
           "text": "w0 Director: Ilsa w3 w4 w5 Summary of information above... director: Ilsa\ndirector:"}
    assert build("swde", row) == "w0 Director: Ilsa w3 w4 w5 Summary of. Director:"
    assert build("swde", row, twice=True) == (
        "Information about Director. w0 Director: Ilsa w3 w4 w5 Summary of.\n"
        "w0 Director: Ilsa w3 w4 w5 Summary of. Director:")


@pytest.mark.parametrize(("text", "count"), [
    ("Film page.\ndirector:", 0),
    ("Film page.\nsummary of information above... director: X\ndirector:", 0),  # the phrase is exact
    ("A\nSummary of information above... x\nSummary of information above... y\ndirector:", 2),
])
def test_swde_without_exactly_one_summary_is_an_error_naming_the_document(tmp_path, text, count):
    rows = [{"doc_id": "ok", "key": "director", "value": "X", "text": "A\nSummary of information above... X"},
            {"doc_id": "page-7", "key": "director", "value": "X", "text": text}]
    with pytest.raises(ValueError, match=rf"SWDE document page-7 \(row 1 of .*swde\.jsonl\).* {count} times"):
        hooks.load_docs("swde", recall_data=write_rows(tmp_path / "swde.jsonl", rows), tokenizer=WordTokenizer(),
                        context_length=10, answer_length=2)


# ---------------------------------------------------------------- SQuAD prompts


SQUAD_PASSAGE = "s0 s1 s2 s3 s4 s5 Petra Lund s8 s9 s10 s11 s12 s13."


def test_squad_passage_longer_than_the_window_and_twice():
    # 18 tokens: s0..s5, "Petra " (6), "Lund ", s8..s12, "s13. " (13), "It " "was " "designed " "by".
    # Anchor 6: window [2, 10); the cloze is cut away with the passage (they are one text).
    row = {"value": "Petra Lund", "question": "Who designed it?", "context": SQUAD_PASSAGE,
           "text": SQUAD_PASSAGE + " It was designed by"}
    assert build("squad", row) == "s2 s3 s4 s5 Petra Lund s8 s9"
    # Twice: question, the whole uncut passage, "\n", the cut text.
    assert build("squad", row, twice=True) == (
        "Who designed it? s0 s1 s2 s3 s4 s5 Petra Lund s8 s9 s10 s11 s12 s13.\ns2 s3 s4 s5 Petra Lund s8 s9")


def test_squad_twice_reads_the_passage_up_to_question():
    row = {"value": "Selwyn River", "question": "Which river?",
           "context": "Lake Orrin drains into the Selwyn River. Question: which river?",
           "text": " Lake Orrin drains into the Selwyn River. It drains into the \n"}
    assert build("squad", row, budget=100) == "Lake Orrin drains into the Selwyn River. It drains into the"
    assert build("squad", row, budget=100, twice=True) == (
        "Which river? Lake Orrin drains into the Selwyn River. \n"
        "Lake Orrin drains into the Selwyn River. It drains into the")


def test_squad_with_the_answer_absent_keeps_the_end():
    row = {"value": "Petra Lund", "question": "Q?", "context": "",
           "text": "s0 s1 s2 s3 s4 s5 s6 s7 s8 s9 It was designed by"}
    assert build("squad", row) == "It was designed by"  # the last 8 // 2 tokens


# ---------------------------------------------------------------- the document set


def test_documents_with_a_short_key_or_value_are_dropped_and_counted(tmp_path, caplog):
    text = "w0 Code: AB w3.\ncode:"
    rows = [{"doc_id": "one-char", "key": "code", "value": "R", "text": text},
            {"doc_id": "blank", "key": "code", "value": "", "text": text},
            {"doc_id": "short-key", "key": "x", "value": "AB", "text": text},
            {"doc_id": "two-spaces", "key": "code", "value": "  ", "text": text},  # two characters: kept
            {"doc_id": "kept", "key": "code", "value": "AB", "text": text}]
    path = write_rows(tmp_path / "fda.jsonl", rows)
    with caplog.at_level(logging.INFO, logger=hooks.__name__):
        docs = hooks.load_docs("fda", recall_data=path, tokenizer=WordTokenizer(), context_length=12,
                               answer_length=2)["validation"]
    assert docs["doc_id"] == ["two-spaces", "kept"]
    assert docs["prompt"] == ["w0 Code: AB w3. Code:"] * 2
    assert docs["value"] == ["  ", "AB"]  # values as given
    assert "2 documents" in caplog.text and "3 dropped" in caplog.text
    with pytest.raises(ValueError, match="no fda document .* is left"):
        hooks.load_docs("fda", recall_data=write_rows(tmp_path / "f.jsonl", rows[:3]), tokenizer=WordTokenizer(),
                        context_length=12, answer_length=2)


def test_squad_drops_a_one_character_value(tmp_path):
    rows = [{"doc_id": "a", "value": "5", "text": "It had 5 legs. It had", "context": "", "question": ""},
            {"doc_id": "b", "value": "50", "text": "It had 50 legs. It had", "context": "", "question": ""}]
    docs = hooks.load_docs("squad", recall_data=write_rows(tmp_path / "squad.jsonl", rows),
                           tokenizer=WordTokenizer(), context_length=12, answer_length=2)["validation"]
    assert docs["doc_id"] == ["b"] and docs["prompt"] == ["It had 50 legs. It had"]


# ---------------------------------------------------------------- metric


@pytest.mark.parametrize(
    ("generation", "value", "score"),
    [
        (" NBW", "NBW", 1.0),
        ("the code is nbw.", "NBW", 1.0),  # case-insensitive
        ("It cost $1.5 (USD) then", "$1.5 (USD)", 1.0),  # regex characters taken literally
        ("It cost $1x5 (USD) then", "$1.5 (USD)", 0.0),  # "." is not a wildcard
        ("K20123", "K201234", 0.0),
        ("", "NBW", 0.0),
        (None, "NBW", 0.0),
        ("NBW", " NBW", 0.0),  # the value as given: its leading space must occur too
        (" nbw", " NBW", 1.0),
        ("NBW", "NBW\n", 0.0),
        ("NBW and more", "NBW ", 1.0),
        ("a  b", "  ", 1.0),
        ("ZOË KRAUS", "Zoë Kraus", 1.0),  # unicode case-insensitive
    ],
)
def test_contains(generation, value, score):
    assert hooks.contains(generation, value) == score


def test_process_results_scores_the_first_result():
    assert hooks.process_results({"value": "Petra Lund"}, [" petra lund and"]) == {"contains": 1.0}
    assert hooks.process_results({"value": "Petra Lund"}, [" Lund"]) == {"contains": 0.0}


# ---------------------------------------------------------------- metadata


@pytest.mark.parametrize("key", ["recall-data", "Recall_Data", "recalldata", "context-length", "contextlen",
                                 "answer_len", "tokeniser"])
def test_a_misspelt_metadata_key_is_an_error_naming_the_known_keys(key):
    with pytest.raises(ValueError, match=rf"unknown metadata key '{key}'.*recall_data, tokenizer, "
                                         r"context_length, answer_length"):
        hooks.check_metadata_keys({key: "x"})


def test_model_args_and_lm_eval_keys_pass_through_the_metadata():
    # lm-eval merges the model_args into the metadata: those must not be taken for typos.
    hooks.check_metadata_keys(dict.fromkeys([
        "version", "config_source", "pretrained", "checkpoint", "max_length", "max_gen_toks", "batch_size",
        "device", "dtype", "trust_remote_code", "tokenizer_mode", "revision", "cuda_graph", "parallelize"]))


@pytest.mark.parametrize(("name", "value"), [("context_length", "2k"), ("context_length", 2048.5),
                                             ("context_length", True), ("answer_length", None)])
def test_a_non_integer_length_names_the_key(tmp_path, name, value):
    lengths = {"context_length": 2048, "answer_length": 48, name: value}
    with pytest.raises(ValueError, match=rf"metadata {name} must be an integer"):
        hooks.load_docs("fda", recall_data=str(FIXTURE_DIR), tokenizer="bytes", **lengths)


def test_the_unknown_key_stops_the_task_through_lm_eval():
    with pytest.raises(ValueError, match="unknown metadata key 'recall-data'"):
        built_requests(task_manager(**{"recall-data": "/data/recall"}), ["jrt_fda"])


def test_missing_file_and_fields_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.jsonl"))):
        data.data_source("fda", tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(tmp_path))}.*fda\.jsonl"):
        data.data_source("fda", tmp_path)
    path = write_rows(tmp_path / "fda.jsonl", [{"value": "NBW", "text": "Product code: NBW"}])
    with pytest.raises(ValueError, match=rf"row 0 of {re.escape(path)} has no field 'key'"):
        hooks.load_docs("fda", recall_data=path, tokenizer=WordTokenizer(), context_length=10, answer_length=2)
    # SQuAD twice also reads the question and the passage.
    path = write_rows(tmp_path / "squad.jsonl", [{"value": "NB", "text": "NB", "context": "NB"}])
    with pytest.raises(ValueError, match="has no field 'question' \\(task 'squad' twice needs"):
        hooks.load_docs("squad", True, recall_data=path, tokenizer=WordTokenizer(), context_length=10,
                        answer_length=2)


# ---------------------------------------------------------------- data


def test_data_source_order_and_hub_ids(tmp_path, monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    assert data.data_source("swde") == "hazyresearch/based-swde-v2"
    assert data.data_source("fda") == "hazyresearch/based-fda"
    assert data.data_source("squad") == "hazyresearch/based-squad"
    monkeypatch.setenv(data.ENV_VAR, str(FIXTURE_DIR))
    assert data.data_source("swde") == FIXTURE_DIR / "swde.jsonl"
    (tmp_path / "swde.csv").write_text("key,value,text\n")
    assert data.data_source("swde", tmp_path) == tmp_path / "swde.csv"  # metadata wins over the env
    with pytest.raises(ValueError, match="unknown task"):
        data.data_source("drop")


def test_unreadable_file_names_the_path(tmp_path):
    path = tmp_path / "squad.jsonl"
    path.write_text('{"value": "x", "text": \n')
    with pytest.raises(ValueError, match=rf"cannot read {re.escape(str(path))}"):
        data.read_rows(path)
    with pytest.raises(ValueError, match="unsupported data file"):
        data.read_rows(tmp_path / "squad.txt")


@pytest.mark.parametrize("suffix", ["json", "csv", "parquet"])
def test_other_formats_read_the_same_rows(tmp_path, suffix):
    import pandas as pd

    rows = [{**row, "value": "1996"} for row in fixture_rows("swde")]  # a numeric-looking value stays text
    path = tmp_path / f"swde.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(rows))
    else:
        getattr(pd.DataFrame(rows), f"to_{suffix}")(path, index=False)
    assert data.read_rows(data.data_source("swde", tmp_path)) == rows


def test_tokenizer_order(monkeypatch):
    import mom_bench.tokenizer

    asked = []

    def fake_load(name):
        asked.append(name)
        return WordTokenizer()

    monkeypatch.setattr(mom_bench.tokenizer, "load_tokenizer", fake_load)
    data._load.cache_clear()
    stand_in = WordTokenizer()
    assert data.resolve_tokenizer(stand_in, "org/model") is stand_in
    data.resolve_tokenizer("bytes", "org/model")
    data.resolve_tokenizer(None, "org/model")
    data.resolve_tokenizer(None, None)
    assert asked == ["bytes", "org/model", None]
    data._load.cache_clear()


# ---------------------------------------------------------------- through lm-eval


def task_manager(**metadata):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR), include_defaults=False,
                       metadata={"recall_data": str(FIXTURE_DIR), **metadata})


def built_requests(tm, names):
    tasks = tm.load(names)["tasks"]
    for task in tasks.values():
        task.build_all_requests(limit=None, rank=0, world_size=1)
    return {name: task.instances for name, task in tasks.items()}


# The fixtures under the default protocol (byte tokenizer, budget 2000 bytes: every window starts at 0
# and holds the whole stripped document, decoded exactly).
FDA0_BODY = ("510(k) SUMMARY\n510(k) number: K201234\nDevice: Glucoscan 300 blood glucose meter\nProduct code: NBW\n"
             "Intended use: glucose in capillary blood.")
SWDE2_PAGE = "Ashford Polytechnic University - Admissions\nPhone: (555) 013-2270 | Type: public\nFounded 1911."
SQUAD1 = ("Lake Orrin is fed by three glacial streams and drains into the Selwyn River. Fishing on the lake has been "
          "limited to the months of June through September since 1964.")
FIXTURE_PROMPTS = {
    ("jrt_fda", 0): FDA0_BODY + " Product code:",
    ("jrt_fda_twice", 0): f"Information about Product code. {FDA0_BODY}\n{FDA0_BODY} Product code:",
    # fda-2 ends "readings. \n\nClassification Name:": the query goes (other case), the space stays.
    ("jrt_fda", 2): "SPECIAL 510(k) NOTIFICATION\nApplicant: Halvard Devices GmbH, Bremen\nDevice class: 2\n"
                    "Classification name: Monitor, Blood-Pressure (Non-Invasive)\nThe cuff stores 90 readings. . "
                    "Classification name:",
    ("jrt_swde", 0): "The Lantern Keeper (2011) - Film page\nDirected by Ilsa Marrow. Written by Tomas Ebbe.\n"
                     "MPAA rating: PG-13 | Runtime: 104 min. Director:",
    # swde-2's page ends "Founded 1911.. \n\n" before the summary: once "1911.", twice "1911..".
    ("jrt_swde", 2): SWDE2_PAGE + " Phone:",
    ("jrt_swde_twice", 2): f"Information about Phone. {SWDE2_PAGE}.\n{SWDE2_PAGE}. Phone:",
    ("jrt_squad", 1): SQUAD1 + " Lake Orrin drains into the",
    ("jrt_squad_twice", 1): f"Which river does Lake Orrin drain into? {SQUAD1}\n{SQUAD1} Lake Orrin drains into the",
}


def test_tasks_load_through_include_path_with_the_protocol_requests():
    tm = task_manager(tokenizer="bytes")
    assert {*TASKS, "jrt_recall"} <= set(tm.all_tasks)
    requests = built_requests(tm, ["jrt_recall"])
    assert sorted(requests) == sorted(TASKS)
    for name, instances in requests.items():
        assert len(instances) == 4, name  # fda-4 (value "2") is dropped
        for inst in instances:
            assert inst.request_type == "generate_until"
            assert inst.args[1]["until"] == ["\n"] and inst.args[1]["max_gen_toks"] == 48
            assert not inst.doc["truncated"]
    for (name, i), expected in FIXTURE_PROMPTS.items():
        assert requests[name][i].args[0] == expected, (name, i)
    assert [inst.doc["doc_id"] for inst in requests["jrt_fda"]] == ["fda-0", "fda-1", "fda-2", "fda-3"]


def test_the_protocol_settings_are_task_metadata_and_the_run_overrides_them():
    tasks = task_manager(tokenizer="bytes").load(["jrt_fda"])["tasks"]
    metadata = tasks["jrt_fda"].config.metadata
    assert metadata["context_length"] == 2048 and metadata["answer_length"] == 48 and metadata["version"] == 2.0
    # 18 - 8 = 10 bytes around the earliest of "product code" / "NBW" in fda-0 ("Product code: NBW" at
    # byte 80): bytes [75, 85) = "eter\nProdu", then the FDA rules.
    requests = built_requests(task_manager(tokenizer="bytes", context_length=18, answer_length=8), ["jrt_fda"])
    first = requests["jrt_fda"][0]
    assert first.doc["truncated"] and first.args[0] == "eter\nProdu. Product code:"


def test_simple_evaluate_scores_the_group_end_to_end():
    import lm_eval
    from lm_eval.api.model import LM

    class EchoLM(LM):
        """Answers with the gold value (other case, trailing words) for doc_ids ending in 0 or 1."""

        def generate_until(self, requests):
            return [f" {r.doc['value'].upper()} and more" if r.doc["doc_id"][-1] in "01" else " no idea"
                    for r in requests]

        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

    out = lm_eval.simple_evaluate(model=EchoLM(), tasks=["jrt_recall"], bootstrap_iters=0, log_samples=False,
                                  task_manager=task_manager(tokenizer="bytes"))
    for name in TASKS:
        assert out["results"][name]["contains,none"] == pytest.approx(0.5), name
    assert out["higher_is_better"]["jrt_fda"]["contains"] is True
