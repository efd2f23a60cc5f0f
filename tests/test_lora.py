"""LoRA adapters (issue 25): real tiny adapters made with peft on the tiny SD 1.5 UNet, loaded through
diffusers' LoRA API in each lora.mode; the refusals before any weights load."""

import hashlib
import json
from pathlib import Path

import pytest

import sdbuild
from sdbuild.errors import SpecError
from sdbuild.validate import Machine, validate

from conftest import FAST, needs_packages, run_cli

CPU = Machine(cuda=False, device_name="cpu", capability=None, packages=frozenset({"peft", "torchao", "accelerate"}),
              diffusers_version="0.42.1", c_compiler=True)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def write_adapter(folder: Path, rank: int, seed: int, family: str = "tiny") -> Path:
    """A LoRA for the tiny model's denoiser, random (non-zero) A and B, saved with diffusers'
    save_lora_weights; returns the folder (pytorch_lora_weights.safetensors inside)."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict

    from sdbuild.builder import build_pipeline

    spec = sdbuild.compose([f"model={family}", *FAST])
    pipe, _ = build_pipeline(spec, "cpu")
    denoiser = pipe.transformer if family != "tiny" else pipe.unet
    torch.manual_seed(seed)
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False))
    layers = get_peft_model_state_dict(denoiser)
    if family == "tiny":
        type(pipe).save_lora_weights(folder, unet_lora_layers=layers)
    else:
        type(pipe).save_lora_weights(folder, transformer_lora_layers=layers)
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    pytest.importorskip("peft", reason="LoRA needs the optional package peft: pip install -e \".[lora]\"")
    root = tmp_path_factory.mktemp("lora")
    return write_adapter(root / "a", rank=4, seed=1), write_adapter(root / "b", rank=8, seed=2)


def adapter_list(*items) -> str:
    """A `lora.adapters=[{path:'...',scale:...}]` override (paths quoted for Hydra's grammar)."""
    def value(v):
        return f"'{v}'" if isinstance(v, Path) else v

    return "lora.adapters=[" + ",".join("{" + ",".join(f"{k}:{value(v)}" for k, v in item.items()) + "}"
                                        for item in items) + "]"


def refusal(*overrides) -> str:
    with pytest.raises(SpecError) as err:
        validate(sdbuild.compose(list(overrides)), CPU)
    return str(err.value)


# --- refusals before loading ---------------------------------------------------------------------


def test_adapters_with_lora_none_are_refused_not_ignored(adapters):
    text = refusal(adapter_list({"path": adapters[0]}))
    assert "lora=none would ignore them" in text and "lora=fused" in text


def test_a_mode_without_adapters_and_hotswap_with_one_are_refused(adapters):
    assert "has no adapters to load" in refusal("lora=unfused")
    assert "needs two adapters or more" in refusal("lora=hotswap", adapter_list({"path": adapters[0]}))


@pytest.mark.parametrize("name,content,why", [
    ("lora.bin", b"\x80\x04", "is a pickle file"),
    ("lora.txt", b"hello", "is not a .safetensors file"),
    ("lora.safetensors", b"\xff" * 8 + b"{}", "not a safetensors file"),
])
def test_an_adapter_file_that_is_not_safetensors_is_refused(tmp_path, name, content, why):
    (tmp_path / name).write_bytes(content)
    text = refusal("lora=fused", adapter_list({"path": tmp_path / name}))
    assert why in text and "lora.adapters[0]" in text


def test_missing_adapter_and_folder_without_the_weight_file_are_refused(tmp_path):
    assert "does not exist" in refusal("lora=fused", adapter_list({"path": tmp_path / "nope.safetensors"}))
    text = refusal("lora=fused", adapter_list({"path": tmp_path}))
    assert "is a folder without pytorch_lora_weights.safetensors" in text and "weight_name" in text


def test_a_safetensors_file_without_lora_weights_is_refused(tmp_path):
    from sdbuild.models import ensure_model

    unet = next((Path(ensure_model(sdbuild.compose().model, None)) / "unet").glob("*.safetensors"))
    assert "holds no LoRA weights" in refusal("lora=fused", adapter_list({"path": unet}))


def test_an_adapter_for_another_family_is_refused(adapters):
    text = refusal("model=tiny_flux", "lora=fused", adapter_list({"path": adapters[0]}))
    assert "is an adapter for a UNet" in text and "flux" in text


@pytest.mark.parametrize("scale", ["nan", "11", "-inf"])
def test_a_scale_that_is_not_a_finite_weight_is_refused(adapters, scale):
    assert "must be a finite number" in refusal("lora=unfused", adapter_list({"path": adapters[0], "scale": scale}))


@pytest.mark.parametrize("overrides,why", [
    (["lora=fused", "quant=int8wo"], "fuse_lora cannot add"),
    (["lora=unfused", "attention=sdpa_fused"], "leaving their live LoRA layers out"),
    (["lora=hotswap", "compile=trace"], "a swapped adapter never reaches it"),
])
def test_combinations_that_cannot_work_are_refused(adapters, overrides, why):
    items = [{"path": adapters[0]}, {"path": adapters[1]}]
    assert why in refusal(*overrides, adapter_list(*items))


def test_hotswap_with_a_scale_is_refused(adapters):
    text = refusal("lora=hotswap", adapter_list({"path": adapters[0], "scale": 0.5}, {"path": adapters[1]}))
    assert "the next swap recompiles" in text


def test_the_cli_refuses_a_bad_adapter_with_exit_2(tmp_path):
    out = run_cli("lora=fused", adapter_list({"path": tmp_path / "x.ckpt"}), *FAST, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "is a pickle file" in out.stderr and "Traceback" not in out.stderr


# --- loading, in each mode -----------------------------------------------------------------------


def images(*overrides):
    from helpers import built, run

    spec, pipe, info = built(*overrides)
    return run(spec, pipe), pipe, info


@needs_packages("peft", install='pip install -e ".[lora]"')
def test_fused_and_unfused_give_the_same_image_and_differ_from_the_base(adapters):
    import numpy as np

    two = adapter_list({"path": adapters[0], "scale": 0.7}, {"path": adapters[1], "scale": 0.5})
    base, _, _ = images()
    fused, fused_pipe, info = images("lora=fused", two)
    unfused, unfused_pipe, _ = images("lora=unfused", two)
    only_first, _, _ = images("lora=unfused", adapter_list({"path": adapters[0], "scale": 0.7}))
    # fused: the deltas are in the weights and peft's layers are gone; unfused: both adapters live
    assert not any("lora" in n for n, _ in fused_pipe.unet.named_modules())
    assert set(unfused_pipe.get_active_adapters()) == {"adapter_0", "adapter_1"}
    assert np.abs(fused - unfused).max() < 1e-4  # measured: 1.9e-6 max (float32 rounding of (W + BA)x vs Wx + B(Ax))
    assert np.abs(fused - base).max() > 0.02 and np.abs(only_first - unfused).max() > 0.01
    record = info.lora
    assert record["mode"] == "fused" and [a["scale"] for a in record["adapters"]] == [0.7, 0.5]
    assert [a["rank"] for a in record["adapters"]] == [4, 8]
    file = adapters[0] / "pytorch_lora_weights.safetensors"
    assert record["adapters"][0]["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()


@needs_packages("peft", install='pip install -e ".[lora]"')
def test_the_row_records_the_adapters(adapters, tmp_path):
    spec = sdbuild.compose([*FAST, "lora=unfused", adapter_list({"path": adapters[1], "scale": 0.5})])
    row = sdbuild.run(spec, tmp_path / "job")
    assert row["status"] == "ok", row.get("error")
    saved = json.loads((tmp_path / "job" / "result.json").read_text())
    assert saved["lora"]["mode"] == "unfused" and saved["lora"]["adapters"][0]["scale"] == 0.5
    assert saved["lora"]["adapters"][0]["path"].endswith("b/pytorch_lora_weights.safetensors")
    assert saved["spec"]["lora"]["mode"] == "unfused" and saved["choices"]["lora"] == "unfused"


@needs_packages("peft", install='pip install -e ".[lora]"')
def test_hotswap_eager_swaps_the_second_adapter_in(adapters, tmp_path):
    """Without compile the swap still replaces the first adapter's weights (no recompilation to count)."""
    import numpy as np

    from helpers import built, run
    from sdbuild.levers.lora import measure_swaps

    spec, pipe, info = built("lora=hotswap", adapter_list({"path": adapters[0]}, {"path": adapters[1]}))
    first = run(spec, pipe)
    swaps = measure_swaps(pipe, spec, lambda: None)
    second = run(spec, pipe)
    b_only, _, _ = images("lora=unfused", adapter_list({"path": adapters[1]}))
    assert info.lora["target_rank"] == 8 and swaps[0]["recompiles"] is None and swaps[0]["swap_s"] > 0
    assert np.abs(first - second).max() > 0.01 and np.abs(second - b_only).max() < 1e-4


@pytest.mark.slow  # torch.compile of the tiny UNet on CPU: about 2 minutes on a quiet machine, twice
@needs_packages("peft", install='pip install -e ".[lora]"')
def test_hotswap_under_compile_swaps_without_recompiling(adapters, tmp_path):
    """The claim to prove: prepared with the largest rank (4 then 8), the second adapter swaps into the
    compiled UNet and the next call compiles no new graph; the row records it."""
    spec = sdbuild.compose(["run.steps=2", "run.warmup=1", "run.repeats=1", "run.timeout_s=0", "compile=inductor",
                            "lora=hotswap", adapter_list({"path": adapters[0]}, {"path": adapters[1]})])
    row = sdbuild.run(spec, tmp_path / "job")
    assert row["status"] == "ok", row.get("error")
    (swap,) = row["lora"]["swaps"]
    assert swap["adapter"] == 1 and swap["recompiles"] == 0, swap
    assert swap["swap_s"] > 0 and swap["call_s"] > 0


@needs_packages("peft", install='pip install -e ".[lora]"')
@pytest.mark.parametrize("sweeper", ["basic", "interleaved"])
def test_a_sweep_over_the_modes_reports_each_ones_per_call_cost_and_the_swap(adapters, tmp_path, sweeper):
    """`--multirun lora.mode=fused,unfused,hotswap` with two adapters, each sweeper: every row ok, the
    hotswap row carries its swap (measured after the timed calls; eager here, so nothing to recompile),
    and report.md and index.html say each mode's per-call cost and the swap time. The interleaved
    sweeper (one process, calls alternated) used to write the hotswap row without its swaps."""
    sweep_dir = tmp_path / "sweep"
    chosen = ["hydra/sweeper=interleaved"] if sweeper == "interleaved" else []
    out = run_cli("--multirun", f"hydra.sweep.dir={sweep_dir}", *chosen, *FAST, "run.steps=2", "run.repeats=3",
                  "lora.mode=fused,unfused,hotswap", adapter_list({"path": adapters[0]}, {"path": adapters[1]}),
                  cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    rows = {r["lora"]["mode"]: r for r in (json.loads(p.read_text()) for p in sweep_dir.glob("*/result.json"))}
    assert sorted(rows) == ["fused", "hotswap", "unfused"] and all(r["status"] == "ok" for r in rows.values())
    (swap,) = rows["hotswap"]["lora"]["swaps"]
    assert swap["adapter"] == 1 and swap["swap_s"] > 0 and swap["call_s"] > 0 and swap["recompiles"] is None
    assert "swaps" not in rows["fused"]["lora"] and "swaps" not in rows["unfused"]["lora"]
    if sweeper == "interleaved":
        assert rows["hotswap"]["measurement"]["mode"] == "interleaved" and rows["unfused"]["paired"]
    report = (sweep_dir / "report.md").read_text()
    (line,) = [ln for ln in report.splitlines() if ln.startswith("**LoRA:**")]
    for mode, row in rows.items():
        assert f"lora={mode} (job {row['job']['num']}" in line, line
    assert f"adapter 1: swap {swap['swap_s']:.4f} s" in line and "not compiled" in line
    assert 'id="lora"' in (sweep_dir / "index.html").read_text()


@pytest.mark.slow  # two tiny UNets compiled on CPU: minutes cold, 38 s with Inductor's cache warm (load ~4)
@needs_packages("peft", install='pip install -e ".[lora]"')
def test_an_interleaved_hotswap_member_swaps_under_compile_without_recompiling(adapters, tmp_path):
    """The interleaved sweeper, compile=inductor: the hotswap member's swap (after every member's timed
    calls, other compiled UNets of the same class in the process) compiles no new graph."""
    sweep_dir = tmp_path / "sweep"
    out = run_cli("--multirun", f"hydra.sweep.dir={sweep_dir}", "hydra/sweeper=interleaved", "compile=inductor",
                  "run.steps=2", "run.warmup=1", "run.repeats=3", "run.timeout_s=0", "run.threads=1",
                  "lora.mode=unfused,hotswap", adapter_list({"path": adapters[0]}, {"path": adapters[1]}),
                  cwd=tmp_path, timeout=1500)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    rows = {r["lora"]["mode"]: r for r in (json.loads(p.read_text()) for p in sweep_dir.glob("*/result.json"))}
    assert all(r["status"] == "ok" for r in rows.values()) and rows["hotswap"]["measurement"]["mode"] == "interleaved"
    (swap,) = rows["hotswap"]["lora"]["swaps"]
    assert swap["recompiles"] == 0 and swap["swap_s"] > 0, swap
    assert "0 new graphs" in (sweep_dir / "report.md").read_text()


# --- the transformer family: tiny Flux -----------------------------------------------------------


@pytest.fixture(scope="module")
def flux_adapter(tmp_path_factory):
    """A rank-4 LoRA made with peft on the tiny Flux transformer's attention, saved with FluxPipeline's
    own save_lora_weights (transformer.* keys)."""
    pytest.importorskip("peft", reason="LoRA needs the optional package peft: pip install -e \".[lora]\"")
    return write_adapter(tmp_path_factory.mktemp("flux-lora") / "f", rank=4, seed=3, family="tiny_flux")


def test_a_flux_adapter_given_to_a_unet_is_refused(flux_adapter):
    text = refusal("lora=unfused", adapter_list({"path": flux_adapter}))
    assert "is an adapter for a transformer (Flux, SD3)" in text and "sd15" in text


@needs_packages("peft", install='pip install -e ".[lora]"')
def test_flux_fused_and_unfused_give_the_same_image_and_differ_from_the_base(flux_adapter):
    import numpy as np

    one = adapter_list({"path": flux_adapter, "scale": 0.8})
    base, _, _ = images("model=tiny_flux")
    fused, fused_pipe, info = images("model=tiny_flux", "lora=fused", one)
    unfused, unfused_pipe, _ = images("model=tiny_flux", "lora=unfused", one)
    assert not any("lora" in n for n, _ in fused_pipe.transformer.named_modules())
    assert unfused_pipe.get_active_adapters() == ["adapter_0"]
    assert any("lora" in n for n, _ in unfused_pipe.transformer.named_modules())
    print(f"flux fused vs unfused max abs diff {np.abs(fused - unfused).max():.3g}, vs base {np.abs(fused - base).max():.3g}")
    assert np.abs(fused - unfused).max() < 1e-4  # measured: 1.25e-6 max (float32 rounding of (W + BA)x vs Wx + B(Ax))
    assert np.abs(fused - base).max() > 0.02 and np.abs(unfused - base).max() > 0.02
    assert info.lora["mode"] == "fused" and info.lora["adapters"][0]["rank"] == 4


# --- adapters given as hub ids (org/name): offline from the HF cache, downloaded only when asked -------

HUB_LORA = "sdbuild-test/tiny-lora"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache of this test's own (huggingface_hub reads the constant at each lookup)."""
    import huggingface_hub.constants as hf

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_hub_adapter_not_in_the_cache_is_refused_naming_the_download_flag(hf_cache, monkeypatch):
    text = refusal("lora=unfused", adapter_list({"path": HUB_LORA, "weight_name": "x.safetensors"}))
    assert f"lora.adapters[0].path={HUB_LORA}" in text and "x.safetensors is not in the local Hugging Face cache" in text
    assert "lora.adapters[0].download=true" in text and "model.download=true" in text and "hf download" in text
    assert "is not a .safetensors file" in refusal("lora=unfused", adapter_list({"path": HUB_LORA,
                                                                                  "weight_name": "x.txt"}))
    assert "is a pickle file" in refusal("lora=unfused", adapter_list({"path": HUB_LORA, "weight_name": "x.bin",
                                                                        "download": "true"}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = refusal("lora=unfused", adapter_list({"path": HUB_LORA, "download": "true"}))
    assert "HF_HUB_OFFLINE is set" in text and "lora.adapters[0].download=true" in text


def test_download_with_a_local_adapter_is_refused(adapters):
    text = refusal("lora=unfused", adapter_list({"path": adapters[0], "download": "true"}))
    assert "needs lora.adapters[0].path to be a hub id" in text


@needs_packages("peft", install='pip install -e ".[lora]"')
def test_a_hub_adapter_in_the_cache_loads_offline_and_the_row_records_it(adapters, hf_cache, tmp_path, monkeypatch):
    """The adapter's repo written into the HF cache in huggingface_hub's layout (tests/fake_hub.py:
    write_cached_repo), HF_HUB_OFFLINE=1: it resolves from the cache, gives the local folder's image,
    and the row records the hub id, the file, its commit and sha256."""
    import numpy as np

    from fake_hub import COMMIT, write_cached_repo

    write_cached_repo(hf_cache, HUB_LORA, adapters[1])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub, _, info = images("lora=unfused", adapter_list({"path": HUB_LORA, "scale": 0.5}))
    local, _, _ = images("lora=unfused", adapter_list({"path": adapters[1], "scale": 0.5}))
    assert np.array_equal(hub, local)
    (record,) = info.lora["adapters"]
    file = adapters[1] / "pytorch_lora_weights.safetensors"
    assert record["hub_id"] == HUB_LORA and record["weight_name"] == file.name and record["revision"] == COMMIT
    assert record["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest() and record["scale"] == 0.5
    assert record["path"].startswith(str(hf_cache)) and record["rank"] == 8


@needs_packages("peft", install='pip install -e ".[lora]"')
def test_a_hub_adapter_downloads_only_when_asked_then_loads_offline(adapters, tmp_path):
    """Against a real HTTP server speaking the hub's API (tests/fake_hub.py) and huggingface_hub's own
    hf_hub_download: without `download: true` the run is refused with exit 2 before any request; with
    it only the adapter's one safetensors file is fetched (not the pickle beside it), the row is ok and
    records the repo; a second run without the flag, the hub gone and HF_HUB_OFFLINE=1, loads it from
    the cache to the same image."""
    import shutil

    import numpy as np
    from PIL import Image

    from fake_hub import FakeHub

    repo = shutil.copytree(adapters[0], tmp_path / "repo")
    (repo / "pytorch_lora_weights.bin").write_bytes(b"\x80\x04 a pickle: never fetched")
    hf = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_HUB_DISABLE_XET": "1"}
    common = [*FAST, "run.steps=2", "lora=unfused"]
    item = {"path": HUB_LORA, "scale": 0.8}
    with FakeHub({HUB_LORA: repo}) as hub:
        env = {**hf, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0"}
        refused = run_cli(*common, adapter_list(item), cwd=tmp_path, env=env)
        assert refused.returncode == 2, refused.stdout + refused.stderr[-3000:]
        assert "lora.adapters[0].download=true" in refused.stderr and "Traceback" not in refused.stderr
        assert hub.requests == []  # offline by default: not one request
        first = run_cli(*common, adapter_list({**item, "download": "true"}), f"hydra.run.dir={tmp_path / 'first'}",
                        cwd=tmp_path, env=env)
        fetched = hub.fetched()
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]
    assert fetched == ["pytorch_lora_weights.safetensors"], fetched
    row = json.loads((tmp_path / "first" / "result.json").read_text())
    assert row["status"] == "ok", row.get("error")
    (record,) = row["lora"]["adapters"]
    file = repo / "pytorch_lora_weights.safetensors"
    assert record["hub_id"] == HUB_LORA and record["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert record["path"].startswith(str(tmp_path / "hf" / "hub")) and record["scale"] == 0.8

    second = run_cli(*common, adapter_list(item), f"hydra.run.dir={tmp_path / 'second'}", cwd=tmp_path,
                     env={**hf, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "1"})  # the hub is shut down
    assert second.returncode == 0, second.stdout + second.stderr[-3000:]
    assert json.loads((tmp_path / "second" / "result.json").read_text())["status"] == "ok"
    pictures = [np.asarray(Image.open(tmp_path / run / "image.png")) for run in ("first", "second")]
    assert pictures[0].std() > 0 and np.array_equal(pictures[0], pictures[1])


@needs_packages("peft", install='pip install -e ".[lora]"')  # without peft, its refusal comes first
def test_an_unreachable_hub_for_an_adapter_is_a_clear_refusal(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
           "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    out = run_cli(*FAST, "lora=unfused", adapter_list({"path": HUB_LORA, "download": "true"}), cwd=tmp_path, env=env)
    assert out.returncode == 2, out.stdout + out.stderr
    text = out.stdout + out.stderr
    assert f"could not be downloaded from http://127.0.0.1:{port}" in text and "lora.adapters[0]" in text
    assert "Traceback" not in text


def test_an_adapters_download_flag_is_not_part_of_the_rows_identity():
    """How a file got here is not what is built (its sha256 is in the row): a row measured with
    `download: true` matches the same spec without it on resume; the scale still tells specs apart."""
    from sdbuild.spec import spec_key, spec_to_dict

    def key(**item):
        return spec_key(spec_to_dict(sdbuild.compose(["lora=unfused", adapter_list({"path": HUB_LORA, **item})])))

    assert key(download="true") == key(download="false") == key()
    assert key(scale=0.5) != key()
