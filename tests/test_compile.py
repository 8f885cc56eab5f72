"""``--compile``: torch.compile of the backbone, the RPN head and the box head only. The compiled
detector gives eager's detections and losses to float tolerance, keeps its state-dict keys (a
checkpoint loads into an eager model with strict=True), and the flag reaches the model of training,
validation.py and predict.py."""
import argparse
import io

import pytest
import torch

from conftest import train

PARTS = ["backbone", "rpn.head", "roi_heads.box_head", "roi_heads.box_predictor"]


def compiled(method) -> bool:
    """Whether ``method`` is a torch.compile wrapper."""
    return hasattr(method, "_torchdynamo_orig_callable")


def images(*sizes):
    generator = torch.Generator().manual_seed(5)
    return [torch.rand(3, h, w, generator=generator) for h, w in sizes]


def test_compiling_keeps_the_modules_and_the_state_dict_keys(tiny_detector):
    from train_utils.model.compile import compile_static_parts, static_parts

    torch.manual_seed(0)
    model = tiny_detector()
    keys = list(model.state_dict())
    modules = [name for name, _ in model.named_modules()]
    assert compile_static_parts(model) is model
    assert list(model.state_dict()) == keys and [name for name, _ in model.named_modules()] == modules
    assert list(static_parts(model)) == PARTS
    assert all(compiled(part.forward) for part in static_parts(model).values())
    assert compiled(model.roi_heads.box_head.after_fc6)  # training's fused pooling + fc6 calls it
    assert not compiled(model.rpn.forward) and not compiled(model.forward)

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    eager = tiny_detector()
    eager.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    for (name, mine), theirs in zip(model.state_dict().items(), eager.state_dict().values()):
        assert torch.equal(mine, theirs), name
    with pytest.raises(ValueError, match="--compile: mode must be one of default, "):
        compile_static_parts(model, mode="fastest")


@pytest.mark.slow  # inductor compiles C++ kernels: 30 s on 2 cores with a cold cache, 10 s warm
@pytest.mark.parametrize("batches", [
    [((64, 80), (72, 64))],
    [((64, 80), (72, 64)), ((96, 64),)],  # another padded size: one recompile, with dynamic sizes
])
def test_compiled_detections_equal_eager(tiny_detector, batches):
    from train_utils.model.compile import compile_static_parts

    torch.manual_seed(0)
    eager = tiny_detector(box_score_thresh=0.0).eval()
    model = tiny_detector(box_score_thresh=0.0).eval()
    model.load_state_dict(eager.state_dict())
    compile_static_parts(model)
    for sizes in batches:
        batch = images(*sizes)
        with torch.no_grad():
            want, got = eager(batch), model(batch)
        for index, (mine, theirs) in enumerate(zip(got, want)):
            assert len(theirs["boxes"]) > 0, index
            assert torch.equal(mine["labels"], theirs["labels"]), index
            torch.testing.assert_close(mine["boxes"], theirs["boxes"], rtol=0, atol=1e-3)
            torch.testing.assert_close(mine["scores"], theirs["scores"], rtol=0, atol=1e-4)


@pytest.mark.slow  # compiles the backward graphs too (about 30 s on 2 cores)
def test_one_compiled_training_step_matches_eager(tiny_detector):
    from train_utils.model.compile import compile_static_parts

    torch.manual_seed(0)
    eager, model = tiny_detector(), tiny_detector()
    model.load_state_dict(eager.state_dict())
    compile_static_parts(model)
    batch = images((64, 80), (72, 64))
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 8.0, 62.0, 60.0]]), "labels": torch.tensor([1, 2])}
               for _ in batch]
    results = []
    for net in (eager, model):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
        torch.manual_seed(1)
        losses = net(batch, targets)
        sum(losses.values()).backward()
        grads = {name: p.grad.clone() for name, p in net.named_parameters()}
        optimizer.step()
        results.append((losses, grads, net.state_dict()))
    (want, want_grads, want_state), (got, got_grads, got_state) = results
    assert set(got) == set(want) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-3, atol=1e-6, msg=name)
    assert list(got_state) == list(want_state)


