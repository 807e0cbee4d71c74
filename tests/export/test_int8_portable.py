"""One bundle, the same numbers on every CPU: the int8 encoders and the int4 decoder (int8 activations)
on this host and on an emulated AVX2-only CPU (tests/emulated_cpu.py), against the fp32 export."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from emulated_cpu import outputs, qemu_unavailable, run_emulated


def _export(tmp_path_factory, checkpoint, name, **opts):
    from minicpmo.export.bundle import export_bundle
    from minicpmo.export.options import ExportOptions

    out = tmp_path_factory.mktemp("bundles") / name
    return export_bundle(checkpoint, out, ExportOptions(**opts), progress=lambda *a: None)


@pytest.fixture(scope="module")
def int8_encoders_bundle(tmp_path_factory, tiny_checkpoint):
    """int8 vision and audio encoders, the default int4 decoder (accuracy level 4)."""
    return _export(tmp_path_factory, tiny_checkpoint, "tiny-enc-int8", vision_precision="int8")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_int8_encoder_weights_fit_the_non_vnni_kernel(int8_encoders_bundle):
    """Without VNNI, MLAS adds pairs of u8*s8 products in a saturating int16: 2 * 255 * |w| must stay
    below 32768, so every weight code must lie in [-64, 64]. Full-range codes (up to 127) lose
    precision on AVX2 hosts only."""
    for part in ("vision", "audio"):
        model = onnx.load(int8_encoders_bundle / f"{part}.onnx", load_external_data=False)
        onnx.external_data_helper.load_external_data_for_model(model, str(int8_encoders_bundle))
        codes = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
        assert len(codes) > 4, part
        worst = max(int(np.abs(c.astype(np.int32)).max()) for c in codes)
        assert 2 * 255 * worst < 32768, (part, worst)


def _here_and_avx2(bundle, tmp_path_factory):
    why = qemu_unavailable()
    if why:
        pytest.skip(why)
    return outputs(bundle), run_emulated(bundle, tmp_path_factory.mktemp("emu") / "avx2.npz")


@pytest.fixture(scope="module")
def here_and_avx2(int8_encoders_bundle, tmp_path_factory):
    return _here_and_avx2(int8_encoders_bundle, tmp_path_factory)


@pytest.fixture(scope="module")
def int4_here_and_avx2(int4_bundle, tmp_path_factory):
    """The default bundle (fp32 encoders): the decoder sees the same inputs on both CPUs."""
    return _here_and_avx2(int4_bundle, tmp_path_factory)


def test_emulator_hides_avx512(here_and_avx2):
    """The comparison below means something only if MLAS saw an AVX2-only CPU."""
    _, emulated = here_and_avx2
    avx2, avx512f, avx512_vnni, avx_vnni = emulated["features"].tolist()
    assert avx2 and not (avx512f or avx512_vnni or avx_vnni)


def test_int8_encoders_agree_on_avx2(here_and_avx2, fp32_bundle):
    here, avx2 = here_and_avx2
    ref = outputs(fp32_bundle)
    for part, bound in (("vision", 0.995), ("audio", 0.99)):
        assert _cosines(here[part], ref[part]).min() >= bound, part
        assert _cosines(avx2[part], ref[part]).min() >= bound, part
        # exact integer sums on both CPUs: only the float parts (norms, softmax) round differently, and
        # a last-bit difference can move an activation to the next int8 step (saturation gave 0.986)
        assert _cosines(avx2[part], here[part]).min() >= 0.9995, part


def test_int4_decoder_agrees_on_avx2(int4_here_and_avx2):
    """MatMulNBits at accuracy level 4 quantizes activations per block to int8 on every CPU, and its
    4-bit x int8 products cannot saturate (2 * 15 * 127 fits int16). From the same input embeddings
    (a text prompt) the logits agree to float rounding and the greedy reply (a fixed 24 tokens: no stop
    ids) is the same. With an image the fp32 vision encoder's embeddings differ in their last bits
    between the CPUs (other SIMD widths, other summation orders); int8 activation rounding in the
    decoder can amplify that (random weights amplify most), so there only the cosine is bounded."""
    here, avx2 = int4_here_and_avx2
    a, b = here["text_logits"], avx2["text_logits"]
    assert float(np.abs(a - b).max()) <= 1e-3 * float(np.abs(a).max())
    assert avx2["greedy"].tolist() == here["greedy"].tolist()
    assert _cosines(here["logits"][None], avx2["logits"][None])[0] >= 0.999
