"""The recipe of vlmkit's embedded default model: a small SigLIP-style ViT trained from scratch + pixel shuffle +
Linear (the Idefics3 / SmolVLM architecture) in front of the frozen SmolLM2-135M-Instruct, on synthetic data
(`vlmkit.data.synthetic`). Research code, outside the package: vlmkit only ships its result.

Why this shape: Idefics3 is SmolVLM's own architecture, so the result is a checkpoint transformers loads as it is;
pixel shuffle + one Linear is the cheapest connector that keeps the 2D layout (16 tokens per image), which keeps
sequences short on a CPU. Stages (each resumable, each skipped at 0 steps where that makes sense):
  0a. shapes (`vision.py`): the ViT alone learns the shape of the object under each patch;
  0b. vision (`vision.py`): the ViT alone learns the generator's labels through scene-level and per-patch heads;
  0c. words (`words.py`): ViT + connector learn to write, in each image token, the embeddings of the words naming
      what lies in its cell ("red" + "circle", "left"), so that the frozen LM starts from tokens it can read;
  1.  language (`language.py`): ViT + connector + LoRA learn to answer through the frozen SmolLM2.
Every hyper-parameter is a field of `config.RecipeConfig`; `python -m recipes.default_model --help` lists them as
flags. The probes in `probes/` measure what each stage learnt; HISTORY.md tells how the shipped model got here.
"""
