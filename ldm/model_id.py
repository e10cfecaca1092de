"""What a weight file is: the one answer to "which model, config and command does this checkpoint need".

:func:`identify` reads only key names, shapes and the safetensors ``__metadata__``; it checks the rules of
:data:`RULES` in order (data, not code: each :class:`Rule` names a kind and the checks that must all hold) and the
first rule that holds decides. What each kind means (its name, defaults family, bundled config, prediction, role
and command) is the table :data:`KINDS`. Signals (reference manifests in ``tests/data/manifests``; the SD 2
variants from the Stability-AI/stablediffusion configs, as in ``shared/reference/sd2-inpaint-depth-upscale.md``
section 5):

* SDXL: ``conditioner.embedders.*``; the base has a CLIP ViT-L embedder ``conditioner.embedders.0.transformer.*``;
* the Karlo prior: ``model.prd_emb`` and the fused attention ``model.transformer.resblocks.0.attn.c_qkv.weight``;
* the UNet's input channels ``model.diffusion_model.input_blocks.0.0.weight[1]``: 7 with a class embedding
  ``label_emb.weight`` (x4 upscaler), 5 with ``depth_model.*`` (SD 2 depth), 9 (inpainting: SD 2 with the OpenCLIP
  text encoder ``cond_stage_model.model.*``, SD 1 with CLIP ``cond_stage_model.transformer.*``);
* Stable unCLIP: ``embedder.*`` / ``noise_augmentor.*`` (or an ADM input next to OpenCLIP); -L vs -H from the ADM
  width (1536 / 2048), else the image tower's projection (768 / 1024), else whether the CLIP text half is kept;
* SD 2.x, whose 512 epsilon and 768 v files have identical keys: the metadata ``modelspec.prediction_type``, else
  ComfyUI's rule (``supported_models.SD20.model_type``): the population std of :data:`V_STATISTIC_KEY` is above
  0.09 for v-prediction. :func:`identify` takes that number as ``v_std``; :func:`identify_file` measures it.
* SD 1.x: ``cond_stage_model.transformer.*``; the bundled demo model is the SD 1 layout at 32 UNet / 64 text channels;
* LoRA, textual-inversion and VAE files are recognised too (kinds "lora", "embedding", "vae"), so a file given to
  the wrong flag gets the right advice.

A file no rule matches gives an :class:`Identity` whose ``kind`` is None (``reasons`` says what was looked for);
:func:`check_command` turns that, and any checkpoint given to the wrong command, into one SdgenError line.
This module imports nothing from ``ldm.models`` (it decides before any model exists).
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from ldm.errors import SdgenError

PathLike = str | os.PathLike
Shape = Optional[tuple[int, ...]]

V_STATISTIC_KEY = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_STATISTIC_THRESHOLD = 0.09  # ComfyUI supported_models.SD20.model_type
PREDICTION_KEY = "modelspec.prediction_type"
#: keys only the Karlo prior has (its learned prediction token and the fused q/k/v of its transformer)
KARLO_KEYS = ("model.prd_emb", "model.transformer.resblocks.0.attn.c_qkv.weight")
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
ADM_KEY = "model.diffusion_model.label_emb.0.0.weight"


@dataclass(frozen=True)
class KindInfo:
    """What a kind of file is: a human name (with its article, for messages), the defaults family, the bundled
    config (relative to the repository root), the prediction ("eps", "v"; "x0" for the prior), the role in a run
    and the sdgen command that runs it (None for adapters, with ``hint`` saying where they go)."""

    name: str
    article: str
    family: Optional[str]
    config: Optional[str]
    prediction: Optional[str]
    role: str
    command: Optional[str]
    hint: str = ""


def _ckpt(name: str, family: str, config: str, prediction: str, command: str, role: str = "model",
          article: str = "an") -> KindInfo:
    return KindInfo(name, article, family, config, prediction, role, command, f"run it with sdgen {command}")


SD = "configs/stable-diffusion/"
KINDS: dict[str, KindInfo] = {
    "sd1": _ckpt("SD 1.x", "sd", SD + "v1-inference.yaml", "eps", "txt2img"),
    "sd1-inpaint": _ckpt("SD 1.x inpainting", "inpaint", SD + "v1-inpainting-inference.yaml", "eps", "inpaint"),
    "sd2": _ckpt("SD 2.x 512 (epsilon)", "sd", SD + "v2-inference.yaml", "eps", "txt2img"),
    "sd2-v": _ckpt("SD 2.x 768-v (v-prediction)", "sd", SD + "v2-inference-v.yaml", "v", "txt2img"),
    "sd2-inpaint": _ckpt("SD 2 inpainting", "inpaint", SD + "v2-inpainting-inference.yaml", "eps", "inpaint"),
    "sd2-depth": _ckpt("SD 2 depth", "depth", SD + "v2-midas-inference.yaml", "eps", "depth2img"),
    "x4-upscaler": _ckpt("SD 2 x4 upscaler", "upscale", SD + "x4-upscaling.yaml", "v", "upscale"),
    "unclip-l": _ckpt("SD 2.1 unCLIP-L", "unclip", SD + "v2-1-stable-unclip-l-inference.yaml", "v", "txt2img"),
    "unclip-h": _ckpt("SD 2.1 unCLIP-H", "unclip", SD + "v2-1-stable-unclip-h-inference.yaml", "v", "txt2img"),
    "sdxl-base": _ckpt("SDXL base", "sdxl", "configs/sdxl/sd_xl_base.yaml", "eps", "txt2img", "base"),
    "sdxl-refiner": _ckpt("SDXL refiner", "sdxl", "configs/sdxl/sd_xl_refiner.yaml", "eps", "sdxl-refine",
                          "refiner"),
    # Karlo's prior predicts the clean embedding (configs/karlo/prior_1B_vit_l.yaml: predict_xstart: true)
    "karlo-prior": _ckpt("Karlo prior", "prior", "configs/karlo/prior_1B_vit_l.yaml", "x0", "txt2img --prior",
                         "prior", "a"),
    "demo": _ckpt("bundled demo model", "sd", "configs/demo/shapes-ldm.yaml", "eps", "txt2img", article="the"),
    "lora": KindInfo("LoRA", "a", None, None, None, "adapter", None, "pass it with --lora"),
    "embedding": KindInfo("textual-inversion embedding", "a", None, None, None, "adapter", None,
                          "pass it with --embedding"),
    "vae": KindInfo("VAE", "a", None, None, None, "adapter", None, "pass it with --vae"),
}


@dataclass(frozen=True)
class Identity:
    """What :func:`identify` found. ``kind`` is None when no rule matched (then every field below it but
    ``reasons`` is None too); ``reasons`` are short texts naming the keys, shapes or metadata that decided;
    ``source`` is the file's name when the identity came from a file (:func:`identify_file`)."""

    kind: Optional[str]
    family: Optional[str]
    config: Optional[str]
    prediction: Optional[str]
    role: Optional[str]
    command: Optional[str]
    name: str
    reasons: tuple[str, ...]
    source: str = ""

    @property
    def known(self) -> bool:
        return self.kind is not None

    @property
    def is_checkpoint(self) -> bool:
        """A model checkpoint (not unknown, not a LoRA / embedding / VAE)."""
        return self.kind is not None and KINDS[self.kind].command is not None

    def describe(self) -> str:
        """The kind with its article ("an SD 2 inpainting checkpoint"), for messages."""
        if self.kind is None:
            return "not a file sdgen recognises"
        info = KINDS[self.kind]
        return f"{info.article} {info.name} {'checkpoint' if self.is_checkpoint else 'file'}"


