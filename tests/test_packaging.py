"""Packaging: ranges in pyproject.toml, exact pins with hashes in requirements.lock, and the environment the tests run
in is the lock's (every package it holds, transitive ones included)."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

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
