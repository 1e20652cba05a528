"""Preference data: the built-in generated default, JSONL loading, tokenisation, batching.

The built-in default ("sort the digits")
----------------------------------------
Each prompt asks to sort a string of digits, ``"sort 4180: "``; the chosen answer is the
digits sorted, ``"0148"``; the rejected answer is wrong in one of a few ways (two adjacent
digits swapped, one digit replaced, the digits left unsorted, or one digit dropped or
repeated). The ground truth is unambiguous, a small random-init transformer learns it in well
under a minute on a CPU, and it is generated deterministically from a seed, so the train and
held-out sets are the same on every machine (and the held-out prompts never occur in the
training set).

JSONL files
-----------
One JSON object per line, in any of TRL's preference formats:

- standard: ``{"prompt": str, "chosen": str, "rejected": str}`` (text = prompt + answer);
- implicit prompt: ``{"chosen": str, "rejected": str}`` (the prompt is inside both);
- conversational: the same keys holding lists of ``{"role": str, "content": str}``
  messages, rendered with the tokenizer's chat template.

An optional numeric ``margin`` field (the name is configurable) is the BT margin of the
pair. Blank lines are skipped. Anything else stops with a :class:`TrainingError` that
names the file, the line and the field.
"""
import json
import math
import random

import torch

from rmkernels_train.utils import FLOAT32_MAX, TrainingError, open_data_text

# ---------------------------------------------------------------------------------------
# The built-in default data set
# ---------------------------------------------------------------------------------------
SORT_ALPHABET = "0123456789 sort:"
REJECT_KINDS = ("swap", "replace", "unsorted", "drop", "repeat")


def _sort_example(rng, min_digits, max_digits):
    """(prompt digits, chosen, rejected, kind) for one generated prompt."""
    while True:
        n = rng.randint(min_digits, max_digits)
        digits = [rng.randrange(10) for _ in range(n)]
        if len(set(digits)) >= 2:  # a single repeated digit has no wrong order
            break
    good = sorted(digits)
    kind = rng.choice(REJECT_KINDS)
    if kind == "swap":  # two adjacent, different digits swapped: out of order
        i = rng.choice([j for j in range(n - 1) if good[j] != good[j + 1]])
        bad = good[:]
        bad[i], bad[i + 1] = bad[i + 1], bad[i]
    elif kind == "replace":  # one digit replaced, still in order: wrong digits
        i = rng.randrange(n)
        new = rng.choice([d for d in range(10) if d != good[i]])
        bad = sorted(good[:i] + [new] + good[i + 1:])
    elif kind == "unsorted":  # the input order (re-shuffled if it happened to be sorted)
        bad = digits[:]
        while bad == good:
            rng.shuffle(bad)
    elif kind == "drop":
        i = rng.randrange(n)
        bad = good[:i] + good[i + 1:]
    else:  # "repeat": one digit written twice
        i = rng.randrange(n)
        bad = good[:i + 1] + good[i:]
    return "".join(map(str, digits)), "".join(map(str, good)), "".join(map(str, bad)), kind


def make_sort_pairs(n, seed, *, min_digits=4, max_digits=7, exclude=()):
    """``n`` preference pairs ``{"prompt", "chosen", "rejected", "kind"}`` of the sorting task,
    generated from ``seed`` alone; prompts in ``exclude`` (digit strings) are skipped and no
    prompt repeats."""
    rng = random.Random(seed)
    seen, out = set(exclude), []
    while len(out) < n:
        digits, good, bad, kind = _sort_example(rng, min_digits, max_digits)
        if digits in seen:
            continue
        seen.add(digits)
        out.append({"prompt": f"sort {digits}: ", "chosen": good, "rejected": bad, "kind": kind})
    return out


DEFAULT_HELD_OUT = 500  # held-out pairs of the built-in task (and so its held-out prompts)


def default_datasets(n_train=6000, n_eval=DEFAULT_HELD_OUT, seed=1234, **kw):
    """(train, held-out) pairs of the built-in task. The held-out prompts are generated
    first from their own seed and excluded from the training set."""
    held = make_sort_pairs(n_eval, seed + 1, **kw)
    train = make_sort_pairs(n_train, seed, exclude={p["prompt"][5:-2] for p in held}, **kw)
    return train, held


# ---------------------------------------------------------------------------------------
# JSONL loading
# ---------------------------------------------------------------------------------------
def parse_json_line(line, where):
    """One line of a JSONL file as a Python value; anything that is not JSON Python can hold
    (bad syntax, nesting deeper than the parser's recursion limit, an integer of more digits
    than Python converts) raises :class:`TrainingError` starting with ``where``."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise TrainingError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise TrainingError(f"{where}: not valid JSON here (nested too deeply to parse)") from None
    except ValueError as e:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise TrainingError(f"{where}: not valid JSON here ({str(e).splitlines()[0][:120]})") from None


def check_text(value, where, field):
    """A string that is valid Unicode text (JSON's ``\\ud800`` escapes decode to lone
    surrogates, which no tokenizer can encode)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TrainingError(f"{where}: field {field!r} is not valid Unicode text (a lone surrogate "
                            f"{value[e.start]!r} at character {e.start})") from None