# ----------------------------------------------------------------------------- the checks a rule is made of


@dataclass(frozen=True)
class Facts:
    """What the rules look at: ``{key: shape or None}``, the metadata strings, and the SD 2 v statistic."""

    shapes: Mapping[str, Shape]
    metadata: Mapping[str, str]
    v_std: Optional[float] = None


def _short(key: str) -> str:
    return key.removeprefix("model.diffusion_model.")


@dataclass(frozen=True)
class Prefix:
    """Some key starts with ``prefix`` (``absent``: no key does)."""

    prefix: str
    what: str
    absent: bool = False

    def test(self, facts: Facts) -> Optional[str]:
        if any(k.startswith(self.prefix) for k in facts.shapes) == self.absent:
            return None
        return f"{'no ' if self.absent else ''}{self.prefix}* ({self.what})"


@dataclass(frozen=True)
class Key:
    """``key`` is present."""

    key: str
    what: str

    def test(self, facts: Facts) -> Optional[str]:
        return f"{_short(self.key)} ({self.what})" if self.key in facts.shapes else None


@dataclass(frozen=True)
class Dim:
    """``key`` has a known shape whose dimension ``index`` is ``value`` (``unknown_ok``: or its shape is unknown,
    as for keys-only input and 1-element test tensors)."""

    key: str
    index: int
    value: int
    what: str
    unknown_ok: bool = False

    def test(self, facts: Facts) -> Optional[str]:
        shape = facts.shapes.get(self.key)
        if shape is None or len(shape) < 2:  # absent, keys only, or a 1-element test tensor
            return "" if self.unknown_ok else None
        if len(shape) <= self.index or shape[self.index] != self.value:
            return None
        return f"{_short(self.key)} {list(shape)} ({self.what})"


