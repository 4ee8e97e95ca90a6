"""Strict, safe checkpoint loading (tarflow_ref/io/checkpoint.py; book/checkpoints.md, "Files and names",
"State-dict keys and shapes").

A checkpoint saved with torch.save(state_dict) loads back exactly with its configuration inferred
from the tensor shapes (and sigma from its metadata record or a released-pattern name). Everything
else fails with a CheckpointError that names the problem: missing / unexpected / wrongly shaped
keys, a mask that is not causal, files that are not checkpoints, truncated files, pickles that
would run code (and the code must not run), missing files, a name or a metadata record that
contradicts the tensors, a name whose sigma contradicts the record, and NaN or infinite weights.
(Downloading a released file: tests/test_registry.py.)
"""
import os
import pickle
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

from tarflow_ref import CheckpointError, TarFlow, load_checkpoint
from tarflow_ref.io.checkpoint import (
    config_from_state_dict,
    model_metadata,
    read_metadata,
    save_model,
    write_state_dict,
)
from tarflow_ref.io.files import remove_partials, written_atomically

from conftest import SMALL_CONFIGS, make_model

CONFIGS = dict(SMALL_CONFIGS, **{"uncond-gray-P2": SMALL_CONFIGS["cond-odd-P1-gray"].replace(
    image_size=8, patch_size=2, num_classes=0)})