def _check_messages(value, where, field):
    if not isinstance(value, list) or not value:
        raise TrainingError(f"{where}: field {field!r} must be a non-empty list of messages like 'chosen' is, got "
                            f"{_describe(value)}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TrainingError(f"{where}: field {field!r}: message {i} must be an object with string 'role' and "
                                f"'content', got {_describe(m)}")
        check_text(m["role"], where, f"{field}[{i}].role")
        check_text(m["content"], where, f"{field}[{i}].content")


def _describe(v):
    try:
        s = json.dumps(v) if not isinstance(v, str) else repr(v)
    except (ValueError, RecursionError):  # an integer too long for str(), a deep nesting
        s = "..."
    return f"{type(v).__name__} {s[:60]}{'...' if len(s) > 60 else ''}"


def validate_record(rec, where, margin_field="margin"):
    """Check one parsed record of a preference file; returns it normalised to
    ``{"prompt": str | list | None, "chosen", "rejected", "margin": float | None}``. The
    format (plain text or conversational) is the one of ``chosen``; an error names the field
    that is wrong."""
    if not isinstance(rec, dict):
        raise TrainingError(f"{where}: expected a JSON object with 'chosen' and 'rejected', got {_describe(rec)}")
    for field in ("chosen", "rejected"):
        if field not in rec:
            raise TrainingError(f"{where}: missing field {field!r} (keys present: {sorted(rec)})")
    chosen = rec["chosen"]
    if not isinstance(chosen, (str, list)):
        raise TrainingError(f"{where}: field 'chosen' must be a string or a list of messages, got "
                            f"{_describe(chosen)}")
    conversational = isinstance(chosen, list)
    for field in ("chosen", "rejected", "prompt"):
        if field not in rec or (field == "prompt" and rec[field] is None):
            continue
        v = rec[field]
        if conversational:
            _check_messages(v, where, field)
        elif not isinstance(v, str):
            raise TrainingError(f"{where}: field {field!r} must be a string like 'chosen' is, got {_describe(v)}")
        else:
            check_text(v, where, field)
            if field != "prompt" and not v:
                raise TrainingError(f"{where}: field {field!r} is an empty string")
    margin = rec.get(margin_field)
    if margin is not None:
        bad = isinstance(margin, bool) or not isinstance(margin, (int, float))
        if not bad:
            try:
                margin = float(margin)  # a 400-digit integer overflows here
            except OverflowError:
                bad = True
        # the margins go to the loss as float32: beyond its range a margin is inf there
        if bad or not math.isfinite(margin) or abs(margin) > FLOAT32_MAX:
            raise TrainingError(f"{where}: field {margin_field!r} must be a finite number within float32's range "
                                f"(|margin| <= {FLOAT32_MAX:.4g}), got {_describe(rec.get(margin_field))}")
    return {"prompt": rec.get("prompt"), "chosen": rec["chosen"], "rejected": rec["rejected"], "margin": margin}


def load_jsonl(path, margin_field="margin"):
    """Read a preference JSONL file (see the module docstring). Errors name file, line and
    field: ``data.jsonl:7: missing field 'rejected' (keys present: ['chosen', 'prompt'])``."""
    try:
        f = open_data_text(path)
    except OSError as e:
        raise TrainingError(f"cannot read data file {path}: {e.strerror}") from None
    out = []
    with f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                rec = validate_record(parse_json_line(line.rstrip("\r\n"), where), where, margin_field)
                rec["where"] = where
                out.append(rec)
        except UnicodeDecodeError as e:
            raise TrainingError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start} of a line)") from None
    if not out:
        raise TrainingError(f"{path}: no preference pairs (the file is empty)")
    have_margin = [r["margin"] is not None for r in out]
    if any(have_margin) and not all(have_margin):
        first = out[have_margin.index(False)]["where"]
        raise TrainingError(f"{first}: missing field {margin_field!r} (other lines have it: give it on every "
                            f"line or on none)")
    kinds = {isinstance(r["chosen"], str) for r in out}
    if len(kinds) > 1:
        first = next(r["where"] for r in out if isinstance(r["chosen"], str) != isinstance(out[0]["chosen"], str))
        raise TrainingError(f"{first}: field 'chosen' mixes the conversational and the plain-text format "
                            f"with earlier lines")
    return out


