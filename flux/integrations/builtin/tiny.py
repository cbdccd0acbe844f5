"""The embedded default model: a tiny Qwen2 and a character-level tokenizer, built locally.

No hub access: `ensure_default_model()` builds the tokenizer with the `tokenizers` library, a randomly
initialised `Qwen2ForCausalLM` from a fixed seed, gives it the short format warm-start of the built-in
task (see `flux.integrations.builtin.tasks`), and saves all of it in HF format under a cache directory, so every engine and
every `from_pretrained` call treats it like any downloaded checkpoint.
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<eos>", "<|im_start|>", "<|im_end|>"]
CHARS = string.digits + string.ascii_lowercase + " :=+-,.?!\n"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Bump when the recipe changes, so a stale cached model is rebuilt rather than reused.
RECIPE_VERSION = 3

MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def default_model_dir(task: str = "sort") -> Path:
    """Where the embedded default lives: $XDG_CACHE_HOME/flux (or ~/.cache/flux)/tiny-qwen2-v<recipe>,
    with a `-<task>` suffix for the one warm-started on another built-in task than sort."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flux"
    return base / (f"tiny-qwen2-v{RECIPE_VERSION}" + ("" if task == "sort" else f"-{task}"))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable-character table (the ByteLevel alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer():
    """A character-level `PreTrainedTokenizerFast` (digits, lowercase, a little punctuation) with a chat template.

    It is a byte-level BPE with no merges: every character is one token. Byte-level (rather than a
    plain char split) because transformers 5 loads a `qwen2` checkpoint's tokenizer as `Qwen2Tokenizer`,
    which rebuilds a byte-level pipeline from the vocabulary; this way both load identically.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    to_unicode = _bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + [to_unicode[ord(c)] for c in CHARS])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="?"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(vocab_size: int, seed: int = 0, max_positions: int = 64):
    """A randomly initialised tiny `Qwen2ForCausalLM` (about 0.3M parameters). (`max_positions` is a
    RoPE setting, not a weight: the same seed gives the same weights for any value.)"""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    # Embedding rows padded to a multiple of 64: transformers 5 loads the tokenizer as Qwen2Tokenizer,
    # which appends its own `<|endoftext|>` after our vocabulary; that id must still be a valid row.
    cfg = Qwen2Config(vocab_size=-(-(vocab_size + 1) // 64) * 64, tie_word_embeddings=True, bos_token_id=1, eos_token_id=1,
                      pad_token_id=0, **{**MODEL_SHAPE, "max_position_embeddings": max_positions})
    return Qwen2ForCausalLM(cfg)


def ensure_default_model(path: str | Path | None = None, seed: int = 0, task: str = "sort") -> Path:
    """Build (once) and return the directory of the embedded default model, warm-started on `task`.

    Safe against concurrent callers: the model is written to a temporary directory and renamed.
    """
    from flux.integrations.builtin.tasks import WARM, warm_start

    target = Path(path) if path else default_model_dir(task)
    if (target / "flux_recipe.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    tok = build_tokenizer()
    model = build_model(len(tok), seed=seed, max_positions=WARM[task][1])
    warm_start(model, tok, seed=seed, task=task)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "flux_recipe.json").write_text(json.dumps({"recipe": RECIPE_VERSION, "seed": seed, "task": task}))
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished first; theirs is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(model_path: str, prompts: str = "") -> str:
    """`builtin:tiny` (or empty) → the embedded default's directory, warm-started on the run's built-in
    task (`prompts: builtin:repeat` → the repeat model; any other prompts → the sort model);
    `builtin:tiny:<task>` names the task; anything else is returned as is."""
    from flux.integrations.builtin.tasks import WARM

    if model_path in ("", "builtin:tiny"):
        task = prompts.removeprefix("builtin:").partition(":")[0] if prompts.startswith("builtin:") else ""
        task = task if task in WARM else "sort"
    elif model_path.startswith("builtin:tiny:"):
        task = model_path.removeprefix("builtin:tiny:")
        if task not in WARM:
            raise ValueError(f"model_path: {model_path}: no embedded model for that task (known: {', '.join(WARM)})")
    else:
        return model_path
    if not (default_model_dir(task) / "flux_recipe.json").exists():
        # Built in a child process: the launcher forks the actors, and a child of a process whose OpenMP
        # threads have run hangs in its first parallel region (GNU libgomp).
        code = f"from flux.integrations.builtin.tiny import ensure_default_model; ensure_default_model(task={task!r})"
        subprocess.run([sys.executable, "-c", code], check=True)
    return str(ensure_default_model(task=task))
