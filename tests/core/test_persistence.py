"""Tests for saelib.core.persistence: SAELens round trips, exact saelib round trips, clear errors on
broken checkpoints, atomic and deterministic writes, saves killed (SIGKILL) at every stage."""

import ast
import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import saelib.core
import saelib.core.io
from saelib.core.io import remove_stale_temp_files, remove_stale_temp_folders
from saelib.core.persistence import CFG_FILENAME, WEIGHTS_FILENAME, load_sae, sae_lens_folder, save_instances, save_sae
from saelib.core.sae import SAE, SAEConfig
from tests.builders import random_bias_sae

D_IN, D_SAE, N_INST, INST = 6, 10, 3, 2


def build_sae(architecture="relu", **kw) -> SAE:
    """A 3-instance SAE of the sizes above with random non-zero biases (tests.builders)."""
    return random_bias_sae(architecture, d_in=D_IN, d_sae=D_SAE, n_inst=N_INST, **kw)


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
SAE_FILES = {CFG_FILENAME, WEIGHTS_FILENAME}
# the stages of a save over an existing SAE folder, in order (saelib.core.io.atomic_write_folder)
STAGES = ["created", f"wrote {WEIGHTS_FILENAME}", f"wrote {CFG_FILENAME}", "synced", "swapped", "synced parent",
          "removed old"]


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def sibling(target: str, kind: str = "saving") -> str:
    """A sibling folder name as the module docstring of saelib.core.io gives it."""
    return f".{target}.{uuid.uuid4().hex}.{kind}"


def leftover_name(target: str) -> str:
    """A temporary file name as atomic_write_bytes makes it (``.<name>.<uuid4 hex>.tmp``)."""
    return f".{target}.{uuid.uuid4().hex}.tmp"


def test_failed_write_keeps_old_files(tmp_path, monkeypatch):
    folder = save_sae(build_sae("relu"), tmp_path / "sae", instance=0)
    before = snapshot(folder)

    def failing_fsync(fd):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(saelib.core.io.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="simulated"):
        save_sae(build_sae("relu"), folder, instance=1)  # different weights
    assert snapshot(folder) == before  # old files intact
    assert os.listdir(tmp_path) == ["sae"]  # no temporary folder left behind


def test_save_over_an_existing_sae_passes_every_stage_in_order(tmp_path, monkeypatch):
    sae = build_sae("relu")
    folder = save_sae(sae, tmp_path / "sae", instance=0)
    seen = []
    monkeypatch.setattr(saelib.core.io, "_stage_hook", seen.append)
    save_sae(sae, folder, instance=1)
    assert seen == STAGES
    assert os.listdir(tmp_path) == ["sae"]
    assert_same_state(load_sae(folder), sae.instance(1))


