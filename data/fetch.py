#!/usr/bin/env python3
"""Fetch the benchmark's labelled texts into data/cache/ (run by `make data`).

Reads data/sources.toml. For each archive not fetched before: download it with the ordinary
package client (pip or apt-get), check its sha256 against the manifest, unpack only the files the
manifest keeps into data/cache/<dest>/, then record a stamp and delete the archive. A second run
is a no-op. Any failure prints one line naming the archive and exits non-zero. A source with a
`committed_copy` falls back to that archive (kept in the repository, checked against its own
sha256) when the package index no longer serves the pinned package.

`knots data --stats` (Rust, src/eval/) reads the cache this script writes.
"""

import fnmatch
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

try:
    import tomllib
except ImportError:
    sys.exit("error: data/fetch.py needs Python 3.11 or newer (for tomllib)")
from pathlib import Path

HERE = Path(__file__).resolve().parent
SKIP = ("*.dat", "*.u8")


class FetchError(Exception):
    pass


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise FetchError(f"{what}: `{cmd[0]}` is not installed")
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()
        hint = tail[-1] if tail else f"exit status {done.returncode}"
        if cmd[0] == "apt-get":
            hint += " (is this a Debian 12 system with up-to-date package lists? try `apt-get update`)"
        raise FetchError(f"{what}: `{' '.join(cmd)}` failed: {hint}")


def download(source: dict, downloads: Path) -> Path:
    spec = source["spec"]
    if source["kind"] == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               *source.get("pip_args", []), "--dest", str(downloads), spec]
    elif source["kind"] == "deb":
        cmd = ["apt-get", "download", "--quiet", spec]
    else:
        raise FetchError(f"{spec}: unknown kind {source['kind']!r} in sources.toml")
    run(cmd, downloads, spec)
    path = downloads / source["file"]
    if not path.is_file():
        raise FetchError(f"{spec}: expected {source['file']} after download, not found")
    return path


def wanted(name: str, source: dict) -> str | None:
    """The path under the destination for an archive member, or None to skip it."""
    if any(fnmatch.fnmatch(name, pattern) for pattern in SKIP):
        return None
    if not any(fnmatch.fnmatch(name, pattern) for pattern in source["keep"]):
        return None
    strip = source.get("strip", "")
    rel = name[len(strip):] if name.startswith(strip) else name
    parts = Path(rel).parts
    if not parts or ".." in parts or Path(rel).is_absolute():
        return None
    return rel


def members(archive: Path, source: dict):
    """Yields (member name, bytes) for every regular file of the archive."""
    nested = source.get("nested")
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if not info.is_dir():
                    yield info.filename, z.read(info)
    elif archive.suffix == ".deb":
        with tempfile.TemporaryDirectory() as tmp:
            run(["dpkg-deb", "-x", str(archive), tmp], archive.parent, source["spec"])
            for path in sorted(Path(tmp).rglob("*")):
                if path.is_file() and not path.is_symlink():
                    yield path.relative_to(tmp).as_posix(), path.read_bytes()
    else:
        with tarfile.open(archive) as t:
            for info in t:
                if not info.isfile():
                    continue
                if nested and info.name == nested:
                    data = t.extractfile(info).read()
                    with tarfile.open(fileobj=io.BytesIO(data)) as inner:
                        for sub in inner:
                            if sub.isfile():
                                yield sub.name, inner.extractfile(sub).read()
                elif not nested:
                    yield info.name, t.extractfile(info).read()


def unpack(archive: Path, source: dict, cache: Path) -> int:
    dest = cache / source["dest"]
    count = 0
    for name, data in members(archive, source):
        rel = wanted(name, source)
        if rel is None:
            continue
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, out)
        count += 1
    if count == 0:
        raise FetchError(f"{source['file']}: no member matched {source['keep']}")
    return count


def committed_copy(source: dict, err: FetchError) -> tuple[Path, dict]:
    """The archive committed under data/ in place of a package the index no longer serves, and
    the source entry to unpack it with (it holds exactly the kept files, the prefix stripped)."""
    copy = source.get("committed_copy")
    if copy is None:
        raise err
    print(f"data: {err}; using the committed copy {copy['file']}", file=sys.stderr, flush=True)
    unpack_as = {**source, "file": copy["file"], "sha256": copy["sha256"],
                 "keep": copy["keep"], "strip": copy.get("strip", "")}
    return HERE / copy["file"], unpack_as


def fetch(source: dict, cache: Path) -> str:
    stamp = cache / ".stamps" / (source["file"] + ".sha256")
    if stamp.is_file() and stamp.read_text().strip() == source["sha256"]:
        return f"{source['file']}: present"
    downloads = cache / ".downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    archive, unpack_as = downloads / source["file"], source
    if not archive.is_file():
        try:
            archive = download(source, downloads)
        except FetchError as err:
            archive, unpack_as = committed_copy(source, err)
    downloaded = unpack_as is source
    found = sha256_of(archive)
    if found != unpack_as["sha256"]:
        if downloaded:
            archive.unlink()
        raise FetchError(
            f"{unpack_as['file']}: sha256 {found} does not match the manifest's "
            f"{unpack_as['sha256']}")
    count = unpack(archive, unpack_as, cache)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(source["sha256"] + "\n")
    if downloaded:
        archive.unlink()
    return f"{unpack_as['file']}: {count} files into {source['dest']}/"


def main() -> int:
    manifest = Path(os.environ.get("KNOTS_DATA_SOURCES", HERE / "sources.toml"))
    cache = Path(os.environ.get("KNOTS_DATA_CACHE", HERE / "cache"))
    try:
        sources = tomllib.loads(manifest.read_text())["source"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as err:
        print(f"error: {manifest}: {err}", file=sys.stderr)
        return 1
    try:
        for source in sources:
            print(f"data: {fetch(source, cache)}", flush=True)
    except FetchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    shutil.rmtree(cache / ".downloads", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
