"""Tasks: where prompts come from, how they are formatted, and how responses are scored.

A ``Task`` holds train / eval ``Example``s and a batch verifier
``score(responses, examples) -> (rewards f32[B], gradable bool[B])``. Built-ins:
  arith  the embedded multi-step arithmetic task (``espo_jax.data.arith``)
  countdown  Countdown with search traces (``espo_jax.data.countdown``)
  math   SimpleRL-style jsonl train file + MATH500-style eval file (``problem``/``answer``),
         scored with math-verify on the last ``\\boxed{}``.
Prompt formatting (``task.prompt_template``): the literal ``{prompt}`` in the template is
replaced by the example's prompt (other braces are kept, so ``\\boxed{}`` is safe); the
value ``"chat"`` wraps ``task.chat_user_template`` (same placeholder) in the tokenizer's
chat template with the generation prompt.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import pathlib
from typing import Callable, Sequence

import numpy as np

from espo_jax import data as data_lib
from espo_jax.data import Example


@dataclasses.dataclass
class Task:
    name: str
    train: list[Example]
    eval: list[Example]
    verify: Callable[[str, str], tuple[float, bool]]
    num_workers: int = 0

    def score(self, responses: Sequence[str], examples: Sequence[Example]):
        """(rewards f32[B], gradable bool[B]) of decoded responses against their examples."""
        golds = [e.answer for e in examples]
        if self.name == "math":
            from espo_jax.rewards import score_math_batch  # noqa: PLC0415
            r, g = score_math_batch(list(responses), golds, num_workers=self.num_workers)
        else:
            pairs = [self.verify(resp, gold) for resp, gold in zip(responses, golds)]
            r, g = [p[0] for p in pairs], [p[1] for p in pairs]
        return np.asarray(r, np.float32), np.asarray(g, bool)


def _take(examples: list[Example], n: int) -> list[Example]:
    return examples if n <= 0 else examples[:n]


# Embedded tasks generated from a seed: module with make_examples(split, n, seed) and verify.
GENERATED_TASKS = {"arith": "espo_jax.data.arith", "countdown": "espo_jax.data.countdown"}


def build_task(task_cfg, seed: int, *, eval_seed: int) -> Task:
    """The task named by ``task_cfg.name`` with its splits; errors name the key or file.
    seed: the training problems of generated tasks (and so the prompt order of a run);
    eval_seed: their eval problems, fixed across run seeds so every run scores the same set."""
    name = task_cfg.name
    if name in GENERATED_TASKS:
        mod = importlib.import_module(GENERATED_TASKS[name])
        train = mod.make_examples("train", int(task_cfg.num_train), seed)
        evals = mod.make_examples("eval", int(task_cfg.num_eval), eval_seed)
        verify = mod.verify
    elif name == "math":
        from espo_jax.rewards import score_math  # noqa: PLC0415
        for key in ("train_file", "eval_file"):
            if not task_cfg[key]:
                raise ValueError(f"task.{key} must name a jsonl file for task.name='math'")
        train = _take(data_lib.rows_to_examples(
            data_lib.load_jsonl(task_cfg.train_file, required=("problem", "answer")),
            id_prefix="train"), int(task_cfg.num_train))
        evals = _take(data_lib.rows_to_examples(
            data_lib.load_jsonl(task_cfg.eval_file, required=("problem", "answer")),
            id_prefix="eval"), int(task_cfg.num_eval))
        verify = score_math
    else:
        raise ValueError(f"task.name: unknown task {name!r}; expected 'arith', 'countdown' or 'math'")
    if not train:
        raise ValueError(f"task {name!r}: empty training set (task.num_train={task_cfg.num_train})")
    if not evals:
        raise ValueError(f"task {name!r}: empty eval set (task.num_eval={task_cfg.num_eval})")
    data_lib.check_disjoint(train, evals)
    return Task(name=name, train=train, eval=evals, verify=verify,
                num_workers=int(task_cfg.get("num_reward_workers", 0)))


def format_prompt(example: Example, task_cfg, tokenizer) -> str:
    template = task_cfg.prompt_template
    if template == "chat":
        user = task_cfg.chat_user_template.replace("{prompt}", example.prompt)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("task.prompt_template='chat' but the tokenizer has no chat template")
        return tokenizer.apply_chat_template([{"role": "user", "content": user}],
                                             add_generation_prompt=True, tokenize=False)
    if "{prompt}" not in template:
        raise ValueError(f"task.prompt_template must contain '{{prompt}}' or be 'chat', "
                         f"got {template!r}")
    return template.replace("{prompt}", example.prompt)


def encode_prompts(examples: Sequence[Example], task_cfg, tokenizer) -> list[list[int]]:
    """Token ids of each formatted prompt (no special tokens added beyond the template)."""
    texts = [format_prompt(e, task_cfg, tokenizer) for e in examples]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for e, row in zip(examples, ids):
        if not row:
            raise ValueError(f"example {e.id!r}: prompt encodes to zero tokens")
    return [list(r) for r in ids]


def decode_responses(tokens: np.ndarray, mask: np.ndarray, tokenizer) -> list[str]:
    """Text of each response: its masked tokens, special tokens (EOS) dropped."""
    lens = np.asarray(mask).sum(-1).astype(int)
    return tokenizer.batch_decode([list(t[:n]) for t, n in zip(np.asarray(tokens), lens)],
                                  skip_special_tokens=True)


def stop_token_ids(tokenizer, model_dir) -> list[int]:
    """Sorted union of the tokenizer's EOS and ``generation_config.json``'s ``eos_token_id``
    (an int or a list) in ``model_dir``: chat models end turns with a token (Qwen's
    ``<|im_end|>``) that is not the tokenizer's EOS. Used by rollouts and evaluation."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    path = pathlib.Path(model_dir) / "generation_config.json" if model_dir else None
    if path is not None and path.is_file():
        eos = json.loads(path.read_text()).get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(e) for e in eos)
    return sorted(ids)
