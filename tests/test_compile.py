"""stt_fast.compile: same logits as the reference, every CPU-runnable backend, every rewrite exact."""

import copy
import threading
import time

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
BACKENDS = ["torch", "triton", "onnxruntime", "openvino"]  # "triton" runs through TRITON_INTERPRET=1 here


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


@pytest.mark.parametrize("conv_bias", [False, True], ids=["conv-without-bias", "conv-with-bias"])
def test_batch_norm_folding_is_exact(conv_bias):
    conv, bn = torch.nn.Conv2d(5, 7, 3, 2, 1, bias=conv_bias).double(), torch.nn.BatchNorm2d(7).double()
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
    from stt_fast.compiler.cls_attention import absorbed_cls_attention
    from stt_fast.model import STAttention

    attn = STAttention(32, 4, mode).double().eval()
    frames, patches = 3, 5
    h = torch.randn(2, 1 + frames * patches, 32, dtype=torch.float64)
    with torch.no_grad():
        full = attn(h, frames)  # [B, L, D] after proj
        absorbed = attn.proj(absorbed_cls_attention(h, attn.qkv.weight, attn.qkv.bias, num_heads=4, num_frames=frames,
                                                    mode=mode))
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


def test_auto_backend_choice(monkeypatch):
    from stt_fast.export.onnxruntime_backend import onnxruntime_available

    from stt_fast.compiler import auto_candidates

    model = STT(get_config("tiny")).eval()
    assert onnxruntime_available(), "the test environment installs the export extras"
    assert auto_candidates(model, torch.device("cpu")) == ["openvino", "onnxruntime", "torch"]
    odd = STT(get_config("tiny").replace(embed_dim=48, num_heads=2)).eval()  # head dim 24: no Triton kernel
    assert auto_candidates(odd, torch.device("cuda")) == ["torch"]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert auto_candidates(model, torch.device("cuda")) == ["triton", "torch"]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4
    assert auto_candidates(model, torch.device("cuda")) == ["torch"]


def _broken_launch(q, k, v, *, num_frames, mode):
    raise RuntimeError("injected launch failure")


def _wrong_results(q, k, v, *, num_frames, mode):
    return torch.zeros_like(q).contiguous()


@pytest.mark.parametrize("validate", [True, False], ids=["validate", "no-validate"])
@pytest.mark.parametrize("failure", [_broken_launch, _wrong_results], ids=["launch-fails", "logits-wrong"])
def test_auto_falls_back_to_torch_when_the_kernels_fail(monkeypatch, caplog, failure, validate):
    """backend="auto" on CUDA tries triton, then torch; the same chain is run here under the interpreter."""
    from stt_fast import compiler
    from stt_fast.compiler import ops

    monkeypatch.setattr(compiler, "auto_candidates", lambda model, device, dtype: ["triton", "torch"])
    monkeypatch.setattr(ops.TritonOps, "attention", staticmethod(failure))
    monkeypatch.setattr(compiler, "_warned", set())
    model = trained_looking(get_config("tiny"))
    if failure is _wrong_results and not validate:
        # without validation only a failure to run (or non-finite logits) is seen: zeros run fine
        assert stt_fast.compile(model, validate=False).backend == "triton"
        return
    with caplog.at_level("WARNING", logger="stt_fast.compiler"):
        compiled = stt_fast.compile(model, validate=validate)
        again = stt_fast.compile(model, validate=validate)
    assert compiled.backend == again.backend == "torch"
    expected = "injected launch failure" if failure is _broken_launch else "ValidationError"
    assert expected in compiled.fallback_reason and "triton float32 failed" in compiled.fallback_reason
    warnings = [r for r in caplog.records if "falling back to torch float32" in r.getMessage()]
    assert len(warnings) == 1, "the reason is logged once"
    x = clips(model.config)
    with torch.no_grad():
        assert relative_error(compiled(x), model(x)) < tolerance(torch.float32).model
    # named explicitly, the backend's own error reaches the caller: at compile time when validating
    # (ValidationError is a RuntimeError), else at the first call
    with pytest.raises(RuntimeError):
        explicit = stt_fast.compile(model, backend="triton", validate=validate)
        with torch.no_grad():
            explicit(x)


