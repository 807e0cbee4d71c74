"""onnxruntime-genai's model builder with its int4 pass run one MatMul at a time.

Why this wrapper exists: the builder's `to_nbits` turns the whole graph into one ModelProto with
every weight materialised in fp32 and only then quantizes it, so building the 7B shape needs
~58 GB; this machine has 24 GB. Quantization itself is per MatMul (ORT's MatMulNBitsQuantizer with
the builder's own bits, block size, symmetry and accuracy level), so this wrapper replaces only
`to_nbits`: for each MatMul it hands ORT's quantizer a one-node model holding that weight, splices
the MatMulNBits node it returns into the builder's graph and drops the fp32 weight (and with it
the last reference to the torch tensor it came from) before the next one. Everything else is the
unmodified builder. `--check DIR` builds a small checkpoint both ways and compares every node,
attribute and initializer byte; RESULTS.md records that check.

    python -m benchmarks.ortgenai_build -i HF_DIR -o OUT -p int4 -e cpu [builder flags]
    python -m benchmarks.ortgenai_build --check HF_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path


def _streaming_to_nbits(original):
    import onnx
    import onnx_ir as ir
    from onnx import helper, numpy_helper
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    def to_nbits(self) -> ir.Model:
        q = self.quant_attrs
        plain = (getattr(self, "quantization_algo", "default") == "default"
                 and not getattr(self, "int4_customized_weight_config", None)
                 and not getattr(self, "exact_quant_override_names", None)
                 and not q["use_qdq"] and set(q["op_types_to_quantize"]) <= {"MatMul"})
        if not plain:  # a path this wrapper does not reproduce: the builder's own, whole-graph pass
            print("streaming int4 pass: unsupported options, using the builder's own pass", file=sys.stderr)
            return original(self)
        graph = self.model.graph
        matmuls = [n for n in graph if n.op_type == "MatMul" and n.domain in ("", "ai.onnx")
                   and n.name not in q["nodes_to_exclude"] and n.inputs[1] is not None
                   and n.inputs[1].const_value is not None and len(n.inputs[1].shape) == 2]
        for i in range(len(matmuls)):
            node, matmuls[i] = matmuls[i], None  # the list must not keep the old node (and its weight) alive
            a, w = node.inputs
            weight = w.const_value.numpy()  # materialises this one weight (fp32)
            k = weight.shape[0]
            one = helper.make_model(helper.make_graph(
                [helper.make_node("MatMul", [a.name, w.name], [node.outputs[0].name], name=node.name)], "one",
                [helper.make_tensor_value_info(a.name, onnx.TensorProto.FLOAT, ["m", k])],
                [helper.make_tensor_value_info(node.outputs[0].name, onnx.TensorProto.FLOAT, None)]),
                opset_imports=[helper.make_opsetid("", 21)])
            # raw_data set in place: the head (2.2 GB in fp32) is past protobuf's 2 GB limit for
            # serialising, which graph.initializer.extend() does; an in-memory field has no limit
            init = one.graph.initializer.add()
            init.name, init.data_type = w.name, onnx.TensorProto.FLOAT
            init.dims.extend(weight.shape)
            init.raw_data = weight.tobytes()
            del weight, init
            quant = MatMulNBitsQuantizer(
                model=one, bits=q["bits"], block_size=q["matmul_block_size"], is_symmetric=q["is_symmetric"],
                accuracy_level=q["accuracy_level"], nodes_to_exclude=[], quant_format=QuantFormat.QOperator,
                op_types_to_quantize=q["op_types_to_quantize"], algo_config=None)
            quant.process()
            done = quant.model.model.graph
            if len(done.node) != 1 or done.node[0].op_type != "MatMulNBits":
                raise RuntimeError(f"{node.name}: expected one MatMulNBits from ORT's quantizer, got "
                                   f"{[n.op_type for n in done.node]}")
            qnode = done.node[0]
            inits = {t.name: t for t in done.initializer}
            inputs = [a]
            for name in qnode.input[1:]:
                if not name:
                    inputs.append(None)
                    continue
                # a numpy copy: a reference into the quantizer's ModelProto would keep that message's
                # whole arena alive, fp32 weight included (upb frees an arena only as a whole)
                value = ir.Value(name=name, const_value=ir.tensor(numpy_helper.to_array(inits[name]), name=name))
                graph.register_initializer(value)
                inputs.append(value)
            attrs = {at.name: helper.get_attribute_value(at) for at in qnode.attribute}
            new = ir.Node(qnode.domain, qnode.op_type, inputs, ir.convenience.convert_attributes(attrs),
                          name=qnode.name, num_outputs=1)
            ir.convenience.replace_nodes_and_values(graph, node, [node], [new], node.outputs, new.outputs)
            if not w.uses():
                graph.initializers.pop(w.name)
                w.const_value = None  # a LazyTensor caches what it materialised: drop the fp32 copy now
            del node, w, one, quant, done, inits
            if (i + 1) % 16 == 0 or i + 1 == len(matmuls):
                print(f"streaming int4 pass: {i + 1}/{len(matmuls)} MatMuls", file=sys.stderr, flush=True)
        self.prepack_matmulnbits_weights(None)  # CUDA-only post-pass; a no-op for -e cpu
        return self.model

    return to_nbits


def patch_builder() -> None:
    import onnxruntime_genai.models  # noqa: F401  (puts the builder's folder on sys.path)
    from builders import base  # the name builder.py itself imports it under

    if not getattr(base.Model.to_nbits, "_streaming", False):
        base.Model.to_nbits = _streaming_to_nbits(base.Model.to_nbits)
        base.Model.to_nbits._streaming = True


def run_builder(argv: list[str]) -> None:
    import runpy

    patch_builder()
    sys.argv = ["builder", *argv]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)


def compare_models(a: Path, b: Path) -> list[str]:
    """Differences between two ONNX models: node list, attributes, initializer bytes."""
    import onnx
    from onnx import helper, numpy_helper

    ma, mb = onnx.load(str(a)), onnx.load(str(b))
    diffs = []
    na = [(n.op_type, n.domain, list(n.input), list(n.output)) for n in ma.graph.node]
    nb = [(n.op_type, n.domain, list(n.input), list(n.output)) for n in mb.graph.node]
    if sorted(map(str, na)) != sorted(map(str, nb)):
        diffs.append("node lists differ")
    attrs = {n.name: {x.name: helper.get_attribute_value(x) for x in n.attribute} for n in ma.graph.node}
    for n in mb.graph.node:
        if attrs.get(n.name) != {x.name: helper.get_attribute_value(x) for x in n.attribute}:
            diffs.append(f"attributes of {n.name} differ")
    ia = {t.name: numpy_helper.to_array(t) for t in ma.graph.initializer}
    ib = {t.name: numpy_helper.to_array(t) for t in mb.graph.initializer}
    if ia.keys() != ib.keys():
        diffs.append(f"initializer names differ: {sorted(ia.keys() ^ ib.keys())[:5]}")
    for name in ia.keys() & ib.keys():
        if ia[name].dtype != ib[name].dtype or ia[name].tobytes() != ib[name].tobytes():
            diffs.append(f"initializer {name} differs")
    return diffs


def check(hf_dir: Path, work: Path) -> int:
    import subprocess

    flags = ["-p", "int4", "-e", "cpu", "--extra_options", "accuracy_level=4", "block_size=32"]
    for mode in ("builder", "streaming"):
        mod = "onnxruntime_genai.models.builder" if mode == "builder" else "benchmarks.ortgenai_build"
        subprocess.run([sys.executable, "-m", mod, "-i", str(hf_dir), "-o", str(work / mode),
                        "-c", str(work / f"{mode}-cache"), *flags], check=True)
    diffs = compare_models(work / "builder" / "model.onnx", work / "streaming" / "model.onnx")
    print("identical" if not diffs else "\n".join(diffs[:20]))
    return 1 if diffs else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--check"]:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            sys.exit(check(Path(sys.argv[2]), Path(tmp)))
    run_builder(sys.argv[1:])
