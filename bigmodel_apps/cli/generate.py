"""``bigmodel generate``: continue prompts / translate with a trained run or an HF model directory."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel_port.tokenization import AutoTokenizer
from bigmodel_apps.cli.parsing import nonnegative_float, nonnegative_int, positive_int
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
    p.add_argument("--prompt", action="append", help="prompt / source sentence (repeatable; default 'def ')")
    p.add_argument("--max-new-tokens", type=positive_int, default=48,
                   help="tokens to generate, >= 1; prompt + these must fit the model's max_len (default 48)")
    p.add_argument("--temperature", type=nonnegative_float,
                   help="sampling temperature, finite and >= 0; 0 = greedy (default: 0.8 for a causal LM with "
                        "--backend jax; greedy with --backend numpy, which has no sampler)")
    p.add_argument("--top-k", type=nonnegative_int,
                   help="when sampling, draw from the k most likely tokens; 0 = all (default 40)")
    p.add_argument("--num-beams", type=positive_int, default=1, help="beam search width, >= 1 (default 1: greedy "
                   "or sampling)")
    p.add_argument("--seed", type=int, help="sampling seed (default: the run's seed, or 0)")
    p.add_argument("--checkpoint", metavar="PATH", help="a checkpoint file of the run (default: the latest)")
    p.add_argument("--backend", choices=["jax", "numpy"], default="jax", help="implementation to run")
    p.set_defaults(func=_cmd_generate)


class OptionError(ValueError):
    """Options that contradict each other or the model (printed as ``error: …``, exit 2)."""


def _lm_options(args: argparse.Namespace) -> dict[str, Any]:
    """Decoding options of a causal LM; an option the chosen mode would not use is refused."""
    if args.num_beams > 1:
        if args.temperature:
            raise OptionError("beam search is deterministic: drop --temperature (or pass 0), or use --num-beams 1")
        if args.top_k is not None or args.seed is not None:
            raise OptionError("--top-k and --seed apply to sampling, not to beam search (--num-beams > 1)")
        return {"num_beams": args.num_beams, "temperature": 0.0}
    if args.backend == "numpy" and args.temperature:
        raise OptionError("the NumPy reference decodes greedily or with beam search: pass --temperature 0 or "
                          "--num-beams N, or sample with --backend jax")
    temperature = args.temperature if args.temperature is not None else (0.8 if args.backend == "jax" else 0.0)
    if temperature == 0 and (args.top_k is not None or args.seed is not None):
        raise OptionError("--top-k and --seed apply to sampling; greedy decoding (temperature 0) uses neither")
    return {"num_beams": 1, "temperature": temperature, "top_k": 40 if args.top_k is None else args.top_k or None,
            "seed": args.seed}


def _translation_options(args: argparse.Namespace) -> None:
    """Translation decodes greedily or with beams: sampling options are refused, not dropped."""
    given = [flag for flag, value in (("--temperature", args.temperature), ("--top-k", args.top_k),
                                      ("--seed", args.seed)) if value is not None]
    if given:
        raise OptionError(f"{', '.join(given)}: translation decodes greedily or with beam search (--num-beams), "
                          "it does not sample")


def _cmd_generate(args: argparse.Namespace) -> int:
    path = Path(args.model)
    prompts = args.prompt or ["def "]
    if not path.is_dir():
        raise FileNotFoundError(2, "no such model directory", str(path))
    if (path / "config.json").exists() and (path / "checkpoints").is_dir():
        cfg, task, params, _ = load_run(path, args.checkpoint)
        if not isinstance(task, (LMTask, TranslationTask)):
            raise OptionError(f"{path} is a {cfg.task!r} run, which does not generate text")
        if isinstance(task, LMTask):
            options = _lm_options(args)
        else:
            _translation_options(args)
        if args.backend == "jax":
            from bigmodel_jax.tree import to_jax  # jax loads only for --backend jax

            params = to_jax(params)
        if isinstance(task, LMTask):
            seed = options.pop("seed")
            for i, prompt in enumerate(prompts):
                text = task.sample(params, args.backend, prompt=prompt, max_new_tokens=args.max_new_tokens,
                                   seed=None if seed is None else seed + i, **options)
                print(text)
                print("-" * 40)
        else:
            for src, hyp in zip(prompts, task.translate(params, prompts, args.backend, num_beams=args.num_beams,
                                                        max_new_tokens=args.max_new_tokens)):
                print(f"{src}  ->  {hyp}")
        return 0
    if args.checkpoint is not None:
        raise OptionError(f"--checkpoint applies to run directories; {path} has no checkpoints/")
    if (path / "config.json").exists():
        return _generate_hf(path, prompts, args)
    raise OptionError(f"{path} is neither a run directory (config.json + checkpoints/) nor an HF model "
                      "directory (config.json + weights)")


def _generate_hf(path: Path, prompts: list[str], args: argparse.Namespace) -> int:
    """Generate with an HF directory: AutoModelForCausalLM, or MarianMTModel for translation."""
    try:
        hf = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise OptionError(f"{path / 'config.json'} is not valid JSON: {err}") from None
    if not isinstance(hf, dict):
        raise OptionError(f"{path / 'config.json'}: expected a JSON object")
    seq2seq = hf.get("model_type") == "marian" or hf.get("is_encoder_decoder", False)
    options: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams}
    if seq2seq:
        _translation_options(args)
    else:
        lm = _lm_options(args)
        if lm["temperature"] > 0:
            options.update(do_sample=True, temperature=lm["temperature"], top_k=lm["top_k"],
                           seed=0 if lm["seed"] is None else lm["seed"])
    if args.backend == "jax":
        from bigmodel_port.hub import jax as hub  # jax loads only for --backend jax
    else:
        from bigmodel_port.hub import numpy as hub
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = (hub.MarianMTModel if seq2seq else hub.AutoModelForCausalLM).from_pretrained(path)
    for prompt in prompts:
        enc = tokenizer([prompt], return_tensors="np")
        ids = np.asarray(enc["input_ids"])
        out = np.asarray(model.generate(ids, attention_mask=enc.get("attention_mask"), **options))
        text = tokenizer.decode(out[0].tolist() if seq2seq else out[0, ids.shape[1]:].tolist(),
                                skip_special_tokens=True)
        print(text if seq2seq else prompt + text)
    return 0
