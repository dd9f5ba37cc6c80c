"""The reference benchmark: procedural scenes whose exact diffusion prior and ground truth are known.

    scenes.py        the prompt grammar, the scenes as radiance fields, cached multi-view renders
    text_encoder.py  a deterministic, invertible text encoder for scene prompts
    config.py        the reference prior's settings (`prior.reference.*`)
    prior.py         the exact MMSE denoiser of the scenes' renders (`prior.name: reference`)

Nothing here is imported by `trainers.priors` until a reference prior is loaded.
"""
