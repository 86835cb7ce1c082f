"""Packaging: ranges in pyproject.toml, exact pins with hashes in requirements.lock, the environment the tests run in
is the lock's (every package it holds, transitive ones included), and the wheel: only the project's own packages,
ranges in its metadata, `sparc kafka` outside a checkout."""

from __future__ import annotations

import email
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def locked() -> dict[str, tuple[str, list[str]]]:
    """requirements.lock as {canonical name: (version, [sha256 hashes])}."""
    entries: dict[str, tuple[str, list[str]]] = {}
    text = (ROOT / "requirements.lock").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})+)", line)
        assert m, f"not an exact pin with hashes: {line[:80]}"
        entries[canonicalize_name(m.group(1))] = (m.group(2), re.findall(r"sha256:([0-9a-f]{64})", m.group(3)))
    return entries


def lock_requirers() -> dict[str, set[str]]:
    """requirements.lock's `# via` notes: {package: the packages that require it, "." for pyproject.toml}."""
    text = (ROOT / "requirements.lock").read_text()
    via: dict[str, set[str]] = {}
    for block in re.split(r"\n(?=[a-z])", text[re.search(r"^[a-z]", text, re.M).start():]):
        notes = " ".join(line.strip()[1:] for line in block.splitlines() if line.strip().startswith("#"))
        notes = re.sub(r"\([^)]*\)", "", notes).replace("via", " ", 1)
        via[canonicalize_name(block.split("==", 1)[0])] = {"." if n == "sparc-stream" else n for n in notes.split()}
    return via


def project_requirements() -> list[Requirement]:
    """Every requirement pyproject.toml states: the build backend, the base install and every extra."""
    project = PYPROJECT["project"]
    texts = [*PYPROJECT["build-system"]["requires"], *project["dependencies"]]
    texts += [t for extra in project["optional-dependencies"].values() for t in extra]
    return [Requirement(t) for t in texts]


def test_pyproject_states_ranges_never_exact_pins():
    for req in project_requirements():
        if canonicalize_name(req.name) == "sparc-stream":
            continue  # an extra naming another extra
        assert req.specifier, f"{req.name} has no version range"
        assert not any(s.operator in ("==", "===") for s in req.specifier), f"{req} pins exactly: the lock does"


def test_the_lock_pins_every_stated_requirement_within_its_range_with_hashes():
    lock = locked()
    for req in project_requirements():
        name = canonicalize_name(req.name)
        if name == "sparc-stream":
            continue
        missing = name not in lock
        assert not missing, f"{req.name} is not in requirements.lock (make lock)"
        version = lock[name][0]
        assert req.specifier.contains(version, prereleases=True), f"the lock's {name} {version} is not {req}"
    assert all(hashes for _, hashes in lock.values())
    # the versions known to work together (developers' guide)
    versions = {name: version for name, (version, _) in lock.items()}
    assert [versions[n] for n in ("faust-streaming", "aiokafka", "mode-streaming")] == ["0.15.3", "0.14.0", "0.7.1"]
    assert versions["kafka-python"].startswith("3.0.") and versions["rocksdict"].startswith("0.3.")
    assert versions["faiss-cpu"].startswith("1.")


def test_this_environment_is_the_lock_and_the_lock_is_closed_under_dependencies():
    """Walks the requirements of sparc-stream[full,test] through the installed distributions: each one is in the
    lock at the installed version, and each installed distribution's own requirements are too."""
    lock = locked()
    seen: set[str] = set()
    todo = [(r, frozenset({"full", "test", "subscriber"})) for r in project_requirements()]
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras or {""}):
            continue
        if name == "sparc-stream":
            continue
        missing = name not in lock
        assert not missing, f"{req} (needed here) is missing from requirements.lock"
        assert metadata.version(req.name) == lock[name][0], f"installed {name} is not the lock's {lock[name][0]}"
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        todo += [(Requirement(t), frozenset(req.extras)) for t in metadata.requires(req.name) or []]
    unreached = set(lock) - {key.split("[")[0] for key in seen}
    assert not unreached, f"the lock holds packages nothing here needs: {sorted(unreached)}"


