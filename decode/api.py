"""The one assembly and decode API: every entry point that decodes goes through these two functions.

    parts = build_components(cfg, device, methods=[config])        # target, tokenizer, text encoder,
                                                                    # drafter, skip policy: each only if asked
    method = make_method(parts, config, sampling, tree)            # the engine's Method
    method, choice = method_with_tree(parts, config, sampling, tree_setting(cfg.tree), prompts, seeds)
                                                                    # the same, tree=auto resolved
    out = decode_batch(parts, prompts, method, seeds, sampling)     # tokens, images, per-image stats

`cfg` holds the component groups of conf/decode.yaml: target, tokenizer, text_encoder, and where
asked drafter.ckpt, evaluator, clip, compile. The decode CLI, the multi-process pipeline, the
benchmark and the training tasks that decode (scheduler traces) all build and decode here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor

from decode.budget import AutoTree, BudgetChoice, choose_tree
from decode.core.engine import Generation, Method, generate
from decode.core.host import wait_for
from decode.core.sampling import SamplingParams, row_generators
from decode.core.trees import TreeParams
from decode.evaluation.measures import target_nll
from decode.models.checkpoint import DTYPES  # noqa: F401 (the entry points read dtype= names here)
from decode.models.drafter import Drafter, load_drafter
from decode.models.spatial import SpatialHeads, load_spatial
from decode.models.target import Condition, LlamaGenTarget
from decode.models.target.llamagen_gpt import COMPILE_SCOPES
from decode.models.text import TextEncoder
from decode.models.vq import VQModel
from decode.resolvers import REPO, register_resolvers
from decode.strategies.learned_skip import SkipPolicy, load_scheduler_policy
from decode.strategies.registry import MethodConfig, build_method


@dataclass(frozen=True)
class Components:
    """What decoding needs, built once per run."""
    target: LlamaGenTarget
    vq: VQModel
    text: TextEncoder | None
    drafter: Drafter | None = None
    skip_policies: dict[str, SkipPolicy] | None = None  # learned skip policies by folder
    scorer: object | None = None  # decode.evaluation.world_evaluator.AlignmentScorer
    clip: object | None = None    # decode.evaluation.quality.CLIPScorer
    spatial: dict[str, SpatialHeads] | None = None  # spatial draft heads by folder (method=spatial)
    static_shapes: bool = False  # decode with fixed pass shapes (decode.core.engine.generate)

    @property
    def codebook(self) -> Tensor:
        """[V, d] the raw VQ codebook rows (LANTERN's neighbourhoods, VVS's path similarity)."""
        own = getattr(self.vq, "codebook", None)  # a transformers target's own VQ (tokenizer=own)
        return own if own is not None else self.vq.quantize.embedding.weight.detach()


def build_components(cfg, device: torch.device, dtype: torch.dtype = torch.float32, *,
                     methods: Sequence[MethodConfig] = (), evaluator: bool = False,
                     text_encoder: bool = True) -> Components:
    """Instantiate the configured components `methods` need, check that they fit each other, and
    compile the layers if `cfg.compile` asks. `text_encoder=False`: none (the caller makes its own
    conditions, e.g. random caption features on a machine without the encoder's weights)."""
    target = instantiate(cfg.target).to(device=device, dtype=dtype)
    vq = own_tokenizer(target) if cfg.tokenizer.get("own") else instantiate(cfg.tokenizer).to(device)
    text = None
    if target.config.model_type == "t2i" and text_encoder:  # the caption length follows the target unless set
        length = cfg.text_encoder.get("max_length") or target.config.cls_token_num
        text = instantiate(cfg.text_encoder, device=str(device), max_length=int(length))
    check_compatible(target, vq, text, text_encoder)
    drafter = None
    if any(m.needs_drafter for m in methods):
        ckpt = cfg.get("drafter") and cfg.drafter.get("ckpt")
        if not ckpt:
            names = ", ".join(m.name for m in methods if m.needs_drafter)
            raise ValueError(f"method {names} needs a drafter: drafter.ckpt=FOLDER (python -m train drafter)")
        drafter = load_drafter(ckpt, getattr(target, "gpt", target))  # fails here if it does not fit the target
    policies = {m.knobs["scheduler_ckpt"]: load_scheduler_policy(m.knobs["scheduler_ckpt"], target, drafter)
                for m in methods if m.skipping == "learned"}
    spatial = {m.knobs["spatial_ckpt"]: load_spatial(m.knobs["spatial_ckpt"], target) for m in methods if m.needs_spatial}
    scorer = instantiate(cfg.evaluator, device=str(device)) if evaluator and cfg.get("evaluator") else None
    clip = None
    if cfg.get("clip"):
        from decode.evaluation.quality import CLIPScorer

        clip = CLIPScorer(cfg.clip, device=device)
    static = bool(cfg.get("static_shapes"))
    compile_models(cfg.get("compile"), getattr(target, "gpt", None), drafter, static=static)
    return Components(target, vq, text, drafter, policies, scorer, clip, spatial, static)


def own_tokenizer(target):
    """`tokenizer=own`: a transformers target decodes its images with its own VQ model."""
    if not hasattr(target, "decode_images"):
        raise ValueError("tokenizer=own needs a target that decodes its own images (Janus-Pro, Lumina-mGPT); "
                         "a LlamaGen target takes tokenizer=world or tokenizer=llamagen_vq16")
    if not target.draws_images:
        raise ValueError(f"{type(target).__name__} cannot draw its images: transformers ships its VQ encoder, not "
                         f"the decoder (decode.api.decode_batch(..., images=False) decodes its tokens)")
    from decode.models.target.hf_target import OwnTokenizer

    return OwnTokenizer(target)


def check_compatible(target: LlamaGenTarget, vq: VQModel, text: TextEncoder | None, needs_text: bool = True) -> None:
    """Components that do not fit each other fail before any work starts."""
    cfg = target.config
    if vq.config.codebook_size != cfg.vocab_size:
        raise ValueError(f"tokenizer codebook ({vq.config.codebook_size}) != target vocab_size ({cfg.vocab_size})")
    if cfg.model_type == "t2i" and needs_text:
        if text is None:
            raise ValueError("a text-to-image target needs a text encoder")
        takes_ids = not hasattr(cfg, "caption_dim")  # transformers targets: prompts as token ids
        if takes_ids != (text.dim is None):
            raise ValueError(f"the target takes prompts as {'token ids' if takes_ids else 'caption features'}; "
                             f"the text encoder gives {'token ids' if text.dim is None else 'features'} (transformers "
                             f"targets: text_encoder=hash_ids or text_encoder=template_ids)")
        if takes_ids:
            return
        if text.dim != cfg.caption_dim:
            raise ValueError(f"text encoder width {text.dim} != target caption_dim {cfg.caption_dim}")
        if text.max_length != cfg.cls_token_num:
            raise ValueError(f"text encoder length {text.max_length} != target cls_token_num {cfg.cls_token_num}")




def pick_device(name: str) -> torch.device:
    """`auto`: the GPU when there is one, else the CPU; otherwise the named device, if it is there.
    On CUDA, also keeps this process's attention off cuDNN (see `avoid_cudnn_attention`)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device={name!r} is not a device: use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name} but this torch sees no CUDA device "
                             f"(torch {torch.__version__}); use device=cpu or device=auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={name} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        avoid_cudnn_attention()
    return device


def avoid_cudnn_attention() -> None:
    """Turn off cuDNN's backend of `scaled_dot_product_attention` for this process (the
    memory-efficient kernel takes the masked passes instead). cuDNN builds an execution plan per
    new key length, and a decode's key length grows at every step: on an H200 (torch 2.11, bf16)
    each drafter pass of a round spent ~68 ms on the host building one, and a drafter round at XL
    dimensions took 227-291 ms, 13-15 ms without cuDNN (docs/results.md, the GPU section)."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def compile_models(setting, *models, static: bool = False) -> str | None:
    """The `compile` option: false (eager), true or "stack" (one graph over each model's layers),
    "layer" (one graph per block, shared by the layers; much quicker to trace on deep models).
    Compiles each model given (target GPT, drafter; None is passed over) and returns the scope.

    The same computation, but inductor's fused kernels round differently from eager ones, so a
    sampled image can differ from its eager twin (the distribution does not). The first batch of
    each shape kind (prefill, one token, a tree, a sub-batch) pays the tracing. `static`: shapes
    specialised, for decoding with static shapes (each kind traces once; CUDA graphs on a GPU)."""
    if setting in (None, False):
        return None
    scope = "stack" if setting is True else setting
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile must be false, true, 'stack' or 'layer'; got {setting!r}")
    for m in models:
        if m is not None:
            m.compile_blocks(scope, static=static)
    return scope


