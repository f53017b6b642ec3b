"""The embedded default model: shipped in Hugging Face layout, small, and it writes Python."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from moeserve.workers.cli.main import default_model_path
from moeserve.workers.model.config import ModelConfig
from moeserve.workers.model.loader import load_model
from moeserve.workers.model.tokenizer import Tokenizer
from moeserve.workers.offline.generate import GenerationSettings, generate

pytestmark = pytest.mark.unit
PATH = default_model_path()


def test_layout_and_size() -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (PATH / name).exists(), f"{name} missing from {PATH}"
    total = sum(f.stat().st_size for f in PATH.iterdir())
    assert total <= 25 * 1024 * 1024
    cfg = ModelConfig.from_file(PATH)
    assert cfg.model_type == "deepseek_v2" and len(cfg.moe_layers) >= 2
    assert cfg.n_routed_experts > cfg.num_experts_per_tok and cfg.n_shared_experts >= 1


def test_tokenizer_round_trips_multibyte_text() -> None:
    tok = Tokenizer.from_model_dir(PATH)
    assert tok is not None
    text = "naïve — 日本語 🙂\n\tdef f(x):\n        return x"
    assert tok.decode(tok.encode(text)) == text


KEYWORDS = ("def ", "return", "class ", "import ", "self", '"""', "#", "if ", "for ", " = ")


def looks_like_python(text: str) -> list[str]:
    """What is un-Pythonic about a continuation (empty when nothing is)."""
    problems = []
    lines = [line for line in text.splitlines() if line.strip()]
    if not text.isascii():
        problems.append("non-ASCII text")
    if len(lines) < 3:
        problems.append(f"only {len(lines)} non-empty lines")
    indents = [len(line) - len(line.lstrip(" ")) for line in lines[1:]]  # the first continues a line
    if indents and sum(i % 4 == 0 for i in indents) < 0.8 * len(indents):
        problems.append(f"indentation not in steps of 4: {indents}")
    found = [k for k in KEYWORDS if k in text]
    if len(found) < 2:
        problems.append(f"Python landmarks found: {found}")
    return problems


def test_greedy_continuation_of_python_looks_like_python() -> None:
    tok = Tokenizer.from_model_dir(PATH)
    assert tok is not None
    model = load_model(PATH)
    prompts = [
        "import os\nimport sys\n\n\ndef main():\n    ",
        "class Parser:\n    def __init__(self, text):\n        ",
    ]
    outputs = generate(model, [tok.encode(p) for p in prompts], GenerationSettings(max_tokens=48))
    # each continuation has Python's shape; between them, Python's words (a docstring is Python too)
    texts = [tok.decode(ids) for ids in outputs]
    assert not looks_like_python("\n".join(texts)), texts
    for text in texts:
        shape = [p for p in looks_like_python(text) if not p.startswith("Python landmarks")]
        assert not shape, (text, shape)


def test_the_python_check_rejects_random_tokens() -> None:
    tok = Tokenizer.from_model_dir(PATH)
    assert tok is not None
    ids = torch.randint(2, tok.vocab_size, (48,), generator=torch.Generator().manual_seed(0)).tolist()
    assert looks_like_python(tok.decode(ids))


HELD_OUT = '''def moving_average(values, window):
    """Return the averages of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    result = []
    total = 0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result
'''


def test_model_predicts_unseen_python_far_better_than_chance() -> None:
    import math

    from moeserve.workers.model.batch import ForwardBatch, SequenceStep
    from moeserve.workers.offline.generate import make_cache

    tok = Tokenizer.from_model_dir(PATH)
    assert tok is not None
    model = load_model(PATH)
    ids = tok.encode(HELD_OUT)
    cache = make_cache(model, [len(ids)])
    seq = cache.new_sequence()
    seq.reserve(cache.allocator, len(ids))
    logits = model(ForwardBatch.build([SequenceStep(ids, 0, seq.blocks)], 16), cache, all_logits=True)
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()
    assert nll < 0.5 * math.log(model.config.vocab_size), nll  # chance is ln(vocab)


def test_cli_without_model_uses_it() -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "moeserve.workers.cli.main",
            "generate",
            "--prompt",
            "def add(a, b):\n",
            "--max-tokens",
            "8",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "token_ids" in res.stdout
