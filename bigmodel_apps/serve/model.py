"""What the server serves: a causal LM with its tokenizer and chat template, from a training run
directory (``bigmodel train``, task ``lm``) or a local HF model directory (GPT-2, Llama); or, by
``load_model``'s dispatch, one of ``encoders``' models (embeddings, classification, translation).

Prompts are tokenised as the project's own generation does: a run's prompt follows an EOS, as
its training documents do (``LMTask.encode_prompt``); an HF directory's with the tokenizer's
special tokens (Llama's BOS), as ``bigmodel generate`` and transformers do. Chat prompts are
rendered first and tokenised without added special tokens (the template writes them), as
``apply_chat_template(tokenize=True)`` does.

The chat template is ``tokenizer_config.json``'s ``chat_template`` rendered by jinja2 in a
sandbox with the globals and filters transformers gives it (``raise_exception``, ``tojson``,
``strftime_now``; ``trim_blocks`` / ``lstrip_blocks``), or, when the tokenizer has none,
``DEFAULT_CHAT_TEMPLATE`` (ChatML, transformers' former default), whose turns end at
``<|im_end|>``, a stop string of every chat request.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from bigmodel_apps.serve.encoders import (DEFAULT_MAX_BATCH, ClassifierModel, EmbeddingModel, TranslationModel,
                                          from_run, load_hf_encoder)

__all__ = ["DEFAULT_CHAT_TEMPLATE", "DEFAULT_CHAT_STOP", "QUANTIZE_CHOICES", "EncoderServed", "ServedModel",
           "load_model", "quantize_served", "render_chat"]

# ``bigmodel serve --quantize`` choices -> bits of ``bigmodel_jax.quant.quantize_tree``
QUANTIZE_CHOICES = {"int8": 8, "int4": 4}

# the models of the embeddings / classify / translate endpoints (``encoders``)
EncoderServed = EmbeddingModel | ClassifierModel | TranslationModel

# ChatML: each turn "<|im_start|>{role}\n{content}<|im_end|>\n", then the assistant's header.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DEFAULT_CHAT_STOP = "<|im_end|>"


@dataclasses.dataclass
class ServedModel:
    """A causal LM ready to serve: ``config`` (GPTConfig), JAX ``params``, ``encode(text,
    chat=False) -> ids``, ``decode(ids) -> text`` (special tokens skipped), the ids that end a
    sequence, the chat template (None: the default) and the special tokens it may use."""

    name: str
    config: Any
    params: Any
    encode: Callable[..., list[int]]
    decode: Callable[[Sequence[int]], str]
    eos_ids: tuple[int, ...]
    chat_template: str | None = None
    special_tokens: dict[str, str] = dataclasses.field(default_factory=dict)
    # None: float weights; else what ``quantize_served`` did: {"bits", "exclude"} (+ int4's
    # "group_size", "int8_keep")
    quantization: dict[str, Any] | None = None
    kind = "lm"  # what the model serves; the encoders' models say "embedding", "classification", "translation"
    endpoint = "/v1/completions"

    @property
    def chat_stop(self) -> list[str]:
        """Stop strings every chat request gets (the default template's end of turn)."""
        return [DEFAULT_CHAT_STOP] if self.chat_template is None else []


def _read_chat_template(tokenizer_dir: Path) -> tuple[str | None, dict[str, str]]:
    """``chat_template`` (a string, or transformers' list of named templates: "default") and
    the special-token strings of ``tokenizer_config.json``; (None, {}) without one."""
    path = tokenizer_dir / "tokenizer_config.json"
    if not path.is_file():
        return None, {}
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    template = cfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{path}: chat_template must be a string or a list of named templates")
    special = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        tok = cfg.get(name)
        if isinstance(tok, dict):  # an AddedToken written out
            tok = tok.get("content")
        if isinstance(tok, str):
            special[name] = tok
    return template, special


@functools.lru_cache(maxsize=8)
def _chat_template(template: str) -> Any:
    """``template`` compiled once in the sandbox transformers renders chat templates in (a
    server renders the same template for every chat request)."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(template: str | None, messages: list[dict[str, Any]], special_tokens: dict[str, str]) -> str:
    """The prompt text of ``messages`` under ``template`` (None: ``DEFAULT_CHAT_TEMPLATE``),
    ending with the assistant's header (``add_generation_prompt=True``). A template that calls
    ``raise_exception`` (e.g. roles out of order) raises ValueError with its message."""
    from jinja2 import TemplateError

    try:
        return _chat_template(DEFAULT_CHAT_TEMPLATE if template is None else template).render(
            messages=messages, add_generation_prompt=True, **special_tokens)
    except TemplateError as err:
        raise ValueError(f"the chat template refused the messages: {err}") from None


def load_model(src: str | Path, *, checkpoint: str | None = None, name: str | None = None,
               max_batch: int = DEFAULT_MAX_BATCH, quantize: int | None = None) -> ServedModel | EncoderServed:
    """The model in ``src``: a run directory (config.json + checkpoints/) or an HF directory
    (config.json + weights). A causal LM (task ``lm``; GPT-2, Llama) is a ``ServedModel``; a
    classification or translation run, or an HF BERT directory, one of ``encoders``' models
    (``max_batch``: their rows per forward). ``quantize`` (8 or 4 bits): the causal LM's weights
    quantised at load (``quantize_served``). ValueError for anything else."""
    path = Path(src)
    if path.is_file() and path.suffix in (".safetensors", ".npz"):
        # a native checkpoint (quantised by ``save_quantized`` or not) carries no tokenizer, and
        # a server needs one: serve the run / HF directory it came from, quantised at load
        raise ValueError(f"{path} is a native weight file without a tokenizer; serve the run or HF directory "
                         "it came from, with --quantize int8 / int4 to quantise it at load")
    if not path.is_dir():
        raise FileNotFoundError(2, "no such model directory", str(path))
    name = name or path.resolve().name
    if quantize is not None:
        model = load_model(path, checkpoint=checkpoint, name=name, max_batch=max_batch)
        return quantize_served(model, quantize)
    if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        return _load_run(path, checkpoint, name, max_batch)
    if checkpoint is not None:
        raise ValueError(f"--checkpoint applies to run directories; {path} has no checkpoints/")
    if (path / "config.json").is_file():
        encoder = load_hf_encoder(path, name, max_batch=max_batch)
        return encoder if encoder is not None else _load_hf(path, name)
    raise ValueError(f"{path} is neither a run directory (config.json + checkpoints/) nor an HF model "
                     "directory (config.json + weights)")


def quantize_served(model: ServedModel | EncoderServed, bits: int) -> ServedModel:
    """``model`` (a causal LM) with its weights quantised to ``bits`` (8: int8 per output
    channel; 4: int4 groups, the LM head / tied embedding kept int8) by
    ``bigmodel_jax.quant.quantize_tree`` with its default exclusions (norms stay float); the
    engine decodes on the quantised tree (its decoding layout takes ``QuantizedWeight``
    leaves). ``model.quantization`` records what was done. ValueError for another kind of
    model (the embeddings / classify / translate endpoints serve float weights only) or bits."""
    from bigmodel_jax.quant import quantize_tree
    from reference_numpy.quant import BITS, DEFAULT_EXCLUDE, DEFAULT_INT8_KEEP

    if bits not in BITS:
        raise ValueError(f"quantize must be one of {BITS} bits, got {bits!r}")
    if not isinstance(model, ServedModel):
        raise ValueError(f"--quantize serves causal LMs only; this is a {model.kind} model ({model.endpoint}), "
                         "served with float weights: drop --quantize")
    record: dict[str, Any] = {"bits": bits, "exclude": list(DEFAULT_EXCLUDE)}
    if bits == 4:
        record.update(group_size="128 where it divides the contraction, else its largest divisor <= 128",
                      int8_keep=list(DEFAULT_INT8_KEEP))
    return dataclasses.replace(model, params=quantize_tree(model.params, bits), quantization=record)


def _load_run(path: Path, checkpoint: str | None, name: str, max_batch: int) -> ServedModel | EncoderServed:
    from bigmodel_jax.tree import to_jax
    from bigmodel_train.tasks import LMTask
    from bigmodel_train.trainer import load_run

    cfg, task, params, _ = load_run(path, checkpoint)
    if not isinstance(task, LMTask):
        return from_run(path, task, params, name, max_batch=max_batch)  # ValueError for a task not served
    tok = task.tokenizer

    def encode(text: str, chat: bool = False) -> list[int]:
        return [int(i) for i in task.encode_prompt(text)[0]]

    def decode(ids: Sequence[int]) -> str:
        return tok.decode(list(ids), skip_special_tokens=True)

    template, special = _read_chat_template(path / "tokenizer")
    return ServedModel(name, task.model_config, to_jax(params), encode, decode, (task.eos_id,), template, special)


def _load_hf(path: Path, name: str) -> ServedModel:
    from bigmodel_port.hub import jax as hub
    from bigmodel_port.tokenization import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = hub.AutoModelForCausalLM.from_pretrained(path)

    def encode(text: str, chat: bool = False) -> list[int]:
        ids = tok(text, add_special_tokens=not chat)["input_ids"]
        return [int(i) for i in ids]

    def decode(ids: Sequence[int]) -> str:
        return tok.decode(list(ids), skip_special_tokens=True)

    eos = () if tok.eos_token_id is None else (int(tok.eos_token_id),)
    template, special = _read_chat_template(path)
    return ServedModel(name, model.config, model.params, encode, decode, eos, template, special)