def wait_killed(pid: int, timeout_s: float = 120.0) -> int:
    """Wait for child ``pid``; the signal that ended it (0 if it exited), failing after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"the saving child {pid} did not end within {timeout_s} s")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("stage", STAGES)
def test_save_killed_at_any_stage_leaves_the_old_or_the_new_sae(tmp_path, sae_lens, stage):
    sae = build_sae("batchtopk")
    folder = save_sae(sae, tmp_path / "sae", instance=0)  # the old SAE
    pid = os.fork()
    if pid == 0:  # the child saves instance 1 over it and SIGKILLs itself on reaching `stage`
        try:
            def kill_at(reached):
                if reached == stage:
                    os.kill(os.getpid(), signal.SIGKILL)

            saelib.core.io._stage_hook = kill_at
            save_sae(sae, folder, instance=1)
        finally:
            os._exit(3)  # reached only if the kill never came
    assert wait_killed(pid) == signal.SIGKILL
    expected = 0 if STAGES.index(stage) < STAGES.index("swapped") else 1  # the exchange is the one step
    assert sorted(os.listdir(folder)) == sorted(SAE_FILES)
    assert_same_state(load_sae(folder), sae.instance(expected))
    x = torch.randn(32, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(sae_lens.SAE.load_from_disk(str(folder)).encode(x), sae.encode(x)[:, expected],
                                   rtol=0, atol=1e-5)
    leftovers = sorted(set(os.listdir(tmp_path)) - {"sae"})
    assert all(name.startswith(".sae.") and name.endswith(".saving") for name in leftovers)
    assert bool(leftovers) == (stage != "removed old")  # the killed save's folder (new or old SAE), never loaded
    save_sae(sae, folder, instance=2)  # the next save removes it
    assert os.listdir(tmp_path) == ["sae"]
    assert_same_state(load_sae(folder), sae.instance(2))


@pytest.mark.parametrize("stage", STAGES)
def test_save_failing_at_any_stage_leaves_the_old_or_the_new_sae(tmp_path, monkeypatch, stage):
    sae = build_sae("relu")
    folder = save_sae(sae, tmp_path / "sae", instance=0)

    def fail_at(reached):
        if reached == stage:
            raise OSError(f"failure at {reached} (simulated)")

    monkeypatch.setattr(saelib.core.io, "_stage_hook", fail_at)
    with pytest.raises(OSError, match="simulated"):
        save_sae(sae, folder, instance=1)
    monkeypatch.undo()
    swapped = STAGES.index(stage) >= STAGES.index("swapped")
    assert_same_state(load_sae(folder), sae.instance(1 if swapped else 0))
    if not swapped:  # cleaned up at once
        assert os.listdir(tmp_path) == ["sae"]
    save_sae(sae, folder, instance=2)
    assert os.listdir(tmp_path) == ["sae"]


def test_two_rename_fallback_replaces_and_restores_the_old_folder(tmp_path, monkeypatch):
    """Where the exchange is unavailable: two renames; a failure between them puts the old SAE back."""
    sae = build_sae("relu")
    folder = save_sae(sae, tmp_path / "sae", instance=0)
    monkeypatch.setattr(saelib.core.io, "_exchange", lambda a, b: False)
    save_sae(sae, folder, instance=1)
    assert_same_state(load_sae(folder), sae.instance(1))
    assert os.listdir(tmp_path) == ["sae"]

    def fail_between_renames(reached):
        if reached == "moved old aside":
            assert not folder.exists()  # the window the exchange closes
            raise OSError("failure between the renames (simulated)")

    monkeypatch.setattr(saelib.core.io, "_stage_hook", fail_between_renames)
    with pytest.raises(OSError, match="simulated"):
        save_sae(sae, folder, instance=2)
    assert_same_state(load_sae(folder), sae.instance(1))
    assert os.listdir(tmp_path) == ["sae"]


def test_weights_of_another_save_are_detected(tmp_path):
    """Files mixed by other means (e.g. copied by hand) fail the SHA-256 recorded in cfg.json."""
    sae = build_sae("relu")
    a, b = save_sae(sae, tmp_path / "a", instance=0), save_sae(sae, tmp_path / "b", instance=1)
    (a / WEIGHTS_FILENAME).write_bytes((b / WEIGHTS_FILENAME).read_bytes())
    with pytest.raises(ValueError, match="SHA-256"):
        load_sae(a)


def test_save_refuses_to_replace_what_it_did_not_write(tmp_path):
    sae = build_sae("relu")
    folder = save_sae(sae, tmp_path / "sae", instance=0)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"sae holds \['notes.txt'\]"):
        save_sae(sae, folder, instance=1)
    assert (folder / "notes.txt").read_text() == "mine"
    (folder / "notes.txt").unlink()
    assert_same_state(load_sae(folder), sae.instance(0))
    (folder / CFG_FILENAME).unlink()
    (folder / CFG_FILENAME).mkdir()  # a folder under an SAE file's name is not saelib's either
    with pytest.raises(FileExistsError, match=CFG_FILENAME):
        save_sae(sae, folder, instance=1)
    assert (folder / CFG_FILENAME).is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="file exists and is not a folder"):
        save_sae(sae, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"
    (tmp_path / "link").symlink_to(folder)
    with pytest.raises(FileExistsError, match="link exists and is not a folder"):
        save_sae(sae, tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert sorted(os.listdir(tmp_path)) == ["file", "link", "sae"]


def test_next_save_removes_leftovers_of_interrupted_saves(tmp_path):
    sae = build_sae("relu")
    folder = save_sae(sae, tmp_path / "sae", instance=0)
    (folder / leftover_name(WEIGHTS_FILENAME)).write_bytes(b"\0" * 64)  # a killed atomic_write_bytes: replaced with the folder
    stale = [sibling("sae"), sibling("sae", "old")]  # a killed save's new folder; the two-rename fallback's old one
    for name in stale:
        save_sae(sae, tmp_path / name, instance=1)
    partial = tmp_path / sibling("sae")  # killed while writing
    partial.mkdir()
    (partial / WEIGHTS_FILENAME).write_bytes(b"\0" * 64)
    foreign = tmp_path / sibling("sae")  # holds a file saelib does not write: kept, with that file only
    save_sae(sae, foreign, instance=1)
    (foreign / "keep.txt").write_text("x")
    others = [sibling("other"), ".sae.not-a-uuid.saving", "notes.saving"]  # not leftovers of this folder
    for name in others:
        (tmp_path / name).mkdir()
        (tmp_path / name / CFG_FILENAME).write_text("{}")
    save_sae(sae, folder, instance=2)
    assert sorted(os.listdir(tmp_path)) == sorted(["sae", foreign.name] + others)
    assert os.listdir(foreign) == ["keep.txt"]
    assert sorted(os.listdir(folder)) == sorted(SAE_FILES)
    assert_same_state(load_sae(folder), sae.instance(2))


def test_old_folder_is_kept_while_the_target_is_missing(tmp_path):
    """A two-rename save killed between its renames leaves the only copy of the old SAE aside."""
    aside = save_sae(build_sae("relu"), tmp_path / sibling("sae", "old"))
    assert remove_stale_temp_folders(tmp_path / "sae", SAE_FILES) == []
    assert sorted(os.listdir(aside)) == sorted(SAE_FILES)
    save_sae(build_sae("relu"), tmp_path / "sae")
    assert sorted(os.listdir(tmp_path)) == ["sae"]  # removed once a save put an SAE at the target


def test_cleanup_leaves_writes_in_progress_alone(tmp_path):
    """A temporary file or folder whose writer is alive (it holds the lock) is not a leftover."""
    fcntl = pytest.importorskip("fcntl")
    folder = save_sae(build_sae("relu"), tmp_path / "sae", instance=0)
    busy_file = tmp_path / leftover_name("results.json")
    busy_folder = tmp_path / sibling("sae")
    busy_folder.mkdir()
    fd = os.open(busy_folder, os.O_RDONLY)
    try:
        with open(busy_file, "wb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # as atomic_write_bytes holds it until the rename
            fcntl.flock(fd, fcntl.LOCK_EX)  # as atomic_write_folder holds its folder until the swap
            save_sae(build_sae("relu"), folder, instance=1)
            saelib.core.io.atomic_write_bytes(tmp_path / "results.json", b"{}")
            assert busy_file.exists() and busy_folder.exists()
    finally:
        os.close(fd)
    assert remove_stale_temp_files(tmp_path) == [busy_file]  # their writers are gone now
    assert remove_stale_temp_folders(folder, SAE_FILES) == [busy_folder]
    assert sorted(os.listdir(tmp_path)) == ["results.json", "sae"]


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


def test_load_or_train_trains_once_then_loads_the_same_weights(cache_dir, monkeypatch):
    import saelib.core.train
    from saelib.core.persistence import load_or_train

    data = torch.randn(500, D_IN)
    new = lambda: SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, seed=3))  # noqa: E731
    sae, folder, now = load_or_train(new(), data, _train_cfg(), "data-a", metadata={"hook_name": "h"})
    assert now and folder.parent == cache_dir
    assert not torch.equal(sae.W_enc, new().W_enc)  # it was trained

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading")

    monkeypatch.setattr(saelib.core.train, "train_sae", no_training)
    again, folder2, now2 = load_or_train(new(), data, _train_cfg(), "data-a")
    assert folder2 == folder and not now2
    assert_same_state(again, sae)
    assert json.loads((folder / CFG_FILENAME).read_text())["metadata"]["hook_name"] == "h"


@pytest.mark.parametrize("change", ["steps", "seed", "data_key", "d_sae"])
def test_load_or_train_key_changes_with_config_data_and_init(cache_dir, change):
    from saelib.core.persistence import load_or_train

    data = torch.randn(300, D_IN)
    _, base, _ = load_or_train(SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE)), data, _train_cfg(), "a")
    d_sae = D_SAE + 1 if change == "d_sae" else D_SAE
    cfg = _train_cfg(steps=21 if change == "steps" else 20, seed=1 if change == "seed" else 0)
    _, other, now = load_or_train(SAE(SAEConfig(d_in=D_IN, d_sae=d_sae)), data, cfg,
                                  "b" if change == "data_key" else "a")
    assert now and other != base


def test_load_or_train_refuses_several_instances(cache_dir):
    from saelib.core.persistence import load_or_train

    with pytest.raises(ValueError, match="n_inst=3"):
        load_or_train(build_sae("relu"), torch.randn(10, D_IN), _train_cfg(), "a")


def test_load_or_train_key_follows_the_callers_code_files(tmp_path, monkeypatch):
    from saelib.core.persistence import load_or_train

    monkeypatch.setenv("SAELIB_CACHE_DIR", str(tmp_path / "cache"))
    code = tmp_path / "data_fn.py"
    code.write_text("SCALE = 1\n")
    data = torch.randn(300, D_IN)
    new = lambda: SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE))  # noqa: E731
    _, a, _ = load_or_train(new(), data, _train_cfg(), "a", code_files=[code])
    _, again, now = load_or_train(new(), data, _train_cfg(), "a", code_files=[str(code)])
    assert again == a and not now
    _, without, now = load_or_train(new(), data, _train_cfg(), "a")
    assert without != a and now
    code.write_text("SCALE = 2\n")  # the caller's code changed: train again
    _, edited, now = load_or_train(new(), data, _train_cfg(), "a", code_files=[code])
    assert edited not in (a, without) and now
    with pytest.raises(FileNotFoundError, match="missing.py"):
        load_or_train(new(), data, _train_cfg(), "a", code_files=[tmp_path / "missing.py"])


def test_load_or_train_hashes_the_core_training_modules():
    from saelib.core.persistence import _training_sources

    core = Path(saelib.core.__file__).parent
    sources = _training_sources()
    assert all(p.parent == core for p in sources)  # nothing outside saelib.core
    assert {"train.py", "train_parts.py", "sae.py", "penalties.py", "matryoshka.py", "distributed.py",
            "metrics.py"} <= {p.name for p in sources}
    assert "persistence.py" not in {p.name for p in sources}  # saving is not training


def test_core_imports_nothing_from_the_other_subpackages():
    core = Path(saelib.core.__file__).parent
    for file in sorted(core.glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith("..") and not (
                    name.startswith("saelib.") and not name.startswith("saelib.core")
                ), f"{file.name} imports {name}"


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


def test_load_or_train_checkpoints_are_the_same_run_stopped_early(cache_dir, monkeypatch):
    """A checkpoint after s steps equals a run whose steps are taken one by one and stopped at s:
    the callback sees the SAE between steps, so it must hold exactly the state after s steps."""
    import saelib.core.train
    from saelib.core.persistence import checkpoint_folder, load_checkpoints, load_or_train
    from saelib.core.train import train_sae

    data = torch.randn(400, D_IN)
    new = lambda: SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, seed=5))  # noqa: E731
    sae, folder, now = load_or_train(new(), data, _train_cfg(steps=12), "d", checkpoints=(3, 6))
    assert now
    ckpts = load_checkpoints(folder)
    assert list(ckpts) == [3, 6]
    assert checkpoint_folder(folder, 3).name == f"{folder.name}-step3"
    meta = json.loads((checkpoint_folder(folder, 6) / CFG_FILENAME).read_text())["saelib_training"]
    assert meta["checkpoint_steps"] == 6 and meta["tokens_seen"] == 6 * 32
    # the state after 3 steps, recorded independently by a callback on a fresh run
    seen = {}
    train_sae(new(), data, _train_cfg(steps=12),
              callback=lambda step, s: seen.setdefault(step + 1, {k: v.clone() for k, v in s.state_dict().items()}))
    for steps, ck in ckpts.items():
        for k, v in ck.state_dict().items():
            torch.testing.assert_close(v, seen[steps][k], rtol=0, atol=0, equal_nan=True)  # threshold: NaN for ReLU
    assert not torch.equal(ckpts[3].W_enc, ckpts[6].W_enc) and not torch.equal(ckpts[6].W_enc, sae.W_enc)

    # loads without training when every checkpoint is there; trains again when one is missing
    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading")

    monkeypatch.setattr(saelib.core.train, "train_sae", no_training)
    _, folder2, now2 = load_or_train(new(), data, _train_cfg(steps=12), "d", checkpoints=(3, 6))
    assert folder2 == folder and not now2
    import shutil
    shutil.rmtree(checkpoint_folder(folder, 3))
    with pytest.raises(AssertionError, match="trained again"):
        load_or_train(new(), data, _train_cfg(steps=12), "d", checkpoints=(3, 6))


def test_load_or_train_checkpoints_change_the_key_and_are_checked(cache_dir):
    from saelib.core.persistence import load_checkpoints, load_or_train

    data = torch.randn(300, D_IN)
    new = lambda: SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE))  # noqa: E731
    _, plain, _ = load_or_train(new(), data, _train_cfg(), "a")
    _, with_ckpt, now = load_or_train(new(), data, _train_cfg(), "a", checkpoints=(5,))
    assert now and with_ckpt != plain and load_checkpoints(plain) == {}
    for bad in [(0,), (20,), (25,)]:
        with pytest.raises(ValueError, match=r"checkpoints must be step counts in \[1, steps=20\)"):
            load_or_train(new(), data, _train_cfg(), "a", checkpoints=bad)
