"""Bad input gets a clear error naming the problem, and never takes the interpreter down."""

from pathlib import Path

import pytest

from chelsea_gguf import Llama
from chelsea_gguf.chat import format_chat_prompt


def test_missing_model_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        Llama(str(missing), verbose=False)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"this is not a model" * 10)
    with pytest.raises(ValueError, match="bogus.gguf"):
        Llama(str(bogus), verbose=False)


def test_truncated_gguf(tmp_path: Path, model_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(model_path.read_bytes()[: 1 << 20])
    with pytest.raises(ValueError, match="truncated.gguf"):
        Llama(str(truncated), verbose=False)


def test_directory_as_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="directory"):
        Llama(str(tmp_path), verbose=False)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"n_ctx": -1}, "n_ctx"),
        ({"n_ctx": "64q"}, "n_ctx"),
        ({"n_batch": 0}, "n_batch"),
        ({"n_ubatch": -5}, "n_ubatch"),
        ({"n_threads": 0}, "n_threads"),
        ({"n_gpu_layers": -2}, "n_gpu_layers"),
        ({"type_k": "q3_x"}, "type_k"),
        ({"type_v": 999}, "type_v"),
        ({"flash_attn": "maybe"}, "flash_attn"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_options(model_path: Path, kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        Llama(str(model_path), verbose=False, **kwargs)


def test_prompt_longer_than_context(model_path: Path) -> None:
    # llama.cpp pads the context to a multiple of 256
    with Llama(str(model_path), n_ctx=64, verbose=False) as small:
        assert small.n_ctx() == 256
        prompt = "word " * 600
        n = len(small.tokenize(prompt))
        with pytest.raises(ValueError, match=rf"{n} tokens.*n_ctx=256"):
            small(prompt, max_tokens=4)
        # the context is still usable afterwards
        assert small("Hello", max_tokens=2, temperature=0.0)["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"repeat_penalty": 0.0}, "repeat_penalty"),
        ({"max_tokens": "ten"}, "max_tokens"),
        ({"mirostat_mode": 2}, "mirostat_mode"),
        ({"suffix": "x"}, "suffix"),
    ],
)
def test_invalid_sampling_options(llm: Llama, kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        llm("Hello", **kwargs)


def test_invalid_token_ids(llm: Llama) -> None:
    with pytest.raises(ValueError, match="token id"):
        llm([1, 2, llm.n_vocab() + 5], max_tokens=1)


def test_invalid_chat_messages(llm: Llama) -> None:
    with pytest.raises(ValueError, match="messages"):
        llm.create_chat_completion([])
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        llm.create_chat_completion([{"role": "robot", "content": "hi"}])
    with pytest.raises(ValueError, match="chat_format"):
        format_chat_prompt(llm.model, [{"role": "user", "content": "hi"}], "no-such-template")


def test_closed_model_raises(model_path: Path) -> None:
    m = Llama(str(model_path), n_ctx=64, verbose=False)
    m.close()
    m.close()
    with pytest.raises(RuntimeError, match="closed"):
        m("Hello", max_tokens=1)
