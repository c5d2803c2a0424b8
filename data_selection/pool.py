"""Recovery pool loading: JSON / JSONL / CSV / Parquet files or a `datasets` directory, in Alpaca,
ShareGPT or chat form, normalised to one `Record`. A bad record is reported with where it is and
why, never dropped silently and never fatal."""

from __future__ import annotations

import codecs
import csv
import json
import contextlib
import math
import os
import signal
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from llm_prune.errors import UserError

FILE_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".parquet")
PARQUET_BATCH_ROWS = 64
# A record longer than this is not read into memory to be decoded: a book is a few MB, and a
# 2 GB line or array element held the reader (and the API server checking an upload) at 5-10x that.
MAX_RECORD_CHARS = 64 << 20
USER_ROLES = {"human", "user", "prompter"}
ASSISTANT_ROLES = {"gpt", "assistant", "chatgpt", "bard", "bing", "model", "bot"}
SYSTEM_ROLES = {"system"}

# A byte-order mark is dropped (what Excel and Notepad write); bytes that are not UTF-8 survive as
# surrogates, so the record holding them is reported (`_text`) instead of trained on as U+FFFD.
ENCODING, UNDECODABLE = "utf-8-sig", "surrogateescape"
# One long field (a 5 MB answer) is a record like any other, not the end of the file.
csv.field_size_limit(2**31 - 1)

ALPACA_TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n")


@dataclass
class Record:
    """One instruction/response pair. `prompt` already holds the Alpaca `input`, if any."""

    prompt: str
    response: str
    source_id: str
    system: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not data["system"]:
            del data["system"]
        return data


@dataclass
class PoolLoad:
    records: list[Record] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (location, reason)

    def summary(self, limit: int = 20) -> dict[str, Any]:
        return {"records": len(self.records), "malformed": len(self.errors),
                "malformed_examples": [{"location": loc, "reason": why} for loc, why in self.errors[:limit]]}


