"""The trainer's data: JSONL/CSV rows -> token ids with labels (IGNORE where no loss), splits, batches.

Row forms, detected per row (other fields are ignored). As in TRL's SFTTrainer, only conversational rows
(lists of messages) go through the chat template; standard rows (strings) are tokenized as plain text:
  {"text": str}                                         plain text + eos; loss on every token
  {"prompt": str, "completion": str, "input"?: str}     plain text: tokenizer(prompt + completion) + eos,
                                                        loss on the completion and eos
  {"instruction": str, "input"?: str, "output": str}    (Alpaca) the Alpaca prompt, then output + eos
  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
                                                        chat template; loss on the assistant turns
  {"prompt": [message, ...], "completion": [message, ...]}
                                                        (conversational prompt/completion) chat template;
                                                        loss on what the completion adds after the prompt
Files: .jsonl/.json (one object a line, blank lines skipped) or .csv (header row; an empty cell counts as absent).

Templates (--template) for the string rows, prompt/completion and instruction/output:
  "auto"   TRL's rule: prompt/completion "plain", instruction/output "alpaca" (its fields are Alpaca's).
  "plain"  the prompt text, then the completion text and eos (no separator is added).
  "alpaca" "### Instruction:\n{prompt}\n\n### Input:\n{input}\n\n### Response:\n" (no Input block without
           an input), then the completion and eos.
  "chat"   user=prompt, assistant=completion through the tokenizer's chat template. The prompt ids are
           render_prompt(); the completion ids are what the full two-message rendering adds after them,
           i.e. the completion text *and* the template's end of turn (SmolLM2: "<|im_end|>" and "\n").
Text and conversational rows ignore it. With "plain" and "chat", an "input" field is appended to the prompt
after a blank line.

Plain text is tokenized as TRL does it: the prompt alone as tokenizer(prompt) (with its special tokens, e.g.
a BOS: the ids the server's raw `prompt` gives), the whole row as tokenizer(prompt + completion) and the
tokenizer's eos after it (unless the completion already ends with the eos text); the loss starts after the
prompt's own tokens. Where the prompt's last token merges with the completion's first (a prompt ending in a
space), the row trains on tokens a served prompt does not produce: load_examples warns about those rows.

Messages: the labels of assistant message i are the tokens that rendering messages[:i+1] adds after rendering
messages[:i] with add_generation_prompt=True: its content and end of turn, not the assistant header.

Every bad row is reported (file:line and why) in one DataError; nothing is skipped silently.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

IGNORE = -100
TEMPLATES = ("auto", "chat", "alpaca", "plain")
ROLES = ("system", "user", "assistant")
MAX_REPORTED = 20

_ACCEPTED = ('{"text": ...}, {"prompt": ..., "completion": ..., "input"?: ...}, '
             '{"instruction": ..., "input"?: ..., "output": ...}, '
             '{"messages": [{"role": ..., "content": ...}, ...]}, '
             '{"prompt": [messages], "completion": [messages]}')
# which fields say which shape a row has
_SHAPES = {"messages": ("messages",), "text": ("text",), "prompt/completion": ("prompt", "completion"),
           "instruction/output": ("instruction", "output")}
# Example.form: the shape, with prompt/completion split into strings (standard) and message lists (conversational)
FORMS = ("text", "prompt/completion", "instruction/output", "messages", "conversational prompt/completion")

log = logging.getLogger("tessera.train")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE where no loss
    source: str        # "file.jsonl:17"
    form: str = "text"  # one of FORMS


class DataError(ValueError):
    """Unusable training data. `problems` holds one "file:line: reason" per bad row (all of them)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


class _RowError(Exception):
    """One row's problem; load_examples adds the file:line."""


class _Row(NamedTuple):
    form: str
    ids: list[int]
    labels: list[int]
    merged: bool = False  # plain text whose prompt tokens are not a prefix of its prompt + completion tokens


# ---------------------------------------------------------------------------------------------- templates

def rendering(form: str, template: str) -> str:
    """How rows of `form` are rendered under --template `template`: "chat", "alpaca" or "plain"."""
    if form in ("messages", "conversational prompt/completion"):
        return "chat"
    if form == "text":
        return "plain"
    if template == "auto":  # TRL's rule: strings stay plain text; Alpaca's fields get Alpaca's prompt
        return "alpaca" if form == "instruction/output" else "plain"
    return template


