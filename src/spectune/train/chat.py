"""Chat-formatted causal-LM data: conversations rendered with the tokenizer's chat template, loss on the assistant only.

Why not ``apply_chat_template(..., return_assistant_tokens_mask=True)``: transformers
can only mark assistant tokens when the template wraps them in ``{% generation %}``
tags, and most shipped templates (SmolLM2-135M-Instruct's among them) have none. The
assistant's span is found instead by rendering the conversation up to each assistant
turn twice, once ending with the generation prompt (what the model sees before it
answers) and once including the answer: the characters between the two are what the
model must produce (its content and the template's end-of-turn marker). The whole
conversation is then tokenized once and a token is supervised when it starts inside
such a span, so the labels follow the tokenizer's real segmentation of the full text.
"""

from __future__ import annotations

import json
from typing import Any

from spectune.train.data import DataError

IGNORE_INDEX = -100


class ChatTemplateMissing(ValueError):
    """``data.format: chat`` with a tokenizer that has no chat template and none in ``model.chat_template``."""


def ensure_template(tok: Any, template: str | None, model_name: str) -> None:
    """Give the tokenizer the configured template, or check it has its own; the error names the field to set."""
    if template is not None:
        tok.chat_template = template
    if not getattr(tok, "chat_template", None):
        raise ChatTemplateMissing(
            f"data.format chat: the tokenizer of model {model_name!r} has no chat template; give one as a Jinja "
            "string in model.chat_template")
    if not getattr(tok, "is_fast", False):
        raise ChatTemplateMissing(
            f"data.format chat: the tokenizer of model {model_name!r} is not a fast tokenizer, and assistant tokens "
            "are located through its character offsets")


def conversation(text: str, response: str | None) -> list[dict[str, str]]:
    """A row as a list of turns: an instruction/response pair becomes one user and one assistant turn."""
    if response is not None:
        return [{"role": "user", "content": text}, {"role": "assistant", "content": response}]
    return json.loads(text)


def _render(tok: Any, turns: list[dict[str, str]], prompt: bool) -> str:
    return tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)


def assistant_spans(tok: Any, turns: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the assistant writes (its answers and end-of-turn markers).

    Raises ``DataError`` when the template does not render a conversation as the
    concatenation of its prefixes (a template that rewrites earlier turns, such as one
    that drops past reasoning): the spans would then point at the wrong characters.
    """
    full = _render(tok, turns, prompt=False)
    spans: list[tuple[int, int]] = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before = _render(tok, turns[:i], prompt=True) if i else ""
        upto = _render(tok, turns[: i + 1], prompt=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise DataError(
                "data.format chat: the chat template does not render this conversation as a sequence of its turns "
                f"(turn {i} changes what comes before it), so assistant tokens cannot be located; conversation starts "
                f"{json.dumps(turns)[:200]}")
        if len(upto) > len(before):
            spans.append((len(before), len(upto)))
    return full, spans


def tokenize_chat(tok: Any, turns: list[dict[str, str]], max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation (cut to ``max_length``) and labels: the id on assistant tokens, -100 elsewhere."""
    text, spans = assistant_spans(tok, turns)
    # the template writes its own special tokens (BOS, turn markers): the tokenizer must not add more
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_length)
    ids: list[int] = enc["input_ids"]
    labels = [
        t if any(a <= start < b for a, b in spans) and end > start else IGNORE_INDEX
        for t, (start, end) in zip(ids, enc["offset_mapping"])
    ]
    return ids, labels
