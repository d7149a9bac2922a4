"""GSM8K-format data for split fine-tuning: :func:`load_gsm8k` and :func:`tokenize_batches`.

Records are JSON objects with string fields ``"question"`` and ``"answer"``; the sources are the shipped GSM8K
(``data/gsm8k``), an offline synthetic default, local JSONL files and Hugging Face datasets. Mini-batches carry
labels on the answer tokens only by default. Source: docs/split-training.md, "Workload".
"""
from __future__ import annotations

import json
import os
import random
import warnings
from pathlib import Path

import torch

from splitlora._validate import check_choice, check_int_range
from splitlora.errors import InvalidParameterError
from splitlora.paths import GSM8K_DIR

FIELDS = ("question", "answer")
PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
LOSS_ON = ("answer", "all")


def format_prompt(question: str) -> str:
    """``"Question: <question>\\nAnswer:"``: what the model sees before it answers (training and generation)."""
    return PROMPT_TEMPLATE.format(question=question)


def format_example(question: str, answer: str) -> str:
    """``"Question: <question>\\nAnswer: <answer>"`` (the text the model is trained on, before EOS)."""
    return format_prompt(question) + " " + answer


def encode_prompt(tokenizer, question: str, chat_template: bool = False) -> list[int]:
    """Token ids of the prompt of ``question``: :func:`format_prompt`, or with ``chat_template`` the tokenizer's
    chat template of one user turn with the generation prompt (instruct models). Raises ValueError if
    ``chat_template`` is asked of a tokenizer that has none."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidParameterError("chat_template=True is invalid: this tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(format_prompt(question), add_special_tokens=False)["input_ids"]


def encode_answer(tokenizer, answer: str, chat_template: bool = False) -> list[int]:
    """Token ids of the answer the model is trained to produce: ``" <answer>"`` (plain prompt) or ``"<answer>"``
    (chat template), then the tokenizer's EOS token."""
    ids = tokenizer((answer if chat_template else " " + answer), add_special_tokens=False)["input_ids"]
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


#: longest JSONL line (bytes) a GSM8K-format file may hold: GSM8K's longest record is under 2 KB. Checked while
#: reading, before a line is decoded or parsed, so a runaway line is refused at once rather than tokenised.
MAX_LINE_BYTES = 1 << 20


def _jsonl_records(path: Path):
    """Yield the records of a GSM8K-format JSONL file, each checked; blank lines skipped. Raises
    InvalidParameterError ``"<path>, line <n>: ..."`` for a line over :data:`MAX_LINE_BYTES`, non-UTF-8 bytes,
    invalid JSON, a non-object or a missing or non-string ``question``/``answer``."""
    with path.open("rb") as f:
        lineno = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:
                raise InvalidParameterError(f"{path}, line {lineno}: malformed record (longer than {MAX_LINE_BYTES} "
                                            "bytes; must be one GSM8K record per line)")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidParameterError(f"{path}, line {lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column "
                                            f"{e.start + 1}); must be a UTF-8 JSONL file") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidParameterError(f"{path}, line {lineno}: malformed record (invalid JSON: {e.msg})") from None
            if not isinstance(rec, dict):
                raise InvalidParameterError(f"{path}, line {lineno}: malformed record (a JSON object is required, "
                                 f"got {type(rec).__name__})")
            for k in FIELDS:
                if not isinstance(rec.get(k), str):
                    raise InvalidParameterError(f"{path}, line {lineno}: malformed record (field {k!r} must be a string, "
                                     f"got {rec.get(k)!r})")
            yield {k: rec[k] for k in FIELDS}


def _all_records(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    records = list(_jsonl_records(path))
    if not records:
        raise InvalidParameterError(f"{path} is invalid: holds no record (empty, or blank lines only); must hold "
                                    "GSM8K-format lines {\"question\": ..., \"answer\": ...}")
    return records


def validate_jsonl(path: str | os.PathLike) -> int:
    """Check every line of a GSM8K-format JSONL file; return the number of records (at least one).

    Raises ValueError ``"<path>, line <n>: <what is wrong>"`` for invalid JSON, a non-object, a missing
    or non-string ``question``/``answer``, non-UTF-8 bytes, a line over :data:`MAX_LINE_BYTES`; ValueError naming the
    path for a file without a record; FileNotFoundError if the file is absent. Blank lines are skipped.
    """
    return len(_all_records(path))


def read_jsonl(path: str | os.PathLike, limit: int | None = None):
    """A ``datasets.Dataset`` of a validated GSM8K-format JSONL file (columns question, answer),
    optionally the first ``limit`` records. Raises as :func:`validate_jsonl`."""
    from datasets import Dataset

    if limit is not None:
        check_int_range("limit", limit, 0, 10**9)
    records = _all_records(path)[:limit]
    return Dataset.from_dict({k: [r[k] for r in records] for k in FIELDS})


_NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo"]
_ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "coins", "cookies", "stamps"]


def synthetic_gsm8k(n: int = 512, seed: int = 0):
    """The offline default: ``n`` seeded two-step arithmetic word problems in GSM8K format
    (``<<a+b=c>>`` annotations and a final ``#### <answer>`` line), as a ``datasets.Dataset``."""
    from datasets import Dataset

    check_int_range("n", n, 1, 10**7)
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        who, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        a, b, k = rng.randint(2, 60), rng.randint(2, 40), rng.randint(2, 5)
        s = a + b
        q = (f"{who} has {a} {item} and gets {b} more. Then {who} gives away a {k}th of them, rounded down. "
             f"How many {item} does {who} have left?")
        g = s // k
        ans = (f"{who} has {a}+{b} = <<{a}+{b}={s}>>{s} {item}.\n{who} gives away {s}/{k} = <<{s}//{k}={g}>>{g}.\n"
               f"{who} has {s}-{g} = <<{s}-{g}={s - g}>>{s - g} left.\n#### {s - g}")
        rows.append({"question": q, "answer": ans})
    return Dataset.from_list(rows)