def describe(form: str, template: str) -> str:
    """One line for the training log and the adapter's tessera_training.json: how rows of `form` are rendered
    and how to prompt the adapter for them."""
    if form == "text":
        return "text rows: plain text and eos"
    if form == "messages":
        return "messages rows: the chat template; serve them with messages"
    if form == "conversational prompt/completion":
        return "conversational prompt/completion rows: the chat template (TRL's convention); serve them with messages"
    name = "prompt/completion rows" if form == "prompt/completion" else "instruction/input/output rows"
    how = rendering(form, template)
    if template != "auto":
        why = f"--template {template}"
    else:
        why = "TRL's convention" if how == "plain" else "Alpaca's fields get Alpaca's prompt"
    if how == "chat":
        return (f"{name}: the chat template, user = prompt, assistant = completion ({why}); "
                "serve them with messages")
    if how == "plain":
        return (f"{name}: plain text, no chat template ({why}): prompt + completion + eos; serve them with the "
                "raw prompt; use --template chat to apply the chat template")
    return (f"{name}: the Alpaca prompt \"### Instruction:\\n...\\n\\n### Response:\\n\", no chat template ({why}), "
            "then the completion and eos; serve them with that raw prompt; use --template chat to apply the chat "
            "template")


def training_format(examples: list[Example], template: str, tokenizer, train_on_prompt: bool = False) -> dict:
    """What the adapter's tessera_training.json records: the flags, and per row form present its count,
    rendering and description."""
    counts = Counter(e.form for e in examples)
    return {"template": template, "train_on_prompt": train_on_prompt,
            "eos_token": getattr(tokenizer, "eos_token", None),
            "rows": {form: {"examples": counts[form], "rendering": rendering(form, template),
                            "description": describe(form, template)} for form in FORMS if counts[form]}}


# ---------------------------------------------------------------------------------------------- tokenizing

def _as_ids(encoded) -> list[int]:
    """Token ids from whatever a tokenizer call returned (list, BatchEncoding/dict, tensor, batch of one)."""
    if isinstance(encoded, Mapping) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    ids = list(encoded)
    if ids and isinstance(ids[0], (list, tuple)):
        if len(ids) != 1:
            raise ValueError(f"expected one sequence of token ids, got a batch of {len(ids)}")
        ids = list(ids[0])
    return [int(i) for i in ids]


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return _as_ids(tokenizer(text, add_special_tokens=special))


def _eos_after(tokenizer, text: str) -> list[int]:
    """The eos id to append after `text`: none when there is no eos or the text already ends with it (TRL's add_eos)."""
    eos, eos_token = getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "eos_token", None)
    if eos is None or (eos_token and text.endswith(eos_token)):
        return []
    return [int(eos)]


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                            return_dict=False)
    except Exception as e:  # jinja errors, templates' raise_exception ("roles must alternate", ...)
        raise _RowError(f"the chat template cannot render it ({type(e).__name__}: {e})") from e
    return _as_ids(out)


