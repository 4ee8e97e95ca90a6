"""The registry of released files (tarflow_ref/registry.py): the one table against the published
facts, the names, and resolution and download through a local fake cache and a fake
huggingface_hub. No test touches the network: huggingface_hub is hidden or replaced by a stub in
every test that could reach it, and the cache folder is a temporary one."""
import shutil
import sys
import types

import pytest
import torch

import tarflow_ref as tf
from tarflow_ref.assets import bundled_checkpoint, bundled_fid_stats
from tarflow_ref.cli import main
from tarflow_ref.config import TarFlowConfig
from tarflow_ref.registry import (
    CACHE_ENV,
    HF_REPO,
    RELEASED_FILES,
    RELEASES,
    STATS_FILES,
    Published,
    Release,
    ReleaseError,
    download_release,
    find_release,
    local_file,
    resolve,
)
from tarflow_ref.strategy import PRESETS, Preset

# book/checkpoints.md, "Files and names" and "FID statistics files", written out independently:
# checkpoint file -> (image side, classes, its statistics file)
PUBLISHED_FILES = {
    "afhq_model_8_768_8_8_0.07.pth": (256, 3, "afhq_256_fid_stats.pth"),
    "imagenet_model_4_1024_8_8_0.15.pth": (128, 1000, "imagenet_128_fid_stats.pth"),
    "imagenet64_model_2_768_8_8_0.05.pth": (64, 0, "imagenet64_64_fid_stats.pth"),
    "imagenet_model_2_768_8_8_0.05.pth": (64, 1000, "imagenet_64_fid_stats.pth"),
    "imagenet_model_4_1024_8_8_0.05.pth": (64, 1000, "imagenet_64_fid_stats.pth"),
}


def test_the_table_holds_the_published_files():
    assert HF_REPO == "encoreus/Transformer_Autoregressive_Flow"
    assert {r.file: (r.image_size, r.classes, r.stats) for r in RELEASES.values()} == PUBLISHED_FILES
    assert RELEASED_FILES == {r.file: r for r in RELEASES.values()}
    assert STATS_FILES == ["afhq_256_fid_stats.pth", "imagenet64_64_fid_stats.pth", "imagenet_128_fid_stats.pth",
                           "imagenet_64_fid_stats.pth"]
    for r in RELEASES.values():
        cfg = TarFlowConfig.from_release_name(r.file)                 # derived from the table
        assert (cfg.image_size, cfg.num_classes) == PUBLISHED_FILES[r.file][:2]
        assert int(r.stats.split("_")[-3]) == cfg.image_size          # {data}_{size}_fid_stats.pth


def test_the_presets_are_the_published_settings_of_the_table():
    """Four of the five carry the GS-Jacobi study's published setting; PRESETS holds exactly those,
    under the release's name and file (their values: tests/test_strategy.py)."""
    published = [r for r in RELEASES.values() if r.published is not None]
    assert [r.name for r in published] == ["afhq256", "imagenet128", "imagenet64-uncond", "imagenet64-cond-p4"]
    assert set(PRESETS) == {r.name for r in published} | {r.file for r in published}
    for r in published:
        p = PRESETS[r.name]
        assert PRESETS[r.file] is p and (p.name, p.file) == (r.name, r.file)
        assert p.guidance.weight == r.published.guidance and p.denoise_factor == r.published.denoise_factor
        assert p.strategy.modules == r.published.modules and p.guidance.temperature == r.published.tau_u
    assert Preset.of(RELEASES["imagenet64-cond-p2"]) is None


