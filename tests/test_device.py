"""facesiam.device.resolve_device: the one "CUDA when available" rule, and a one-line error for a GPU that is not
there (from the library and from a command)."""

from __future__ import annotations

import pytest
import torch

from facesiam.device import resolve_device
from facesiam.errors import InputError

HAS_GPU = torch.cuda.is_available()


@pytest.fixture
def without_cuda(monkeypatch):
    """torch sees no GPU, whatever this machine has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.skipif(HAS_GPU, reason="checks this machine's default without a GPU")
def test_default_is_cpu_here():
    assert resolve_device() == torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto") == torch.device("cpu")


@pytest.mark.skipif(HAS_GPU, reason="checks the refusal on a machine without CUDA")
def test_explicit_cuda_without_a_gpu_is_a_one_line_input_error_here():
    with pytest.raises(InputError) as info:
        resolve_device("cuda")
    message = str(info.value)
    assert "\n" not in message and "'cuda'" in message and "--device cpu" in message


def test_default_follows_what_torch_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device() == torch.device("cuda") and resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device() == torch.device("cpu") and resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("asked", ["cuda", "cuda:1", torch.device("cuda")])
def test_every_explicit_cuda_form_is_refused_without_a_gpu(without_cuda, asked):
    with pytest.raises(InputError, match="torch sees no CUDA GPU; use --device cpu"):
        resolve_device(asked)


def test_explicit_devices_are_kept(without_cuda):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(InputError, match="unknown device 'gpu'"):
        resolve_device("gpu")


def test_the_evaluator_refuses_a_missing_gpu(without_cuda):
    from facesiam.eval.metrics import verification_metrics

    emb = torch.nn.functional.normalize(torch.randn(8, 4), dim=1).numpy()
    with pytest.raises(InputError, match="no CUDA GPU"):
        verification_metrics(emb, [0, 0, 1, 1, 2, 2, 3, 3], device="cuda")


def test_a_command_with_device_cuda_ends_with_one_line(without_cuda, tiny_model_dir, face_folder):
    from facesiam.commands.compare import main

    image = str(next(face_folder.rglob("*.png")))
    with pytest.raises(SystemExit) as info:
        main(["--checkpoint", str(tiny_model_dir), image, image, "--device", "cuda"])
    message = info.value.code
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith("compare: ") and "--device cpu" in message