@dataclass(frozen=True)
class Meta:
    """The metadata ``key`` is one of ``values`` (compared lower-cased)."""

    key: str
    values: tuple[str, ...]

    def test(self, facts: Facts) -> Optional[str]:
        value = str(facts.metadata.get(self.key, "")).strip().lower()
        return f"the file's metadata says {self.key}={value}" if value in self.values else None


@dataclass(frozen=True)
class VStd:
    """ComfyUI's SD 2 rule: the std of :data:`V_STATISTIC_KEY` above (``above``) or at most the threshold."""

    above: bool

    def test(self, facts: Facts) -> Optional[str]:
        std = facts.v_std
        if std is None or (std > V_STATISTIC_THRESHOLD) != self.above:
            return None
        sign = ">" if self.above else "<="
        return (f"std of output_blocks.11.1.transformer_blocks.0.norm1.bias = {std:.3f} {sign} "
                f"{V_STATISTIC_THRESHOLD} (ComfyUI's rule)")


@dataclass(frozen=True)
class Pattern:
    """Some key matches the regular expression ``regex``."""

    regex: str
    what: str

    def test(self, facts: Facts) -> Optional[str]:
        hit = next((k for k in facts.shapes if re.search(self.regex, k)), None)
        return f"{hit} ({self.what})" if hit is not None else None


@dataclass(frozen=True)
class Only:
    """Every key starts with one of ``prefixes``."""

    prefixes: tuple[str, ...]
    what: str

    def test(self, facts: Facts) -> Optional[str]:
        ok = bool(facts.shapes) and all(k.startswith(self.prefixes) for k in facts.shapes)
        return f"only {self.what} keys" if ok else None


@dataclass(frozen=True)
class Note:
    """Always holds; says ``text`` (the reason of a fallback rule)."""

    text: str

    def test(self, facts: Facts) -> Optional[str]:
        return self.text


@dataclass(frozen=True)
class AnyOf:
    """The first of ``checks`` that holds."""

    checks: tuple[Any, ...]

    def test(self, facts: Facts) -> Optional[str]:
        return next((r for r in (c.test(facts) for c in self.checks) if r is not None), None)


@dataclass(frozen=True)
class AllOf:
    """Every one of ``checks`` holds (their reasons joined)."""

    checks: tuple[Any, ...]

    def test(self, facts: Facts) -> Optional[str]:
        found = [c.test(facts) for c in self.checks]
        return None if any(r is None for r in found) else " + ".join(r for r in found if r)


@dataclass(frozen=True)
class Rule:
    """``kind`` when every check of ``checks`` holds."""

    kind: str
    checks: tuple[Any, ...]


# ----------------------------------------------------------------------------- the table

