"""The CUDA-graph prior call (`prior.cuda_graph`): which graph serves a call, padding that changes no
real row, the fallback off CUDA, and (on a GPU) the same ε̂ as the eager call.

The padding and graph choice run on the CPU through `GraphedCall(capture=False)`, which pads and slices
exactly as the captured path does but calls the UNet eagerly. The exactness test needs CUDA: it is
skipped here and runs in `tests/benchmarks/gpu_check.sh` (stage cuda_graph_tests).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from trainers.priors.base import DeviceCapabilities, FastPathFallback, PriorConfig, resolve_fast_paths
from trainers.priors.cuda_graph import GraphedCall, call_key, graph_rows, pad_rows
from trainers.priors.stable_diffusion import StableDiffusionPrior

H100 = DeviceCapabilities(device_type="cuda", bf16=True, sdpa=True, compile_blocker=None)
CPU = DeviceCapabilities(device_type="cpu", bf16=True, sdpa=True, compile_blocker=None)


def unet_inputs(prior, rows: int, seed: int = 0):
    """Random rows as guidance hands them to the prior: noisy latents, timesteps, text embeddings."""
    g = torch.Generator().manual_seed(seed)
    size = prior.image_size // prior.vae_scale_factor
    x = torch.randn(rows, prior.unet.config.in_channels, size, size, generator=g)
    t = torch.randint(20, 980, (rows,), generator=g)
    emb = prior.encode_text([f"prompt {i % 3}" for i in range(rows)])
    return x.to(prior.device, prior.dtype), t.to(prior.device), emb.to(prior.device, prior.dtype)


# ----------------------------------------------------------------------------------------------------
# The config key: CUDA only, a warning naming the key elsewhere


def test_cuda_graph_is_off_by_default_and_kept_on_cuda_when_asked():
    assert not resolve_fast_paths(PriorConfig(), H100).cuda_graph
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_fast_paths(PriorConfig(cuda_graph=True), H100).cuda_graph


def test_cuda_graph_on_the_cpu_falls_back_to_the_eager_call_with_a_warning_naming_the_key(tiny_sd_dir):
    with pytest.warns(FastPathFallback, match=r"prior\.cuda_graph=true.*cpu.*prior\.cuda_graph=false"):
        prior = StableDiffusionPrior.from_pretrained(tiny_sd_dir, device="cpu", cuda_graph=True)
    assert prior.graphed_unet is None and prior.describe()["cuda_graph"] is False
    x, t, emb = unet_inputs(prior, 3)
    with torch.no_grad():
        eps = prior.predict_noise(x, t, emb)
    assert eps.shape == x.shape and eps.dtype == torch.float32 and torch.isfinite(eps).all()


# ----------------------------------------------------------------------------------------------------
# Which graph serves a call


def test_a_call_takes_the_smallest_captured_graph_that_holds_its_rows():
    assert graph_rows(5, [8, 6, 12], room=True) == (6, False)
    assert graph_rows(6, [8, 6, 12], room=False) == (6, False)


def test_a_call_larger_than_every_graph_captures_one_of_its_own_size_while_there_is_room():
    assert graph_rows(9, [8], room=True) == (9, True)
    assert graph_rows(3, [], room=True) == (3, True)


def test_a_call_no_graph_holds_runs_eagerly_once_the_graphs_are_used_up():
    assert graph_rows(9, [8], room=False) == (None, False)


def test_rows_pad_with_copies_of_the_first_row_and_too_many_rows_are_refused():
    tensor = torch.arange(6.0).view(3, 2)
    padded = pad_rows(tensor, 5)
    assert padded.shape == (5, 2)
    assert torch.equal(padded[:3], tensor) and torch.equal(padded[3:], tensor[:1].expand(2, 2))
    assert pad_rows(None, 5) is None and pad_rows(tensor, 3) is tensor
    with pytest.raises(ValueError, match="cannot pad 3 rows down to 2"):
        pad_rows(tensor, 2)


def test_the_graph_key_is_everything_but_the_row_count():
    x, t, emb = torch.zeros(4, 4, 8, 8), torch.zeros(4, dtype=torch.long), torch.zeros(4, 7, 32)
    assert call_key(x, t, emb, None) == call_key(x[:2], t[:2], emb[:2], None)
    assert call_key(x, t, emb, None) != call_key(torch.zeros(4, 4, 16, 16), t, emb, None)
    assert call_key(x, t, emb, None) != call_key(x, t, emb.half(), None)
    assert call_key(x, t, emb, None) != call_key(x, t, emb, torch.zeros(4, 16))


# ----------------------------------------------------------------------------------------------------
# Padding changes no real row (tiny-sd on the CPU, the eager stand-in for the captured graph)


def test_rows_padded_to_the_captured_size_and_sliced_back_give_the_unpadded_eps(tiny_sd_prior):
    prior = tiny_sd_prior
    call = GraphedCall(prior._unet_forward, capture=False, max_graphs=2)
    full = unet_inputs(prior, 6, seed=1)  # a full pack: K = 2 members of 3 rows (ASD)
    partial = unet_inputs(prior, 3, seed=2)  # one slot empty
    with torch.no_grad():
        call(*full, None)  # "captures" the 6-row graph
        padded = call(*partial, None)
        alone = prior._unet_forward(*partial, None)
    assert call.captured_sizes() == [6] and call.stats["padded_rows"] == 3
    assert padded.shape == alone.shape
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)


def test_class_labels_are_padded_with_the_rows(tiny_sd_prior):
    prior = tiny_sd_prior
    seen = []

    def forward(x, t, emb, labels):
        seen.append((len(x), len(t), len(emb), len(labels)))
        return x.float()

    call = GraphedCall(forward, capture=False)
    x, t, emb = unet_inputs(prior, 4)
    call(x, t, emb, torch.ones(4, 16))
    out = call(x[:1], t[:1], emb[:1], torch.ones(1, 16))
    assert seen == [(4, 4, 4, 4), (4, 4, 4, 4)] and out.shape[0] == 1


def test_past_max_graphs_a_call_of_a_new_size_runs_eagerly_at_its_own_size(tiny_sd_prior):
    sizes = []

    def forward(x, t, emb, labels):
        sizes.append(len(x))
        return x.float()

    call = GraphedCall(forward, capture=False, max_graphs=1)
    x, t, emb = unet_inputs(tiny_sd_prior, 5)
    call(x[:2], t[:2], emb[:2])
    call(x, t, emb)
    assert sizes == [2, 5] and call.captured_sizes() == [2] and call.stats["eager"] == 1


# ----------------------------------------------------------------------------------------------------
# On a GPU: the replayed graph gives the eager ε̂ (fp16 tolerance), full and padded


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (runs in gpu_check.sh)")
def test_the_cuda_graph_call_gives_the_eager_eps_within_fp16_tolerance(tiny_sd_dir):
    graphed = StableDiffusionPrior.from_pretrained(tiny_sd_dir, device="cuda", cuda_graph=True)
    eager = StableDiffusionPrior.from_pretrained(tiny_sd_dir, device="cuda")
    assert graphed.dtype == torch.float16 and graphed.graphed_unet is not None
    for seed, rows in ((0, 12), (1, 12), (2, 9), (3, 3)):  # a full pack twice, then empty slots
        x, t, emb = unet_inputs(graphed, rows, seed)
        with torch.no_grad():
            got = graphed.predict_noise(x, t, emb)
            want = eager.predict_noise(x, t, emb)
        assert torch.isfinite(got).all()
        relative = (got - want).norm() / want.norm()
        assert relative < 1e-2, f"{rows} rows: relative error {relative:.2e}"
    stats = graphed.graphed_unet.stats
    assert graphed.graphed_unet.captured_sizes() == [12]
    assert stats["replays"] == 4 and stats["padded_rows"] == 3 + 9 and stats["eager"] == 0
    with torch.enable_grad():  # autograd on (VSD's LoRA fit): eager, the graph untouched
        graphed.predict_noise(x, t, emb)
    assert graphed.graphed_unet.stats["replays"] == 4
