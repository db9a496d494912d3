"""server.train.data with the real tokenizer of the embedded SmolLM2-135M-Instruct, and the json_extract demo set."""
from __future__ import annotations

import copy
import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch

from server.train.data import (IGNORE, TEMPLATES, DataError, Example, batches, collate, describe, load_examples,
                               render_prompt, split_validation, training_format)

DEMO = Path(__file__).parent / "data" / "json_extract"
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def tok():
    from loader.embedded import default_model_path
    from loader.tokenizer_cache import gguf_tokenizer

    return gguf_tokenizer(Path(default_model_path()))


@pytest.fixture(scope="module")
def plain_tok(tok):
    """The same tokenizer without a chat template."""
    t = copy.copy(tok)
    t.chat_template = None
    return t


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def spans(ex: Example) -> list[list[int]]:
    """The runs of trained (non-IGNORE) label tokens."""
    out, cur = [], []
    for t in ex.labels:
        if t == IGNORE:
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out + ([cur] if cur else [])


def check_prompt_completion(tok, ex: Example, prompt_ids: list[int]) -> str:
    """The prompt is exactly prompt_ids (no loss), then the completion (loss on every token); -> its text."""
    n = len(prompt_ids)
    assert len(ex.input_ids) == len(ex.labels)
    assert ex.input_ids[:n] == prompt_ids
    assert ex.labels[:n] == [IGNORE] * n
    assert ex.labels[n:] == ex.input_ids[n:] and len(ex.labels) > n
    return tok.decode(ex.labels[n:])


def test_tokenizer_conventions(tok):
    """What the label conventions below rest on: no BOS from tokenizer(), eos = <|im_end|>, a default system turn."""
    assert tok("Hi").input_ids == tok("Hi", add_special_tokens=False).input_ids
    assert tok.eos_token == "<|im_end|>"
    rendered = tok.decode(render_prompt(tok, "Hi", "chat"))
    assert rendered == SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


SHOUT = {"prompt": "Shout the word: apple\n", "completion": "APPLE!!!"}


def test_prompt_completion_rows_are_plain_text_by_default(tok, tmp_path):
    """TRL's convention: a string prompt/completion row is tokenizer(prompt + completion) + eos, no chat template,
    loss on the completion; the prompt ids are what the server's raw `prompt` gives (tokenizer(prompt))."""
    f = write_jsonl(tmp_path / "shout.jsonl", [SHOUT, {**SHOUT, "completion": "APPLE!!!<|im_end|>"}])
    plain, with_eos = load_examples(f, tok)
    prompt_ids = tok(SHOUT["prompt"]).input_ids
    assert render_prompt(tok, SHOUT["prompt"]) == prompt_ids
    assert plain.input_ids == tok(SHOUT["prompt"] + SHOUT["completion"]).input_ids + [tok.eos_token_id]
    assert check_prompt_completion(tok, plain, prompt_ids) == "APPLE!!!<|im_end|>"
    assert tok.convert_tokens_to_ids("<|im_start|>") not in plain.input_ids
    assert tok.decode(plain.input_ids) == "Shout the word: apple\nAPPLE!!!<|im_end|>"
    assert plain.form == "prompt/completion"
    assert with_eos.input_ids == plain.input_ids  # a completion ending in the eos text gets no second one (TRL)
    assert [e.input_ids for e in load_examples(f, tok, template="plain")] == [plain.input_ids] * 2


def test_chat_template_prompt_completion(tok, tmp_path):
    """--template chat: a string prompt/completion row through the chat template (user = prompt, assistant =
    completion), the same ids as the conversational form of the row, which "auto" renders with the chat template."""
    prompt, completion = "Extract name, age and city as JSON: Maria is 34.", '{"name": "Maria", "age": 34}'
    f = write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": prompt, "completion": completion},
        {"prompt": [{"role": "user", "content": prompt}],
         "completion": [{"role": "assistant", "content": completion}]}])
    [ex, conv_forced] = load_examples(f, tok, template="chat")
    [plain, conv] = load_examples(f, tok)
    assert ex.source == "pc.jsonl:1"
    assert (ex.form, conv.form) == ("prompt/completion", "conversational prompt/completion")
    ids = render_prompt(tok, prompt, "chat")
    assert ids == tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_dict=False)
    assert render_prompt(tok, [{"role": "user", "content": prompt}]) == ids
    # the completion is followed by the template's end of turn: <|im_end|> and its newline
    assert check_prompt_completion(tok, ex, ids) == completion + "<|im_end|>\n"
    assert ex.input_ids[-2:] == [tok.eos_token_id, tok("\n").input_ids[0]]
    assert ex.input_ids == tok.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], return_dict=False)
    for c in (conv, conv_forced):  # conversational rows always use the chat template
        assert (c.input_ids, c.labels) == (ex.input_ids, ex.labels)
    assert plain.input_ids == tok(prompt + completion).input_ids + [tok.eos_token_id]


