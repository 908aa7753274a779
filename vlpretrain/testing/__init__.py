"""Test and benchmark fixtures, not part of training: tiny components and the shapes dataset.

Nothing here downloads anything. `tokenizer` trains a tiny byte-level BPE tokenizer,
`components` writes tiny InternViT and Qwen2 directories that load through the same code as
real checkpoints, `shapes` is the coloured-shapes world in words (scenes, captions, questions,
scoring) and `synthetic` draws it into a dataset in the reference's annotation format. Tests,
benchmarks and `vlpretrain demo` use them; the training code never imports them.
"""
