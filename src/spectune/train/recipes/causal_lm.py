"""The causal-LM / SFT recipe: text cut into blocks, or prompts with supervised responses, scored per token."""

from __future__ import annotations

from typing import Any

from spectune.train.config import TrainConfig
from spectune.train.data import DataError, TextSplits
from spectune.train.evaluate import IGNORE_INDEX
from spectune.train.recipes._common import TrainerParts, map_splits, needed_splits


def lm_blocks(ids: list[int], max_length: int, bos: int | None, min_tokens: int = 8) -> list[list[int]]:
    """A row's token ids cut into blocks of at most ``max_length`` (shorter than ``min_tokens`` dropped).

    Where the tokenizer starts a text with BOS (Gemma), every block starts with it, as the
    model saw text in pre-training: a Gemma block without ``<bos>`` scores perplexity
    1,548 against 124 with it (docs/benchmarks.md). Tokenizers that add none (SmolLM2)
    get plain consecutive slices.
    """
    if bos is not None and ids and ids[0] == bos and max_length > 1:
        body, width = ids[1:], max_length - 1
        blocks = [[bos] + body[i : i + width] for i in range(0, len(body), width)]
    else:
        blocks = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    return [b for b in blocks if len(b) >= min_tokens]


def _rows(ids: list[list[int]], labels: list[list[int]]) -> dict[str, Any]:
    return {"input_ids": ids, "attention_mask": [[1] * len(s) for s in ids], "labels": labels}


def tokenize(splits: TextSplits, tok: Any, max_length: int, fmt: str = "plain") -> dict[str, Any]:
    """Token ids per split; responses, where the data has them, are the only supervised tokens.

    ``fmt="chat"`` renders each row (a conversation, or an instruction/response pair as
    one user and one assistant turn) with the tokenizer's chat template, and supervises
    the assistant's tokens alone (``spectune.train.chat``).
    """
    def chat_rows(batch: dict[str, list]) -> dict[str, Any]:
        from spectune.train.chat import conversation, tokenize_chat

        responses = batch.get("response") or [None] * len(batch["text"])
        pairs = [tokenize_chat(tok, conversation(text, resp), max_length) for text, resp in zip(batch["text"], responses)]
        return _rows([i for i, _ in pairs], [lab for _, lab in pairs])

    def response_rows(batch: dict[str, list]) -> dict[str, Any]:
        ids, labels = [], []
        for prompt, resp in zip(batch["text"], batch["response"]):
            p = tok(prompt, add_special_tokens=True)["input_ids"]
            r = tok(str(resp) + (tok.eos_token or ""), add_special_tokens=False)["input_ids"]
            ids.append((p + r)[:max_length])
            labels.append(([-100] * len(p) + r)[:max_length])
        return _rows(ids, labels)

    def text_rows(batch: dict[str, list]) -> dict[str, Any]:
        if "response" in batch and batch["response"] is not None:
            return response_rows(batch)
        # plain text: every row is cut into max_length-token blocks, so long passages
        # (a 2,000-character Shakespeare chunk) are learned whole instead of truncated
        blocks: list[list[int]] = []
        for ids in tok(batch["text"], add_special_tokens=True)["input_ids"]:
            blocks += lm_blocks(ids, max_length, tok.bos_token_id)
        return _rows(blocks, [list(b) for b in blocks])

    return map_splits(splits, chat_rows if fmt == "chat" else text_rows)


def drop_untargeted(data: dict[str, Any], needed: list[str]) -> dict[str, int]:
    """Drop causal-LM rows with no predicted token, in place; return how many each split lost.

    A prompt that fills ``max_length`` leaves its response truncated away; such a row
    has nothing to score. Kept, it would add nothing to an evaluation and could make a
    training batch's loss 0/0 (NaN). It is dropped and counted instead, and a split of
    ``needed`` left with no row at all stops the run before training, naming the split.
    """
    skipped: dict[str, int] = {}
    for split, ds in data.items():
        keep = [any(y != IGNORE_INDEX for y in lab[1:]) for lab in ds["labels"]]  # the first token is never predicted
        skipped[split] = len(keep) - sum(keep)
        if skipped[split]:
            data[split] = ds.select([i for i, k in enumerate(keep) if k])
        if split in needed and len(data[split]) == 0:
            raise DataError(
                f"split {split!r}: none of its {len(keep)} rows has a token left to predict after truncation to "
                "model.max_length (prompts fill it, so every response is cut away); raise model.max_length or "
                "shorten the prompts")
    return skipped


def inputs(splits: TextSplits, tok: Any, cfg: TrainConfig) -> tuple[dict[str, Any], dict[str, int]]:
    """The tokenized splits, less the rows left with no token to predict (counted per split)."""
    data = tokenize(splits, tok, cfg.model.max_length, cfg.data.format)
    return data, drop_untargeted(data, needed_splits(cfg))


def collator(tok: Any) -> Any:
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)


def trainer(parts: TrainerParts) -> Any:
    from spectune.train.trainer import SpectralTrainer

    cfg = parts.cfg
    return SpectralTrainer(**parts.common(), data_collator=collator(parts.tok), lm_eval=True,
                           chunk_bytes=cfg.eval.chunk_mb * 2**20, fused=cfg.eval.fused_cross_entropy)