@pytest.mark.slow  # traces ResNet-50 FPN four times with dynamo (about 30 s on 2 cores)
def test_resnet50_fpn_backbone_compiles_to_one_graph_also_with_the_cuda_levers():
    """With the CUDA levers (forced on the CPU) the folded BatchNorm of the frozen stages is traced
    into the graph, not read from its cache (which would break the graph at every convolution)."""
    from backbone import resnet50_fpn_backbone
    from network_files import FasterRCNN
    from network_files.ops import fast_path

    torch.manual_seed(0)
    model = FasterRCNN(resnet50_fpn_backbone(), num_classes=3)
    batch = torch.rand(1, 3, 64, 64)
    for training in (False, True):
        model.train(training)
        with fast_path.force_cuda_levers(), torch.autocast("cpu", torch.bfloat16):
            explained = torch._dynamo.explain(model.backbone.forward)(batch)
        torch._dynamo.reset()
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compile_mode_flags():
    from train_utils.cli import add_compile_flags, compile_mode

    parser = argparse.ArgumentParser()
    add_compile_flags(parser)
    assert compile_mode(parser.parse_args([])) is None
    assert compile_mode(parser.parse_args(["--compile"])) == "default"
    assert compile_mode(parser.parse_args(["--compile", "--compile-mode", "max-autotune"])) == "max-autotune"
    with pytest.raises(ValueError, match="^--compile-mode needs --compile$"):
        compile_mode(parser.parse_args(["--compile-mode", "reduce-overhead"]))


def test_validation_and_predict_load_a_compiled_detector(tmp_path):
    """load_detector (validation.py, predict.py) compiles the static parts with --compile; the
    compiled model's state dict is the file's, key for key."""
    from train_utils.cli import add_model_arguments
    from train_utils.loading import load_detector
    from train_utils.model.builder import build_model

    torch.manual_seed(0)
    state = build_model({"backbone": "mobilenet_v2", "num_classes": 3}).state_dict()
    torch.save(state, tmp_path / "bare.pth")
    (tmp_path / "classes.json").write_text('{"cat": 1, "dog": 2}')
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    common = ["--device", "cpu", "--backbone", "mobilenet_v2", "--classes-json", str(tmp_path / "classes.json")]
    for flags, expected in (([], False), (["--compile"], True)):
        model = load_detector(parser.parse_args(common + flags), str(tmp_path / "bare.pth")).model
        assert compiled(model.backbone.forward) is expected and compiled(model.roi_heads.box_predictor.forward) is expected
        assert list(model.state_dict()) == list(state)


@pytest.mark.slow  # a training run with compiled parts (565 s on 2 cores under a load of 10)
def test_training_with_compile_compiles_and_its_checkpoint_loads_eager(demo_voc, tmp_path):
    from train_utils.model.builder import build_model

    out = tmp_path / "run"
    run = train("train_mobilenet.py", demo_voc, out, "--epochs", "1", "--compile", timeout=1800)
    assert f"torch.compile (mode default): {', '.join(PARTS)}" in run.stdout
    checkpoint = torch.load(out / "model-0.pth", weights_only=True)
    model = build_model(checkpoint["model_config"])
    model.load_state_dict(checkpoint["model"], strict=True)


def test_the_ema_copy_of_a_compiled_model_runs_its_own_weights(tiny_detector, monkeypatch):
    """torch.compile returns a plain function holding the bound method it compiled (a deep copy
    keeps such a function as it is): the EMA copy must run its own parts, on its own weights, and
    the trainer compiles those parts, not the live model's, again."""
    import functools

    from train_utils.engine.ema import ModelEMA
    from train_utils.model.compile import compile_static_parts, static_parts

    compiled_for = []

    def fake_compile(method, **kwargs):
        compiled_for.append(method.__self__)

        @functools.wraps(method)
        def run(*args, **kw):
            return method(*args, **kw)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    torch.manual_seed(0)
    model = compile_static_parts(tiny_detector(box_score_thresh=0.0).eval())
    ema = ModelEMA(model, decay=0.5, tau=0)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.5).add_(0.1)  # the raw weights move away from the copy's
    eager = tiny_detector(box_score_thresh=0.0).eval()
    eager.load_state_dict(ema.module.state_dict())
    batch, padded = images((64, 80)), torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ema_map, raw_map = ema.module.backbone(padded), model.backbone(padded)  # one map: a tensor
        assert not torch.equal(ema_map, raw_map)
        torch.testing.assert_close(ema_map, eager.backbone(padded), rtol=0, atol=0)
        want = eager(batch)[0]
        torch.testing.assert_close(ema.module(batch)[0], want, rtol=0, atol=0)

    from train_utils.engine.trainer import Trainer

    compiled_for.clear()
    trainer = Trainer(argparse.Namespace(ema=0.5, ema_warmup=0.0, compile=True, compile_mode=None))
    trainer.model_without_ddp = model
    trainer.build_ema()
    ema = trainer.ema
    ema.module.load_state_dict(eager.state_dict())
    parts = list(static_parts(ema.module).values())
    assert compiled_for == [parts[0], parts[1], parts[2], parts[2], parts[3]]  # the box head: forward, after_fc6
    with torch.no_grad():
        torch.testing.assert_close(ema.module(batch)[0], want, rtol=0, atol=0)