OPENCLIP = Prefix("cond_stage_model.model.", "OpenCLIP ViT-H text encoder: SD 2")
CLIP_L = Prefix("cond_stage_model.transformer.", "CLIP text encoder: the SD 1 layout")
PLAIN_UNET = Dim(UNET_IN, 1, 4, "4 latent input channels", unknown_ok=True)
UNCLIP = AnyOf((Prefix("embedder.", "CLIP image embedder"), Prefix("noise_augmentor.", "embedding noise augmentor"),
                AllOf((Key(ADM_KEY, "ADM input"), OPENCLIP))))
SD2_DEFAULT = "SD 2.x keys; no way to tell epsilon from v, so the 768-v config (pass --config otherwise)"
LORA_KEYS = r"\.(lora_down|lora_up|lora_A|lora_B)(\.default)?\.weight$|[._]lora\.(down|up)\.weight$|_lora\.(down|up)\."
VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "first_stage_model.")

RULES: tuple[Rule, ...] = (
    Rule("sdxl-base", (Prefix("conditioner.embedders.0.transformer.", "SDXL CLIP ViT-L embedder: the base"),)),
    Rule("sdxl-refiner", (Prefix("conditioner.embedders.", "SDXL conditioner"),
                          Prefix("conditioner.embedders.0.transformer.", "no CLIP ViT-L embedder: the refiner",
                                 absent=True))),
    Rule("karlo-prior", tuple(Key(k, "Karlo prior transformer") for k in KARLO_KEYS)),
    Rule("x4-upscaler", (Dim(UNET_IN, 1, 7, "4 latent + 3 image channels", unknown_ok=True),
                         Key("model.diffusion_model.label_emb.weight", "noise-level class embedding"))),
    Rule("sd2-depth", (Dim(UNET_IN, 1, 5, "4 latent + 1 depth channel", unknown_ok=True),
                       Prefix("depth_model.", "MiDaS"))),
    Rule("sd2-inpaint", (Dim(UNET_IN, 1, 9, "4 latent + 1 mask + 4 masked-image channels"), OPENCLIP)),
    Rule("sd1-inpaint", (Dim(UNET_IN, 1, 9, "4 latent + 1 mask + 4 masked-image channels"), CLIP_L)),
    Rule("unclip-h", (UNCLIP, Dim(ADM_KEY, 1, 2048, "ADM width 2048: -H"))),
    Rule("unclip-l", (UNCLIP, Dim(ADM_KEY, 1, 1536, "ADM width 1536: -L"))),
    Rule("unclip-h", (UNCLIP, Dim("embedder.model.visual.proj", 1, 1024, "1024-d image embedding: -H"))),
    Rule("unclip-l", (UNCLIP, Dim("embedder.model.visual.proj", 1, 768, "768-d image embedding: -L"))),
    # OpenAI CLIP (-L) keeps its text transformer; open_clip (-H) deletes it
    Rule("unclip-l", (UNCLIP, Prefix("embedder.model.transformer.", "OpenAI CLIP text half: -L"))),
    Rule("unclip-h", (UNCLIP, Note("no embedder.model.transformer.* (open_clip drops it): -H"))),
    Rule("sd2", (OPENCLIP, PLAIN_UNET, Meta(PREDICTION_KEY, ("epsilon", "eps")))),
    Rule("sd2-v", (OPENCLIP, PLAIN_UNET, Meta(PREDICTION_KEY, ("v",)))),
    Rule("sd2-v", (OPENCLIP, PLAIN_UNET, VStd(above=True))),
    Rule("sd2", (OPENCLIP, PLAIN_UNET, VStd(above=False))),
    Rule("sd2-v", (OPENCLIP, PLAIN_UNET, Note(SD2_DEFAULT))),
    Rule("demo", (CLIP_L, Dim(UNET_IN, 0, 32, "32 UNet channels"),
                  Dim("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", 1, 64,
                      "64-wide text encoder"))),
    Rule("sd1", (CLIP_L, PLAIN_UNET)),
    Rule("lora", (Pattern(LORA_KEYS, "low-rank layer"),)),
    Rule("embedding", (AnyOf((Prefix("string_to_param", "A1111 embedding"), Key("emb_params", "A1111 embedding"),
                              Key("clip_l", "SDXL embedding"), Key("clip_g", "SDXL embedding"))),)),
    Rule("vae", (Only(VAE_PREFIXES, "autoencoder"), AnyOf((Prefix("encoder.", "VAE"), Prefix("decoder.", "VAE"),
                                                            Prefix("first_stage_model.", "VAE"))))),
)
LOOKED_FOR = ("no rule matches: none of conditioner.embedders.*, cond_stage_model.*, embedder.*, model.prd_emb, "
              "LoRA, embedding or VAE keys")
