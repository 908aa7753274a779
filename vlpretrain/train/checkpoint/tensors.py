"""DCP files hold tensors only: state dicts split into their tensors and a JSON structure.

    save: {name: state_dict} --split_tensors--> {fqn: tensor} ------------> dcp.save (.distcp)
                                           \--> structure (JSON) ---------> shared.json
    load: the run's own state dicts --split_tensors--> {fqn: tensor} <-- dcp.load, in place
          structure + those tensors --join_tensors--> {name: state_dict} --> load_state_dict

DCP stores every value that is not a tensor (an optimizer's lr, betas, eps, the names of its
parameters) with torch.save and reads it back with an unrestricted torch.load, which runs
whatever a planted pickle says. Here those values travel as JSON instead, so DCP has nothing
to read but tensors (which it reads with torch.load(weights_only=True)), and the load planner
refuses any entry that is not a tensor before reading it.

The structure is a tree of one-key JSON objects: {"dict": {key: node}}, {"list": [node]},
{"tuple": [node]}, {"value": null | bool | number | string} and {"tensor": fqn}, where fqn is
the entry's path joined with '.', the name DCP itself gives a nested entry.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from vlpretrain.train.checkpoint.manifest import CheckpointError

_SCALARS = (bool, int, float, str, type(None))


def split_tensors(
    state_dicts: Mapping[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of `state_dicts` by fqn (the same objects: loading into them is in place),
    and the JSON structure that puts them back together.

    Raises CheckpointError naming the entry for a value JSON cannot hold exactly.
    """
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(dict(state_dicts), (), tensors)
    return tensors, structure


def _encode(value: Any, path: tuple[str | int, ...], tensors: dict[str, torch.Tensor]) -> Any:
    where = ".".join(map(str, path))
    if isinstance(value, torch.Tensor):
        if where in tensors:
            raise CheckpointError(f"two state entries are both named {where!r}")
        tensors[where] = value
        return {"tensor": where}
    if isinstance(value, Mapping):
        if not all(isinstance(key, str) for key in value):
            raise CheckpointError(f"state entry {where!r} has keys that are not strings")
        return {"dict": {key: _encode(item, (*path, key), tensors) for key, item in value.items()}}
    if isinstance(value, list | tuple):
        kind = "list" if isinstance(value, list) else "tuple"
        return {kind: [_encode(item, (*path, i), tensors) for i, item in enumerate(value)]}
    if isinstance(value, _SCALARS):
        return {"value": value}
    raise CheckpointError(
        f"state entry {where!r} is a {type(value).__name__}; a checkpoint stores tensors, "
        "dicts, lists, tuples, numbers, strings and None, never a pickled object"
    )


def join_tensors(structure: Any, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The state dicts `structure` describes, holding the tensors of `tensors` by fqn.

    Raises CheckpointError for a malformed structure or a tensor this run does not have.
    """
    value = _decode(structure, tensors, "structure")
    if not isinstance(value, dict):
        raise CheckpointError(f"the saved structure is a {type(value).__name__}, not a dict")
    return value


def _decode(node: Any, tensors: Mapping[str, torch.Tensor], where: str) -> Any:
    if not isinstance(node, dict) or len(node) != 1:
        raise CheckpointError(f"saved structure at {where}: expected a one-key object")
    ((kind, body),) = node.items()
    if kind == "tensor" and isinstance(body, str):
        if body not in tensors:
            raise CheckpointError(
                f"the checkpoint holds tensor {body!r}, which this run has no place for "
                "(another model, freeze policy or optimizer?)"
            )
        return tensors[body]
    if kind == "dict" and isinstance(body, dict):
        return {key: _decode(item, tensors, f"{where}.{key}") for key, item in body.items()}
    if kind in ("list", "tuple") and isinstance(body, list):
        items = [_decode(item, tensors, f"{where}.{i}") for i, item in enumerate(body)]
        return items if kind == "list" else tuple(items)
    if kind == "value" and isinstance(body, _SCALARS):
        return body
    raise CheckpointError(f"saved structure at {where}: unknown node {kind!r}")


class TensorOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner for state dicts of tensors; a byte (pickled) entry is refused."""

    def create_local_plan(self) -> LoadPlan:
        plan = super().create_local_plan()
        pickled = [item.dest_index.fqn for item in plan.items if item.type == LoadItemType.BYTE_IO]
        if pickled:
            raise CheckpointError(
                f"checkpoint entries {pickled} are not tensors but pickles; refusing to load "
                "them (they could run code)"
            )
        return plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise CheckpointError(
            f"checkpoint entry {read_item.dest_index.fqn!r} is a pickle, not a tensor; "
            "refusing to load it (it could run code)"
        )
