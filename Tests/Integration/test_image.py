"""The container image (Dockerfile): its runtime stage installs every Debian package whose library a
built binary links directly, and nothing it lists as a library goes unused; it runs as a numeric
non-root user, stops on SIGTERM, checks health with `talkmesh health`, and builds the Swift
runtime in. No Docker engine runs here, so the binaries checked are the ones `make build` made, on
the same Debian 12 the image's stages use."""
import functools
import os
import re
import subprocess

import pytest

from conftest import BIN, ROOT

DOCKERFILE = os.path.join(ROOT, "Dockerfile")
IMAGES = ["media", "audio", "dispatcher", "gateway", "runpod-emulator"]
BINARIES = [f"talkmesh-{name}" for name in IMAGES] + ["talkmesh"]


def stages(text):
    """Stage name → its instructions (continuation lines joined)."""
    joined = re.sub(r"\\\n", " ", text)
    out, current = {}, None
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            current = match.group(2) or match.group(1)
            out[current] = [line]
        elif current:
            out[current].append(line)
    return out


def runtime_packages(text):
    runs = [line for line in stages(text)["runtime"] if line.startswith("RUN ") and "apt-get install" in line]
    assert len(runs) == 1, runs
    words = runs[0].split("apt-get install", 1)[1].split("&&")[0].split()
    return {w for w in words if not w.startswith("-")}


@functools.lru_cache(maxsize=None)
def direct_libraries(binary):
    """(soname, resolved path) of what the binary links directly (its DT_NEEDED, resolved by ldd)."""
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]",
                        subprocess.run(["readelf", "-d", binary], capture_output=True, text=True, check=True).stdout)
    ldd = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    assert "not found" not in ldd, ldd
    paths = dict(re.findall(r"^\s*(\S+) => (/\S+)", ldd, re.MULTILINE))
    # The dynamic loader, when a binary names it (Swift's Synchronization module makes them do),
    # is listed by its path alone: `/lib64/ld-linux-x86-64.so.2 (0x…)`.
    for path in re.findall(r"^\s*(/\S+) \(0x", ldd, re.MULTILINE):
        paths.setdefault(os.path.basename(path), path)
    return tuple((name, paths.get(name)) for name in needed)


@functools.lru_cache(maxsize=None)
def owning_package(path):
    """The Debian package that ships a library file (merged-/usr aware), or None."""
    real = os.path.realpath(path)
    candidates = {path, real}
    for p in list(candidates):
        candidates.add(p[4:] if p.startswith("/usr/") else "/usr" + p)
    for candidate in candidates:
        result = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
        if result.returncode == 0:
            return result.stdout.split(":", 1)[0].strip()
    return None


def missing_from_image(packages, binaries):
    """What the binaries link that the runtime stage does not install: [(binary, soname, package)];
    and the Swift toolchain's libraries they link (built in by --static-swift-stdlib)."""
    missing, swift = [], set()
    for binary in binaries:
        for soname, path in direct_libraries(binary):
            assert path, f"{binary}: {soname} not resolved"
            package = owning_package(path)
            if package is None:
                assert "/swift" in path, f"{binary}: {path} belongs to no Debian package and is not Swift's"
                swift.add(soname)
            elif package not in packages:
                missing.append((os.path.basename(binary), soname, package))
    return missing, swift


@pytest.fixture(scope="module")
def dockerfile():
    return open(DOCKERFILE).read()


def test_the_runtime_stage_installs_every_library_the_binaries_link(dockerfile):
    packages = runtime_packages(dockerfile)
    binaries = [os.path.join(BIN, b) for b in BINARIES]
    missing, swift = missing_from_image(packages, binaries)
    assert missing == [], f"the image would miss: {missing}"
    assert "libswiftCore.so" in swift or not swift
    build = " ".join(stages(dockerfile)["build"])
    assert "--static-swift-stdlib" in build, "the debug binaries link Swift's runtime; the image must build it in"
    linked = {owning_package(path) for b in binaries for _, path in direct_libraries(b)}
    unused = {p for p in packages if p.startswith("lib") and p not in linked}
    assert unused == set(), f"listed but linked by no binary: {unused}"


def test_the_check_reports_a_library_the_list_forgot(dockerfile):
    packages = runtime_packages(dockerfile) - {"libnghttp2-14", "libpq5"}
    missing, _ = missing_from_image(packages, [os.path.join(BIN, "talkmesh-dispatcher")])
    assert {(soname, package) for _, soname, package in missing} == {("libnghttp2.so.14", "libnghttp2-14"),
                                                                     ("libpq.so.5", "libpq5")}


def test_the_image_runs_non_root_stops_on_sigterm_and_checks_its_health(dockerfile):
    runtime = stages(dockerfile)["runtime"]
    assert runtime[0].split()[1] == "debian:bookworm-slim"
    user = [line.split()[1] for line in runtime if line.startswith("USER ")]
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0"
    assert "STOPSIGNAL SIGTERM" in runtime
    health = [line for line in runtime if line.startswith("HEALTHCHECK ")]
    assert health and "talkmesh health" in health[0]
    assert any(line.startswith("ENTRYPOINT ") for line in runtime)
    assert any(line == "ARG SERVICE" for line in stages(dockerfile)["build"])
    ignored = open(os.path.join(ROOT, ".dockerignore")).read().split()
    assert {".build/", ".git/", "Package.resolved"} <= set(ignored)


def test_make_images_builds_one_image_per_service_the_package_declares():
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    match = re.search(r"^IMAGES\s*=\s*(.+)$", makefile, re.MULTILINE)
    assert match and match.group(1).split() == IMAGES
    products = set(re.findall(r'\.executable\(\s*name:\s*"([^"]+)"', open(os.path.join(ROOT, "Package.swift")).read()))
    assert {f"talkmesh-{name}" for name in IMAGES} | {"talkmesh"} <= products
    manifests = subprocess.run(["grep", "-rhoE", r"image: talkmesh-[a-z-]+", os.path.join(ROOT, "k8s")],
                               capture_output=True, text=True).stdout.split()
    assert {m for m in manifests if m.startswith("talkmesh-")} <= {f"talkmesh-{name}" for name in IMAGES}


def test_every_package_the_image_names_exists_in_debian_12_and_the_build_stage_has_every_header(dockerfile):
    """No engine builds the image here, so what apt-get would refuse is caught here: a package name
    Debian 12 does not have (in either stage), or a -dev package the build needs and the stage lacks."""
    build_stage = dockerfile.split("FROM debian:bookworm-slim")[0]
    build = set(re.findall(r"\b(lib[\w.+-]+-dev)\b", build_stage))
    for package in sorted(runtime_packages(dockerfile) | build):
        result = subprocess.run(["apt-cache", "show", package], capture_output=True, text=True)
        assert result.returncode == 0 and "Package: " + package in result.stdout, f"Debian has no package {package}"
    bootstrap = open(os.path.join(ROOT, "scripts", "bootstrap")).read()
    assert set(re.findall(r"\b(lib[\w.+-]+-dev)\b", bootstrap)) == build, "the build stage and scripts/bootstrap disagree"
