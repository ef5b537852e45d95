"""Checkpoint formats, the Wan <-> diffusers key map, clear errors, and the offline downloader."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

import utils.hub as hub
from model.wan import WanDiT
from tests.conftest import TINY_DIT, randomize
from utils.checkpoint import (detect_naming, diffusers_to_wan_key, diffusers_to_wan_state_dict,
                              load_dit_state_dict, load_dit_weights, save_dit_state_dict,
                              wan_to_diffusers_key, wan_to_diffusers_state_dict)
from utils.errors import CheckpointError, UserError, WeightsMissingError

REPO = Path(__file__).resolve().parent.parent


def diffusers_model(cfg=TINY_DIT) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=cfg["num_heads"],
        attention_head_dim=cfg["dim"] // cfg["num_heads"], in_channels=cfg["in_dim"],
        out_channels=cfg["out_dim"], text_dim=cfg["text_dim"], freq_dim=cfg["freq_dim"],
        ffn_dim=cfg["ffn_dim"], num_layers=cfg["num_layers"], cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=cfg["eps"], rope_max_seq_len=64)


def fresh_dit(seed=123) -> WanDiT:
    return randomize(WanDiT(**TINY_DIT), seed=seed)


def assert_same(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key].float(), want[key].float()), key


def assert_loads(path_or_sd, want: dict, use_ema=False):
    """``load_dit_state_dict`` gives ``want``; ``load_dit_weights`` puts it into a WanDiT."""
    if isinstance(path_or_sd, (str, Path)):
        assert_same(load_dit_state_dict(path_or_sd, use_ema=use_ema), want)
    model = fresh_dit()
    load_dit_weights(model, path_or_sd, use_ema=use_ema)
    assert_same(model.state_dict(), want)


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


@pytest.fixture(scope="module")
def wan_sd():
    return {k: v.clone() for k, v in randomize(WanDiT(**TINY_DIT), seed=1).state_dict().items()}


@pytest.fixture(scope="module")
def ema_sd():
    return {k: v.clone() for k, v in randomize(WanDiT(**TINY_DIT), seed=2).state_dict().items()}


# ----------------------------------------------------------------------------- the key map
def test_key_map_covers_every_diffusers_key_both_ways():
    ref = diffusers_model()
    hf_sd = ref.state_dict()
    wan = {diffusers_to_wan_key(k): k for k in hf_sd}
    assert len(wan) == len(hf_sd)  # injective
    assert all(wan_to_diffusers_key(w) == k for w, k in wan.items())  # identity round trip
    ours = WanDiT(**TINY_DIT).state_dict()
    assert sorted(wan) == sorted(ours)  # exactly WanDiT's parameters
    for w, k in wan.items():
        assert hf_sd[k].shape == ours[w].shape, (w, k)
    # and the other way: every WanDiT key lands on a diffusers key
    assert sorted(wan_to_diffusers_state_dict(ours)) == sorted(hf_sd)
    assert list(wan_to_diffusers_state_dict(diffusers_to_wan_state_dict(hf_sd))) == list(hf_sd)
    assert detect_naming(hf_sd) == "diffusers" and detect_naming(ours) == "wan"


def test_key_map_fits_the_full_1_3b_model():
    from model.wan import WAN_1_3B

    with torch.device("meta"):  # no memory, no init cost
        hf = WanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960,
                                   num_layers=30, in_channels=16, out_channels=16, text_dim=4096,
                                   freq_dim=256)
        ours = WanDiT(**WAN_1_3B)
    mapped = {k: v.shape for k, v in diffusers_to_wan_state_dict(hf.state_dict()).items()}
    assert mapped == {k: v.shape for k, v in ours.state_dict().items()}
    assert len(mapped) == 825


def test_the_three_traps():
    assert wan_to_diffusers_key("blocks.3.norm3.weight") == "blocks.3.norm2.weight"
    assert wan_to_diffusers_key("blocks.3.modulation") == "blocks.3.scale_shift_table"
    assert wan_to_diffusers_key("head.modulation") == "scale_shift_table"
    assert diffusers_to_wan_key("scale_shift_table") == "head.modulation"
    assert diffusers_to_wan_key("blocks.11.attn1.to_out.0.bias") == "blocks.11.self_attn.o.bias"
    assert diffusers_to_wan_key("blocks.0.ffn.net.0.proj.weight") == "blocks.0.ffn.0.weight"
    with pytest.raises(KeyError):
        wan_to_diffusers_key("blocks.0.norm2.weight")  # Wan's FFN norm has no parameters
    with pytest.raises(KeyError):
        diffusers_to_wan_key("condition_embedder.image_embedder.ff.net.0.proj.weight")  # I2V


def test_diffusers_weights_through_the_map_give_the_same_tensors(wan_sd):
    ref = diffusers_model()
    ref.load_state_dict(wan_to_diffusers_state_dict(wan_sd), strict=True)
    assert_same(diffusers_to_wan_state_dict(ref.state_dict()), wan_sd)


# ------------------------------------------------------------------------ formats round trip
def test_wan_safetensors_file(tmp_path, wan_sd):
    path = save_dit_state_dict(wan_sd, tmp_path / "dit.safetensors")
    assert_loads(path, wan_sd)


def test_wan_folder_and_sharded_folder(tmp_path, wan_sd):
    folder = save_dit_state_dict(wan_sd, tmp_path / "single")
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()
    assert_loads(folder, wan_sd)
    sharded = save_dit_state_dict(wan_sd, tmp_path / "sharded", max_shard_bytes=20_000)
    index = sharded / "diffusion_pytorch_model.safetensors.index.json"
    assert len(set(json.loads(index.read_text())["weight_map"].values())) > 2
    assert_loads(sharded, wan_sd)
    assert_loads(index, wan_sd)


def test_diffusers_save_pretrained_folders(tmp_path, wan_sd):
    ref = diffusers_model()
    ref.load_state_dict(wan_to_diffusers_state_dict(wan_sd), strict=True)
    ref.save_pretrained(tmp_path / "pipe" / "transformer")
    assert (tmp_path / "pipe" / "transformer" / "config.json").is_file()
    assert_loads(tmp_path / "pipe" / "transformer", wan_sd)
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert_loads(tmp_path / "pipe", wan_sd)  # a whole pipeline folder: its transformer/
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert list((tmp_path / "sharded").glob("*.index.json"))
    assert_loads(tmp_path / "sharded", wan_sd)


def test_diffusers_named_safetensors_file_and_state_dict(tmp_path, wan_sd):
    path = save_dit_state_dict(wan_sd, tmp_path / "hf.safetensors", naming="diffusers")
    assert detect_naming(load_dit_state_dict(path)) == "wan"
    assert_loads(path, wan_sd)
    assert_loads(wan_to_diffusers_state_dict(wan_sd), wan_sd)  # a dict in memory too


def fsdp_names(sd: dict) -> dict:
    """Keys as FSDP1 writes them from Self-Forcing's wrapper: model._fsdp_wrapped_module.blocks.0..."""
    out = {}
    for key, value in sd.items():
        if key.startswith("blocks."):
            _, n, rest = key.split(".", 2)
            key = f"blocks.{n}._fsdp_wrapped_module.{rest}"
        out[f"model._fsdp_wrapped_module.{key}"] = value
    return out


