"""Hugging Face directories: sharded weights load like single files; broken inputs name the file."""
import json
import shutil

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.model.load import open_checkpoint


def test_sharded_checkpoint_gives_the_same_tokens(tiny_llama, tmp_path):
    directory, hf = tiny_llama
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompt = [[3, 1, 4, 1, 5, 9, 2, 6]]
    # a KV pool sized for these prompts: the default (2 GB) takes ~1.5 s to build and free
    kv = dict(num_kv_blocks=64, progress=False)
    a = LLM(str(directory), **kv).generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    b = LLM(str(tmp_path), **kv).generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    assert a == b


def copy_dir(src, dst):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        open_checkpoint(tmp_path)


def test_unsupported_architecture(tiny_llama, tmp_path):
    d = copy_dir(tiny_llama[0], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM"):
        open_checkpoint(d)


def test_truncated_safetensors_names_the_file(tiny_llama, tmp_path):
    d = copy_dir(tiny_llama[0], tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(ValueError, match="model.safetensors"):
        LLM(str(d), progress=False)


def test_missing_weights_are_reported(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file
    d = copy_dir(tiny_llama[0], tmp_path / "m")
    state = load_file(d / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, d / "model.safetensors")
    with pytest.raises(ValueError, match="down_proj"):
        LLM(str(d), progress=False)


def test_no_weights(tiny_llama, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(tiny_llama[0] / "config.json", d)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        open_checkpoint(d)
