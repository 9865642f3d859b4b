"""A release pipeline with real files: build, checksum, publish, smoke-test, or undo it all.

    kira run examples/release.py                      # builds and publishes 1.0.0
    kira run examples/release.py --set fail=smoke     # the smoke test fails: nothing remains
    kira run examples/release.py --set version=1.0.1  # the next release

The steps: prepare a build folder; write a tiny package's sources and, at the same
time, the changelog; byte-compile the sources; pack them into a wheel-like zip
(with a RECORD of sha256 digests, as real wheels have); write a SHA256SUMS file;
"publish" by copying the artefacts into a local folder; then a smoke test that
opens the published zip, compiles and runs a module from it, and verifies the
checksums. When any step fails for good, kira unapplies what was done, in
reverse dependency order: the published copies go first, then every built file,
then the build folder itself.

Config (`--set KEY=VALUE`):
    workdir      where artefacts are built (default ./release-work)
    publish_dir  where they are published (default ./release-published)
    version      the release's version (default 1.0.0); a version already built
                 or published is refused, never overwritten
    fail         a step's name (smoke, publish, wheel, ...): that step fails
"""

from __future__ import annotations

import base64
import hashlib
import py_compile
import shutil
import zipfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kira

PACKAGE = "tinypkg"

config: dict[str, Any] = {
    "workdir": "release-work",
    "publish_dir": "release-published",
    "version": "1.0.0",
    "fail": None,
}

SOURCES = {
    "__init__.py": '"""tinypkg: a package built by kira\'s release example."""\n\n'
    "from .greet import greet\n\n"
    '__all__ = ["greet"]\n',
    "greet.py": '"""Greetings."""\n\n\n'
    "def greet(name: str) -> str:\n"
    '    """Say hello to `name`."""\n'
    '    return f"hello, {name}"\n',
}


class ReleaseError(Exception):
    """A release step found something wrong."""


class SmokeTestFailed(ReleaseError):
    """The published artefacts do not work."""


def forced(config: Mapping[str, Any], step: str) -> None:
    """Fail `step` when the config says so (`--set fail=STEP`)."""
    if config.get("fail") == step:
        error = SmokeTestFailed if step == "smoke" else ReleaseError
        raise error(f"{step} failed (forced by fail={step})")


def build_dir(config: Mapping[str, Any]) -> Path:
    """The folder this version is built in."""
    return Path(config["workdir"]) / f"build-{config['version']}"


def remove(paths: list[str]) -> None:
    """Delete files, then the folders among `paths` if they are empty (deepest first)."""
    for p in map(Path, paths):
        if p.is_file():
            p.unlink()
    for p in sorted(map(Path, paths), key=lambda p: len(p.parts), reverse=True):
        if p.is_dir() and not any(p.iterdir()):
            p.rmdir()


def sha256(path: Path) -> str:
    """The file's sha256, in hex."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the steps ---------------------------------------------------------------------------


def prepare(config: Mapping[str, Any], deps: Mapping[str, Any]) -> list[str]:
    """Create the build folder (refusing one that exists: never mix two builds).
    Returns the folders it created, for the undo."""
    forced(config, "prepare")
    workdir, build = Path(config["workdir"]), build_dir(config)
    if build.exists():
        raise ReleaseError(
            f"{build} exists: version {config['version']} was already built; remove it "
            "or --set version=..."
        )
    created = [str(workdir)] if not workdir.exists() else []
    (build / "dist").mkdir(parents=True)
    return [*created, str(build), str(build / "dist")]


def unprepare(config: Mapping[str, Any], deps: Mapping[str, Any], created: list[str]) -> None:
    """Remove the folders prepare created (empty by now: the steps after it removed
    their files first)."""
    remove(created)


def write_sources(config: Mapping[str, Any], deps: Mapping[str, Any]) -> list[str]:
    """Write the package's sources; return their paths."""
    forced(config, "sources")
    folder = build_dir(config) / "src" / PACKAGE
    folder.mkdir(parents=True)
    paths = [str(folder.parent), str(folder)]
    for name, text in SOURCES.items():
        (folder / name).write_text(text, encoding="utf-8")
        paths.append(str(folder / name))
    return paths


def write_changelog(config: Mapping[str, Any], deps: Mapping[str, Any]) -> str:
    """Write CHANGELOG.md for this version; return its path."""
    forced(config, "changelog")
    path = build_dir(config) / "dist" / "CHANGELOG.md"
    today = datetime.now(UTC).date().isoformat()
    path.write_text(
        f"# Changelog\n\n## {config['version']} ({today})\n\n"
        "- `greet(name)` says hello.\n- Built and published by kira's release example.\n",
        encoding="utf-8",
    )
    return str(path)


