"""The built-in RL task, "sort these digits", and its checker.

The prompts are those of the preference data of ``rmkernels-train reward``
(:func:`rmkernels_train.data.default_datasets`): ``"sort 4180: "``; the right response is the
digits sorted, ``"0148"``, followed by the end-of-sequence token. RL samples its prompts from
the reward model's *training* prompts; the task success is measured on the reward model's
*held-out* prompts, which neither the reward model, the warm start nor RL ever sees.

The checker is exact and cannot be fooled: a response is correct when it ended (it has an
EOS) and its text is exactly the sorted digits of its prompt. It measures what the reward
model only estimates, so a rising reward-model score with a flat or falling task success is
reward hacking, visible in the metrics.
"""
import re

import torch

_PROMPT_RE = re.compile(r"^sort (\d+): $")


def prompt_digits(prompt):
    """The digit string of a built-in prompt (``"sort 4180: "`` -> ``"4180"``)."""
    m = _PROMPT_RE.match(prompt)
    if m is None:
        raise ValueError(f"prompt {prompt!r} is not a built-in 'sort <digits>: ' prompt")
    return m.group(1)


def answer(prompt):
    """The correct response text of a built-in prompt: its digits, sorted."""
    return "".join(sorted(prompt_digits(prompt)))


def is_correct(prompt, response, ended=True):
    """True when ``response`` (text without the EOS) is exactly the sorted digits of ``prompt``
    and the response ended with an EOS (``ended``)."""
    return bool(ended) and response == answer(prompt)


def task_prompts(seed=1234):
    """``(train_prompts, heldout_prompts)`` of the built-in task: the prompts of the reward
    model's training and held-out preference pairs (disjoint; the same on every machine)."""
    from rmkernels_train.data import default_datasets

    train, held = default_datasets(seed=seed)
    return [r["prompt"] for r in train], [r["prompt"] for r in held]


class ResponseDecoder:
    """Turns the response part of rollouts (token ids ``[B, R]``, padded after the first EOS)
    into ``(texts, ended)``: the response text up to the first EOS and whether there is one."""

    def __init__(self, tokenizer):
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        special = set(tokenizer.all_special_ids)
        self.pieces = ["" if i in special else t for i, t in enumerate(vocab)]
        self.eos = tokenizer.eos_token_id

    def __call__(self, response_ids):
        texts, ended = [], []
        for row in response_ids.tolist():
            if self.eos in row:
                row = row[:row.index(self.eos)]
                ended.append(True)
            else:
                ended.append(False)
            texts.append("".join(self.pieces[t] for t in row))
        return texts, ended


def checker_scores(prompts, response_ids, decoder):
    """1.0 for each correct response, 0.0 otherwise (float32 ``[B]``, on the responses' device)."""
    texts, ended = decoder(response_ids)
    return torch.tensor([float(is_correct(p, t, e)) for p, t, e in zip(prompts, texts, ended)],
                        device=response_ids.device)