def decode_config(overrides: Sequence[str] = ()) -> DictConfig:
    """conf/decode.yaml composed with `overrides` (the embedded world by default), for entry points
    outside a Hydra app: scripts build their components from the same config the CLI does."""
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("decode", overrides=["prompt=unused", *overrides])


def make_method(parts: Components, config: MethodConfig, sampling: SamplingParams,
                tree: TreeParams = TreeParams()) -> Method:
    policy = (parts.skip_policies or {}).get(config.knobs.get("scheduler_ckpt"))
    drafter = (parts.spatial or {}).get(config.knobs["spatial_ckpt"]) if config.needs_spatial else parts.drafter
    return build_method(config, sampling=sampling, tree=tree, drafter=drafter, codebook=parts.codebook,
                        learned_policy=policy)


def tree_setting(tree) -> TreeParams | AutoTree:
    """A `tree` config (conf/tree/): `auto: true` with the budget's candidates (decode.budget), or a
    fixed tree's total_tokens, depth, top_k, static."""
    tree = dict(tree or {})
    if tree.get("auto"):
        return AutoTree.from_config(tree)
    tree.pop("auto", None)
    unknown = sorted(set(tree) - set(TreeParams.__dataclass_fields__))
    if unknown:
        raise ValueError(f"tree: unknown key(s) {unknown}; known: {', '.join(TreeParams.__dataclass_fields__)} "
                         f"(or tree=auto)")
    return TreeParams(**tree)


