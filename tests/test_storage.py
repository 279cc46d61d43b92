"""The search's shared storage: one-line errors for what users get wrong, SQLite, and a real PostgreSQL server
shared by two worker processes (started here in a temporary folder when PostgreSQL's binaries are installed)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from spectune.compare import load_compare_config
from spectune.compare.search import StorageError, rdb_url, run_search, storage
from tests.conftest import has_package


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cfg(assets: Path, out: Path, where: str | None, trials: int = 3) -> dict:  # type: ignore[type-arg]
    return {"name": "tiny-storage",
            "base": {"model": {"name": str(assets / "bert"), "max_length": 16},
                     "train": {"epochs": 1, "batch_size": 16, "lr": 3e-3}, "eval": {"batch_size": 64}},
            "tasks": {"toy": {"data": {"path": str(assets / "cls.csv")}}},
            "methods": {"full": {}}, "seeds": [0], "output_dir": str(out),
            "search": {"trials": trials, "seeds": [10], "sampler": "grid", "pruner": "none", "storage": where,
                       "space": {"train.lr": {"ratio": [0.1, 1.0], "log": True, "points": trials}}}}


def _error(assets: Path, tmp_path: Path, where: str) -> str:
    with pytest.raises(StorageError) as err:
        storage(load_compare_config(_cfg(assets, tmp_path / "out", where)))
    text = str(err.value)
    assert text.startswith("search.storage: ") and "\n" not in text and "Traceback" not in text
    return text


def test_storage_mistakes_give_one_line_each(assets, tmp_path):  # type: ignore[no-untyped-def]
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    text = _error(assets, tmp_path, f"sqlite:///{blocker}/search.db")
    assert f"cannot open the SQLite file {blocker}/search.db ({blocker} is a file, not a folder)" in text
    text = _error(assets, tmp_path, str(blocker / "optuna.journal"))
    assert "cannot write the journal file" in text and "is a file, not a folder" in text
    if not has_package("psycopg2"):  # a URL naming a driver that is not installed
        text = _error(assets, tmp_path, "postgresql+psycopg2://u@127.0.0.1:5432/db")
        assert "needs the database driver 'psycopg2'" in text and "pip install 'spectune[postgres]'" in text
    if has_package("psycopg"):  # a server that refuses: nothing listens on the port
        text = _error(assets, tmp_path, f"postgresql://spectune:secret@127.0.0.1:{_free_port()}/search")
        assert "cannot connect to postgresql+psycopg://spectune:***@127.0.0.1" in text and "refused" in text.lower()
        assert "secret" not in text and "start the server" in text


def test_a_plain_postgresql_url_uses_psycopg_3_when_it_is_the_driver_installed():
    url = "postgresql://u@h:5432/db"
    expected = "postgresql+psycopg://u@h:5432/db" if has_package("psycopg") and not has_package("psycopg2") else url
    assert rdb_url(url) == expected
    assert rdb_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"  # a named driver is kept
    assert rdb_url("sqlite:///x.db") == "sqlite:///x.db"


def test_the_cli_prints_the_storage_error_as_one_line(assets, tmp_path):  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from spectune.cli import app

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(_cfg(assets, tmp_path / "out", f"sqlite:///{blocker}/x.db")))
    result = CliRunner().invoke(app, ["compare", str(path)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())  # one message; the terminal may wrap it
    assert text.startswith("error: search.storage: cannot open the SQLite file") and "Traceback" not in text, text
    assert text.endswith("(a journal file in the output folder)") and f"{blocker} is a file, not a folder" in text


@pytest.mark.slow
def test_a_search_on_sqlite_resumes_from_the_database(assets, tmp_path):  # type: ignore[no-untyped-def]
    cfg = load_compare_config(_cfg(assets, tmp_path / "out", f"sqlite:///{tmp_path}/db/search.db", trials=2))
    first = run_search(cfg)
    assert (tmp_path / "db" / "search.db").exists() and not (tmp_path / "out" / "search" / "optuna.journal").exists()
    assert sorted(first.trials["state"]) == ["COMPLETE", "COMPLETE"]
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("summary.json")}
    again = run_search(cfg)  # a re-run reads the spent study back and trains nothing
    assert again.chosen == first.chosen and {p: p.stat().st_mtime_ns for p in stamps} == stamps


# --- a real PostgreSQL ---------------------------------------------------------------------------------------


def _pg_bindir() -> Path | None:
    """initdb's folder: on the PATH, or Debian's /usr/lib/postgresql/<version>/bin (off the PATH)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    return debian[-1].parent if debian else None


@pytest.fixture(scope="module")
def postgres():  # type: ignore[no-untyped-def]
    """A throwaway PostgreSQL server in a temporary folder (trust auth on 127.0.0.1); its URL."""
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb on the PATH or in /usr/lib/postgresql/*/bin; "
                    "`make postgres` installs Debian's package as root)")
    if not has_package("psycopg"):
        pytest.skip("psycopg is not installed: pip install 'spectune[postgres]'")
    root = Path(tempfile.mkdtemp(prefix="spectune-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: run the server as Debian's postgres user
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip("running as root and there is no postgres user to run the server as")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", "--"]
    data, port = root / "data", _free_port()
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                    "--locale=C", "--no-sync"], check=True, capture_output=True)
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-o",
                    f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"], check=True,
                   capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _worker(path: Path) -> subprocess.Popen:  # type: ignore[type-arg]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "spectune.cli", "compare", str(path), "--search-only"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


@pytest.mark.slow
def test_two_workers_share_a_postgresql_study_and_a_killed_one_is_retried(assets, tmp_path, postgres):  # type: ignore[no-untyped-def]
    import optuna

    from spectune.compare.search import study_name

    data = _cfg(assets, tmp_path / "out", postgres, trials=4)
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_compare_config(data)
    a, b = _worker(path), _worker(path)
    store = storage(cfg)
    deadline = time.time() + 400
    victim = None
    while victim is None and time.time() < deadline and a.poll() is None:  # a finished one trial and holds another
        try:
            trials = optuna.load_study(study_name=study_name(cfg, "toy", "full"), storage=store).get_trials(deepcopy=False)
        except KeyError:  # the study is not created yet
            trials = []
        mine = [t for t in trials if str(t.user_attrs.get("worker", "")).endswith(f":{a.pid}")]
        if any(t.state.name == "COMPLETE" for t in mine) and any(t.state.name == "RUNNING" for t in mine):
            victim = next(t.number for t in mine if t.state.name == "RUNNING")
        time.sleep(0.2)
    assert victim is not None, "worker a never held a second trial"
    a.send_signal(signal.SIGKILL)
    a.wait()
    log_b = b.communicate(timeout=400)[0]
    assert b.returncode == 0, log_b
    found = run_search(cfg)  # the record; trains whatever a dead worker left if b had already gone
    t = found.trials
    done = t[t["state"] == "COMPLETE"]
    assert len(done) == 4 and done["param:train.lr"].nunique() == 4  # exactly the budget, each grid point once
    stale = t[t["state"] == "FAIL"]
    assert list(stale["number"]) == [victim] and stale["reason"].iloc[0].startswith("stale")
    assert stale["param:train.lr"].iloc[0] in set(done["param:train.lr"])  # queued again and trained
    workers = set(done["worker"].str.rsplit(":", n=1).str[1].astype(int))
    assert a.pid in workers and b.pid in workers  # both workers trained trials of the one study
    assert not (tmp_path / "out" / "search" / "optuna.journal").exists()
