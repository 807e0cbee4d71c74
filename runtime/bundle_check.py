"""The manifest's dimensions checked against the graphs ONNX Runtime actually loaded.

The manifest's digests (manifest.py) catch an edited field in a bundle written with them; these
checks also cover a manifest without digests, and name the field and the graph that disagree
instead of leaving ONNX Runtime to fail mid-request.
"""

from __future__ import annotations

import onnxruntime as ort

from .errors import BundleError
from .manifest import Manifest

_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int8": "tensor(int8)"}


def _shapes(nodes) -> dict[str, list]:
    return {n.name: list(n.shape) for n in nodes}


def _io(manifest: Manifest, shapes: dict[str, list], name: str, field: str, graph: str) -> list:
    if name not in shapes:
        raise BundleError(f"{manifest.path('manifest.json')}: {field} names {name!r}, which {graph} does not "
                          f"have (it has {', '.join(sorted(shapes)[:6])}...); re-export the bundle")
    return shapes[name]


def _expect(manifest: Manifest, field: str, value, actual, graph: str, what: str) -> None:
    """Refuse when a static dimension of the graph differs from the manifest's field."""
    if isinstance(actual, int) and value != actual:
        raise BundleError(f"{manifest.path('manifest.json')}: {field} is {value!r}, but {graph} has {actual} "
                          f"({what}); the manifest does not describe this graph (re-export the bundle)")


def check_decoder(manifest: Manifest, session: ort.InferenceSession) -> None:
    dec, io = manifest["decoder"], manifest["decoder"]["io"]
    graph = dec["file"]
    inputs, outputs = _shapes(session.get_inputs()), _shapes(session.get_outputs())
    for key in ("inputs_embeds", "seqlens_k", "total_sequence_length"):
        _io(manifest, inputs, io[key], f"decoder.io.{key}", graph)
    _io(manifest, outputs, io["logits"], "decoder.io.logits", graph)
    layers = 0
    while io["past_key"].format(i=layers) in inputs:
        layers += 1
    _expect(manifest, "decoder.num_layers", dec["num_layers"], layers, graph, "layers of past_key_values inputs")
    past = _io(manifest, inputs, io["past_key"].format(i=0), "decoder.io.past_key", graph)
    _expect(manifest, "decoder.num_kv_heads", dec["num_kv_heads"], past[1], graph, "KV heads in its cache inputs")
    _expect(manifest, "decoder.head_dim", dec["head_dim"], past[3], graph, "head size in its cache inputs")
    kv_type = next(i.type for i in session.get_inputs() if i.name == io["past_key"].format(i=0))
    want = _ORT_TYPES.get(dec.get("kv_dtype", "float32"))
    if want != kv_type:
        raise BundleError(f"{manifest.path('manifest.json')}: decoder.kv_dtype is {dec.get('kv_dtype')!r}, but "
                          f"{graph}'s cache inputs are {kv_type} (re-export the bundle)")
    hidden = inputs[io["inputs_embeds"]][-1]
    _expect(manifest, "decoder.hidden_size", dec["hidden_size"], hidden, graph, "inputs_embeds width")
    _expect(manifest, "embeddings.shape[1]", manifest["embeddings"]["shape"][1], hidden, graph, "inputs_embeds width")
    _expect(manifest, "decoder.vocab_size", dec["vocab_size"], outputs[io["logits"]][-1], graph, "logits width")


def check_encoder(manifest: Manifest, section: str, session: ort.InferenceSession) -> None:
    """The vision or audio graph: its output width is the decoder's; the vision strips' height is the
    patch size, and each image slice gives query_num rows."""
    info, graph = manifest[section], manifest[section]["file"]
    out = _io(manifest, _shapes(session.get_outputs()), info["output_name"], f"{section}.output_name", graph)
    inputs = _shapes(session.get_inputs())
    for k, name in enumerate(info["input_names"]):
        _io(manifest, inputs, name, f"{section}.input_names[{k}]", graph)
    _expect(manifest, "decoder.hidden_size", manifest["decoder"]["hidden_size"], out[-1], graph, "output width")
    if section == "vision":
        pre = manifest["preprocessing"]
        _expect(manifest, "preprocessing.query_num", pre["query_num"], out[1], graph, "rows per slice")
        pixels = inputs[info["input_names"][0]]
        _expect(manifest, "preprocessing.patch_size", pre["patch_size"], pixels[2], graph, "pixel strip height")
