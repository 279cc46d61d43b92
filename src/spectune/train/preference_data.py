"""Preference pairs for ``method.objective`` dpo, orpo, cpo and simpo: fixed splits of (prompt, chosen, rejected).

The rules follow the supervised data layer (``spectune.train.data``), so a
preference run and a supervised run on the same source see comparable rows:

- a user file (csv, tsv, jsonl, json, parquet, or a ``save_to_disk`` folder) needs a
  prompt, a chosen and a rejected column (``data.prompt_column`` etc. rename them);
  with ``data.format: chat`` a cell may also be a list of {role, content} turns (a
  multi-turn prompt), and a plain string becomes one user (prompt) or assistant
  (reply) turn;
- rows with an empty field, or whose chosen and rejected replies are the same, are
  dropped and counted; identical pairs are kept once;
- test and validation are carved by *prompt*, never by row: every pair of one prompt
  lies in one split, so a model is never tested on a prompt it was trained to answer.
  Test uses the constant ``TEST_SEED`` (it never moves with ``seed``), validation ``seed``;
- the built-in ``movie-dialog`` becomes a preference set: each statement's true reply is
  chosen, and the reply of another statement of the same split, at least
  ``NEGATIVE_GAP`` turns away, is rejected (``draw_rejected``). Its splits are the
  supervised ``movie-dialog`` splits, so no reply crosses from one split into another.

The splits hold strings (a conversation as canonical JSON), so cleaning, de-duplication
and carving compare texts; ``trl_rows`` turns them into the rows TRL's trainers read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd

from spectune.train.data import (
    TEST_FRACTION,
    TEST_SEED,
    DataConfig,
    DataError,
    TextSplits,
    _blank,
    as_turns,
    cap_splits,
    _name_splits,
    _pick,
    _read_table,
    load_data,
)

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
NEGATIVE_GAP = 10  # movie-dialog: a rejected reply comes from a statement at least this many turns away
MAX_DRAWS = 20  # redraws before a reply equal to the chosen one is replaced by a scan

SPLITS = ("train", "validation", "test")


# --------------------------------------------------------------------------- the built-in set


def draw_rejected(replies: list[str], seed: int, gap: int = NEGATIVE_GAP) -> list[str]:
    """For each row, the reply of another row at least ``gap`` rows away (circularly), and never the same text.

    Rows are in file order, so a row ``gap`` positions away in a split is at least
    ``gap`` turns away in the film scripts: not the same exchange, usually another
    scene or film. The draw is ``numpy.random.default_rng(seed)``, so a seed fixes
    every pair. Small splits shrink the gap (to a third of the rows) rather than fail.
    """
    n = len(replies)
    if n < 2:
        raise DataError(f"a preference split needs at least two rows to pair a reply with another's; it has {n}")
    gap = max(1, min(gap, n // 3))
    key = [r.strip().lower() for r in replies]
    rng = np.random.default_rng(seed)
    span = n - 2 * gap + 1  # offsets gap .. n - gap keep the circular distance >= gap
    out: list[str] = []
    for i in range(n):
        for _ in range(MAX_DRAWS):
            j = (i + gap + int(rng.integers(0, span))) % n
            if key[j] != key[i]:
                break
        else:
            j = next(((i + gap + k) % n for k in range(span) if key[(i + gap + k) % n] != key[i]), -1)
            if j < 0:
                raise DataError(f"row {i}: every other reply in its split equals {replies[i]!r}; no rejected reply can differ")
        out.append(replies[j])
    return out


def _builtin_pairs(cfg: DataConfig) -> TextSplits:
    """A built-in statement -> reply set as pairs: the true reply chosen, another statement's reply rejected."""
    base = load_data(cfg)
    if base.task != "causal_lm" or "response" not in base.train.column_names:
        raise DataError(f"{cfg.name}: a preference objective needs prompt/reply pairs; this built-in dataset has none "
                        f"({base.task}{'' if base.task == 'classification' else ', plain text'}). Use movie-dialog, or "
                        "a file with prompt, chosen and rejected columns")
    seeds = {"train": cfg.seed, "validation": cfg.seed, "test": TEST_SEED}  # the test pairs never move with seed
    parts: dict[str, datasets.Dataset] = {}
    for split in SPLITS:
        ds = getattr(base, split)
        replies = list(ds["response"])
        frame = pd.DataFrame({"prompt": list(ds["text"]), "chosen": replies, "rejected": draw_rejected(replies, seeds[split])})
        parts[split] = _to_dataset(_chat_cells(frame, cfg.format == "chat", cfg.name or ""))
    about = (f"preference pairs from {cfg.name}: the statement's own reply chosen, the reply of a statement at least "
             f"{NEGATIVE_GAP} turns away in the same split rejected (seed {cfg.seed}; test pairs seed {TEST_SEED})")
    return TextSplits(task="causal_lm", train=parts["train"], validation=parts["validation"], test=parts["test"],
                      label_names=None, source=base.source, description=f"{about}; {base.description}")