class MalformedRecord(ValueError):
    pass


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        if isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and math.isfinite(value):
            return str(value)
        shown = value if isinstance(value, float) else type(value).__name__  # NaN, Infinity: no text to learn
        raise MalformedRecord(f"'{what}' is {shown}, expected text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # bytes of another encoding, kept as surrogates by the reader
        raise MalformedRecord(f"'{what}' is not UTF-8 text (Latin-1 or another encoding?); save the pool as "
                              "UTF-8") from None
    return value.strip()


def _from_turns(turns: Any, role_key: str, text_key: str, what: str) -> tuple[str, str, str]:
    """First user turn and the assistant reply to it (later turns lean on context we would drop)."""
    if not isinstance(turns, list) or not turns:
        raise MalformedRecord(f"'{what}' must be a non-empty list of turns")
    system, prompt = "", None
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise MalformedRecord(f"{what}[{i}] needs '{role_key}' and '{text_key}'")
        role = str(turn[role_key]).lower()
        text = _text(turn[text_key], f"{what}[{i}].{text_key}")
        if role in SYSTEM_ROLES and prompt is None:
            system = text
        elif role in USER_ROLES and prompt is None:
            prompt = text
        elif role in ASSISTANT_ROLES and prompt is not None:
            if not text:
                raise MalformedRecord(f"{what}[{i}] assistant reply is empty")
            return system, prompt, text
        elif role not in USER_ROLES | ASSISTANT_ROLES | SYSTEM_ROLES:
            raise MalformedRecord(f"{what}[{i}] has unknown role '{turn[role_key]}'")
    raise MalformedRecord(f"'{what}' has no user turn followed by an assistant reply")


def normalise(row: Any, source_id: str) -> Record:
    """Turn one raw row (Alpaca, ShareGPT or chat form) into a Record, or raise MalformedRecord."""
    if not isinstance(row, dict):
        raise MalformedRecord(f"expected an object, got {type(row).__name__}")
    system = ""
    if "conversations" in row:
        system, prompt, response = _from_turns(row["conversations"], "from", "value", "conversations")
    elif "messages" in row:
        system, prompt, response = _from_turns(row["messages"], "role", "content", "messages")
    elif "instruction" in row or "prompt" in row:
        key = "instruction" if "instruction" in row else "prompt"
        prompt = _text(row[key], key)
        extra = _text(row.get("input"), "input")
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        out_key = next((k for k in ("output", "response", "completion") if k in row), None)
        if out_key is None:
            raise MalformedRecord(f"has '{key}' but no 'output'")
        response = _text(row[out_key], out_key)
        system = _text(row.get("system"), "system")
    else:
        keys = ", ".join(sorted(map(str, row))[:6]) or "none"
        raise MalformedRecord(f"unknown form (keys: {keys}); expected instruction/output, conversations or messages")
    if not prompt:
        raise MalformedRecord("empty instruction")
    if not response:
        raise MalformedRecord("empty response")
    rid = row.get("id")
    if isinstance(rid, (str, int)) and str(rid):
        source_id = f"{source_id}#{rid}"
    # An id (or a file name) in another encoding than UTF-8 is only a label: written out escaped.
    source_id = source_id.encode("utf-8", "backslashreplace").decode("utf-8")
    return Record(prompt=prompt, response=response, source_id=source_id, system=system)


def _iter_json_array(fh, name: str, chunk_chars: int = 8 << 20) -> Iterator[tuple[str, Any]]:
    """Decode a JSON array element by element, reading it in chunks: a big file never sits in memory
    whole, and a truncated file still yields its good records."""
    decoder = json.JSONDecoder()
    text, eof = fh.read(chunk_chars), False
    pos = text.index("[") + 1
    n = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos < len(text) and text[pos] == "]":
            return
        try:
            obj, end = decoder.raw_decode(text, pos)
        except (RecursionError, ValueError) as exc:
            if not isinstance(exc, json.JSONDecodeError):  # valid JSON the decoder refuses: nothing to resync on
                yield f"{name}[{n}]", MalformedRecord(f"element {n}: {_undecodable(exc)}")
                return
            if not eof and len(text) - pos > MAX_RECORD_CHARS:  # no element end to resync on: stop here
                yield f"{name}[{n}]", MalformedRecord(f"element {n} is longer than {MAX_RECORD_CHARS >> 20} MiB")
                return
            if not eof:  # the buffer ends inside (or just before) this element: read on and retry
                more = fh.read(chunk_chars)
                text, pos, eof = text[pos:] + more, 0, not more
                continue
            if pos < len(text):
                yield f"{name}[{n}]", MalformedRecord(f"element {n}: invalid JSON ({exc.msg})"
                                                      f"{'' if text.rstrip().endswith(']') else ' - file truncated?'}")
            else:  # cut off right after a whole element: its records are good, the file is not whole
                yield f"{name}[{n}]", MalformedRecord(f"the array ends after {n} elements without its closing "
                                                      "']' - file truncated?")
            return
        yield f"{name}[{n}]", obj
        pos, n = end, n + 1


def _iter_file(path: Path) -> Iterator[tuple[str, Any]]:
    name = path.name
    suffix = path.suffix.lower()
    if suffix != ".parquet":
        with path.open("rb") as fh:
            head = fh.read(4)
        if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            raise UserError(f"{path} is UTF-16 or UTF-32 text; save it as UTF-8", param="pool")
    if suffix in (".jsonl", ".ndjson"):
        yield from _iter_json_lines(path)
    elif suffix == ".json":
        with path.open(encoding=ENCODING, errors=UNDECODABLE) as fh:
            head = fh.read(4096).lstrip()[:1]
            if head == "[":
                fh.seek(0)
                yield from _iter_json_array(fh, name)
                return
        if head == "{":
            if path.stat().st_size > MAX_RECORD_CHARS:  # one object, read and decoded whole
                raise UserError(f"{path} is one JSON object of over {MAX_RECORD_CHARS >> 20} MiB; give a pool this "
                                "large as JSON lines or a JSON array, which are read record by record", param="pool")
            text = path.read_text(encoding=ENCODING, errors=UNDECODABLE)
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                # Some ".json" files are really JSON lines.
                yield from _iter_json_lines(path)
                return
            except (RecursionError, ValueError) as exc:
                raise UserError(f"{path}: {_undecodable(exc)}", param="pool") from None
            rows = obj.get("data") if isinstance(obj.get("data"), list) else [obj]
            for i, row in enumerate(rows):
                yield f"{name}[{i}]", row
        else:
            raise UserError(f"{path} is not JSON (expected '[' or '{{' at the start)", param="pool")
    elif suffix == ".csv":
        with path.open(encoding=ENCODING, errors=UNDECODABLE, newline="") as fh:
            reader = csv.DictReader(fh)
            try:
                for row in reader:  # located by the line the record ends on (a field may span lines)
                    yield f"{name}:{reader.line_num}", dict(row)
            except csv.Error as exc:  # e.g. a field over the csv module's size limit
                raise UserError(f"{path}, line {reader.line_num}: cannot read CSV ({exc})", param="pool") from None
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        # Batches of rows: a few hundred bytes of Parquet (one long string, dictionary-encoded,
        # repeated) decode to gigabytes, which a whole-table read held at once.
        i = 0
        try:
            parquet = pq.ParquetFile(path)
            for g in range(parquet.metadata.num_row_groups):
                group = parquet.metadata.row_group(g)
                if group.total_byte_size > MAX_RECORD_CHARS * max(group.num_rows, 1):
                    raise UserError(f"{path}: row group {g} holds more than {MAX_RECORD_CHARS >> 20} MiB per row",
                                    param="pool")
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                for row in batch.to_pylist():
                    yield f"{name}[{i}]", row
                    i += 1
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken file is the user's input
            raise UserError(f"cannot read Parquet file {path}: {str(exc).splitlines()[0]}", param="pool") from None


def _iter_json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding=ENCODING, errors=UNDECODABLE) as fh:
        for i, line in enumerate(iter(lambda: fh.readline(MAX_RECORD_CHARS + 1), ""), 1):
            if len(line) > MAX_RECORD_CHARS:
                while line and not line.endswith("\n"):  # the rest of the line, piece by piece
                    line = fh.readline(MAX_RECORD_CHARS)
                yield f"{path.name}:{i}", MalformedRecord(f"longer than {MAX_RECORD_CHARS >> 20} MiB")
                continue
            if line.strip():
                try:
                    obj = json.loads(line)
                except (RecursionError, ValueError) as exc:
                    yield f"{path.name}:{i}", MalformedRecord(_undecodable(exc))
                    continue
                yield f"{path.name}:{i}", obj


