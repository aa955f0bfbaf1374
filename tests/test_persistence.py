"""Tests for saelib.core.persistence: SAELens round trips, exact saelib round trips, clear errors on
broken checkpoints, atomic and deterministic writes."""

import json
import uuid

import pytest
import torch
from safetensors.torch import load_file, save_file

import saelib.core.persistence
from saelib.core.persistence import CFG_FILENAME, WEIGHTS_FILENAME, load_sae, sae_lens_folder, save_instances, save_sae
from saelib.core.sae import SAE, SAEConfig

D_IN, D_SAE, N_INST, INST = 6, 10, 3, 2


@pytest.fixture(scope="module")
def sae_lens():
    return pytest.importorskip("sae_lens")


def build_sae(architecture="relu", *, k=None, d_out=None, apply_b_dec_to_input=True, use_b_dec=True,
              trained_threshold=True) -> SAE:
    """A 3-instance SAE with random non-zero biases; BatchTopK gets a threshold per instance at
    the median positive pre-activation, so the threshold visibly changes the output."""
    if architecture != "relu" and k is None:
        k = 3
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, n_inst=N_INST, architecture=architecture, k=k, d_out=d_out,
                    apply_b_dec_to_input=apply_b_dec_to_input, use_b_dec=use_b_dec, seed=1)
    sae = SAE(cfg)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.W_dec.add_(0.3 * torch.randn_like(sae.W_dec))
        sae.b_enc.copy_(0.2 * torch.randn_like(sae.b_enc))
        if use_b_dec:
            sae.b_dec.copy_(0.5 * torch.randn_like(sae.b_dec))
        if architecture == "batchtopk" and trained_threshold:
            pre = sae.pre_acts(torch.randn(256, D_IN))  # [batch, inst, d_sae]
            sae.threshold.copy_(torch.stack([pre[:, i][pre[:, i] > 0].median() for i in range(N_INST)]))
    return sae.eval()


def assert_same_state(a: SAE, b: SAE) -> None:
    assert a.cfg.to_dict() == b.cfg.to_dict()
    for (name_a, ta), (name_b, tb) in zip(
        list(a.named_parameters()) + list(a.named_buffers()),
        list(b.named_parameters()) + list(b.named_buffers()),
    ):
        assert name_a == name_b
        torch.testing.assert_close(ta, tb, rtol=0, atol=0, equal_nan=True, msg=name_a)