# --------------------------------------------------------------------------- user files


def _turns(value: Any, where: str) -> list[dict[str, str]] | None:
    """A cell as a list of {role, content} turns, or None when it is text.

    A string is a conversation only when it is JSON of a list of turns (a csv cannot
    hold lists); any other string, "[laughs]" included, is text.
    """
    if isinstance(value, str):
        if not value.lstrip().startswith("["):
            return None
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return None
        looks_like_turns = isinstance(parsed, list) and parsed and all(isinstance(t, dict) and "role" in t for t in parsed)
        if not looks_like_turns:
            return None
        value = parsed
    if isinstance(value, dict):
        value = [value]
    return as_turns(value, where)


def _chat_cells(df: pd.DataFrame, chat: bool, where: str) -> pd.DataFrame:
    """Every cell as text: plain strings as they are, conversations as canonical JSON (``data.format: chat`` only).

    Under chat, a plain prompt becomes one user turn and a plain reply one assistant
    turn, so the template renders every row the same way the supervised chat path does.
    """
    out = {}
    for column in PAIR_COLUMNS:
        cells: list[str | None] = []
        for i, value in enumerate(df[column].tolist()):
            if value is None or (isinstance(value, float) and np.isnan(value)):
                cells.append(None)
                continue
            turns = _turns(value, f"{where}: column {column!r}, row {i}")
            if not chat:
                if turns is not None:
                    raise DataError(f"{where}: column {column!r}, row {i} holds a conversation (a list of turns); set "
                                    "data.format: chat to render it with the chat template")
                cells.append(str(value))
                continue
            if turns is None:
                turns = [{"role": "user" if column == "prompt" else "assistant", "content": str(value)}]
            if column != "prompt" and not any(t["role"] == "assistant" for t in turns):
                raise DataError(f"{where}: column {column!r}, row {i}: a reply needs an 'assistant' turn")
            cells.append(json.dumps(turns, ensure_ascii=False))
        out[column] = pd.Series(cells, index=df.index, dtype=object)
    return pd.DataFrame(out)


def _clean(df: pd.DataFrame, what: str, notes: list[str]) -> pd.DataFrame:
    """Drop rows with an empty field, and rows whose chosen and rejected replies are identical (no preference)."""
    bad = _blank(df["prompt"]) | _blank(df["chosen"]) | _blank(df["rejected"])
    if bad.any():
        notes.append(f"{what}: dropped {int(bad.sum())} rows with an empty prompt, chosen or rejected")
    df = df[~bad]
    same = df["chosen"] == df["rejected"]
    if same.any():
        notes.append(f"{what}: dropped {int(same.sum())} rows whose chosen and rejected replies are identical")
    return df[~same].reset_index(drop=True)


