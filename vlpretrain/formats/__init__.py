"""Model formats on disk: the InternVL chat layout and transformers' InternVL layout.

internvl.py  save a model in the InternVL chat layout (each stage's export, the next
             stage's input, what InternVL's own code reads)
hf.py        InternVL chat layout <-> transformers-native InternVLForConditionalGeneration
files.py     the tokenizer and config files both layouts carry (4.x and 5.x readers)
export.py    `vlpretrain export` end to end, the HF processor files included
"""
