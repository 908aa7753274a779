"""Checkpoints of a training run: what they hold and how they are written, checked and read.

states.py    the run's stateful parts (model, optimizer, schedule, loader, progress)
store.py     save (sync or async) and load a step's checkpoint, find the newest intact one
tensors.py   DCP files of tensors only; the structure beside them as JSON (no pickle)
manifest.py  size and hash of every file, written last and verified on resume
resume.py    which config changes a resume accepts; a fresh start sets the old run aside
lock.py      one run per output_dir (run.lock, takeover from dead holders)
"""