def _carve_by_prompt(df: pd.DataFrame, fraction: float, seed: int, what: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split off ``fraction`` of the distinct prompts (at least one, never all) with every pair of each."""
    prompts = df["prompt"].drop_duplicates().to_numpy()
    if len(prompts) < 2:
        raise DataError(f"{what}: {len(prompts)} distinct prompt(s) left, too few to carve a split from")
    count = min(max(1, round(fraction * len(prompts))), len(prompts) - 1)
    taken = df["prompt"].isin(set(prompts[_pick(np.zeros(len(prompts)), count, seed)]))
    return df[~taken].reset_index(drop=True), df[taken].reset_index(drop=True)


def _read_frames(cfg: DataConfig, path: Path) -> dict[str, pd.DataFrame | None]:
    if path.is_dir():
        if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            raise DataError(f"{path}: a folder must be saved with datasets' save_to_disk (no dataset_info.json or "
                            "dataset_dict.json)")
        loaded = datasets.load_from_disk(str(path))
        parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        return _name_splits({split: ds.to_pandas() for split, ds in parts.items()}, path)  # type: ignore[misc]
    return _name_splits({"train": _read_table(path)}, path)


def _user_pairs(cfg: DataConfig) -> TextSplits:
    path = Path(cfg.path).expanduser()  # type: ignore[arg-type]
    if not path.exists():
        raise DataError(f"data file not found: {path} (resolved to {path.resolve()})")
    where = str(path)
    rename = {cfg.prompt_column: "prompt", cfg.chosen_column: "chosen", cfg.rejected_column: "rejected"}
    frames: dict[str, pd.DataFrame] = {}
    for split, df in _read_frames(cfg, path).items():
        if df is None:
            continue
        for column, role in rename.items():
            if column not in df.columns:
                raise DataError(f"{where}: preference data needs a {role} column; {column!r} not found in split "
                                f"{split!r} (columns: {list(df.columns)}; data.{role}_column names another)")
        frames[split] = _chat_cells(df[list(rename)].rename(columns=rename), cfg.format == "chat", f"{where} [{split}]")
    notes: list[str] = []
    frames = {split: _clean(df, split, notes) for split, df in frames.items()}
    for split, df in frames.items():
        if df.empty:
            raise DataError(f"{where}: split {split!r} has no pair left after dropping empty or identical replies")
    train = frames["train"]
    dup = train.duplicated(subset=list(PAIR_COLUMNS))
    if dup.any():
        notes.append(f"train: dropped {int(dup.sum())} duplicate pairs")
        train = train[~dup].reset_index(drop=True)
    test, validation = frames.get("test"), frames.get("validation")
    if test is None:
        train, test = _carve_by_prompt(train, TEST_FRACTION, TEST_SEED, where)
        notes.append(f"test: {100 * TEST_FRACTION:.3g}% of the prompts carved, with all their pairs (fixed seed {TEST_SEED})")
    else:
        shared = int(test["prompt"].isin(set(train["prompt"])).sum())
        notes.append("test: the source's own test split" + (f" ({shared} of its prompts also occur in train)" if shared else ""))
    if validation is None:
        train, validation = _carve_by_prompt(train, cfg.validation_fraction, cfg.seed, where)
        notes.append(f"validation: {100 * cfg.validation_fraction:.3g}% of the prompts carved from train (seed {cfg.seed})")
    else:
        notes.append("validation: the source's own validation split")
    train, validation, test, sizes = cap_splits(train, validation, test, cfg, notes, unit="pairs")
    description = "; ".join([f"user preference pairs from {path.name}", sizes, *notes])
    return TextSplits(task="causal_lm", train=_to_dataset(train), validation=_to_dataset(validation),
                      test=_to_dataset(test), label_names=None, source=where, description=description)


def _to_dataset(df: pd.DataFrame) -> datasets.Dataset:
    features = datasets.Features({c: datasets.Value("string") for c in PAIR_COLUMNS})
    return datasets.Dataset.from_pandas(df[list(PAIR_COLUMNS)].astype(str), features=features, preserve_index=False)


# --------------------------------------------------------------------------- entry points


def load_preference_data(cfg: DataConfig) -> TextSplits:
    """Fixed preference splits (columns prompt, chosen, rejected) for the configured source; DataError before training."""
    return _builtin_pairs(cfg) if cfg.name else _user_pairs(cfg)


def prompt_tokens(tok: Any, prompt: str, chat: bool) -> int:
    """How many tokens the prompt takes as the model sees it (rendered with the generation prompt under chat)."""
    if chat:
        text = tok.apply_chat_template(json.loads(prompt), tokenize=False, add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"])
    return len(tok(prompt)["input_ids"])


def drop_long_prompts(data: dict[str, datasets.Dataset], tok: Any, max_length: int, needed: list[str],
                      chat: bool) -> dict[str, int]:
    """Drop pairs whose prompt leaves no room for a reply within ``max_length``, in place; return the counts.

    TRL truncates a sequence from its end, so such a pair would keep no reply token
    (DPO drops it silently; ORPO would score an empty reply). Dropping it here counts it
    in summary.json, and a split of ``needed`` left empty stops the run, naming the split.
    """
    skipped: dict[str, int] = {}
    for split, ds in data.items():
        keep = [prompt_tokens(tok, p, chat) < max_length - 1 for p in ds["prompt"]]  # room for a BOS and one reply token
        skipped[split] = len(keep) - sum(keep)
        if skipped[split]:
            data[split] = ds.select([i for i, k in enumerate(keep) if k])
        if split in needed and len(data[split]) == 0:
            raise DataError(f"split {split!r}: every one of its {len(keep)} prompts fills model.max_length "
                            f"({max_length} tokens), leaving no room for a reply; raise model.max_length")
    return skipped


def trl_rows(ds: datasets.Dataset, chat: bool) -> datasets.Dataset:
    """The rows TRL's trainers read: strings as they are, or (chat) lists of turns, which TRL renders with the template."""
    if not chat:
        return ds
    return datasets.Dataset.from_list([{c: json.loads(row[c]) for c in PAIR_COLUMNS} for row in ds])
