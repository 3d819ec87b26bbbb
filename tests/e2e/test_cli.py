"""`kiln generate` as a user runs it, in a subprocess: bad models fail with one clear line and a non-zero
exit (never a traceback); the default model answers a question."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.config import models_dir
from tests.tiny import save_tiny_model


def kiln(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "KILN_MODELS_DIR": str(models_dir()), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "kiln.entrypoints.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=Path(__file__).parents[2])


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kiln: error:")]
    assert len(errors) == 1, proc.stderr
    assert proc.stderr.rstrip().endswith(errors[0]), proc.stderr   # the error is the last thing printed
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama-tied")


def _copy_with_config(src: Path, dst: Path, **changes) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_missing_model_file(tmp_path):
    missing = tmp_path / "nope" / "model.gguf"
    err = assert_one_line_error(kiln("generate", "--model", str(missing), "hi"), str(missing))
    assert "smollm2-135m-instruct" in err   # lists the names it does know


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(os.urandom(4096))
    assert_one_line_error(kiln("generate", "--model", str(bad), "hi"), str(bad), "GGUF")


def test_unknown_architecture(tiny_folder, tmp_path):
    folder = _copy_with_config(tiny_folder, tmp_path / "gpt2", architectures=["GPT2LMHeadModel"], model_type="gpt2")
    assert_one_line_error(kiln("generate", "--model", str(folder), "hi"),
                          "GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def test_config_weight_shape_mismatch(tiny_folder, tmp_path):
    folder = _copy_with_config(tiny_folder, tmp_path / "wide", hidden_size=128)
    # the first tensor checked is the embedding: [vocab, hidden] on disk vs the config's
    assert_one_line_error(kiln("generate", "--model", str(folder), "hi"),
                          "model.embed_tokens.weight", "[258, 64]", "[258, 128]")


# The same contract in-process (no interpreter start-up), for more ways a model can be broken.

def run_main(capsys, *args: str) -> subprocess.CompletedProcess:
    from kiln.entrypoints.cli import main

    rc = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)


def test_truncated_gguf(tmp_path, capsys):
    import gguf
    import numpy as np

    good = tmp_path / "good.gguf"
    w = gguf.GGUFWriter(str(good), "llama")
    w.add_tensor("token_embd.weight", np.ones((256, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(good.read_bytes()[:-1000])   # a valid header, then the data just ends
    assert_one_line_error(run_main(capsys, "generate", "--model", str(bad), "hi"), str(bad))


def test_missing_tensor(tiny_folder, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    folder = _copy_with_config(tiny_folder, tmp_path / "holes")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert_one_line_error(run_main(capsys, "generate", "--model", str(folder), "hi"),
                          "model.layers.1.mlp.up_proj.weight", "missing")


def test_no_weights(tiny_folder, tmp_path, capsys):
    folder = _copy_with_config(tiny_folder, tmp_path / "empty")
    (folder / "model.safetensors").unlink()
    assert_one_line_error(run_main(capsys, "generate", "--model", str(folder), "hi"), "model.safetensors")


def test_tiny_folder_loads(tiny_folder):
    """The unbroken folder loads, so each failure above is about what that test broke."""
    from kiln.backends.jax.model import check_tensors
    from kiln.models.loader import load_model

    loaded = load_model(str(tiny_folder), models_dir())
    check_tensors(loaded.spec, loaded.tensors)


@pytest.mark.slow
def test_default_model_knows_paris(default_gguf):
    proc = kiln("generate", "--model", str(default_gguf), "--max-model-len", "256", "--max-num-seqs", "1",
                "--max-tokens", "32", "What is the capital of France?")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout, proc.stdout