def compile_sources(config: Mapping[str, Any], deps: Mapping[str, Any]) -> list[str]:
    """Byte-compile every source (a syntax error fails the step); return the .pyc paths."""
    forced(config, "compile")
    out = []
    for source in (Path(p) for p in deps["sources"] if p.endswith(".py")):
        cfile = source.parent / "__pycache__" / (source.stem + ".pyc")
        py_compile.compile(str(source), cfile=str(cfile), doraise=True)
        out.append(str(cfile))
    return [*out, str(Path(out[0]).parent)]


def build_wheel(config: Mapping[str, Any], deps: Mapping[str, Any]) -> str:
    """Pack sources and bytecode into a wheel-like zip with METADATA and a RECORD of
    sha256 digests; return its path."""
    forced(config, "wheel")
    version = config["version"]
    path = build_dir(config) / "dist" / f"{PACKAGE}-{version}-py3-none-any.whl"
    info = f"{PACKAGE}-{version}.dist-info"
    files: dict[str, bytes] = {}
    for p in (Path(p) for p in [*deps["sources"], *deps["compile"]]):
        if p.is_file():
            inside = p.relative_to(build_dir(config) / "src").as_posix()
            files[inside] = p.read_bytes()
    files[f"{info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {version}\n"
        "Summary: built by kira's release example\n"
    ).encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: kira-example\nRoot-Is-Purelib: true\n"
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return str(path)


def write_checksums(config: Mapping[str, Any], deps: Mapping[str, Any]) -> str:
    """Write SHA256SUMS for the wheel and the changelog; return its path."""
    forced(config, "checksums")
    artefacts = [Path(deps["wheel"]), Path(deps["changelog"])]
    path = build_dir(config) / "dist" / "SHA256SUMS"
    path.write_text("".join(f"{sha256(a)}  {a.name}\n" for a in artefacts), encoding="utf-8")
    return str(path)


def publish(config: Mapping[str, Any], deps: Mapping[str, Any]) -> list[str]:
    """Copy the artefacts to publish_dir/PACKAGE/VERSION (refusing a version already
    published); return what it created, for the undo."""
    publish_dir = Path(config["publish_dir"])
    target = publish_dir / PACKAGE / config["version"]
    if target.exists():
        raise ReleaseError(f"{target} exists: version {config['version']} is already published")
    created = [str(p) for p in (publish_dir, publish_dir / PACKAGE, target) if not p.exists()]
    try:
        target.mkdir(parents=True)
        for source in (deps["wheel"], deps["changelog"], deps["checksums"]):
            created.append(shutil.copy2(source, target))
        forced(config, "publish")
    except BaseException:
        # A failed apply is never unapplied: it must leave nothing behind itself.
        remove(created)
        raise
    return created


def smoke_test(config: Mapping[str, Any], deps: Mapping[str, Any]) -> str:
    """Check what was published: the zip opens and is intact, a module from it compiles
    and works, the checksums match. Returns what it checked."""
    published = {Path(p).name: Path(p) for p in deps["publish"] if Path(p).is_file()}
    wheel = next(p for name, p in published.items() if name.endswith(".whl"))
    with zipfile.ZipFile(wheel) as zf:
        if zf.testzip() is not None:
            raise SmokeTestFailed(f"{wheel.name} is corrupt")
        source = zf.read(f"{PACKAGE}/greet.py").decode()
    namespace: dict[str, Any] = {}
    exec(compile(source, f"{wheel.name}/{PACKAGE}/greet.py", "exec"), namespace)
    if namespace["greet"]("kira") != "hello, kira":
        raise SmokeTestFailed("greet() does not greet")
    for line in published["SHA256SUMS"].read_text(encoding="utf-8").splitlines():
        digest, name = line.split(maxsplit=1)
        if sha256(published[name]) != digest:
            raise SmokeTestFailed(f"checksum mismatch for {name}")
    forced(config, "smoke")
    return f"{wheel.name}: greet() works, checksums match"


def unpublish(config: Mapping[str, Any], deps: Mapping[str, Any], created: list[str]) -> None:
    """Undo publish: remove the copies and the folders it created."""
    remove(created)


def remove_files(config: Mapping[str, Any], deps: Mapping[str, Any], paths: Any) -> None:
    """Undo a build step: remove the files (and emptied folders) it made."""
    remove([paths] if isinstance(paths, str) else paths)


branches = [
    kira.Branch("prepare", prepare, unapply=unprepare),
    kira.Branch("sources", write_sources, ["prepare"], unapply=remove_files),
    kira.Branch("changelog", write_changelog, ["prepare"], unapply=remove_files),
    kira.Branch("compile", compile_sources, ["sources"], unapply=remove_files),
    kira.Branch("wheel", build_wheel, ["sources", "compile"], unapply=remove_files),
    kira.Branch("checksums", write_checksums, ["wheel", "changelog"], unapply=remove_files),
    kira.Branch("publish", publish, ["wheel", "changelog", "checksums"], unapply=unpublish),
    # nothing to undo: a test changes nothing
    kira.Branch("smoke", smoke_test, ["publish"]),
]

if __name__ == "__main__":
    print(kira.run_tasks(config, branches))
