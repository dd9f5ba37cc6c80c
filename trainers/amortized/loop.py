"""The amortized training loop: one text-conditioned generator for a whole prompt library.

    result = train(load_amortized_config("sweeps/configs/amortized_reference_cpu.yaml"))

Each step a rank takes `batch_size` prompts of its shard, renders one random view of each prompt's
field (one generator forward for the batch), and applies the same guidance as the per-prompt trainer
(SDS / CSD / ASD / VSD, unchanged) to every render with that prompt's text.

Runs in one process without Ray. When `torch.distributed` is initialised (Ray Train does it, see
`data_parallel.py`), the model is wrapped in DistributedDataParallel and the prompts are sharded by
global rank: every prompt is trained exactly once per epoch across all ranks, on any number of nodes
(`epoch_batches`, a pure function). Every random draw of a rank comes from its own seeded generator,
whose state is checkpointed with the others', so a resumed run ends where an uninterrupted one does.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
import yaml
from torch import nn
from tqdm.auto import tqdm

from trainers.amortized.config import AmortizedConfig
from trainers.amortized.generators import ConditionedField, Generator, make_generator
from trainers.amortized.generators.background import HyperBackground
from trainers.amortized.prompt_library import (
    GeneratorTextEncoder,
    PromptSelection,
    TextEmbeddingCache,
    drop_duplicates,
    load_prompt_table,
)
from trainers.cameras import (
    CameraBatch,
    CameraSampler,
    orbit_cameras,
    turntable_cameras,
    view_dependent_prompt,
    view_direction_labels,
)
from trainers.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from trainers.config import config_to_dict
from trainers.evaluation import ground_truth as scene_metrics
from trainers.guidance import make_guidance
from trainers.per_prompt import TrainResult, seed_everything
from trainers.priors import load_prior, resolve_device
from trainers.priors.base import DiffusionPrior, default_cache_dir, out_of_memory_hint
from trainers.reference.config import REFERENCE_PRIORS
from trainers.reference.scenes import is_scene_prompt, prompt_split, scene_cache_dir
from trainers.rendering import Background, VolumeRenderer
from trainers.step import StepInputs, step_alone
from trainers.visualize import image_grid, save_turntable

log = logging.getLogger(__name__)

MetricsCallback = Callable[[int, dict[str, float]], None]
CheckpointCallback = Callable[[int, "Path | None"], None]
PathCallback = Callable[[int, Path], None]


class PromptLibraryError(ValueError):
    """A prompt library the amortized trainer cannot train on; the message names the field."""


# ---------------------------------------------------------------------------------------------------
# Sharding: pure functions of (prompt count, rank, world size, batch size, epoch, seed)


def shard(n_prompts: int, rank: int, world_size: int, order: list[int] | None = None) -> list[int]:
    """Rank `rank`'s prompts: every world_size-th of `order` (default 0..n-1) starting at `rank`.

    `rank` and `world_size` are the *global* ones. (ScaleDreamer shards by the node-local GPU count,
    so on a second node ranks take subsets of node 0's shards and some prompts are never trained.)
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the world of {world_size} ranks")
    order = list(range(n_prompts)) if order is None else order
    return order[rank::world_size]


def steps_per_epoch(n_prompts: int, world_size: int, batch_size: int) -> int:
    """Steps in which every rank gets through its shard (the same count on all ranks, as DDP needs)."""
    return math.ceil(math.ceil(n_prompts / world_size) / batch_size)


def epoch_batches(
    n_prompts: int, rank: int, world_size: int, batch_size: int, epoch: int, seed: int
) -> list[tuple[list[int], list[float]]]:
    """This rank's batches for one epoch: (prompt indices, loss weights) per step.

    The prompts are shuffled with a generator seeded by (seed, epoch), the same on every rank, then
    sharded by global rank. A rank whose shard is shorter than the longest fills its last batch with
    weight-0 repeats: they are rendered (so that every rank runs the same number of DDP steps) but
    contribute no gradient, so every prompt is trained exactly once per epoch.
    """
    order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    mine = shard(n_prompts, rank, world_size, order.tolist())
    steps = steps_per_epoch(n_prompts, world_size, batch_size)
    filler = mine[0] if mine else int(order[0])
    indices = mine + [filler] * (steps * batch_size - len(mine))
    weights = [1.0] * len(mine) + [0.0] * (steps * batch_size - len(mine))
    return [
        (indices[s * batch_size : (s + 1) * batch_size], weights[s * batch_size : (s + 1) * batch_size])
        for s in range(steps)
    ]


# ---------------------------------------------------------------------------------------------------
# The prompt library of a run


@dataclass
class PromptLibrary:
    prompts: list[str]
    features: np.ndarray  # [N, dim] float32: the generator's text conditioning, row i for prompts[i]
    dropped_duplicates: int = 0
    messages: list[str] = field(default_factory=list)


def text_cache_path(config: AmortizedConfig) -> Path:
    if config.text_cache.path:
        return Path(config.text_cache.path).expanduser()
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in config.prior.name)
    return default_cache_dir(config.prior) / "text_embeddings" / f"{slug}.arrow"


