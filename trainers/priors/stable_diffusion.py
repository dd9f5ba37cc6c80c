"""A frozen Stable Diffusion prior loaded component by component with diffusers `from_pretrained`.

Only the parts score distillation needs are loaded (UNet, VAE, text encoder, tokenizer, the scheduler's
noise schedule), not a full pipeline: no safety checker or feature extractor is downloaded or held in
memory. The source is a hub id or a local directory in the Stable Diffusion layout
(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/); a source without a VAE is a
pixel-space prior. The built-in `tiny-sd` is such a directory and goes through the same code.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from trainers.config_base import ConfigError
from trainers.hub import HUB_ID, download_hint, hub_offline, hub_reachable
from trainers.node_lock import node_lock
from trainers.priors.base import (
    DeviceCapabilities,
    DiffusionPrior,
    FastPaths,
    PriorConfig,
    out_of_memory_hint,
    resolve_device,
    resolve_fast_paths,
)
from trainers.priors.cuda_graph import GraphedCall

REQUIRED_SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "scheduler")
# Prompts repeat every step (the prompt, its view suffixes and ""), so their embeddings are cached;
# the bound keeps GPU memory small when an amortized run cycles through many prompts.
TEXT_CACHE_SIZE = 256
# prior.encoder=linear: SD's latent -> RGB approximation (rows: the 4 latent channels, scaled by the VAE's
# scaling factor; columns: R, G, B in [-1, 1]), the one latent previews use. Its pseudo-inverse maps a
# render to latents: colour without texture, and no VAE in the step.
LATENT_TO_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)


def compile_lock_path() -> Path:
    """The lock beside Inductor's cache on local disk (TORCHINDUCTOR_CACHE_DIR, else torch's default)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:  # older torch: the environment variable or the temporary folder
        root = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or tempfile.gettempdir()
    else:
        root = cache_dir()
    return Path(root) / "dreamsweep-unet-compile.lock"


class HubUnreachableError(ConfigError):
    """`prior.name` is a hub id, the hub cannot be reached and no cached copy exists."""