def method_with_tree(parts: Components, config: MethodConfig, sampling: SamplingParams, tree: TreeParams | AutoTree,
                     prompts: list[str], seeds: list[int], identity: dict | None = None
                     ) -> tuple[Method, BudgetChoice | None]:
    """The engine's Method with its tree: a fixed one, or for tree=auto the one decode.budget measures
    as fastest on this device over `prompts` (one batch of the run's own) - plain AR when no tree
    pays. `identity` names what the cached choice depends on beyond the device, batch, method and sampling."""
    if not isinstance(tree, AutoTree):
        return make_method(parts, config, sampling, tree), None
    if not config.uses_tree:  # AR, Jacobi and the wavefront's chains have no tree to size
        return make_method(parts, config, sampling), None
    calibrating = make_method(parts, config, sampling, TreeParams(max(tree.sizes), max(tree.depths), tree.top_k))
    identity = {**(identity or {}), "method": [config.name, config.drafting, config.acceptance, config.knobs],
                "target": [parts.target.config, _fingerprint(getattr(parts.target, "gpt", None) or parts.target.model),
                           parts.target.cfg_scale],
                "drafter": [parts.drafter.config, _fingerprint(parts.drafter)],
                "dtype": str(parts.target.dtype)}
    choice = choose_tree(parts.target, parts.drafter, calibrating, condition_for(parts.target, parts.text, prompts),
                         seeds, sampling, tree, identity)
    return method_from_choice(parts, config, sampling, choice), choice


def method_from_choice(parts: Components, config: MethodConfig, sampling: SamplingParams,
                       choice: BudgetChoice) -> Method:
    """The method with the tree tree=auto chose, or plain AR (named after the method) when it chose none."""
    if choice.tree is None:
        return choice.method(Method(config.name))
    return make_method(parts, config, sampling, choice.tree)


def _fingerprint(model: torch.nn.Module) -> float:
    """A number that tells two models' weights apart (for the tree budget's cache key): one pass over
    the weights, paid once per run, cached choice or not."""
    return round(float(sum(p.detach().float().abs().sum() for p in model.parameters())), 3)


def condition_for(target: LlamaGenTarget, text: TextEncoder | None, prompts: list[str]) -> Condition:
    """The target's condition for `prompts`: class ids (c2i) or encoded captions (t2i)."""
    if target.config.model_type == "c2i":
        try:
            labels = [int(p) for p in prompts]
        except ValueError as err:
            raise ValueError(f"a class-to-image target takes class ids as prompts, got {prompts!r}") from err
        bad = [x for x in labels if not 0 <= x < target.config.num_classes]
        if bad:
            raise ValueError(f"class ids {bad} outside [0, {target.config.num_classes})")
        return Condition(torch.tensor(labels))
    feats = text.encode(prompts)
    return Condition(feats.emb, feats.mask)


@dataclass(frozen=True)
class Decoded:
    generation: Generation
    images: Tensor | None  # [B, 3, H, W] in [-1, 1] (None: not decoded to pixels)
    text_s: float          # caption encoding, batch
    vq_s: float            # VQ decoding, batch
    nll: Tensor | None = None  # [B] target NLL per token (decode.evaluation.measures.target_nll), if asked

    @property
    def tokens(self) -> Tensor:
        return self.generation.tokens


@torch.no_grad()
def decode_batch(parts: Components, prompts: list[str], method: Method, seeds: list[int],
                 sampling: SamplingParams, *, num_tokens: int | None = None, images: bool = True,
                 nll: bool = False) -> Decoded:
    """One image per prompt, each seeded by its own seed: tokens, per-row stats and (if asked) pixels
    and each image's target NLL (one teacher-forced pass over the batch, after the timed decode)."""
    target = parts.target
    t0 = time.perf_counter()
    cond = condition_for(target, parts.text, prompts)
    wait_for(target.device)  # on a GPU the encoder's queued kernels would otherwise fall into the decode
    t1 = time.perf_counter()
    gen = generate(target, cond, num_tokens=num_tokens or target.num_image_tokens, sampling=sampling,
                   generators=row_generators(list(seeds), target.device), method=method,
                   static_shapes=parts.static_shapes)
    t2 = time.perf_counter()
    pixels = None
    if images:
        pixels = parts.vq.decode_codes(gen.tokens.to(next(parts.vq.parameters()).device))
        wait_for(pixels.device)
    vq_s = time.perf_counter() - t2
    per_token = target_nll(target, cond, gen.tokens, sampling) if nll else None
    return Decoded(gen, pixels, t1 - t0, vq_s, per_token)