# ------------------------------------------------------------------------------------------------ the wheel

PACKAGES = {"sparc_stream", "trainer", "streams", "codebook_store", "replay"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip wheel` builds from a copy of this checkout (a copy, so no earlier build/ leaks into it)."""
    src, out = tmp_path_factory.mktemp("src") / "sparc-stream", tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "runs",
                                                             "state", ".pytest_cache", ".ruff_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(out), str(src)], check=True, capture_output=True, timeout=300)
    return next(out.glob("sparc_stream-*.whl"))


def test_the_wheel_installs_only_the_projects_packages_and_states_ranges(wheel):
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(whl.read(f"{info}/METADATA"))
        entry_points = whl.read(f"{info}/entry_points.txt").decode()
    assert {n.split("/")[0] for n in names} - {info} == PACKAGES  # no cli, benchmarks, tests or deploy
    assert "sparc_stream/cli/main.py" in names
    assert "sparc = sparc_stream.cli.main:main" in entry_points
    requires = {canonicalize_name(Requirement(r).name): Requirement(r) for r in meta.get_all("Requires-Dist")}
    for name in ("faust-streaming", "aiokafka", "mode-streaming", "kafka-python", "torch"):
        assert requires[name].specifier and "==" not in str(requires[name].specifier), requires[name]
    assert set(meta.get_all("Provides-Extra")) == {"subscriber", "full", "test"}


def test_sparc_kafka_from_an_installed_wheel_says_in_one_line_that_it_needs_a_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=120)
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import sparc_stream.cli.kafka as k; print(k.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(target))  # the installed copy, not this checkout
    run = subprocess.run([str(target / "bin" / "sparc"), "kafka", "status"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "sparc kafka: error: needs a source checkout" in run.stderr, run.stderr


def test_nothing_imports_or_runs_the_old_top_level_cli_package():
    """The command-line code lives in sparc_stream/cli; a branch written before the move must not bring `cli` back
    (a module left in cli/, an import of it, or `python -m cli.main`)."""
    assert not list((ROOT / "cli").rglob("*.py"))  # a cli/__pycache__ a merge leaves behind is harmless
    old = re.compile(r"^\s*(from\s+cli[\s.]|import\s+cli\b)|[\"']cli\.|-m cli\.", re.M)  # "cli.x": a module name
    skip = {".git", "build", "runs", "state", "__pycache__", ".pytest_cache", ".ruff_cache"}
    files = [p for p in ROOT.rglob("*") if p.suffix in (".py", ".md", ".sh", ".yaml", ".toml", ".tpl")
             or p.name in ("Makefile", "Dockerfile", "run")]
    offenders = [str(p.relative_to(ROOT)) for p in files if p.is_file() and p != Path(__file__).resolve()
                 and not skip & set(p.relative_to(ROOT).parts) and old.search(p.read_text(errors="replace"))]
    assert not offenders, f"still naming the old cli package: {offenders}"


def test_the_one_line_missing_install_message_knows_every_extras_modules():
    """A command that needs more than is installed names the extra to install (sparc_stream/cli/errors.py): each
    distribution an extra adds is known there by a module of its own, and every module named there belongs to a
    distribution of that extra, so the map follows pyproject.toml."""
    from sparc_stream.cli.errors import _EXTRAS, extra_providing

    modules_of: dict[str, set[str]] = {}
    for module, dists in metadata.packages_distributions().items():
        for dist in dists:
            modules_of.setdefault(canonicalize_name(dist), set()).add(module)
    assert set(_EXTRAS) == {"subscriber", "full"}
    for extra, named in _EXTRAS.items():
        dists = {canonicalize_name(Requirement(t).name) for t in PYPROJECT["project"]["optional-dependencies"][extra]}
        for name in dists - {"sparc-stream"}:
            assert any(extra_providing(m) == extra for m in modules_of[name]), f"{extra}: {name} is not named"
        provided = set().union(*(modules_of[name] for name in dists - {"sparc-stream"}))
        assert set(named) <= provided, f"{extra}: {set(named) - provided} come from no distribution of that extra"
