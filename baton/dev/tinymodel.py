"""A tiny random-weight Llama that needs no download.

``build_tiny_model`` writes a Hugging Face model directory that both vLLM and
``transformers.AutoTokenizer`` load: a 2-layer Llama (hidden 256, 4 heads of 64,
vocab 4,096, bf16, ~3.4 M parameters) and a byte-level BPE tokenizer trained on
the running interpreter's own standard library sources. Its output is gibberish
(the weights are random) but greedy decoding is deterministic, which is what the
real-engine tests assert on: token counts, determinism, batching and cache hits.

Deterministic for a given ``seed`` and Python standard library. Idempotent: the
marker file is written last, and a directory holding it is returned untouched.

Requires ``torch``, ``transformers`` and ``tokenizers`` (the vLLM extra).
"""

from __future__ import annotations

import json
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

from baton.models import place

MARKER = ".baton-tiny-model"
"""Written last; its presence means the directory is complete."""

VOCAB_SIZE = 4096
CORPUS_BYTES = 3 * 2**20
"""How much standard-library text trains the tokenizer (a few seconds)."""

BOS, PAD, END = "<|bos|>", "<|pad|>", "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = [BOS, PAD, END, *ROLE_TOKENS]

# Each turn is ``<|role|>\n content <|end|>\n``. ``<|end|>`` ends a turn and is
# the model's end-of-sequence token, so a reply stops where a turn would.
# Offered tools come first, as a system turn of their JSON, the way templates
# with tool support put them in the prompt (so they cost prompt tokens here too).
CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|system|>\\n' + (tools | tojson) + '<|end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _corpus_files(limit_bytes: int) -> list[Path]:
    """Standard-library ``.py`` files in a stable order, up to ``limit_bytes``."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chosen: list[Path] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        size = path.stat().st_size
        if size == 0:
            continue
        chosen.append(path)
        total += size
        if total >= limit_bytes:
            break
    if not chosen:
        raise RuntimeError(f"no Python sources found under {stdlib} to train a tokenizer")
    return chosen


def _train_tokenizer(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def texts() -> Iterator[str]:
        for path in _corpus_files(CORPUS_BYTES):
            yield path.read_text(encoding="utf-8", errors="replace")

    tok.train_from_iterator(texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=END,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)


def _build_model(out_dir: Path, seed: int, vocab_size: int, ids: dict[str, int]) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=ids[BOS],
        eos_token_id=ids[END],
        pad_token_id=ids[PAD],
        dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model = model.bfloat16()
    model.save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=ids[END], pad_token_id=ids[PAD]
    ).save_pretrained(out_dir)


def build_tiny_model(out_dir: Path, *, seed: int = 0) -> Path:
    """Write the tiny model to ``out_dir`` (created if needed) and return it.

    Returns at once if ``out_dir`` already holds a complete model. Otherwise the
    model is built in a sibling temporary directory and moved into place with
    the marker last, so a crash never leaves a directory that looks complete.
    Files already in ``out_dir`` that are not part of the model are left alone.
    Safe to call from several processes at once. A complete model is returned
    as it is, whatever ``seed`` built it (the marker records it).
    """
    out_dir = Path(out_dir)
    if (out_dir / MARKER).is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".tiny-build-") as tmp:
        work = Path(tmp) / "model"
        work.mkdir()
        _train_tokenizer(work)
        vocab = json.loads((work / "tokenizer.json").read_text())["model"]["vocab"]
        ids = {tok: int(vocab[tok]) for tok in SPECIAL_TOKENS}
        _build_model(work, seed, VOCAB_SIZE, ids)
        if (out_dir / MARKER).is_file():
            return out_dir  # a concurrent builder finished first
        place(work, out_dir)  # the content is the same for the same seed
    (out_dir / MARKER).write_text(json.dumps({"seed": seed, "vocab_size": VOCAB_SIZE}) + "\n")
    return out_dir