def test_names_find_their_release():
    afhq = RELEASES["afhq256"]
    for text in ("afhq256", "afhq_model_8_768_8_8_0.07.pth", "somewhere/afhq_model_8_768_8_8_0.07.pth",
                 "afhq_256_fid_stats.pth"):
        assert find_release(text) is afhq, text
    assert find_release("imagenet64-cond-p4").file == "imagenet_model_4_1024_8_8_0.05.pth"
    assert find_release("imagenet_64_fid_stats.pth").name == "imagenet64-cond-p2"     # the first one using it
    assert find_release("digits_model_1_64_4_1_0.10.pth") is None and find_release("afhq") is None


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder in $TARFLOW_REF_CACHE and no huggingface_hub (its import fails)."""
    folder = tmp_path / "cache"
    folder.mkdir()
    monkeypatch.setenv(CACHE_ENV, str(folder))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    return folder


def fake_hub(monkeypatch, download):
    module = types.ModuleType("huggingface_hub")
    module.hf_hub_download = download
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)


def test_a_local_path_or_a_cached_file_is_used_as_it_is(cache, tmp_path):
    mine = tmp_path / "mine.pth"
    mine.write_bytes(b"x")
    assert resolve(mine) == mine and local_file(str(mine)) == mine
    assert local_file("afhq256") is None
    (cache / "afhq_model_8_768_8_8_0.07.pth").write_bytes(b"ckpt")
    (cache / "afhq_256_fid_stats.pth").write_bytes(b"stats")
    assert resolve("afhq256") == cache / "afhq_model_8_768_8_8_0.07.pth" == local_file("afhq256")
    assert resolve("afhq256", "stats") == cache / "afhq_256_fid_stats.pth"
    assert resolve("afhq_256_fid_stats.pth", "stats") == cache / "afhq_256_fid_stats.pth"
    assert resolve("afhq_model_8_768_8_8_0.07.pth", "stats") == cache / "afhq_model_8_768_8_8_0.07.pth"


def test_offline_without_huggingface_hub_one_line_names_file_and_repository(cache):
    with pytest.raises(ReleaseError) as err:
        resolve("imagenet64-cond-p2", "stats")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"'imagenet_64_fid_stats.pth' is not in {cache} and could not be downloaded from "
                              f"https://huggingface.co/{HF_REPO} (downloading needs the optional package "
                              f"huggingface_hub: pip install 'tarflow_ref[hub]'); download it there")


def test_offline_with_huggingface_hub(cache, monkeypatch):
    def offline(**kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file.\nmore detail")
    fake_hub(monkeypatch, offline)
    with pytest.raises(ReleaseError, match=r"^'afhq_model_8_768_8_8_0.07.pth' is not in .* could not be downloaded "
                                           r"from https://huggingface.co/encoreus/Transformer_Autoregressive_Flow "
                                           r"\(We couldn't connect to 'https://huggingface.co' to load this file.\); "
                                           r"download it there, put it in .*or pass its path$"):
        resolve("afhq256")


def test_a_download_lands_in_the_cache(cache, monkeypatch):
    calls = []

    def download(repo_id, filename, local_dir):
        calls.append((repo_id, filename, local_dir))
        (local_dir / filename).write_bytes(b"stats")
        return str(local_dir / filename)
    fake_hub(monkeypatch, download)
    assert resolve("imagenet128", "stats") == cache / "imagenet_128_fid_stats.pth"
    assert calls == [(HF_REPO, "imagenet_128_fid_stats.pth", cache)]
    fake_hub(monkeypatch, lambda **kwargs: pytest.fail("the cached copy must be used"))
    assert resolve("imagenet128", "stats") == cache / "imagenet_128_fid_stats.pth"


def test_the_public_download_release_is_the_registry_s(cache, monkeypatch):
    assert tf.download_release is download_release
    calls = []

    def download(repo_id, filename, local_dir):
        calls.append(filename)
        (local_dir / filename).write_bytes(b"ckpt")
        return str(local_dir / filename)
    fake_hub(monkeypatch, download)
    name = "imagenet_model_4_1024_8_8_0.05.pth"
    assert tf.download_release(name) == cache / name
    assert tf.download_release("imagenet64-cond-p4") == cache / name and calls == [name]


def test_unknown_names_and_missing_paths(cache, tmp_path, monkeypatch):
    fake_hub(monkeypatch, lambda **kwargs: pytest.fail("must not download"))
    with pytest.raises(ReleaseError, match=r"^afhq3: no such file, and not a released name \(afhq256, imagenet128, "):
        resolve("afhq3")
    with pytest.raises(ReleaseError, match="no such file"):
        resolve(str(tmp_path / "elsewhere" / "afhq_model_8_768_8_8_0.07.pth"))   # a path is never downloaded
    with pytest.raises(ReleaseError, match=r"unknown released file 'imagenet_model_9.pth'; known: afhq256, "):
        download_release("imagenet_model_9.pth")
    with pytest.raises(ReleaseError, match="is a folder; expected a statistics file"):
        resolve(tmp_path, "stats")


@pytest.fixture
def tiny(cache, monkeypatch):
    """A stand-in release for the command line: the bundled model and the digits' statistics file in
    the cache under released-looking names (sigma 0.10 in the name, as the model's record says),
    with a published setting, registered where names are looked up (RELEASES, PRESETS)."""
    release = Release("tiny", "tiny_model_1_64_4_1_0.10.pth", "tiny_8_fid_stats.pth", 8, 10,
                      Published(2.0, 0.5, 0.8, (1, 1, 1, 1), (3, 3, 3, 3), (0, 0, 0, 0)))
    monkeypatch.setitem(RELEASES, release.name, release)
    preset = Preset.of(release)
    monkeypatch.setitem(PRESETS, release.name, preset)
    monkeypatch.setitem(PRESETS, release.file, preset)
    shutil.copy(bundled_checkpoint(), cache / release.file)
    shutil.copy(bundled_fid_stats(), cache / release.stats)
    return release


def test_the_command_line_resolves_released_names_from_the_cache(tiny, cache, tmp_path, capsys):
    main(["fid", "--ckpt", "tiny", "--n", "8", "--batch-size", "8", "--cfg", "0", "--threads", "1"])
    out = capsys.readouterr().out
    assert "FID " in out and "(8 images against tiny_8_fid_stats.pth: 360 images;" in out   # its own statistics
    main(["fid", "--ckpt", "tiny", "--published", "--sampler", "gsj", "--n", "8", "--state", str(tmp_path / "p.pt")])
    assert "sampler: gsj tiny; 12 sequential steps per batch" in capsys.readouterr().out      # 4 blocks x 3 iterations
    saved = torch.load(tmp_path / "p.pt", weights_only=True)["settings"]
    assert (saved["cfg"], saved["attn_temp"], saved["denoise_factor"], saved["strategy"]) == ("2.0", "0.8", "0.5",
                                                                                              "tiny")
    (cache / tiny.stats).unlink()
    with pytest.raises(SystemExit) as stop:
        main(["fid", "--ckpt", "tiny", "--n", "8", "--cfg", "0"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "\n" not in err and "'tiny_8_fid_stats.pth' is not in" in err and HF_REPO in err


@pytest.mark.parametrize("command", [["sample"], ["fid", "--stats", "digits"]], ids=["sample", "fid"])
def test_a_released_checkpoint_that_is_not_here_is_one_line(command, cache, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main([*command, "--ckpt", "imagenet128", "--n", "1"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "\n" not in err
    assert "'imagenet_model_4_1024_8_8_0.15.pth' is not in" in err and HF_REPO in err