def test_self_forcing_pt_generator_and_ema(tmp_path, wan_sd, ema_sd):
    path = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator": {f"model.{k}": v for k, v in wan_sd.items()},
                "critic": {"model.blocks.0.self_attn.q.weight": torch.zeros(2, 2)},
                "generator_ema": fsdp_names(ema_sd)}, path)
    assert_loads(path, wan_sd)
    assert_loads(path, ema_sd, use_ema=True)
    assert_loads(tmp_path, wan_sd)  # a folder holding one .pt


def test_ode_init_bare_and_prefixed_pt(tmp_path, wan_sd):
    torch.save({"generator": fsdp_names(wan_sd)}, tmp_path / "ode_init.pt")
    assert_loads(tmp_path / "ode_init.pt", wan_sd)
    torch.save(wan_sd, tmp_path / "bare.pth")
    assert_loads(tmp_path / "bare.pth", wan_sd)
    torch.save({f"model.diffusion_model.{k}": v for k, v in wan_sd.items()}, tmp_path / "comfy.pt")
    assert_loads(tmp_path / "comfy.pt", wan_sd)


def test_only_ema_without_use_ema_loads_it(tmp_path, ema_sd, caplog):
    torch.save({"generator_ema": {f"model.{k}": v for k, v in ema_sd.items()}}, tmp_path / "e.pt")
    assert_loads(tmp_path / "e.pt", ema_sd)
    assert "generator_ema" in caplog.text


