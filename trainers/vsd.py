"""Variational Score Distillation (ProlificDreamer): the prior's score minus a learned score of the renders.

The learned score ε_lora(x_t, t, π) is the frozen prior plus a trainable, camera-conditioned adapter
that starts as the identity and is fitted to the renders every step:
- priors with a UNet: a LoRA (peft, through diffusers' `add_adapter`) and a camera embedding that the
  UNet adds to its timestep embedding via `class_labels`;
- priors without one (the exact reference prior): a zero-initialised residual convolutional network.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers.cameras import POSE_DIM, camera_pose
from trainers.guidance import Guidance, GuidanceConfig, add_noise, distillation_grad
from trainers.priors.base import DiffusionPrior

ADAPTER_NAME = "dreamsweep_vsd"
CAMERA_DIM = POSE_DIM  # the LoRA is conditioned on the flattened c2w, as in threestudio


class UNetLoRAScore(nn.Module):
    """ε_lora through the prior's own UNet with a LoRA adapter switched on only for these calls."""

    def __init__(self, prior: DiffusionPrior, rank: int, camera_condition: bool):
        super().__init__()
        from peft import LoraConfig

        self.prior = prior
        unet = prior.unet
        if ADAPTER_NAME in getattr(unet, "peft_config", {}):
            unet.delete_adapters(ADAPTER_NAME)  # a previous trial's LoRA on a cached prior
        lora = LoraConfig(
            r=rank,
            lora_alpha=rank,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
        unet.add_adapter(lora, adapter_name=ADAPTER_NAME)
        self.lora_layers = nn.ParameterList()
        for name, param in unet.named_parameters():
            if ADAPTER_NAME in name:
                # fp16 weights on CUDA: the trained parameters are kept in fp32 for a stable Adam.
                param.data = param.data.float()
                param.requires_grad_(True)
                self.lora_layers.append(param)
        unet.disable_adapters()
        self.camera_embedding = None
        if camera_condition:
            embed_dim = unet.time_embedding.linear_2.out_features
            self.camera_embedding = nn.Sequential(
                nn.Linear(CAMERA_DIM, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim)
            )
            nn.init.zeros_(self.camera_embedding[-1].weight)
            nn.init.zeros_(self.camera_embedding[-1].bias)
            self.camera_embedding.to(prior.device)

    @contextmanager
    def active(self):
        unet = self.prior.unet
        unet.enable_adapters()
        unet.set_adapter(ADAPTER_NAME)
        previous = unet.class_embedding
        if self.camera_embedding is not None:
            unet.class_embedding = self.camera_embedding
        try:
            yield
        finally:
            unet.class_embedding = previous
            unet.disable_adapters()

    def forward(self, x_t, t, embeddings, cameras):
        with self.active():
            labels = camera_pose(cameras).to(self.prior.device) if self.camera_embedding is not None else None
            return self.prior.predict_noise(x_t, t, embeddings, class_labels=labels)

    def close(self) -> None:
        self.prior.unet.delete_adapters(ADAPTER_NAME)


class ResidualScore(nn.Module):
    """ε_lora = ε_prior + r(x_t, t, π) with r a small conv net whose last layer starts at zero."""

    def __init__(self, prior: DiffusionPrior, channels: int, camera_condition: bool, width: int = 32):
        super().__init__()
        self.prior = prior
        self.camera_condition = camera_condition
        extra = 1 + (CAMERA_DIM if camera_condition else 0)  # t/T and the camera, broadcast as channels
        self.net = nn.Sequential(
            nn.Conv2d(channels + extra, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, channels, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.to(prior.device)

    def forward(self, x_t, t, embeddings, cameras):
        with torch.no_grad():
            # A camera-conditioned prior (reference-mv) is asked at the render's camera here too.
            labels = cameras.to(x_t.device) if self.prior.camera_conditioned else None
            base = self.prior.predict_noise(x_t, t, embeddings, class_labels=labels)
        n, _, h, w = x_t.shape
        features = [x_t, (t.float() / self.prior.num_train_timesteps).view(n, 1, 1, 1).expand(n, 1, h, w)]
        if self.camera_condition:
            pose = camera_pose(cameras).to(x_t.device)
            features.append(pose.reshape(n, CAMERA_DIM, 1, 1).expand(n, CAMERA_DIM, h, w))
        return base + self.net(torch.cat(features, dim=1))

    def close(self) -> None:
        pass


class VSDGuidance(Guidance):
    method = "vsd"

    def __init__(self, cfg: GuidanceConfig, prior: DiffusionPrior, max_steps: int | None = None):
        super().__init__(cfg, prior, max_steps)
        if prior.unet is not None:
            self.score = UNetLoRAScore(prior, cfg.lora_rank, cfg.lora_camera_condition)
        else:
            channels = 3 if prior.in_pixel_space else 4
            self.score = ResidualScore(prior, channels, cfg.lora_camera_condition)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.score.parameters() if p.requires_grad]

    def compute_grad(self, x0, t, noise, eps_fn, cameras, generator, step):
        if cameras is None:
            raise ValueError("VSD conditions its learned score on the camera: pass camera_vectors")
        batch = x0.shape[0]
        # The frozen prior's CFG prediction: the SDS gradient plus ε is ε̂_cfg·w, so reuse the core.
        sds = distillation_grad(
            "sds", eps_fn, self.prior.alphas_cumprod, x0, t, noise, cfg_scale=self.cfg.cfg_scale
        )
        weight = 1 - self.prior.alphas_cumprod[t].view(-1, *([1] * (x0.ndim - 1)))
        eps_cfg_weighted = sds + weight * noise
        cond_embeddings = self._cond_embeddings
        x_t = add_noise(self.prior.alphas_cumprod, x0, noise, t)
        with torch.no_grad():
            eps_lora = self.score(x_t, t, cond_embeddings, cameras)
        grad = eps_cfg_weighted - weight * eps_lora

        # Fit the learned score to the current renders (denoising loss at a fresh t and ε).
        t_fit = torch.randint(
            0, self.num_train_timesteps, (batch,), generator=generator, device=generator.device
        )
        t_fit = t_fit.to(x0.device)
        noise_fit = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
        x_fit = add_noise(self.prior.alphas_cumprod, x0.detach(), noise_fit, t_fit)
        loss_lora = F.mse_loss(self.score(x_fit, t_fit, cond_embeddings, cameras), noise_fit)
        return grad, {"extra_losses": {"loss_lora": loss_lora}}

    def unbatched(self, images, cond_embeddings, uncond_embeddings, step, generator, camera_vectors, cameras):
        self._cond_embeddings = cond_embeddings  # the learned score is conditioned on the same text
        return super().unbatched(
            images, cond_embeddings, uncond_embeddings, step, generator, camera_vectors, cameras
        )

    def close(self) -> None:
        self.score.close()