def read_prompts(config: AmortizedConfig, world_size: int = 1) -> tuple[list[str], int]:
    """The deduplicated training prompts and how many duplicates were dropped; refuses an unusable library.

    Needs no prior, so a bad library fails in a second, before anything is loaded."""
    try:
        table = load_prompt_table(config.prompts)
    except (OSError, ValueError, pa.ArrowInvalid) as exc:
        raise PromptLibraryError(str(exc)) from None
    table, dropped = drop_duplicates(table)
    if table.num_rows < world_size:
        what = f"only {table.num_rows} distinct prompt(s)" + (
            f" ({dropped} duplicate(s) dropped)" if dropped else ""
        )
        raise PromptLibraryError(
            f"prompts: {what}, fewer than data_parallel.num_workers={world_size}: every worker needs a "
            "prompt of its own; add prompts or lower data_parallel.num_workers"
        )
    return table.column("prompt").to_pylist(), dropped


def load_library(
    config: AmortizedConfig,
    encoder: GeneratorTextEncoder,
    world_size: int = 1,
    progress: bool = True,
    prompts: tuple[list[str], int] | None = None,
) -> PromptLibrary:
    """The training prompts and their cached embeddings."""
    texts, dropped = prompts or read_prompts(config, world_size)
    messages = [f"prompts: dropped {dropped} duplicate prompt(s), {len(texts)} remain"] if dropped else []
    cache = TextEmbeddingCache(text_cache_path(config), encoder, config.text_cache.batch_size)
    features = cache.get(texts, progress=progress)
    return PromptLibrary(texts, features, dropped, messages + cache.messages)


def evaluation_prompts(config: AmortizedConfig, prompts: list[str]) -> dict[str, list[str]]:
    """{"train": first N training prompts, "held_out": prompts never trained on}."""
    held_out = list(config.eval_prompts.held_out)
    if config.eval_prompts.n_reference_held_out:
        held_out += prompt_split().test[: config.eval_prompts.n_reference_held_out]
    trained = set(prompts)
    held_out = [p for p in dict.fromkeys(held_out) if p not in trained]
    return {"train": prompts[: config.eval_prompts.n_train], "held_out": held_out}


def test_prompts(config: AmortizedConfig) -> list[str]:
    """The library split `eval_prompts.test_split` (deduplicated, its first `n_test`), [] when unset."""
    if not config.eval_prompts.test_split:
        return []
    source = config.prompts.model_copy(
        update={"split": config.eval_prompts.test_split, "select": PromptSelection()}
    )
    try:
        table, _ = drop_duplicates(load_prompt_table(source))
    except (OSError, ValueError, pa.ArrowInvalid) as exc:
        raise PromptLibraryError(f"eval_prompts.test_split: {exc}") from None
    return table.column("prompt").to_pylist()[: config.eval_prompts.n_test]


