"""stt_fast.compile: same logits as the reference, every CPU-runnable backend, every rewrite exact."""

import copy
import threading

import pytest
import torch

import stt_fast
from stt_fast import STT, ValidationError, get_config
from stt_fast.accuracy import relative_error, tolerance
from stt_fast.backbone import ResNet18Trunk
from stt_fast.compiler.folding import FoldedTrunk, fold_conv_bn, fold_linear_chain
from stt_fast.compiler.validation import validate
from tests.helpers import clips, trained_looking
from tests.test_inputs import BAD_INPUTS

PRESETS = ["tiny", "tiny-joint"]
BACKENDS = ["torch", "triton", "onnxruntime"]  # "triton" runs through TRITON_INTERPRET=1 here


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", PRESETS)
def test_compiled_matches_reference(preset, backend):
    config = get_config(preset)
    model = trained_looking(config)
    compiled = stt_fast.compile(model, backend=backend)
    assert compiled.backend == backend
    assert compiled.validation is not None and compiled.validation.passed
    x = clips(config, batch=3)
    with torch.no_grad():
        err = relative_error(compiled(x), model(x))
    assert err < tolerance(torch.float32).model


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("preset", PRESETS)
def test_last_block_pruning_at_other_depths(preset, depth):
    """Depth 1: the first block is also the last one (the pruned, cls-only path)."""
    config = get_config(preset).replace(depth=depth)
    model = trained_looking(config)
    x = clips(config)
    with torch.no_grad():
        assert relative_error(stt_fast.compile(model, backend="torch")(x), model(x)) < tolerance(torch.float32).model