def _undecodable(exc: Exception) -> str:
    """Why a piece of JSON cannot be read: a syntax error, or valid JSON Python's decoder refuses
    (nesting deeper than the recursion limit, an integer of more than 4,300 digits)."""
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON ({exc.msg})"
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply to read"
    return f"unreadable JSON ({str(exc).splitlines()[0][:120]})"


def _iter_datasets_dir(path: Path) -> Iterator[tuple[str, Any]]:
    from datasets import Dataset, load_from_disk

    try:
        data = load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot load datasets folder {path}: {str(exc).splitlines()[0]}", param="pool") from None
    splits = {"": data} if isinstance(data, Dataset) else {k: data[k] for k in data}
    for split, ds in splits.items():
        for i, row in enumerate(ds):
            yield f"{path.name}{'/' + split if split else ''}[{i}]", row


def _is_datasets_dir(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def _folder_entries(folder: Path) -> list[Path]:
    """A pool folder's datasets folders and record files, in path order: the folder itself when it
    is one datasets folder; a datasets folder inside is read as one (its own JSON files are
    metadata, not records); pipes and other special files are left out."""
    if _is_datasets_dir(folder):
        return [folder]
    entries = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        if here != folder and _is_datasets_dir(here):
            entries.append(here)
            dirnames.clear()
            continue
        entries += [here / f for f in filenames if Path(f).suffix.lower() in FILE_SUFFIXES and (here / f).is_file()]
    return sorted(entries)


def iter_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(location, raw row) for every row of a pool file or folder, in order, before normalising;
    a row that cannot be decoded comes as a MalformedRecord."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"pool not found: {path}", param="pool")
    if path.is_dir():
        entries = _folder_entries(path)
        if not entries:
            raise UserError(f"pool folder {path} holds no datasets folder and no "
                            f"{'/'.join(FILE_SUFFIXES)} files", param="pool")
        for entry in entries:
            yield from (_iter_datasets_dir(entry) if entry.is_dir() else _iter_file(entry))
        return
    if not path.is_file():  # a named pipe would block the read until someone writes to it
        raise UserError(f"pool {path} is not a regular file or folder", param="pool")
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise UserError(f"pool file {path} has an unsupported type; use {', '.join(FILE_SUFFIXES)} "
                        f"or a datasets folder", param="pool")
    yield from _iter_file(path)


def iter_records(path: str | Path) -> Iterator[tuple[str, Record | str]]:
    """(location, Record) for each usable row of a pool, (location, reason) for each malformed one,
    one row in memory at a time."""
    for location, row in iter_rows(path):
        if isinstance(row, MalformedRecord):
            yield location, str(row)
            continue
        try:
            yield location, normalise(row, location)
        except MalformedRecord as exc:
            yield location, str(exc)


def no_usable_records(path: str | Path, malformed: int, first: tuple[str, str] | None) -> UserError:
    problem = f"; first problem: {first[0]}: {first[1]}" if first else ""
    return UserError(f"pool {path} holds no usable records ({malformed} malformed){problem}", param="pool")


def load_pool(path: str | Path, limit: int | None = None) -> PoolLoad:
    """Load and normalise a recovery pool. `limit` stops after that many good records."""
    load = PoolLoad()
    for location, record in iter_records(path):
        if isinstance(record, str):
            load.errors.append((location, record))
            continue
        load.records.append(record)
        if limit is not None and len(load.records) >= limit:
            return load
    if not load.records:
        raise no_usable_records(path, len(load.errors), load.errors[0] if load.errors else None)
    return load


# A chat template is the model's own Jinja code: its sandbox stops it reaching out, not looping
# (nested `range` loops rendered for ever, growing 150 MB/s). One conversation renders in
# milliseconds; this is time enough for any real template on a long record.
TEMPLATE_SECONDS = 5.0


@contextlib.contextmanager
def _template_deadline():
    """The render is stopped by a timer signal, which only the main thread receives; encoding runs
    there (CLI and job processes), elsewhere the render is left unbounded."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(*_):
        raise UserError(f"the tokenizer's chat template took over {TEMPLATE_SECONDS:g} s to render one record; "
                        "give the model a template that renders a conversation", param="data.pool")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, TEMPLATE_SECONDS)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _chat_texts(tokenizer, messages: list[dict], response: str) -> tuple[str, str]:
    with _template_deadline():
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                             tokenize=False)
    return prompt, full


def format_example(tokenizer, record: Record) -> tuple[str, str]:
    """(prompt_text, response_text) as the model sees them: the chat template when the tokenizer has
    one, otherwise the Alpaca template. Training masks the prompt part, so this is the one place that
    decides where the prompt ends."""
    eos = tokenizer.eos_token or ""
    if getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError

        messages = ([{"role": "system", "content": record.system}] if record.system else [])
        messages.append({"role": "user", "content": record.prompt})
        try:
            prompt_text, full = _chat_texts(tokenizer, messages, record.response)
        except TemplateError as exc:
            if not record.system:
                raise UserError(f"the tokenizer's chat template refuses a record: {exc}", param="data.pool") from None
            # Templates without a system role (Mistral-Instruct v0.1, Gemma): its text leads the prompt.
            merged = [{"role": "user", "content": f"{record.system}\n\n{record.prompt}"}]
            try:
                prompt_text, full = _chat_texts(tokenizer, merged, record.response)
            except TemplateError as again:
                raise UserError(f"the tokenizer's chat template refuses a record: {again}",
                                param="data.pool") from None
        if full.startswith(prompt_text) and len(full) > len(prompt_text):
            return prompt_text, full[len(prompt_text):]
        return prompt_text, record.response + eos
    prompt = f"{record.system}\n\n{record.prompt}" if record.system else record.prompt
    return ALPACA_TEMPLATE.format(prompt=prompt), record.response + eos
