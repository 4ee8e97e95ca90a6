"""The bundled tiny digits model: format, likelihood and conditional quality (assets/README.md).

Quality is judged by two independent classifiers: a logistic regression trained on the real
training digits labels guided class-conditional samples, and the flow itself, used as a Bayes
classifier, labels the held-out real digits.
"""
import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from tarflow_ref import Guidance, TarFlowConfig, denoise, load_checkpoint, sample
from tarflow_ref.assets import BUNDLED_GUIDANCE, BUNDLED_NAME, bundled_checkpoint
from tarflow_ref.torch_backend.bayes import classify
from tarflow_ref.training.data import load_digits_split, to_model_range
from tarflow_ref.training.train import evaluate_bpd

SAMPLE_THRESHOLD = 0.80
BAYES_THRESHOLD = 0.85
RECORDED_BPD = 6.543           # assets/README.md


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)    # per-token products of a width-64 model are too small to share
    return load_checkpoint(bundled_checkpoint())


@pytest.fixture(scope="module")
def digit_classifier():
    """Logistic regression on the real training digits, in model range [-1, 1]."""
    images, labels = load_digits_split("train")
    return LogisticRegression(max_iter=2000).fit(to_model_range(images).flatten(1).numpy(), labels)


def test_bundled_file_is_a_small_released_format_state_dict(model):
    path = bundled_checkpoint()
    assert path.name == BUNDLED_NAME and path.stat().st_size < 3e6
    state = torch.load(path, weights_only=True)
    assert all(v.dtype == torch.float32 for v in state.values())
    assert model.config == TarFlowConfig(image_size=8, patch_size=1, channels=1, width=64, blocks=4, layers=1,
                                         num_classes=10, head_dim=64, noise_std=0.1)


def test_held_out_bits_per_dim_is_the_recorded_figure_and_labels_help(model):
    images, labels = load_digits_split("test")
    labelled = evaluate_bpd(model, images, labels, seed=0)
    unlabelled = evaluate_bpd(model, images, None, seed=0)
    assert labelled == pytest.approx(RECORDED_BPD, abs=5e-3)
    assert labelled < unlabelled
    # the initial (identity) flow: z = x, logdet = 0, bits/dim = (0.5 mean x^2 + 0.5 log 2 pi + log 128) / log 2
    x = to_model_range(images).double()
    identity = (0.5 * (x ** 2).mean().item() + 0.5 * math.log(2 * math.pi) + math.log(128)) / math.log(2)
    assert labelled < identity - 2


def test_the_flow_as_bayes_classifier_labels_held_out_digits(model):
    images, labels = load_digits_split("test")
    accuracy = (classify(model, to_model_range(images)).numpy() == labels).mean()
    assert accuracy >= BAYES_THRESHOLD, accuracy


def test_guided_samples_are_recognised_as_the_requested_digit(model, digit_classifier):
    y = torch.arange(10).repeat(10)                                       # ten samples of each class
    noise = torch.randn(len(y), 64, 1, generator=torch.Generator().manual_seed(0))
    x = sample(model, noise, y, Guidance(BUNDLED_GUIDANCE))
    x = denoise(model, x, y).clamp(-1, 1)
    predicted = digit_classifier.predict(x.flatten(1).detach().numpy())
    accuracy = (predicted == y.numpy()).mean()
    assert accuracy >= SAMPLE_THRESHOLD, accuracy
    # without the label the same noise gives digits the classifier spreads over the classes
    free = denoise(model, sample(model, noise)).clamp(-1, 1)
    assert len(np.unique(digit_classifier.predict(free.flatten(1).detach().numpy()))) >= 8