class StableDiffusionPrior(DiffusionPrior):
    """ε-prediction from a Stable-Diffusion-layout pipeline, all weights frozen."""

    def __init__(
        self,
        *,
        unet: UNet2DConditionModel,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        scheduler: DDPMScheduler,
        vae: AutoencoderKL | None,
        image_size: int,
        device: torch.device,
        dtype: torch.dtype,
        source: str = "",
        encoder: str = "vae",
        fast_paths: FastPaths | None = None,
    ) -> None:
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.vae = vae
        self.in_pixel_space = vae is None
        self.image_size = image_size
        self.device = device
        self.dtype = dtype
        self.source = source
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        self.vae_scale_factor = 1 if vae is None else vae_scale_factor(vae.config)
        self.encoder = "vae" if vae is None else encoder  # pixel-space priors have nothing to encode
        self.fast_paths = fast_paths
        self._rgb_to_latent = None
        if self.encoder == "linear":
            if vae.config.latent_channels != len(LATENT_TO_RGB):
                raise ConfigError(
                    f"prior.encoder=linear maps RGB to SD's {len(LATENT_TO_RGB)} latent channels, but this "
                    f"prior's VAE has {vae.config.latent_channels}: use prior.encoder=vae"
                )
            to_rgb = torch.tensor(LATENT_TO_RGB, dtype=torch.float32)
            self._rgb_to_latent = torch.linalg.pinv(to_rgb).to(device)  # [3, 4]
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._compiled_once = False  # prior.compile_unet: whether the first (compiling) call is done
        # prior.cuda_graph: the UNet call replayed from CUDA graphs (eager when autograd is on).
        self.graphed_unet: GraphedCall | None = None
        if fast_paths is not None and fast_paths.cuda_graph:
            self.graphed_unet = GraphedCall(self._unet_forward)

    # ------------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_config(cls, cfg: PriorConfig, device: torch.device | str | None = None) -> StableDiffusionPrior:
        """`cfg.name` is a hub id or a local directory (the built-in names are handled by `load_prior`)."""
        return cls.from_pretrained(
            cfg.name,
            device=device,
            dtype=cfg.dtype,
            image_size=cfg.image_size,
            # An explicit cache dir also holds hub downloads; otherwise huggingface_hub's own cache
            # (HF_HOME) is used, so weights downloaded by other tools are found.
            hub_cache_dir=str(Path(cfg.cache_dir).expanduser() / "huggingface") if cfg.cache_dir else None,
            encoder=cfg.encoder,
            attention=cfg.attention,
            channels_last=cfg.channels_last,
            compile_unet=cfg.compile_unet,
            cuda_graph=cfg.cuda_graph,
        )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        device: torch.device | str | None = None,
        dtype: str = "auto",
        image_size: int | None = None,
        hub_cache_dir: str | None = None,
        encoder: str = "vae",
        attention: str = "auto",
        channels_last: bool | None = None,
        compile_unet: bool = False,
        cuda_graph: bool = False,
    ) -> StableDiffusionPrior:
        """Load a hub id or local directory in the SD layout; configs are checked before any weights load.

        dtype, attention, channels_last, compile_unet and cuda_graph are the fast-path keys of `PriorConfig`,
        resolved against the device by `resolve_fast_paths` (which warns when it falls back).
        """
        device = resolve_device(device)
        asked = PriorConfig(
            dtype=dtype,
            attention=attention,
            channels_last=channels_last,
            compile_unet=compile_unet,
            cuda_graph=cuda_graph,
        )
        fast = resolve_fast_paths(asked, DeviceCapabilities.probe(device))
        torch_dtype = fast.dtype
        source, load_kwargs, index, has_vae = _resolve_source(str(name_or_path), hub_cache_dir)

        def load(component: str, loader: Any) -> Any:
            try:
                return loader(source, subfolder=component, **load_kwargs)
            except OSError as exc:
                raise ConfigError(
                    f"prior.name={str(name_or_path)!r}: cannot load its {component}: {exc}"
                ) from exc

        unet_config = load("unet", UNet2DConditionModel.load_config)
        vae_config = load("vae", AutoencoderKL.load_config) if has_vae else None
        size = check_image_size(image_size, unet_config, vae_config)
        _check_channels(unet_config, vae_config, str(name_or_path))

        # Only the noise schedule is used, so any scheduler's config (SD ships PNDM's) is read as DDPM's:
        # they share the training betas.
        scheduler = DDPMScheduler.from_config(load("scheduler", DDPMScheduler.load_config))
        tokenizer = load("tokenizer", _component_class(index, "tokenizer", "CLIPTokenizer").from_pretrained)
        # Weights are loaded straight into the prior's dtype (fp16 on CUDA: half the memory and the read).
        modules = {
            "unet": load("unet", partial(UNet2DConditionModel.from_pretrained, torch_dtype=torch_dtype)),
            "text_encoder": load(
                "text_encoder",
                partial(
                    _component_class(index, "text_encoder", "CLIPTextModel").from_pretrained,
                    torch_dtype=torch_dtype,
                ),
            ),
            "vae": load("vae", partial(AutoencoderKL.from_pretrained, torch_dtype=torch_dtype))
            if has_vae
            else None,
        }
        for name, module in modules.items():
            if module is not None:
                modules[name] = _freeze(module, device, name, fast)
        if fast.compile_unet:
            # In place (nn.Module.compile), so the UNet stays the same object: VSD's LoRA adapters and
            # class-embedding swap still reach it. Compilation happens at the first forward.
            modules["unet"].compile(dynamic=False)
        return cls(
            tokenizer=tokenizer,
            scheduler=scheduler,
            image_size=size,
            device=device,
            dtype=torch_dtype,
            source=str(name_or_path),
            encoder=encoder,
            fast_paths=fast,
            **modules,
        )

    # ------------------------------------------------------------------------------------------------
    # The prior interface

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        missing = [prompt for prompt in dict.fromkeys(prompts) if prompt not in self._text_cache]
        if missing:
            for prompt, embedding in zip(missing, self._run_text_encoder(missing), strict=True):
                self._text_cache[prompt] = embedding
        for prompt in prompts:
            self._text_cache.move_to_end(prompt)
        embeddings = torch.stack([self._text_cache[prompt] for prompt in prompts])
        while len(self._text_cache) > TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return embeddings

    @torch.no_grad()
    def _run_text_encoder(self, prompts: list[str]) -> torch.Tensor:
        # Some tokenizers report a huge model_max_length; the text encoder's positions are the real bound.
        max_length = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        # SD 1.x / 2.x were trained without an attention mask on the text; encoders that want one say so.
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return hidden.to(self.dtype)

    @property
    def input_size(self) -> int:
        """prior.encoder=linear takes renders at the latent size; the VAE path at image_size."""
        if self.encoder == "linear":
            return self.image_size // self.vae_scale_factor
        return self.image_size

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        pixels = images * 2.0 - 1.0
        if self.vae is None:
            return pixels.float()
        if self._rgb_to_latent is not None:
            rgb_to_latent = self._rgb_to_latent.to(pixels.device)
            return torch.einsum("bchw,cl->blhw", pixels.float(), rgb_to_latent)
        with out_of_memory_hint("the VAE encoder (prior.encoder=vae)"):
            return self._vae_encode(pixels)

    def _vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        # The posterior mean rather than a sample: the SD VAE's posterior std is tiny next to the noise
        # distillation adds at any t >= T_min, so sampling would only add variance to the gradient and
        # consume RNG (which exact resume then has to replay).
        posterior = self.vae.encode(
            pixels.to(self.device, self.dtype, memory_format=self._memory_format())
        ).latent_dist
        latents = posterior.mean
        shift = self.vae.config.get("shift_factor")
        if shift is not None:
            latents = latents - shift
        return (latents * self.vae.config.scaling_factor).float()

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return ((x0.float() + 1.0) / 2.0).clamp(0.0, 1.0)
        latents = x0.to(self.device, self.dtype) / self.vae.config.scaling_factor
        shift = self.vae.config.get("shift_factor")
        if shift is not None:
            latents = latents + shift
        images = self.vae.decode(latents).sample
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def predict_noise(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        text_embeddings: torch.Tensor,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One UNet forward over the whole batch; ε̂ as float32 whatever the model predicts.

        Autograd is left to the caller: the UNet's own weights are frozen, but VSD trains a LoRA through
        this call. `class_labels` reach the UNet's class embedding (VSD's camera conditioning).
        """
        t = torch.as_tensor(t, device=self.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if class_labels is not None:
            class_labels = class_labels.to(self.device)
            # Float labels feed the class embedding, which may be a trainable fp32 module (VSD's camera
            # embedding) on an fp16 UNet: cast to that module's dtype, not the prior's.
            if class_labels.is_floating_point():
                class_labels = class_labels.to(self._class_embedding_dtype())
        call = self._unet_forward
        if self.graphed_unet is not None and self._graphable():
            call = self.graphed_unet
        with out_of_memory_hint("the UNet forward"), self._first_compiled_call():
            output = call(
                x_t.to(self.device, self.dtype, memory_format=self._memory_format()),
                t,
                text_embeddings.to(self.device, self.dtype),
                class_labels,
            )
        channels = x_t.shape[1]
        if output.shape[1] == 2 * channels:  # a learned-variance UNet: ε first, then the variance
            output = output[:, :channels]
        return self._as_epsilon(output, x_t.to(self.device, torch.float32), t)

    @contextmanager
    def _first_compiled_call(self) -> Iterator[None]:
        """The first call of a compiled UNet compiles it (tens of seconds at SD size): one process per
        node at a time, so that workers starting together compile once and the others load that
        compilation from Inductor's cache on local disk instead of compiling again."""
        if self.fast_paths is None or not self.fast_paths.compile_unet or self._compiled_once:
            yield
            return
        with node_lock(compile_lock_path(), "the first call of the compiled UNet (torch.compile)"):
            yield
        self._compiled_once = True

    def _unet_forward(
        self, x_t: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor, class_labels: torch.Tensor | None
    ) -> torch.Tensor:
        return self.unet(
            x_t, t, encoder_hidden_states=embeddings, class_labels=class_labels, return_dict=False
        )[0].float()

    def _graphable(self) -> bool:
        # A replay has no backward (VSD's LoRA fit runs with autograd on), and LoRA adapters switched on
        # and off change the kernels a graph recorded.
        return not torch.is_grad_enabled() and not getattr(self.unet, "peft_config", None)

    def _memory_format(self) -> torch.memory_format:
        channels_last = self.fast_paths is not None and self.fast_paths.channels_last
        return torch.channels_last if channels_last else torch.preserve_format

    def _class_embedding_dtype(self) -> torch.dtype:
        embedding = getattr(self.unet, "class_embedding", None)
        parameter = next(embedding.parameters(), None) if embedding is not None else None
        return parameter.dtype if parameter is not None else self.dtype

    def _as_epsilon(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Guidance is written for ε; v- and x0-prediction models (e.g. SD 2.1 at 768) are converted.
        if self.prediction_type == "epsilon":
            return output
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        alpha_bar = self.alphas_cumprod[t.long()].view(shape)
        if self.prediction_type == "v_prediction":
            return alpha_bar.sqrt() * output + (1.0 - alpha_bar).sqrt() * x_t
        if self.prediction_type == "sample":
            return (x_t - alpha_bar.sqrt() * output) / (1.0 - alpha_bar).sqrt()
        raise ValueError(f"unsupported scheduler prediction_type {self.prediction_type!r}")

    def _check_images(self, images: torch.Tensor) -> None:
        size = self.input_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (size, size):
            where = (
                "the latent size (prior.encoder=linear)" if self.encoder == "linear" else "prior.image_size"
            )
            raise ValueError(
                f"encode_images takes renders of shape [B, 3, {size}, {size}] ({where}), "
                f"got {list(images.shape)}: resize renders to the prior's input size first"
            )

    def describe(self) -> dict[str, object]:
        fast = {}
        if self.fast_paths is not None:
            fast = {
                "attention": self.fast_paths.attention,
                "channels_last": self.fast_paths.channels_last,
                "compile_unet": self.fast_paths.compile_unet,
                "cuda_graph": self.fast_paths.cuda_graph,
            }
        return {
            "source": self.source,
            "prediction_type": self.prediction_type,
            "encoder": self.encoder,
            **fast,
            **super().describe(),
        }


# ----------------------------------------------------------------------------------------------------
# Checks on configs, before weights load


def vae_scale_factor(vae_config: Any) -> int:
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def size_multiple(unet_config: Any, vae_config: Any | None) -> int:
    """Image sizes must be multiples of this: every UNet downsampling halves the (latent) image."""
    scale = 1 if vae_config is None else vae_scale_factor(vae_config)
    return scale * 2 ** (len(unet_config["down_block_types"]) - 1)


def native_image_size(unet_config: Any, vae_config: Any | None) -> int:
    sample_size = unet_config["sample_size"]
    if isinstance(sample_size, list | tuple):
        if len(set(sample_size)) != 1:
            raise ConfigError(
                f"prior.image_size: the prior's native size {sample_size} is not square; set it"
            )
        sample_size = sample_size[0]
    return int(sample_size) * (1 if vae_config is None else vae_scale_factor(vae_config))


def check_image_size(image_size: int | None, unet_config: Any, vae_config: Any | None) -> int:
    native = native_image_size(unet_config, vae_config)
    if image_size is None:
        return native
    multiple = size_multiple(unet_config, vae_config)
    if image_size <= 0 or image_size % multiple:
        below = (image_size // multiple) * multiple
        nearby = sorted({size for size in (below, below + multiple, native) if size > 0})
        raise ConfigError(
            f"prior.image_size={image_size} cannot be taken by this prior: it must be a multiple of "
            f"{multiple} (the prior's VAE and UNet downsample by {multiple} overall); valid sizes nearby: "
            f"{', '.join(map(str, nearby))} (native: {native})"
        )
    return image_size


def _check_channels(unet_config: Any, vae_config: Any | None, name: str) -> None:
    expected = 3 if vae_config is None else vae_config["latent_channels"]
    if unet_config["in_channels"] != expected:
        what = "a pixel-space prior (no VAE) takes RGB" if vae_config is None else "the VAE's latents have"
        raise ConfigError(
            f"prior.name={name!r}: its UNet takes {unet_config['in_channels']} channels but {what} "
            f"{expected}; this is not a text-to-image pipeline in the Stable Diffusion layout"
        )


# ----------------------------------------------------------------------------------------------------
# Finding the weights


def _resolve_source(name: str, hub_cache_dir: str | None) -> tuple[str, dict[str, Any], dict[str, Any], bool]:
    """-> (what to pass to from_pretrained, its keyword arguments, model_index.json or {}, has a VAE)."""
    path = Path(name).expanduser()
    if path.is_dir():
        missing = [sub for sub in REQUIRED_SUBFOLDERS if not (path / sub).is_dir()]
        if missing:
            raise ConfigError(
                f"prior.name={name!r} is a directory but not in the Stable Diffusion layout: it lacks "
                f"{', '.join(missing)} (expected model_index.json, unet/, vae/ (optional), text_encoder/, "
                "tokenizer/, scheduler/)"
            )
        index_file = path / "model_index.json"
        index = json.loads(index_file.read_text()) if index_file.exists() else {}
        has_vae = (path / "vae").is_dir() and (not index or _lists_vae(index))
        return str(path), {}, index, has_vae
    if path.exists() or not HUB_ID.match(name):
        raise ConfigError(
            f"prior.name={name!r}: no such directory exists (and it is not a hub id of the form "
            "'org/name'); use 'tiny-sd', 'reference', a hub id such as "
            "'stabilityai/stable-diffusion-2-1-base', or a local directory in the Stable Diffusion layout"
        )
    return _resolve_hub_id(name, hub_cache_dir)


def _resolve_hub_id(repo_id: str, cache_dir: str | None) -> tuple[str, dict[str, Any], dict[str, Any], bool]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    # Offline, only the local cache is read; a cached download then loads with no network at all.
    local_only = hub_offline() or not hub_reachable()
    try:
        index_file = hf_hub_download(
            repo_id, "model_index.json", cache_dir=cache_dir, local_files_only=local_only
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise _unreachable(repo_id, local_only) from exc
    except GatedRepoError as exc:
        raise ConfigError(
            f"prior.name={repo_id!r} is a gated hub repository: accept its licence on the hub and log in "
            "(`hf auth login`), or point prior.name at a local copy"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ConfigError(
            f"prior.name={repo_id!r}: no such local directory, and no such repository on the hub "
            "(check the spelling, or log in for a private one)"
        ) from exc
    except EntryNotFoundError as exc:
        raise ConfigError(
            f"prior.name={repo_id!r}: the hub repository has no model_index.json, so it is not a diffusers "
            "pipeline in the Stable Diffusion layout"
        ) from exc
    except (HfHubHTTPError, OSError) as exc:
        raise _unreachable(repo_id, local_only, detail=str(exc)) from exc
    index = json.loads(Path(index_file).read_text())
    return repo_id, {"cache_dir": cache_dir, "local_files_only": local_only}, index, _lists_vae(index)


def _unreachable(repo_id: str, tried_cache_only: bool, detail: str = "") -> HubUnreachableError:
    reason = "no such local directory, and the Hugging Face hub cannot be reached (offline, or HF_HUB_OFFLINE is set)"
    if tried_cache_only:
        reason += " and no cached copy was found"
    return HubUnreachableError(
        f"prior.name={repo_id!r}: {reason}{f' ({detail})' if detail else ''}. "
        f"{download_hint(repo_id, 'set prior.name=DIR')}; or use prior.name=tiny-sd to run without weights"
    )


def _lists_vae(index: dict[str, Any]) -> bool:
    # save_pretrained writes a missing component as [null, null]: the same as an absent key.
    entry = index.get("vae")
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


def _component_class(index: dict[str, Any], component: str, default: str) -> Any:
    """The transformers class model_index.json names (e.g. a T5 encoder), else SD's CLIP class."""
    import transformers

    entry = index.get(component)
    name = entry[1] if isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers" else default
    if not hasattr(transformers, name):
        raise ConfigError(
            f"prior.name: model_index.json names {component} class {name!r}, unknown to transformers"
        )
    return getattr(transformers, name)


def _freeze(module: torch.nn.Module, device: torch.device, name: str, fast: FastPaths) -> torch.nn.Module:
    module.requires_grad_(False)
    module.eval()
    module.to(device=device)
    if name in ("unet", "vae"):
        if fast.channels_last:
            # Convolutions in NHWC use tensor cores without layout transposes.
            module.to(memory_format=torch.channels_last)
        if fast.attention == "sdpa":
            _use_sdpa(module)
    return module


def _use_sdpa(module: torch.nn.Module) -> None:
    """Swap diffusers' plain attention processors for PyTorch SDPA (flash / memory-efficient kernels).

    diffusers already picks SDPA on torch 2; this guards checkpoints that pinned the legacy processor,
    and leaves any other processor (added-KV, IP-adapter, ...) as it is.
    """
    processors = getattr(module, "attn_processors", None)
    if not processors:
        return
    if any(type(processor) is AttnProcessor for processor in processors.values()):
        module.set_attn_processor(
            {
                key: AttnProcessor2_0() if type(processor) is AttnProcessor else processor
                for key, processor in processors.items()
            }
        )