SD2_KINDS = ("sd2", "sd2-v")


def _shape(value: Any) -> Shape:
    if hasattr(value, "shape"):
        return tuple(int(v) for v in value.shape)
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return None


def identify(shapes: Mapping[str, Any] | Iterable[str], metadata: Optional[Mapping[str, Any]] = None, *,
             v_std: Optional[float] = None) -> Identity:
    """What a weight file is, from ``{key: shape}`` (shapes as tuples, lists or tensors; or just the keys),
    the safetensors ``__metadata__`` (or None) and, for SD 2.x without a metadata answer, the v statistic
    (:func:`v_statistic`). The first rule of :data:`RULES` that holds decides; no match gives kind None."""
    table = dict(shapes) if isinstance(shapes, Mapping) else {k: None for k in shapes}
    facts = Facts({str(k): _shape(v) for k, v in table.items()},
                  {str(k): str(v) for k, v in (metadata or {}).items()}, v_std)
    for rule in RULES:
        found = [check.test(facts) for check in rule.checks]
        if all(r is not None for r in found):
            info = KINDS[rule.kind]
            return Identity(rule.kind, info.family, info.config, info.prediction, info.role, info.command,
                            info.name, tuple(r for r in found if r))
    return Identity(None, None, None, None, None, None, "unknown", (LOOKED_FOR,))


# ----------------------------------------------------------------------------- commands

#: The kinds each command takes (an ordinary SD checkpoint inpaints by blending the known region).
ACCEPTS: dict[str, tuple[str, ...]] = {
    "txt2img": ("sd1", "sd2", "sd2-v", "demo", "unclip-l", "unclip-h", "sdxl-base"),
    "safe-txt2img": ("sd1", "sd2", "sd2-v", "demo", "unclip-l", "unclip-h", "sdxl-base"),
    "img2img": ("sd1", "sd2", "sd2-v", "demo", "sdxl-base", "sdxl-refiner"),
    "unclip-variate": ("unclip-l", "unclip-h"),
    "sdxl-refine": ("sdxl-base", "sdxl-refiner"),
    "inpaint": ("sd1-inpaint", "sd2-inpaint", "sd1", "sd2", "sd2-v", "demo"),
    "depth2img": ("sd2-depth",),
    "upscale": ("x4-upscaler",),
}


def check_command(identity: Identity, command: str, file: Optional[PathLike] = None) -> None:
    """Refuse a file given to a command that cannot run it (one SdgenError line naming what it needs), e.g.
    ``sdgen txt2img: 512-inpainting-ema.ckpt is an SD 2 inpainting checkpoint; run it with sdgen inpaint``.

    Args:
        identity: from :func:`identify` / :func:`identify_file`.
        command: an sdgen command name (a key of :data:`ACCEPTS`; anything else is a programming error).
        file: the file's name for the message (default: ``identity.source``).
    """
    if command not in ACCEPTS:
        raise ValueError(f"check_command: unknown command {command!r}")
    if identity.kind in ACCEPTS[command]:
        return
    name = Path(file).name if file is not None else (identity.source or "the checkpoint")
    if identity.kind is None:
        raise SdgenError(f"sdgen {command}: cannot tell which model {name} is from its keys: pass --config")
    info = KINDS[identity.kind]
    raise SdgenError(f"sdgen {command}: {name} is {identity.describe()}; {info.hint}")


# ----------------------------------------------------------------------------- files


