"""vlpretrain: multi-stage pretraining of InternVL-style vision-language models."""

__version__ = "0.1.0"