def test_auto_on_the_cpu_falls_back_from_openvino_to_onnxruntime_to_torch(monkeypatch):
    from stt_fast.export import onnxruntime_backend, openvino_backend

    def broken(name):
        def build(*args, **kwargs):
            raise RuntimeError(f"injected {name} failure")

        return build

    model = trained_looking(get_config("tiny"))
    monkeypatch.setattr(openvino_backend, "compile_openvino", broken("openvino"))
    compiled = stt_fast.compile(model)
    assert compiled.backend == "onnxruntime" and "injected openvino failure" in compiled.fallback_reason
    monkeypatch.setattr(onnxruntime_backend, "compile_onnxruntime", broken("onnxruntime"))
    compiled = stt_fast.compile(model)
    assert compiled.backend == "torch" and compiled.validation.passed
    assert "injected openvino failure" in compiled.fallback_reason
    assert "injected onnxruntime failure" in compiled.fallback_reason


def test_exported_graph_cache_is_reused_by_both_cpu_runtimes(tmp_path):
    model = trained_looking(get_config("tiny-joint"))
    first = stt_fast.compile(model, backend="onnxruntime", cache_dir=tmp_path)
    assert first.backend == "onnxruntime" and first.validation.passed
    graphs = list(tmp_path.rglob("*.onnx"))
    assert len(graphs) == 1
    stamp = graphs[0].stat().st_mtime_ns
    second = stt_fast.compile(model, backend="openvino", cache_dir=tmp_path)
    assert list(tmp_path.rglob("*.onnx")) == graphs and graphs[0].stat().st_mtime_ns == stamp
    other = trained_looking(get_config("tiny-joint"), seed=1)  # other weights: another graph
    stt_fast.compile(other, backend="onnxruntime", cache_dir=tmp_path)
    assert len(list(tmp_path.rglob("*.onnx"))) == 2
    x = clips(model.config)
    torch.testing.assert_close(first(x), second(x))


class _StandInCapture:
    """capture(example) -> replay, recording captures and replays; checks that replays never overlap."""

    def __init__(self, delay: float = 0.0) -> None:
        self.captured, self.active, self.most_active = [], 0, 0
        self.delay = delay
        self._count = threading.Lock()

    def __call__(self, example):
        key = tuple(example.shape)
        self.captured.append(key)
        static_in = example.clone()  # as CudaGraphCapture: a static input of the bucket's size

        def replay(clips):
            with self._count:
                self.active += 1
                self.most_active = max(self.most_active, self.active)
            time.sleep(self.delay)
            static_in[:clips.shape[0]].copy_(clips)
            static_out = static_in.sum(dim=(1, 2, 3, 4)) + len(key)
            with self._count:
                self.active -= 1
            return static_out[:clips.shape[0]].clone()

        return replay


def test_graph_cache_evicts_the_least_recently_used_shape():
    from stt_fast.compiler.cuda_graphs import GraphCache

    capture = _StandInCapture()
    cache = GraphCache(capture, max_graphs=2)
    a, b, c = (torch.rand(n, 2, 3, 4, 4) for n in (1, 2, 4))
    for x in (a, b, a, c):  # a used again after b: b is the least recently used when c arrives
        torch.testing.assert_close(cache(x), x.sum(dim=(1, 2, 3, 4)) + 5)
    assert capture.captured == [tuple(a.shape), tuple(b.shape), tuple(c.shape)], "a hit must not capture again"
    assert [key[0] for key in cache.cached()] == [tuple(a.shape), tuple(c.shape)]
    cache(b)
    assert [key[0] for key in cache.cached()] == [tuple(c.shape), tuple(b.shape)] and len(cache) == 2
    assert GraphCache(capture, max_graphs=1)(a).shape == (1,)
    with pytest.raises(ValueError, match="max_graphs"):
        GraphCache(capture, max_graphs=0)


