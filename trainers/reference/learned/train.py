"""Train the learned reference prior and write its weights directory.

    python -m trainers.reference.learned.train --out trainers/reference/learned/weights

The defaults are the shipped weights' recipe: from scratch they pass the shipped weights' check in
11,500 steps, 112 minutes on 2 idle CPU cores (docs/learned_prior.md §2, "From scratch").

The run keeps one resumable checkpoint (`--checkpoint-dir`/state.pt, written atomically every
`--checkpoint-every` steps and on Ctrl-C or at `--max-minutes`); the same command resumes it. The EMA of
the weights is written in the diffusers layout (`save_pretrained`) to `--out` every `--save-every`
steps and at the end. Objective: the sampled noise ε (plain ε-prediction MSE, t uniform over the 1000
training steps); regressing the exact prior's denoised estimate instead is not possible here, since the
exact prior exists for 16 cameras only and the training cameras are continuous.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import time
from pathlib import Path

import torch
from pydantic import Field
from tqdm.auto import tqdm

from trainers.config_base import ConfigBase
from trainers.priors.base import default_cache_dir
from trainers.reference.learned.data import DataConfig, build_bank
from trainers.reference.learned.model import (
    INFO_FILE,
    LearnedModelConfig,
    build_unet,
    camera_features,
    parameter_count,
    save_weights,
)
from trainers.reference.prior import sd_noise_schedule
from trainers.reference.scenes import scene_cache_dir
from trainers.reference.text_encoder import SceneTextEncoder, TextEncoderConfig

DEFAULT_OUT = Path(__file__).resolve().parent / "weights"
STATE_FILE = "state.pt"
LOG_FILE = "loss.jsonl"


class TrainSettings(ConfigBase):
    # The from-scratch run that reproduced the shipped weights' quality (docs/learned_prior.md §2).
    steps: int = Field(11500, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(5e-4, gt=0)
    warmup: int = Field(200, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    seed: int = 0
    # Start from another weights directory's network (a warm start) instead of a fresh one: the
    # parameters with the same name and shape are copied, the others (e.g. the attention of a block
    # that had none) start fresh. Ignored when resuming from a checkpoint.
    init_from: str | None = None
    model: LearnedModelConfig = LearnedModelConfig()
    data: DataConfig = DataConfig()


def training_noise_schedule() -> torch.Tensor:
    """ᾱ_t the renders are noised with in training: SD's scaled-linear schedule, the one the weights'
    scheduler/ holds and guidance noises with (`LearnedReferencePrior.alphas_cumprod`)."""
    return sd_noise_schedule(1000)


def training_loss(unet, batch, encoder: SceneTextEncoder, alphas: torch.Tensor, generator, device):
    """ε-prediction MSE on one batch of renders, t uniform over the training steps."""
    x0 = batch.images.to(device)
    b = x0.shape[0]
    t = torch.randint(0, len(alphas), (b,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    alpha = alphas[t].view(-1, 1, 1, 1).to(device)
    x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
    text = encoder.encode(batch.prompts).to(device)
    cams = camera_features(batch.cameras).to(device)
    pred = unet(x_t, t.to(device), encoder_hidden_states=text, class_labels=cams).sample
    return torch.nn.functional.mse_loss(pred, noise)


def warm_start(unet, directory: str | Path) -> dict[str, list[str]]:
    """Copy the parameters of the UNet in weights `directory` that `unet` has with the same name and
    shape; returns the names of those copied and of those left at their fresh initialisation.

    A linear layer that gained inputs (the camera embedding's first layer when the camera features
    gain the fovy) is copied too, with zero weights for the new inputs, so it computes what it did."""
    from diffusers import UNet2DConditionModel

    source = UNet2DConditionModel.from_pretrained(Path(directory), subfolder="unet").state_dict()
    target = unet.state_dict()
    copied = {k: v for k, v in source.items() if k in target and target[k].shape == v.shape}
    for k, v in source.items():
        new = target.get(k)
        if new is not None and new.dim() == 2 and v.dim() == 2 and new.shape[0] == v.shape[0] > 0:
            if new.shape[1] > v.shape[1]:
                copied[k] = torch.cat([v, v.new_zeros(v.shape[0], new.shape[1] - v.shape[1])], dim=1)
    fresh = sorted(set(target) - set(copied))
    # A new attention block adds proj_out(...) to its input: zeroed, it starts as the identity, so the
    # copied network's predictions are unchanged at the first step (as ControlNet starts its branches).
    zeroed = {k: torch.zeros_like(target[k]) for k in fresh if ".proj_out." in k}
    unet.load_state_dict(copied | zeroed, strict=False)
    return {"copied": sorted(copied), "fresh": fresh}


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _without_steps(settings_json: dict) -> dict:
    return {k: v for k, v in settings_json.items() if k != "steps"}


def train(
    settings: TrainSettings,
    out: Path,
    checkpoint_dir: Path,
    cache_dir: Path | None,
    device: torch.device,
    checkpoint_every: int = 200,
    save_every: int = 1000,
    max_minutes: float | None = None,
    progress: bool = True,
    log_every: int = 20,
) -> dict:
    """Train (or resume) and write the weights directory; returns a summary dict."""
    torch.manual_seed(settings.seed)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    state_path = checkpoint_dir / STATE_FILE
    settings_json = settings.model_dump(mode="json")
    bank = build_bank(settings.data, settings.model.image_size, cache_dir, progress=progress)
    encoder = SceneTextEncoder(settings.model.text_encoder)
    alphas = training_noise_schedule()

    unet = build_unet(settings.model, seed=settings.seed).to(device)
    if settings.init_from and not state_path.exists():
        started_from = warm_start(unet, settings.init_from)
        print(
            f"warm start from {settings.init_from}: {len(started_from['copied'])} tensors copied, "
            f"{len(started_from['fresh'])} fresh",
            flush=True,
        )
    # A warm start's steps add to those of the weights it started from.
    warm_start_info = {}
    if settings.init_from and (Path(settings.init_from) / INFO_FILE).is_file():
        source_info = json.loads((Path(settings.init_from) / INFO_FILE).read_text())
        warm_start_info["init_from_trained_steps"] = source_info.get("trained_steps")
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    step, elapsed = 0, 0.0
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=False)
        # The step target is not a training setting (the learning rate is constant after warm-up), so a
        # run can be resumed with a larger --steps to train on.
        if _without_steps(state["settings"]) != _without_steps(settings_json):
            raise SystemExit(
                f"{state_path} was trained with other settings; resume with the same flags, or pass a new "
                f"--checkpoint-dir (or delete it) to start over.\nsaved:  {state['settings']}\nasked:  {settings_json}"
            )
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step, elapsed = state["step"], state["elapsed_s"]

    def checkpoint() -> None:
        _save_state(
            state_path,
            {
                "settings": settings_json,
                "unet": unet.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "step": step,
                "elapsed_s": elapsed + time.perf_counter() - started,
            },
        )

    def export() -> None:
        save_weights(
            ema,
            settings.model,
            out,
            {
                "trained_steps": step,
                **warm_start_info,
                "train_settings": settings_json,
                "train_seconds": round(elapsed + time.perf_counter() - started, 1),
                "command": "python -m trainers.reference.learned.train " + " ".join(_flags(settings)),
            },
        )

    stop = {"now": False}

    def on_signal(signum, frame):  # finish the step, checkpoint, exit
        stop["now"] = True

    previous = signal.signal(signal.SIGTERM, on_signal)
    started = time.perf_counter()
    deadline = started + max_minutes * 60 if max_minutes else None
    log = open(checkpoint_dir / LOG_FILE, "a")  # noqa: SIM115 (closed in finally)
    bar = tqdm(
        total=settings.steps,
        initial=step,
        desc="training the learned prior",
        disable=not progress,
        dynamic_ncols=True,
    )
    unet.train()
    running = None
    try:
        while step < settings.steps and not stop["now"]:
            lr = settings.lr * min(1.0, (step + 1) / max(settings.warmup, 1))
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = bank.sample(settings.batch_size, generator)
            loss = training_loss(unet, batch, encoder, alphas, generator, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            with torch.no_grad():
                decay = min(settings.ema_decay, (1 + step) / (10 + step))
                for e, p in zip(ema.parameters(), unet.parameters(), strict=True):
                    e.lerp_(p, 1 - decay)
            step += 1
            value = loss.item()
            running = value if running is None else 0.98 * running + 0.02 * value
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}")
            if step % log_every == 0:
                now = elapsed + time.perf_counter() - started
                log.write(
                    json.dumps({"step": step, "loss": value, "ema_loss": running, "elapsed_s": now}) + "\n"
                )
                log.flush()
            if step % checkpoint_every == 0:
                checkpoint()
            if step % save_every == 0:
                export()
            if deadline is not None and time.perf_counter() > deadline:
                break
    except KeyboardInterrupt:
        pass
    finally:
        bar.close()
        log.close()
        signal.signal(signal.SIGTERM, previous)
        checkpoint()
        export()
    total = elapsed + time.perf_counter() - started
    return {
        "steps": step,
        "of": settings.steps,
        "seconds": round(total, 1),
        "loss_ema": running,
        "parameters": parameter_count(unet),
        "out": str(out),
    }


def _flags(settings: TrainSettings) -> list[str]:
    m, d = settings.model, settings.data
    return [
        f"--steps {settings.steps}",
        f"--batch-size {settings.batch_size}",
        f"--lr {settings.lr}",
        f"--warmup {settings.warmup}",
        f"--image-size {m.image_size}",
        f"--channels {','.join(map(str, m.block_out_channels))}",
        f"--cross-attention {','.join(str(int(a)) for a in m.cross_attention)}",
        f"--position-scale {m.text_encoder.position_scale}",
        *(
            [f"--only-cross-attention {','.join(str(int(a)) for a in m.only_cross_attention)}"]
            if m.only_cross_attention
            else []
        ),
        f"--uncond-prob {d.uncond_prob}",
        f"--cameras-per-layout {d.cameras_per_layout}",
        f"--seed {settings.seed}",
    ] + ([f"--init-from {settings.init_from}"] if settings.init_from else [])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = TrainSettings()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--image-size", type=int, default=defaults.model.image_size)
    parser.add_argument(
        "--channels",
        default=",".join(map(str, defaults.model.block_out_channels)),
        help="block_out_channels, comma-separated (one per UNet block)",
    )
    parser.add_argument(
        "--cross-attention",
        default=None,
        help="which blocks attend to the text, 0/1 comma-separated (default: all but the first)",
    )
    parser.add_argument(
        "--only-cross-attention",
        default=None,
        help="blocks whose attention layers both attend to the text (no pixel self-attention), 0/1 comma-separated",
    )
    parser.add_argument(
        "--position-scale",
        type=float,
        default=defaults.model.text_encoder.position_scale,
        help="the text encoder's position code, relative to its unit word vectors (how loudly word order speaks)",
    )
    parser.add_argument("--uncond-prob", type=float, default=defaults.data.uncond_prob)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument(
        "--init-from", default=None, help="a weights directory to start the network from (a warm start)"
    )
    parser.add_argument("--norm-groups", type=int, default=defaults.model.norm_num_groups)
    parser.add_argument("--cameras-per-layout", type=int, default=defaults.data.cameras_per_layout)
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="the weights directory (diffusers layout)"
    )
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="resumable state; default: <cache>/reference/learned_train/<out dir name>",
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="default: $DREAMSWEEP_CACHE or ~/.cache/dreamsweep"
    )
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--save-every", type=int, default=1000)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (resumably) after this long")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="auto")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    channels = tuple(int(c) for c in args.channels.split(","))
    cross_attention = (
        tuple(bool(int(a)) for a in args.cross_attention.split(","))
        if args.cross_attention
        else (False,) + (True,) * (len(channels) - 1)
    )
    model = LearnedModelConfig(
        image_size=args.image_size,
        block_out_channels=channels,
        cross_attention=cross_attention,
        only_cross_attention=(
            tuple(bool(int(a)) for a in args.only_cross_attention.split(","))
            if args.only_cross_attention
            else None
        ),
        norm_num_groups=args.norm_groups,
        text_encoder=TextEncoderConfig(position_scale=args.position_scale),
    )
    settings = TrainSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        seed=args.seed,
        init_from=str(Path(args.init_from).resolve()) if args.init_from else None,
        model=model,
        data=DataConfig(cameras_per_layout=args.cameras_per_layout, uncond_prob=args.uncond_prob),
    )
    root = scene_cache_dir(args.cache_dir if args.cache_dir else default_cache_dir())
    checkpoint_dir = args.checkpoint_dir or root / "learned_train" / args.out.resolve().name
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    print(f"checkpoints: {checkpoint_dir}\nweights:     {args.out}", flush=True)
    summary = train(
        settings,
        args.out,
        checkpoint_dir,
        root,
        device,
        args.checkpoint_every,
        args.save_every,
        args.max_minutes,
    )
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