def test_use_ema_without_generator_ema_names_the_keys(tmp_path, wan_sd):
    path = tmp_path / "ode_init.pt"
    torch.save({"generator": wan_sd}, path)
    with pytest.raises(CheckpointError) as excinfo:
        load_dit_state_dict(path, use_ema=True)
    message = one_line_error(excinfo)
    assert str(path) in message and "generator_ema" in message and "generator" in message
    save_dit_state_dict(wan_sd, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="use_ema"):
        load_dit_state_dict(tmp_path / "w.safetensors", use_ema=True)


def test_bf16_model_gets_cast_tensors(tmp_path, wan_sd):
    path = save_dit_state_dict(wan_sd, tmp_path / "dit.safetensors")
    model = WanDiT(**TINY_DIT).to(torch.bfloat16)
    load_dit_weights(model, path)
    for key, value in model.state_dict().items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, wan_sd[key].to(torch.bfloat16)), key


def test_meta_model_gets_assigned(tmp_path, wan_sd):
    with torch.device("meta"):
        model = WanDiT(**TINY_DIT)
    load_dit_weights(model, save_dit_state_dict(wan_sd, tmp_path / "dit.safetensors"))
    assert_same(model.state_dict(), wan_sd)


# ----------------------------------------------------------------------------- clear errors
def test_missing_path_names_it_and_the_fetch_command(tmp_path):
    with pytest.raises(WeightsMissingError) as excinfo:
        load_dit_state_dict(tmp_path / "nope.pt")
    message = one_line_error(excinfo)
    assert "nope.pt" in message and "setup_env.sh" in message


def test_truncated_safetensors(tmp_path, wan_sd):
    path = save_dit_state_dict(wan_sd, tmp_path / "dit.safetensors")
    data = path.read_bytes()
    for cut in (len(data) // 2, 5):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as excinfo:
            load_dit_weights(fresh_dit(), path)
        message = one_line_error(excinfo)
        assert str(path) in message and "truncated" in message


def test_truncated_pt(tmp_path, wan_sd):
    path = tmp_path / "gen.pt"
    torch.save({"generator": wan_sd}, path)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 100):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as excinfo:
            load_dit_state_dict(path)
        message = one_line_error(excinfo)
        assert str(path) in message and "truncated" in message


def test_text_files_are_refused(tmp_path):
    for name in ("notes.txt", "weights.safetensors", "weights.pt", "weights"):
        path = tmp_path / name
        path.write_text("this is not a checkpoint\n" * 10)
        with pytest.raises(CheckpointError) as excinfo:
            load_dit_state_dict(path)
        assert str(path) in one_line_error(excinfo)


def test_foreign_state_dicts_are_refused(tmp_path):
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    torch.save(other.state_dict(), tmp_path / "mlp.pt")
    save_file(other.state_dict(), str(tmp_path / "mlp.safetensors"))
    torch.save({"optimizer": {"lr": 0.1}, "step": 3}, tmp_path / "train_state.pt")
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    for name in ("mlp.pt", "mlp.safetensors", "train_state.pt", "list.pt"):
        with pytest.raises(CheckpointError) as excinfo:
            load_dit_weights(fresh_dit(), tmp_path / name)
        message = one_line_error(excinfo)
        assert str(tmp_path / name) in message and "expected" in message


def test_pickled_object_is_refused_by_weights_only(tmp_path, wan_sd):
    path = tmp_path / "evil.pt"
    torch.save({"generator": wan_sd, "config": Path("/etc/passwd")}, path)  # any non-tensor class
    with pytest.raises(CheckpointError) as excinfo:
        load_dit_state_dict(path)
    message = one_line_error(excinfo)
    assert str(path) in message and "weights_only" in message


