import numpy as np
import pytest

from kiln.models.loader import converted_dir, load_model


@pytest.mark.slow
def test_gguf_is_dequantised_once_and_reloads_identically(default_gguf, tmp_path):
    first = load_model(str(default_gguf), tmp_path)
    folder = converted_dir(default_gguf, tmp_path)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    again = load_model(str(default_gguf), tmp_path)
    assert again.spec == first.spec
    assert first.tensors.keys() == again.tensors.keys()
    for name, t in first.tensors.items():
        np.testing.assert_array_equal(again.tensors[name], t, err_msg=name)
    chat = [{"role": "user", "content": "Héllo, wörld 🌍"}]
    assert again.tokenizer.apply_chat_template(chat) == first.tokenizer.apply_chat_template(chat)
    assert again.tokenizer.encode("naïve café") == first.tokenizer.encode("naïve café")