def _check_template(tokenizer, template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
    if template == "chat" and not _has_chat_template(tokenizer):
        raise DataError("template 'chat' needs a tokenizer with a chat template, and this one has none "
                        "(use 'auto', 'alpaca' or 'plain')")


def _joined(prompt: str, input: str | None) -> str:
    return f"{prompt}\n\n{input}" if input else prompt


def _alpaca_text(prompt: str, input: str | None) -> str:
    if input:
        return f"### Instruction:\n{prompt}\n\n### Input:\n{input}\n\n### Response:\n"
    return f"### Instruction:\n{prompt}\n\n### Response:\n"


def _prompt_text(prompt: str, how: str, input: str | None) -> str:
    """how: "alpaca" or "plain"."""
    return _alpaca_text(prompt, input) if how == "alpaca" else _joined(prompt, input)


def _user(prompt: str, input: str | None) -> list[dict]:
    return [{"role": "user", "content": _joined(prompt, input)}]


def render_prompt(tokenizer, prompt: str | list[dict], template: str = "auto", *,
                  input: str | None = None) -> list[int]:
    """The token ids the trainer uses as the prompt of a prompt/completion row (send these at inference).

    A list of messages (a conversational row): apply_chat_template(prompt, add_generation_prompt=True).
    A string, as `template` renders a prompt/completion row: "auto" and "plain": tokenizer(prompt), what the
    server's raw `prompt` gives; "alpaca": the Alpaca prompt (what "auto" gives an instruction/output row);
    "chat": apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True).
    """
    _check_template(tokenizer, template)
    try:
        if isinstance(prompt, list):
            if not _has_chat_template(tokenizer):
                raise _RowError("a prompt of messages needs a tokenizer with a chat template, and this one has none")
            return _chat_ids(tokenizer, prompt, True)
        how = rendering("prompt/completion", template)
        if how == "chat":
            return _chat_ids(tokenizer, _user(prompt, input), True)
        return _encode(tokenizer, _prompt_text(prompt, how, input), True)
    except _RowError as e:
        raise DataError(str(e)) from None


def _chat_completion(tokenizer, prompt: list[dict], completion: list[dict]) -> tuple[list[int], int]:
    """-> (ids of prompt + completion, number of prompt ids), the prompt rendered with the generation prompt."""
    prompt_ids = _chat_ids(tokenizer, prompt, True)
    full = _chat_ids(tokenizer, prompt + completion, False)
    if len(full) <= len(prompt_ids) or full[:len(prompt_ids)] != prompt_ids:
        raise _RowError("the chat template's rendering of prompt + completion does not start with its rendering "
                        "of the prompt alone, so the completion tokens cannot be told apart")
    return full, len(prompt_ids)


def _standard(tokenizer, prompt: str, completion: str, how: str, input: str | None) -> tuple[list[int], int, bool]:
    """A string prompt/completion -> (ids, number of prompt ids, whether the prompt's ids are a prefix of ids).

    Plain and Alpaca as TRL tokenizes standard rows: tokenizer(prompt) and tokenizer(prompt + completion) + eos."""
    if how == "chat":
        try:
            ids, n = _chat_completion(tokenizer, _user(prompt, input), [{"role": "assistant", "content": completion}])
        except _RowError as e:
            raise _RowError(f"{e} (try template 'auto', 'alpaca' or 'plain')") from None
        return ids, n, True
    text = _prompt_text(prompt, how, input)
    prompt_ids = _encode(tokenizer, text, True)
    ids = _encode(tokenizer, text + completion, True) + _eos_after(tokenizer, completion)
    return ids, len(prompt_ids), ids[:len(prompt_ids)] == prompt_ids


# ------------------------------------------------------------------------------------------------ rows

def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _present(row: dict, key: str) -> bool:
    return key in row and row[key] is not None and row[key] != ""


def _shape(row: dict) -> str:
    kinds = [k for k, keys in _SHAPES.items() if any(_present(row, f) for f in keys)]
    if not kinds:  # e.g. {"text": ""}: the field is there but empty; its checks say so
        kinds = [k for k, keys in _SHAPES.items() if any(f in row for f in keys)]
    if len(kinds) > 1:
        raise _RowError(f"ambiguous row: it has fields of the shapes {' and '.join(kinds)}; use one of {_ACCEPTED}")
    if not kinds:
        fields = ", ".join(repr(k) for k in row) or "none"
        raise _RowError(f"unknown row shape (fields: {fields}); expected one of {_ACCEPTED}")
    return kinds[0]


def _string(row: dict, key: str, *, optional: bool = False) -> str | None:
    if key not in row or (optional and row[key] in (None, "")):
        if optional:
            return None
        raise _RowError(f"missing field {key!r}")
    value = row[key]
    if not isinstance(value, str):
        raise _RowError(f"field {key!r} must be a string, not {_json_type(value)}")
    if not optional and not value.strip():
        raise _RowError(f"empty {key!r}")
    return value


def _messages(row: dict, key: str = "messages") -> list[dict]:
    messages = row[key]
    if not isinstance(messages, list):
        raise _RowError(f"field {key!r} must be an array, not {_json_type(messages)}")
    if not messages:
        raise _RowError(f"empty {key!r}")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _RowError(f"{key}[{j}] must be an object, not {_json_type(m)}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            got = "missing" if "role" not in m else repr(role)
            raise _RowError(f"{key}[{j}]: role {got} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            got = "missing" if "content" not in m else f"{_json_type(content)}, not a string"
            raise _RowError(f"{key}[{j}]: content is {got}")
        out.append({"role": role, "content": content})
    return out


def _chat_example(tokenizer, messages: list[dict], train_on_prompt: bool) -> tuple[list[int], list[int]]:
    full = _chat_ids(tokenizer, messages, False)
    if train_on_prompt:
        return full, list(full)
    labels = [IGNORE] * len(full)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        raise _RowError("no assistant message, so nothing to train on")
    for i in assistant:
        before = _chat_ids(tokenizer, messages[:i], True)
        through = _chat_ids(tokenizer, messages[:i + 1], False)
        if (len(through) <= len(before) or through[:len(before)] != before
                or full[:len(through)] != through):
            raise _RowError(f"the chat template does not render messages[{i}] (assistant) as an extension of the "
                            "conversation before it, so its tokens cannot be told apart")
        labels[len(before):len(through)] = through[len(before):]
    return full, labels


def _conversational(row: dict) -> bool:
    """A prompt/completion row of message lists (TRL's conversational prompt-completion)."""
    lists = [isinstance(row.get(k), list) for k in ("prompt", "completion")]
    if not any(lists):
        return False
    for k in ("prompt", "completion"):
        if k not in row:
            raise _RowError(f"missing field {k!r}")
    if not all(lists):
        raise _RowError("'prompt' and 'completion' must both be strings (plain text) or both arrays of messages "
                        "(conversational)")
    if _present(row, "input"):
        raise _RowError("field 'input' goes with a string prompt, not with messages")
    return True


def _with_labels(form: str, ids: list[int], n_prompt: int, train_on_prompt: bool, merged: bool = False) -> _Row:
    labels = list(ids) if train_on_prompt else [IGNORE] * n_prompt + ids[n_prompt:]
    return _Row(form, ids, labels, merged)


def _row_example(tokenizer, row: dict, template: str, train_on_prompt: bool) -> _Row:
    kind = _shape(row)
    if kind == "text":
        text = _string(row, "text")
        ids = _encode(tokenizer, text, True) + _eos_after(tokenizer, text)
        return _Row("text", ids, list(ids))
    if kind == "messages":
        messages = _messages(row)
        if not _has_chat_template(tokenizer):
            raise _RowError("a messages row needs a tokenizer with a chat template, and this one has none")
        return _Row("messages", *_chat_example(tokenizer, messages, train_on_prompt))
    if kind == "prompt/completion" and _conversational(row):
        form = "conversational prompt/completion"
        prompt, completion = _messages(row, "prompt"), _messages(row, "completion")
        if not _has_chat_template(tokenizer):
            raise _RowError(f"a {form} row needs a tokenizer with a chat template, and this one has none")
        return _with_labels(form, *_chat_completion(tokenizer, prompt, completion), train_on_prompt)
    if kind == "prompt/completion":
        prompt, completion = _string(row, "prompt"), _string(row, "completion")
    else:
        prompt, completion = _string(row, "instruction"), _string(row, "output")
    input = _string(row, "input", optional=True)
    ids, n_prompt, prefix = _standard(tokenizer, prompt, completion, rendering(kind, template), input)
    return _with_labels(kind, ids, n_prompt, train_on_prompt, merged=not prefix)


# ----------------------------------------------------------------------------------------------- files

def _jsonl_rows(path: Path) -> list[tuple[int, dict | _RowError]]:
    rows: list[tuple[int, dict | _RowError]] = []
    for line_no, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            rows.append((line_no, _RowError(f"not UTF-8 ({e.reason} at byte {e.start})")))
            continue
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            hint = " (the file must hold one JSON object a line, not one JSON array)" if line.strip() == "[" else ""
            rows.append((line_no, _RowError(f"invalid JSON: {e.msg} at column {e.colno}{hint}")))
            continue
        if not isinstance(value, dict):
            rows.append((line_no, _RowError(f"not a JSON object but {_json_type(value)}")))
            continue
        rows.append((line_no, value))
    return rows


def _csv_rows(path: Path) -> list[tuple[int, dict | _RowError]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not UTF-8 ({e.reason} at byte {e.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise DataError(f"{path}: line 1 (the header) is not valid CSV: {e}") from None
    if header is None:
        return []
    header = [h.strip() for h in header]
    duplicates = sorted({h for h in header if header.count(h) > 1})
    if duplicates:
        raise DataError(f"{path}: the header names the columns {', '.join(map(repr, duplicates))} more than once")
    rows: list[tuple[int, dict | _RowError]] = []
    while True:
        line_no = reader.line_num + 1  # where the next row starts (a quoted field may span lines)
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            rows.append((line_no, _RowError(f"invalid CSV ({e}); the rest of the file was not read")))
            break
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            rows.append((line_no, _RowError(f"{len(cells)} fields, but the header has {len(header)}")))
            continue
        rows.append((line_no, {h: c for h, c in zip(header, cells) if c != ""}))
    return rows


def _bad_rows(path: Path, problems: list[str]) -> DataError:
    n = len(problems)
    lines = [f"{path}: {n} bad row{'s' if n != 1 else ''}:"] + [f"  {p}" for p in problems[:MAX_REPORTED]]
    if n > MAX_REPORTED:
        lines.append(f"  ... and {n - MAX_REPORTED} more")
    return DataError("\n".join(lines), problems)


def load_examples(path: str | Path, tokenizer, *, template: str = "auto", max_length: int = 1024,
                  train_on_prompt: bool = False) -> list[Example]:
    """All rows of a .jsonl/.json/.csv file as Examples, in file order; any bad row -> one DataError for all."""
    path = Path(path)
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, not {max_length}")
    _check_template(tokenizer, template)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(path)
    elif suffix == ".csv":
        rows = _csv_rows(path)
    else:
        raise DataError(f"{path}: unsupported extension {path.suffix or '(none)'!r}; "
                        "expected .jsonl or .json (JSON Lines) or .csv")
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty)")
    examples, problems, merged = [], [], []
    for line_no, row in rows:
        where = f"{path.name}:{line_no}"
        try:
            if isinstance(row, _RowError):
                raise row
            r = _row_example(tokenizer, row, template, train_on_prompt)
            ids, labels = r.ids, r.labels
            if all(t == IGNORE for t in labels):
                raise _RowError("no tokens to train on")
            if len(ids) > max_length:
                n_tokens = len(ids)
                ids, labels = ids[:max_length], labels[:max_length]
                if all(t == IGNORE for t in labels):
                    raise _RowError(f"no completion tokens left after truncation to {max_length} "
                                    f"(the row has {n_tokens} tokens)")
        except _RowError as e:
            problems.append(f"{where}: {e}")
            continue
        if r.merged:
            merged.append(where)
        examples.append(Example(ids, labels, where, r.form))
    if problems:
        raise _bad_rows(path, problems)
    if merged:
        log.warning("%s: %d row%s (%s) tokenize differently where the prompt meets the completion than the prompt "
                    "alone: the prompt's last token merges with the completion's first (e.g. a prompt that ends in a "
                    "space). As in TRL, the loss starts after the prompt's own tokens, but a served prompt ends in a "
                    "token that training never continued: end the prompt before the space and start the completion "
                    "with it.", path, len(merged), "s" if len(merged) != 1 else "",
                    ", ".join(merged[:3]) + (", ..." if len(merged) > 3 else ""))
    return examples


# ------------------------------------------------------------------------------------- splits and batches

def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """-> (train, validation): round(len * fraction) examples, at least 1 and at most len - 1, picked by a
    torch.Generator(seed) permutation; both keep the input order."""
    if not 0 < fraction < 1:
        raise DataError(f"the validation fraction must be between 0 and 1 (exclusive), not {fraction}")
    n = len(examples)
    if n < 2:
        raise DataError(f"cannot split {n} example{'s' if n != 1 else ''} into training and validation: "
                        "each side needs at least one")
    n_valid = min(n - 1, max(1, round(n * fraction)))
    g = torch.Generator().manual_seed(seed)
    chosen = set(torch.randperm(n, generator=g)[:n_valid].tolist())
    train = [e for i, e in enumerate(examples) if i not in chosen]
    valid = [e for i, e in enumerate(examples) if i in chosen]
    return train, valid


def batches(examples: list[Example], batch_size: int, *, shuffle: bool, seed: int, epoch: int,
            rank: int = 0, world_size: int = 1, drop_last: bool = False) -> list[list[Example]]:
    """This rank's batches of one epoch. The order is a torch.randperm seeded seed + epoch (when shuffle), the
    same on every rank; batch i goes to rank i % world_size after truncating the batch count to a multiple of
    world_size, so every rank gets the same number of batches (the last, possibly short, batches are dropped)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    n = len(examples)
    if shuffle:
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    chunks = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if drop_last and chunks and len(chunks[-1]) < batch_size:
        chunks.pop()
    usable = len(chunks) - len(chunks) % world_size
    return [[examples[j] for j in chunks[i]] for i in range(rank, usable, world_size)]


def collate(batch: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> input_ids [B, S] (right-padded with pad_id), labels [B, S] (IGNORE on padding), lengths [B]; all long."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    for e in batch:
        if len(e.input_ids) != len(e.labels):
            raise ValueError(f"{e.source}: {len(e.input_ids)} input ids but {len(e.labels)} labels")
    lengths = torch.tensor([len(e.input_ids) for e in batch], dtype=torch.long)
    size = (len(batch), int(lengths.max()))
    input_ids = torch.full(size, pad_id, dtype=torch.long)
    labels = torch.full(size, IGNORE, dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
    return input_ids, labels, lengths