# ---------------------------------------------------------------------------------------
# Tokenisation and batching
# ---------------------------------------------------------------------------------------
def render(rec, field, tokenizer):
    """The text of ``prompt + rec[field]`` (plain strings are concatenated; messages go
    through the tokenizer's chat template)."""
    prompt, answer = rec.get("prompt"), rec[field]
    if isinstance(answer, str):
        return (prompt or "") + answer
    if not getattr(tokenizer, "chat_template", None):
        raise TrainingError(f"{rec.get('where', 'data')}: conversational data needs a tokenizer with a chat "
                            f"template, and this tokenizer has none")
    messages = list(prompt or []) + list(answer)
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _encode(tokenizer, texts, add_special_tokens):
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:  # the same ids, without the per-text Python objects of __call__ (2x faster)
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


def longest_token_chars(tokenizer):
    """The most characters of one vocabulary entry: a text longer than n times this has more
    than n tokens, which is known without tokenizing it (a 20 MB line takes minutes)."""
    return max((len(t) for t in tokenizer.get_vocab()), default=1) or 1


def _strip_trailing(ids, pad):
    end = len(ids)
    while end and ids[end - 1] == pad:
        end -= 1
    return ids if end == len(ids) else ids[:end]


def tokenize_pairs(records, tokenizer, max_length=None):
    """Token ids of each pair: a list of ``{"chosen_ids", "rejected_ids", "margin"}``. Pairs
    whose chosen or rejected sequence is longer than ``max_length`` are dropped (as TRL's
    RewardTrainer does); returns ``(pairs, n_dropped)``."""
    texts_c = [render(r, "chosen", tokenizer) for r in records]
    texts_r = [render(r, "rejected", tokenizer) for r in records]
    add_special = not any(isinstance(r["chosen"], list) for r in records)  # the template has them
    dropped = 0
    if max_length is not None:
        # A cheap pre-check before tokenizing: a text of more characters than max_length of the
        # vocabulary's longest entries is surely too long.
        longest = longest_token_chars(tokenizer)
        keep = [i for i, (c, r) in enumerate(zip(texts_c, texts_r))
                if len(c) <= max_length * longest and len(r) <= max_length * longest]
        dropped = len(records) - len(keep)
        if dropped:
            records = [records[i] for i in keep]
            texts_c = [texts_c[i] for i in keep]
            texts_r = [texts_r[i] for i in keep]
    ids_c = _encode(tokenizer, texts_c, add_special)
    ids_r = _encode(tokenizer, texts_r, add_special)
    pad = tokenizer.pad_token_id
    if pad is not None:
        # HF's *ForSequenceClassification pools at the rightmost token that is not the pad token.
        # When pad == eos and the tokenizer appends eos, that is the token before the eos: a
        # trailing pad-id token is dropped here, so that the trainer (which pools at the last
        # token of each sequence) scores where the saved model, loaded with
        # AutoModelForSequenceClassification, scores (a causal model's hidden state there does
        # not depend on the token after it). Tokenizers with a pad token of their own never
        # produce one: nothing changes for them.
        ids_c = [_strip_trailing(x, pad) for x in ids_c]
        ids_r = [_strip_trailing(x, pad) for x in ids_r]
    pairs = []
    for rec, c, r in zip(records, ids_c, ids_r):
        if max_length is not None and (len(c) > max_length or len(r) > max_length):
            dropped += 1
            continue
        if not c or not r:
            raise TrainingError(f"{rec.get('where', 'data')}: field {'chosen' if not c else 'rejected'!r} "
                                f"tokenizes to no tokens")
        pairs.append({"chosen_ids": c, "rejected_ids": r, "margin": rec.get("margin")})
    return pairs, dropped


def count_identical(pairs):
    """How many tokenized pairs have chosen == rejected (they cannot be ranked)."""
    return sum(p["chosen_ids"] == p["rejected_ids"] for p in pairs)


def collate(pairs, pad_token_id):
    """TRL's layout: rows ``0..B-1`` are the chosen sequences, rows ``B..2B-1`` the rejected
    ones, right-padded with ``pad_token_id``. Returns ``input_ids`` / ``attention_mask``
    ``[2B, T]`` and ``margin`` ``[B]`` (float32) or None."""
    seqs = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    margin = None
    if pairs and pairs[0]["margin"] is not None:
        margin = torch.tensor([p["margin"] for p in pairs], dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": mask, "margin": margin}


def batches(pairs, batch_size, *, seed, epoch, rank=0, world_size=1, shuffle=True, drop_last=True):
    """This rank's batches of one epoch: the pairs are shuffled with ``(seed, epoch)`` (the
    same order on every rank) and the global batch of ``batch_size * world_size`` pairs is
    split between the ranks. ``drop_last=False`` keeps a last short batch (evaluation)."""
    order = list(range(len(pairs)))
    if shuffle:
        random.Random(seed * 100003 + epoch).shuffle(order)
    glob = batch_size * world_size
    n = len(order) // glob * glob if drop_last else len(order)
    for start in range(0, n, glob):
        chunk = order[start:start + glob][rank::world_size]
        if chunk:
            yield [pairs[i] for i in chunk]