def load_gsm8k(source: str | os.PathLike | None = None, split: str = "train", limit: int | None = None,
               seed: int = 0):
    """GSM8K-format records as a ``datasets.Dataset`` (columns question, answer).

    ``source``: None (offline synthetic default, ``limit`` records or 512), ``"gsm8k"`` (the shipped copy of the
    real GSM8K in ``data/gsm8k``: 7,473 train / 1,319 test records, MIT; unless a local ``gsm8k`` path exists,
    which is then read), a ``.jsonl`` file, a folder with
    ``<split>.jsonl``, or a Hugging Face dataset name (online; ``"openai/gsm8k"`` uses config ``"main"``).
    ``split``: ``"train"`` or ``"test"``. Raises ValueError for a malformed record (with its line number)
    or a bad split; FileNotFoundError for a folder without the split's file.
    """
    check_choice("split", split, ("train", "test"))
    if isinstance(source, str) and source.lower() == "gsm8k" and not Path(source).exists():
        source = GSM8K_DIR
    if source is None:
        return synthetic_gsm8k(limit or 512, seed=seed + (0 if split == "train" else 1))
    p = Path(source)
    if p.is_dir():
        f = p / f"{split}.jsonl"
        if not f.exists():
            raise FileNotFoundError(f"source={str(source)!r} is invalid: the folder has no {split}.jsonl")
        return read_jsonl(f, limit)
    if p.suffix == ".jsonl" or p.exists():
        return read_jsonl(p, limit)
    from datasets import load_dataset

    name = str(source)
    ds = load_dataset(name, "main", split=split) if name.endswith("gsm8k") else load_dataset(name, split=split)
    ds = ds.select_columns(list(FIELDS))
    return ds.select(range(min(limit, len(ds)))) if limit is not None else ds


def tokenize_batches(dataset, tokenizer, batch_size: int = 4, seq_len: int = 128, *,
                     padding: str = "max_length", shuffle_seed: int | None = None, drop_last: bool = True,
                     loss_on: str = "answer", chat_template: bool = False) -> list[dict[str, torch.Tensor]]:
    """Mini-batches of tokenised GSM8K records.

    Each batch: ``input_ids`` (B, s) long, ``attention_mask`` (B, s) long (1 = token), ``labels`` (B, s) long =
    input_ids with -100 on padding and, with ``loss_on="answer"`` (default), on the prompt tokens too, so the loss
    is the mean over answer tokens (``"all"``: every token). s = ``seq_len`` (``padding="max_length"``) or the
    longest record of the batch (``"longest"``). Text: :func:`encode_prompt` + :func:`encode_answer` (tokenised
    apart, so the prompt/answer boundary is exact). Right padding. ``shuffle_seed`` shuffles the record order first
    (None: file order); the last incomplete batch is dropped if ``drop_last``.

    Records longer than ``seq_len`` tokens are truncated, and a ``UserWarning`` says how many (and how many kept
    no answer token at all). Raises ValueError for a bad argument or a tokenizer without a pad token.
    """
    check_int_range("batch_size", batch_size, 1, 10**6)
    check_int_range("seq_len", seq_len, 2, 10**6)
    check_choice("padding", padding, ("max_length", "longest"))
    check_choice("loss_on", loss_on, LOSS_ON)
    if tokenizer.pad_token is None:
        raise InvalidParameterError("tokenizer.pad_token=None is invalid: must be set (e.g. to the EOS token)")
    order = list(range(len(dataset)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    tokenizer.padding_side = "right"
    pad_id = tokenizer.pad_token_id
    batches, truncated, no_answer, used = [], 0, 0, 0
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        if len(idx) < batch_size and drop_last:
            break
        rows = dataset[idx] if hasattr(dataset, "select") else {k: [dataset[j][k] for j in idx] for k in FIELDS}
        seqs = []
        for q, a in zip(rows["question"], rows["answer"]):
            p_ids, a_ids = encode_prompt(tokenizer, q, chat_template), encode_answer(tokenizer, a, chat_template)
            ids = (p_ids + a_ids)[:seq_len]
            lab = ([-100] * len(p_ids) + a_ids)[:seq_len] if loss_on == "answer" else list(ids)
            truncated += len(p_ids) + len(a_ids) > seq_len
            no_answer += len(p_ids) >= seq_len
            seqs.append((ids, lab))
        used += len(seqs)
        s = seq_len if padding == "max_length" else max(len(x) for x, _ in seqs)
        ids = torch.full((len(seqs), s), pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), s), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), s), dtype=torch.long)
        for r, (x, lab) in enumerate(seqs):
            ids[r, :len(x)], labels[r, :len(x)], mask[r, :len(x)] = torch.tensor(x), torch.tensor(lab), 1
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    if truncated:
        warnings.warn(f"{truncated} of {used} records are longer than seq_len={seq_len} tokens and were "
                      f"truncated ({no_answer} kept no answer token); raise seq_len to train on whole answers",
                      UserWarning, stacklevel=2)
    return batches