MARKER_ENV = "TARFLOW_REF_PAYLOAD_RAN"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A float32 checkpoint of "cond-even-P2" in a released-pattern file name, and its state dict."""
    cfg = SMALL_CONFIGS["cond-even-P2"].replace(noise_std=0.07)
    model, _ = make_model(cfg, dtype=torch.float32)
    path = tmp_path_factory.mktemp("ckpt") / cfg.file_name("toy")
    torch.save(model.state_dict(), path)
    return path, cfg, model.state_dict()


@pytest.mark.parametrize("built_on", ["meta", "cpu"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_infers_the_configuration(name, built_on, tmp_path, rng, monkeypatch):
    # both ways load_checkpoint builds the model before the weights go in (build_device)
    monkeypatch.setattr("tarflow_ref.io.checkpoint.META_ABOVE", 0 if built_on == "meta" else 10**12)
    cfg = CONFIGS[name].replace(noise_std=0.15)
    model, _ = make_model(cfg, dtype=torch.float32)
    path = tmp_path / cfg.file_name("toy")                              # toy_model_{P}_{C}_{N}_{L}_0.15.pth
    torch.save(model.state_dict(), path)
    loaded = load_checkpoint(path, head_dim=cfg.head_dim)               # d is not in the tensors
    assert loaded.config == cfg
    assert not loaded.training
    state = loaded.state_dict()
    assert list(state) == list(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    x = torch.from_numpy(rng.uniform(-1, 1, size=(2, cfg.channels, cfg.image_size, cfg.image_size))).float()
    y = torch.tensor([0, -1]) if cfg.conditional else None
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, y), model(x, y), rtol=0, atol=0)


def test_loading_the_bundled_model_does_not_import_the_compiler():
    """A small model is not built on the meta device, whose first operations import torch._dynamo
    (seconds for every command)."""
    code = ("import sys; from tarflow_ref.assets import bundled_checkpoint; "
            "from tarflow_ref.io.checkpoint import load_checkpoint; load_checkpoint(bundled_checkpoint()); "
            "print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "False", done.stdout + done.stderr


def test_sigma_from_the_name_or_the_argument(saved, tmp_path):
    path, cfg, state = saved
    assert load_checkpoint(path, head_dim=8).config.noise_std == 0.07
    assert load_checkpoint(path, head_dim=8, noise_std=0.5).config.noise_std == 0.5
    plain = tmp_path / "weights.pth"
    torch.save(state, plain)
    assert load_checkpoint(plain, head_dim=8).config == cfg.replace(noise_std=None)


def save_changed(tmp_path, state, **changes):
    """The state dict with entries replaced (None removes one), saved; returns the path."""
    changed = {k: v for k, v in state.items() if changes.get(k, 0) is not None}
    changed.update({k: v for k, v in changes.items() if v is not None})
    path = tmp_path / "changed.pth"
    torch.save(changed, path)
    return path


def test_missing_key_is_named_with_its_shape(saved, tmp_path):
    _, _, state = saved
    key = "blocks.1.attn_blocks.0.attention.qkv.weight"
    with pytest.raises(CheckpointError, match=rf"missing key '{key}' \(expected shape \[96, 32\]\)"):
        load_checkpoint(head_dim=8, path=save_changed(tmp_path, state, **{key: None}))


def test_unexpected_key_is_named_with_its_shape(saved, tmp_path):
    _, _, state = saved
    with pytest.raises(CheckpointError, match=r"unexpected key 'blocks.0.extra.weight' \(shape \[3, 4\]\)"):
        load_checkpoint(head_dim=8, path=save_changed(tmp_path, state, **{"blocks.0.extra.weight": torch.zeros(3, 4)}))


def test_wrong_shape_names_key_expected_and_found(saved, tmp_path):
    _, _, state = saved
    key = "blocks.1.attn_blocks.1.mlp.main.2.weight"
    with pytest.raises(CheckpointError, match=rf"key '{key}' has shape \[32, 100\], expected \[32, 128\]"):
        load_checkpoint(head_dim=8, path=save_changed(tmp_path, state, **{key: torch.zeros(32, 100)}))


def test_many_problems_are_all_counted(saved, tmp_path):
    _, _, state = saved
    extra = {f"junk.{i}": torch.zeros(1) for i in range(13)}
    with pytest.raises(CheckpointError, match=r"unexpected key 'junk.0'.*; and 3 more"):
        load_checkpoint(head_dim=8, path=save_changed(tmp_path, state, **extra))


@pytest.mark.parametrize("where", [(0, 3), (5, 2)], ids=["future-allowed", "past-hidden"])
def test_mask_that_is_not_causal(saved, tmp_path, where):
    _, _, state = saved
    mask = state["blocks.1.attn_mask"].clone()
    mask[where] = 1 - mask[where]
    with pytest.raises(CheckpointError, match="'blocks.1.attn_mask' is not the lower-triangular causal mask of ones"):
        load_checkpoint(head_dim=8, path=save_changed(tmp_path, state, **{"blocks.1.attn_mask": mask}))


def test_shapes_that_describe_no_tarflow(tmp_path):
    with pytest.raises(CheckpointError, match=r"no 'blocks.\{b\}.attn_blocks.\{l\}.\*' keys: not a TarFlow state dict"):
        config_from_state_dict({"weight": torch.zeros(2, 2)})
    base = {"blocks.0.attn_blocks.0.attention.norm.weight": torch.zeros(32)}
    with pytest.raises(CheckpointError, match="missing key 'blocks.0.pos_embed': not a TarFlow state dict"):
        config_from_state_dict(base)
    state = dict(base, **{"blocks.0.pos_embed": torch.zeros(15, 32), "blocks.0.proj_in.weight": torch.zeros(32, 12)})
    with pytest.raises(CheckpointError, match="'blocks.0.pos_embed' has 15 tokens, which is not a square patch grid"):
        config_from_state_dict(state)
    state["blocks.0.pos_embed"] = torch.zeros(16, 32)
    state["blocks.0.proj_in.weight"] = torch.zeros(32, 8)
    with pytest.raises(CheckpointError, match=r"proj_in takes 8 values per token, which is neither 3\*P\^2 nor P\^2"):
        config_from_state_dict(state)
    state["blocks.0.proj_in.weight"] = torch.zeros(32, 12, 1)
    message = r"key 'blocks.0.proj_in.weight' has shape \[32, 12, 1\], expected 2 dimensions"
    with pytest.raises(CheckpointError, match=message):
        config_from_state_dict(state)
    state["blocks.0.proj_in.weight"] = torch.zeros(30, 12)
    state["blocks.0.pos_embed"] = torch.zeros(16, 30)
    with pytest.raises(CheckpointError, match="width 30 is not divisible by head width 64"):
        config_from_state_dict(state)


# ---- files that are not checkpoints ----------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nothere.pth: no such checkpoint file"):
        load_checkpoint(tmp_path / "nothere.pth")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path)                                         # a directory is no file either


def test_random_bytes(tmp_path):
    path = tmp_path / "random.pth"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="random.pth: not a readable checkpoint"):
        load_checkpoint(path)


def test_text_file(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not the weights you are looking for\n")
    with pytest.raises(CheckpointError, match="notes.pth: not a readable checkpoint"):
        load_checkpoint(path)


def test_truncated_checkpoint(saved, tmp_path):
    path, _, _ = saved
    data = path.read_bytes()
    half = tmp_path / "half.pth"
    half.write_bytes(data[:len(data) // 2])
    message = r"half.pth: not a readable checkpoint \(truncated or not a torch.save file\)"
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(half)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="expected a state dict of tensors, found Tensor"):
        load_checkpoint(path)
    torch.save({"model": {"w": torch.zeros(2)}, "step": 10}, path)
    with pytest.raises(CheckpointError, match="expected a state dict of tensors, but 'model' holds a dict"):
        load_checkpoint(path)


class Payload:
    """Unpickling this object runs code: it writes a marker file and sets an environment variable."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        code = f"import os; open({self.marker!r}, 'w').close(); os.environ[{MARKER_ENV!r}] = '1'"
        return exec, (code,)