def test_missing_and_unexpected_keys_are_listed(tmp_path, wan_sd):
    partial = {k: v for k, v in wan_sd.items() if k != "blocks.1.ffn.2.bias"}
    with pytest.raises(CheckpointError) as excinfo:
        load_dit_weights(fresh_dit(), save_dit_state_dict(partial, tmp_path / "p.safetensors"))
    message = one_line_error(excinfo)
    assert "1 missing keys" in message and "blocks.1.ffn.2.bias" in message
    assert "p.safetensors" in message
    extra = dict(wan_sd, **{f"blocks.{i}.img_attn.k.weight": torch.zeros(1) for i in range(8)})
    with pytest.raises(CheckpointError) as excinfo:
        load_dit_weights(fresh_dit(), extra)
    message = one_line_error(excinfo)
    assert "8 unexpected keys" in message and message.count("img_attn") == 5  # the first five
    deeper = {k.replace("blocks.0.", "blocks.7.") if k.startswith("blocks.0.") else k: v
              for k, v in wan_sd.items()}  # a checkpoint with more layers, one shown
    with pytest.raises(CheckpointError, match="missing keys.*unexpected keys"):
        load_dit_weights(fresh_dit(), deeper)


def test_wrong_shape_names_key_and_both_shapes(tmp_path, wan_sd):
    big = dict(wan_sd)
    big["blocks.0.self_attn.q.weight"] = torch.zeros(64, 64)
    torch.save({"generator": {f"model.{k}": v for k, v in big.items()}}, tmp_path / "big.pt")
    with pytest.raises(CheckpointError) as excinfo:
        load_dit_weights(fresh_dit(), tmp_path / "big.pt")
    message = one_line_error(excinfo)
    assert "blocks.0.self_attn.q.weight has [64,64], model expects [32,32]" in message
    assert "model.*" in message


def test_integer_weights_are_refused_not_cast(wan_sd):
    """Integer tensors where the model has floating-point weights (a quantised file, another
    format) would be cast silently into garbage: a one-line error."""
    ints = dict(wan_sd, **{"blocks.0.self_attn.q.weight": wan_sd["blocks.0.self_attn.q.weight"].to(torch.int32)})
    with pytest.raises(CheckpointError) as excinfo:
        load_dit_weights(fresh_dit(), ints)
    assert "blocks.0.self_attn.q.weight as torch.int32, not floating-point" in one_line_error(excinfo)
    fp8 = dict(wan_sd, **{"blocks.0.self_attn.q.weight": wan_sd["blocks.0.self_attn.q.weight"].to(torch.float8_e4m3fn)})
    load_dit_weights(fresh_dit(), fp8)  # a low-precision float still loads