# ---------------------------------------------------------------------------- SAELens round trip
CASES = {
    "relu": (dict(architecture="relu"), "StandardSAE"),
    "topk": (dict(architecture="topk", k=3), "TopKSAE"),
    "batchtopk": (dict(architecture="batchtopk", k=3), "JumpReLUSAE"),
    "relu_no_bdec_input": (dict(architecture="relu", apply_b_dec_to_input=False), "StandardSAE"),
    "transcoder": (dict(architecture="relu", d_out=4, apply_b_dec_to_input=False), "Transcoder"),
    "batchtopk_transcoder": (dict(architecture="batchtopk", k=3, d_out=4, apply_b_dec_to_input=False),
                             "JumpReLUTranscoder"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sae_lens_loads_same_encode_decode(tmp_path, sae_lens, case):
    kwargs, sae_lens_class = CASES[case]
    sae = build_sae(**kwargs)
    folder = save_sae(sae, tmp_path / "sae", instance=INST)
    assert sorted(p.name for p in folder.iterdir()) == sorted([CFG_FILENAME, WEIGHTS_FILENAME])

    loaded = sae_lens.SAE.load_from_disk(folder)
    assert type(loaded).__name__ == sae_lens_class
    x = torch.randn(64, D_IN)
    with torch.no_grad():
        acts = sae.encode(x)[:, INST]  # [batch, d_sae]
        out = sae.decode(sae.encode(x))[:, INST]  # [batch, d_out]
        sl_acts = loaded.encode(x)
        sl_out = loaded.decode(sl_acts)
    assert 0 < (acts > 0).float().mean() < 1  # a non-trivial sparsity pattern
    if kwargs["architecture"] == "batchtopk":  # the threshold really matters
        pre = sae.pre_acts(x)[:, INST]
        assert ((pre > 0) & (pre <= sae.threshold[INST])).any()
    torch.testing.assert_close(sl_acts, acts, rtol=0, atol=1e-5)
    torch.testing.assert_close(sl_out, out, rtol=0, atol=1e-5)


def test_saved_files_layout(tmp_path):
    sae = build_sae("topk", k=4)
    folder = save_sae(sae, tmp_path / "sae", instance=1)
    cfg = json.loads((folder / CFG_FILENAME).read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["normalize_activations"]) == (D_IN, D_SAE, "float32", "none")
    assert cfg["metadata"]["sae_lens_version"].startswith("6.")
    assert cfg["saelib"] == {**sae.cfg.to_dict(), "n_inst": 1}
    tensors = load_file(folder / WEIGHTS_FILENAME)
    assert {n: tuple(t.shape) for n, t in tensors.items()} == {
        "W_enc": (D_IN, D_SAE), "b_enc": (D_SAE,), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,)}
    assert all(t.dtype == torch.float32 for t in tensors.values())
    torch.testing.assert_close(tensors["W_enc"], sae.W_enc[1].detach(), rtol=0, atol=0)
    torch.testing.assert_close(tensors["b_dec"], sae.b_dec[1].detach(), rtol=0, atol=0)


# ---------------------------------------------------------------------------- saelib round trip
@pytest.mark.parametrize("case", list(CASES))
def test_load_sae_restores_instance_exactly(tmp_path, case):
    kwargs, _ = CASES[case]
    sae = build_sae(**kwargs)
    loaded = load_sae(save_sae(sae, tmp_path / "sae", instance=INST))
    assert not loaded.training
    assert_same_state(loaded, sae.instance(INST))
    if kwargs["architecture"] == "batchtopk":
        assert loaded.threshold.item() == sae.threshold[INST].item()


def test_untrained_batchtopk_is_saelib_only(tmp_path, sae_lens):
    sae = build_sae("batchtopk", trained_threshold=False)
    folder = save_sae(sae, tmp_path / "sae")
    assert json.loads((folder / CFG_FILENAME).read_text())["architecture"] == "saelib_batchtopk"
    loaded = load_sae(folder)
    assert torch.isnan(loaded.threshold).all()
    assert_same_state(loaded, sae.instance(0))
    with pytest.raises(KeyError):
        sae_lens.SAE.load_from_disk(folder)
    with pytest.raises(ValueError, match="BatchTopK SAE whose inference threshold is not set.*saelib.core.persistence.load_sae"):
        sae_lens_folder(folder)


def test_topk_transcoder_is_saelib_only(tmp_path, sae_lens):
    sae = build_sae("topk", k=2, d_out=4, apply_b_dec_to_input=False)
    folder = save_sae(sae, tmp_path / "sae")
    assert_same_state(load_sae(folder), sae.instance(0))
    with pytest.raises(KeyError):
        sae_lens.SAE.load_from_disk(folder)
    with pytest.raises(ValueError, match="TopK transcoder.*no TopK transcoder"):
        sae_lens_folder(folder)


@pytest.mark.parametrize("case", ["relu", "topk", "batchtopk", "transcoder"])
def test_sae_lens_folder_passes_what_sae_lens_can_open(tmp_path, sae_lens, case):
    kwargs, sae_lens_class = CASES[case]
    sae = build_sae(**kwargs)
    folder = save_sae(sae, tmp_path / "sae", instance=INST)
    assert sae_lens_folder(folder) == str(folder)
    loaded = sae_lens.SAE.load_from_disk(sae_lens_folder(folder))
    assert type(loaded).__name__ == sae_lens_class
    x = torch.randn(32, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), sae.encode(x)[:, INST])


