"""The Dockerfile's invariants, checked without a Docker engine.

No image is built here, so these check what the chart and operators rely on:
the base image matches the project's Python, the image installs this project's
runtime dependencies only, everything `pip install .` needs is copied (and not
dropped by .dockerignore), and it runs as the numeric non-root user the chart's
securityContext names.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.strip().startswith("#") or (not line.strip() and not pending):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, args = pending.strip().partition(" ")
        out.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def args_of(keyword: str) -> list[str]:
    return [args for kw, args in instructions() if kw == keyword]


def test_one_stage_on_the_projects_python() -> None:
    assert args_of("FROM") == ["python:3.11-slim"]
    minimum = re.fullmatch(r">=(\d+\.\d+)", PYPROJECT["project"]["requires-python"])
    assert minimum and minimum.group(1) == "3.11"


def test_runs_as_the_numeric_non_root_user_the_chart_expects() -> None:
    users = args_of("USER")
    assert users, "no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    # Numeric, so the kubelet can enforce runAsNonRoot without resolving a name.
    assert uid.isdigit() and int(uid) != 0 and (not gid or gid.isdigit() and int(gid) != 0)
    helpers = (ROOT / "charts/continuum/templates/_helpers.tpl").read_text()
    assert re.search(rf"^runAsUser: {uid}$", helpers, re.M)
    # USER comes after the last install step, so nothing at run time is root's.
    order = [kw for kw, _ in instructions()]
    assert max(i for i, kw in enumerate(order) if kw == "RUN") < \
        max(i for i, kw in enumerate(order) if kw == "USER")


def test_installs_this_project_without_test_extras() -> None:
    installs = [shlex.split(cmd) for run in args_of("RUN") for cmd in re.split(r"&&|;", run)
                if "pip" in cmd and " install" in cmd]
    assert len(installs) == 1, installs
    targets = [a for a in installs[0][installs[0].index("install") + 1:] if not a.startswith("-")]
    flags = [a for a in installs[0] if a.startswith("-")]
    assert targets == ["."], "installs something other than the project itself (or with extras)"
    assert not {"-e", "--editable", "-r", "--requirement"} & set(flags)
    # No test-only package sneaks in under its own name either.
    test_only = {re.split(r"[<>=\[ ]", req)[0].lower() for req in
                 PYPROJECT["project"]["optional-dependencies"]["test"]}
    dockerfile = (ROOT / "Dockerfile").read_text().lower()
    assert not [name for name in test_only
                if re.search(rf"(^|[\s\"']){re.escape(name)}([\s\"'<>=]|$)", dockerfile)]


def copied_paths() -> set[str]:
    paths: set[str] = set()
    for args in args_of("COPY"):
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        paths.update(p.rstrip("/") for p in parts[:-1])
    return paths


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, close enough here: a pattern matches the path or any parent of it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        pattern = pattern.lstrip("/")
        bare = pattern[3:] if pattern.startswith("**/") else None
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pattern) or (
                    bare and fnmatch.fnmatchcase(prefix.rsplit("/", 1)[-1], bare)):
                return True
    return False


def dockerignore() -> list[str]:
    return [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def test_copies_everything_pip_install_needs() -> None:
    copied = copied_paths()
    assert {"pyproject.toml", PYPROJECT["project"]["readme"]} <= copied
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied, f"packages pyproject.toml installs but the image lacks: {packages - copied}"
    for target in PYPROJECT["project"]["scripts"].values():
        assert target.split(".")[0] in copied, target
    # .dockerignore must not drop a tracked file the install uses (package data included).
    tracked = subprocess.run(["git", "ls-files", "--", *sorted(copied)], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    assert tracked
    patterns = dockerignore()
    assert not [path for path in tracked if ignored(path, patterns)]


def test_context_leaves_out_local_state() -> None:
    patterns = dockerignore()
    for path in [".git/config", ".venv/bin/python", "benchmarks/results/run.json",
                 "tests/test_dockerfile.py", ".pytest_cache/v", "oracle/__pycache__/db.pyc",
                 "oracle.key", "state/oracle.db"]:
        assert ignored(path, patterns), path


def test_default_command_and_ports() -> None:
    assert args_of("CMD") == ['["continuum"]']  # exec form: SIGTERM reaches the relay
    assert "continuum" in PYPROJECT["project"]["scripts"]
    exposed = {int(p.split("/")[0]) for args in args_of("EXPOSE") for p in args.split()}
    yaml = pytest.importorskip("yaml")
    values = yaml.safe_load((ROOT / "charts/continuum/values.yaml").read_text())
    assert exposed == {8470, 8480} == {values["relay"]["port"], values["oracle"]["port"]}