def ran(marker):
    return marker.exists() or MARKER_ENV in os.environ


def test_the_payload_really_runs_code_when_unpickled(tmp_path, monkeypatch):
    """Guards the next test: the crafted pickle is dangerous under a plain pickle.load."""
    monkeypatch.delenv(MARKER_ENV, raising=False)
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists() and os.environ[MARKER_ENV] == "1"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["pickle-protocol-2", "pickle-default", "torch.save"])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch, writer):
    monkeypatch.delenv(MARKER_ENV, raising=False)
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    obj = {"blocks.0.pos_embed": Payload(marker)}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2 if writer == "pickle-protocol-2" else pickle.DEFAULT_PROTOCOL)
    assert not ran(marker)
    message = r"evil.pth: refused to load: the file holds objects other than tensors .*exec" \
        if writer != "pickle-default" else r"evil.pth: (refused to load|not a readable checkpoint)"
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
    assert not ran(marker), "loading the checkpoint ran code from the file"


# ---- names and the metadata record against the tensors ---------------------------------------------

def test_a_released_pattern_name_that_contradicts_the_tensors_is_refused(saved, tmp_path):
    _, _, state = saved                                                 # P 2, C 32, 2 blocks, 2 layers
    wrong = tmp_path / "toy_model_4_32_3_2_0.07.pth"
    torch.save(state, wrong)
    with pytest.raises(CheckpointError, match=r"toy_model_4_32_3_2_0.07.pth: the file name says patch size 4, "
                                              r"blocks 3, but the weights have patch size 2, blocks 2: the name "
                                              r"does not describe this checkpoint; rename the file"):
        load_checkpoint(wrong, head_dim=8)


def test_a_released_name_also_fixes_image_size_classes_and_rgb(tmp_path):
    """The bundled digits weights under the name of a released ImageNet model do not load."""
    from tarflow_ref.assets import bundled_checkpoint
    copy = tmp_path / "imagenet_model_2_768_8_8_0.05.pth"
    copy.write_bytes(bundled_checkpoint().read_bytes())
    with pytest.raises(CheckpointError, match=r"the file name says patch size 2, width 768, blocks 8, layers 8, "
                                              r"image size 64, classes 1000, channels 3, but the weights have "
                                              r"patch size 1, width 64, blocks 4, layers 1, image size 8, "
                                              r"classes 10, channels 1"):
        load_checkpoint(copy)


def test_a_trained_checkpoint_carries_its_sigma_which_no_name_overrides(tmp_path):
    """The bundled model renamed to sigma 0.90 is refused; under a plain name it keeps 0.10."""
    from tarflow_ref.assets import bundled_checkpoint
    original = load_checkpoint(bundled_checkpoint()).config
    renamed = tmp_path / "digits_model_1_64_4_1_0.90.pth"
    renamed.write_bytes(bundled_checkpoint().read_bytes())
    with pytest.raises(CheckpointError, match=r"digits_model_1_64_4_1_0.90.pth: the file name says sigma 0.90, but "
                                              r"the model was trained with sigma 0.10 \(its metadata record\)"):
        load_checkpoint(renamed)
    assert load_checkpoint(renamed, noise_std=0.9).config.noise_std == 0.9          # an explicit choice
    plain = tmp_path / "weights.pth"
    plain.write_bytes(bundled_checkpoint().read_bytes())
    assert load_checkpoint(plain).config == original and original.noise_std == 0.1


