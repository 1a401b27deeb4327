from chelsea_gguf import Llama

FACT_PROMPT = "The capital of France is"


def test_greedy_generation_is_deterministic_and_sensible(llm: Llama) -> None:
    first = llm(FACT_PROMPT, max_tokens=12, temperature=0.0)
    llm.reset()
    second = llm(FACT_PROMPT, max_tokens=12, temperature=0.0)
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    assert "Paris" in first["choices"][0]["text"]


def test_completion_shape_and_usage(llm: Llama) -> None:
    out = llm.create_completion(FACT_PROMPT, max_tokens=5, temperature=0.0)
    assert out["object"] == "text_completion"
    assert out["id"].startswith("cmpl-")
    choice = out["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length")
    usage = out["usage"]
    assert usage["prompt_tokens"] == len(llm.tokenize(FACT_PROMPT))
    assert 1 <= usage["completion_tokens"] <= 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_max_tokens_gives_length_finish(llm: Llama) -> None:
    out = llm(" One, two, three, four, five,", max_tokens=3, temperature=0.0)
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 3


def test_streaming_yields_the_same_text(llm: Llama) -> None:
    whole = llm(FACT_PROMPT, max_tokens=20, temperature=0.0)
    chunks = list(llm(FACT_PROMPT, max_tokens=20, temperature=0.0, stream=True))
    assert len(chunks) > 2
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_stop_string_cuts_the_text(llm: Llama) -> None:
    out = llm(" 1, 2, 3, 4, 5, 6, 7, 8", max_tokens=30, temperature=0.0, stop=["11"])
    text = out["choices"][0]["text"]
    assert "11" not in text and "10" in text
    assert out["choices"][0]["finish_reason"] == "stop"


def test_seeded_sampling_repeats(llm: Llama) -> None:
    a = llm(FACT_PROMPT, max_tokens=10, temperature=1.0, seed=42)["choices"][0]["text"]
    b = llm(FACT_PROMPT, max_tokens=10, temperature=1.0, seed=42)["choices"][0]["text"]
    assert a == b


def test_prompt_prefix_is_reused(llm: Llama) -> None:
    llm.reset()
    llm(FACT_PROMPT, max_tokens=1, temperature=0.0)
    llm(FACT_PROMPT + " a city", max_tokens=1, temperature=0.0)
    n_prompt = len(llm.tokenize(FACT_PROMPT + " a city"))
    assert llm.last_timings.prompt_tokens < n_prompt


def test_echo_prepends_prompt(llm: Llama) -> None:
    out = llm(FACT_PROMPT, max_tokens=3, temperature=0.0, echo=True)
    assert out["choices"][0]["text"].startswith(FACT_PROMPT)
