"""The module graph Package.swift declares is the one the README draws, and it keeps its shape:
a dependency-free leaf, domain modules that neither use the RPC runtime nor link its C libraries."""
import json
import os
import re
import subprocess

from conftest import ROOT

RUNTIME_LIBRARIES = {"nghttp2", "event_core", "event_extra", "event_pthreads", "event_openssl", "ssl", "http_parser"}


def _targets():
    result = subprocess.run(["swift", "package", "dump-package"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    targets = {}
    for target in json.loads(result.stdout)["targets"]:
        deps = [next(iter(dep.values()))[0] for dep in target["dependencies"]]
        links = [s["kind"]["linkedLibrary"]["_0"] for s in target.get("settings", []) if "linkedLibrary" in s["kind"]]
        targets[target["name"]] = (target["type"], deps, links)
    return targets


def _closure(targets, name):
    seen, todo = set(), [name]
    while todo:
        for dep in targets.get(todo.pop(), (None, [], []))[1]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def graph_text(targets):
    """The README's block: each library target, what it depends on, what it links."""
    lines = []
    for name, (kind, deps, links) in targets.items():
        if kind != "regular":
            continue
        line = f"{name:<27} → {', '.join(deps) if deps else '(nothing)'}"
        if links:
            line += f"  [links {', '.join(links)}]"
        lines.append(line)
    return "\n".join(lines)


def test_the_leaf_and_the_domain_modules_stay_off_the_runtime():
    targets = _targets()
    assert targets["TalkMeshBase"][1] == [] and targets["TalkMeshBase"][2] == []
    for domain in ("TalkMeshCore", "TalkMeshLibAV"):
        closure = _closure(targets, domain)
        assert "TalkMeshRPC" not in closure, domain
        linked = {lib for name in closure | {domain} for lib in targets.get(name, (None, [], []))[2]}
        assert not linked & RUNTIME_LIBRARIES, (domain, linked & RUNTIME_LIBRARIES)
    # Nor does any file in them import the runtime behind the manifest's back (it could not build,
    # but a dependency added to "fix" that would).
    for folder in ("Shared/Base", "Shared/Core", "Shared/LibAV"):
        for directory, _, files in os.walk(os.path.join(ROOT, folder)):
            for file in files:
                text = open(os.path.join(directory, file)).read()
                assert not re.search(r"^import TalkMeshRPC$", text, re.M), file


def test_the_readme_draws_the_graph_package_swift_declares():
    readme = open(os.path.join(ROOT, "README.md")).read()
    match = re.search(r"<!-- module-graph -->\n```\n(.*?)\n```", readme, re.S)
    assert match, "README.md has no module-graph block"
    expected = graph_text(_targets())
    assert match.group(1) == expected, "README.md's module graph is stale; it should read:\n" + expected
