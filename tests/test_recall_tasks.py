"""The JRT recall tasks (tasks/recall): prompts, the token window, the metric, data loading, and the
tasks as lm-eval loads and scores them. Offline: local fixtures, the byte tokenizer or a word stand-in."""

from __future__ import annotations

import json
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


def fixture_rows(task):
    with open(FIXTURE_DIR / f"{task}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def words(n, insert=None):
    """"w0 w1 ... w{n-1}" with `insert` = {position: word} replacing some words."""
    out = [f"w{i}" for i in range(n)]
    for pos, word in (insert or {}).items():
        out[pos] = word
    return " ".join(out)


# ---------------------------------------------------------------- prompts


def test_key_value_prompt_drops_query_and_appends_capitalised_key():
    body = prompts.drop_query("Device: Glucoscan.\nProduct code: NBW...\n\nPRODUCT CODE:  ", "product code")
    assert body == "Device: Glucoscan.\nProduct code: NBW..."  # periods go when the sentence is closed
    once = prompts.key_value_prompt(body, "product code", twice=False)
    assert once == "Device: Glucoscan.\nProduct code: NBW. Product code:"
    assert prompts.key_value_prompt(body, "product code", twice=True) == (
        "Information about Product code. Device: Glucoscan.\nProduct code: NBW.\n"
        "Device: Glucoscan.\nProduct code: NBW. Product code:"
    )


def test_query_with_regex_characters_and_no_query():
    assert prompts.drop_query("Number K1.\n510(K) Number:", "510(k) number") == "Number K1."
    # Only a trailing query goes: the key inside the text stays, and so does a text with no query.
    assert prompts.drop_query("510(k) number: K1", "510(k) number") == "510(k) number: K1"
    assert prompts.key_value_prompt("Body text.. \n\n", "applicant", twice=False) == "Body text. Applicant:"


def test_capitalise_upper_cases_only_the_first_letter():
    assert prompts.capitalise("mpaa_rating") == "Mpaa_rating"
    assert prompts.capitalise("MPAA rating") == "MPAA rating"


def test_swde_summary_block_is_dropped():
    text = "Film page. Directed by Ilsa Marrow.\nsummary of information above... director: Ilsa Marrow\n"
    text += "director:"
    assert prompts.drop_swde_summary(text) == "Film page. Directed by Ilsa Marrow.\n"
    assert prompts.drop_swde_summary("no summary here") == "no summary here"


def test_squad_prompts_once_and_twice():
    row = {"context": "Lake Orrin drains into the Selwyn River.",
           "text": "  Lake Orrin drains into the Selwyn River. It drains into the \n"}
    passage, cloze = prompts.split_cloze(row["text"], row["context"])
    assert (passage, cloze) == ("Lake Orrin drains into the Selwyn River.", " It drains into the")
    assert prompts.cloze_prompt(passage, cloze, twice=False) == row["text"].strip()
    assert prompts.cloze_prompt(passage, cloze, twice=True) == (
        "Lake Orrin drains into the Selwyn River.\n"
        "Lake Orrin drains into the Selwyn River. It drains into the"
    )
    # No usable context: the whole text is the passage.
    assert prompts.split_cloze(" A b c ", "unrelated") == ("A b c", "")
    assert prompts.split_cloze(" A b c ", None) == ("A b c", "")


# ---------------------------------------------------------------- window


def test_text_that_fits_is_untouched():
    text = "a  b\t c \n"
    assert window.cut_context(text, ["zzz"], WordTokenizer(), budget=3) == (text, False)


@pytest.mark.parametrize("position", [2, 50, 97])
def test_window_is_centred_on_the_answer_and_full(position):
    tok, budget = WordTokenizer(), 20
    text = words(100, {position: "ANSWER"})
    cut, truncated = window.cut_context(text, ["answer"], tok, budget)  # case-insensitive
    assert truncated and len(tok.encode(cut)) == budget and "ANSWER" in cut
    first = int(cut.split()[0][1:])  # "w<index>" of the window's first token
    expected_first = min(max(0, position - budget // 2), 100 - budget)  # half before, shifted at the ends
    assert first == expected_first


def test_window_anchors_on_the_earliest_of_key_and_value():
    tok = WordTokenizer()
    text = words(100, {30: "Director:", 80: "Marrow"})
    cut, _ = window.cut_context(text, ["Marrow", "director"], tok, budget=10)
    assert cut.split()[0] == "w25" and "Director:" in cut and "Marrow" not in cut


def test_window_keeps_the_start_when_the_answer_is_absent():
    cut, truncated = window.cut_context(words(100), ["absent", "", "  "], WordTokenizer(), budget=10)
    assert truncated and cut.split() == [f"w{i}" for i in range(10)]


def test_window_needs_a_positive_budget():
    with pytest.raises(ValueError, match="context_length - answer_length"):
        window.cut_context("a b", ["a"], WordTokenizer(), budget=0)


def test_build_doc_cuts_the_body_but_keeps_the_question():
    row = {"key": "product code", "value": "NBW", "text": words(200, {150: "NBW"}) + "\nproduct code:"}
    doc = hooks.build_doc(row, 7, "fda", twice=False, tok=WordTokenizer(), budget=10)
    assert doc["truncated"] and doc["doc_id"] == "7"
    assert doc["prompt"] == "w145 w146 w147 w148 w149 NBW w151 w152 w153 w154. Product code:"
    passage = words(60, {5: "Petra Lund"})
    squad = {"value": "Petra Lund", "context": passage, "text": passage + " It was designed by"}
    doc = hooks.build_doc(squad, 0, "squad", twice=False, tok=WordTokenizer(), budget=8)
    assert doc["prompt"] == "w1 w2 w3 w4 Petra Lund w6 w7 It was designed by"  # "Petra Lund" is two words


# ---------------------------------------------------------------- metric


@pytest.mark.parametrize(
    ("generation", "value", "score"),
    [
        (" NBW", "NBW", 1.0),
        ("the code is nbw.", " NBW \n", 1.0),  # case-insensitive, value stripped
        ("It cost $1.5 (USD) then", "$1.5 (USD)", 1.0),  # regex characters taken literally
        ("It cost $1x5 (USD) then", "$1.5 (USD)", 0.0),  # "." is not a wildcard
        ("K20123", "K201234", 0.0),
        ("", "NBW", 0.0),
        (None, "NBW", 0.0),
        ("anything", "", 0.0),  # a blank value is never a hit
        ("anything", "  \n", 0.0),
    ],
)
def test_contains(generation, value, score):
    assert hooks.contains(generation, value) == score


def test_process_results_scores_the_first_result():
    assert hooks.process_results({"value": "Petra Lund"}, [" petra lund and"]) == {"contains": 1.0}
    assert hooks.process_results({"value": "Petra Lund"}, [" Lund"]) == {"contains": 0.0}


# ---------------------------------------------------------------- data


def test_data_source_order(tmp_path, monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    assert data.data_source("swde") == "hazyresearch/based-swde"
    monkeypatch.setenv(data.ENV_VAR, str(FIXTURE_DIR))
    assert data.data_source("swde") == FIXTURE_DIR / "swde.jsonl"
    (tmp_path / "swde.csv").write_text("key,value,text\n")
    assert data.data_source("swde", tmp_path) == tmp_path / "swde.csv"  # metadata wins over the env
    with pytest.raises(ValueError, match="unknown task"):
        data.data_source("drop")


def test_missing_file_and_directory_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.jsonl"))):
        data.data_source("fda", tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(tmp_path))}.*fda\.jsonl"):
        data.data_source("fda", tmp_path)


def test_missing_field_names_the_field_and_the_file(tmp_path):
    path = tmp_path / "fda.jsonl"
    path.write_text(json.dumps({"value": "NBW", "text": "Product code: NBW"}) + "\n")
    with pytest.raises(ValueError, match=rf"row 0 of {re.escape(str(path))} has no field 'key'"):
        hooks.load_docs("fda", recall_data=str(path), tokenizer=WordTokenizer())


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


def test_tasks_load_through_include_path_with_the_protocol_requests():
    tm = task_manager(tokenizer="bytes")
    assert {*TASKS, "jrt_recall"} <= set(tm.all_tasks)
    requests = built_requests(tm, ["jrt_recall"])
    assert sorted(requests) == sorted(TASKS)
    for name, instances in requests.items():
        assert len(instances) == 4, name
        for inst in instances:
            assert inst.request_type == "generate_until"
            assert inst.args[1]["until"] == ["\n"] and inst.args[1]["max_gen_toks"] == 48
            assert not inst.doc["truncated"]  # the fixtures fit the default 2048 - 48 window

    fda, swde, squad = fixture_rows("fda"), fixture_rows("swde"), fixture_rows("squad")
    prompt = {name: [inst.args[0] for inst in instances] for name, instances in requests.items()}
    fda0 = fda[0]["text"].removesuffix("\nproduct code:")  # ends "fingertip."
    assert prompt["jrt_fda"][0] == fda0 + " Product code:"
    assert prompt["jrt_fda_twice"][0] == f"Information about Product code. {fda0}\n{fda0} Product code:"
    fda2 = fda[2]["text"].removesuffix("\n\nClassification Name:")  # the query's case differs from the key
    assert prompt["jrt_fda"][2] == fda2 + " Classification name:"
    swde0 = swde[0]["text"].split("Summary of information above")[0].rstrip("\n")
    assert prompt["jrt_swde"][0] == swde0 + " Director:"
    assert prompt["jrt_swde_twice"][0] == f"Information about Director. {swde0}\n{swde0} Director:"
    assert prompt["jrt_squad"] == [row["text"].strip() for row in squad]
    assert prompt["jrt_squad_twice"][0] == squad[0]["context"] + "\n" + squad[0]["text"]


def test_metadata_reaches_the_window():
    tok = WordTokenizer()  # an injected object; by name it would be e.g. "bytes" or a hub tokenizer
    requests = built_requests(task_manager(tokenizer=tok, context_length=18, answer_length=8), ["jrt_fda"])
    for inst, row in zip(requests["jrt_fda"], fixture_rows("fda")):
        body = inst.args[0].removesuffix(" " + prompts.capitalise(row["key"]) + ":")
        assert inst.doc["truncated"] and len(tok.encode(body)) <= 10
        assert row["value"].split()[0] in body or row["key"].lower() in body.lower()


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