def test_alpaca_template(tok, plain_tok, tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Add the numbers.", "completion": "5"},
                                           {"prompt": "Add the numbers.", "input": "2 and 3", "completion": "5"},
                                           {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
                                           {"instruction": "Add the numbers.", "input": "", "output": "5"}])
    no_input, with_input, alpaca, empty_input = load_examples(f, tok, template="alpaca")
    ids = render_prompt(tok, "Add the numbers.", "alpaca")
    assert tok.decode(ids) == "### Instruction:\nAdd the numbers.\n\n### Response:\n"
    assert check_prompt_completion(tok, no_input, ids) == "5<|im_end|>"  # completion + eos, nothing after
    assert no_input.input_ids[-1] == tok.eos_token_id
    ids_in = render_prompt(tok, "Add the numbers.", "alpaca", input="2 and 3")
    assert tok.decode(ids_in) == "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
    assert check_prompt_completion(tok, with_input, ids_in) == "5<|im_end|>"
    assert alpaca.input_ids == with_input.input_ids and alpaca.labels == with_input.labels
    assert empty_input.input_ids == no_input.input_ids  # an empty input is no input
    # "auto": instruction/output rows get the Alpaca prompt (chat template or not), prompt/completion rows plain text
    for t in (tok, plain_tok):
        pc, _, auto_alpaca, _ = load_examples(f, t)
        assert (auto_alpaca.input_ids, auto_alpaca.labels) == (alpaca.input_ids, alpaca.labels)
        assert tok.decode(pc.input_ids) == "Add the numbers.5<|im_end|>"


def test_plain_template(tok, plain_tok, tmp_path):
    prompt, completion = "Q: capital of France?\nA:", " Paris"
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": prompt, "completion": completion},
                                           {"instruction": "Add", "input": "2 and 3", "output": "5"}])
    for t, template in ((tok, "plain"), (tok, "auto"), (plain_tok, "auto")):
        ex = load_examples(f, t, template=template)[0]
        ids = render_prompt(t, prompt, template)
        assert ids == tok(prompt).input_ids
        assert check_prompt_completion(tok, ex, ids) == " Paris<|im_end|>"
        assert ex.input_ids[len(ids):] == tok(completion, add_special_tokens=False).input_ids + [tok.eos_token_id]
    with_input = load_examples(f, tok, template="plain")[1]
    assert tok.decode(with_input.input_ids) == "Add\n\n2 and 35<|im_end|>"  # input after a blank line
    with pytest.raises(DataError, match="chat template"):
        load_examples(f, plain_tok, template="chat")
    with pytest.raises(ValueError, match="unknown template"):
        load_examples(f, tok, template="vicuna")
    assert TEMPLATES == ("auto", "chat", "alpaca", "plain")


def test_prompt_merging_into_the_completion_is_warned_about(tok, tmp_path, caplog):
    """A prompt ending in a space: tokenizer(prompt + completion) merges the space into the completion's first
    token, so the row (tokenized as TRL does) does not start with tokenizer(prompt); load_examples says so."""
    f = write_jsonl(tmp_path / "sp.jsonl", [{"prompt": "Say yes: ", "completion": "yes"}, SHOUT])
    with caplog.at_level(logging.WARNING, logger="tessera.train"):
        merged, fine = load_examples(f, tok)
    prompt_ids = tok("Say yes: ").input_ids
    assert merged.input_ids[:len(prompt_ids)] != prompt_ids
    assert merged.input_ids == tok("Say yes: yes").input_ids + [tok.eos_token_id]
    assert merged.labels[:len(prompt_ids)] == [IGNORE] * len(prompt_ids)  # TRL's mask: after the prompt's length
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "1 row (sp.jsonl:1) tokenize differently" in warning and "sp.jsonl:2" not in warning


