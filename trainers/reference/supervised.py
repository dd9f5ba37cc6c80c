"""The supervised ceiling: the same geometry, renderer and steps, fitted to ground-truth renders.

Not a distillation method. Its gradient on the prior's input is x0 − x0_true (an L2 loss on the render
at the sampled camera), so what it reaches after N steps is what the model can represent and the
optimiser can fit in N steps: a distillation PSNR reads as a fraction of the way from the untrained
model to this ceiling.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from trainers.cameras import CameraBatch
from trainers.guidance import Guidance, GuidanceConfig, GuidanceOutput
from trainers.priors.base import DiffusionPrior
from trainers.reference.scenes import SceneConfig, render_scene

TargetFn = Callable[[CameraBatch], torch.Tensor]


def ground_truth_target(prompt: str, resolution: int, scene_cfg: SceneConfig | None = None) -> TargetFn:
    """cameras -> the scene's true renders [B, 3, H, W] in [0, 1] at `resolution`, on its background."""

    def target(cameras: CameraBatch) -> torch.Tensor:
        views = render_scene(prompt, cameras.to("cpu"), resolution, scene_cfg)
        return views["rgb"].permute(0, 3, 1, 2).to(cameras.c2w.device)

    return target


class SupervisedGuidance(Guidance):
    method = "supervised"

    def __init__(
        self, cfg: GuidanceConfig, prior: DiffusionPrior, max_steps: int | None, target_fn: TargetFn
    ):
        super().__init__(cfg, prior, max_steps)
        self.target_fn = target_fn

    def unbatched(
        self, images, cond_embeddings, uncond_embeddings, step, generator, camera_vectors, cameras
    ) -> GuidanceOutput:
        if cameras is None:
            raise ValueError(
                "guidance.method=supervised renders the ground truth at the training cameras: pass cameras"
            )
        x0 = self.to_prior_input(images)
        with torch.no_grad():
            target = self.to_prior_input(self.target_fn(cameras).to(images))
        grad = (x0 - target).detach()
        loss = 0.5 * F.mse_loss(x0, target, reduction="sum") / x0.shape[0]
        # No timestep: t is reported as 0 so that the metrics keep their keys.
        t = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
        return GuidanceOutput(loss=loss, grad=grad, t=t)