def test_the_metadata_record_leaves_a_plain_released_format_state_dict(tmp_path):
    cfg = CONFIGS["uncond-gray-P2"].replace(noise_std=0.125)
    model, _ = make_model(cfg, dtype=torch.float32)
    path = tmp_path / "weights.pth"
    save_model(model, path, model_metadata(cfg, step=7))
    state = torch.load(path, weights_only=True, mmap=True)             # what any released-format reader sees
    assert list(state) == list(model.state_dict())
    fresh = TarFlow(cfg)
    fresh.load_state_dict(state, strict=True)
    assert read_metadata(path) == {"config": asdict(cfg), "step": 7}
    assert load_checkpoint(path, head_dim=None).config == cfg          # head width 8 from the record
    (tmp_path / "again").mkdir()
    save_model(model, tmp_path / "again" / "weights.pth", model_metadata(cfg, step=7))
    assert (tmp_path / "again" / "weights.pth").read_bytes() == path.read_bytes()     # no time stamps
    name = tmp_path / cfg.file_name("toy")                              # sigma 0.125 is written '0.12'
    name.write_bytes(path.read_bytes())
    assert load_checkpoint(name).config.noise_std == 0.125
    assert read_metadata(plain_copy(model, tmp_path)) is None


def plain_copy(model, tmp_path):
    path = tmp_path / "plain.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("record, message", [
    ({"config": {"image_size": 8}}, "does not hold a configuration"),
    ({"step": 3}, "has no configuration"),
    ({"config": "nonsense"}, "has no configuration"),
    ("changed-classes", r"describes another model than its weights \(num_classes 7 vs 4\)"),
    ("bad-sigma", r"describes no TarFlow: noise_std \(sigma of the training noise\) must be a finite number >= 0, "
                  r"got -1.0"),
])
def test_a_metadata_record_that_does_not_fit_is_refused(saved, tmp_path, record, message):
    _, cfg, state = saved
    if record == "changed-classes":
        record = model_metadata(cfg.replace(num_classes=7))
    elif record == "bad-sigma":
        record = model_metadata(cfg)                  # by hand: TarFlowConfig itself refuses sigma -1
        record["config"]["noise_std"] = -1.0
    path = tmp_path / "weights.pth"
    write_state_dict(state, path, record)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, head_dim=8)


def test_weights_that_hold_nan_or_infinity_are_refused(saved, tmp_path):
    _, _, state = saved
    for bad in (float("nan"), float("inf")):
        weight = state["blocks.1.proj_out.weight"].clone()
        weight[0, 0] = bad
        with pytest.raises(CheckpointError, match=r"changed.pth: the weights hold NaN or infinite values \(in "
                                                  r"'blocks.1.proj_out.weight'\): the model diverged in training; "
                                                  r"it cannot be evaluated or sampled"):
            load_checkpoint(save_changed(tmp_path, state, **{"blocks.1.proj_out.weight": weight}), head_dim=8)


def test_a_killed_write_leaves_temporary_folders_that_remove_partials_clears(tmp_path):
    target = tmp_path / "out.png"
    with pytest.raises(KeyboardInterrupt):
        with written_atomically(target) as partial:
            partial.write_bytes(b"half")
            raise KeyboardInterrupt                                    # an interrupted write cleans up itself
    assert list(tmp_path.iterdir()) == []
    stale = tmp_path / ".out.png.abc123"                               # what SIGKILL leaves behind
    stale.mkdir()
    (stale / "out.png").write_bytes(b"half")
    other = tmp_path / ".out.png.keep"                                 # not ours: holds something else
    other.mkdir()
    (other / "notes.txt").write_text("x")
    remove_partials(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.png.keep"]