def test_graph_cache_serialises_threads_and_captures_each_shape_once():
    """Graphs share one memory pool: no two replays may overlap, and racing first calls of one shape
    must capture it once."""
    from stt_fast.compiler.cuda_graphs import GraphCache

    capture = _StandInCapture(delay=0.01)
    cache = GraphCache(capture, max_graphs=8)
    inputs = [torch.rand(1 + i % 2, 2, 3, 4, 4) for i in range(12)]
    results = [None] * len(inputs)

    def work(i):
        results[i] = cache(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert capture.most_active == 1
    assert sorted(capture.captured) == [(1, 2, 3, 4, 4), (2, 2, 3, 4, 4)]
    for x, got in zip(inputs, results):
        torch.testing.assert_close(got, x.sum(dim=(1, 2, 3, 4)) + 5)


@pytest.mark.parametrize("batch,size", [(1, 1), (2, 2), (3, 4), (5, 8), (33, 64), (64, 64), (65, 128), (200, 256)])
def test_graph_batch_buckets(batch, size):
    from stt_fast.compiler.cuda_graphs import graph_batch

    assert graph_batch(batch) == size


def test_variable_batches_share_the_graph_of_their_bucket():
    """Batches 3 and 4 run in one graph of 4, batch 5 in one of 8: each gets exactly its own rows back,
    whatever the graph's other rows hold from earlier calls. (Mutation: key the cache by the batch size
    itself and four graphs are captured.)"""
    from stt_fast.compiler.cuda_graphs import GraphCache

    capture = _StandInCapture()
    cache = GraphCache(capture, max_graphs=8)
    for n in (4, 3, 5, 3, 4):
        x = torch.rand(n, 2, 3, 4, 4)
        got = cache(x)
        assert got.shape == (n,)
        torch.testing.assert_close(got, x.sum(dim=(1, 2, 3, 4)) + 5)
    assert capture.captured == [(4, 2, 3, 4, 4), (8, 2, 3, 4, 4)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graphs_per_batch_size():
    config = get_config("tiny")
    model = trained_looking(config).cuda()
    compiled = stt_fast.compile(model, max_graphs=2)
    for batch in (1, 2, 3, 1):
        x = clips(config, batch)
        assert relative_error(compiled(x), model.cpu()(x)) < tolerance(torch.float16).model
        model.cuda()
    assert [key[0][0] for key in compiled.graphs.cached()] == [4, 1], "the least recently used graph is evicted"


def test_fused_backbone_and_folded_uint8_scale_compute_the_same_function():
    """The Triton op set's backbone (each convolution + bias + ReLU + residual as one op, the 1/255 of
    uint8 clips in conv1's weights) against the unfused folded trunk and the original trunk, in float64.
    (Mutation: the residual added after the ReLU, or the scale folded twice, and the outputs differ.)"""
    from stt_fast.compiler.folding import FoldedTrunk
    from stt_fast.model import STT

    model = trained_looking(get_config("tiny")).double()
    fused, plain = FoldedTrunk(model.backbone, fused=True), FoldedTrunk(model.backbone, fused=False)
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    frames = pixels.double() / 255
    with torch.no_grad():
        expected = model.backbone(frames)
        torch.testing.assert_close(plain(frames), expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(fused(frames), expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(fused(pixels.double(), uint8_scale=True), expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(plain(pixels.double(), uint8_scale=True), expected, rtol=1e-10, atol=1e-10)
    assert isinstance(model, STT)


def test_the_fused_ops_are_the_triton_op_set_only():
    """The torch fallback and the exported graphs keep PyTorch's standard ops (an ONNX graph cannot hold
    the project's own ops)."""
    from stt_fast.compiler.program import STTProgram

    model = trained_looking(get_config("tiny"))
    for ops, fused in (("triton", True), ("torch", False), ("export", False), ("export-attention-op", False)):
        program = STTProgram(model, ops=ops)
        assert program.backbone.fused is fused and program.fused is fused


# --- the automatic precision (stt_fast.compiler.precision) ---------------------------------------------------

def test_the_default_precision_follows_the_cpus_instruction_sets():
    from stt_fast.compiler.precision import default_precisions

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_precisions(cpu, ["avx2", "avx512f", "avx512_bf16", "avx512_vnni"])[0] == [torch.bfloat16,
                                                                                           torch.float32]
    assert default_precisions(cpu, ["avx2", "amx_tile", "amx_bf16"])[0][0] == torch.bfloat16
    dtypes, reason = default_precisions(cpu, ["avx2", "avx512f", "avx512_vnni"])  # AVX-512 without bf16 units
    assert dtypes == [torch.float32] and "no native bf16" in reason
    assert default_precisions(cpu, [])[0] == [torch.float32]
    assert default_precisions(cuda, [])[0] == [torch.float16]


@pytest.mark.parametrize("isa,expected", [("avx2", torch.float32), ("avx2,avx512f,avx512_bf16", torch.bfloat16)],
                         ids=["avx2", "avx512-bf16"])
def test_compile_chooses_bf16_only_where_the_cpu_has_it_and_says_why(monkeypatch, isa, expected):
    """Where bf16 units are missing nothing is tried in bf16; where they are, the bf16 program is validated at
    bf16's tolerance (OpenVINO's precision hint, or the torch path where OpenVINO is absent)."""
    monkeypatch.setenv("STT_FAST_CPU_ISA", isa)
    model = trained_looking(get_config("tiny"))
    compiled = stt_fast.compile(model)
    assert compiled.dtype == expected and compiled.validation.passed and compiled.fallback_reason is None
    assert compiled.validation.tolerance == tolerance(expected).model
    assert compiled.dtype_reason.startswith(str(expected)[6:]) and "avx512_bf16" in compiled.dtype_reason
    x = clips(model.config, batch=3)
    with torch.no_grad():
        assert relative_error(compiled(x), model(x)) < tolerance(expected).model


def test_a_bf16_program_that_fails_validation_falls_back_to_float32(monkeypatch):
    from stt_fast import accuracy

    monkeypatch.setenv("STT_FAST_CPU_ISA", "avx512f,avx512_bf16")
    monkeypatch.setitem(accuracy.TOLERANCES, torch.bfloat16, accuracy.Tolerance(kernel=1e-9, model=1e-9))
    compiled = stt_fast.compile(trained_looking(get_config("tiny")), backend="openvino")
    assert compiled.dtype == torch.float32 and compiled.validation.passed
    assert "bfloat16 was tried first" in compiled.dtype_reason and "ValidationError" in compiled.fallback_reason
    with pytest.raises(ValidationError):  # asked for explicitly, bf16 is not replaced
        stt_fast.compile(trained_looking(get_config("tiny")), backend="openvino", dtype="bf16")


def test_onnxruntime_refuses_bf16_with_the_reason_and_is_not_tried_for_it(monkeypatch):
    model = trained_looking(get_config("tiny"))
    with pytest.raises(ValueError, match="no bfloat16 kernels"):
        stt_fast.compile(model, backend="onnxruntime", dtype="bf16")
    monkeypatch.setenv("STT_FAST_CPU_ISA", "avx512f,avx512_bf16")
    compiled = stt_fast.compile(model, backend="onnxruntime")  # the automatic precision skips what it cannot run
    assert compiled.dtype == torch.float32 and compiled.fallback_reason is None


def test_warm_up_runs_each_batch_size_once_before_requests():
    """A server warms every batch bucket it will serve (CUDA graphs captured, kernels tuned) before the first
    request, so that no request pays for it under the graph cache's lock."""
    model = trained_looking(get_config("tiny"))
    compiled = stt_fast.compile(model, backend="torch", dtype="fp32")
    seen = []
    original = compiled.program.forward
    compiled.program.forward = lambda x: (seen.append((x.shape[0], x.dtype)), original(x))[1]
    compiled.warm_up([4, 1, 2, 2])
    assert seen == [(1, torch.uint8), (2, torch.uint8), (4, torch.uint8)]


def test_a_convolution_cudnn_cannot_fuse_runs_unfused_and_is_asked_once(caplog):
    """cuDNN may have no fused conv+bias+ReLU engine for a shape (the 3-channel stem): that convolution runs
    unfused (the same numbers), logged once, instead of failing the program."""
    from stt_fast.compiler import conv_ops

    calls = []

    def no_engine(*args):
        calls.append(args)
        raise RuntimeError("CUDNN_STATUS_NOT_SUPPORTED: no engine")

    x, w, b = torch.randn(2, 3, 16, 16), torch.randn(8, 3, 3, 3), torch.randn(8)
    expected = conv_ops.conv_bias_relu_reference(x, w, b, [1, 1], [1, 1])
    with caplog.at_level("WARNING"):
        for _ in range(3):
            got = conv_ops.fused_or_unfused(x, w, b, [1, 1], [1, 1], None, relu=no_engine)
            torch.testing.assert_close(got, expected)
    assert len(calls) == 1 and sum("runs unfused" in r.getMessage() for r in caplog.records) == 1
    conv_ops._UNFUSED.clear()