def test_sae_lens_folder_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        sae_lens_folder(tmp_path / "nowhere")


def test_use_b_dec_false_round_trip(tmp_path):
    sae = build_sae("relu", use_b_dec=False)
    loaded = load_sae(save_sae(sae, tmp_path / "sae", instance=1))
    assert_same_state(loaded, sae.instance(1))
    assert "b_dec" not in dict(loaded.named_parameters())


def test_load_sae_reads_a_sae_lens_checkpoint(tmp_path, sae_lens):
    from sae_lens import StandardSAE, StandardSAEConfig

    ref = StandardSAE(StandardSAEConfig(d_in=5, d_sae=7))
    with torch.no_grad():
        for p in (ref.W_enc, ref.b_enc, ref.W_dec, ref.b_dec):
            p.copy_(torch.randn_like(p))
    ref.save_model(tmp_path / "ref")
    sae = load_sae(tmp_path / "ref")
    assert (sae.cfg.architecture, sae.cfg.d_in, sae.cfg.d_sae) == ("relu", 5, 7)
    x = torch.randn(32, 5)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x)[:, 0], ref.encode(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(sae(x)[0][:, 0], ref(x), rtol=0, atol=1e-5)


def test_save_is_deterministic(tmp_path):
    sae = build_sae("relu")
    a, b = save_sae(sae, tmp_path / "a"), save_sae(sae, tmp_path / "b")
    for name in (CFG_FILENAME, WEIGHTS_FILENAME):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_save_sae_argument_errors(tmp_path):
    with pytest.raises(IndexError, match="3"):
        save_sae(build_sae(), tmp_path / "x", instance=3)
    with pytest.raises(TypeError):
        save_sae(torch.nn.Linear(2, 2), tmp_path / "x")


@pytest.mark.parametrize("name", ["W_enc", "b_enc", "W_dec", "b_dec"])
def test_save_sae_refuses_non_finite_weights(tmp_path, name):
    sae = build_sae("relu")
    with torch.no_grad():
        getattr(sae, name)[1].view(-1)[0] = float("nan")  # instance 1 only
    with pytest.raises(ValueError, match=rf"instance 1: parameter '{name}' has 1 NaN/inf value"):
        save_sae(sae, tmp_path / "bad", instance=1)
    assert not (tmp_path / "bad" / WEIGHTS_FILENAME).exists()
    assert_same_state(load_sae(save_sae(sae, tmp_path / "ok", instance=0)), sae.instance(0))  # other instance fine


# ---------------------------------------------------------------------------- broken checkpoints
@pytest.fixture
def saved(tmp_path):
    return save_sae(build_sae("relu"), tmp_path / "sae")


def drop_checksum(folder) -> None:
    """Make the checkpoint look hand-made (no recorded SHA-256), to reach the later checks."""
    cfg = json.loads((folder / CFG_FILENAME).read_text())
    del cfg["metadata"]["saelib_weights_sha256"]
    (folder / CFG_FILENAME).write_text(json.dumps(cfg))


def test_missing_files(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_sae(tmp_path / "nowhere")
    (saved / WEIGHTS_FILENAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILENAME):
        load_sae(saved)
    (saved / CFG_FILENAME).unlink()
    with pytest.raises(FileNotFoundError, match=CFG_FILENAME):
        load_sae(saved)


def test_invalid_json(saved):
    (saved / CFG_FILENAME).write_text('{"architecture": "standard", ')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_sae(saved)


@pytest.mark.parametrize("checksum", [True, False])
def test_truncated_weights(saved, checksum):
    if not checksum:
        drop_checksum(saved)
    raw = (saved / WEIGHTS_FILENAME).read_bytes()
    (saved / WEIGHTS_FILENAME).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="SHA-256" if checksum else "not a valid safetensors"):
        load_sae(saved)


def test_garbage_weights(saved):
    drop_checksum(saved)
    (saved / WEIGHTS_FILENAME).write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_sae(saved)


def test_shape_mismatch_names_tensor_and_shapes(saved):
    tensors = load_file(saved / WEIGHTS_FILENAME)
    tensors["W_enc"] = torch.zeros(D_IN, D_SAE - 1)
    save_file(tensors, saved / WEIGHTS_FILENAME)
    drop_checksum(saved)
    with pytest.raises(ValueError, match=r"'W_enc'.*\(6, 9\).*expected \(6, 10\)"):
        load_sae(saved)


def test_cfg_disagreeing_with_saelib_config(saved):
    cfg = json.loads((saved / CFG_FILENAME).read_text())
    cfg["d_sae"] = 11
    (saved / CFG_FILENAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="d_sae"):
        load_sae(saved)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(saved, bad):
    tensors = load_file(saved / WEIGHTS_FILENAME)
    tensors["W_dec"][3, 1] = bad
    save_file(tensors, saved / WEIGHTS_FILENAME)
    drop_checksum(saved)
    with pytest.raises(ValueError, match="'W_dec'.*NaN/inf"):
        load_sae(saved)


def test_missing_and_unexpected_tensors(saved):
    drop_checksum(saved)
    tensors = load_file(saved / WEIGHTS_FILENAME)
    save_file({n: t for n, t in tensors.items() if n != "b_enc"}, saved / WEIGHTS_FILENAME)
    with pytest.raises(ValueError, match="b_enc"):
        load_sae(saved)
    save_file({**tensors, "extra": torch.zeros(2)}, saved / WEIGHTS_FILENAME)
    with pytest.raises(ValueError, match="extra"):
        load_sae(saved)


# ---------------------------------------------------------------------------- atomicity
def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_failed_write_keeps_old_files(tmp_path, monkeypatch):
    folder = save_sae(build_sae("relu"), tmp_path / "sae", instance=0)
    before = snapshot(folder)

    def failing_fsync(fd):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(saelib.core.persistence.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="simulated"):
        save_sae(build_sae("relu"), folder, instance=1)  # different weights
    assert snapshot(folder) == before  # old files intact, no temporary files left behind


def test_interrupted_save_between_files_is_detected(tmp_path, monkeypatch):
    folder = save_sae(build_sae("relu"), tmp_path / "sae", instance=0)
    real_replace = saelib.core.persistence.os.replace

    def replace_weights_only(src, dst):
        if str(dst).endswith(CFG_FILENAME):
            raise OSError("crash before cfg.json (simulated)")
        real_replace(src, dst)

    monkeypatch.setattr(saelib.core.persistence.os, "replace", replace_weights_only)
    with pytest.raises(OSError, match="simulated"):
        save_sae(build_sae("relu"), folder, instance=1)
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == sorted([CFG_FILENAME, WEIGHTS_FILENAME])
    with pytest.raises(ValueError, match="SHA-256"):
        load_sae(folder)


def leftover_name(target: str) -> str:
    """A temporary file name as atomic_write_bytes makes it (``.<name>.<uuid4 hex>.tmp``)."""
    return f".{target}.{uuid.uuid4().hex}.tmp"


def test_next_save_removes_leftovers_of_interrupted_saves(tmp_path):
    folder = save_sae(build_sae("relu"), tmp_path / "sae", instance=0)
    stale = [folder / leftover_name(WEIGHTS_FILENAME), folder / leftover_name(CFG_FILENAME)]
    for path in stale:  # what a save killed between writing and renaming leaves behind
        path.write_bytes(b"\0" * 4096)
    others = [folder / f".{WEIGHTS_FILENAME}.not-a-uuid.tmp", folder / "notes.tmp", folder / "keep.txt"]
    for path in others:  # not ours: kept
        path.write_bytes(b"x")
    sae = build_sae("relu")
    save_sae(sae, folder, instance=1)
    assert sorted(p.name for p in folder.iterdir()) == sorted([CFG_FILENAME, WEIGHTS_FILENAME] + [p.name for p in others])
    assert_same_state(load_sae(folder), sae.instance(1))


def test_cleanup_leaves_a_write_in_progress_alone(tmp_path):
    """A temporary file whose writer is alive (it holds the lock) is not a leftover."""
    fcntl = pytest.importorskip("fcntl")
    folder = save_sae(build_sae("relu"), tmp_path / "sae", instance=0)
    busy = folder / leftover_name(WEIGHTS_FILENAME)
    with open(busy, "wb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # as atomic_write_bytes holds it until the rename
        save_sae(build_sae("relu"), folder, instance=1)
        assert busy.exists()
    assert saelib.core.persistence.remove_stale_temp_files(folder) == [busy]  # its writer is gone now
    assert not busy.exists()


# ---------------------------------------------------------------------------- metadata and the trained-SAE cache
def test_metadata_and_training_written_to_cfg_and_sae_lens_loads(tmp_path, sae_lens):
    meta = {"model_name": "m", "hook_name": "blocks.3.hook_resid_pre", "dataset_path": "d", "context_size": 7}
    folder = save_sae(build_sae("relu"), tmp_path / "sae", metadata=meta, training={"input_scale": 0.5})
    cfg = json.loads((folder / CFG_FILENAME).read_text())
    assert {k: cfg["metadata"][k] for k in meta} == meta
    assert cfg["saelib_training"] == {"input_scale": 0.5}
    loaded = sae_lens.SAE.load_from_disk(str(folder))
    assert loaded.cfg.metadata.hook_name == "blocks.3.hook_resid_pre"
    assert loaded.cfg.metadata.model_name == "m"


def test_non_serialisable_metadata_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_sae(build_sae("relu"), tmp_path / "sae", metadata={"bad": object()})
    assert not (tmp_path / "sae" / WEIGHTS_FILENAME).exists()


def _train_cfg(steps=20, seed=0):
    from saelib.core.train import TrainConfig
    return TrainConfig(steps=steps, batch_size=32, lr=1e-2, l1_coeff=0.1, seed=seed, progress=False)


def test_load_or_train_trains_once_then_loads_the_same_weights(tmp_path, monkeypatch):
    import saelib.core.train
    from saelib.core.persistence import load_or_train

    monkeypatch.setenv("SAELIB_CACHE_DIR", str(tmp_path))
    data = torch.randn(500, D_IN)
    new = lambda: SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, seed=3))  # noqa: E731
    sae, folder, now = load_or_train(new(), data, _train_cfg(), "data-a", metadata={"hook_name": "h"})
    assert now and folder.parent == tmp_path
    assert not torch.equal(sae.W_enc, new().W_enc)  # it was trained

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading")

    monkeypatch.setattr(saelib.core.train, "train_sae", no_training)
    again, folder2, now2 = load_or_train(new(), data, _train_cfg(), "data-a")
    assert folder2 == folder and not now2
    assert_same_state(again, sae)
    assert json.loads((folder / CFG_FILENAME).read_text())["metadata"]["hook_name"] == "h"