def test_sharded_folder_with_a_missing_shard(tmp_path, wan_sd):
    folder = save_dit_state_dict(wan_sd, tmp_path / "sharded", max_shard_bytes=20_000)
    victim = sorted(folder.glob("*-of-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(WeightsMissingError) as excinfo:
        load_dit_state_dict(folder)
    assert victim.name in one_line_error(excinfo)


def test_empty_folder(tmp_path):
    with pytest.raises(WeightsMissingError) as excinfo:
        load_dit_state_dict(tmp_path)
    assert str(tmp_path) in one_line_error(excinfo)


# -------------------------------------------------------------------------------- downloads
def test_hub_offline_exits_2_fast_with_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "utils.hub", "--dest", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    assert elapsed < 10
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: could not fetch")
    for part in ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "wan_models/Wan2.1-T2V-1.3B-Diffusers",
                 "SOTAMak1r/Infinite-Forcing", "checkpoints/infinite_forcing"):
        assert part in lines[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_unreachable_stops_within_seconds(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_endpoint", lambda: ("127.0.0.1", closed_port()))
    monkeypatch.setattr(hub, "_fetch", lambda item, dest: pytest.fail("fetched while offline"))
    start = time.monotonic()
    with pytest.raises(WeightsMissingError) as excinfo:
        hub.download(["wan", "infinite_forcing", "causal_forcing"], tmp_path)
    assert time.monotonic() - start < 7
    message = one_line_error(excinfo)
    assert "cannot reach 127.0.0.1" in message
    assert "checkpoints/causal_forcing/chunkwise/causal_forcing.pt" in message


def fake_repo_files(item: hub.Item, dest: Path, wan_sd: dict) -> None:
    """What a download of ``item`` leaves on disk (tiny stand-ins)."""
    root = dest / item.local_dir
    if item.name == "wan":
        for name in ("model_index.json", "text_encoder/config.json", "vae/config.json",
                     "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text("{}")
        save_file({"w": torch.zeros(2)}, str(root / "text_encoder/model-00001-of-00001.safetensors"))
        (root / "text_encoder/model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}))
        save_file({"w": torch.zeros(2)}, str(root / "vae/diffusion_pytorch_model.safetensors"))
    elif item.name == "infinite_forcing":
        root.mkdir(parents=True, exist_ok=True)
        torch.save({"generator": {f"model.{k}": v for k, v in wan_sd.items()},
                    "generator_ema": {f"model.{k}": v for k, v in wan_sd.items()}},
                   root / "some_name.pt")
    else:
        raise AssertionError(item.name)


def test_hub_fetches_links_and_then_skips_complete_folders(tmp_path, monkeypatch, wan_sd):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda: (True, ""))
    fetched = []

    def fetch(item, dest):
        fetched.append(item.name)
        fake_repo_files(item, dest, wan_sd)

    monkeypatch.setattr(hub, "_fetch", fetch)
    hub.main(["--dest", str(tmp_path)])
    assert fetched == ["wan", "infinite_forcing"]
    link = tmp_path / hub.GENERATOR_LINK
    assert link.is_file()
    assert_same(load_dit_state_dict(link, use_ema=True), wan_sd)  # the config default works
    # complete now: a second run touches neither the network nor the files, even offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.main(["--dest", str(tmp_path)])
    assert fetched == ["wan", "infinite_forcing"]
    # a missing shard makes the folder incomplete again
    (tmp_path / hub.WAN_DIR / "text_encoder/model-00001-of-00001.safetensors").unlink()
    with pytest.raises(SystemExit) as excinfo:
        hub.main(["--dest", str(tmp_path)])
    assert excinfo.value.code == 2


@pytest.mark.parametrize("half_done", [
    ("tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"),  # left: special_tokens_map.json
    ("tokenizer/tokenizer_config.json",),
    ("tokenizer/tokenizer.json",),  # no spiece.model either
    ("text_encoder/model.safetensors.index.json",),  # one shard, no index
    ("vae/diffusion_pytorch_model.safetensors",),
])
def test_hub_half_downloaded_wan_folder_is_incomplete(tmp_path, monkeypatch, wan_sd, half_done):
    item = hub.BY_NAME["wan"]
    fake_repo_files(item, tmp_path, wan_sd)
    folder = tmp_path / item.local_dir
    (folder / "tokenizer/special_tokens_map.json").write_text("{}")
    assert hub.is_complete(item, tmp_path)
    for name in half_done:
        (folder / name).unlink()
    assert not hub.is_complete(item, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsMissingError, match="wan_models/Wan2.1-T2V-1.3B-Diffusers"):
        hub.download(["wan"], tmp_path)


def test_hub_reports_a_failed_fetch_and_goes_on(tmp_path, monkeypatch, wan_sd):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda: (True, ""))

    def fetch(item, dest):
        if item.name == "wan":
            raise OSError("401 Client Error: gated repo")
        fake_repo_files(item, dest, wan_sd)

    monkeypatch.setattr(hub, "_fetch", fetch)
    with pytest.raises(WeightsMissingError) as excinfo:
        hub.download(["wan", "infinite_forcing"], tmp_path)
    message = one_line_error(excinfo)
    assert "401" in message and "wan_models/Wan2.1-T2V-1.3B-Diffusers" in message
    assert "Infinite-Forcing" not in message
    assert (tmp_path / hub.GENERATOR_LINK).is_file()


def test_user_errors_share_one_base():
    assert issubclass(CheckpointError, UserError) and issubclass(WeightsMissingError, UserError)
