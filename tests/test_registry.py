"""The registry of released files (tarflow_ref/registry.py): the table against the published facts,
and resolution through a local fake cache and a fake huggingface_hub. No test touches the network:
the real huggingface_hub is replaced by a stub (or hidden) in every test that could reach it."""
import shutil
import sys
import types

import pytest
import torch

from tarflow_ref.assets import bundled_checkpoint, bundled_fid_stats
from tarflow_ref.cli import main
from tarflow_ref.config import RELEASED_FILES
from tarflow_ref.registry import (
    CACHE_ENV,
    HF_REPO,
    RELEASES,
    STATS_FILES,
    ReleaseError,
    find_release,
    local_file,
    resolve,
)
from tarflow_ref.strategy import PRESETS


def test_the_table_holds_the_released_files():
    assert HF_REPO == "encoreus/Transformer_Autoregressive_Flow"
    assert {r.file for r in RELEASES.values()} == set(RELEASED_FILES)
    assert STATS_FILES == ["afhq_256_fid_stats.pth", "imagenet64_64_fid_stats.pth", "imagenet_128_fid_stats.pth",
                           "imagenet_64_fid_stats.pth"]
    # imagenet_64_fid_stats.pth serves both 64x64 conditional models
    assert sorted(r.name for r in RELEASES.values() if r.stats == "imagenet_64_fid_stats.pth") == \
        ["imagenet64-cond-p2", "imagenet64-cond-p4"]
    for r in RELEASES.values():
        cfg = r.config
        size = int(r.stats.split("_")[-3])                             # {data}_{size}_fid_stats.pth
        assert cfg.image_size == size and cfg.channels == 3 and cfg.blocks == cfg.layers == 8
        assert cfg.conditional == (r.name != "imagenet64-uncond")
    # four of the five carry the GS-Jacobi study's published setting
    assert {r.name: (r.preset.name if r.preset else None) for r in RELEASES.values()} == {
        "afhq": "afhq256", "imagenet128": "imagenet128", "imagenet64-uncond": "imagenet64-uncond",
        "imagenet64-cond-p2": None, "imagenet64-cond-p4": "imagenet64-cond-p4"}
    assert RELEASES["afhq"].preset is PRESETS["afhq_model_8_768_8_8_0.07.pth"]
    assert RELEASES["afhq"].preset.guidance.weight == 3.4 and RELEASES["afhq"].preset.denoise_factor == 1.4


def test_names_find_their_release():
    afhq = RELEASES["afhq"]
    for text in ("afhq", "afhq256", "afhq_model_8_768_8_8_0.07.pth", "somewhere/afhq_model_8_768_8_8_0.07.pth",
                 "afhq_256_fid_stats.pth"):
        assert find_release(text) is afhq, text
    assert find_release("imagenet64-cond-p4").file == "imagenet_model_4_1024_8_8_0.05.pth"
    assert find_release("digits_model_1_64_4_1_0.10.pth") is None and find_release("afhq2") is None


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
    assert local_file("afhq") is None
    (cache / "afhq_model_8_768_8_8_0.07.pth").write_bytes(b"ckpt")
    (cache / "afhq_256_fid_stats.pth").write_bytes(b"stats")
    assert resolve("afhq") == cache / "afhq_model_8_768_8_8_0.07.pth"
    assert resolve("afhq", "stats") == cache / "afhq_256_fid_stats.pth"
    assert resolve("afhq_256_fid_stats.pth", "stats") == cache / "afhq_256_fid_stats.pth"
    assert resolve("afhq256") == cache / "afhq_model_8_768_8_8_0.07.pth"


def test_offline_without_huggingface_hub_one_line_names_file_and_repository(cache):
    with pytest.raises(ReleaseError) as err:
        resolve("imagenet64-cond-p2", "stats")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"'imagenet_64_fid_stats.pth' is not in {cache} and could not be downloaded from "
                              f"https://huggingface.co/{HF_REPO} (downloading needs the package huggingface_hub)")


def test_offline_with_huggingface_hub(cache, monkeypatch):
    def offline(**kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file.\nmore detail")
    fake_hub(monkeypatch, offline)
    with pytest.raises(ReleaseError, match=r"^'afhq_model_8_768_8_8_0.07.pth' is not in .* could not be downloaded "
                                           r"from https://huggingface.co/encoreus/Transformer_Autoregressive_Flow "
                                           r"\(We couldn't connect to 'https://huggingface.co' to load this file.\); "
                                           r"download it there, put it in .*or pass its path$"):
        resolve("afhq")


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


def test_unknown_names_and_missing_paths(cache, tmp_path):
    fake = types.ModuleType("huggingface_hub")
    sys.modules["huggingface_hub"] = fake                     # the fixture restores it; nothing may be called
    with pytest.raises(ReleaseError, match=r"^afhq3: no such file, and not a released name \(afhq, imagenet128, "):
        resolve("afhq3")
    with pytest.raises(ReleaseError, match="no such file"):
        resolve(str(tmp_path / "elsewhere" / "afhq_model_8_768_8_8_0.07.pth"))   # a path is never downloaded


def test_the_command_line_resolves_released_names_from_the_cache(cache, tmp_path, capsys):
    """`--ckpt afhq` / `--stats afhq` through the cache: small stand-ins under the released names
    (the bundled model loads under any name; sigma is then read from the name, 0.07)."""
    shutil.copy(bundled_checkpoint(), cache / "afhq_model_8_768_8_8_0.07.pth")
    shutil.copy(bundled_fid_stats(), cache / "afhq_256_fid_stats.pth")
    main(["fid", "--ckpt", "afhq", "--n", "8", "--batch-size", "8", "--cfg", "0", "--class", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert "FID " in out and "(8 images against afhq_256_fid_stats.pth: 360 images;" in out
    # --published: AFHQ's guidance 3.4 and denoising factor 1.4 (its 8-block strategy cannot fit 4 blocks)
    main(["fid", "--ckpt", "afhq", "--published", "--n", "8", "--class", "1", "--state", str(tmp_path / "p.pt")])
    assert "FID " in capsys.readouterr().out
    saved = torch.load(tmp_path / "p.pt", weights_only=True)["settings"]
    assert (saved["cfg"], saved["attn_temp"], saved["denoise_factor"]) == ("3.4", "1.0", "1.4")
    with pytest.raises(SystemExit):
        main(["fid", "--ckpt", "afhq", "--published", "--sampler", "gsj", "--n", "8"])
    assert "the strategy has 8 entries per list but the model has 4 flow blocks" in capsys.readouterr().err
    (cache / "afhq_256_fid_stats.pth").unlink()
    with pytest.raises(SystemExit) as stop:
        main(["fid", "--ckpt", "afhq", "--n", "8", "--cfg", "0"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'afhq_256_fid_stats.pth' is not in" in err and HF_REPO in err