@dataclass(frozen=True)
class Header:
    """A weight file's table of contents: ``{key: shape}``, ``{key: dtype name}`` ("float16", ...), the
    safetensors metadata (empty for pickles) and, for pickles holding it, the SD 2 v statistic."""

    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, str]
    metadata: Mapping[str, str]
    v_std: Optional[float] = None

    @property
    def parameters(self) -> int:
        """Number of tensor elements in the file (buffers included)."""
        return sum(math.prod(shape) for shape in self.shapes.values())


SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _file_key(path: PathLike, what: str) -> tuple[str, int, int]:
    from ldm.files import require_file

    p = require_file(path, what).resolve()
    st = p.stat()
    return str(p), st.st_size, st.st_mtime_ns


def read_header(path: PathLike, what: str = "checkpoint") -> Header:
    """The :class:`Header` of a .safetensors file (its JSON header only) or a pickle checkpoint (loaded through
    ``ldm.checkpoint_reader``'s allow-list, memory-mapped), cached by (path, size, mtime): once per run."""
    return _read_header(*_file_key(path, what), what)


@functools.lru_cache(maxsize=8)
def _read_header(path: str, size: int, mtime_ns: int, what: str) -> Header:
    from ldm.checkpoint_reader import is_safetensors, read_pickle_checkpoint, safetensors_header

    if is_safetensors(path):
        header = safetensors_header(path, what)
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        return Header({k: tuple(int(d) for d in v["shape"]) for k, v in entries.items()},
                      {k: SAFETENSORS_DTYPES.get(str(v["dtype"]), str(v["dtype"]).lower()) for k, v in entries.items()},
                      {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()})
    obj = read_pickle_checkpoint(path, what)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # Lightning's wrapper
    if not isinstance(obj, Mapping):
        raise SdgenError(f"the {what} {path} holds a {type(obj).__name__}, not a state_dict")
    tensors = {}
    for key, value in obj.items():  # one nested level too: A1111 embeddings keep string_to_param: {"*": tensor}
        inner = value.items() if isinstance(value, Mapping) else [(None, value)]
        tensors.update({f"{key}.{k}" if k is not None else str(key): v for k, v in inner if hasattr(v, "dtype")})
    if not tensors:
        raise SdgenError(f"the {what} {path} holds no tensors")
    std = tensors.get(V_STATISTIC_KEY)
    return Header({k: tuple(v.shape) for k, v in tensors.items()},
                  {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()}, {},
                  float(std.float().std(unbiased=False)) if std is not None else None)


def v_statistic(path: PathLike) -> Optional[float]:
    """The population std of :data:`V_STATISTIC_KEY` in a checkpoint (None when it lacks the tensor); a
    safetensors file reads that one tensor only."""
    from ldm.checkpoint_reader import is_safetensors

    if not is_safetensors(path):
        return read_header(path).v_std
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        if V_STATISTIC_KEY not in handle.keys():
            return None
        return float(handle.get_tensor(V_STATISTIC_KEY).float().std(unbiased=False))


def identify_file(path: PathLike, what: str = "checkpoint") -> Identity:
    """:func:`identify` of a file's header; SD 2.x whose metadata is silent on the prediction is settled by
    :func:`v_statistic`. Cached by (resolved path, size, mtime): a run reads each header once.

    Raises:
        SdgenError: missing, empty, truncated or unreadable file (one line, naming it as ``what``).
    """
    return _identify_file(*_file_key(path, what), what)


@functools.lru_cache(maxsize=16)
def _identify_file(path: str, size: int, mtime_ns: int, what: str) -> Identity:
    header = _read_header(path, size, mtime_ns, what)
    identity = identify(header.shapes, header.metadata)
    told = str(header.metadata.get(PREDICTION_KEY, "")).strip().lower() in ("v", "epsilon", "eps")
    if identity.kind in SD2_KINDS and not told:
        std = header.v_std if header.v_std is not None else v_statistic(path)
        if std is not None:
            identity = identify(header.shapes, header.metadata, v_std=std)
    return replace(identity, source=Path(path).name)


__all__ = ["ACCEPTS", "Header", "Identity", "KINDS", "KindInfo", "RULES", "Rule", "V_STATISTIC_KEY",
           "V_STATISTIC_THRESHOLD", "check_command", "identify", "identify_file", "read_header", "v_statistic"]
