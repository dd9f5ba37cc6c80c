"""The paper's CLIP protocol (similarity and R@1) on the random-weight tiny CLIP: against an independent,
plainly written computation of the protocol, R@1 at its extremes, and the inputs it refuses."""

from __future__ import annotations

import itertools
import json
import math
import time

import pytest
import torch
import torch.nn.functional as F

from trainers.evaluation.clip import (
    SINGLE_PROMPT_R_AT_1,
    ClipModelError,
    clip_scores,
    load_clip,
    orbit_renders,
    retrieval_scores,
)

PROMPTS = ["a red cube", "a blue sphere on a table", "a green torus"]
CANDIDATES = ["a red cube", "a cat", "a car", "a chair", "a tree", "a lamp", "a boat", "a castle"]
# CLIP's published normalisation constants, written out here rather than read from the model directory.
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


def random_images(seed: int, n: int, size: int) -> torch.Tensor:
    """Smooth random images (a low-resolution noise field upsampled): closer to renders than pixel noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


class Reference:
    """The protocol, computed image by image with the full CLIPModel and no code from trainers/."""

    def __init__(self, directory):
        from transformers import CLIPModel, CLIPTokenizer

        self.model = CLIPModel.from_pretrained(directory).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(directory)

    @staticmethod
    def unit(vector: list[float]) -> list[float]:
        norm = math.sqrt(sum(x * x for x in vector))
        return [x / norm for x in vector]

    @torch.no_grad()
    def text(self, prompt: str) -> list[float]:
        tokens = self.tokenizer([prompt], return_tensors="pt")
        pooled = self.model.text_model(**tokens).pooler_output
        return self.unit(self.model.text_projection(pooled)[0].tolist())

    @torch.no_grad()
    def image(self, image: torch.Tensor) -> list[float]:
        resized = F.interpolate(image[None], size=(224, 224), mode="bilinear", align_corners=False)[0]
        pixels = torch.stack([(resized[c] - MEAN[c]) / STD[c] for c in range(3)])
        pooled = self.model.vision_model(pixel_values=pixels[None]).pooler_output
        return self.unit(self.model.visual_projection(pooled)[0].tolist())

    def scores(self, images_by_prompt: dict[str, torch.Tensor]) -> dict:
        texts = {p: self.text(p) for p in images_by_prompt}
        per_prompt = {}
        for prompt, images in images_by_prompt.items():
            sims, hits = [], []
            for image in images:
                embedding = self.image(image)
                cosines = {q: sum(a * b for a, b in zip(embedding, t, strict=True)) for q, t in texts.items()}
                sims.append(cosines[prompt])
                hits.append(1.0 if max(cosines, key=cosines.get) == prompt else 0.0)
            per_prompt[prompt] = {"similarity": sum(sims) / len(sims), "recall_at_1": sum(hits) / len(hits)}
        n = len(per_prompt)
        return {
            "similarity": sum(v["similarity"] for v in per_prompt.values()) / n,
            "recall_at_1": sum(v["recall_at_1"] for v in per_prompt.values()) / n,
            "per_prompt": per_prompt,
        }

    def nearest_prompt(self, image: torch.Tensor, prompts: list[str]) -> str:
        embedding = self.image(image)
        return max(prompts, key=lambda p: sum(a * b for a, b in zip(embedding, self.text(p), strict=True)))


@pytest.fixture(scope="module")
def reference(tiny_clip_dir):
    return Reference(tiny_clip_dir)


def test_clip_scores_match_an_independent_computation_of_the_protocol(tiny_clip_dir, reference):
    # Different counts and sizes per prompt: the resize to 224 and the per-prompt means both matter.
    images = {
        PROMPTS[0]: random_images(0, 3, 32),
        PROMPTS[1]: random_images(1, 2, 48),
        PROMPTS[2]: random_images(2, 4, 224),
    }
    got = clip_scores(images, tiny_clip_dir, batch_size=2, device="cpu")
    expected = reference.scores(images)
    assert got["similarity"] == pytest.approx(expected["similarity"], abs=1e-5)
    assert got["recall_at_1"] == pytest.approx(expected["recall_at_1"], abs=1e-9)
    for prompt in PROMPTS:
        assert got["per_prompt"][prompt]["similarity"] == pytest.approx(
            expected["per_prompt"][prompt]["similarity"], abs=1e-5
        )
        assert got["per_prompt"][prompt]["recall_at_1"] == expected["per_prompt"][prompt]["recall_at_1"]


def test_r_at_1_is_one_when_every_prompts_images_are_nearest_its_own_text_and_zero_when_swapped(
    tiny_clip_dir, reference
):
    # Random weights put most images nearest the same text, so find two prompts that split a pool of
    # images between them, and give each prompt the images nearest its text (per the independent
    # computation).
    pool = random_images(3, 24, 32)
    embeddings = [reference.image(image) for image in pool]
    texts = {p: reference.text(p) for p in CANDIDATES}

    def nearer_first(first: str, second: str) -> list[bool]:
        dot = lambda a, b: sum(x * y for x, y in zip(a, b, strict=True))  # noqa: E731
        return [dot(e, texts[first]) > dot(e, texts[second]) for e in embeddings]

    pair = next(
        (p, q)
        for p, q in itertools.combinations(CANDIDATES, 2)
        if 2 <= sum(nearer_first(p, q)) <= len(pool) - 2
    )
    split = nearer_first(*pair)
    own = {
        pair[0]: pool[[i for i, first in enumerate(split) if first]],
        pair[1]: pool[[i for i, first in enumerate(split) if not first]],
    }
    swapped = {pair[0]: own[pair[1]], pair[1]: own[pair[0]]}

    right = clip_scores(own, tiny_clip_dir, device="cpu")
    assert right["recall_at_1"] == 1.0
    assert all(v["recall_at_1"] == 1.0 for v in right["per_prompt"].values())
    wrong = clip_scores(swapped, tiny_clip_dir, device="cpu")
    assert wrong["recall_at_1"] == 0.0
    assert all(v["recall_at_1"] == 0.0 for v in wrong["per_prompt"].values())


def test_retrieval_arithmetic_on_hand_made_embeddings():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    at = lambda degrees: [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]  # noqa: E731
    first = torch.tensor([at(0), at(30), at(60)])  # nearest: text 0, text 0, text 1
    second = torch.tensor([at(90)])
    scores = retrieval_scores([first, second], [0, 1], text)
    expected = (1 + math.cos(math.radians(30)) + math.cos(math.radians(60))) / 3
    assert scores[0]["similarity"] == pytest.approx(expected)
    assert scores[0]["recall_at_1"] == pytest.approx(2 / 3)
    assert scores[1] == {"similarity": pytest.approx(1.0), "recall_at_1": 1.0}


def test_a_single_prompt_reports_r_at_1_as_undefined_with_the_reason(tiny_clip_dir):
    result = clip_scores({PROMPTS[0]: random_images(4, 2, 32)}, tiny_clip_dir, device="cpu")
    assert result["recall_at_1"] is None and result["per_prompt"][PROMPTS[0]]["recall_at_1"] is None
    assert (
        result["recall_at_1_undefined"] == SINGLE_PROMPT_R_AT_1
        and "two or more prompts" in SINGLE_PROMPT_R_AT_1
    )
    assert -1.0 <= result["similarity"] <= 1.0


@pytest.mark.parametrize(
    "images, message",
    [
        ({}, "empty"),
        ({"a red cube": torch.rand(2, 32, 32, 3)}, r"\[N, 3, H, W\]"),
        ({"a red cube": torch.rand(0, 3, 32, 32)}, "N >= 1"),
        ({"a red cube": torch.rand(2, 3, 32, 32) * 255}, r"expected \[0, 1\]"),
        ({"a red cube": torch.randint(0, 2, (2, 3, 32, 32))}, "float tensor"),
        ({"": torch.rand(2, 3, 32, 32)}, "non-empty prompt"),
    ],
    ids=["empty", "channels-last", "no-images", "0-255", "integers", "blank-prompt"],
)
def test_bad_images_are_refused_before_any_model_is_loaded(images, message):
    with pytest.raises(ValueError, match=message):
        clip_scores(images, "/no/such/clip")  # the images are checked first: the path is never read


def test_a_clip_path_that_does_not_exist_or_is_not_clip_is_named_with_the_fix(tmp_path, tiny_sd_dir):
    with pytest.raises(ClipModelError, match="no such directory") as error:
        load_clip(str(tmp_path / "missing"), device="cpu", setting="--clip")
    assert "--clip=" in str(error.value) and "openai/clip-vit-large-patch14" in str(error.value)
    # A diffusers pipeline directory has no config.json at its root.
    with pytest.raises(ClipModelError, match="not a CLIP model: it has no readable config.json"):
        load_clip(str(tiny_sd_dir), device="cpu")
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ClipModelError, match="model_type 'bert', not 'clip'"):
        load_clip(str(other), device="cpu", setting="evaluation.clip")


def test_an_offline_hub_id_fails_fast_and_says_how_to_point_clip_at_a_local_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ClipModelError) as error:
        load_clip("openai/clip-vit-large-patch14", device="cpu", setting="--clip")
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert (
        "cannot be reached" in message and "download openai/clip-vit-large-patch14 --local-dir DIR" in message
    )
    assert "pass --clip DIR" in message
    with pytest.raises(ClipModelError, match="set evaluation.clip=DIR"):
        load_clip("openai/clip-vit-large-patch14", device="cpu")


def test_the_model_is_loaded_once_per_process_and_the_tiny_one_is_clip_shaped(tiny_clip_dir):
    first = load_clip(tiny_clip_dir, device="cpu")
    assert load_clip(str(tiny_clip_dir), device="cpu") is first
    assert first.image_size == 224 and first.dtype == torch.float32  # fp16 is for CUDA only
    config = json.loads((tiny_clip_dir / "config.json").read_text())
    assert config["model_type"] == "clip"
    assert {"model.safetensors", "tokenizer.json", "vocab.json", "preprocessor_config.json"} <= {
        p.name for p in tiny_clip_dir.iterdir()
    }


def test_orbit_renders_cover_the_circle_at_the_elevation_in_batches():
    seen = []

    def render(cameras, width, height):
        seen.append((cameras.elevation.clone(), cameras.azimuth.clone()))
        return {"rgb": torch.full((len(cameras), height, width, 3), 0.5)}

    from trainers.cameras import CameraConfig

    images = orbit_renders(render, 5, 15.0, CameraConfig(), 8, batch_size=2)
    assert images.shape == (5, 3, 8, 8) and [len(e) for e, _ in seen] == [2, 2, 1]
    elevation = torch.cat([e for e, _ in seen])
    azimuth = torch.cat([a for _, a in seen])
    assert torch.allclose(elevation, torch.full((5,), 15.0))
    assert torch.allclose(azimuth, torch.tensor([-180.0, -108.0, -36.0, 36.0, 108.0]))
