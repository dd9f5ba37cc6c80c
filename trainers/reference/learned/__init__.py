"""A learned reference prior: a small diffusers UNet2DConditionModel trained on the procedural scenes.

    model.py   the architecture (`LearnedModelConfig`), the camera features, the weights directory
    data.py    the training data: basis maps of every layout at random cameras (`SceneBank`)
    train.py   `python -m trainers.reference.learned.train`: trains and writes the weights directory
    prior.py   `prior.name: reference-learned`: the weights loaded with from_pretrained, as a prior

Unlike the exact reference priors it has model error, which is what ASD's premise is about; the exact
priors stay beside it as the oracle that measures that error (docs/learned_prior.md).
"""