EVALUATION_PROMPTS_FILE = "evaluation_prompts.json"  # in output_dir: which prompts the grids' rows are
TURNTABLES_DIR = "turntables"  # in output_dir: one turntable per evaluation prompt, and prompts.json


def shown_prompts(config: AmortizedConfig, prompts: list[str]) -> dict[str, list[str]]:
    """The evaluation prompts the validation grids and turntables show, by group (the first training
    prompt when `eval_prompts.n_train` is 0, so that a run always shows something it trained on)."""
    groups = evaluation_prompts(config, prompts)
    return {"train": groups["train"] or prompts[:1], "held_out": groups["held_out"]}


def prompt_slug(prompt: str, limit: int = 60) -> str:
    """A file name's worth of a prompt: lower-case letters and digits, '_' between words."""
    return "".join(c if c.isalnum() else "_" for c in prompt.lower())[:limit].strip("_") or "prompt"


# ---------------------------------------------------------------------------------------------------
# The model


def camera_slice(cameras: CameraBatch, start: int, stop: int) -> CameraBatch:
    return CameraBatch(**{f.name: getattr(cameras, f.name)[start:stop] for f in fields(cameras)})


class AmortizedModel(nn.Module):
    """generator + background + renderer: (text, noise, cameras) -> one render per prompt.

    One module, so that DistributedDataParallel wraps everything whose gradients ranks must average.
    """

    def __init__(self, config: AmortizedConfig, text_dim: int):
        super().__init__()
        self.generator: Generator = make_generator(config.generator, text_dim)
        self.field = ConditionedField(self.generator)
        hyper_dim = config.generator.background_hyper_dim
        self.background = (
            HyperBackground(config.background, text_dim, hyper_dim)
            if hyper_dim
            else Background(config.background)
        )
        self.renderer = VolumeRenderer(config.renderer, self.field, self.background, config.generator.radius)

    def codes(self, text: torch.Tensor, noise: torch.Tensor | None = None) -> tuple:
        """Every prompt's field (and background, when it is text-conditioned) from one forward."""
        background = self.background.codes(text) if isinstance(self.background, HyperBackground) else None
        return self.generator.codes(text, noise), background

    def select(self, codes: tuple | None, index: int) -> None:
        """Point the renderer's field (and background) at prompt `index` of `codes`."""
        field_codes, background = codes if codes is not None else (None, None)
        self.field.select(field_codes, index)
        if isinstance(self.background, HyperBackground):
            self.background.select(background, index)

    def forward(
        self,
        text: torch.Tensor,
        noise: torch.Tensor | None,
        cameras: CameraBatch,
        resolution: int,
        train: bool = True,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        codes = self.codes(text, noise)  # one forward for the whole batch
        per_prompt = len(cameras) // len(text)
        outs = []
        for i in range(len(text)):
            self.select(codes, i)
            views = camera_slice(cameras, i * per_prompt, (i + 1) * per_prompt)
            outs.append(self.renderer.render(views, resolution, resolution, train=train, generator=generator))
        self.select(None, 0)
        keys = ("rgb", "rgb_fg", "opacity", "depth")
        return {key: torch.cat([out[key] for out in outs]) for key in keys}


# ---------------------------------------------------------------------------------------------------
# The trainer


def _is_distributed(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


class AmortizedTrainer:
    def __init__(
        self,
        config: AmortizedConfig,
        prior: DiffusionPrior | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
        progress: bool = True,
    ):
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.device = resolve_device(device or config.device)
        seed_everything(config.seed)  # the same initial weights on every rank
        self.rng = torch.Generator(device="cpu").manual_seed(config.seed * 1_000_003 + rank)
        prompts = read_prompts(config, world_size)  # before the prior: a bad library fails fast
        self.prior = prior if prior is not None else load_prior(config.prior, self.device)
        self.encoder = GeneratorTextEncoder(self.prior)
        self.library = load_library(config, self.encoder, world_size, progress and rank == 0, prompts)
        for message in self.library.messages:
            if rank == 0:
                log.warning(message)
        self.model = AmortizedModel(config, self.encoder.dim).to(self.device)
        self.ddp: nn.Module = self.model
        if _is_distributed(world_size):
            self.ddp = nn.parallel.DistributedDataParallel(self.model)
        self._batch_prompts: list[str] = []
        self.guidance = make_guidance(config.guidance, self.prior, config.max_steps, self._target_fn())
        self.cameras = CameraSampler(config.camera)
        with torch.no_grad():
            self.uncond = self.prior.encode_text([config.negative_prompt])
        opt = config.optimizer
        groups = [
            {"params": list(self.model.generator.parameters()), "lr": opt.lr_generator, "name": "generator"},
            {
                "params": list(self.model.background.parameters()),
                "lr": opt.lr_background,
                "name": "background",
            },
            {"params": self.guidance.trainable_parameters(), "lr": config.guidance.lora_lr, "name": "lora"},
        ]
        self.optimizer = torch.optim.Adam([g for g in groups if g["params"]], betas=opt.betas, eps=opt.eps)
        self.step = 0
        self._epoch_cache: tuple[int, list] | None = None

    def _target_fn(self):
        """`guidance.method: supervised` (the amortized ceiling): each row's true scene at its camera."""
        if self.config.guidance.method != "supervised":
            return None
        if not all(is_scene_prompt(p) for p in self.prompts):
            return None  # make_guidance says what supervised needs
        from trainers.reference.supervised import ground_truth_target

        scene = self.config.prior.reference.scene

        def target(cameras: CameraBatch) -> torch.Tensor:
            rows = [
                ground_truth_target(prompt, self.config.resolution, scene)(camera_slice(cameras, i, i + 1))
                for i, prompt in enumerate(self._batch_prompts)
            ]
            return torch.cat(rows)

        return target

    @property
    def prompts(self) -> list[str]:
        return self.library.prompts

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.prompts), self.world_size, self.config.batch_size)

    def batch_at(self, step: int) -> tuple[list[int], list[float]]:
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            batches = epoch_batches(
                len(self.prompts), self.rank, self.world_size, self.config.batch_size, epoch, self.config.seed
            )
            self._epoch_cache = (epoch, batches)
        return self._epoch_cache[1][position]

    def text_features(self, indices: list[int]) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.library.features[indices])).to(self.device)

    # -- state -------------------------------------------------------------------------------------

    def state_dict(self, rng_by_rank: list | None = None) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "guidance": self.guidance.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng_by_rank": rng_by_rank if rng_by_rank is not None else [rng_state(self.rng)],
            "world_size": self.world_size,
            "prompts": len(self.prompts),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.guidance.load_state_dict(state["guidance"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        rngs = state["rng_by_rank"]
        if len(rngs) == self.world_size:
            restore_rng_state(self.rng, rngs[self.rank])
        else:
            # The weights and the step carry over; the random draws from here on differ from a run that
            # kept its world size (as with any change of data-parallel layout).
            log.warning(
                "resuming a checkpoint of %d worker(s) with %d: training continues, not bit-for-bit",
                len(rngs),
                self.world_size,
            )
            self.rng.manual_seed(self.config.seed * 1_000_003 + self.rank + 7919 * self.step)

    def gathered_rng(self) -> list:
        mine = rng_state(self.rng)
        if not _is_distributed(self.world_size):
            return [mine]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, mine)
        return out

    # -- one step ----------------------------------------------------------------------------------

    def render_step(self) -> StepInputs:
        """One view of each of this step's prompts, rendered from one generator forward."""
        cfg = self.config
        self.model.train()
        indices, weights = self.batch_at(self.step)
        batch = len(indices)
        text = self.text_features(indices)
        noise = None
        if self.model.generator.noise_dim:
            noise = torch.randn(batch, self.model.generator.noise_dim, generator=self.rng).to(self.device)
        cameras = self.cameras.sample(batch, self.rng).to(self.device)
        with out_of_memory_hint(f"the forward pass of step {self.step} (generator and render)"):
            out = self.ddp(text, noise, cameras, cfg.resolution, True, self.rng)
        images = out["rgb"].permute(0, 3, 1, 2)
        # Weight-0 rows (filler, see epoch_batches) keep their value but pass no gradient.
        weight = torch.tensor(weights, device=images.device).view(-1, 1, 1, 1)
        images = weight * images + (1 - weight) * images.detach()
        prompts = [self.prompts[i] for i in indices]
        self._batch_prompts = prompts
        if cfg.camera.view_dependent_prompting:
            labels = view_direction_labels(cameras.elevation, cameras.azimuth, cfg.camera)
            prompts = [view_dependent_prompt(p, label) for p, label in zip(prompts, labels, strict=True)]
        with torch.no_grad():
            cond = self.prior.encode_text(prompts)
        return StepInputs(images, out["opacity"], cond, self.uncond, cameras, self.rng)

    def reduce_grads(self) -> None:
        # DDP averages the model's gradients over ranks in the backward; VSD's score is averaged by hand.
        self._average_guidance_grads()

    def step_extras(self) -> dict[str, float]:
        return {"train/epoch": self.step / self.steps_per_epoch}

    def training_step(self) -> dict[str, float]:
        """One step (trainers.step: render → guidance → loss → optimizer); NonFiniteLossError on NaN."""
        return step_alone(self)

    def _average_guidance_grads(self) -> None:
        """VSD's learned score is not inside the DDP module: average its gradients by hand."""
        if not _is_distributed(self.world_size):
            return
        for param in self.guidance.trainable_parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad /= self.world_size

    def average_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """The mean over ranks of each metric (all ranks log the same keys at the same steps)."""
        if not _is_distributed(self.world_size):
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(values)
        return dict(zip(keys, (values / self.world_size).tolist(), strict=True))

    # -- looking at the result ---------------------------------------------------------------------

    def features_for(self, prompts: list[str]) -> torch.Tensor:
        """Conditioning for any prompts, trained or not (unseen ones are encoded now, not cached)."""
        known = {p: i for i, p in enumerate(self.prompts)}
        if all(p in known for p in prompts):
            return self.text_features([known[p] for p in prompts])
        return self.encoder.encode(prompts).to(self.device)

    @torch.no_grad()
    def render_prompts(self, prompts: list[str], cameras: CameraBatch) -> dict[str, torch.Tensor]:
        """Every prompt from every camera: [len(prompts) * len(cameras), H, W, C], prompt-major."""
        self.model.eval()
        text = self.features_for(prompts)
        tiled = CameraBatch(
            **{
                f.name: value.repeat(len(prompts), *([1] * (value.ndim - 1)))
                for f in fields(cameras)
                for value in [getattr(cameras, f.name)]
            }
        )
        return self.model(text, None, tiled.to(self.device), self.config.resolution, train=False)

    def validation_cameras(self) -> CameraBatch:
        cam = self.config.camera
        views = self.config.logging.val_views
        azimuth = torch.linspace(-180.0, 180.0, views + 1)[:-1]
        return orbit_cameras(cam.eval_elevation, azimuth, cam.eval_distance, cam.eval_fovy)

    def save_validation(self, path: Path) -> Path:
        """One row per evaluation prompt (training prompts, then held-out ones), views across."""
        import imageio.v3 as iio

        groups = shown_prompts(self.config, self.prompts)
        prompts = groups["train"] + groups["held_out"]
        cameras = self.validation_cameras()
        rgb = self.render_prompts(prompts, cameras)["rgb"]
        rows = list(rgb.reshape(len(prompts), len(cameras), *rgb.shape[1:]))
        path.parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(path, image_grid(rows))
        (path.with_suffix(".txt")).write_text("\n".join(prompts) + "\n")  # which row is which prompt
        return path

    def save_turntable(self, path: Path, prompt: str) -> Path:
        cam = self.config.camera
        cameras = turntable_cameras(
            self.config.logging.turntable_frames, cam.eval_elevation, cam.eval_distance, cam.eval_fovy
        )
        return save_turntable(path, self.render_prompts([prompt], cameras)["rgb"])

    def save_evaluation_turntables(self, folder: Path) -> list[Path]:
        """One turntable per evaluation prompt, `<group>_<NN>_<prompt>.<format>`, and `prompts.json`
        ([{file, prompt, group}], group "train" or "held_out") that names them: what a person compares
        between generators is what each makes of the same prompts, trained on and not."""
        fmt = self.config.logging.turntable_format
        entries = [
            {"file": f"{group}_{i:02d}_{prompt_slug(prompt)}.{fmt}", "prompt": prompt, "group": group}
            for group, prompts in shown_prompts(self.config, self.prompts).items()
            for i, prompt in enumerate(prompts)
        ]
        paths = [self.save_turntable(folder / e["file"], e["prompt"]) for e in entries]
        index = folder / "prompts.json"
        index.write_text(json.dumps(entries, indent=1) + "\n")
        return [*paths, index]

    def clip_model(self):
        """The CLIP model of `evaluation.clip`, loaded once per process (rank 0 evaluates)."""
        from trainers.evaluation.clip import load_clip

        return load_clip(
            self.config.evaluation.clip, device=self.device, cache_dir=self.config.prior.cache_dir
        )

    def evaluate_clip(self) -> dict[str, float]:
        """The paper's CLIP protocol on each group of evaluation prompts: the mean over its prompts of the
        cosine between each orbit view and its own prompt (eval/clip_similarity on the training prompts,
        eval/held_out/... on unseen ones, eval/test/... on `eval_prompts.test_split`), and R@1 among the
        group's prompts where it has two or more."""
        from trainers.evaluation.clip import mean_or_none, orbit_renders, retrieval_scores

        ev, model = self.config.evaluation, self.clip_model()
        resolution = ev.resolution or self.config.resolution
        groups = evaluation_prompts(self.config, self.prompts)
        out: dict[str, float] = {}
        for prefix, prompts in (("eval/", groups["train"]), ("eval/held_out/", groups["held_out"]),
                                ("eval/test/", test_prompts(self.config))):  # fmt: skip
            if not prompts:
                continue
            embeds = []
            for prompt in prompts:

                def render(cameras, width, height, prompt=prompt):
                    self.model.eval()
                    text = self.features_for([prompt])
                    tiled = cameras.to(self.device)
                    return self.model(text, None, tiled, resolution, train=False)

                views = orbit_renders(
                    render, ev.views, ev.elevation, self.config.camera, resolution, ev.batch_size
                )
                embeds.append(model.embed_images(views, ev.batch_size))
            scores = retrieval_scores(embeds, list(range(len(prompts))), model.embed_texts(prompts))
            out[prefix + "clip_similarity"] = float(np.mean([s["similarity"] for s in scores]))
            recall = mean_or_none([s["recall_at_1"] for s in scores])
            if recall is not None:
                out[prefix + "clip_r_at_1"] = recall
        return out

    def evaluate(self) -> dict[str, float]:
        """Ground-truth metrics averaged over the training and the held-out evaluation prompts (scene
        prompts only): eval/psnr, ... on training prompts, eval/held_out/psnr, ... on unseen ones; and
        the CLIP metrics where `evaluation.clip` names a model (`evaluate_clip`)."""
        groups = evaluation_prompts(self.config, self.prompts)
        out: dict[str, float] = self.evaluate_clip() if self.config.evaluation.clip else {}
        for group, prompts in groups.items():
            scored = [p for p in prompts if is_scene_prompt(p)]
            per_prompt = [self._evaluate_prompt(p) for p in scored]
            prefix = "eval/" if group == "train" else "eval/held_out/"
            for name in scene_metrics.METRIC_NAMES:
                values = [m[name] for m in per_prompt if math.isfinite(m[name])]
                if values:
                    out[prefix + name.removeprefix("eval/")] = float(np.mean(values))
        return out

    def _evaluate_prompt(self, prompt: str) -> dict[str, float]:
        def render(cameras, width, height):
            return self.render_prompts([prompt], cameras)

        return scene_metrics.evaluate_against_scene(
            render,
            prompt,
            resolution=self.config.resolution,
            n_views=self.config.logging.eval_views,
            camera_cfg=self.config.camera,
            cache_dir=scene_cache_dir(default_cache_dir(self.config.prior)),
        )

    def close(self) -> None:
        self.guidance.close()


def reported_metrics(config: AmortizedConfig) -> set[str]:
    """Every metric name `train` reports for this config (orchestrators validate objectives against it)."""
    names = {"train/loss", "train/loss_guidance", "train/grad_norm", "train/t", "train/t_min", "train/t_max"}
    names |= {"train/opacity", "train/it_per_s", "train/samples_per_s", "train/epoch"}
    if config.guidance.method == "asd":
        names.add("train/t_plus")
    if config.guidance.method == "vsd":
        names.add("train/loss_lora")
    if config.loss.lambda_sparsity > 0:
        names.add("train/loss_sparsity")
    if config.loss.lambda_opacity > 0:
        names.add("train/loss_opacity")
    if config.prior.name in REFERENCE_PRIORS:
        short = [name.removeprefix("eval/") for name in scene_metrics.METRIC_NAMES]
        names |= {f"eval/{n}" for n in short}
        if config.eval_prompts.held_out or config.eval_prompts.n_reference_held_out:
            names |= {f"eval/held_out/{n}" for n in short}
    if config.evaluation.clip:
        n_train = config.eval_prompts.n_train
        n_held_out = len(config.eval_prompts.held_out) + config.eval_prompts.n_reference_held_out
        groups = [("eval/", n_train, n_train)]
        groups.append(("eval/held_out/", min(n_held_out, 1), n_held_out))
        # the size of the test split is the library's: R@1 is reported when it holds 2 prompts or more
        if config.eval_prompts.test_split:
            groups.append(("eval/test/", 1, config.eval_prompts.n_test or 2))
        for prefix, at_least, at_most in groups:
            if at_least:
                names.add(prefix + "clip_similarity")
            if at_most >= 2:
                names.add(prefix + "clip_r_at_1")
    return names


# ---------------------------------------------------------------------------------------------------
# The loop


def train(
    config: AmortizedConfig,
    prior: DiffusionPrior | None = None,
    *,
    on_metrics: MetricsCallback | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    on_artifact: PathCallback | None = None,
    resume_from: str | Path | None = None,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
) -> TrainResult:
    """Train the generator. Every rank calls this; rank 0 writes the files.

    `on_metrics` and `on_checkpoint` are called on every rank at the same steps (metrics averaged over
    ranks; the checkpoint path on rank 0, None elsewhere), so a data-parallel wrapper can report from
    all of them; `on_artifact` on rank 0 only. `resume_from`: a checkpoint dir, or "latest".
    """
    output_dir = Path(config.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    main = rank == 0
    config_yaml = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(config_yaml)

    trainer = AmortizedTrainer(
        config, prior, rank=rank, world_size=world_size, device=device, progress=progress
    )
    if main:  # which grid row is a training prompt and which a held-out one, from the first grid on
        groups = shown_prompts(config, trainer.prompts)
        (output_dir / EVALUATION_PROMPTS_FILE).write_text(json.dumps(groups, indent=1) + "\n")
        if config.evaluation.clip:  # a bad evaluation.clip or test split fails now, not after the last step
            trainer.clip_model()
            test_prompts(config)
    if resume_from == "latest":
        resume_from = latest_checkpoint(checkpoint_dir)
    if resume_from is not None:
        trainer.load_state_dict(load_checkpoint(resume_from))
        if main:
            log.warning("resumed from %s at step %d", resume_from, trainer.step)
    resumed_at = trainer.step

    log_cfg = config.logging
    artifacts: list[Path] = []
    last_checkpoint: Path | None = Path(resume_from) if resume_from else None
    last_metrics: dict[str, float] = {}

    def emit_artifact(path: Path) -> None:
        artifacts.append(path)
        if on_artifact:
            on_artifact(trainer.step, path)

    def checkpoint() -> None:
        nonlocal last_checkpoint
        rngs = trainer.gathered_rng()  # a collective: every rank takes part
        path = None
        if main:
            path = save_checkpoint(
                checkpoint_dir,
                trainer.step,
                trainer.state_dict(rngs),
                config_yaml,
                keep=log_cfg.keep_checkpoints,
            )
            last_checkpoint = path
        if on_checkpoint:
            on_checkpoint(trainer.step, path)

    bar = tqdm(
        total=config.max_steps,
        initial=trainer.step,
        disable=not (progress and main),
        desc=f"amortized {config.guidance.method.upper()} x{world_size}",
        dynamic_ncols=True,
    )
    window_start, window_steps = time.perf_counter(), 0
    try:
        while trainer.step < config.max_steps:
            metrics = trainer.training_step()
            window_steps += 1
            step = trainer.step
            bar.update(1)
            if step % log_cfg.log_every == 0 or step == config.max_steps:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                metrics["train/it_per_s"] = window_steps / elapsed
                # All ranks' renders of the window: the throughput of the whole data-parallel group.
                metrics["train/samples_per_s"] = window_steps * config.batch_size * world_size / elapsed
                window_start, window_steps = time.perf_counter(), 0
                metrics = trainer.average_metrics(metrics)
                bar.set_postfix(loss=f"{metrics['train/loss']:.4g}", refresh=False)
                last_metrics = metrics
                if on_metrics:
                    on_metrics(step, metrics)
            if main and log_cfg.val_every and step % log_cfg.val_every == 0 and step < config.max_steps:
                emit_artifact(trainer.save_validation(output_dir / "validation" / f"step_{step:07d}.png"))
            if log_cfg.eval_every and step % log_cfg.eval_every == 0 and step < config.max_steps:
                ground_truth = _broadcast(trainer.evaluate() if main else None, world_size)
                if ground_truth and on_metrics:
                    on_metrics(step, ground_truth)
            every = config.evaluation.every  # CLIP alone, so that ASHA can judge trials on it
            if config.evaluation.clip and every and step % every == 0 and step < config.max_steps:
                scores = _broadcast(trainer.evaluate_clip() if main else None, world_size)
                if on_metrics:
                    on_metrics(step, scores)
            if log_cfg.checkpoint_every and step % log_cfg.checkpoint_every == 0 and step < config.max_steps:
                checkpoint()
        bar.close()

        final = dict(last_metrics)
        ground_truth = _broadcast(trainer.evaluate() if main else None, world_size)
        if ground_truth:
            final |= ground_truth
            if on_metrics:
                on_metrics(trainer.step, ground_truth)
        final["train/resumed_at_step"] = float(resumed_at)
        checkpoint()
        if main:
            emit_artifact(trainer.save_validation(output_dir / "validation" / f"step_{trainer.step:07d}.png"))
            emit_artifact(
                trainer.save_turntable(
                    output_dir / f"turntable.{log_cfg.turntable_format}", trainer.prompts[0]
                )
            )
            for path in trainer.save_evaluation_turntables(output_dir / TURNTABLES_DIR):
                emit_artifact(path)
            (output_dir / "metrics.yaml").write_text(
                yaml.safe_dump({k: v for k, v in final.items() if math.isfinite(v)}, sort_keys=True)
            )
        return TrainResult(final, output_dir, last_checkpoint, artifacts)
    finally:
        bar.close()
        trainer.close()


def _broadcast(value, world_size: int):
    """Rank 0's value on every rank (evaluation runs on rank 0 only)."""
    if not _is_distributed(world_size):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
