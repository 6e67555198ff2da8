"""Window packing and token counting, without a broker (pure functions)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from proto.messages import ChatMessage, Summary
from services.context_store.counting import MESSAGE_OVERHEAD, TokenCounter, estimate_tokens
from services.context_store.window import BudgetTooSmall, build_window


def _history(rng: random.Random, n: int) -> list[ChatMessage]:
    msgs = [ChatMessage(role="system", content="s" * rng.randint(0, 200))]
    for i in range(n):
        role = "user" if i % 2 == 0 else "assistant"
        msgs.append(ChatMessage(role=role, content=f"{i} " + "w " * rng.randint(0, 400)))
    return msgs


def test_random_histories_and_budgets_never_overflow_and_keep_system_and_newest() -> None:
    rng = random.Random(7)
    for _ in range(300):
        msgs = _history(rng, rng.randint(0, 60))
        tokens = [estimate_tokens(m) for m in msgs]
        budget = rng.randint(1, 6000)
        summary = Summary(covers=rng.randint(1, len(msgs)), content="sum " * rng.randint(0, 50))
        try:
            w = build_window(
                msgs, tokens, budget, estimate_tokens, summary if rng.random() < 0.5 else None
            )
        except BudgetTooSmall as exc:
            assert exc.needed > budget
            assert tokens[0] + (tokens[-1] if len(msgs) > 1 else 0) > budget
            continue
        assert sum(estimate_tokens(m) for m in w.messages) == w.tokens <= budget
        assert w.messages[0] == msgs[0]
        if len(msgs) > 1 and not (w.summarized and summary.covers == len(msgs)):
            assert w.messages[-1] == msgs[-1]  # unless a summary stands in for everything
        again = build_window(msgs, tokens, budget, estimate_tokens, None)
        assert again == build_window(msgs, tokens, budget, estimate_tokens, None)


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"])
    tok.train_from_iterator(["the context store hands each agent a window"] * 50, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_a_configured_tokenizer_counts_tokens_exactly_and_caches_per_message(
    tokenizer_json: Path,
) -> None:
    import tokenizers

    counter = TokenCounter(str(tokenizer_json.parent))
    exact = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    msg = ChatMessage(role="user", content="the context store hands each agent a window " * 3)
    expected = len(exact.encode(msg.content, add_special_tokens=False).ids) + MESSAGE_OVERHEAD
    assert counter.count(msg) == expected != estimate_tokens(msg)
    assert counter.count(msg) == expected
    assert counter._text.cache_info().hits == 1  # type: ignore[union-attr]
    assert TokenCounter().count(msg) == estimate_tokens(msg)
