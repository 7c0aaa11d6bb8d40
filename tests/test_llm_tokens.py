"""Offline token counts match OpenAI's own figures: per-message framing, the right vocabulary per model."""

import pytest

from agents.llm import tokens

# OpenAI cookbook "How to count tokens with tiktoken": the API itself reported 129 prompt tokens for these
# messages on gpt-4 / gpt-4-0613 / gpt-3.5-turbo-0613 (cl100k_base) and 124 on gpt-4o / gpt-4o-mini (o200k_base).
COOKBOOK_MESSAGES = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate "
                                  "jargon into plain English."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch "
                                                          "base on opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to "
                                                               "do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client "
                                "deliverable."},
]


@pytest.mark.parametrize(("model", "upstream_figure"), [
    ("gpt-4", 129), ("gpt-4-0613", 129), ("gpt-3.5-turbo-0613", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124),
])
def test_prompt_count_equals_what_openai_reported(model, upstream_figure):
    assert tokens.count_messages(COOKBOOK_MESSAGES, model) == upstream_figure


@pytest.mark.parametrize(("model", "encoding"), [
    ("gpt-4o-2024-08-06", "o200k_base"), ("gpt-4-turbo-2024-04-09", "cl100k_base"), ("o3-mini", "o200k_base"),
    ("gpt-4.1-nano", "o200k_base"), ("openai/gpt-4o", "o200k_base"), ("ft:gpt-3.5-turbo:acme::x1", "cl100k_base"),
    ("qwen2.5:7b", "o200k_base"), ("deepseek-chat", "o200k_base"), ("", "o200k_base"),
    ("text-davinci-003", "o200k_base"),
])
def test_vocabulary_follows_the_model_name(model, encoding):
    assert tokens.encoding_name_for(model) == encoding


def test_content_parts_and_names_are_counted():
    plain = tokens.count_messages([{"role": "user", "content": "hello world"}], "gpt-4o")
    parts = tokens.count_messages([{"role": "user", "content": [{"type": "text", "text": "hello world"}]}], "gpt-4o")
    named = tokens.count_messages([{"role": "user", "name": "bob", "content": "hello world"}], "gpt-4o")
    assert plain == parts == 3 + 3 + 1 + 2  # priming + framing + "user" + "hello world"
    assert named == plain + 1 + tokens.count_text("bob", "gpt-4o")