def test_the_rendering_of_each_row_form_is_described(tok, tmp_path):
    f = write_jsonl(tmp_path / "all.jsonl", [
        SHOUT, {"instruction": "Add", "output": "5"}, {"text": "Hello."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello!"}]}])
    exs = load_examples(f, tok)
    assert [e.form for e in exs] == ["prompt/completion", "instruction/output", "text", "messages",
                                     "conversational prompt/completion"]
    auto = training_format(exs, "auto", tok)
    assert auto["template"] == "auto" and auto["eos_token"] == "<|im_end|>"
    assert {k: (v["examples"], v["rendering"]) for k, v in auto["rows"].items()} == {
        "text": (1, "plain"), "prompt/completion": (1, "plain"), "instruction/output": (1, "alpaca"),
        "messages": (1, "chat"), "conversational prompt/completion": (1, "chat")}
    assert auto["rows"]["prompt/completion"]["description"] == (
        "prompt/completion rows: plain text, no chat template (TRL's convention): prompt + completion + eos; "
        "serve them with the raw prompt; use --template chat to apply the chat template")
    chat = training_format(exs, "chat", tok)["rows"]
    assert [chat[k]["rendering"] for k in ("prompt/completion", "instruction/output", "messages")] == ["chat"] * 3
    assert "(--template chat); serve them with messages" in chat["prompt/completion"]["description"]
    assert describe("instruction/output", "auto").startswith('instruction/input/output rows: the Alpaca prompt')
    assert describe("prompt/completion", "plain").startswith("prompt/completion rows: plain text, no chat "
                                                             "template (--template plain)")


def test_text_rows(tok, tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", ["", {"text": "Hello world."}, "   "])
    [ex] = load_examples(f, tok, template="alpaca")  # the template does not matter for text
    assert ex.source == "t.jsonl:2"  # blank lines are skipped but counted
    assert ex.labels == ex.input_ids == tok("Hello world.").input_ids + [tok.eos_token_id]


def test_messages_loss_on_assistant_turns(tok, plain_tok, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    f = write_jsonl(tmp_path / "m.jsonl", [{"messages": messages}])
    [ex] = load_examples(f, tok, template="plain")  # messages always use the chat template
    assert ex.input_ids == tok.apply_chat_template(messages, return_dict=False)
    # each assistant turn's content and end of turn; never the "<|im_start|>assistant\n" header
    assert [tok.decode(s) for s in spans(ex)] == ["Hello!<|im_end|>\n", "4<|im_end|>\n"]
    assert tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab == IGNORE]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(DataError, match=r"m\.jsonl:1: a messages row needs a tokenizer with a chat template"):
        load_examples(f, plain_tok)


def test_train_on_prompt(tok, tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", [
        {"prompt": "Say hi.", "completion": "hi"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "user", "content": "no answer"}]}])
    for template in TEMPLATES:
        for ex in load_examples(f, tok, template=template, train_on_prompt=True):
            assert ex.labels == ex.input_ids
    with pytest.raises(DataError, match=r"x\.jsonl:4: no assistant message"):
        load_examples(f, tok)  # without train_on_prompt a conversation without an assistant has no loss


def test_truncation(tok, tmp_path):
    long_prompt = "word " * 40
    f = write_jsonl(tmp_path / "tr.jsonl", [{"text": "one two three four five six seven eight nine ten"},
                                            {"prompt": "Short?", "completion": "a long answer " * 10}])
    full = load_examples(f, tok, template="plain")
    cut = load_examples(f, tok, template="plain", max_length=6)
    for a, b in zip(full, cut):
        assert len(a.input_ids) > 6 and b.input_ids == a.input_ids[:6] and b.labels == a.labels[:6]
    f2 = write_jsonl(tmp_path / "tr2.jsonl", [{"prompt": "Short?", "completion": "ok"},
                                              {"prompt": long_prompt, "completion": "ok"}])
    with pytest.raises(DataError) as e:
        load_examples(f2, tok, template="plain", max_length=8)
    n = len(tok(long_prompt + "ok").input_ids) + 1  # prompt + completion tokenized together, then eos
    assert e.value.problems == [
        f"tr2.jsonl:2: no completion tokens left after truncation to 8 (the row has {n} tokens)"]
    with pytest.raises(ValueError):
        load_examples(f2, tok, max_length=0)


def test_csv(tok, tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('prompt,completion\n'           # 1
                 '"Say hi",hello\n'               # 2
                 '"two\nlines",ok\n'              # 3-4: one row
                 '\n'                             # 5: blank
                 'only one field\n'               # 6
                 ',no prompt\n'                   # 7
                 '"Say bye","bye, bye"\n',        # 8
                 encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_examples(f, tok, template="plain")
    assert e.value.problems == ["d.csv:6: 1 fields, but the header has 2", "d.csv:7: missing field 'prompt'"]
    assert "d.csv: 2 bad rows:" in str(e.value)
    f.write_text('\ufeffinstruction,input,output\nAdd,2 and 3,5\n"Say ""hi""",,hi\n', encoding="utf-8")  # BOM
    a, b = load_examples(f, tok, template="alpaca")
    assert (a.source, b.source) == ("d.csv:2", "d.csv:3")
    assert tok.decode(a.input_ids) == "### Instruction:\nAdd\n\n### Input:\n2 and 3\n\n### Response:\n5<|im_end|>"
    assert tok.decode(b.input_ids) == '### Instruction:\nSay "hi"\n\n### Response:\nhi<|im_end|>'  # empty = no input


def test_every_bad_row_in_one_error(tok, tmp_path):
    role = [{"role": "tool", "content": "x"}]
    rows = [{"prompt": "fine", "completion": "ok"},                                     # 1
            '{"prompt": "x", "completion": ',                                        # 2
            "[1, 2]",                                                                 # 3
            {"prompt": "x"},                                                          # 4
            {"prompt": "x", "completion": 5},                                         # 5
            {"question": "x", "answer": "y"},                                         # 6
            {"text": ""},                                                             # 7
            "",                                                                       # 8 (blank: fine)
            {"messages": role},                                                       # 9
            {"messages": [{"role": "user", "content": "hi"}]},                        # 10
            {"text": "a", "prompt": "b", "completion": "c"},                          # 11
            {"messages": "hello"},                                                    # 12
            {"messages": [{"role": "user", "content": ["parts"]}]},                   # 13
            {"instruction": "x", "output": "   "},                                    # 14
            {"prompt": "x", "completion": "y", "input": 3},                           # 15
            {"text": "also fine"},                                                    # 16
            {"prompt": [{"role": "user", "content": "x"}], "completion": "y"},         # 17
            {"prompt": [{"role": "user", "content": "x"}], "completion": [{"role": "bot", "content": "y"}]},  # 18
            {"prompt": [{"role": "user", "content": "x"}], "input": "z",
             "completion": [{"role": "assistant", "content": "y"}]},                  # 19
            {"prompt": [{"role": "user", "content": "x"}]}]                           # 20
    f = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_examples(f, tok)
    problems = e.value.problems
    assert [int(p.split(":")[1]) for p in problems] == [2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 17, 18, 19, 20]
    reasons = dict(p.split(": ", 1) for p in problems)
    assert reasons["bad.jsonl:2"].startswith("invalid JSON")
    assert reasons["bad.jsonl:3"] == "not a JSON object but an array"
    assert reasons["bad.jsonl:4"] == "missing field 'completion'"
    assert reasons["bad.jsonl:5"] == "field 'completion' must be a string, not a number"
    assert reasons["bad.jsonl:6"].startswith("unknown row shape (fields: 'question', 'answer'); expected one of")
    assert '{"messages": [{"role": ..., "content": ...}, ...]}' in reasons["bad.jsonl:6"]
    assert reasons["bad.jsonl:7"] == "empty 'text'"
    assert reasons["bad.jsonl:9"] == "messages[0]: role 'tool' is not one of system, user, assistant"
    assert reasons["bad.jsonl:10"] == "no assistant message, so nothing to train on"
    assert reasons["bad.jsonl:11"].startswith("ambiguous row")
    assert reasons["bad.jsonl:12"] == "field 'messages' must be an array, not a string"
    assert reasons["bad.jsonl:13"] == "messages[0]: content is an array, not a string"
    assert reasons["bad.jsonl:14"] == "empty 'output'"
    assert reasons["bad.jsonl:15"] == "field 'input' must be a string, not a number"
    assert reasons["bad.jsonl:17"] == ("'prompt' and 'completion' must both be strings (plain text) or both arrays "
                                       "of messages (conversational)")
    assert reasons["bad.jsonl:18"] == "completion[0]: role 'bot' is not one of system, user, assistant"
    assert reasons["bad.jsonl:19"] == "field 'input' goes with a string prompt, not with messages"
    assert reasons["bad.jsonl:20"] == "missing field 'completion'"
    message = str(e.value)
    assert message.startswith(f"{f}: 17 bad rows:\n") and all(p in message for p in problems)


def test_many_bad_rows_are_summarized(tok, tmp_path):
    f = write_jsonl(tmp_path / "many.jsonl", [{"nope": i} for i in range(25)])
    with pytest.raises(DataError) as e:
        load_examples(f, tok)
    assert len(e.value.problems) == 25
    message = str(e.value)
    assert "many.jsonl:20:" in message and "many.jsonl:21:" not in message and message.endswith("... and 5 more")


def test_file_errors(tok, tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "missing.jsonl", tok)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"unsupported extension '\.parquet'"):
        load_examples(tmp_path / "d.parquet", tok)
    empty = (("e.jsonl", ""), ("blank.jsonl", "\n  \n\n"), ("h.csv", "prompt,completion\n"), ("e.csv", ""))
    for name, content in empty:
        (tmp_path / name).write_text(content)
        with pytest.raises(DataError, match="no rows"):
            load_examples(tmp_path / name, tok)
    (tmp_path / "rows.json").write_text('{"text": "a .json file is JSON Lines too"}\n')
    assert len(load_examples(tmp_path / "rows.json", tok)) == 1


def examples(n: int) -> list[Example]:
    return [Example([i] * (1 + i % 3), [i] * (1 + i % 3), f"x:{i}") for i in range(n)]


def test_split_validation():
    ex = examples(50)
    train, valid = split_validation(ex, 0.2, seed=7)
    assert (len(train), len(valid)) == (40, 10)
    assert sorted(e.source for e in train + valid) == sorted(e.source for e in ex)
    assert split_validation(ex, 0.2, seed=7) == (train, valid)
    assert split_validation(ex, 0.2, seed=8)[1] != valid
    assert [len(s) for s in split_validation(examples(5), 0.01, seed=0)] == [4, 1]  # at least one each side
    assert [len(s) for s in split_validation(examples(5), 0.99, seed=0)] == [1, 4]
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(DataError):
            split_validation(ex, bad, seed=0)
    with pytest.raises(DataError, match="at least one"):
        split_validation(examples(1), 0.5, seed=0)


def ids(bs: list[list[Example]]) -> list[list[int]]:
    return [[e.input_ids[0] for e in b] for b in bs]


def test_batches_deterministic_and_shuffled():
    ex = examples(10)
    assert ids(batches(ex, 4, shuffle=False, seed=0, epoch=0)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert ids(batches(ex, 4, shuffle=False, seed=0, epoch=0, drop_last=True)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    a = ids(batches(ex, 3, shuffle=True, seed=1, epoch=0))
    assert a == ids(batches(ex, 3, shuffle=True, seed=1, epoch=0))
    assert a != ids(batches(ex, 3, shuffle=True, seed=1, epoch=1))
    assert a != ids(batches(ex, 3, shuffle=True, seed=2, epoch=0))
    order = torch.randperm(10, generator=torch.Generator().manual_seed(1 + 0)).tolist()
    assert sum(a, []) == order
    assert batches([], 4, shuffle=True, seed=0, epoch=0) == []
    with pytest.raises(ValueError):
        batches(ex, 0, shuffle=False, seed=0, epoch=0)
    with pytest.raises(ValueError):
        batches(ex, 2, shuffle=False, seed=0, epoch=0, rank=2, world_size=2)


@pytest.mark.parametrize("n,bs,world,drop_last", [(12, 3, 2, False), (12, 2, 3, False), (11, 2, 2, False),
                                                  (11, 2, 2, True), (7, 4, 3, False)])
def test_batches_ddp_sharding(n, bs, world, drop_last):
    ex = examples(n)
    kw = dict(shuffle=True, seed=3, epoch=2, drop_last=drop_last)
    single = ids(batches(ex, bs, **kw))
    shards = [ids(batches(ex, bs, rank=r, world_size=world, **kw)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank steps the same number of times
    seen = [i for s in shards for b in s for i in b]
    assert len(seen) == len(set(seen))  # ranks disjoint
    for r, s in enumerate(shards):  # batch i of the single-process order goes to rank i % world
        assert s == single[r::world][:len(single) // world]
    if len(single) % world == 0:
        assert sorted(seen) == sorted(i for b in single for i in b)
        if not drop_last and n % bs == 0:
            assert sorted(seen) == list(range(n))


def test_collate():
    batch = [Example([5, 6, 7], [IGNORE, 6, 7], "a:1"), Example([8], [8], "a:2"), Example([9, 10], [IGNORE, 10], "a:3")]
    input_ids, labels, lengths = collate(batch, pad_id=0)
    assert input_ids.dtype == labels.dtype == lengths.dtype == torch.long
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert labels.tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE], [IGNORE, 10, IGNORE]]
    assert lengths.tolist() == [3, 1, 2]
    with pytest.raises(ValueError):
        collate([], pad_id=0)


# ---------------------------------------------------------------------------------------- the demo dataset

def demo_module():
    spec = importlib.util.spec_from_file_location("json_extract_make", DEMO / "make.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_demo_dataset_is_what_make_py_writes(tmp_path):
    mod = demo_module()
    mod.main([str(tmp_path)])
    for name in ("train.jsonl", "valid.jsonl"):
        assert (tmp_path / name).read_bytes() == (DEMO / name).read_bytes(), f"rerun {DEMO / 'make.py'}"
    assert len(mod.TEMPLATES) >= 8 and len(set(mod.NAMES)) >= 60 and len(set(mod.CITIES)) >= 40


def test_demo_dataset_content(tok):
    rows = {name: [json.loads(line) for line in (DEMO / f"{name}.jsonl").read_text().splitlines()]
            for name in ("train", "valid")}
    assert (len(rows["train"]), len(rows["valid"])) == (200, 40)
    pairs = {}
    for name, rs in rows.items():
        pairs[name] = set()
        for r in rs:  # TRL's conversational prompt-completion: one user message, one assistant message
            assert set(r) == {"prompt", "completion"}
            [user], [assistant] = r["prompt"], r["completion"]
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            prompt, completion = user["content"], assistant["content"]
            assert prompt.startswith("Extract name, age and city as JSON: ") and prompt.isascii()
            target = json.loads(completion)
            assert list(target) == ["name", "age", "city"]
            assert completion == json.dumps(target)  # one line, ", " and ": " separators
            assert isinstance(target["age"], int) and 18 <= target["age"] <= 90
            assert all(str(v) in prompt for v in target.values())
            pairs[name].add((target["name"], target["city"]))
    assert len(pairs["valid"]) == 40 and not pairs["valid"] & pairs["train"]  # held-out combinations
    assert len({n for n, _ in pairs["train"]}) >= 50 and len({c for _, c in pairs["train"]}) >= 35
    for name in ("train", "valid"):
        exs = load_examples(DEMO / f"{name}.jsonl", tok, max_length=128)
        assert max(len(e.input_ids) for e in exs) < 128  # short prompts: nothing truncated
        for e, r in zip(exs, rows[name]):  # the chat template, as the server renders messages
            n = len(render_prompt(tok, r["prompt"]))
            assert e.input_ids[:n] == tok.apply_chat_template(r["prompt"], add_generation_prompt=True,
                                                              return_dict=False)
            assert tok.decode(e.labels[n:]) == r["completion"][0]["content"] + "<|im_end|>\n"
