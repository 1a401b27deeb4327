from chelsea_gguf import Llama

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France? Answer in one word."},
]


def test_chat_completion_shape(llm: Llama) -> None:
    out = llm.create_chat_completion(MESSAGES, max_tokens=16, temperature=0.0)
    assert out["object"] == "chat.completion"
    assert out["id"].startswith("chatcmpl-")
    msg = out["choices"][0]["message"]
    assert msg["role"] == "assistant"
    assert "Paris" in msg["content"]
    assert "<|im_end|>" not in msg["content"]
    assert out["usage"]["completion_tokens"] >= 1


def test_chat_streaming_matches(llm: Llama) -> None:
    whole = llm.create_chat_completion(MESSAGES, max_tokens=16, temperature=0.0)
    chunks = list(llm.create_chat_completion(MESSAGES, max_tokens=16, temperature=0.0, stream=True))
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]


def test_explicit_chat_format(llm: Llama) -> None:
    from chelsea_gguf.chat import format_chat_prompt

    prompt = format_chat_prompt(llm.model, MESSAGES, "chatml")
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert prompt.endswith("<|im_start|>assistant\n")
