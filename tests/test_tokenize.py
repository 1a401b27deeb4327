from chelsea_gguf import Llama


def test_round_trip_plain_text(llm: Llama) -> None:
    text = "The quick brown fox jumps over the lazy dog. Ünïcødé → 日本語 ✓"
    tokens = llm.tokenize(text, add_bos=False)
    assert len(tokens) > 5
    assert llm.detokenize(tokens).decode("utf-8") == text


def test_bytes_and_str_tokenize_alike(llm: Llama) -> None:
    assert llm.tokenize(b"hello world") == llm.tokenize("hello world")


def test_special_tokens_parsed_only_on_request(llm: Llama) -> None:
    as_special = llm.tokenize("<|im_start|>user", add_bos=False, special=True)
    as_text = llm.tokenize("<|im_start|>user", add_bos=False, special=False)
    assert len(as_special) < len(as_text)
    assert llm.detokenize(as_special, special=True).decode() == "<|im_start|>user"