def test_input_model_is_not_modified():
    model = trained_looking(get_config("tiny"))
    before = copy.deepcopy(model.state_dict())
    stt_fast.compile(model)
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_batch_norm_folding_is_exact():
    conv, bn = torch.nn.Conv2d(5, 7, 3, 2, 1, bias=False).double(), torch.nn.BatchNorm2d(7).double()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.1, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    bn.eval()
    x = torch.randn(3, 5, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(fold_conv_bn(conv, bn)(x), bn(conv(x)), rtol=1e-12, atol=1e-12)
    trunk = trained_looking(get_config("tiny")).backbone.double()
    frames = torch.rand(4, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(FoldedTrunk(trunk)(frames), trunk(frames), rtol=1e-10, atol=1e-10)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in FoldedTrunk(trunk).modules())
    assert isinstance(trunk, ResNet18Trunk)


def test_linear_chain_folding_is_exact():
    first, second = torch.nn.Linear(6, 5).double(), torch.nn.Linear(5, 4).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(fold_linear_chain(first, second)(x), second(first(x)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["spatial", "joint"])
def test_absorbed_cls_attention_equals_the_reference_cls_row(mode):
    from stt_fast.compiler.cls_attention import AbsorbedClsAttention
    from stt_fast.model import STAttention

    attn = STAttention(32, 4, mode).double().eval()
    frames, patches = 3, 5
    h = torch.randn(2, 1 + frames * patches, 32, dtype=torch.float64)
    with torch.no_grad():
        full = attn(h, frames)  # [B, L, D] after proj
        absorbed = attn.proj(AbsorbedClsAttention(attn.qkv, 4, frames, mode)(h))
    torch.testing.assert_close(absorbed, full[:, 0], rtol=1e-10, atol=1e-12)


def test_validate_catches_a_broken_module():
    model = trained_looking(get_config("tiny"))
    compiled = stt_fast.compile(model, backend="torch", validate=False)
    assert compiled.validation is None
    with torch.no_grad():
        compiled.program.blocks[0].fc2.weight.mul_(3.0)
    with pytest.raises(ValidationError, match="relative error"):
        validate(model, compiled, torch.float32)
    report = validate(model, compiled, torch.float32, raise_on_failure=False)
    assert not report.passed and report.relative_error > report.tolerance


def test_compile_refuses_to_return_a_broken_module(monkeypatch):
    from stt_fast.compiler import ops

    def wrong_attention(q, k, v, *, num_frames, mode):
        return torch.zeros_like(q).contiguous()

    monkeypatch.setattr(ops.TorchOps, "attention", staticmethod(wrong_attention))
    with pytest.raises(ValidationError):
        stt_fast.compile(trained_looking(get_config("tiny")), backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_clips(backend):
    config = get_config("tiny")
    model = trained_looking(config)
    compiled = stt_fast.compile(model, backend=backend, validate=False)
    raw = torch.randint(0, 256, (2, config.num_frames, 3, config.image_size, config.image_size), dtype=torch.uint8)
    with torch.no_grad():
        assert relative_error(compiled(raw), model(raw)) < tolerance(torch.float32).model
        torch.testing.assert_close(compiled(raw), compiled(raw.float() / 255), rtol=1e-5, atol=1e-6)


def test_batch_size_varies_call_to_call():
    config = get_config("tiny-joint")
    model = trained_looking(config)
    compiled = stt_fast.compile(model, validate=False)
    for batch in (1, 4, 2, 1):
        x = clips(config, batch)
        with torch.no_grad():
            out = compiled(x)
            assert out.shape == (batch, 7) and out.dtype == torch.float32
            assert relative_error(out, model(x)) < tolerance(torch.float32).model


def test_safe_from_several_threads():
    config = get_config("tiny")
    model = trained_looking(config)
    compiled = stt_fast.compile(model, validate=False)
    inputs = [clips(config, 1 + i % 3) for i in range(6)]
    with torch.no_grad():
        expected = [compiled(x) for x in inputs]
    results = [None] * len(inputs)

    def work(i):
        with torch.no_grad():
            results[i] = compiled(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want)


@pytest.fixture(scope="module")
def compiled_tiny():
    model = STT(get_config("tiny")).eval()
    return {b: stt_fast.compile(model, backend=b, validate=False) for b in ("torch", "onnxruntime")}


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_to_compiled_module(compiled_tiny, backend, name):
    bad, message = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=message):
        compiled_tiny[backend](bad)


def test_compile_time_errors():
    model = STT(get_config("tiny"))
    with pytest.raises(ValueError, match="training mode"):
        stt_fast.compile(model)
    model.eval()
    with pytest.raises(ValueError, match="unknown backend"):
        stt_fast.compile(model, backend="xla")
    with pytest.raises(ValueError, match="dtype"):
        stt_fast.compile(model, dtype=torch.int8)
    with pytest.raises(ValueError, match="head dim"):
        stt_fast.compile(STT(get_config("tiny").replace(embed_dim=48, num_heads=2)).eval(), backend="triton")
    with pytest.raises(ValueError, match=r"expects an stt_fast\.STT"):
        stt_fast.compile(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown options"):
        stt_fast.compile(model, workspace_gib=2)
    with pytest.raises(ValueError, match="unknown options"):
        stt_fast.compile(model, backend="torch", cache_dir="/tmp")
    with pytest.raises(ValueError, match="inference-only"):
        stt_fast.compile(model, validate=False).train()


def test_auto_backend_choice():
    from stt_fast.export.onnxruntime_backend import onnxruntime_available

    from stt_fast.compiler import _resolve_backend

    model = STT(get_config("tiny")).eval()
    assert onnxruntime_available(), "the test environment installs the export extras"
    assert _resolve_backend("auto", model, torch.device("cpu")) == "onnxruntime"
    odd = STT(get_config("tiny").replace(embed_dim=48, num_heads=2)).eval()  # head dim 24: no Triton kernel
    assert _resolve_backend("auto", odd, torch.device("cuda")) == "torch"
    assert _resolve_backend("auto", model, torch.device("cuda")) == "triton"


def test_onnxruntime_backend_reuses_its_cached_export(tmp_path):
    model = trained_looking(get_config("tiny-joint"))
    first = stt_fast.compile(model, cache_dir=tmp_path)
    assert first.backend == "onnxruntime" and first.validation.passed
    graphs = list(tmp_path.rglob("*.onnx"))
    assert len(graphs) == 1
    stamp = graphs[0].stat().st_mtime_ns
    second = stt_fast.compile(model, cache_dir=tmp_path)
    assert list(tmp_path.rglob("*.onnx")) == graphs and graphs[0].stat().st_mtime_ns == stamp
    other = trained_looking(get_config("tiny-joint"), seed=1)  # other weights: another graph
    stt_fast.compile(other, cache_dir=tmp_path)
    assert len(list(tmp_path.rglob("*.onnx"))) == 2
    x = clips(model.config)
    torch.testing.assert_close(first(x), second(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graphs_per_batch_size():
    config = get_config("tiny")
    model = trained_looking(config).cuda()
    compiled = stt_fast.compile(model, max_graphs=2)
    for batch in (1, 2, 3, 1):
        x = clips(config, batch)
        assert relative_error(compiled(x), model.cpu()(x)) < tolerance(torch.float16).model
        model.cuda()
    assert len(compiled.graphs) == 2