@pytest.mark.parametrize("change", ["steps", "seed", "data_key", "d_sae"])
def test_load_or_train_key_changes_with_config_data_and_init(tmp_path, monkeypatch, change):
    from saelib.core.persistence import load_or_train

    monkeypatch.setenv("SAELIB_CACHE_DIR", str(tmp_path))
    data = torch.randn(300, D_IN)
    _, base, _ = load_or_train(SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE)), data, _train_cfg(), "a")
    d_sae = D_SAE + 1 if change == "d_sae" else D_SAE
    cfg = _train_cfg(steps=21 if change == "steps" else 20, seed=1 if change == "seed" else 0)
    _, other, now = load_or_train(SAE(SAEConfig(d_in=D_IN, d_sae=d_sae)), data, cfg,
                                  "b" if change == "data_key" else "a")
    assert now and other != base


def test_load_or_train_refuses_several_instances(tmp_path, monkeypatch):
    from saelib.core.persistence import load_or_train

    monkeypatch.setenv("SAELIB_CACHE_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="n_inst=3"):
        load_or_train(build_sae("relu"), torch.randn(10, D_IN), _train_cfg(), "a")


def test_save_instances_one_folder_per_instance(tmp_path):
    sae = build_sae("relu")
    meta = {"hook_name": "blocks.0.hook_resid_pre"}
    folders = save_instances(sae, tmp_path / "run", metadata=meta, training={"steps": 7})
    assert [f.name for f in folders] == ["instance_0", "instance_1", "instance_2"]
    for i, f in enumerate(folders):
        assert_same_state(load_sae(f), sae.instance(i))
        cfg = json.loads((f / CFG_FILENAME).read_text())
        assert cfg["metadata"]["saelib_instance"] == i and cfg["metadata"]["hook_name"] == meta["hook_name"]
        assert cfg["saelib_training"] == {"steps": 7}


def test_save_instances_named(tmp_path):
    sae = build_sae("relu")
    folders = save_instances(sae, tmp_path, names=["S=1", "S=2", "S=4"])
    assert [f.name for f in folders] == ["S=1", "S=2", "S=4"]
    assert_same_state(load_sae(folders[2]), sae.instance(2))


@pytest.mark.parametrize("names", [["a", "b"], ["a", "a", "b"], ["a", "b/c", "d"], ["a", "..", "b"], ["a", "", "b"]])
def test_save_instances_bad_names(tmp_path, names):
    with pytest.raises(ValueError, match="names"):
        save_instances(build_sae("relu"), tmp_path, names=names)
    assert not any(tmp_path.iterdir())


def test_save_instances_subset(tmp_path):
    sae = build_sae("relu")
    folders = save_instances(sae, tmp_path, names=["a", "b"], instances=[2, 0])
    assert_same_state(load_sae(folders[0]), sae.instance(2))
    assert_same_state(load_sae(folders[1]), sae.instance(0))
    assert json.loads((folders[0] / CFG_FILENAME).read_text())["metadata"]["saelib_instance"] == 2
    with pytest.raises(IndexError, match=r"\[3\]"):
        save_instances(sae, tmp_path / "x", instances=[0, 3])


# ---------------------------------------------------------------------------- device and dtype
def test_device_and_dtype_round_trip(tmp_path):
    sae = SAE(SAEConfig(d_in=5, d_sae=7, n_inst=2, dtype="float64", seed=3))
    with torch.no_grad():
        sae.W_enc.add_(1e-12)  # below float32 resolution: must survive the round trip
    folder = save_sae(sae, tmp_path / "sae", instance=1)
    cfg = json.loads((folder / CFG_FILENAME).read_text())
    assert (cfg["dtype"], cfg["device"], cfg["saelib"]["dtype"], cfg["saelib"]["device"]) == ("float64", "cpu", "float64", "cpu")
    loaded = load_sae(folder)
    assert (loaded.cfg.dtype, loaded.cfg.device) == ("float64", "cpu")
    assert loaded.W_enc.dtype == torch.float64 and torch.equal(loaded.W_enc[0], sae.W_enc[1])
    as32 = load_sae(folder, dtype="float32", device="cpu")
    assert as32.cfg.dtype == "float32" and torch.equal(as32.W_enc[0], sae.W_enc[1].float())


def test_folder_saved_before_device_and_dtype_loads_on_cpu_float32(tmp_path):
    sae = SAE(SAEConfig(d_in=5, d_sae=7))
    folder = save_sae(sae, tmp_path / "sae")
    cfg = json.loads((folder / CFG_FILENAME).read_text())
    for key in ("device", "dtype"):  # the layout written before cfg.json recorded them
        del cfg["saelib"][key]
    (folder / CFG_FILENAME).write_text(json.dumps(cfg))
    loaded = load_sae(folder)
    assert (loaded.cfg.device, loaded.cfg.dtype) == ("cpu", "float32")
    assert torch.equal(loaded.W_dec, sae.W_dec)
