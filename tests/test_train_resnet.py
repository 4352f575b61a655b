"""examples/train_resnet.py, run on the CPU at a tiny size: it learns, evaluates the slow
weights, resumes bit for bit, trains under torchrun with two Gloo processes, runs AMP with a
GradScaler in channels-last, reads an ImageFolder without torchvision, and its built-in
ResNet-152 has torchvision's parameter shapes.

The in-process runs use one thread: on a small shared CI machine OpenMP threads that spin
at barriers on oversubscribed cores turn milliseconds into seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bench.params import param_set
from lookahead_fused import LookaheadSGD

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_resnet.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_resnet", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


tr = _load_script()

# ResNet-18 at width 4 on 16x16 images of 2 classes: a few milliseconds per step.
TINY = [
    "--arch", "resnet18", "--width", "4", "--image-size", "16", "--num-classes", "2", "--batch-size", "8",
    "--synthetic-size", "64", "--synthetic-eval-size", "16", "--workers", "0", "--device", "cpu", "--no-progress",
]  # fmt: skip
EPOCH_LINE = re.compile(
    r"epoch +(\d+)/\d+  train loss (\S+) acc +(\S+)%  eval\(slow\) loss (\S+) acc +(\S+)%  "
    r"lr (\S+)  .* img/s  backend (\w+)"
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(checkpoint: Path, key: str = "model") -> torch.nn.Module:
    """The built-in tiny ResNet with the weights of a checkpoint."""
    model = tr.ResNet("resnet18", num_classes=2, width=4)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)[key])
    return model


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _eval_loss(model: torch.nn.Module) -> float:
    """Mean cross-entropy over the whole synthetic eval set, in one batch."""
    data = tr.SyntheticImages(16, num_classes=2, image_size=16, seed=0, split="val")
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    with torch.no_grad():
        return F.cross_entropy(model.eval()(images), labels).item()


def test_short_run_learns_and_evaluates_the_slow_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "ckpt.pt"
    args = ["--epochs", "3", "--steps-per-epoch", "4", "--k", "3", "--lr-steps", "2", "--checkpoint", str(ckpt)]
    metrics = tr.main([*TINY, *args])

    epochs = [m.groups() for m in map(EPOCH_LINE.search, capsys.readouterr().out.splitlines()) if m]
    assert [int(e[0]) for e in epochs] == [1, 2, 3]  # one log line per epoch
    train_loss = [float(e[1]) for e in epochs]
    eval_loss = [float(e[3]) for e in epochs]
    assert all(map(math.isfinite, train_loss + eval_loss))
    assert train_loss[-1] < train_loss[0] and eval_loss[-1] < eval_loss[0], epochs
    assert [float(e[5]) for e in epochs] == pytest.approx([0.1, 0.1, 0.01])  # lr x0.1 at epoch 2
    cpu_backend = LookaheadSGD([torch.zeros(1, requires_grad=True)], lr=0.1).backend
    assert {e[6] for e in epochs} == {metrics["backend"]} == {cpu_backend}
    assert metrics["step"] == 12 and metrics["eval_loss"] == pytest.approx(eval_loss[-1], abs=1e-4)

    # 12 steps with k=3 end on a sync: fast and slow weights are equal. Evaluate φ from the
    # checkpoint's optimizer state independently and compare with the script's eval loss.
    state = torch.load(ckpt, weights_only=True)
    model = _model(ckpt)
    for p, s in zip(model.parameters(), state["optimizer"]["state"].values()):
        assert torch.equal(p.detach(), s["slow_weights"])
    assert metrics["eval_loss"] == pytest.approx(_eval_loss(model), rel=1e-5)


def test_eval_uses_slow_weights_between_syncs(tmp_path: Path) -> None:
    """5 steps with k=3: θ has moved 2 steps past φ. The reported eval loss is φ's, not θ's."""
    ckpt = tmp_path / "ckpt.pt"
    metrics = tr.main([*TINY, "--epochs", "1", "--steps-per-epoch", "5", "--k", "3", "--checkpoint", str(ckpt)])
    fast = _model(ckpt)
    slow = _model(ckpt)
    state = torch.load(ckpt, weights_only=True)["optimizer"]["state"]
    with torch.no_grad():
        for p, s in zip(slow.parameters(), state.values()):
            p.copy_(s["slow_weights"])
    assert metrics["eval_loss"] == pytest.approx(_eval_loss(slow), rel=1e-5)
    assert _eval_loss(fast) != pytest.approx(_eval_loss(slow), rel=1e-5)


@pytest.mark.parametrize("optimizer", ["lookahead-sgd", "lookahead-adam"])
def test_resume_continues_exactly(tmp_path: Path, optimizer: str) -> None:
    """4 epochs of 2 steps straight vs 2 epochs, checkpoint, resume for 2 more: the same bits.
    k=3 puts the checkpoint (step 4) mid-cycle; the lr decay at epoch 3 comes after the resume."""
    common = [*TINY, "--optimizer", optimizer, "--steps-per-epoch", "2", "--k", "3", "--lr-steps", "3"]
    straight, split = tmp_path / "straight.pt", tmp_path / "split.pt"
    tr.main([*common, "--epochs", "4", "--checkpoint", str(straight)])
    tr.main([*common, "--epochs", "2", "--checkpoint", str(split)])
    assert torch.load(split, weights_only=True)["step"] == 4
    resumed = tr.main([*common, "--epochs", "4", "--resume", str(split), "--checkpoint", str(split)])
    assert resumed["step"] == 8

    a, b = torch.load(straight, weights_only=True), torch.load(split, weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for i, s in a["optimizer"]["state"].items():
        for key, value in s.items():
            assert torch.equal(value, b["optimizer"]["state"][i][key]), (i, key)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    group = a["optimizer"]["param_groups"][0]
    assert a["scheduler"] == b["scheduler"] and group["lr"] == pytest.approx(group["initial_lr"] * 0.1)


def test_torchrun_two_gloo_processes_end_identical(tmp_path: Path) -> None:
    ckpt, metrics_file = tmp_path / "ckpt.pt", tmp_path / "metrics.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
        *TINY, "--epochs", "1", "--steps-per-epoch", "3",
        "--checkpoint", str(ckpt), "--metrics-json", str(metrics_file),
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads(metrics_file.read_text())
    assert metrics["world_size"] == 2 and metrics["step"] == 3
    # Both ranks' parameters hash to the same value, and to rank 0's checkpoint hashed here.
    assert metrics["param_digests"] == [_digest(_model(ckpt))] * 2
    assert "2 process(es)" in proc.stdout and proc.stdout.count("epoch   1/1") == 1  # rank 0 logs alone


def test_builtin_resnets_have_torchvisions_parameter_shapes() -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        models = {arch: tr.ResNet(arch) for arch in ("resnet152", "resnet50", "resnet18")}
    for arch in ("resnet152", "resnet50"):  # bench.params rebuilds them from torchvision's definition
        assert [tuple(p.shape) for p in models[arch].parameters()] == list(param_set(arch).shapes), arch
    resnet152 = list(models["resnet152"].parameters())
    assert (len(resnet152), sum(p.numel() for p in resnet152)) == (467, 60_192_808)
    assert sum(p.numel() for p in models["resnet18"].parameters()) == 11_689_512  # torchvision's documented count
    keys = models["resnet152"].state_dict().keys()  # torchvision's names: checkpoints load either way
    assert {"conv1.weight", "layer1.0.downsample.0.weight", "layer3.35.bn3.running_var", "fc.bias"} <= keys


def test_amp_fp16_grad_scaler_channels_last(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    args = ["--amp", "--amp-dtype", "float16", "--channels-last", "--epochs", "1", "--steps-per-epoch", "3"]
    metrics = tr.main([*TINY, *args, "--k", "2", "--checkpoint", str(ckpt)])
    assert all(math.isfinite(metrics[key]) for key in ("train_loss", "train_acc", "eval_loss", "eval_acc"))
    state = torch.load(ckpt, weights_only=True)
    assert state["scaler"]["scale"] > 0  # an enabled scaler (a disabled one saves an empty dict)
    assert state["model"]["conv1.weight"].is_contiguous(memory_format=torch.channels_last)
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())


def _write_images(root: Path, colours: dict[str, tuple[int, int, int]], count: int) -> None:
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (20 + i, 24), colour).save(root / name / f"{i}.png")


def test_image_folder_without_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tr, "torchvision", None)
    colours = {"blue": (0, 0, 255), "red": (255, 0, 0)}
    _write_images(tmp_path / "train", colours, 4)
    _write_images(tmp_path / "val", colours, 2)

    data = tr.image_folder(tmp_path / "val", size=16, train=False)
    assert [label for _, label in data.samples] == [0, 0, 1, 1]  # classes in sorted order
    image, label = data[2]  # a red image: normalised exactly as (255/255 - mean) / std, (0 - mean) / std
    mean, std = torch.tensor(tr.IMAGENET_MEAN), torch.tensor(tr.IMAGENET_STD)
    expected = (torch.tensor([1.0, 0.0, 0.0]) - mean) / std
    assert label == 1 and image.shape == (3, 16, 16)
    torch.testing.assert_close(image, expected.view(3, 1, 1).expand(3, 16, 16))
    assert tr.image_folder(tmp_path / "train", size=16, train=True)[0][0].shape == (3, 16, 16)

    options = ["--data", str(tmp_path), "--batch-size", "4", "--epochs", "1", "--steps-per-epoch", "2"]
    metrics = tr.main([*TINY, *options])
    assert metrics["step"] == 2 and math.isfinite(metrics["eval_loss"])

    monkeypatch.setattr(tr, "Image", None)
    with pytest.raises(RuntimeError, match="torchvision or Pillow"):
        tr.main([*TINY, *options])
