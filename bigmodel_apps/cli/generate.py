"""``bigmodel generate``: continue prompts / translate with a trained run or an HF model directory."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel_port.tokenization import AutoTokenizer
from bigmodel_train.tasks import LMTask, TranslationTask
from bigmodel_train.trainer import load_run


def add_commands(sub: argparse._SubParsersAction) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "generate", help="generate text with a trained run or an HF model directory", formatter_class=raw,
        description=textwrap.dedent(
            """\
            Continue prompts with a causal LM, or translate source sentences with an
            encoder-decoder. MODEL is a run directory of `bigmodel train` (task lm or
            translation), or a local HF directory loaded with AutoModelForCausalLM (GPT-2,
            Llama) or MarianMTModel, with its tokenizer. Nothing is downloaded.

            examples:
              bigmodel generate runs/gpt-stdlib --prompt "import os" --max-new-tokens 60
              bigmodel generate runs/seq2seq-numbers --prompt "three hundred and twelve"
              bigmodel generate ./gpt2 --prompt "Hello" --temperature 0"""),
    )
    p.add_argument("model", metavar="MODEL", help="run directory or HF model directory")
    p.add_argument("--prompt", action="append", help="prompt / source sentence (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate (default 48)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="sample from the k most likely tokens (default 40)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width for translation (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--checkpoint", metavar="PATH", help="a checkpoint file of the run (default: the latest)")
    p.add_argument("--backend", choices=["jax", "numpy"], default="jax", help="implementation to run")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    path = Path(args.model)
    prompts = args.prompt or ["def "]
    if (path / "config.json").exists() and (path / "checkpoints").is_dir():
        cfg, task, params, _ = load_run(path, args.checkpoint)
        if args.backend == "jax":
            from bigmodel_jax.tree import to_jax  # jax loads only for --backend jax

            params = to_jax(params)
        if isinstance(task, LMTask):
            for i, prompt in enumerate(prompts):
                text = task.sample(params, args.backend, prompt=prompt, max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, top_k=args.top_k, seed=args.seed + i)
                print(text)
                print("-" * 40)
        elif isinstance(task, TranslationTask):
            for src, hyp in zip(prompts, task.translate(params, prompts, args.backend, num_beams=args.num_beams)):
                print(f"{src}  ->  {hyp}")
        else:
            print(f"bigmodel generate: {path} is a {cfg.task!r} run, which does not generate text", file=sys.stderr)
            return 2
        return 0
    if (path / "config.json").exists():
        return _generate_hf(path, prompts, args)
    print(f"bigmodel generate: {path} is neither a run directory (config.json + checkpoints/) nor an HF model "
          f"directory (config.json + weights)", file=sys.stderr)
    return 2


def _generate_hf(path: Path, prompts: list[str], args: argparse.Namespace) -> int:
    """Generate with an HF directory: AutoModelForCausalLM, or MarianMTModel for translation."""
    hf = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if args.backend == "jax":
        from bigmodel_port.hub import jax as hub  # jax loads only for --backend jax
    else:
        from bigmodel_port.hub import numpy as hub
    tokenizer = AutoTokenizer.from_pretrained(path)
    seq2seq = hf.get("model_type") == "marian" or hf.get("is_encoder_decoder", False)
    model = (hub.MarianMTModel if seq2seq else hub.AutoModelForCausalLM).from_pretrained(path)
    options: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams}
    if args.temperature > 0 and not seq2seq:
        options.update(do_sample=True, temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    for prompt in prompts:
        enc = tokenizer([prompt], return_tensors="np")
        ids = np.asarray(enc["input_ids"])
        out = np.asarray(model.generate(ids, attention_mask=enc.get("attention_mask"), **options))
        text = tokenizer.decode(out[0].tolist() if seq2seq else out[0, ids.shape[1]:].tolist(),
                                skip_special_tokens=True)
        print(text if seq2seq else prompt + text)
    return 0
